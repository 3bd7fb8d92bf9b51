"""Likelihood by the instantaneous change of variables, against closed forms written here.

Gaussian-to-Gaussian rectified flow: source N(0, I), target N(mu, s^2 I) in D dims, independent
coupling. x_t = t x1 + (1 - t) x0 ~ N(t mu, sigma_t^2 I) with sigma_t^2 = (1 - t)^2 + t^2 s^2, and
the marginal velocity E[x1 - x0 | x_t] = mu + Cov(x1 - x0, x_t) / sigma_t^2 (x_t - t mu) with
Cov(x1 - x0, x_t) = t s^2 - (1 - t) = sigma_t sigma_t'. Its flow maps z ~ N(0, I) to t mu + sigma_t z,
so the model density at t = 1 is exactly N(mu, s^2 I), div v = D (t s^2 - (1 - t)) / sigma_t^2 and
int_0^1 div v dt = D log s.

Affine field v = A x + b: the flow over [0, 1] is x1 = e^A x0 + c with [e^A, c] the top rows of
exp([[A, b], [0, 0]]), and div v = trace(A) everywhere, so log p1(x1) = log N(x0; 0, I) - trace(A).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowmatch.data.toy import Gaussian
from flowmatch.errors import ConfigError, UnknownNameError
from flowmatch.metrics import LikelihoodResult, exact_divergence, hutchinson_divergence, log_likelihood
from flowmatch.solvers import Solver

F64 = torch.float64
LOG2PI = math.log(2 * math.pi)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gauss_field(mu: torch.Tensor, s: float):
    """Rectified-flow marginal velocity between N(0, I) and N(mu, s^2 I); ``mu`` has the shape of one point."""
    def v(x, t):
        tb = t.reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - tb) ** 2 + tb ** 2 * s ** 2
        return mu + (tb * s ** 2 - (1 - tb)) / var * (x - tb * mu)
    return v


def log_normal(x: torch.Tensor, mu: torch.Tensor, s: float) -> torch.Tensor:
    """log N(x; mu, s^2 I) per row, summed over every non-batch dim."""
    z = ((x - mu) / s).reshape(x.shape[0], -1)
    d = z.shape[1]
    return -0.5 * z.pow(2).sum(1) - d * math.log(s) - 0.5 * d * LOG2PI


def gauss_problem(d: int, n: int, seed: int, s: float = 1.7):
    g = gen(seed)
    mu = torch.randn(d, generator=g, dtype=F64)
    x1 = mu + s * torch.randn(n, d, generator=g, dtype=F64)
    return mu, s, x1, log_normal(x1, mu, s)


def std_normal_logp(x):
    return -0.5 * x.reshape(x.shape[0], -1).pow(2).sum(1) - 0.5 * x[0].numel() * LOG2PI


class Recorder:
    """Wraps a field and records every time it was evaluated at."""

    def __init__(self, v):
        self.v, self.ts = v, []

    def __call__(self, x, t):
        self.ts.append(t.detach().clone())
        return self.v(x, t)


# --------------------------------------------------------------------------- Gaussian -> Gaussian


@pytest.mark.parametrize("d", [2, 16])
def test_gaussian_flow_exact_dopri5(d):
    mu, s, x1, ref = gauss_problem(d, 64, seed=d)
    r = log_likelihood(gauss_field(mu, s), x1, Gaussian(d), divergence="exact", atol=1e-7, rtol=1e-7)
    assert isinstance(r, LikelihoodResult)
    assert r.logp.shape == (64,) and r.logp.dtype == F64
    assert (r.logp - ref).abs().max() < 1e-4
    # the flow maps z to mu + s z: the backward solve recovers z = (x1 - mu) / s
    assert (r.x0 - (x1 - mu) / s).abs().max() < 1e-4
    assert torch.allclose(r.prior_logp, std_normal_logp(r.x0))
    assert r.divergence == "exact" and r.solver == "dopri5" and r.num_steps is None and r.probe is None
    assert r.dim == d and r.n == 64 and r.nfe > 0


@pytest.mark.parametrize("d", [2, 16])
def test_gaussian_flow_exact_rk4(d):
    mu, s, x1, ref = gauss_problem(d, 32, seed=10 + d)
    r = log_likelihood(gauss_field(mu, s), x1, Gaussian(d), solver="rk4", num_steps=64, divergence="exact")
    assert (r.logp - ref).abs().max() < 1e-5
    assert r.nfe == 4 * 64 and r.num_steps == 64 and r.solver == "rk4"
    # a coarse grid is visibly worse: the error comes from the solver, not from a loose check
    coarse = log_likelihood(gauss_field(mu, s), x1, Gaussian(d), solver="euler", num_steps=4, divergence="exact")
    assert (coarse.logp - ref).abs().max() > 1e-2


@pytest.mark.parametrize("d", [2, 16])
def test_rademacher_is_exact_on_an_isotropic_jacobian(d):
    # dv/dx = c(t) I, so eps^T (dv/dx) eps = c(t) D for every +-1 probe: no variance at all
    mu, s, x1, ref = gauss_problem(d, 32, seed=20 + d)
    r = log_likelihood(gauss_field(mu, s), x1, Gaussian(d), divergence="hutchinson", probe="rademacher",
                       generator=gen(0), atol=1e-7, rtol=1e-7)
    assert r.divergence == "hutchinson" and r.probe == "rademacher" and r.num_probes == 1
    assert (r.logp - ref).abs().max() < 1e-4


@pytest.mark.parametrize("d", [2, 16])
@pytest.mark.parametrize("k", [1, 4])
def test_gaussian_probes_unbiased_with_the_right_variance(d, k):
    # With Gaussian probes the estimate of int div v dt is log(s) * mean_k(eps_k^T eps_k): its error
    # is -log(s) (chi2_D / K - D), mean 0 and standard deviation |log s| sqrt(2 D / K).
    mu, s, pts, ref = gauss_problem(d, 8, seed=30 + d)
    copies = 128
    x1, ref = pts.repeat(copies, 1), ref.repeat(copies)
    r = log_likelihood(gauss_field(mu, s), x1, Gaussian(d), solver="rk4", num_steps=16, divergence="hutchinson",
                       probe="gaussian", num_probes=k, generator=gen(100 + k))
    err = r.logp - ref
    sd = abs(math.log(s)) * math.sqrt(2 * d / k)
    assert abs(float(err.mean())) < 4 * sd / math.sqrt(err.numel())
    assert 0.85 < float(err.std()) / sd < 1.15
    # and every group of copies of one point averages to its exact log-likelihood
    per_point = err.reshape(copies, 8).mean(0)
    assert per_point.abs().max() < 5 * sd / math.sqrt(copies)


def test_probes_come_from_the_generator():
    mu, s, x1, _ = gauss_problem(16, 16, seed=40)
    kw = dict(solver="rk4", num_steps=8, divergence="hutchinson", probe="gaussian")
    a = log_likelihood(gauss_field(mu, s), x1, Gaussian(16), generator=gen(5), **kw)
    b = log_likelihood(gauss_field(mu, s), x1, Gaussian(16), generator=gen(5), **kw)
    c = log_likelihood(gauss_field(mu, s), x1, Gaussian(16), generator=gen(6), **kw)
    assert torch.equal(a.logp, b.logp)
    assert (a.logp - c.logp).abs().max() > 1e-3


def test_auto_divergence_switches_on_dimension():
    for d, expected in [(2, "exact"), (8, "exact"), (9, "hutchinson")]:
        mu, s, x1, ref = gauss_problem(d, 4, seed=50 + d)
        r = log_likelihood(gauss_field(mu, s), x1, Gaussian(d), solver="rk4", num_steps=8, generator=gen(0))
        assert r.divergence == expected
        assert (r.logp - ref).abs().max() < 1e-3  # Rademacher is exact here (isotropic Jacobian)


def test_image_shaped_data():
    # x is [B, 1, 2, 2]: the model sees that shape, the density sums over all 4 elements
    mu, s = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]], dtype=F64), 0.6
    x1 = mu + s * torch.randn(16, 1, 2, 2, generator=gen(60), dtype=F64)
    shapes = []

    def v(x, t):
        shapes.append(tuple(x.shape))
        return gauss_field(mu, s)(x, t)

    r = log_likelihood(v, x1, Gaussian(4), solver="rk4", num_steps=32, divergence="exact")
    assert set(shapes) == {(16, 1, 2, 2)} and r.x0.shape == x1.shape and r.dim == 4
    assert (r.logp - log_normal(x1, mu, s)).abs().max() < 1e-5


# --------------------------------------------------------------------------- affine field


def affine_problem(d: int, seed: int):
    g = gen(seed)
    A = 0.6 * torch.randn(d, d, generator=g, dtype=F64)
    b = torch.randn(d, generator=g, dtype=F64)
    M = torch.zeros(d + 1, d + 1, dtype=F64)
    M[:d, :d], M[:d, d] = A, b
    E = torch.linalg.matrix_exp(M)  # x(1) = E[:d, :d] x(0) + E[:d, d]
    x1 = torch.randn(24, d, generator=g, dtype=F64) * 1.5
    x0 = torch.linalg.solve(E[:d, :d], (x1 - E[:d, d]).T).T
    ref = -0.5 * x0.pow(2).sum(1) - 0.5 * d * LOG2PI - torch.trace(A)
    return (lambda x, t: x @ A.T + b), A, x1, x0, ref


@pytest.mark.parametrize("solver,kw", [("dopri5", dict(atol=1e-9, rtol=1e-9)), ("rk4", dict(num_steps=64))])
def test_affine_field_exact(solver, kw):
    v, A, x1, x0, ref = affine_problem(3, seed=70)
    r = log_likelihood(v, x1, std_normal_logp, solver=solver, divergence="exact", **kw)
    assert (r.x0 - x0).abs().max() < 1e-6
    assert (r.logp - ref).abs().max() < 1e-6
    # the change-of-variables term alone is -trace(A) for every point
    assert torch.allclose(r.logp - r.prior_logp, -torch.trace(A).expand(24), atol=1e-7)


def test_rademacher_unbiased_on_a_nonsymmetric_affine_field():
    # per row the estimate of int div dt is eps^T A eps (A is constant): mean trace(A) and, for +-1
    # probes, variance sum_{i<j} (A_ij + A_ji)^2
    d, copies = 6, 512
    v, A, pts, _, _ = affine_problem(d, seed=80)
    x1 = pts[:4].repeat(copies, 1)
    r = log_likelihood(v, x1, std_normal_logp, solver="rk4", num_steps=4, divergence="hutchinson",
                       probe="rademacher", generator=gen(81))
    est = r.prior_logp - r.logp  # estimated int_0^1 div v dt, per row
    S = A + A.T
    sd = math.sqrt(float(S.triu(1).pow(2).sum()))
    assert abs(float(est.mean() - torch.trace(A))) < 4 * sd / math.sqrt(est.numel())
    assert 0.85 < float(est.std()) / sd < 1.15


# --------------------------------------------------------------------------- divergence helpers


def _net_field(seed: int, dim: int, hidden: int, act):
    """A small float64 network ``v(x, t) = net([x, t])`` and its parameters."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(dim + 1, hidden), act(), torch.nn.Linear(hidden, dim)).double()
    return (lambda x, t: net(torch.cat([x, t[:, None]], dim=1))), net


