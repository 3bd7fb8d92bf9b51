"""Probability paths ``x_t = alpha(t) x1 + sigma(t) x0`` (t = 0 noise/source, t = 1 data).

The conditional target velocity is ``u_t = d_alpha(t) x1 + d_sigma(t) x0`` (Lipman et al. 2023,
eq. 13 in the affine form of Liu et al. 2022). Schedulers:

- ``linear`` (rectified flow): ``alpha = t, sigma = 1 - t``, so ``u_t = x1 - x0``.
- ``cosine`` (VP / trigonometric interpolant): ``alpha = sin(pi t / 2), sigma = cos(pi t / 2)``.

``sigma`` > 0 on :class:`AffinePath` adds constant Gaussian smoothing ``sigma * eps`` to ``x_t``
without changing ``u_t`` (I-CFM, Tong et al. 2023, eq. 14).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from flowmatch.errors import ConfigError
from flowmatch.types import PathSample
from flowmatch.utils import as_time, expand_like, lookup

__all__ = ["SchedulerOutput", "Scheduler", "LinearScheduler", "CosineScheduler", "AffinePath", "PATHS", "get_path"]


@dataclass
class SchedulerOutput:
    """Each field is ``[B]``."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    d_alpha: torch.Tensor
    d_sigma: torch.Tensor


class Scheduler:
    name = ""
    # True where ``d_alpha = 1`` and ``d_sigma = -1`` for every t: the path's target is ``x1 - x0``,
    # computed as one subtraction (the same floats as ``1 * x1 + (-1) * x0``)
    unit_speed = False

    def __call__(self, t: torch.Tensor) -> SchedulerOutput:
        raise NotImplementedError


class LinearScheduler(Scheduler):
    name = "linear"
    unit_speed = True

    def __call__(self, t: torch.Tensor) -> SchedulerOutput:
        one = torch.ones_like(t)
        return SchedulerOutput(alpha=t, sigma=1 - t, d_alpha=one, d_sigma=-one)


class CosineScheduler(Scheduler):
    name = "cosine"

    def __call__(self, t: torch.Tensor) -> SchedulerOutput:
        h = 0.5 * math.pi
        return SchedulerOutput(alpha=torch.sin(h * t), sigma=torch.cos(h * t),
                               d_alpha=h * torch.cos(h * t), d_sigma=-h * torch.sin(h * t))


class AffinePath:
    """``x_t = alpha(t) x1 + sigma(t) x0 + sigma_smooth * eps``, target ``u_t = alpha' x1 + sigma' x0``."""

    def __init__(self, scheduler: Scheduler, sigma: float = 0.0):
        if sigma < 0:
            raise ConfigError(f"path.sigma must be >= 0, got {sigma}")
        self.scheduler = scheduler
        self.sigma = float(sigma)
        self.name = scheduler.name

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float, *,
               generator: Optional[torch.Generator] = None) -> PathSample:
        """``x0, x1``: ``[B, *D]``; ``t``: ``[B]`` (or a scalar, broadcast). Returns a :class:`PathSample`."""
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        t = as_time(t, x1)
        if self.scheduler.unit_speed:
            te = expand_like(t, x1)
            xt = te * x1 + torch.rsub(te, 1) * x0  # rsub: 1 - te without the Python operator
        else:
            s = self.scheduler(t)
            xt = expand_like(s.alpha, x1) * x1 + expand_like(s.sigma, x0) * x0
        if self.sigma > 0:
            eps = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
            xt = xt + self.sigma * eps
        ut = x1 - x0 if self.scheduler.unit_speed else expand_like(s.d_alpha, x1) * x1 + expand_like(s.d_sigma, x0) * x0
        return PathSample(x0=x0, x1=x1, t=t, xt=xt, ut=ut)

    def __repr__(self) -> str:
        return f"AffinePath({self.name}, sigma={self.sigma})"


PATHS: dict[str, type[Scheduler]] = {"linear": LinearScheduler, "cosine": CosineScheduler}


def get_path(name: str, sigma: float = 0.0) -> AffinePath:
    """Build a path by scheduler name (an unknown name lists the valid ones)."""
    return AffinePath(lookup(PATHS, name, "path")(), sigma=sigma)
