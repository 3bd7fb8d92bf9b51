"""W2, MMD and straightness against closed forms written here."""

from __future__ import annotations

import math

import pytest
import torch

from flowmatch.metrics import DEFAULT_BANDWIDTHS, StraightnessResult, gaussian_w2, mmd, straightness, w2

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def closed_form_w2(m1, s1, m2, s2) -> float:
    """W2(N(m1, s1^2 I), N(m2, s2^2 I)) = sqrt(|m1 - m2|^2 + d (s1 - s2)^2)."""
    d = len(m1)
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(m1, m2)) + d * (s1 - s2) ** 2)


def closed_form_mmd2(delta2: float, s: float, d: int, bandwidths=DEFAULT_BANDWIDTHS) -> float:
    """MMD^2 between N(m1, s^2 I) and N(m2, s^2 I) (|m1 - m2|^2 = delta2) for k = sum_b exp(-|x-y|^2 / 2b^2).

    With z = x - y ~ N(mu, 2 s^2 I): E exp(-|z|^2 / 2b^2) = (b^2 / (b^2 + 2s^2))^(d/2) exp(-|mu|^2 / (2 (b^2 + 2s^2))).
    MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y), where the first two have mu = 0.
    """
    total = 0.0
    for b in bandwidths:
        v = b * b + 2 * s * s
        total += 2 * (b * b / v) ** (d / 2) * (1 - math.exp(-delta2 / (2 * v)))
    return total


# ----------------------------------------------------------------------------------------------- W2

def test_w2_gaussians_match_closed_form():
    n, d = 500, 2
    m1, s1, m2, s2 = (3.0, 0.0), 1.0, (0.0, -1.0), 2.0
    g = gen(0)
    draw = lambda m, s: torch.tensor(m, dtype=F64) + s * torch.randn(n, d, generator=g, dtype=F64)  # noqa: E731
    x, y = draw(m1, s1), draw(m2, s2)
    x2, y2 = draw(m1, s1), draw(m2, s2)
    truth = closed_form_w2(m1, s1, m2, s2)
    # Tolerance: |W2(x_n, y_n) - W2(mu, nu)| <= W2(x_n, mu) + W2(y_n, nu) (triangle inequality), and
    # E W2^2(x_n, mu) <= E W2^2(x_n, x'_n) (joint convexity of W2^2, mu being the mean of the empirical x'_n),
    # so the two-sample "floors" W2(x_n, x'_n) + W2(y_n, y'_n), measured on the same n, bound the sampling error.
    tol = w2(x, x2) + w2(y, y2)
    assert tol < 0.5 * truth  # the test still has teeth: the tolerance is well below the value
    assert abs(w2(x, y) - truth) <= tol
    assert gaussian_w2(torch.tensor(m1), s1, torch.tensor(m2), s2) == pytest.approx(truth, rel=1e-12)


def test_w2_closed_form_helper_in_higher_dimension():
    m1, m2 = torch.zeros(5), torch.ones(5)
    assert gaussian_w2(m1, 0.5, m2, 1.5) == pytest.approx(math.sqrt(5 + 5 * 1.0), rel=1e-12)


def test_w2_with_itself_is_zero():
    # W2 is a square root: a squared-distance rounding error of ~1e-16 (torch.cdist's matmul form)
    # shows up as ~1e-8, so the check is on W2^2.
    x = torch.randn(300, 2, generator=gen(1), dtype=F64)
    assert w2(x, x) ** 2 == pytest.approx(0.0, abs=1e-12)
    assert w2(x, x[torch.randperm(300, generator=gen(2))]) ** 2 == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("method", ["pot", "scipy"])
def test_w2_of_shifted_cloud_is_the_shift(method):
    # For y = x + s, sum_i s . (x_i - x_pi(i)) = 0 over any permutation, so the cost of pi is
    # sum |x_i - x_pi(i)|^2 + n |s|^2, minimised by the identity: W2 = |s| exactly.
    x = torch.randn(200, 3, generator=gen(3), dtype=F64)
    s = torch.tensor([0.7, -1.2, 2.0], dtype=F64)
    y = (x + s)[torch.randperm(200, generator=gen(4))]
    assert w2(x, y, method=method) == pytest.approx(float(s.norm()), rel=1e-9)