def test_divergences_match_the_jacobian_trace_of_a_network():
    v, net = _net_field(0, 3, 32, torch.nn.Tanh)

    x = torch.randn(5, 3, generator=gen(90), dtype=F64)
    t = torch.rand(5, generator=gen(91), dtype=F64)
    traces = torch.stack([torch.autograd.functional.jacobian(lambda xi: v(xi[None], t[i:i + 1])[0], x[i]).trace()
                          for i in range(5)])
    out, div = exact_divergence(v, x, t)
    assert torch.allclose(out, v(x, t)) and not out.requires_grad and not div.requires_grad
    assert torch.allclose(div, traces, atol=1e-10)
    # Hutchinson with the 8 sign patterns of (1, +-1, +-1) averages eps^T J eps to the trace exactly
    signs = torch.tensor([[1.0, a, b] for a in (1.0, -1.0) for b in (1.0, -1.0)], dtype=F64)
    probes = signs[:, None, :].expand(4, 5, 3).contiguous()
    _, est = hutchinson_divergence(v, x, t, probes)
    assert torch.allclose(est, traces, atol=1e-10)
    assert all(p.grad is None for p in net.parameters())


def test_works_under_no_grad_and_leaves_no_graph():
    v, net = _net_field(1, 2, 16, torch.nn.SiLU)

    x1 = torch.randn(8, 2, generator=gen(92), dtype=F64)
    a = log_likelihood(v, x1, Gaussian(2), solver="rk4", num_steps=8)
    with torch.no_grad():
        b = log_likelihood(v, x1, Gaussian(2), solver="rk4", num_steps=8)
    assert torch.equal(a.logp, b.logp)
    assert not a.logp.requires_grad and not a.x0.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_constant_field_has_zero_divergence():
    # the output does not depend on x at all: log p1(x1) = log N(x1 - c; 0, I)
    c = torch.tensor([1.0, -2.0], dtype=F64)
    x1 = torch.randn(6, 2, generator=gen(93), dtype=F64)
    r = log_likelihood(lambda x, t: c.expand_as(x), x1, Gaussian(2), solver="euler", num_steps=1)
    assert torch.allclose(r.logp, std_normal_logp(x1 - c))


