"""Straightness of a learned flow (Liu, Gong & Liu 2022, eq. 4):

    S(v) = int_0^1 E || (Z_1 - Z_0) - v(Z_t, t) ||^2 dt

along the model's own trajectory ``Z_t`` from an accurate solve. S = 0 exactly when every
trajectory is a straight line traversed at constant speed. We report S summed over dimensions,
S per dimension, and S / E||Z_1 - Z_0||^2 (scale-free), with the solver and grid used. The
t-integral is the trapezoidal rule over the solve's grid; the velocity at each grid point is
evaluated once more on the trajectory (``num_steps + 1`` extra NFE).

Where along the path the trajectories bend is reported per grid time: ``per_t`` is the deviation
``E || (Z_1 - Z_0) - v(Z_t, t) ||^2`` of the velocity from the chord, and ``accel_per_t`` the mean
squared acceleration ``E || d v(Z_t, t) / dt ||^2`` along the trajectory (finite differences of
the same velocities, at the midpoints ``accel_ts``). Both are 0 for a straight flow at constant speed.

Non-finite start points: every number of the result is NaN, nothing is solved, and a warning says how
many rows of ``x0`` hold a NaN or an inf (:mod:`flowmatch.metrics.guard`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from flowmatch.metrics.guard import finite_inputs
from flowmatch.solvers import get_solver, time_grid

__all__ = ["StraightnessResult", "straightness"]


@dataclass
class StraightnessResult:
    straightness: float  # S, summed over dimensions
    straightness_per_dim: float  # S / D
    straightness_rel: float  # S / E||Z1 - Z0||^2
    per_t: list  # E||(Z1 - Z0) - v(Z_t, t)||^2 at each grid time
    ts: list
    accel_per_t: list  # E||dv(Z_t, t)/dt||^2 between grid times
    accel_ts: list  # the midpoints of the grid intervals
    solver: str
    num_steps: int
    nfe: int
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def straightness(v, x0: torch.Tensor, *, solver: str = "rk4", num_steps: int = 64) -> StraightnessResult:
    """Straightness of ``v`` on trajectories starting at ``x0`` (``[B, *D]``), solved with a
    fixed-step ``solver`` on a uniform grid of ``num_steps``. A NaN or inf in ``x0``: a result of
    NaN (``nfe`` 0) and a warning."""
    s = get_solver(solver)
    if s.adaptive:
        raise ValueError("straightness needs a fixed-step solver (the integral is taken on its grid)")
    grid = time_grid(num_steps, device=x0.device, dtype=x0.dtype)
    if not finite_inputs("straightness", x0=x0):
        nan = float("nan")
        return StraightnessResult(straightness=nan, straightness_per_dim=nan, straightness_rel=nan,
                                  per_t=[nan] * grid.numel(), ts=grid.tolist(), accel_per_t=[nan] * num_steps,
                                  accel_ts=(0.5 * (grid[1:] + grid[:-1])).tolist(), solver=s.name,
                                  num_steps=num_steps, nfe=0, n=x0.shape[0])
    traj = s.integrate(v, x0, grid, return_trajectory=True)
    xs = traj.xs  # [K+1, B, *D]
    disp = (traj.x1 - x0).reshape(x0.shape[0], -1)
    b = x0.shape[0]
    per_t, accel = [], []
    v_prev = None
    dt = (grid[1:] - grid[:-1]).double()
    for i in range(grid.numel()):
        vt = v(xs[i], grid[i].expand(b)).reshape(b, -1)
        per_t.append((disp - vt).pow(2).sum(dim=1).mean())
        if v_prev is not None:
            accel.append(((vt - v_prev).double() / dt[i - 1]).pow(2).sum(dim=1).mean())
        v_prev = vt
    per_t_t = torch.stack(per_t).double()
    S = float((0.5 * (per_t_t[1:] + per_t_t[:-1]) * dt).sum())
    d = disp.shape[1]
    denom = float(disp.double().pow(2).sum(dim=1).mean())
    return StraightnessResult(straightness=S, straightness_per_dim=S / d,
                              straightness_rel=S / denom if denom > 0 else float("nan"),
                              per_t=per_t_t.tolist(), ts=grid.tolist(), accel_per_t=torch.stack(accel).tolist(),
                              accel_ts=(0.5 * (grid[1:] + grid[:-1])).tolist(), solver=s.name, num_steps=num_steps,
                              nfe=traj.nfe + grid.numel(), n=b)
