"""ODE solvers against exact solutions: one-step exactness, convergence order, NFE accounting, grids."""

from __future__ import annotations

import math

import pytest
import torch

from flowmatch.errors import ConfigError, UnknownNameError
from flowmatch.solvers import (
    FIXED_SOLVERS,
    GRIDS,
    RK4,
    SOLVERS,
    AdamsBashforth2,
    CapturedSolve,
    CountedField,
    Euler,
    Heun,
    Midpoint,
    Renoise,
    TorchdiffeqSolver,
    get_solver,
    is_adaptive,
    solve,
    time_grid,
)
from flowmatch.types import Trajectory

STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ab2": 1, "renoise": 1, "consistency": 1}
ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ab2": 2, "renoise": 0, "consistency": 0}
SAMPLERS = ["consistency"]  # consistency sampling re-noises with fresh noise: not an ODE method
RK = ["euler", "midpoint", "heun", "rk4"]  # one-step Runge-Kutta methods (closed-form stability polynomials)
CONSISTENT = RK + ["ab2"]  # converge to the ODE solution at their order
STEPS_FOR_ORDER = {"euler": [8, 16, 32, 64], "midpoint": [8, 16, 32, 64], "heun": [8, 16, 32, 64],
                   "rk4": [4, 8, 16, 32], "ab2": [8, 16, 32, 64]}


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def x0_batch(b=8, d=3, seed=0, dtype=torch.float64):
    return torch.randn(b, d, generator=gen(seed), dtype=dtype)


class Counter:
    """Our own call counter around a field; also checks the [B]-shaped t contract."""

    def __init__(self, f, batch):
        self.f, self.batch, self.calls, self.ts = f, batch, 0, []

    def __call__(self, x, t):
        assert t.ndim == 1 and t.shape[0] == self.batch, f"t must be [B], got {tuple(t.shape)}"
        assert torch.all(t == t[0]), "one time per call"
        assert -1e-12 <= float(t[0]) <= 1 + 1e-12
        assert x.shape[0] == self.batch
        self.calls += 1
        self.ts.append(float(t[0]))
        return self.f(x, t)


def neg(x, t):
    return -x


def fit_slope(hs, errs):
    lh = torch.log(torch.tensor(hs, dtype=torch.float64))
    le = torch.log(torch.tensor(errs, dtype=torch.float64))
    lh_c = lh - lh.mean()
    return float((lh_c * (le - le.mean())).sum() / (lh_c ** 2).sum())


# --------------------------------------------------------------------------- registry


def test_registry_and_attributes():
    assert set(FIXED_SOLVERS) == set(STAGES)
    for name, cls in FIXED_SOLVERS.items():
        s = cls()
        assert s.name == name and s.order == ORDERS[name] and s.stages == STAGES[name]
        assert not s.adaptive and not is_adaptive(name)
    assert "dopri5" in SOLVERS and is_adaptive("dopri5")
    d = get_solver("dopri5", atol=1e-7, rtol=1e-6)
    assert isinstance(d, TorchdiffeqSolver) and d.adaptive and d.order == 5
    assert (d.atol, d.rtol) == (1e-7, 1e-6)


def test_unknown_solver_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        get_solver("leapfrog")
    msg = str(e.value)
    assert "leapfrog" in msg
    for name in ["euler", "midpoint", "heun", "rk4", "dopri5"]:
        assert name in msg
    with pytest.raises(UnknownNameError):
        solve(neg, x0_batch(), "leapfrog", num_steps=2)


# --------------------------------------------------------------------------- exactness


def test_constant_field_one_euler_step_is_exact():
    x0 = x0_batch(b=5, d=4)
    c = torch.randn(4, generator=gen(1), dtype=torch.float64)
    field = Counter(lambda x, t: c.expand_as(x), 5)
    tr = solve(field, x0, "euler", num_steps=1)
    assert torch.equal(tr.x1, x0 + c)  # h = 1 exactly: no rounding beyond the one addition
    assert tr.nfe == 1 and field.calls == 1
    assert field.ts == [0.0]


def test_straight_field_x1_minus_x0_one_step():
    # the rectified-flow ideal: v(x_t, t) = x1 - x0 carries x0 exactly to x1 in one Euler step
    x0 = x0_batch(b=6, d=2, seed=2)
    x1 = x0_batch(b=6, d=2, seed=3)
    tr = solve(lambda x, t: x1 - x0, x0, "euler", nfe=1)
    assert torch.allclose(tr.x1, x1, atol=1e-15)