# --------------------------------------------------------------------------- bookkeeping


def test_chunks_give_the_same_answer_and_add_nfe():
    mu, s, x1, _ = gauss_problem(2, 10, seed=94)
    whole = log_likelihood(gauss_field(mu, s), x1, Gaussian(2), solver="rk4", num_steps=16)
    parts = log_likelihood(gauss_field(mu, s), x1, Gaussian(2), solver="rk4", num_steps=16, chunk_size=4)
    assert torch.allclose(whole.logp, parts.logp, atol=1e-12)
    assert whole.nfe == 64 and parts.nfe == 3 * 64


def test_summary_numbers_and_dict():
    mu, s, x1, ref = gauss_problem(2, 40, seed=95)
    r = log_likelihood(gauss_field(mu, s), x1, Gaussian(2), atol=1e-7, rtol=1e-7)
    assert r.mean == pytest.approx(float(r.logp.mean()))
    assert r.std == pytest.approx(float(r.logp.std()))
    assert r.bits_per_dim == pytest.approx(-r.mean / (2 * math.log(2)))
    assert r.mean == pytest.approx(float(ref.mean()), abs=1e-4)
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["nfe"] == r.nfe > 0 and d["divergence"] == "exact" and d["dim"] == 2 and d["n"] == 40
    assert not any(isinstance(val, torch.Tensor) for val in d.values())