def test_w2_is_homogeneous_and_symmetric():
    x = torch.randn(150, 2, generator=gen(5), dtype=F64)
    y = torch.rand(150, 2, generator=gen(6), dtype=F64) * 4
    base = w2(x, y)
    assert w2(y, x) == pytest.approx(base, rel=1e-9)
    assert w2(3 * x, 3 * y) == pytest.approx(3 * base, rel=1e-9)


def test_w2_pot_and_scipy_agree():
    pytest.importorskip("ot")
    x = torch.randn(200, 2, generator=gen(7))
    y = torch.randn(200, 2, generator=gen(8)) * 2 + 1
    assert w2(x, y, method="pot") == pytest.approx(w2(x, y, method="scipy"), rel=1e-9)
    assert w2(x, y) == pytest.approx(w2(x, y, method="scipy"), rel=1e-9)


def test_w2_flattens_image_shaped_clouds():
    x = torch.randn(50, 2, 3, generator=gen(9), dtype=F64)
    y = torch.randn(50, 2, 3, generator=gen(10), dtype=F64)
    assert w2(x, y) == pytest.approx(w2(x.reshape(50, 6), y.reshape(50, 6)), rel=1e-12)


def test_w2_errors():
    with pytest.raises(ValueError, match="same shape"):
        w2(torch.zeros(5, 2), torch.zeros(6, 2))
    with pytest.raises(ValueError, match="method"):
        w2(torch.zeros(5, 2), torch.zeros(5, 2), method="sinkhorn")


# ---------------------------------------------------------------------------------------------- MMD

def _replicates(shift: float, reps: int = 8, n: int = 300, seed: int = 100) -> torch.Tensor:
    vals = []
    g = gen(seed)
    s = torch.tensor([shift, 0.0], dtype=F64)
    for _ in range(reps):
        x = torch.randn(n, 2, generator=g, dtype=F64)
        y = torch.randn(n, 2, generator=g, dtype=F64) + s
        vals.append(mmd(x, y))
    return torch.tensor(vals, dtype=F64)


@pytest.mark.parametrize("shift", [0.0, 1.5])
def test_mmd_is_unbiased_for_the_closed_form(shift):
    # The U-statistic is unbiased, so the mean of independent replicates must lie within a few
    # standard errors (estimated from the replicates themselves) of the closed form. Under shift 0 the
    # estimate's distribution is skewed (a degenerate U-statistic), so enough replicates are used for
    # the mean to be close to normal.
    vals = _replicates(shift, reps=32)
    truth = closed_form_mmd2(shift ** 2, 1.0, 2)
    se = float(vals.std()) / math.sqrt(len(vals))
    assert abs(float(vals.mean()) - truth) <= 4 * se + 1e-12


def test_mmd_near_zero_for_same_distribution_and_clearly_positive_for_shifted():
    same = _replicates(0.0, reps=4, seed=1)
    shifted = _replicates(1.5, reps=4, seed=2)
    assert float(shifted.min()) > 10 * float(same.abs().max())
    assert float(shifted.min()) > 0.5 * closed_form_mmd2(1.5 ** 2, 1.0, 2)


def test_mmd_symmetry_and_self_distance():
    x = torch.randn(200, 2, generator=gen(11), dtype=F64)
    y = torch.randn(120, 2, generator=gen(12), dtype=F64) + 0.5
    assert mmd(x, y) == pytest.approx(mmd(y, x), rel=1e-12)
    # mmd(x, x) = 2/(n-1) (S/n^2 - K) with S the kernel sum and K = k(x, x) = number of bandwidths:
    # never positive and at most 2K/(n-1) in size.
    n, K = x.shape[0], len(DEFAULT_BANDWIDTHS)
    self_mmd = mmd(x, x)
    assert -2 * K / (n - 1) <= self_mmd <= 0.0