@pytest.mark.parametrize("name", sorted(set(FIXED_SOLVERS) - set(SAMPLERS)))
def test_constant_field_exact_for_every_solver(name):
    x0 = x0_batch(b=4, d=2)
    c = torch.tensor([1.5, -0.25], dtype=torch.float64)
    for grid in ["uniform", "power", "cosine"]:
        tr = solve(lambda x, t: c.expand_as(x), x0, name, num_steps=5, grid=grid)
        assert torch.allclose(tr.x1, x0 + c, atol=1e-14)


@pytest.mark.parametrize("name", ["midpoint", "heun", "rk4"])
def test_linear_in_time_field_exact_for_second_order_and_up(name):
    # v = t: x1 = x0 + 1/2; midpoint, trapezoid and RK4 integrate polynomials of degree 1 exactly
    x0 = x0_batch(b=4, d=2)
    tr = solve(lambda x, t: t[:, None].expand_as(x), x0, name, num_steps=3)
    assert torch.allclose(tr.x1, x0 + 0.5, atol=1e-14)


def test_rk4_exact_on_cubic_in_time():
    # v = 4 t^3: x1 = x0 + 1; Simpson's rule (RK4 on a t-only field) is exact for cubics
    x0 = x0_batch(b=4, d=2)
    tr = solve(lambda x, t: (4 * t ** 3)[:, None].expand_as(x), x0, "rk4", num_steps=2)
    assert torch.allclose(tr.x1, x0 + 1.0, atol=1e-14)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_euler_on_time_dependent_field_error_is_h_over_2(n):
    # v = t: Euler sums h * t_i = h^2 * n(n-1)/2 = (1 - h)/2, so the error is exactly h/2
    x0 = x0_batch(b=3, d=2)
    tr = solve(lambda x, t: t[:, None].expand_as(x), x0, "euler", num_steps=n)
    err = (tr.x1 - (x0 + 0.5)).abs().max().item()
    assert err == pytest.approx(0.5 / n, rel=1e-9)


# --------------------------------------------------------------------------- convergence order


@pytest.mark.parametrize("name", CONSISTENT)
def test_global_error_falls_at_the_solver_order(name):
    x0 = x0_batch(b=8, d=3, seed=4)
    exact = x0 * math.exp(-1.0)
    steps = STEPS_FOR_ORDER[name]
    errs = []
    for n in steps:
        tr = solve(neg, x0, name, num_steps=n)
        errs.append((tr.x1 - exact).abs().max().item())
    assert all(e > 1e-13 for e in errs), errs  # above float64 round-off
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    slope = fit_slope([1 / n for n in steps], errs)
    assert abs(slope - ORDERS[name]) < 0.2, (slope, errs)


@pytest.mark.parametrize("name", CONSISTENT)
def test_order_on_nonautonomous_field(name):
    # dx/dt = cos(t) x  ->  x(1) = x0 exp(sin 1)
    x0 = x0_batch(b=4, d=2, seed=5)
    exact = x0 * math.exp(math.sin(1.0))
    steps = STEPS_FOR_ORDER[name]
    errs = [(solve(lambda x, t: torch.cos(t)[:, None] * x, x0, name, num_steps=n).x1 - exact).abs().max().item()
            for n in steps]
    slope = fit_slope([1 / n for n in steps], errs)
    assert abs(slope - ORDERS[name]) < 0.25, (slope, errs)


def test_euler_time_dependent_error_decreases_with_h():
    x0 = x0_batch(b=3, d=2)
    errs = [(solve(lambda x, t: t[:, None] * torch.ones_like(x), x0, "euler", num_steps=n).x1 - (x0 + 0.5))
            .abs().max().item() for n in [2, 4, 8, 16]]
    assert all(a > b for a, b in zip(errs, errs[1:]))


@pytest.mark.parametrize("grid", ["power", "cosine"])
def test_nonuniform_grids_converge(grid):
    x0 = x0_batch(b=4, d=2, seed=6)
    exact = x0 * math.exp(-1.0)
    e_coarse = (solve(neg, x0, "rk4", num_steps=4, grid=grid).x1 - exact).abs().max().item()
    e_fine = (solve(neg, x0, "rk4", num_steps=32, grid=grid).x1 - exact).abs().max().item()
    assert e_fine < 1e-7 and e_fine < e_coarse / 100


# --------------------------------------------------------------------------- NFE


