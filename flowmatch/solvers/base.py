"""Solver base class: a stateless ``step`` per method; the base integrates on a grid and counts NFE."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from flowmatch.config import check_int
from flowmatch.errors import ConfigError, FlowmatchError
from flowmatch.types import Trajectory

__all__ = ["Solver", "CountedField", "Field", "SolverError", "num_steps_for"]


class SolverError(FlowmatchError):
    """An ODE solve could not go on (e.g. an adaptive solver's step size underflowed because the
    field blows up); the message names the solver, the time reached and what to try."""

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CountedField:
    """Wraps ``v(x, t)``; ``nfe`` counts the calls (each call is one batched evaluation). Keyword
    arguments pass through (the step ``h`` of an any-step model, :class:`~flowmatch.solvers.anystep.AnyStep`)."""

    def __init__(self, v: Field):
        self.v = v
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
        self.nfe += 1
        return self.v(x, t, **kw)


class Solver:
    """A fixed-step explicit ODE solver for ``dx/dt = v(x, t)``.

    Subclasses set ``name``, ``order`` (global error ``O(h^order)``) and ``stages`` (velocity
    evaluations per step, so ``nfe = num_steps * stages``) and implement ``step``; a multistep
    method implements :meth:`init_state` and :meth:`advance` instead (the loop stays the base's).
    """

    name: str = ""
    order: int = 0
    stages: int = 0
    adaptive: bool = False

    def step(self, v: Field, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """One step from ``t`` to ``t_next`` (both ``[B]``); returns ``x`` at ``t_next``."""
        raise NotImplementedError

    def for_source(self, source) -> "Solver":
        """This solver for samples whose noise is drawn from ``source`` (a distribution with
        ``sample(n, generator=, device=)``): the solvers that draw fresh noise (consistency sampling)
        draw it from there; the others ignore it (the default: ``self``)."""
        return self

    def init_state(self, x0: torch.Tensor) -> Optional[dict]:
        """The state a multistep method carries from step to step, made at the start of a solve from
        ``x0``; ``None`` for a one-step method (the default)."""
        return None

    def advance(self, v: Field, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                state: Optional[dict]) -> torch.Tensor:
        """One step of :meth:`integrate`'s loop: :meth:`step` for a one-step method; a multistep
        method overrides it to read and update ``state`` (from :meth:`init_state`)."""
        return self.step(v, x, t, t_next)

    def integrate(self, v: Field, x0: torch.Tensor, grid: torch.Tensor,
                  return_trajectory: bool = False) -> Trajectory:
        """Integrate from ``grid[0]`` to ``grid[-1]`` through every grid point (the one loop of every
        fixed-step and multistep solver).

        ``x0`` is ``[B, *D]``, ``grid`` is ``[K + 1]`` (K steps). Gradients flow if the caller
        enables them (the solver does not touch autograd).
        """
        grid = torch.as_tensor(grid, dtype=x0.dtype, device=x0.device)
        if grid.ndim != 1 or grid.numel() < 2:
            raise ValueError(f"grid must be 1-D with at least 2 points, got shape {tuple(grid.shape)}")
        counted = CountedField(v)
        x, state = x0, self.init_state(x0)
        xs = [x0] if return_trajectory else None
        b = x0.shape[0]
        for i in range(grid.numel() - 1):
            x = self.advance(counted, x, grid[i].expand(b), grid[i + 1].expand(b), state)
            if xs is not None:
                xs.append(x)
        return Trajectory(x1=x, xs=torch.stack(xs) if xs is not None else None, ts=grid, nfe=counted.nfe)

    def nfe_for_steps(self, num_steps: int) -> int:
        return num_steps * self.stages

    def steps_for_nfe(self, nfe: int) -> Optional[int]:
        """The number of steps that costs exactly ``nfe`` evaluations, or ``None`` if none does."""
        if nfe < self.stages or nfe % self.stages:
            return None
        return nfe // self.stages

    def __repr__(self) -> str:
        return f"{type(self).__name__}(order={self.order}, stages={self.stages})"


def num_steps_for(solver: Solver, nfe: Optional[int] = None, num_steps: Optional[int] = None, *,
                  takes: tuple = ("nfe", "num_steps")) -> Optional[int]:
    """The one nfe-vs-adaptive check: the number of steps of a fixed-step solve, ``None`` for an
    adaptive one.

    An adaptive solver takes tolerances and chooses its own steps, so it refuses an ``nfe`` or a
    ``num_steps``. A fixed-step solver takes ``num_steps`` (which wins when both are given) or an
    ``nfe`` that is a positive multiple of its ``stages``; both are integers >= 1. ``takes`` names
    the arguments the caller offers (for the message when neither is given). Each refusal is a
    one-line :class:`ConfigError` naming the solver and the value.
    """
    if solver.adaptive:
        for key, value in (("nfe", nfe), ("num_steps", num_steps)):
            if value is not None:
                raise ConfigError(f"solver {solver.name!r} is adaptive: it chooses its own steps from atol/rtol; "
                                  f"drop {key} (got {value!r}) or pick a fixed-step solver")
        return None
    nfe, num_steps = check_int("nfe", nfe, 1, optional=True), check_int("num_steps", num_steps, 1, optional=True)
    if num_steps is not None:
        return num_steps
    if nfe is None:
        want = {"nfe": f"nfe (a positive multiple of its {solver.stages} evaluations per step)",
                "num_steps": "num_steps"}
        raise ConfigError(f"solver {solver.name!r} is fixed-step: it needs {' or '.join(want[k] for k in takes)}")
    steps = solver.steps_for_nfe(nfe)
    if steps is None:
        raise ConfigError(f"solver {solver.name!r} uses {solver.stages} evaluations per step; nfe={nfe} is not a "
                          f"positive multiple of {solver.stages}")
    return steps
