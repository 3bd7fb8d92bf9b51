"""The any-step sampler: jumps of an average-velocity model along the grid, one evaluation a jump.

An any-step model (``model.step_input``; :mod:`flowmatch.distill.shortcut`, :mod:`flowmatch.distill.meanflow`)
is a field ``u(x, t, h=h)`` that predicts the *average* velocity over ``[t, t + h]`` (``h = 0`` is the flow's
velocity), so one step from ``t`` to ``t'`` is

    x_{t'} = x_t + (t' - t) u(x_t, t, h = t' - t)

(Frans et al. 2025, Algorithm 2; Geng et al. 2025, eq. 12 in our time). On a uniform grid of ``K`` steps
this is ``K`` jumps of ``h = 1 / K``. Exact for any grid when ``u`` is the true average velocity; with
``h`` held at 0 it would be Euler, so ``order`` 1. The solver refuses a field that does not declare a
step input (``step_input`` true): a plain flow model given ``h`` would have no meaning for it.
"""

from __future__ import annotations

import torch

from flowmatch.errors import ConfigError
from flowmatch.solvers.base import Field, Solver
from flowmatch.types import Trajectory
from flowmatch.utils import expand_like

__all__ = ["AnyStep", "has_step_input"]


def has_step_input(v) -> bool:
    """Whether the field ``v`` takes the step ``h`` of an any-step model (its ``step_input`` attribute)."""
    return bool(getattr(v, "step_input", False))


class AnyStep(Solver):
    name, order, stages = "anystep", 1, 1

    def step(self, v: Field, x, t, t_next):
        h = t_next - t
        return x + expand_like(h, x) * v(x, t, h=h).to(x.dtype)

    def integrate(self, v: Field, x0: torch.Tensor, grid: torch.Tensor, return_trajectory: bool = False) -> Trajectory:
        if not has_step_input(v):
            raise ConfigError(f"solver 'anystep' jumps with an any-step model (model.step_input=true); "
                              f"{type(v).__name__} has no step input h: sample it with a flow solver (e.g. euler)")
        return super().integrate(v, x0, grid, return_trajectory)
