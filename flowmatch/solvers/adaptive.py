"""Adaptive (and torchdiffeq's own fixed-grid) solvers through torchdiffeq.

NFE is counted by wrapping the field, so it is the number of evaluations torchdiffeq really made
(including rejected steps and the initial step-size probe).

Tolerances are checked when the solver is built (finite and > 0). A field that blows up (or turns
NaN) drives the step size to zero; torchdiffeq's "underflow in dt" assertion becomes a
:class:`~flowmatch.solvers.base.SolverError` naming the solver, the time reached and what to try.
"""

from __future__ import annotations

from typing import Optional

import torch

from flowmatch.config import check_float
from flowmatch.solvers.base import CountedField, Field, Solver, SolverError
from flowmatch.utils import lookup
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
        self.order = lookup(self._orders, method, "adaptive solver")
        self.stages = 0
        self.atol, self.rtol = check_float("atol", atol, gt=0.0), check_float("rtol", rtol, gt=0.0)

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
        last = {}  # the last time the field was evaluated at (kept as a tensor: no device sync per call)

        def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            last["t"] = t
            return counted(x, t.expand(b))

        ts = grid if return_trajectory else grid[[0, -1]]
        # step_t makes the last accepted step land on grid[-1]; without it torchdiffeq steps past the
        # end and interpolates back, evaluating the field at t > 1 (t ~ 1.6 for dopri5 at tol 1e-3),
        # outside the [0, 1] a velocity model was trained on.
        try:
            xs = torchdiffeq.odeint(f, x0, ts, method=self.method, atol=self.atol, rtol=self.rtol,
                                    options={"step_t": ts[-1:]})
        except AssertionError as e:
            if "underflow in dt" not in str(e):
                raise
            t = float(last.get("t", ts[0]))
            raise SolverError(f"{self.method} could not integrate the field from t = {float(ts[0]):g} to "
                              f"{float(ts[-1]):g}: its step size underflowed at t = {t:.4g} after {counted.nfe} "
                              f"evaluations (atol={self.atol:g}, rtol={self.rtol:g}), so the field blows up or "
                              f"is not finite there; check the model (its weights, its output near t = {t:.2g}), "
                              f"or use a fixed-step solver (e.g. rk4 with a given NFE) or looser tolerances") from None
        return Trajectory(x1=xs[-1], xs=xs if return_trajectory else None, ts=ts, nfe=counted.nfe)

    def __repr__(self) -> str:
        return f"TorchdiffeqSolver({self.method}, atol={self.atol}, rtol={self.rtol})"
