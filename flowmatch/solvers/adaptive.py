"""Adaptive (and torchdiffeq's own fixed-grid) solvers through torchdiffeq.

NFE is counted by wrapping the field, so it is the number of evaluations torchdiffeq really made
(including rejected steps and the initial step-size probe).
"""

from __future__ import annotations

from typing import Optional

import torch

from flowmatch.solvers.base import CountedField, Field, Solver
from flowmatch.types import Trajectory

__all__ = ["TorchdiffeqSolver", "TORCHDIFFEQ_ADAPTIVE"]

TORCHDIFFEQ_ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


class TorchdiffeqSolver(Solver):
    """``torchdiffeq.odeint`` with ``method`` and tolerances; ``order`` as documented by torchdiffeq."""

    adaptive = True
    _orders = {"dopri5": 5, "dopri8": 8, "bosh3": 3, "fehlberg2": 2, "adaptive_heun": 2}

    def __init__(self, method: str = "dopri5", atol: float = 1e-5, rtol: float = 1e-5):
        self.name = method
        self.method = method
        self.order = self._orders[method]
        self.stages = 0
        self.atol, self.rtol = float(atol), float(rtol)

    def step(self, v, x, t, t_next):  # pragma: no cover - adaptive solvers integrate as a whole
        raise NotImplementedError("adaptive solvers integrate over the whole interval; use integrate()")

    def steps_for_nfe(self, nfe: int) -> Optional[int]:
        return None

    def integrate(self, v: Field, x0: torch.Tensor, grid: torch.Tensor | None = None,
                  return_trajectory: bool = False) -> Trajectory:
        """Integrate from ``grid[0]`` to ``grid[-1]`` (default 0 -> 1); the trajectory is reported at ``grid``."""
        import torchdiffeq  # lazy: only adaptive solves need it

        if grid is None:
            grid = torch.tensor([0.0, 1.0])
        grid = torch.as_tensor(grid, dtype=x0.dtype, device=x0.device)
        counted = CountedField(v)
        b = x0.shape[0]

        def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return counted(x, t.expand(b))

        ts = grid if return_trajectory else grid[[0, -1]]
        # step_t makes the last accepted step land on grid[-1]; without it torchdiffeq steps past the
        # end and interpolates back, evaluating the field at t > 1 (t ~ 1.6 for dopri5 at tol 1e-3),
        # outside the [0, 1] a velocity model was trained on.
        xs = torchdiffeq.odeint(f, x0, ts, method=self.method, atol=self.atol, rtol=self.rtol,
                                options={"step_t": ts[-1:]})
        return Trajectory(x1=xs[-1], xs=xs if return_trajectory else None, ts=ts, nfe=counted.nfe)

    def __repr__(self) -> str:
        return f"TorchdiffeqSolver({self.method}, atol={self.atol}, rtol={self.rtol})"