@pytest.mark.parametrize("name", sorted(FIXED_SOLVERS))
@pytest.mark.parametrize("num_steps", [1, 3, 4])
def test_nfe_is_steps_times_stages(name, num_steps):
    x0 = x0_batch(b=5, d=2)
    field = Counter(neg, 5)
    tr = solve(field, x0, name, num_steps=num_steps)
    assert field.calls == num_steps * STAGES[name]
    assert tr.nfe == field.calls
    assert get_solver(name).nfe_for_steps(num_steps) == field.calls


def test_heun_4_steps_costs_8_nfe():
    field = Counter(neg, 2)
    tr = solve(field, x0_batch(b=2), "heun", num_steps=4)
    assert tr.nfe == 8 and field.calls == 8
    # the last evaluation is at t = 1 (full trapezoid on the last step, no final Euler step)
    assert field.ts[-1] == 1.0


@pytest.mark.parametrize("name", sorted(FIXED_SOLVERS))
@pytest.mark.parametrize("mult", [1, 2, 5])
def test_nfe_argument_maps_to_steps(name, mult):
    k = mult * STAGES[name]
    field = Counter(neg, 3)
    tr = solve(field, x0_batch(b=3), name, nfe=k)
    assert field.calls == k and tr.nfe == k
    assert tr.ts.numel() == k // STAGES[name] + 1


@pytest.mark.parametrize("name,nfe", [("midpoint", 3), ("heun", 7), ("rk4", 6), ("rk4", 2), ("euler", 0),
                                      ("heun", 0)])
def test_nfe_not_a_multiple_of_stages_raises(name, nfe):
    with pytest.raises(ConfigError) as e:
        solve(neg, x0_batch(), name, nfe=nfe)
    assert str(nfe) in str(e.value)


def test_fixed_solver_needs_nfe_or_steps():
    with pytest.raises(ConfigError):
        solve(neg, x0_batch(), "euler")


def test_num_steps_wins_over_nfe_and_accepts_instance():
    field = Counter(neg, 8)
    tr = solve(field, x0_batch(), RK4(), num_steps=2, nfe=100)
    assert field.calls == 8 and tr.nfe == 8


def test_counted_field():
    cf = CountedField(lambda x, t: 2 * x)
    x = torch.ones(2, 1)
    assert torch.equal(cf(x, torch.zeros(2)), 2 * x)
    cf(x, torch.zeros(2))
    assert cf.nfe == 2


# --------------------------------------------------------------------------- trajectories


@pytest.mark.parametrize("name", RK)
def test_trajectory_shape_and_content(name):
    b, d, k = 5, 3, 6
    x0 = x0_batch(b=b, d=d, seed=7)
    tr = solve(neg, x0, name, num_steps=k, return_trajectory=True)
    assert isinstance(tr, Trajectory)
    assert tr.xs.shape == (k + 1, b, d)
    assert torch.equal(tr.xs[0], x0) and torch.equal(tr.xs[-1], tr.x1)
    assert torch.allclose(tr.ts, torch.linspace(0, 1, k + 1, dtype=torch.float64))
    # on v = -x one step multiplies by the method's stability polynomial R(-h): point j is x0 R(-h)^j
    h = 1 / k
    r = {"euler": 1 - h, "midpoint": 1 - h + h ** 2 / 2, "heun": 1 - h + h ** 2 / 2,
         "rk4": 1 - h + h ** 2 / 2 - h ** 3 / 6 + h ** 4 / 24}[name]
    powers = torch.tensor([r ** j for j in range(k + 1)], dtype=torch.float64)
    assert torch.allclose(tr.xs, x0[None] * powers[:, None, None], atol=1e-14)
    # without a trajectory: xs is None, same endpoint
    tr2 = solve(neg, x0, name, num_steps=k)
    assert tr2.xs is None and torch.equal(tr2.x1, tr.x1)


def test_integrate_on_explicit_grid_and_subinterval():
    x0 = x0_batch(b=4, d=2)
    grid = torch.linspace(0.25, 0.75, 41, dtype=torch.float64)
    tr = RK4().integrate(neg, x0, grid)
    assert torch.allclose(tr.x1, x0 * math.exp(-0.5), atol=1e-12)
    assert tr.nfe == 160
    with pytest.raises(ValueError):
        RK4().integrate(neg, x0, torch.tensor([0.0], dtype=torch.float64))


