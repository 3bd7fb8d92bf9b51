"""Small helpers without I/O: seeding, device choice, registry lookups."""

from __future__ import annotations

import random
from typing import Mapping, TypeVar

import torch

from flowmatch.errors import UnknownNameError

__all__ = ["seed_everything", "resolve_device", "lookup", "make_generator", "as_time", "expand_like"]

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (numpy is not used for randomness here)."""
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` -> CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnknownNameError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return dev


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded ``torch.Generator`` on ``device`` (randomness is always an explicit argument)."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def lookup(registry: Mapping[str, T], name: str, kind: str) -> T:
    """``registry[name]`` or an error that lists the valid names of this ``kind``."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(registry))
        raise UnknownNameError(f"unknown {kind} {name!r}; valid {kind}s: {valid}") from None


def as_time(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or ``[B]`` time to shape ``[B]`` on ``x``'s device and dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must be a scalar or of shape [B]=[{x.shape[0]}], got {tuple(t.shape)}")
    return t


def expand_like(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample ``[B]`` tensor (a time, a step size, a weight) as ``[B, 1, ..., 1]``, to broadcast
    against ``x`` of shape ``[B, *D]`` (a view: the same floats)."""
    return s.reshape(-1, *([1] * (x.ndim - 1)))
