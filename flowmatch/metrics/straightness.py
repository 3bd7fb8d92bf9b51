"""Straightness of a learned flow (Liu, Gong & Liu 2022, eq. 4):

    S(v) = int_0^1 E || (Z_1 - Z_0) - v(Z_t, t) ||^2 dt

along the model's own trajectory ``Z_t`` from an accurate solve. S = 0 exactly when every
trajectory is a straight line traversed at constant speed. We report S summed over dimensions,
S per dimension, and S / E||Z_1 - Z_0||^2 (scale-free), with the solver and grid used. The
t-integral is the trapezoidal rule over the solve's grid; the velocity at each grid point is
evaluated once more on the trajectory (``num_steps + 1`` extra NFE).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from flowmatch.solvers import get_solver, time_grid

__all__ = ["StraightnessResult", "straightness"]


@dataclass
class StraightnessResult:
    straightness: float  # S, summed over dimensions
    straightness_per_dim: float  # S / D
    straightness_rel: float  # S / E||Z1 - Z0||^2
    per_t: list  # E||(Z1 - Z0) - v(Z_t, t)||^2 at each grid time
    ts: list
    solver: str
    num_steps: int
    nfe: int
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def straightness(v, x0: torch.Tensor, *, solver: str = "rk4", num_steps: int = 64) -> StraightnessResult:
    """Straightness of ``v`` on trajectories starting at ``x0`` (``[B, *D]``), solved with a
    fixed-step ``solver`` on a uniform grid of ``num_steps``."""
    s = get_solver(solver)
    if s.adaptive:
        raise ValueError("straightness needs a fixed-step solver (the integral is taken on its grid)")
    grid = time_grid(num_steps, device=x0.device, dtype=x0.dtype)
    traj = s.integrate(v, x0, grid, return_trajectory=True)
    xs = traj.xs  # [K+1, B, *D]
    disp = (traj.x1 - x0).reshape(x0.shape[0], -1)
    b = x0.shape[0]
    per_t = []
    for i in range(grid.numel()):
        vt = v(xs[i], grid[i].expand(b)).reshape(b, -1)
        per_t.append((disp - vt).pow(2).sum(dim=1).mean())
    per_t_t = torch.stack(per_t).double()
    dt = (grid[1:] - grid[:-1]).double()
    S = float((0.5 * (per_t_t[1:] + per_t_t[:-1]) * dt).sum())
    d = disp.shape[1]
    denom = float(disp.double().pow(2).sum(dim=1).mean())
    return StraightnessResult(straightness=S, straightness_per_dim=S / d,
                              straightness_rel=S / denom if denom > 0 else float("nan"),
                              per_t=per_t_t.tolist(), ts=grid.tolist(), solver=s.name, num_steps=num_steps,
                              nfe=traj.nfe + grid.numel(), n=b)