@pytest.mark.parametrize("block", [1, 7 * 53, 10 ** 6])  # a row a block, uneven blocks, one block
def test_mmd_by_blocks_equals_the_double_sum_over_pairs(monkeypatch, block):
    import flowmatch.metrics.distances as distances

    monkeypatch.setattr(distances, "_BLOCK_ENTRIES", block)
    x = torch.randn(41, 2, generator=gen(21), dtype=F64)
    y = torch.randn(53, 2, generator=gen(22), dtype=F64) + 0.4

    def k(p, q):  # the kernel of each pair, one pair at a time
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * s * s)) for a in p for b in q for s in DEFAULT_BANDWIDTHS)

    def k_off(p):  # pairs i != j
        return sum(math.exp(-float(((p[i] - p[j]) ** 2).sum()) / (2 * s * s))
                   for i in range(len(p)) for j in range(len(p)) if i != j for s in DEFAULT_BANDWIDTHS)

    n, m = len(x), len(y)
    truth = k_off(x) / (n * (n - 1)) + k_off(y) / (m * (m - 1)) - 2 * k(x, y) / (n * m)
    assert mmd(x, y) == pytest.approx(truth, rel=1e-10, abs=1e-14)
    assert distances.MMDReference(y)(x) == pytest.approx(truth, rel=1e-10, abs=1e-14)


def test_mmd_needs_two_points():
    with pytest.raises(ValueError):
        mmd(torch.zeros(1, 2), torch.zeros(5, 2))


# -------------------------------------------------------------------------------------- straightness

def test_straightness_zero_for_constant_field():
    c = torch.tensor([1.5, -0.5], dtype=F64)
    x0 = torch.randn(64, 2, generator=gen(13), dtype=F64)
    res = straightness(lambda x, t: c.expand_as(x), x0, solver="rk4", num_steps=16)
    assert isinstance(res, StraightnessResult)
    assert abs(res.straightness) < 1e-10 and abs(res.straightness_per_dim) < 1e-10
    assert 0.0 <= res.straightness_rel < 1e-10
    assert len(res.per_t) == len(res.ts) == 17


@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_straightness_zero_for_straight_non_constant_field(solver):
    # Target x1 = a x0 + b, paired deterministically: x_t = (1 + t(a - 1)) x0 + t b, so
    # v(x, t) = (a - 1) x0(x, t) + b with x0(x, t) = (x - t b) / (1 + t (a - 1)). Every
    # trajectory is a straight line at constant speed, though v changes over space and time.
    a, b = 0.5, torch.tensor([1.0, -2.0], dtype=F64)

    def v(x, t):
        tb = t[:, None]
        return (a - 1) * (x - tb * b) / (1 + tb * (a - 1)) + b

    x0 = torch.randn(64, 2, generator=gen(14), dtype=F64)
    res = straightness(v, x0, solver=solver, num_steps=10)
    assert abs(res.straightness) < 1e-10
    assert res.straightness_rel < 1e-10
    assert res.num_steps == 10 and res.solver == solver and res.n == 64


def test_straightness_of_rotation_matches_closed_form():
    # v(x, t) = (-x2, x1): Z_t = e^{it} Z_0 (complex notation). With a = e^i - 1 = Z_1 - Z_0 per unit
    # |Z_0|, the integrand is |Z_0|^2 |a - i e^{it}|^2 and int_0^1 i e^{it} dt = a, so
    # S = E|Z_0|^2 (1 - |a|^2) = E|Z_0|^2 (2 cos 1 - 1), and S / E|Z_1 - Z_0|^2 = (2 cos 1 - 1) / (2 - 2 cos 1).
    x0 = torch.randn(128, 2, generator=gen(15), dtype=F64)
    K = 40
    res = straightness(lambda x, t: torch.stack([-x[:, 1], x[:, 0]], dim=1), x0, solver="rk4", num_steps=K)
    m2 = float(x0.pow(2).sum(dim=1).mean())
    abs_a = math.sqrt(2 - 2 * math.cos(1.0))
    expected = m2 * (2 * math.cos(1.0) - 1)
    # trapezoid error <= h^2/12 max|f''| with f'' bounded by 2|a| E|Z_0|^2; RK4's own error is far smaller
    tol = 1.5 * (1.0 / K) ** 2 / 12 * 2 * abs_a * m2
    assert res.straightness == pytest.approx(expected, abs=tol)
    assert res.straightness > 0.5 * expected  # clearly non-zero
    assert res.straightness_per_dim == pytest.approx(res.straightness / 2, rel=1e-12)
    assert res.straightness_rel == pytest.approx((2 * math.cos(1.0) - 1) / (2 - 2 * math.cos(1.0)), abs=tol / m2 * 2)
    for t, f in zip(res.ts, res.per_t):
        # |a - i e^{it}|^2 = |a|^2 + 1 - 2 Re(conj(a) i e^{it})
        ac = complex(math.cos(1.0) - 1, math.sin(1.0))
        expected_t = m2 * abs(ac - 1j * complex(math.cos(t), math.sin(t))) ** 2
        assert f == pytest.approx(expected_t, rel=1e-6)
    assert res.nfe == 4 * K + (K + 1)  # RK4 solve plus one evaluation per grid point


