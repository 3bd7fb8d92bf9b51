"""Toy 2D distributions against their closed-form moments (computed here, not copied from runs)."""

from __future__ import annotations

import math

import pytest
import torch

from flowmatch.data import DATASETS, ToyDistribution, get_dataset
from flowmatch.errors import ConfigError, UnknownNameError


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


N_BIG = 200_000


# --------------------------------------------------------------------------- every dataset


def test_registry_has_the_documented_datasets():
    assert {"gaussian", "8gaussians", "moons", "checkerboard", "spirals", "circles"} <= set(DATASETS)


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_device_finite(name, dtype):
    ds = get_dataset(name)
    assert isinstance(ds, ToyDistribution) and ds.dim == 2
    x = ds.sample(257, generator=gen(1), device="cpu", dtype=dtype)
    assert x.shape == (257, 2)
    assert x.dtype == dtype
    assert x.device.type == "cpu"
    assert torch.isfinite(x).all()
    # not degenerate: both coordinates vary
    assert (x.std(dim=0) > 0.1).all()


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_deterministic_given_seed(name):
    ds = get_dataset(name)
    a = ds.sample(300, generator=gen(7))
    b = ds.sample(300, generator=gen(7))
    c = ds.sample(300, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_default_device_follows_generator(name):
    x = get_dataset(name).sample(5, generator=gen(0))
    assert x.device.type == "cpu" and x.dtype == torch.float32
    y = get_dataset(name).sample(5)  # no generator: global RNG, still [n, 2]
    assert y.shape == (5, 2)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        get_dataset("swissroll")
    msg = str(e.value)
    assert "swissroll" in msg
    for name in DATASETS:
        assert name in msg


@pytest.mark.parametrize("name", sorted(n for n in DATASETS if n != "gaussian"))
@pytest.mark.parametrize("dim", [1, 3, 10])
def test_non_gaussian_refuses_dim_other_than_2(name, dim):
    with pytest.raises(ConfigError):
        get_dataset(name, dim=dim)


# --------------------------------------------------------------------------- gaussian


@pytest.mark.parametrize("dim", [1, 2, 5, 17])
def test_gaussian_any_dim_is_standard_normal(dim):
    x = get_dataset("gaussian", dim=dim).sample(40_000, generator=gen(dim), dtype=torch.float64)
    assert x.shape == (40_000, dim)
    n = x.shape[0]
    # mean 0 (se 1/sqrt(n)), covariance I (se ~ sqrt(2/n) on the diagonal, 1/sqrt(n) off it)
    assert x.mean(0).abs().max() < 5 / math.sqrt(n)
    cov = torch.cov(x.T).reshape(dim, dim)
    assert (cov - torch.eye(dim, dtype=torch.float64)).abs().max() < 6 * math.sqrt(2 / n)


def test_gaussian_dim_must_be_positive():
    with pytest.raises(ConfigError):
        get_dataset("gaussian", dim=0)


# --------------------------------------------------------------------------- 8 gaussians


def _eight_centres() -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float64)
    ang = k * math.pi / 4
    return 5.0 * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)


def test_8gaussians_nearest_centre_and_within_cluster_variance():
    x = get_dataset("8gaussians").sample(N_BIG, generator=gen(3), dtype=torch.float64)
    centres = _eight_centres()
    d2 = torch.cdist(x, centres) ** 2
    nearest = d2.argmin(dim=1)
    resid = x - centres[nearest]
    n = x.shape[0]
    # every component is used about equally often (multinomial, p = 1/8)
    counts = torch.bincount(nearest, minlength=8).double()
    se = math.sqrt(n * (1 / 8) * (7 / 8))
    assert (counts - n / 8).abs().max() < 6 * se
    # residuals around the nearest centre: mean 0, per-coordinate variance sqrt(0.1), no correlation
    var = math.sqrt(0.1)
    assert resid.mean(0).abs().max() < 6 * math.sqrt(var / n)
    rv = resid.var(dim=0)
    # the nearest-centre split truncates far tails (> 3.4 sd), a bias well under 1 %
    assert torch.allclose(rv, torch.full_like(rv, var), rtol=0.03)
    assert abs(torch.cov(resid.T)[0, 1].item()) < 0.01
    # practically all points lie within 5 sd of some centre
    assert (d2.min(dim=1).values.sqrt() < 5 * var ** 0.5).double().mean() > 0.999