@pytest.mark.parametrize("name", RK)
def test_image_shaped_state(name):
    x0 = torch.randn(3, 1, 4, 4, generator=gen(8), dtype=torch.float64)
    tr = solve(neg, x0, name, num_steps=16, return_trajectory=True)
    assert tr.x1.shape == (3, 1, 4, 4) and tr.xs.shape == (17, 3, 1, 4, 4)
    # same per-sample result as the flattened [B, 16] problem
    flat = solve(neg, x0.reshape(3, 16), name, num_steps=16)
    assert torch.allclose(tr.x1.reshape(3, 16), flat.x1, atol=1e-15)
    h = 1 / 16
    r = {"euler": 1 - h, "midpoint": 1 - h + h ** 2 / 2, "heun": 1 - h + h ** 2 / 2,
         "rk4": 1 - h + h ** 2 / 2 - h ** 3 / 6 + h ** 4 / 24}[name]
    assert torch.allclose(tr.x1, x0 * r ** 16, atol=1e-14)


def test_per_sample_time_steps_broadcast_over_image_dims():
    # each row gets its own step size h_b (grid per sample via step()): x + h_b * v
    x = torch.ones(3, 1, 2, 2, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.float64)
    tn = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64)
    out = Euler().step(neg, x, t, tn)
    assert torch.allclose(out, (1 - tn)[:, None, None, None].expand_as(x), atol=1e-15)


def test_float32_state_keeps_dtype():
    x0 = x0_batch(dtype=torch.float32)
    tr = solve(neg, x0, "heun", num_steps=4)
    assert tr.x1.dtype == torch.float32 and tr.ts.dtype == torch.float32


def test_gradients_flow_through_solver():
    x0 = x0_batch(b=2, d=2).requires_grad_(True)
    a = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    tr = solve(lambda x, t: a * x, x0, "rk4", num_steps=8)
    tr.x1.sum().backward()
    # d/da sum(x0 e^a) at a = -1 is sum(x0) e^-1
    # (RK4 with 8 steps: relative error ~ h^4 / 120 < 1e-5)
    assert a.grad.item() == pytest.approx(x0.sum().item() * math.exp(-1.0), rel=1e-4)
    assert torch.allclose(x0.grad, torch.full_like(x0, math.exp(-1.0)), rtol=1e-4)


def test_step_methods_directly():
    x = x0_batch(b=2, d=2)
    t, tn = torch.zeros(2, dtype=torch.float64), torch.full((2,), 0.1, dtype=torch.float64)
    h = 0.1
    # one step on v = -x: each method reproduces its Taylor polynomial of e^{-h}
    assert torch.allclose(Euler().step(neg, x, t, tn), x * (1 - h), atol=1e-15)
    assert torch.allclose(Midpoint().step(neg, x, t, tn), x * (1 - h + h ** 2 / 2), atol=1e-15)
    assert torch.allclose(Heun().step(neg, x, t, tn), x * (1 - h + h ** 2 / 2), atol=1e-15)
    taylor4 = 1 - h + h ** 2 / 2 - h ** 3 / 6 + h ** 4 / 24
    assert torch.allclose(RK4().step(neg, x, t, tn), x * taylor4, atol=1e-15)


# --------------------------------------------------------------------------- adaptive (torchdiffeq)


def test_dopri5_accurate_and_counts_real_calls():
    x0 = x0_batch(b=6, d=2, seed=9)
    field = Counter(neg, 6)
    tr = solve(field, x0, "dopri5", atol=1e-10, rtol=1e-10)
    assert (tr.x1 - x0 * math.exp(-1.0)).abs().max() < 1e-8
    assert tr.nfe == field.calls
    assert tr.nfe > 6  # more than one dopri5 step's worth
    assert tr.xs is None


def test_dopri5_tolerance_trades_nfe_for_error():
    x0 = x0_batch(b=4, d=2, seed=10)
    f = lambda x, t: torch.cos(3 * t)[:, None] * x  # noqa: E731
    exact = x0 * math.exp(math.sin(3.0) / 3)
    loose = solve(f, x0, "dopri5", atol=1e-3, rtol=1e-3)
    tight = solve(f, x0, "dopri5", atol=1e-10, rtol=1e-10)
    assert tight.nfe > loose.nfe
    assert (tight.x1 - exact).abs().max() < (loose.x1 - exact).abs().max()
    assert (tight.x1 - exact).abs().max() < 1e-8


