"""Training-time samplers ``t ~ p(t)`` on [0, 1].

- ``uniform``: U(0, 1).
- ``logit_normal``: ``sigmoid(loc + scale * N(0, 1))`` (Esser et al. 2024, SD3).
- ``u_shaped``: density ``a cosh(a (t - 1/2)) / (2 sinh(a / 2))``, heavier near both ends, sampled
  by its inverse CDF ``t = 1/2 + asinh((2u - 1) sinh(a / 2)) / a`` (the U-shaped distribution of
  Lee et al. 2024 for training rectified flows).
- ``constant``: always ``value`` (``0`` for one-step distillation).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from flowmatch.errors import ConfigError
from flowmatch.utils import lookup

__all__ = ["TimeSampler", "UniformTime", "LogitNormalTime", "UShapedTime", "ConstantTime", "TIME_SAMPLERS", "get_time_sampler"]


def _device(generator: Optional[torch.Generator], device) -> torch.device | str:
    """The requested device, else the generator's, else the CPU."""
    if device is not None:
        return device
    return generator.device if generator is not None else "cpu"


class TimeSampler:
    name = ""

    def sample(self, n: int, *, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draw ``[n]`` times in [0, 1]."""
        device = _device(generator, device)
        u = torch.rand(n, generator=generator, device=device, dtype=dtype)
        return self._transform(u, generator)

    def _transform(self, u: torch.Tensor, generator) -> torch.Tensor:
        raise NotImplementedError

    def pdf(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UniformTime(TimeSampler):
    name = "uniform"

    def _transform(self, u, generator):
        return u

    def pdf(self, t):
        return torch.ones_like(t)


class LogitNormalTime(TimeSampler):
    name = "logit_normal"

    def __init__(self, loc: float = 0.0, scale: float = 1.0):
        if scale <= 0:
            raise ConfigError(f"time.scale must be > 0, got {scale}")
        self.loc, self.scale = float(loc), float(scale)

    def sample(self, n, *, generator=None, device=None, dtype=torch.float32):
        device = _device(generator, device)
        z = torch.randn(n, generator=generator, device=device, dtype=dtype)
        return torch.sigmoid(self.loc + self.scale * z)

    def pdf(self, t):
        logit = torch.log(t) - torch.log1p(-t)
        return torch.exp(-0.5 * ((logit - self.loc) / self.scale) ** 2) / (
            self.scale * math.sqrt(2 * math.pi) * t * (1 - t))


class UShapedTime(TimeSampler):
    name = "u_shaped"

    def __init__(self, a: float = 4.0):
        if a <= 0:
            raise ConfigError(f"time.a must be > 0, got {a}")
        self.a = float(a)

    def _transform(self, u, generator):
        a = self.a
        return (0.5 + torch.asinh((2 * u - 1) * math.sinh(a / 2)) / a).clamp(0.0, 1.0)

    def pdf(self, t):
        a = self.a
        return a * torch.cosh(a * (t - 0.5)) / (2 * math.sinh(a / 2))


class ConstantTime(TimeSampler):
    """Always ``value`` (no randomness drawn). ``value = 0`` with a linear path trains the one-step
    map ``x1 = x0 + v(x0, 0)``: distillation of a pair store (Liu et al. 2022, sec. 2.3)."""

    name = "constant"

    def __init__(self, value: float = 0.0):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"time.value must be in [0, 1], got {value}")
        self.value = float(value)

    def sample(self, n, *, generator=None, device=None, dtype=torch.float32):
        device = _device(generator, device)
        return torch.full((n,), self.value, device=device, dtype=dtype)

    def pdf(self, t):
        raise NotImplementedError("a constant time has no density")


TIME_SAMPLERS: dict[str, type[TimeSampler]] = {
    c.name: c for c in (UniformTime, LogitNormalTime, UShapedTime, ConstantTime)}


def get_time_sampler(name: str, *, loc: float = 0.0, scale: float = 1.0, a: float = 4.0,
                     value: float = 0.0) -> TimeSampler:
    """Build a time sampler by name (an unknown name lists the valid ones)."""
    cls = lookup(TIME_SAMPLERS, name, "time sampler")
    if cls is LogitNormalTime:
        return cls(loc=loc, scale=scale)
    if cls is UShapedTime:
        return cls(a=a)
    if cls is ConstantTime:
        return cls(value=value)
    return cls()