@pytest.mark.parametrize("solver,kw", [("dopri5", {}), ("rk4", dict(num_steps=8))])
def test_backward_solve_starts_at_data_and_stays_in_unit_interval(solver, kw):
    mu, s, x1, _ = gauss_problem(2, 4, seed=96)
    rec = Recorder(gauss_field(mu, s))
    r = log_likelihood(rec, x1, Gaussian(2), solver=solver, **kw)
    ts = torch.cat(rec.ts)
    assert len(rec.ts) == r.nfe
    assert torch.all(rec.ts[0] == 1.0)
    assert ts.min() >= 0.0 and ts.max() <= 1.0


def test_float32_data():
    mu, s, x1, ref = gauss_problem(2, 16, seed=97)
    r = log_likelihood(gauss_field(mu.float(), s), x1.float(), Gaussian(2), solver="rk4", num_steps=32)
    assert r.x0.dtype == torch.float32 and r.logp.dtype == F64
    assert (r.logp - ref).abs().max() < 1e-3


def test_gaussian_log_prob():
    x = torch.randn(7, 3, generator=gen(98), dtype=F64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    assert torch.allclose(Gaussian(3).log_prob(x), ref)
    assert torch.allclose(Gaussian(4).log_prob(x[:, :2].reshape(7, 1, 2).repeat(1, 2, 1)),
                          torch.distributions.Normal(0.0, 1.0).log_prob(x[:, :2]).sum(1) * 2)
    with pytest.raises(ValueError, match="3 elements"):
        Gaussian(3).log_prob(torch.zeros(2, 2))


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    mu, s, x1, _ = gauss_problem(2, 4, seed=99)
    v = gauss_field(mu, s)
    src = Gaussian(2)
    with pytest.raises(UnknownNameError, match="divergence 'trace'.*exact"):
        log_likelihood(v, x1, src, divergence="trace")
    with pytest.raises(UnknownNameError, match="probe 'sphere'"):
        log_likelihood(v, x1, src, divergence="hutchinson", probe="sphere")
    with pytest.raises(ConfigError, match="num_probes"):
        log_likelihood(v, x1, src, divergence="hutchinson", num_probes=0)
    with pytest.raises(UnknownNameError, match="solver 'rk5'"):
        log_likelihood(v, x1, src, solver="rk5")
    with pytest.raises(ConfigError, match="num_steps"):
        log_likelihood(v, x1, src, solver="rk4")
    with pytest.raises(ConfigError, match="adaptive"):
        log_likelihood(v, x1, src, solver="dopri5", num_steps=10)
    with pytest.raises(ConfigError, match="chunk_size"):
        log_likelihood(v, x1, src, solver="rk4", num_steps=2, chunk_size=0)
    class NotAnOdeSolver(Solver):
        name, order, stages = "sampler", 0, 1
    with pytest.raises(ConfigError, match="order 0"):
        log_likelihood(v, x1, src, solver=NotAnOdeSolver(), num_steps=2)
    with pytest.raises(ValueError, match=r"\[B, \*D\]"):
        log_likelihood(v, x1[0], src)
    with pytest.raises(TypeError, match="floating point"):
        log_likelihood(v, torch.ones(4, 2, dtype=torch.long), src)
    with pytest.raises(ValueError, match="shape of x"):
        log_likelihood(lambda x, t: x[:, :1], x1, src, solver="euler", num_steps=1)
    with pytest.raises(ValueError, match="one value per point"):
        log_likelihood(v, x1, lambda x: -0.5 * x.pow(2), solver="euler", num_steps=1)
    with pytest.raises(TypeError, match="source_log_prob"):
        log_likelihood(v, x1, 3.0, solver="euler", num_steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    mu, s, x1, ref = gauss_problem(16, 32, seed=100)
    dev = torch.device("cuda")
    r = log_likelihood(gauss_field(mu.to(dev), s), x1.to(dev), Gaussian(16), divergence="hutchinson",
                       generator=torch.Generator(device=dev).manual_seed(0), atol=1e-7, rtol=1e-7)
    assert r.logp.device.type == "cuda"
    assert (r.logp.cpu() - ref).abs().max() < 1e-4


def test_likelihood_refuses_steps_for_an_adaptive_solver_as_solve_does():
    from flowmatch.solvers import get_solver, num_steps_for, solve

    v, x1 = (lambda x, t: -x), torch.randn(4, 2, generator=gen(0))
    msgs = []
    for fn in (lambda: log_likelihood(v, x1, Gaussian(2), solver="dopri5", num_steps=10),
               lambda: solve(v, x1, "dopri5", num_steps=10),
               lambda: num_steps_for(get_solver("dopri5"), num_steps=10)):
        with pytest.raises(ConfigError) as e:
            fn()
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] == msgs[2]