def test_dopri5_trajectory_on_uniform_grid():
    x0 = x0_batch(b=3, d=2, seed=11)
    field = Counter(neg, 3)
    tr = solve(field, x0, "dopri5", atol=1e-9, rtol=1e-9, return_trajectory=True, trajectory_points=9)
    assert tr.xs.shape == (9, 3, 2)
    assert torch.allclose(tr.ts, torch.linspace(0, 1, 9, dtype=torch.float64))
    exact = x0[None] * torch.exp(-tr.ts)[:, None, None]
    assert torch.allclose(tr.xs, exact, atol=1e-7)
    assert tr.nfe == field.calls


@pytest.mark.parametrize("method,tol", [("dopri5", 1e-3), ("dopri5", 1e-7), ("dopri8", 1e-3), ("dopri8", 1e-7),
                                        ("bosh3", 1e-3), ("bosh3", 1e-6), ("adaptive_heun", 1e-3)])
def test_adaptive_never_evaluates_past_t1(method, tol):
    # torchdiffeq would step past t = 1 and interpolate back (t ~ 1.6 for dopri5 at 1e-3), feeding a
    # model times outside the [0, 1] it was trained on; the last step must land on t = 1.
    x0 = x0_batch(b=4, d=2, seed=13)
    field = Counter(lambda x, t: torch.cos(3 * t)[:, None] * x, 4)
    tr = solve(field, x0, method, atol=tol, rtol=tol)
    assert max(field.ts) <= 1.0 + 1e-12 and min(field.ts) >= 0.0
    exact = x0 * math.exp(math.sin(3.0) / 3)
    assert (tr.x1 - exact).abs().max() < 1000 * tol


def test_adaptive_backward_in_time():
    # integrate() also runs 1 -> 0 (inversion / likelihood): x(0) = x(1) e^{+1} for v = -x
    x1 = x0_batch(b=3, d=2, seed=14)
    field = Counter(neg, 3)
    tr = get_solver("dopri5", atol=1e-10, rtol=1e-10).integrate(field, x1, torch.tensor([1.0, 0.0],
                                                                                        dtype=torch.float64))
    assert torch.allclose(tr.x1, x1 * math.e, atol=1e-8)
    assert tr.nfe == field.calls


@pytest.mark.parametrize("method", ["bosh3", "adaptive_heun"])
def test_other_adaptive_methods(method):
    x0 = x0_batch(b=2, d=2, seed=12)
    field = Counter(neg, 2)
    tr = solve(field, x0, method, atol=1e-6, rtol=1e-6)
    assert (tr.x1 - x0 * math.exp(-1.0)).abs().max() < 1e-4
    assert tr.nfe == field.calls


# --------------------------------------------------------------------------- time grids


@pytest.mark.parametrize("kind", sorted(GRIDS))
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_grid_endpoints_monotone_length(kind, n):
    g = time_grid(n, kind, dtype=torch.float64)
    assert g.shape == (n + 1,)
    assert g[0].item() == 0.0 and g[-1].item() == 1.0
    assert (g[1:] > g[:-1]).all()


def test_grid_closed_forms():
    n = 10
    i = torch.arange(n + 1, dtype=torch.float64)
    assert torch.allclose(time_grid(n, "uniform", dtype=torch.float64), i / n, atol=1e-15)
    assert torch.allclose(time_grid(n, "power", rho=3.0, dtype=torch.float64), (i / n) ** 3, atol=1e-15)
    assert torch.allclose(time_grid(n, "power", rho=0.5, dtype=torch.float64), (i / n) ** 0.5, atol=1e-15)
    cos = 0.5 * (1 - torch.cos(math.pi * i / n))
    assert torch.allclose(time_grid(n, "cosine", dtype=torch.float64), cos, atol=1e-15)


def test_grid_step_placement():
    # rho > 1: small steps near t = 0; cosine: small steps at both ends
    p = time_grid(8, "power", rho=2.0, dtype=torch.float64).diff()
    assert p[0] < p[-1]
    c = time_grid(8, "cosine", dtype=torch.float64).diff()
    assert c[0] < c[4] and c[-1] < c[4]


def test_grid_dtype_and_errors():
    assert time_grid(4).dtype == torch.float32
    with pytest.raises(ValueError):
        time_grid(0)
    with pytest.raises(UnknownNameError) as e:
        time_grid(4, "karras")
    for k in GRIDS:
        assert k in str(e.value)


def test_solve_uses_requested_grid():
    x0 = x0_batch(b=2, d=2)
    field = Counter(neg, 2)
    tr = solve(field, x0, "euler", num_steps=5, grid="power", rho=2.0)
    assert torch.allclose(tr.ts, time_grid(5, "power", rho=2.0, dtype=torch.float64))
    assert field.ts == pytest.approx(tr.ts[:-1].tolist())


