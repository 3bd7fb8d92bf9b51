"""Precision and recall of generated samples against real data: which of the two a Fréchet distance hides.

A Fréchet distance mixes two failures into one number: samples that do not look like the data (low
precision) and data the samples do not reach (low recall: dropped modes, too little variety). The
improved precision and recall of Kynkäänniemi et al. 2019 ("Improved Precision and Recall Metric for
Assessing Generative Models", Eq. 1-3) tell them apart with k-nearest-neighbour balls in a feature
space: each point of a set gets the radius of the ball reaching its ``k``-th nearest neighbour in the
same set (itself excluded), and the union of the balls approximates the set's support.

- precision: the fraction of samples inside the real images' support,
  ``(1/M) sum_j 1[exists i: ||g_j - r_i|| <= rho_k(r_i)]``;
- recall: the fraction of real images inside the samples' support,
  ``(1/N) sum_i 1[exists j: ||r_i - g_j|| <= rho_k(g_j)]``.

A generator that sharpens towards a few training images gains precision and loses recall; the data
itself scores about equal precision and recall (both below 1 at finite sizes; the paper uses k = 3).
:class:`PrecisionRecallReference` featurises the real images and measures their radii once for many
sample sets; :func:`precision_recall` is the one-off call. Distances are Euclidean in the features
(``features``: images ``[B, C, H, W]`` -> ``[B, F]``, e.g. ``ImageFeatureMetrics.features``) or on the
flattened input. Non-finite input: NaN and a warning (:mod:`flowmatch.metrics.guard`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from flowmatch.metrics.guard import finite_inputs

__all__ = ["PrecisionRecall", "PrecisionRecallReference", "precision_recall", "knn_radii"]


@dataclass
class PrecisionRecall:
    """Improved precision and recall (see the module docstring) of ``n_samples`` samples against
    ``n_real`` real points with ``k``-th neighbour balls."""

    precision: float
    recall: float
    k: int
    n_real: int
    n_samples: int


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch [N, *D], got {list(x.shape)}")
    return x.reshape(x.shape[0], -1).to("cpu", torch.float64)


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[N]`` float64: each row's distance to its ``k``-th nearest other row of ``x`` ``[N, F]`` (a
    duplicate row counts as a neighbour at distance 0)."""
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k = {k} needs 1 <= k < the {n} points of the set")
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))  # itself excluded
    return d.kthvalue(k, dim=1).values


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[P]`` bool: each point inside at least one ball ``(centres [C, F], radii [C])``."""
    out = []
    for i in range(0, points.shape[0], batch_size):
        out.append((torch.cdist(points[i:i + batch_size], centres) <= radii[None]).any(dim=1))
    return torch.cat(out)


class PrecisionRecallReference:
    """The real side of :func:`precision_recall` done once: the real images (featurised with
    ``features``, if given) and their ``k``-th neighbour radii. ``ref(samples)`` is
    ``precision_recall(samples, real, k=k, features=features)`` for each of many sample sets."""

    def __init__(self, real: torch.Tensor, *, k: int = 3,
                 features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, batch_size: int = 1024):
        if int(k) != k or k < 1:
            raise ValueError(f"precision_recall: k must be a positive integer, got {k}")
        if int(batch_size) < 1:
            raise ValueError(f"precision_recall: batch_size must be >= 1, got {batch_size}")
        real = torch.as_tensor(real).detach()
        self.k, self.features, self.batch_size = int(k), features, int(batch_size)
        self.real = _rows(features(real) if features is not None else real, "real")  # [N, F]
        self.finite = finite_inputs("precision_recall", real=self.real)
        self.radii = knn_radii(self.real, self.k) if self.finite else None  # [N]

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> PrecisionRecall:
        s = torch.as_tensor(samples).detach()
        g = _rows(self.features(s) if self.features is not None else s, "samples")  # [M, F]
        if g.shape[1] != self.real.shape[1]:
            raise ValueError(f"precision_recall: samples have {g.shape[1]} values a row, the real set "
                             f"{self.real.shape[1]}")
        n, m = self.real.shape[0], g.shape[0]
        if not (self.finite and finite_inputs("precision_recall", samples=g)):
            return PrecisionRecall(float("nan"), float("nan"), self.k, n, m)
        precision = _covered(g, self.real, self.radii, self.batch_size).double().mean()
        recall = _covered(self.real, g, knn_radii(g, self.k), self.batch_size).double().mean()
        return PrecisionRecall(float(precision), float(recall), self.k, n, m)


def precision_recall(samples: torch.Tensor, real: torch.Tensor, *, k: int = 3,
                     features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                     batch_size: int = 1024) -> PrecisionRecall:
    """Improved precision and recall of ``samples`` ``[M, *D]`` against ``real`` ``[N, *D]`` with
    ``k``-th neighbour balls (Kynkäänniemi et al. 2019, Eq. 1-3; ``1 <= k`` below each set's size), in the
    space of ``features`` or of the flattened input. To score several sample sets against the same real
    images, build a :class:`PrecisionRecallReference` once."""
    return PrecisionRecallReference(real, k=k, features=features, batch_size=batch_size)(samples)