@pytest.mark.parametrize("d", [1, 3])
def test_straightness_rel_and_per_dim(d):
    x0 = torch.randn(32, d, generator=gen(16), dtype=F64)
    res = straightness(lambda x, t: torch.sin(3 * x) * (1 + t[:, None]), x0, solver="heun", num_steps=8)
    assert res.straightness >= 0 and 0 <= res.straightness_rel < math.inf
    assert res.straightness_per_dim == pytest.approx(res.straightness / d, rel=1e-12)
    assert res.to_dict()["straightness"] == res.straightness


def test_straightness_refuses_adaptive_solver():
    with pytest.raises(ValueError, match="fixed-step"):
        straightness(lambda x, t: x, torch.zeros(4, 2), solver="dopri5")


# --------------------------------------------------------------------------- the coupled noise floor

def _eight_with_mode_0_doubled(n: int, g: torch.Generator) -> torch.Tensor:
    """A biased "model" of 8gaussians: mode 0 twice as likely as each other mode (2/9 against 1/9)."""
    from flowmatch.data import get_dataset

    ds = get_dataset("8gaussians")
    probs = torch.tensor([2.0] + [1.0] * 7) / 9
    modes = torch.multinomial(probs, n, replacement=True, generator=g)
    return ds.centers(dtype=F64)[modes] + ds.std * torch.randn(n, 2, generator=g, dtype=F64)


def test_a_coupled_floor_draws_the_target_not_the_models_mode_weights():
    from flowmatch.data import get_dataset
    from flowmatch.metrics.floor import CoupledFloor

    ds = get_dataset("8gaussians")
    floor = CoupledFloor(ds, _eight_with_mode_0_doubled(200_000, gen(0)))
    samples = _eight_with_mode_0_doubled(40_000, gen(1))
    u = floor.quantiles(samples)
    # the model's quantiles are uniform (its own fit draw's CDF): within 4 standard errors of each eighth
    share_u = torch.bincount((u * 8).long().clamp(0, 7), minlength=8).double() / len(u)
    se = math.sqrt((1 / 8) * (7 / 8) / len(u))
    assert (share_u - 1 / 8).abs().max() < 4 * se
    # so the floor's modes are equally likely, while the model's mode 0 holds 2/9
    draw = floor.draw(samples, generator=gen(2))
    modes = torch.cdist(draw, ds.centers(dtype=F64)).argmin(1)
    share = torch.bincount(modes, minlength=8).double() / len(modes)
    assert (share - 1 / 8).abs().max() < 4 * se
    assert torch.cdist(samples, ds.centers(dtype=F64)).argmin(1).eq(0).double().mean() > 0.2
    assert draw.dtype == samples.dtype and draw.shape == samples.shape


def test_a_coupled_floor_of_a_perfect_model_keeps_its_split_and_pairs_its_scatter():
    from flowmatch.data import get_dataset
    from flowmatch.metrics.floor import CoupledFloor

    ds = get_dataset("8gaussians")
    floor = CoupledFloor(ds, ds.sample(100_000, generator=gen(3), dtype=F64))
    x = ds.sample(5000, generator=gen(4), dtype=F64)
    same = torch.cdist(floor.draw(x, generator=gen(5)), ds.centers(dtype=F64)).argmin(1) \
        == torch.cdist(x, ds.centers(dtype=F64)).argmin(1)
    assert same.double().mean() > 0.99  # a point's mode moves only where its angle crosses a bisector
    # W2 against an exact-split reference: the model minus its coupled floor scatters far less between
    # draws than the model minus an independent floor draw (both floors i.i.d. target draws)
    paired, unpaired = [], []
    for i in range(8):
        g = gen(100 + i)
        model, ref, iid = (ds.sample(400, generator=g, dtype=F64), ds.reference(400, generator=g, dtype=F64),
                           ds.sample(400, generator=g, dtype=F64))
        score = w2(model, ref)
        paired.append(score - w2(floor.draw(model, generator=g), ref))
        unpaired.append(score - w2(iid, ref))
    sd = lambda v: torch.tensor(v).std().item()  # noqa: E731
    assert sd(paired) < 0.5 * sd(unpaired)


