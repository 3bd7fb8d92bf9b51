"""Memorisation check: are generated images closer to the training images than new images are?

A generator that returns its training images verbatim scores a perfect Frechet distance against a
training reference: the FD alone cannot tell learning from copying. This check measures, for each
generated sample, the distance to its nearest training image, and compares it with the same
statistic of held-out images (real images the model never saw, e.g. the test split): a model of the
data distribution puts its samples as far from the training images as new real images are, a
copier puts them at distance zero.

- :func:`nearest_distances`: ``[M]`` Euclidean distance from each row of ``x`` ``[M, *D]`` to its
  nearest row of ``reference`` ``[N, *D]`` (flattened), in pixel space or in any feature space.
- :func:`memorisation`: the summary, a :class:`MemorisationResult` (:class:`MemorisationReference`:
  the same with the training and held-out side featurised and measured once, for many sample sets).
  ``threshold`` is the ``quantile`` (default 0.05) of the held-out images' nearest-training distances;
  ``copies_fraction`` is the fraction of samples closer to a training image than that. Held-out images score
  ``quantile`` by construction, and so does, in expectation, any model whose samples are as new as
  held-out images; a copier scores 1. ``memorises`` is the verdict: ``copies_fraction`` above
  ``quantile`` by more than three standard errors, ``3 sqrt(q (1 - q) (1 / M + 1 / K))`` for ``M``
  samples and ``K`` held-out images (the binomial spread of the samples' count below the threshold
  and of the held-out quantile itself). A model that ``memorises`` must not be reported as better
  for its lower training-reference FD.

Non-finite input: the result's numbers are NaN, ``memorises`` is ``None``, and a warning is issued
(:mod:`flowmatch.metrics.guard`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from flowmatch.metrics.guard import finite_inputs

__all__ = ["MemorisationResult", "MemorisationReference", "nearest_distances", "memorisation", "EXACT_COPY_DISTANCE"]

EXACT_COPY_DISTANCE = 1e-6  # a sample this close to a training image is that image (pixel floats, not a model's)


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch [N, *D], got {list(x.shape)}")
    return x.reshape(x.shape[0], -1)


@torch.no_grad()
def nearest_distances(x: torch.Tensor, reference: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """``[M]`` float64 (on the CPU): ``min_j ||x_i - reference_j||_2`` for each row of ``x`` ``[M, *D]``
    over the rows of ``reference`` ``[N, *D]`` (both flattened to ``D`` values a row; same ``D``).

    The nearest row is found with the matrix-product form of the squared distance, in float32 on
    ``x``'s device, ``batch_size`` rows of ``x`` at a time; the distance to it is then recomputed
    directly in float64, so a verbatim copy scores exactly 0 (the product form would leave a
    cancellation error). Non-finite input: ``[M]`` NaN and a warning."""
    a, b = _flat(x, "x"), _flat(reference, "reference")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"nearest_distances: x has {a.shape[1]} values a row, reference {b.shape[1]}")
    if int(batch_size) < 1:
        raise ValueError(f"nearest_distances: batch_size must be >= 1, got {batch_size}")
    if not finite_inputs("nearest_distances", x=a, reference=b):
        return torch.full((a.shape[0],), float("nan"), dtype=torch.float64)
    ref32 = b.to(a.device, torch.float32)
    ref_sq = ref32.pow(2).sum(1)
    ref64 = b.to("cpu", torch.float64)
    out = []
    for i in range(0, a.shape[0], int(batch_size)):
        xb = a[i:i + int(batch_size)].to(torch.float32)
        d2 = xb.pow(2).sum(1, keepdim=True) + ref_sq[None] - 2 * xb @ ref32.T  # [b, N]
        j = d2.argmin(dim=1).cpu()
        out.append((a[i:i + int(batch_size)].to("cpu", torch.float64) - ref64[j]).norm(dim=1))
    return torch.cat(out)


@dataclass
class MemorisationResult:
    """Nearest-training-image distances of samples against those of held-out images (see the module
    docstring). ``space`` names where distances are measured (``pixels`` or ``features``)."""

    space: str
    n: int  # samples scored (M)
    n_held_out: int  # held-out images (K)
    n_train: int  # training images searched
    quantile: float  # q: the held-out quantile that sets the threshold
    threshold: float  # the held-out images' q-quantile of their nearest-training distance
    median: float  # the samples' median nearest-training distance
    p05: float  # the samples' 5th percentile
    held_out_median: float
    held_out_p05: float
    median_ratio: float  # median / held_out_median: well under 1 when samples hug training images
    copies_fraction: float  # samples closer to a training image than ``threshold`` (q expected, 1 for a copier)
    exact_copies_fraction: float  # samples within EXACT_COPY_DISTANCE of a training image
    limit: float  # q + 3 standard errors: ``copies_fraction`` above it ``memorises``
    memorises: Optional[bool]  # the verdict; None for non-finite input
    distances: torch.Tensor  # [M] float64, each sample's nearest-training distance
    held_out_distances: torch.Tensor  # [K] float64

    def summary(self) -> dict:
        """The scalars (no per-image distances), for a table or a log line."""
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, torch.Tensor)}


def memorisation(samples: torch.Tensor, train: torch.Tensor, held_out: torch.Tensor, *, quantile: float = 0.05,
                 features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 batch_size: int = 256) -> MemorisationResult:
    """Memorisation check of ``samples`` ``[M, *D]`` against the training images ``train`` ``[N, *D]``,
    with ``held_out`` ``[K, *D]`` (real images not in ``train``) as the reference distribution of the
    nearest-training distance. ``features`` (e.g. ``ImageFeatureMetrics.features``, images ``[B, C, H,
    W]`` -> ``[B, F]``) measures the distances in that feature space instead of pixel space. To check
    several sample sets against the same images, build a :class:`MemorisationReference` once."""
    return MemorisationReference(train, held_out, quantile=quantile, features=features,
                                 batch_size=batch_size)(samples)


class MemorisationReference:
    """:func:`memorisation` with its reference side done once: the training and held-out images
    (featurised with ``features``, if given) and the held-out images' nearest-training distances, which
    do not depend on the samples. ``ref(samples)`` is ``memorisation(samples, train, held_out, ...)``,
    the same numbers, for each of many sample sets (a model selection scoring every few hundred
    updates, a table of methods)."""

    def __init__(self, train: torch.Tensor, held_out: torch.Tensor, *, quantile: float = 0.05,
                 features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, batch_size: int = 256):
        q = float(quantile)
        if not 0.0 < q < 1.0:
            raise ValueError(f"memorisation: quantile must be in (0, 1), got {quantile}")
        tr, ho = (torch.as_tensor(t).detach() for t in (train, held_out))
        if ho.ndim < 1 or ho.shape[0] < 2:
            raise ValueError(f"memorisation needs at least 2 held-out images, got {list(ho.shape)}")
        if features is not None:
            tr, ho = features(tr), features(ho)
        self.quantile, self.features, self.batch_size = q, features, int(batch_size)
        self.space = "pixels" if features is None else "features"
        self.train = tr  # [N, *D] or [N, F]: what the samples' nearest distances are measured against
        self.held_out_distances = nearest_distances(ho, tr, batch_size=self.batch_size)  # [K] float64

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> MemorisationResult:
        q, tr, dh = self.quantile, self.train, self.held_out_distances.clone()  # each result its own copy
        s = torch.as_tensor(samples).detach()
        if self.features is not None:
            s = self.features(s)
        d = nearest_distances(s, tr, batch_size=self.batch_size)
        m, k = d.shape[0], dh.shape[0]
        limit = q + 3 * math.sqrt(q * (1 - q) * (1 / m + 1 / k))
        nan = float("nan")
        if not (torch.isfinite(d).all() and torch.isfinite(dh).all()):  # nearest_distances has warned
            return MemorisationResult(self.space, m, k, tr.shape[0], q, nan, nan, nan, nan, nan, nan, nan, nan,
                                      limit, None, d, dh)
        threshold = float(torch.quantile(dh, q))
        med, held_med = float(d.median()), float(dh.median())
        copies = float((d < threshold).double().mean())
        return MemorisationResult(
            space=self.space, n=m, n_held_out=k, n_train=tr.shape[0], quantile=q, threshold=threshold, median=med,
            p05=float(torch.quantile(d, 0.05)), held_out_median=held_med,
            held_out_p05=float(torch.quantile(dh, 0.05)), median_ratio=med / held_med if held_med > 0 else nan,
            copies_fraction=copies, exact_copies_fraction=float((d <= EXACT_COPY_DISTANCE).double().mean()),
            limit=limit, memorises=copies > limit, distances=d, held_out_distances=dh)