# --------------------------------------------------------------------------- multistep samplers


def test_ab2_recurrence_on_linear_field_uniform_and_variable_grid():
    # v = -x on an arbitrary grid: first step Euler, then x_{n+1} = x_n + h_n((1 + r/2) v_n - (r/2) v_{n-1})
    # with r = h_n / h_{n-1}; the scalar recurrence is written out here in plain floats
    x0 = x0_batch(b=3, d=2, seed=11)
    for grid in ([0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 0.1, 0.3, 0.6, 1.0]):
        g = torch.tensor(grid, dtype=torch.float64)
        tr = AdamsBashforth2().integrate(neg, x0, g, return_trajectory=True)
        c, prev_v, prev_h, cs = 1.0, None, None, [1.0]
        for a, b in zip(grid, grid[1:]):
            h, v = b - a, -c
            c = c + h * v if prev_v is None else c + h * ((1 + 0.5 * h / prev_h) * v - 0.5 * h / prev_h * prev_v)
            prev_v, prev_h = v, h
            cs.append(c)
        assert torch.allclose(tr.xs, x0[None] * torch.tensor(cs, dtype=torch.float64)[:, None, None], atol=1e-14)
        assert tr.nfe == len(grid) - 1


def test_ab2_second_order_on_a_nonuniform_grid():
    x0 = x0_batch(b=4, d=2, seed=12)
    exact = x0 * math.exp(-1.0)
    steps = [8, 16, 32, 64]
    errs = [(solve(neg, x0, "ab2", num_steps=n, grid="power:1.5").x1 - exact).abs().max().item() for n in steps]
    assert abs(fit_slope([1 / n for n in steps], errs) - 2) < 0.25, errs


@pytest.mark.parametrize("grid", ["uniform", "cosine", "power:0.5"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_renoise_exact_on_a_straight_flow(grid, k):
    # v(x_t, t) = x1 - x0 along x_t = t x1 + (1 - t) x0: the endpoint prediction is x1 at every step
    x0 = x0_batch(b=6, d=2, seed=13)
    x1 = x0_batch(b=6, d=2, seed=14)
    tr = solve(lambda x, t: x1 - x0, x0, "renoise", num_steps=k, grid=grid, return_trajectory=True)
    assert torch.allclose(tr.x1, x1, atol=1e-14)
    ts = tr.ts[:, None, None]
    assert torch.allclose(tr.xs, ts * x1[None] + (1 - ts) * x0[None], atol=1e-14)  # stays on the chord


def test_renoise_one_step_is_euler_and_biased_on_a_curved_flow():
    x0 = x0_batch(b=4, d=2, seed=15)
    assert torch.allclose(solve(neg, x0, "renoise", num_steps=1).x1, solve(neg, x0, "euler", num_steps=1).x1)
    # on v = -x the steps tend to x = x0 + t v(x, t) = x0 - t x, so x(1) -> x0 / 2, not x0 e^-1:
    # the error against the ODE grows with the step count (the documented bias; order 0)
    exact = x0 * math.exp(-1.0)
    ends = [solve(neg, x0, "renoise", num_steps=n).x1 for n in (8, 32, 128, 512)]
    errs = [(e - exact).abs().max().item() for e in ends]
    assert all(a < b for a, b in zip(errs, errs[1:])), errs
    lim = [(e - x0 / 2).abs().max().item() for e in ends]
    assert all(a > b for a, b in zip(lim, lim[1:])) and lim[-1] < 0.02, lim  # O(1/n) towards x0 / 2
    assert Renoise.order == 0 and Renoise.stages == 1


@pytest.mark.parametrize("cls", [AdamsBashforth2, Renoise])
def test_multistep_samplers_refuse_a_lone_step(cls):
    x = x0_batch(b=2, d=2)
    with pytest.raises(NotImplementedError):
        cls().step(neg, x, torch.zeros(2, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64))


def test_parse_grid_with_exponent():
    from flowmatch.solvers import parse_grid

    assert parse_grid("power:0.5") == ("power", 0.5) and parse_grid("cosine", 3.0) == ("cosine", 3.0)
    assert torch.allclose(time_grid(4, "power:0.5", dtype=torch.float64),
                          torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64) ** 0.5)
    for bad in ("power:x", "power:-1"):
        with pytest.raises(ValueError, match="power"):
            parse_grid(bad)
    with pytest.raises(UnknownNameError):
        parse_grid("zigzag:2")


# --------------------------------------------------------------------------- captured solves


def _mlp_field(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))
    return lambda x, t: net(torch.cat([x, t[:, None]], dim=1))


