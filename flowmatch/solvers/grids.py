"""Time grids on [0, 1] (``num_steps + 1`` points, increasing, first 0 and last 1).

- ``uniform``: ``t_i = i / N``.
- ``power``: ``t_i = (i / N) ** rho``: ``rho > 1`` puts small steps near t = 0 (the noise end),
  ``rho < 1`` near t = 1 (the data end).
- ``cosine``: ``t_i = (1 - cos(pi i / N)) / 2``: small steps at both ends.
"""

from __future__ import annotations

import math

import torch

from flowmatch.config import check_float, check_int
from flowmatch.errors import ConfigError
from flowmatch.utils import lookup

__all__ = ["GRIDS", "time_grid", "parse_grid"]


def _uniform(s: torch.Tensor, rho: float) -> torch.Tensor:
    return s


def _power(s: torch.Tensor, rho: float) -> torch.Tensor:
    return s ** rho


def _cosine(s: torch.Tensor, rho: float) -> torch.Tensor:
    return 0.5 * (1 - torch.cos(math.pi * s))


GRIDS = {"uniform": _uniform, "power": _power, "cosine": _cosine}


def parse_grid(spec: str, rho: float = 2.0) -> tuple[str, float]:
    """``"power:0.5"`` -> ``("power", 0.5)``; a bare name keeps ``rho``. Unknown names list the valid
    ones; an exponent (after ':' or ``rho``) must be a finite number > 0."""
    name, sep, value = str(spec).partition(":")
    lookup(GRIDS, name, "time grid")
    if not sep:
        return name, check_float("rho", rho, gt=0.0)
    try:
        r = float(value)
    except ValueError:
        raise ConfigError(f"time grid {spec!r}: the exponent after ':' must be a number") from None
    return name, check_float(f"time grid {name}: rho", r, gt=0.0)


def time_grid(num_steps: int, kind: str = "uniform", *, rho: float = 2.0, device=None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``[num_steps + 1]`` grid from 0 to 1 of the given ``kind`` (unknown kinds list the valid ones;
    ``num_steps`` must be an integer >= 1, ``rho`` a finite number > 0)."""
    kind, rho = parse_grid(kind, rho)
    fn = GRIDS[kind]
    num_steps = check_int("num_steps", num_steps, 1)
    s = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    g = fn(s, rho)
    g[0], g[-1] = 0.0, 1.0
    return g.to(device=device, dtype=dtype)
