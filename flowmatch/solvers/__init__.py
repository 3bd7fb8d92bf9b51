"""ODE solvers. They know only a callable ``v(x, t)``; see :func:`solve` for the one-call entry.

``num_steps`` and ``nfe`` are different words: a fixed-step solver with ``stages`` evaluations
per step costs ``nfe = num_steps * stages`` (Heun with 4 steps: 8 NFE). :data:`STEP_SOLVERS` holds the
samplers of an any-step model's field ``u(x, t, h=h)`` (``anystep``: one jump a step), which refuse a
plain ``v(x, t)``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from flowmatch.config import check_int
from flowmatch.solvers.adaptive import TORCHDIFFEQ_ADAPTIVE, TorchdiffeqSolver
from flowmatch.solvers.anystep import AnyStep, has_step_input
from flowmatch.solvers.base import CountedField, Solver, SolverError, num_steps_for
from flowmatch.solvers.captured import CAPTURE_MODES, CapturedSolve
from flowmatch.solvers.fixed import RK4, Euler, Heun, Midpoint
from flowmatch.solvers.grids import GRIDS, parse_grid, time_grid
from flowmatch.solvers.multistep import AdamsBashforth2, ConsistencySampler, Renoise
from flowmatch.types import Trajectory
from flowmatch.utils import lookup

__all__ = [
    "Solver", "SolverError", "CountedField", "Euler", "Midpoint", "Heun", "RK4", "AdamsBashforth2", "Renoise", "ConsistencySampler",
    "AnyStep", "has_step_input",
    "TorchdiffeqSolver", "CapturedSolve", "CAPTURE_MODES",
    "SOLVERS", "FIXED_SOLVERS", "STEP_SOLVERS", "get_solver", "is_adaptive", "num_steps_for", "time_grid",
    "parse_grid", "GRIDS",
    "solve",
]

FIXED_SOLVERS = {c.name: c for c in (Euler, Midpoint, Heun, RK4, AdamsBashforth2, Renoise, ConsistencySampler)}
# samplers of an any-step field u(x, t, h=h) (model.step_input), not of a plain v(x, t)
STEP_SOLVERS = {AnyStep.name: AnyStep}
SOLVERS: dict = {**FIXED_SOLVERS, **STEP_SOLVERS,
                 **{m: functools.partial(TorchdiffeqSolver, m) for m in TORCHDIFFEQ_ADAPTIVE}}


def is_adaptive(name: str) -> bool:
    return name in TORCHDIFFEQ_ADAPTIVE


def get_solver(name: str, *, atol: float = 1e-5, rtol: float = 1e-5) -> Solver:
    """A solver by name (tolerances apply to adaptive ones; unknown names list the valid ones)."""
    factory = lookup(SOLVERS, name, "solver")
    return factory(atol=atol, rtol=rtol) if is_adaptive(name) else factory()


def solve(v, x0: torch.Tensor, solver: str | Solver = "euler", *, nfe: Optional[int] = None,
          num_steps: Optional[int] = None, grid: str = "uniform", rho: float = 2.0,
          atol: float = 1e-5, rtol: float = 1e-5, return_trajectory: bool = False,
          trajectory_points: int = 33) -> Trajectory:
    """Integrate ``v`` from t = 0 to 1 starting at ``x0`` (``[B, *D]``).

    Fixed-step solvers take ``num_steps`` or an ``nfe`` that is a multiple of their stages;
    adaptive ones take ``atol``/``rtol``, refuse an ``nfe`` or ``num_steps`` (both checked by
    :func:`num_steps_for`) and report the NFE they used (their trajectory, when asked for, is
    reported on a uniform grid of ``trajectory_points``). ``grid`` names a time grid
    (:data:`GRIDS`), optionally with its exponent: ``power:0.5`` is ``grid="power", rho=0.5``.
    ``nfe``, ``num_steps`` (integers >= 1) and ``trajectory_points`` (>= 2) are range-checked here.
    """
    s = solver if isinstance(solver, Solver) else get_solver(solver, atol=atol, rtol=rtol)
    grid, rho = parse_grid(grid, rho)
    num_steps = num_steps_for(s, nfe, num_steps)
    if s.adaptive:
        check_int("trajectory_points", trajectory_points, 2)
        g = torch.linspace(0, 1, trajectory_points if return_trajectory else 2, device=x0.device, dtype=x0.dtype)
        return s.integrate(v, x0, g, return_trajectory=return_trajectory)
    g = time_grid(num_steps, grid, rho=rho, device=x0.device, dtype=x0.dtype)
    return s.integrate(v, x0, g, return_trajectory=return_trajectory)