@pytest.mark.crosspath  # eager capture calls the solver's own steps: the same kernels
@pytest.mark.parametrize("name", ["euler", "heun", "ab2"])
def test_captured_eager_solve_equals_plain(name):
    v = _mlp_field()
    x0 = torch.randn(64, 2, generator=gen(16))
    g = time_grid(8, "cosine")
    c = CapturedSolve(v, name, g, x0, mode="auto")  # auto on the CPU: eager
    assert c.mode == "eager"
    with torch.no_grad():
        ref = get_solver(name).integrate(v, x0, g)
    x0b = torch.randn(64, 2, generator=gen(17))  # repeated solves with new inputs
    with torch.no_grad():
        ref_b = get_solver(name).integrate(v, x0b, g).x1
    assert torch.equal(c(x0), ref.x1) and torch.equal(c(x0b), ref_b)
    assert c.nfe == ref.nfe


@pytest.mark.crosspath  # inductor's kernels: within atol
def test_captured_compiled_solve_matches_plain():
    v = _mlp_field(1)
    x0 = torch.randn(32, 2, generator=gen(18))
    g = time_grid(4)
    c = CapturedSolve(v, "euler", g, x0, mode="compile", warmup=1)
    with torch.no_grad():
        ref = solve(v, x0, "euler", num_steps=4).x1
    assert torch.allclose(c(x0), ref, atol=1e-5)
    assert c.nfe == 4


def test_captured_solve_bad_input():
    v = _mlp_field()
    x0 = torch.randn(8, 2)
    with pytest.raises(ConfigError, match="adaptive"):
        CapturedSolve(v, "dopri5", time_grid(4), x0)
    with pytest.raises(ConfigError, match="capture mode"):
        CapturedSolve(v, "euler", time_grid(4), x0, mode="turbo")
    with pytest.raises(ConfigError, match="CUDA"):
        CapturedSolve(v, "euler", time_grid(4), x0, mode="cuda_graph")
    c = CapturedSolve(v, "euler", time_grid(4), x0)
    with pytest.raises(ValueError, match=r"\(8, 2\)"):
        c(torch.randn(9, 2))


# --------------------------------------------------------------------------- one integrate loop
def test_every_fixed_step_solver_uses_the_base_integrate_loop():
    from flowmatch.solvers import Solver

    for name, cls in FIXED_SOLVERS.items():
        assert cls.integrate is Solver.integrate, name


def test_a_multistep_method_is_two_hooks_on_the_base_loop():
    """A method that carries state (here: the number of steps taken and the first velocity, a
    'frozen-velocity' sampler) defines ``init_state`` and ``advance``; the base class integrates,
    counts the NFE and stacks the trajectory."""
    from flowmatch.solvers import Solver

    class Frozen(Solver):
        name, order, stages = "frozen", 1, 1

        def init_state(self, x0):
            return {"steps": 0}

        def advance(self, v, x, t, t_next, state):
            if state["steps"] == 0:
                state["v"] = v(x, t)
            state["steps"] += 1
            return x + (t_next - t)[:, None] * state["v"]

    x0 = x0_batch(b=4, d=2)
    g = time_grid(5, "power", rho=2.0, dtype=x0.dtype)
    tr = Frozen().integrate(neg, x0, g, return_trajectory=True)
    assert tr.nfe == 1 and tr.xs.shape == (6, 4, 2) and torch.equal(tr.xs[0], x0)
    # written out: x moves along -x0 for the whole unit interval, through every grid time
    for i in range(6):
        assert torch.allclose(tr.xs[i], x0 - g[i] * x0, atol=1e-14)
    assert torch.equal(tr.x1, tr.xs[-1])


# --------------------------------------------------------------------------- the nfe-vs-adaptive check, once
ADAPTIVE_NAMES = [n for n in SOLVERS if is_adaptive(n)]


def _refusal(fn) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("name", ADAPTIVE_NAMES)
@pytest.mark.parametrize("key", ["nfe", "num_steps"])
def test_every_adaptive_solver_refuses_a_step_count_as_num_steps_for_does(name, key):
    from flowmatch.solvers import num_steps_for

    msg = _refusal(lambda: solve(neg, x0_batch(), name, **{key: 8}))
    assert msg == _refusal(lambda: num_steps_for(get_solver(name), **{key: 8}))
    assert "\n" not in msg and f"{name!r} is adaptive" in msg and f"drop {key} (got 8)" in msg
    assert num_steps_for(get_solver(name)) is None


