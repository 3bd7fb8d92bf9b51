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


# --------------------------------------------------------------------------- evaluation references (exact split)

MIXTURES = {"moons": 2, "8gaussians": 8, "circles": 2, "spirals": 2}  # name -> number of equal-weight components


def _component(name: str, x: torch.Tensor) -> torch.Tensor:
    """``[n]`` component of each point, read off the geometry (not from the sampler)."""
    if name == "8gaussians":
        return torch.cdist(x.double(), _eight_centres()).argmin(dim=1)
    if name == "circles":
        return (x.double().norm(dim=1) < 2.25).long()  # 1: inner circle (radius 1.5), 0: outer (3)
    raise AssertionError(name)


@pytest.mark.parametrize("n", [8, 13, 61])
def test_8gaussians_reference_puts_n_over_8_on_each_centre_the_rest_on_the_first(n):
    # row i around centre i mod 8 (read off the geometry: noise sd 0.56 against 1.9 to the
    # nearest other centre's half-way line), so n // 8 per centre and one more on centres < n mod 8
    x = get_dataset("8gaussians").reference(n, generator=gen(11), dtype=torch.float64)
    assert x.shape == (n, 2)
    comp = _component("8gaussians", x)
    assert torch.equal(comp, torch.arange(n) % 8)
    assert torch.equal(torch.bincount(comp, minlength=8), torch.tensor([n // 8 + (k < n % 8) for k in range(8)]))


def test_8gaussians_reference_is_the_centres_plus_noise_on_the_generators_stream():
    # the reference draws only the noise: centre i mod 8, plus std * randn, bit for bit
    n = 29
    noise = torch.randn(n, 2, generator=gen(12))
    k = (torch.arange(n) % 8).float() * (math.pi / 4)
    centres = 5.0 * torch.stack([torch.cos(k), torch.sin(k)], dim=1)
    expected = centres + 0.1 ** 0.25 * noise
    assert torch.equal(get_dataset("8gaussians").reference(n, generator=gen(12)), expected)


@pytest.mark.crosspath
@pytest.mark.parametrize("n", [300, 301])
def test_moons_reference_is_the_two_moons_formula_with_even_rows_on_the_lower_moon(n):
    # the same stream as ``sample`` less the moon choice: angle, then noise; row i on the lower moon
    # when i is even, so n // 2 upper and n - n // 2 lower (scikit-learn's split); bit for bit as
    # in test_moons_draws_are_the_two_moons_formula_on_the_generators_stream
    g = gen(8)
    theta = math.pi * torch.rand(n, generator=g)
    noise = torch.randn(n, 2, generator=g)
    lower = torch.arange(n) % 2 == 0
    up = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    lo = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    expected = (torch.where(lower[:, None], lo, up) + 0.2 * noise) * 3 - 1
    assert torch.equal(get_dataset("moons").reference(n, generator=gen(8)), expected)


def test_circles_reference_splits_the_two_circles_exactly():
    n = 2001
    x = get_dataset("circles").reference(n, generator=gen(13), dtype=torch.float64)
    inner = _component("circles", x)  # noise 0.24 against radii 1.5 apart: no point crosses 2.25
    assert torch.equal(inner, (torch.arange(n) % 2 == 0).long())  # even rows: the inner circle
    assert int(inner.sum()) == n - n // 2


@pytest.mark.crosspath
def test_spirals_reference_is_the_spirals_formula_with_even_rows_mirrored():
    n = 101
    g = gen(14)
    r = torch.sqrt(torch.rand(n, generator=g)) * (540 * 2 * math.pi / 360)
    dx = -torch.cos(r) * r + torch.rand(n, generator=g) * 0.5
    dy = torch.sin(r) * r + torch.rand(n, generator=g) * 0.5
    noise = torch.randn(n, 2, generator=g)
    sign = torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0)
    expected = torch.stack([dx, dy], dim=1) * sign[:, None] / 3 + 0.1 * noise
    assert torch.equal(get_dataset("spirals").reference(n, generator=gen(14)), expected)


@pytest.mark.parametrize("name", ["8gaussians", "circles"])
def test_every_prefix_of_a_reference_is_an_exact_split(name):
    # the scorers score smaller rows on prefixes ref[:m]: each prefix holds floor(m / K) or one more
    # point per component (moons and spirals: the bit-for-bit tests above fix row i's component)
    k = MIXTURES[name]
    comp = _component(name, get_dataset(name).reference(64, generator=gen(15), dtype=torch.float64))
    for m in range(1, 65):
        counts = torch.bincount(comp[:m], minlength=k)
        assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == m


@pytest.mark.parametrize("name", ["gaussian", "upper_moon", "checkerboard"])
def test_reference_of_a_distribution_without_components_is_sample(name):
    ds = get_dataset(name)
    assert torch.equal(ds.reference(50, generator=gen(16)), ds.sample(50, generator=gen(16)))


@pytest.mark.parametrize("name", sorted(MIXTURES))
def test_reference_differs_from_sample_only_in_the_split(name):
    ds = get_dataset(name)
    r = ds.reference(50, generator=gen(17))
    assert not torch.equal(r, ds.sample(50, generator=gen(17)))
    assert torch.equal(r, ds.reference(50, generator=gen(17)))  # deterministic given the seed
    with pytest.raises(ValueError, match="generator"):
        ds.reference(5, generator=gen(0), device="meta")


def test_moons_reference_has_the_closed_form_moments():
    # the exact split leaves the law of each point's moon a fair coin: same mean and covariance
    x = get_dataset("moons").reference(N_BIG, generator=gen(18), dtype=torch.float64)
    mean, cov = _moons_moments()
    se = torch.sqrt(torch.diagonal(cov) / N_BIG)
    assert ((x.mean(0) - mean).abs() < 6 * se).all()
    assert torch.allclose(torch.cov(x.T), cov, atol=0.08)


def test_8gaussians_reference_has_the_closed_form_moments():
    x = get_dataset("8gaussians").reference(N_BIG, generator=gen(19), dtype=torch.float64)
    second = 12.5 + math.sqrt(0.1)
    assert x.mean(0).abs().max() < 6 * math.sqrt(math.sqrt(0.1) / N_BIG)  # exact split: only the noise varies the mean
    m2 = (x.T @ x) / N_BIG
    assert m2[0, 0].item() == pytest.approx(second, rel=0.01) and m2[1, 1].item() == pytest.approx(second, rel=0.01)


@pytest.mark.crosspath
def test_8gaussians_circles_spirals_training_draws_keep_their_stream():
    # ``sample`` (training data) is unchanged by the references: each old formula written out here
    n = 257
    g = gen(20)
    idx = torch.randint(0, 8, (n,), generator=g)
    noise = torch.randn(n, 2, generator=g)
    k = torch.arange(8).float() * (math.pi / 4)
    expected = (5.0 * torch.stack([torch.cos(k), torch.sin(k)], dim=1))[idx] + 0.1 ** 0.25 * noise
    assert torch.equal(get_dataset("8gaussians").sample(n, generator=gen(20)), expected)

    g = gen(21)
    theta = 2 * math.pi * torch.rand(n, generator=g)
    inner = torch.rand(n, generator=g) < 0.5
    noise = torch.randn(n, 2, generator=g)
    radius = torch.where(inner, 0.5, 1.0)
    expected = (radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1) + 0.08 * noise) * 3
    assert torch.equal(get_dataset("circles").sample(n, generator=gen(21)), expected)

    g = gen(22)
    r = torch.sqrt(torch.rand(n, generator=g)) * (540 * 2 * math.pi / 360)
    dx = -torch.cos(r) * r + torch.rand(n, generator=g) * 0.5
    dy = torch.sin(r) * r + torch.rand(n, generator=g) * 0.5
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    noise = torch.randn(n, 2, generator=g)
    expected = torch.stack([dx, dy], dim=1) * sign[:, None] / 3 + 0.1 * noise
    assert torch.equal(get_dataset("spirals").sample(n, generator=gen(22)), expected)


# --------------------------------------------------------------------------- quasi-random draws


def _one_per_cell(u: torch.Tensor) -> bool:
    """Whether the ``n`` values ``u`` in (0, 1) put exactly one point in each cell ``[i / n, (i + 1) / n)``."""
    n = len(u)
    return torch.equal(torch.sort((u * n).floor().long()).values, torch.arange(n))


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


@pytest.mark.parametrize("n", [1024, 4096])
def test_gaussian_quasi_draw_stratifies_every_coordinate(n):
    # a scrambled Sobol draw of n = 2^m points is a (t, m, 2)-net: each coordinate's normal CDF puts one
    # point in each of n equal-probability cells, which an i.i.d. draw does with probability ~ n! / n^n
    z = get_dataset("gaussian").quasi(n, seed=3, dtype=torch.float64)
    assert z.shape == (n, 2) and z.dtype == torch.float64
    assert all(_one_per_cell(_normal_cdf(z[:, j])) for j in range(2))
    assert z.mean(0).abs().max() < 0.5 / n ** 0.5  # an i.i.d. mean's standard error is 1 / sqrt(n)
    assert torch.equal(z, get_dataset("gaussian").quasi(n, seed=3, dtype=torch.float64))  # fixed by the seed
    assert not torch.equal(z, get_dataset("gaussian").quasi(n, seed=4, dtype=torch.float64))


def test_gaussian_quasi_draw_has_the_source_shape():
    z = get_dataset("gaussian", shape=(1, 4, 4)).quasi(64, seed=0)
    assert z.shape == (64, 1, 4, 4) and z.dtype == torch.float32 and torch.isfinite(z).all()
    assert _one_per_cell(_normal_cdf(z.reshape(64, 16)[:, 15].double()))


def test_8gaussians_quasi_draw_splits_exactly_and_stratifies_each_component():
    n = 8 * 256
    ds = get_dataset("8gaussians")
    x = ds.quasi(n, seed=5, dtype=torch.float64)
    # row i around centre i mod 8, as the reference's: each component's rows, less their centre, are a net
    # of their own (a row placed around another centre would fall outside every cell's count)
    for c in range(8):
        z = (x[c::8] - _eight_centres()[c]) / 0.1 ** 0.25
        assert all(_one_per_cell(_normal_cdf(z[:, j])) for j in range(2))
    assert (_component("8gaussians", x) == torch.arange(n) % 8).double().mean() > 0.99


def test_moons_quasi_draw_is_the_moons_formula_on_sobol_points():
    n = 2 * 128
    x = get_dataset("moons").quasi(n, seed=6, dtype=torch.float64)
    expected = torch.empty(n, 2, dtype=torch.float64)
    for c in range(2):  # even rows: the lower moon, from the engine of seed 64 * 6 + c
        u = torch.quasirandom.SobolEngine(3, scramble=True, seed=64 * 6 + c).draw(n // 2, dtype=torch.float64)
        theta, noise = math.pi * u[:, 0], math.sqrt(2) * torch.erfinv(2 * u[:, 1:] - 1)
        up = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
        moon = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1) if c == 0 else up
        expected[c::2] = (moon + 0.2 * noise) * 3 - 1
    assert torch.allclose(x, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["upper_moon", "checkerboard", "spirals", "circles"])
def test_quasi_draw_of_a_distribution_without_one_is_refused(name):
    ds = get_dataset(name)
    assert not ds.has_quasi
    with pytest.raises(ConfigError, match=f"dataset '{name}' has no quasi-random draw"):
        ds.quasi(8, seed=0)
    assert all(get_dataset(k).has_quasi for k in ("gaussian", "8gaussians", "moons"))


def test_quasi_draws_of_neighbouring_seeds_share_no_engine():
    # a source draw of seed s and a reference of seed s + 1 (the validation's): engines of one seed
    # scramble alike in their common dimensions, so a shared engine would align the two sets
    a = get_dataset("8gaussians").quasi(64, seed=10, dtype=torch.float64)
    b = get_dataset("moons").quasi(64, seed=11, dtype=torch.float64)
    u = torch.quasirandom.SobolEngine(2, scramble=True, seed=64 * 11).draw(8, dtype=torch.float64)
    assert not torch.allclose(_normal_cdf((a[1::8] - _eight_centres()[1]) / 0.1 ** 0.25), u)
    lower = torch.quasirandom.SobolEngine(3, scramble=True, seed=64 * 11).draw(32, dtype=torch.float64)
    assert torch.allclose(b[0::2, 0], (1 - torch.cos(math.pi * lower[:, 0]) + 0.2 * math.sqrt(2)
                                       * torch.erfinv(2 * lower[:, 1] - 1)) * 3 - 1, atol=1e-12)


# ----------------------------------------------------------------- draws at layout positions (quantiles)

def test_8gaussians_at_quantiles_puts_each_point_in_mode_floor_8u():
    ds = get_dataset("8gaussians")
    u = torch.tensor([0.0, 0.124, 0.125, 0.5, 0.874, 0.999, 1.0], dtype=torch.float64)
    x = ds.at_quantiles(u.repeat(4000), generator=gen(1), dtype=torch.float64)
    modes = torch.tensor([0, 0, 1, 4, 6, 7, 7]).repeat(4000)
    offsets = x - _eight_centres().to(torch.float64)[modes]
    # each point is its mode's centre plus N(0, std^2 I): mean 0, std 0.1 ** 0.25 per coordinate (28,000 draws)
    assert offsets.mean(0).abs().max() < 4 * 0.1 ** 0.25 / math.sqrt(len(x))
    assert offsets.std(0).sub(0.1 ** 0.25).abs().max() < 0.02
    # the mode's centre sits at the middle of its position range [k pi/4, (k+1) pi/4)
    assert torch.allclose(ds.position(_eight_centres().to(torch.float64)),
                          math.pi / 8 + math.pi / 4 * torch.arange(8, dtype=torch.float64), atol=1e-12)


def test_noise_free_moons_positions_invert_their_quantiles():
    ds = get_dataset("moons")
    ds.noise = 0.0  # on this instance: the points lie on the moons
    u = torch.rand(5000, generator=gen(2), dtype=torch.float64)
    pos = ds.position(ds.at_quantiles(u, generator=gen(3), dtype=torch.float64))
    # the upper moon's angle 2 pi u for u < 1/2, then 2 pi + the lower moon's angle pi (2u - 1)
    assert torch.allclose(pos, torch.where(u < 0.5, 2 * math.pi * u, math.pi * (2 * u + 1)), atol=1e-9)


@pytest.mark.parametrize("name", ["8gaussians", "moons"])
def test_draws_at_uniform_quantiles_are_the_distributions_draws(name):
    # u i.i.d. uniform: the same law as sample's (moments and the positions' spread against each other)
    ds = get_dataset(name)
    a = ds.at_quantiles(torch.rand(N_BIG, generator=gen(4), dtype=torch.float64), generator=gen(5),
                        dtype=torch.float64)
    b = ds.sample(N_BIG, generator=gen(6), dtype=torch.float64)
    se = (a.var(0) / N_BIG + b.var(0) / N_BIG).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 4 * se).all()
    assert torch.allclose(a.std(0), b.std(0), rtol=0.01)
    # the positions' CDFs at a grid of points agree within 4 standard errors (0.0016 each at 200,000 a side)
    grid = torch.linspace(0.5, 9.0, 18, dtype=torch.float64)[:, None]
    assert torch.allclose((ds.position(a) < grid).double().mean(1), (ds.position(b) < grid).double().mean(1),
                          atol=4 * math.sqrt(0.5 / N_BIG), rtol=0)


@pytest.mark.parametrize("name", ["gaussian", "upper_moon", "checkerboard", "spirals", "circles"])
def test_positions_of_a_distribution_without_a_layout_are_refused(name):
    ds = get_dataset(name)
    assert not ds.has_positions
    with pytest.raises(ConfigError, match=f"dataset '{name}' has no layout positions"):
        ds.position(torch.zeros(3, 2))
    with pytest.raises(ConfigError, match=f"dataset '{name}' has no layout positions"):
        ds.at_quantiles(torch.zeros(3))


def test_quantiles_outside_0_1_or_of_another_shape_are_refused():
    ds = get_dataset("moons")
    with pytest.raises(ValueError, match=r"moons quantiles need a 1-D tensor of values in \[0, 1\], got shape \(2,\)"):
        ds.at_quantiles(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"got shape \(2, 1\)"):
        ds.at_quantiles(torch.full((2, 1), 0.5))
    with pytest.raises(ValueError, match=r"8gaussians positions need x of shape \[n, 2\], got \(4,\)"):
        get_dataset("8gaussians").position(torch.zeros(4))
