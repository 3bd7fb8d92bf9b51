"""Probability paths: endpoints, u_t = d x_t / dt (finite differences), smoothing, broadcasting."""

from __future__ import annotations

import math

import pytest
import torch

from flowmatch.errors import ConfigError, UnknownNameError
from flowmatch.paths import PATHS, AffinePath, CosineScheduler, LinearScheduler, get_path
from flowmatch.types import PathSample

SCHEDULERS = ["linear", "cosine"]


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def pair(b=16, shape=(3,), seed=0, dtype=torch.float64):
    g = gen(seed)
    x0 = torch.randn(b, *shape, generator=g, dtype=dtype)
    x1 = torch.randn(b, *shape, generator=g, dtype=dtype) * 2 + 1
    return x0, x1


def closed_form(name: str, t: torch.Tensor):
    """alpha, sigma, d_alpha, d_sigma written out independently of the library."""
    if name == "linear":
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)
    h = math.pi / 2
    return torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t)


def test_registry():
    assert set(PATHS) == {"linear", "cosine"}
    assert isinstance(get_path("linear").scheduler, LinearScheduler)
    assert isinstance(get_path("cosine").scheduler, CosineScheduler)
    assert get_path("cosine").name == "cosine"


@pytest.mark.parametrize("name", SCHEDULERS)
def test_endpoints(name):
    x0, x1 = pair()
    path = get_path(name)
    s0 = path.sample(x0, x1, torch.zeros(16, dtype=torch.float64))
    s1 = path.sample(x0, x1, torch.ones(16, dtype=torch.float64))
    assert torch.allclose(s0.xt, x0, atol=1e-12)
    assert torch.allclose(s1.xt, x1, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_matches_closed_form(name):
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    out = get_path(name).scheduler(t)
    a, s, da, ds = closed_form(name, t)
    for got, want in [(out.alpha, a), (out.sigma, s), (out.d_alpha, da), (out.d_sigma, ds)]:
        assert got.shape == (11,)
        assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_xt_matches_closed_form(name):
    x0, x1 = pair(seed=1)
    t = torch.rand(16, generator=gen(2), dtype=torch.float64)
    ps = get_path(name).sample(x0, x1, t)
    a, s, da, ds = closed_form(name, t)
    assert torch.allclose(ps.xt, a[:, None] * x1 + s[:, None] * x0, atol=1e-12)
    assert torch.allclose(ps.ut, da[:, None] * x1 + ds[:, None] * x0, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_ut_is_central_difference_of_xt(name):
    x0, x1 = pair(b=32, seed=3)
    path = get_path(name)
    t = 0.05 + 0.9 * torch.rand(32, generator=gen(4), dtype=torch.float64)
    h = 1e-6
    fd = (path.sample(x0, x1, t + h).xt - path.sample(x0, x1, t - h).xt) / (2 * h)
    ut = path.sample(x0, x1, t).ut
    # central difference error O(h^2) ~ 1e-12, round-off ~ eps / h ~ 1e-10
    assert torch.allclose(ut, fd, atol=1e-7, rtol=0)
    assert (ut - fd).abs().max() < 1e-7


def test_linear_ut_is_x1_minus_x0_at_every_t():
    x0, x1 = pair(seed=5)
    t = torch.rand(16, generator=gen(6), dtype=torch.float64)
    path = get_path("linear")
    ps = path.sample(x0, x1, t)
    assert torch.allclose(ps.ut, x1 - x0, atol=1e-14)
    assert torch.allclose(ps.xt, t[:, None] * x1 + (1 - t[:, None]) * x0, atol=1e-14)
    # the shortcut (one subtraction) is the general affine formula's floats, bit for bit, in fp32 too:
    # on every host, since products by d_alpha = 1 and d_sigma = -1 are exact and x1 + (-x0) is the one
    # correctly rounded subtraction (with or without FMA); xt is the path's own expression
    for dt in (torch.float64, torch.float32):
        a, b, tt = x0.to(dt), x1.to(dt), t.to(dt)
        ps = path.sample(a, b, tt)
        s = path.scheduler(tt)
        assert torch.equal(ps.ut, s.d_alpha[:, None] * b + s.d_sigma[:, None] * a)
        assert torch.equal(ps.xt, s.alpha[:, None] * b + s.sigma[:, None] * a)


def test_cosine_is_variance_preserving():
    # alpha^2 + sigma^2 = 1: independent N(0, I) endpoints give N(0, I) at every t
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    out = get_path("cosine").scheduler(t)
    assert torch.allclose(out.alpha ** 2 + out.sigma ** 2, torch.ones_like(t), atol=1e-12)


def test_returns_pathsample_with_inputs():
    x0, x1 = pair()
    t = torch.full((16,), 0.3, dtype=torch.float64)
    ps = get_path("linear").sample(x0, x1, t)
    assert isinstance(ps, PathSample)
    assert ps.x0 is x0 and ps.x1 is x1
    assert ps.t.shape == (16,) and ps.xt.shape == x0.shape and ps.ut.shape == x0.shape


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scalar_t_broadcast(name):
    x0, x1 = pair(seed=7)
    path = get_path(name)
    a = path.sample(x0, x1, 0.37)
    b = path.sample(x0, x1, torch.full((16,), 0.37, dtype=torch.float64))
    c = path.sample(x0, x1, torch.tensor(0.37, dtype=torch.float64))
    assert a.t.shape == (16,) and a.t.dtype == torch.float64
    for other in (b, c):
        assert torch.allclose(a.xt, other.xt, atol=1e-14)
        assert torch.allclose(a.ut, other.ut, atol=1e-14)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_image_shaped_broadcast(name):
    b = 6
    x0, x1 = pair(b=b, shape=(1, 4, 4), seed=8)
    t = torch.linspace(0, 1, b, dtype=torch.float64)
    ps = get_path(name).sample(x0, x1, t)
    assert ps.xt.shape == (b, 1, 4, 4) and ps.ut.shape == (b, 1, 4, 4)
    a, s, da, ds = closed_form(name, t)
    for i in range(b):  # each sample uses its own t
        assert torch.allclose(ps.xt[i], a[i] * x1[i] + s[i] * x0[i], atol=1e-12)
        assert torch.allclose(ps.ut[i], da[i] * x1[i] + ds[i] * x0[i], atol=1e-12)


def test_float32_inputs_keep_dtype():
    x0, x1 = pair(dtype=torch.float32)
    ps = get_path("cosine").sample(x0, x1, 0.5)
    assert ps.xt.dtype == torch.float32 and ps.ut.dtype == torch.float32 and ps.t.dtype == torch.float32


@pytest.mark.parametrize("name", SCHEDULERS)
def test_sigma_adds_noise_with_right_std_and_leaves_ut(name):
    sigma = 0.3
    b = 20_000
    x0, x1 = pair(b=b, shape=(2,), seed=9)
    t = torch.rand(b, generator=gen(10), dtype=torch.float64)
    clean = get_path(name, sigma=0.0).sample(x0, x1, t)
    noisy = get_path(name, sigma=sigma).sample(x0, x1, t, generator=gen(11))
    assert torch.equal(noisy.ut, clean.ut)
    resid = noisy.xt - clean.xt
    n = resid.numel()
    assert abs(resid.mean().item()) < 5 * sigma / math.sqrt(n)
    assert resid.std().item() == pytest.approx(sigma, rel=5 * math.sqrt(1 / (2 * n)) + 1e-3)
    # reproducible with the same generator, different with another
    again = get_path(name, sigma=sigma).sample(x0, x1, t, generator=gen(11))
    other = get_path(name, sigma=sigma).sample(x0, x1, t, generator=gen(12))
    assert torch.equal(noisy.xt, again.xt)
    assert not torch.allclose(noisy.xt, other.xt)


def test_sigma_zero_is_deterministic():
    x0, x1 = pair()
    path = get_path("linear", sigma=0.0)
    assert torch.equal(path.sample(x0, x1, 0.4).xt, path.sample(x0, x1, 0.4).xt)


def test_negative_sigma_is_config_error():
    with pytest.raises(ConfigError):
        get_path("linear", sigma=-0.1)
    with pytest.raises(ConfigError):
        AffinePath(LinearScheduler(), sigma=-1.0)


def test_unknown_path_name_lists_valid():
    with pytest.raises(UnknownNameError) as e:
        get_path("vp-sde")
    assert "vp-sde" in str(e.value) and "linear" in str(e.value) and "cosine" in str(e.value)


def test_shape_mismatch_and_bad_t():
    x0, x1 = pair()
    with pytest.raises(ValueError):
        get_path("linear").sample(x0, x1[:, :2], 0.5)
    with pytest.raises(ValueError):
        get_path("linear").sample(x0, x1, torch.zeros(5, dtype=torch.float64))


# --------------------------------------------------------------------------- [B] -> [B, 1, ...] in one place
@pytest.mark.parametrize("shape", [(5,), (5, 3), (5, 1, 4, 4)])
def test_expand_like_broadcasts_a_per_sample_value(shape):
    from flowmatch.utils import expand_like

    x = torch.randn(*shape, generator=gen(3))
    s = torch.arange(5, dtype=x.dtype)
    e = expand_like(s, x)
    assert e.shape == (5,) + (1,) * (len(shape) - 1)
    # row i of s * x is s[i] times row i of x, written out element by element
    prod = e * x
    for i in range(5):
        assert torch.equal(prod[i], s[i] * x[i])


def test_the_per_sample_broadcast_is_written_once():
    """Paths, losses, solvers and metrics broadcast ``[B]`` against ``[B, *D]`` through
    ``flowmatch.utils.expand_like``, not a copy of its reshape."""
    import pathlib

    pkg = pathlib.Path(__file__).resolve().parents[1] / "flowmatch"
    idiom = "*([1] * ("
    found = [str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if idiom in p.read_text()]
    assert found == ["utils.py"], found