@pytest.mark.parametrize("name", list(FIXED_SOLVERS))
def test_solve_takes_its_steps_from_num_steps_for(name):
    from flowmatch.solvers import num_steps_for

    s = get_solver(name)
    for k in (1, 2, 3, 4, 8, 12):
        if s.steps_for_nfe(k) is None:
            assert _refusal(lambda: solve(neg, x0_batch(), name, nfe=k)) == _refusal(lambda: num_steps_for(s, k))
        else:
            assert solve(neg, x0_batch(), name, nfe=k).ts.numel() - 1 == num_steps_for(s, k) == k // STAGES[name]
    assert _refusal(lambda: solve(neg, x0_batch(), name)) == _refusal(lambda: num_steps_for(s))
    assert "fixed-step" in _refusal(lambda: num_steps_for(s)) and "nfe" in _refusal(lambda: num_steps_for(s))
    only_steps = _refusal(lambda: num_steps_for(s, takes=("num_steps",)))
    assert "num_steps" in only_steps and "nfe" not in only_steps


def test_consistency_sampler_renoises_with_fresh_seeded_noise():
    """Each step predicts the endpoint x + (1 - t) v and re-noises it to the next time with fresh noise
    from a generator seeded at the start of the solve; the last step returns the prediction."""
    x0 = x0_batch(b=6, d=2)
    c = torch.tensor([1.5, -0.25], dtype=torch.float64)
    grid = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    tr = get_solver("consistency").integrate(lambda x, t: c.expand_as(x), x0, grid)
    from flowmatch.solvers.multistep import CONSISTENCY_NOISE_SEED

    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(CONSISTENCY_NOISE_SEED), dtype=torch.float64)
    x = 0.25 * (x0 + c) + 0.75 * z  # step 1: predict, re-noise at 0.25
    assert torch.allclose(tr.x1, x + 0.75 * c, atol=1e-14) and tr.nfe == 2
    one = get_solver("consistency").integrate(lambda x, t: c.expand_as(x), x0, grid[[0, 2]])
    assert torch.equal(one.x1, x0 + c)  # one step: one Euler step


def test_consistency_noise_is_not_the_source_stream():
    """A source drawn from seed 0 (as benches draw theirs) and the sampler's fresh noise must differ:
    re-noising with z = x0 would make two uniform steps exactly two Euler steps."""
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    curved = lambda x, t: torch.stack([-x[:, 1], x[:, 0]], dim=1) * (1 + t[:, None])  # noqa: E731
    two = get_solver("consistency").integrate(curved, x0, time_grid(2, dtype=torch.float64)).x1
    assert not torch.allclose(two, solve(curved, x0, "euler", nfe=2).x1)


def test_consistency_sampler_renoises_with_draws_of_the_source():
    """The re-noising draws z like the interpolant's x0: from the task's source when given one (for
    8gaussians -> moons the 8 Gaussians; N(0, I) noise there is off the paths the model was trained
    on); the bench passes each model's source; every other solver ignores it."""
    from flowmatch.bench import bench_suite
    from flowmatch.data.toy import get_dataset
    from flowmatch.solvers.multistep import CONSISTENCY_NOISE_SEED

    source = get_dataset("8gaussians")
    x0 = source.sample(400, generator=torch.Generator().manual_seed(0))
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731  predicts x1_hat = x
    grid = torch.tensor([0.0, 0.5, 1.0])
    got = get_solver("consistency").for_source(source).integrate(zero, x0, grid).x1
    z = source.sample(400, generator=torch.Generator().manual_seed(CONSISTENCY_NOISE_SEED))
    assert torch.equal(got, 0.5 * x0 + 0.5 * z)
    plain = get_solver("consistency").integrate(zero, x0, grid).x1
    assert not torch.allclose(plain, got)  # N(0, I) noise without a source
    assert get_solver("euler").for_source(source).name == "euler"
    res = bench_suite({"m": zero}, source, get_dataset("moons"), solvers=["consistency"], nfes=[2], n=400,
                      straightness_n=10, progress=False)
    x0b = source.sample(400, generator=torch.Generator().manual_seed(0))
    from flowmatch.bench import ToyScorer

    expect = ToyScorer(get_dataset("moons"), 400, 0)(0.5 * x0b + 0.5 * z)["w2"]
    assert res.rows[0]["w2"] == pytest.approx(expect, rel=1e-9)
