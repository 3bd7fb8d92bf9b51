"""Training-time samplers t ~ p(t) against densities and CDFs derived here."""

from __future__ import annotations

import math

import pytest
import torch

from flowmatch.errors import ConfigError, UnknownNameError
from flowmatch.timesteps import (
    TIME_SAMPLERS,
    LogitNormalTime,
    UniformTime,
    UShapedTime,
    get_time_sampler,
)

N = 40_000
# one-sample Kolmogorov-Smirnov: P(sqrt(n) D > 1.95) ~ 0.001
KS_CRIT = 1.95 / math.sqrt(N)


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def ks_stat(samples: torch.Tensor, cdf) -> float:
    """sup_t |F_n(t) - F(t)| for a continuous F, evaluated at the order statistics."""
    x, _ = torch.sort(samples.double())
    n = x.numel()
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - f).max().item(), (f - (i - 1) / n).max().item())


def u_shaped_pdf(t: torch.Tensor, a: float) -> torch.Tensor:
    return a * torch.cosh(a * (t - 0.5)) / (2 * math.sinh(a / 2))


def u_shaped_cdf(t: torch.Tensor, a: float) -> torch.Tensor:
    # integral of the pdf from 0: [sinh(a (t - 1/2)) + sinh(a / 2)] / (2 sinh(a / 2))
    return (torch.sinh(a * (t - 0.5)) + math.sinh(a / 2)) / (2 * math.sinh(a / 2))


def std_normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def test_registry_names():
    assert set(TIME_SAMPLERS) == {"uniform", "logit_normal", "u_shaped", "constant"}
    assert isinstance(get_time_sampler("uniform"), UniformTime)
    ln = get_time_sampler("logit_normal", loc=0.3, scale=0.7)
    assert isinstance(ln, LogitNormalTime) and ln.loc == 0.3 and ln.scale == 0.7
    us = get_time_sampler("u_shaped", a=2.5)
    assert isinstance(us, UShapedTime) and us.a == 2.5


RANDOM_SAMPLERS = sorted(n for n in TIME_SAMPLERS if n != "constant")


@pytest.mark.parametrize("name", RANDOM_SAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_range_shape_dtype(name, dtype):
    t = get_time_sampler(name).sample(1000, generator=gen(1), dtype=dtype)
    assert t.shape == (1000,) and t.dtype == dtype and t.device.type == "cpu"
    assert (t >= 0).all() and (t <= 1).all()
    assert t.std() > 0.05


@pytest.mark.parametrize("name", RANDOM_SAMPLERS)
def test_deterministic_with_seed(name):
    s = get_time_sampler(name)
    a = s.sample(100, generator=gen(3))
    b = s.sample(100, generator=gen(3))
    c = s.sample(100, generator=gen(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_uniform_moments_and_ks():
    t = get_time_sampler("uniform").sample(N, generator=gen(5), dtype=torch.float64)
    assert t.mean().item() == pytest.approx(0.5, abs=5 * math.sqrt(1 / 12 / N))
    assert t.var().item() == pytest.approx(1 / 12, rel=0.03)
    assert ks_stat(t, lambda x: x) < KS_CRIT


@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (0.5, 1.3), (-1.0, 0.6)])
def test_logit_normal_logit_moments(loc, scale):
    t = get_time_sampler("logit_normal", loc=loc, scale=scale).sample(N, generator=gen(6), dtype=torch.float64)
    z = torch.log(t) - torch.log1p(-t)
    assert torch.isfinite(z).all()
    assert z.mean().item() == pytest.approx(loc, abs=5 * scale / math.sqrt(N))
    assert z.std().item() == pytest.approx(scale, rel=5 * math.sqrt(1 / (2 * N)))
    # and the whole distribution: F(t) = Phi((logit t - loc) / scale)
    cdf = lambda x: std_normal_cdf((torch.log(x) - torch.log1p(-x) - loc) / scale)  # noqa: E731
    assert ks_stat(t, cdf) < KS_CRIT


@pytest.mark.parametrize("a", [1.0, 4.0, 8.0])
def test_u_shaped_ks_against_derived_cdf(a):
    t = get_time_sampler("u_shaped", a=a).sample(N, generator=gen(7), dtype=torch.float64)
    assert ks_stat(t, lambda x: u_shaped_cdf(x, a)) < KS_CRIT
    # sanity of the test itself: the uniform CDF is rejected for a >= 4
    if a >= 4:
        assert ks_stat(t, lambda x: x) > 5 * KS_CRIT


def test_u_shaped_histogram_matches_pdf():
    a = 4.0
    t = get_time_sampler("u_shaped", a=a).sample(N, generator=gen(8), dtype=torch.float64)
    bins = 20
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    counts = torch.histc(t, bins=bins, min=0, max=1)
    p = u_shaped_cdf(edges[1:], a) - u_shaped_cdf(edges[:-1], a)
    expected = N * p
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    # chi^2 with 19 dof: P(> 45) < 1e-3
    assert chi2 < 45
    # U shape: end bins heavier than the middle ones
    assert counts[0] > 2 * counts[bins // 2] and counts[-1] > 2 * counts[bins // 2]


def test_u_shaped_cdf_derivation_is_consistent():
    # the CDF written here is the integral of the pdf written here (trapezoid)
    a = 3.0
    t = torch.linspace(0, 1, 20_001, dtype=torch.float64)
    integral = torch.cumulative_trapezoid(u_shaped_pdf(t, a), t)
    assert torch.allclose(integral, u_shaped_cdf(t[1:], a), atol=1e-7)
    assert u_shaped_cdf(torch.tensor([0.0, 1.0], dtype=torch.float64), a).tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.parametrize("a", [0.5, 4.0])
def test_u_shaped_pdf_method(a):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    assert torch.allclose(UShapedTime(a).pdf(t), u_shaped_pdf(t, a), atol=1e-12)


@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (0.4, 0.5)])
def test_logit_normal_pdf_integrates_to_one_and_matches(loc, scale):
    t = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=torch.float64)
    pdf = LogitNormalTime(loc, scale).pdf(t)
    assert torch.trapezoid(pdf, t).item() == pytest.approx(1.0, abs=1e-4)
    z = torch.log(t) - torch.log1p(-t)
    want = torch.exp(-0.5 * ((z - loc) / scale) ** 2) / (scale * math.sqrt(2 * math.pi)) / (t * (1 - t))
    assert torch.allclose(pdf, want, rtol=1e-10)


def test_uniform_pdf():
    t = torch.rand(10, generator=gen(0))
    assert torch.equal(UniformTime().pdf(t), torch.ones(10))


def test_parameter_validation_and_unknown_name():
    with pytest.raises(ConfigError):
        get_time_sampler("logit_normal", scale=0.0)
    with pytest.raises(ConfigError):
        get_time_sampler("u_shaped", a=-1.0)
    with pytest.raises(UnknownNameError) as e:
        get_time_sampler("beta")
    msg = str(e.value)
    for name in TIME_SAMPLERS:
        assert name in msg


@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
def test_constant_time_draws_no_randomness(value):
    g = gen(0)
    before = g.get_state()
    t = get_time_sampler("constant", value=value).sample(7, generator=g, dtype=torch.float64)
    assert torch.equal(t, torch.full((7,), value, dtype=torch.float64))
    assert torch.equal(g.get_state(), before)
    with pytest.raises(ConfigError):
        get_time_sampler("constant", value=1.5)