def test_8gaussians_mixture_moments_closed_form():
    # E[x] = 0; E[x x^T] = 25 * mean_k(c_k c_k^T) + sqrt(0.1) I = (25/2 + sqrt(0.1)) I
    x = get_dataset("8gaussians").sample(N_BIG, generator=gen(4), dtype=torch.float64)
    n = x.shape[0]
    second = 12.5 + math.sqrt(0.1)
    assert x.mean(0).abs().max() < 6 * math.sqrt(second / n)
    m2 = (x.T @ x) / n
    assert m2[0, 0].item() == pytest.approx(second, rel=0.02)
    assert m2[1, 1].item() == pytest.approx(second, rel=0.02)
    assert abs(m2[0, 1].item()) < 0.15
    # radius concentrates near 5
    r = x.norm(dim=1)
    assert r.mean().item() == pytest.approx(5.0, abs=0.1)


def test_8gaussians_centres_method_matches_closed_form():
    c = get_dataset("8gaussians").centers(dtype=torch.float64)
    assert torch.allclose(c, _eight_centres(), atol=1e-12)


# --------------------------------------------------------------------------- moons


def _moons_moments():
    """Closed-form mean and covariance of sklearn moons (noise 0.2), then x * 3 - 1.

    Upper moon (cos th, sin th), lower (1 - cos th, 0.5 - sin th), th ~ U(0, pi), each with prob 1/2.
    E[cos] = 0, E[sin] = 2/pi, E[cos^2] = E[sin^2] = 1/2, E[cos sin] = 0.
    """
    two_pi = 2 / math.pi
    mx = 0.5 * (0.0 + 1.0)
    my = 0.5 * (two_pi + (0.5 - two_pi))
    exx = 0.5 * (0.5 + (1 - 0 + 0.5))
    eyy = 0.5 * (0.5 + (0.25 - 2 * 0.5 * two_pi + 0.5))
    exy = 0.5 * (0.0 + (0.5 - two_pi))  # (1-c)(0.5-s) = 0.5 - s - 0.5c + cs
    noise_var = 0.2 ** 2
    mean = torch.tensor([mx, my], dtype=torch.float64)
    cov = torch.tensor([[exx - mx * mx + noise_var, exy - mx * my],
                        [exy - mx * my, eyy - my * my + noise_var]], dtype=torch.float64)
    return 3 * mean - 1, 9 * cov


def test_moons_closed_form_derivation_sanity():
    mean, _ = _moons_moments()
    assert torch.allclose(mean, torch.tensor([0.5, -0.25], dtype=torch.float64))


@pytest.mark.crosspath
def test_moons_draws_are_the_two_moons_formula_on_the_generators_stream():
    # the sampler's stream is part of every seeded result: angle, moon choice, noise, in this order.
    # Bit for bit on any host: cos and sin run on the same [n] tensor as in the sampler (same vector
    # body and tail), and 1 - cos, 0.5 - sin are the same correctly rounded subtractions whether
    # broadcast from [1.0, 0.5] (the sampler) or written apart (here); the rest is the same expression
    n = 300
    g = gen(8)
    theta = math.pi * torch.rand(n, generator=g)
    lower = torch.rand(n, generator=g) < 0.5
    noise = torch.randn(n, 2, generator=g)
    up = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    lo = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    expected = (torch.where(lower[:, None], lo, up) + 0.2 * noise) * 3 - 1
    assert torch.equal(get_dataset("moons").sample(n, generator=gen(8)), expected)


def test_moons_mean_and_covariance_match_closed_form():
    x = get_dataset("moons").sample(N_BIG, generator=gen(5), dtype=torch.float64)
    mean, cov = _moons_moments()
    n = x.shape[0]
    se = torch.sqrt(torch.diagonal(cov) / n)
    assert ((x.mean(0) - mean).abs() < 6 * se).all()
    emp = torch.cov(x.T)
    # sampling error of each entry is ~0.02 here; the noise alone contributes 0.36 to the diagonal
    assert torch.allclose(emp, cov, atol=0.08)


# --------------------------------------------------------------------------- checkerboard / circles / spirals


def test_checkerboard_on_black_squares_and_uniform():
    x = get_dataset("checkerboard").sample(80_000, generator=gen(6), dtype=torch.float64)
    assert (x >= -4).all() and (x <= 4).all()
    # squares of side 2 on [-4, 4]^2: every point is on a square with even (i + j)
    i = torch.floor(x[:, 0] / 2).long()
    j = torch.floor(x[:, 1] / 2).long()
    assert ((i + j) % 2 == 0).all()
    # 8 black squares, equally populated
    cell = (i + 2) * 4 + (j + 2)
    counts = torch.bincount(cell, minlength=16).double()
    used = counts[counts > 0]
    assert used.numel() == 8
    n = x.shape[0]
    assert (used - n / 8).abs().max() < 6 * math.sqrt(n / 8)
    # uniform inside a square: x mod 2 has mean 1
    assert torch.remainder(x, 2).mean().item() == pytest.approx(1.0, abs=0.02)


