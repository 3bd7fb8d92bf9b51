"""Shared result types and protocols (no torch.nn, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

__all__ = ["VelocityField", "PathSample", "Trajectory", "LossOutput"]


class VelocityField(Protocol):
    """``v(x, t) -> velocity``: ``x`` is ``[B, *D]``, ``t`` is ``[B]`` in [0, 1]; returns ``[B, *D]``."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


@dataclass
class PathSample:
    """A draw from a probability path: ``xt = alpha(t) x1 + sigma(t) x0 (+ smoothing)``, target ``ut``."""

    x0: torch.Tensor  # [B, *D] source
    x1: torch.Tensor  # [B, *D] data
    t: torch.Tensor  # [B]
    xt: torch.Tensor  # [B, *D]
    ut: torch.Tensor  # [B, *D] conditional target velocity d xt / dt


@dataclass
class Trajectory:
    """Result of integrating an ODE on a time grid.

    ``x1`` is the endpoint ``[B, *D]``; ``xs`` is ``[len(ts), B, *D]`` when a trajectory was
    requested (else ``None``); ``ts`` the grid actually used (for adaptive solvers: the output
    grid); ``nfe`` the exact number of velocity evaluations (each one a batched call).
    """

    x1: torch.Tensor
    xs: Optional[torch.Tensor]
    ts: torch.Tensor
    nfe: int


@dataclass
class LossOutput:
    """``loss`` is the scalar to minimise; ``per_sample`` is ``[B']`` and ``t`` (``[B']``) the time of
    each of its rows (they feed loss-by-t-bin logging; ``t`` may be ``None`` where there are no times);
    ``extra`` holds further detached 0-d scalars to log under their keys (their mean over each log
    interval), or is ``None``."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    t: Optional[torch.Tensor] = None
    extra: Optional[dict] = None
