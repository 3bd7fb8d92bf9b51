"""Class balance and ambiguous samples: what a classifier-feature Fréchet distance reads as class structure.

In a classifier's feature space most of the spread lies between the classes, so two failures of a generator
raise the covariance part of a Fréchet distance: wrong class proportions (a class dropped or doubled) and
samples between the classes, images the classifier cannot name. A one-step map from Gaussian noise is
continuous: where it crosses from one class's region of the noise to another's it makes such in-between
samples (the bridges between the modes of the toy 8 Gaussians, README). The classifier's softmax tells the
two failures apart:

- ``class_tv``: the total variation distance between the share of samples the classifier assigns to each
  class (its argmax) and the reference's label frequencies, ``1/2 sum_c |p_c - q_c|`` (0: the same balance;
  a finite sample of the data itself scores above 0, about ``sqrt(C / (2 pi M))`` for M samples of C
  equally likely classes);
- ``ambiguous``: the share of samples whose top class probability is below ``threshold`` (0.9 by default).

:class:`ClassBalanceReference` holds the classifier and the reference frequencies (e.g. the training
labels) for many sample sets; :func:`class_balance` scores probabilities already computed. Non-finite
input: NaN and a warning (:mod:`flowmatch.metrics.guard`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from flowmatch.metrics.guard import finite_inputs

__all__ = ["ClassBalance", "ClassBalanceReference", "class_balance"]


@dataclass
class ClassBalance:
    """:func:`class_balance` of ``n_samples`` samples: ``class_tv`` (the class shares' total variation
    distance to the reference's) and ``ambiguous`` (the share of samples below ``threshold`` in their top
    class probability)."""

    class_tv: float
    ambiguous: float
    threshold: float
    n_samples: int


def _threshold(threshold: float) -> float:
    t = float(threshold)
    if not (math.isfinite(t) and 0.0 < t <= 1.0):
        raise ValueError(f"class_balance: threshold must be in (0, 1], got {threshold}")
    return t


def _frequencies(freq: torch.Tensor) -> torch.Tensor:
    q = torch.as_tensor(freq).detach().to("cpu", torch.float64)
    if q.ndim != 1 or q.shape[0] < 2:
        raise ValueError(f"class_balance: reference frequencies must be a vector [C >= 2], got {list(q.shape)}")
    if not torch.isfinite(q).all() or (q < 0).any() or abs(float(q.sum()) - 1.0) > 1e-6:
        raise ValueError("class_balance: reference frequencies must be finite, non-negative and sum to 1, "
                         f"got sum {float(q.sum()):.6g}")
    return q


def class_balance(probs: torch.Tensor, ref_freq: torch.Tensor, *, threshold: float = 0.9) -> ClassBalance:
    """:class:`ClassBalance` of class probabilities ``probs`` ``[M, C]`` (each row a distribution, e.g. a
    classifier's softmax) against the reference's class frequencies ``ref_freq`` ``[C]``."""
    t, q = _threshold(threshold), _frequencies(ref_freq)
    p = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] != q.shape[0]:
        raise ValueError(f"class_balance: probs must be [M >= 1, {q.shape[0]}] (one column a class of the "
                         f"reference), got {list(p.shape)}")
    if not finite_inputs("class_balance", probs=p):
        return ClassBalance(float("nan"), float("nan"), t, p.shape[0])
    if (p < -1e-9).any() or (p.sum(dim=1) - 1.0).abs().max() > 1e-6:
        raise ValueError("class_balance: each row of probs must be a probability distribution (non-negative, "
                         "summing to 1); pass a softmax, not logits")
    shares = torch.bincount(p.argmax(dim=1), minlength=q.shape[0]).double() / p.shape[0]
    tv = 0.5 * float((shares - q).abs().sum())
    ambiguous = float((p.max(dim=1).values < t).double().mean())
    return ClassBalance(tv, ambiguous, t, p.shape[0])


class ClassBalanceReference:
    """:func:`class_balance` of image sets through one classifier: ``logits`` maps images ``[B, C, H, W]``
    to class logits ``[B, K]`` (e.g. a :class:`~flowmatch.models.classifier.FeatureClassifier`), and the
    reference frequencies are those of ``labels`` (``[N]`` integers in ``[0, num_classes)``, e.g. the
    training split's labels). ``ref(x)`` scores the images ``x``."""

    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor, num_classes: int, *,
                 threshold: float = 0.9, batch_size: int = 500):
        if int(num_classes) != num_classes or num_classes < 2:
            raise ValueError(f"class_balance: num_classes must be an integer >= 2, got {num_classes}")
        if int(batch_size) < 1:
            raise ValueError(f"class_balance: batch_size must be >= 1, got {batch_size}")
        y = torch.as_tensor(labels).detach().to("cpu")
        if y.ndim != 1 or y.shape[0] == 0 or y.dtype.is_floating_point or y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"class_balance: labels must be a non-empty vector of integers in [0, {num_classes})")
        self.logits, self.threshold, self.batch_size = logits, _threshold(threshold), int(batch_size)
        self.freq = torch.bincount(y, minlength=int(num_classes)).double() / y.shape[0]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> ClassBalance:
        x = torch.as_tensor(x).detach()
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"class_balance: images must be a non-empty batch [M, ...], got {list(x.shape)}")
        if not finite_inputs("class_balance", x=x):
            return ClassBalance(float("nan"), float("nan"), self.threshold, x.shape[0])
        probs = torch.cat([self.logits(x[i:i + self.batch_size]).to("cpu", torch.float64).softmax(dim=1)
                           for i in range(0, x.shape[0], self.batch_size)])
        return class_balance(probs, self.freq, threshold=self.threshold)