def test_a_coupled_floor_needs_a_layout_and_fit_samples():
    from flowmatch.data import get_dataset
    from flowmatch.metrics.floor import CoupledFloor

    with pytest.raises(ValueError, match="a coupled floor needs a target with layout positions .* got 'circles'"):
        CoupledFloor(get_dataset("circles"), torch.zeros(10, 2))
    with pytest.raises(ValueError, match="at least 2 fit samples, got 1"):
        CoupledFloor(get_dataset("moons"), torch.zeros(1, 2))


def test_paired_ratio_is_the_ratio_of_means_with_its_delta_method_error():
    from flowmatch.metrics.floor import paired_ratio

    a, b = [1.1, 2.2, 2.9, 4.4], [1.0, 2.0, 3.0, 4.0]
    r, se = paired_ratio(a, b)
    assert r == pytest.approx(10.6 / 10.0)
    resid = [x - r * y for x, y in zip(a, b)]
    m = sum(resid) / 4
    assert se == pytest.approx(math.sqrt(sum((v - m) ** 2 for v in resid) / 3) / (2 * 2.5))
    assert paired_ratio([2.0, 4.0], [1.0, 2.0]) == (2.0, 0.0)  # proportional draws: no error
    with pytest.raises(ValueError, match="at least 2 draws, got 1 and 1"):
        paired_ratio([1.0], [1.0])
    with pytest.raises(ValueError, match="denominator's mean is 0"):
        paired_ratio([1.0, 2.0], [1.0, -1.0])


def test_floor_bias_script_perturbs_a_perfect_draw_and_pairs_the_variants(tmp_path):
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    from flowmatch.data import get_dataset

    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "toy", "floor_bias.py")
    spec = importlib.util.spec_from_file_location("floor_bias", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ds, n = get_dataset("8gaussians"), 4000
    g = gen(7)
    mode, noise = torch.randint(0, 8, (n,), generator=g), torch.randn(n, 2, generator=g, dtype=F64)
    r, along = torch.rand(n, generator=g, dtype=F64), 0.5 * torch.rand(n, generator=g, dtype=F64)
    side = torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0).to(F64)
    plain = mod.perturbed(ds, mode, noise, r, side, along, 1.0, 0.0)
    assert torch.allclose(plain, ds.centers(dtype=F64)[mode] + ds.std * noise)  # unperturbed
    wide = mod.perturbed(ds, mode, noise, r, side, along, 1.1, 0.0)
    assert torch.allclose(wide - plain, 0.1 * ds.std * noise)
    moved = mod.perturbed(ds, mode, noise, r, side, along, 1.0, 0.25)
    on_bridge = r < 0.25
    assert torch.equal(moved[~on_bridge], plain[~on_bridge])
    # the moved points sit on the circle of modes (within their 0.3 noise), between a mode and its neighbour
    radius = (moved[on_bridge] - 0.3 * noise[on_bridge]).norm(dim=1)
    assert torch.allclose(radius, torch.full_like(radius, 5.0))
    out = tmp_path / "bias.json"
    subprocess.run([sys.executable, script, "--draws", "2", "--n", "64", "--out", str(out)], check=True,
                   capture_output=True, timeout=120)
    res = json.loads(out.read_text())
    assert list(res["scores"]) == list(mod.VARIANTS) and all(len(v) == 2 for v in res["scores"].values())
    # --quasi: the unperturbed draw is the 8gaussians quasi draw of seed `seed` (row i in mode i mod 8)
    subprocess.run([sys.executable, script, "--quasi", "--draws", "2", "--n", "64", "--seed", "5", "--out",
                    str(tmp_path / "q.json")], check=True, capture_output=True, timeout=120)
    quasi = json.loads((tmp_path / "q.json").read_text())
    assert quasi["quasi"] and quasi["scores"]["target"][0] == pytest.approx(
        w2(ds.quasi(64, seed=5), ds.quasi(64, seed=6)), rel=1e-5)
    assert res["summary"]["target"]["minus_target"] == 0.0
    assert res["summary"]["4% on bridges"]["minus_target"] == pytest.approx(
        sum(a - b for a, b in zip(res["scores"]["4% on bridges"], res["scores"]["target"])) / 2)