def test_circles_two_radii_equal_weight():
    x = get_dataset("circles").sample(40_000, generator=gen(9), dtype=torch.float64)
    r = x.norm(dim=1)
    inner = r < 2.25
    frac = inner.double().mean().item()
    assert frac == pytest.approx(0.5, abs=0.02)
    assert r[inner].mean().item() == pytest.approx(1.5, abs=0.1)
    assert r[~inner].mean().item() == pytest.approx(3.0, abs=0.1)
    assert x.mean(0).abs().max().item() < 0.05


def test_spirals_point_symmetric_and_bounded():
    x = get_dataset("spirals").sample(40_000, generator=gen(10), dtype=torch.float64)
    # the two arms are mirror images through the origin (sign flip with prob 1/2), so the mean is ~0
    assert x.mean(0).abs().max().item() < 0.1
    assert x.abs().max().item() < 6.0


def test_8gaussians_log_prob_is_the_mixture_density():
    from flowmatch.data.toy import EightGaussians

    d = EightGaussians()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=g, dtype=torch.float64) * 4
    mix = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.full((8,), 1 / 8, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(d.centers(dtype=torch.float64),
                                                                   torch.full((8, 2), d.std, dtype=torch.float64)), 1))
    assert torch.allclose(d.log_prob(x), mix.log_prob(x), atol=1e-10)
    # integrates to 1 on a fine grid (the density is well inside [-8, 8]^2)
    s = torch.linspace(-8, 8, 401, dtype=torch.float64)
    pts = torch.cartesian_prod(s, s)
    assert float(d.log_prob(pts).exp().sum() * (s[1] - s[0]) ** 2) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="8gaussians"):
        d.log_prob(torch.zeros(3, 3))


# --------------------------------------------------------------------------- gaussian of an image shape


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 4, 5), [2, 3]])
def test_gaussian_with_shape_draws_standard_normal_of_that_shape(shape):
    ds = get_dataset("gaussian", shape=shape)
    d = math.prod(shape)
    assert ds.dim == d and ds.shape == tuple(shape)
    x = ds.sample(4000, generator=gen(2), dtype=torch.float64)
    assert x.shape == (4000, *shape)
    flat = x.reshape(4000, d)
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / math.sqrt(n)
    assert flat.var().item() == pytest.approx(1.0, abs=6 * math.sqrt(2 / n))
    # the shape only arranges the stream: the same seed gives the flat draw, reshaped
    assert torch.equal(x.reshape(4000, d), get_dataset("gaussian", dim=d).sample(4000, generator=gen(2),
                                                                                  dtype=torch.float64))


def test_gaussian_with_shape_log_prob_is_the_closed_form():
    ds = get_dataset("gaussian", dim=5, shape=(2, 3, 3))  # the shape decides dim
    assert ds.dim == 18
    x = torch.randn(7, 2, 3, 3, generator=gen(1), dtype=torch.float64) * 1.7
    # log N(x; 0, I) = sum over all 18 coordinates of -x^2/2 - log(2 pi)/2
    expected = (-0.5 * x ** 2 - 0.5 * math.log(2 * math.pi)).sum(dim=(1, 2, 3))
    assert torch.allclose(ds.log_prob(x), expected, atol=1e-12)
    with pytest.raises(ValueError):
        ds.log_prob(torch.zeros(7, 2, 3))


@pytest.mark.parametrize("shape", [(), (0, 3), (-1,), (2.5, 2), "abc"])
def test_gaussian_refuses_a_bad_shape(shape):
    with pytest.raises(ConfigError):
        get_dataset("gaussian", shape=shape)


@pytest.mark.parametrize("name", sorted(n for n in DATASETS if n != "gaussian"))
def test_only_gaussian_takes_a_shape(name):
    with pytest.raises(ConfigError, match="shape"):
        get_dataset(name, shape=(1, 8, 8))


def test_upper_moon_is_the_upper_moon_of_moons():
    """theta ~ U[0, pi]: E[(cos, sin)] = (0, 2 / pi), so the mean is (-1, 6 / pi - 1); the same noise."""
    x = get_dataset("upper_moon").sample(200_000, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([-1.0, 6 / math.pi - 1])
    assert torch.allclose(x.mean(0), mean, atol=0.01)
    # Var[3 cos theta] = 4.5, plus the noise's (3 * 0.2)^2 = 0.36
    assert x[:, 0].var().item() == pytest.approx(4.5 + 0.36, rel=0.02)
