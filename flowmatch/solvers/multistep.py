"""Few-step samplers that are not classic Runge-Kutta methods: one velocity evaluation per step,
with state carried across steps (so they override :meth:`Solver.integrate`).

- ``ab2``: the two-step Adams-Bashforth method on a variable grid. After a first Euler step, each
  step extrapolates the velocity linearly from the last two evaluations,
  ``x_{n+1} = x_n + h_n [(1 + r/2) v_n - (r/2) v_{n-1}]`` with ``r = h_n / h_{n-1}``, so it
  corrects for the change of velocity along the path (its curvature) at no extra NFE.
  Second order, ``nfe = num_steps``.
- ``renoise``: endpoint prediction re-noised with the *original* noise. On the rectified path
  ``x_t = t x1 + (1 - t) x0`` the model's endpoint prediction at ``(x, t)`` is
  ``x1_hat = x + (1 - t) v(x, t)``; the step goes to ``x_{t'} = t' x1_hat + (1 - t') x0`` with the
  ``x0`` the solve started from, in the way multistep consistency sampling re-noises an endpoint
  (Song et al. 2023, alg. 1), but deterministic. One step equals one Euler step. It is exact on a
  straight flow (where ``x0_hat = x0``) and *biased* on a curved one: as the steps shrink it tends to
  ``x = x0 + t v(x, t)``, not to the ODE solution, so its ``order`` is 0 (not a consistent ODE
  method). It is in the benchmark because that bias is what reflow removes.
"""

from __future__ import annotations

import torch

from flowmatch.solvers.base import CountedField, Field, Solver
from flowmatch.solvers.fixed import _b
from flowmatch.types import Trajectory

__all__ = ["AdamsBashforth2", "Renoise"]


def _check_grid(grid, x0: torch.Tensor) -> torch.Tensor:
    grid = torch.as_tensor(grid, dtype=x0.dtype, device=x0.device)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least 2 points, got shape {tuple(grid.shape)}")
    return grid


class _OneEvalPerStep(Solver):
    """One velocity evaluation per step, with state carried from step to step: the base runs the
    loop, a subclass's ``advance`` makes one step from the velocity ``vt`` at ``(x, t)``."""

    stages = 1

    def step(self, v: Field, x, t, t_next):
        raise NotImplementedError(f"{self.name} carries state across steps; use integrate()")

    def advance(self, x: torch.Tensor, vt: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, x0: torch.Tensor,
                state: dict) -> torch.Tensor:
        raise NotImplementedError

    def integrate(self, v: Field, x0: torch.Tensor, grid: torch.Tensor, return_trajectory: bool = False) -> Trajectory:
        grid = _check_grid(grid, x0)
        counted = CountedField(v)
        b = x0.shape[0]
        x, state = x0, {}
        xs = [x0] if return_trajectory else None
        for i in range(grid.numel() - 1):
            t, t_next = grid[i].expand(b), grid[i + 1].expand(b)
            x = self.advance(x, counted(x, t), t, t_next, x0, state)
            if xs is not None:
                xs.append(x)
        return Trajectory(x1=x, xs=torch.stack(xs) if xs is not None else None, ts=grid, nfe=counted.nfe)


class AdamsBashforth2(_OneEvalPerStep):
    name, order = "ab2", 2

    def advance(self, x, vt, t, t_next, x0, state):
        h = t_next - t
        v_prev, h_prev = state.get("v"), state.get("h")
        if v_prev is None:
            x = x + _b(h, x) * vt
        else:
            r = _b(h / h_prev, x)
            x = x + _b(h, x) * ((1 + 0.5 * r) * vt - 0.5 * r * v_prev)
        state["v"], state["h"] = vt, h
        return x


class Renoise(_OneEvalPerStep):
    name, order = "renoise", 0

    def advance(self, x, vt, t, t_next, x0, state):
        x1_hat = x + _b(1 - t, x) * vt
        tn = _b(t_next, x)
        return tn * x1_hat + (1 - tn) * x0
