"""Couplings: minibatch OT against brute force and the independent pairing; Sinkhorn marginals."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flowmatch.couplings import (
    COUPLINGS,
    IndependentCoupling,
    MinibatchOTCoupling,
    exact_assignment,
    get_coupling,
    sinkhorn_plan,
)
from flowmatch.data import get_dataset
from flowmatch.errors import ConfigError, UnknownNameError


def _pair(s):
    """``(x0, x1)`` of a :class:`~flowmatch.couplings.CouplingSample`."""
    return s.x0, s.x1


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def mean_sq(x0: torch.Tensor, x1: torch.Tensor) -> float:
    """Mean squared distance between paired rows (flattened per sample)."""
    return ((x0 - x1).reshape(x0.shape[0], -1) ** 2).sum(dim=1).mean().item()


def batches(n=64, seed=0, d=2, dtype=torch.float64):
    g = gen(seed)
    x0 = torch.randn(n, d, generator=g, dtype=dtype)
    x1 = torch.randn(n, d, generator=g, dtype=dtype) * 0.5 + torch.tensor([3.0] + [0.0] * (d - 1), dtype=dtype)
    return x0, x1


def ot(method="exact", **kw):
    return MinibatchOTCoupling(get_dataset("gaussian"), get_dataset("8gaussians"), method=method, **kw)


def is_row_permutation(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the rows of ``a`` are the rows of ``b`` reordered (exact multiset equality)."""
    if a.shape != b.shape:
        return False
    key = lambda x: sorted(map(tuple, x.reshape(x.shape[0], -1).tolist()))  # noqa: E731
    return key(a) == key(b)


# --------------------------------------------------------------------------- registry and errors


def test_registry_and_factory():
    assert set(COUPLINGS) == {"independent", "ot"}
    src, tgt = get_dataset("gaussian"), get_dataset("moons")
    assert type(get_coupling("independent", src, tgt)) is IndependentCoupling
    c = get_coupling("ot", src, tgt, method="sinkhorn", reg=0.2, num_iters=7)
    assert isinstance(c, MinibatchOTCoupling)
    assert (c.method, c.reg, c.num_iters) == ("sinkhorn", 0.2, 7)


def test_unknown_coupling_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        get_coupling("stable", get_dataset("gaussian"), get_dataset("moons"))
    assert "stable" in str(e.value) and "independent" in str(e.value) and "ot" in str(e.value)


def test_unknown_ot_method_and_bad_reg():
    with pytest.raises(ConfigError) as e:
        get_coupling("ot", get_dataset("gaussian"), get_dataset("moons"), method="greedy")
    assert "greedy" in str(e.value) and "exact" in str(e.value) and "sinkhorn" in str(e.value)
    with pytest.raises(ConfigError):
        ot("sinkhorn", reg=0.0)
    with pytest.raises(ConfigError):
        ot("sinkhorn", reg=-1.0)


# --------------------------------------------------------------------------- independent


def test_independent_shapes_and_determinism():
    c = get_coupling("independent", get_dataset("gaussian"), get_dataset("moons"))
    x0, x1 = _pair(c.sample(50, generator=gen(1)))
    assert x0.shape == (50, 2) and x1.shape == (50, 2)
    y0, y1 = _pair(c.sample(50, generator=gen(1)))
    z0, z1 = _pair(c.sample(50, generator=gen(2)))
    assert torch.equal(x0, y0) and torch.equal(x1, y1)
    assert not torch.equal(x0, z0)
    # x0 from the source, x1 from the target: the moons batch has mean ~ (0.5, -0.25), the source ~ 0
    x0, x1 = _pair(c.sample(4000, generator=gen(3)))
    assert x0.mean(0).abs().max() < 0.1
    assert abs(x1[:, 0].mean().item() - 0.5) < 0.15


def test_independent_gaussian_any_dim():
    c = get_coupling("independent", get_dataset("gaussian", dim=5), get_dataset("gaussian", dim=5))
    x0, x1 = _pair(c.sample(8, generator=gen(0)))
    assert x0.shape == (8, 5) and x1.shape == (8, 5)


# --------------------------------------------------------------------------- exact OT


@pytest.mark.parametrize("seed", range(5))
def test_exact_brute_force_batch_of_5(seed):
    x0, x1 = batches(n=5, seed=seed)
    brute = min(mean_sq(x0, x1[list(p)]) for p in itertools.permutations(range(5)))
    _, paired = ot().pair(x0, x1)
    assert mean_sq(x0, paired) == pytest.approx(brute, rel=1e-12, abs=1e-12)
    perm = exact_assignment(x0, x1)
    assert sorted(perm.tolist()) == list(range(5))
    assert torch.equal(paired, x1[perm])


@pytest.mark.parametrize("seed", range(5))
def test_exact_never_costs_more_than_independent(seed):
    x0, x1 = batches(n=64, seed=seed)
    px0, px1 = ot().pair(x0, x1)
    assert torch.equal(px0, x0)  # x0 untouched
    assert mean_sq(px0, px1) <= mean_sq(x0, x1) + 1e-12
    # any other permutation (here: random ones) is no cheaper either
    g = gen(100 + seed)
    for _ in range(20):
        p = torch.randperm(64, generator=g)
        assert mean_sq(px0, px1) <= mean_sq(x0, x1[p]) + 1e-12


def test_exact_on_a_known_configuration():
    # x0 on a line, x1 the same points shuffled and shifted by a small offset: OT undoes the shuffle
    x0 = torch.arange(8, dtype=torch.float64)[:, None] * torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    shuffle = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    x1 = x0[shuffle] + 0.1
    _, paired = ot().pair(x0, x1)
    assert torch.allclose(paired, x0 + 0.1, atol=1e-12)


def test_exact_pairing_preserves_x1_marginal():
    x0, x1 = batches(n=40, seed=3)
    _, paired = ot().pair(x0, x1)
    assert is_row_permutation(paired, x1)


def test_exact_pairing_image_shaped():
    g = gen(4)
    x0 = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64)
    x1 = torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64)
    brute = min(mean_sq(x0, x1[list(p)]) for p in itertools.permutations(range(6)))
    _, paired = ot().pair(x0, x1)
    assert paired.shape == x1.shape
    assert mean_sq(x0, paired) == pytest.approx(brute, rel=1e-12)


def test_ot_sample_reorders_the_independent_draw():
    src, tgt = get_dataset("gaussian"), get_dataset("8gaussians")
    ind = IndependentCoupling(src, tgt)
    c = MinibatchOTCoupling(src, tgt, method="exact")
    i0, i1 = _pair(ind.sample(64, generator=gen(5)))
    o0, o1 = _pair(c.sample(64, generator=gen(5)))
    assert torch.equal(o0, i0)
    assert is_row_permutation(o1, i1)
    assert mean_sq(o0, o1) <= mean_sq(i0, i1)
    # deterministic with the seed
    p0, p1 = _pair(c.sample(64, generator=gen(5)))
    assert torch.equal(p0, o0) and torch.equal(p1, o1)


def test_ot_straightens_on_average():
    # averaged over batches, OT pairs are much closer than independent ones (8 gaussians, radius 5)
    c = ot()
    ind_cost, ot_cost = [], []
    for s in range(5):
        x0, x1 = _pair(c.draw(128, gen(s)))
        ind_cost.append(mean_sq(x0, x1))
        ot_cost.append(mean_sq(*c.pair(x0, x1)))
    assert sum(ot_cost) < 0.8 * sum(ind_cost)


# --------------------------------------------------------------------------- Sinkhorn
# Batches stay <= 40 so the [n, m] logsumexp stays single-threaded: on a busy 2-core machine OpenMP's
# parallel regions can cost milliseconds each, and Sinkhorn runs hundreds of them.


@pytest.mark.parametrize("n,m", [(16, 16), (10, 24)])
def test_sinkhorn_plan_marginals_are_uniform(n, m):
    g = gen(6)
    a = torch.randn(n, 2, generator=g, dtype=torch.float64)
    b = torch.randn(m, 2, generator=g, dtype=torch.float64) + 1
    cost = torch.cdist(a, b) ** 2
    plan = sinkhorn_plan(cost, reg=0.1, num_iters=300)
    assert plan.shape == (n, m)
    assert (plan >= 0).all()
    assert plan.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(plan.sum(1), torch.full((n,), 1 / n, dtype=torch.float64), atol=1e-3 / n)
    assert torch.allclose(plan.sum(0), torch.full((m,), 1 / m, dtype=torch.float64), atol=1e-9)


def test_sinkhorn_large_reg_tends_to_independent_plan():
    g = gen(7)
    a = torch.randn(8, 2, generator=g, dtype=torch.float64)
    b = torch.randn(8, 2, generator=g, dtype=torch.float64)
    plan = sinkhorn_plan(torch.cdist(a, b) ** 2, reg=1e4, num_iters=50)
    assert torch.allclose(plan, torch.full((8, 8), 1 / 64, dtype=torch.float64), atol=1e-5)


def test_sinkhorn_small_reg_approaches_exact_cost():
    x0, x1 = batches(n=12, seed=8)
    cost = torch.cdist(x0, x1) ** 2
    exact = mean_sq(x0, x1[exact_assignment(x0, x1)])
    independent = cost.mean().item()
    gaps = []
    for reg in [0.1, 0.02, 0.005]:
        plan = sinkhorn_plan(cost, reg=reg, num_iters=2000)
        entropic = (plan * cost).sum().item()  # = E_plan ||x0 - x1||^2
        assert exact - 1e-9 <= entropic  # no coupling beats the exact OT cost
        gaps.append(entropic - exact)
    assert gaps[0] > gaps[1] > gaps[2]  # the entropic cost decreases to the OT cost as reg -> 0
    assert gaps[-1] < 0.05 * (independent - exact)


@pytest.mark.parametrize("seed", range(3))
def test_sinkhorn_expected_cost_below_independent(seed):
    x0, x1 = batches(n=40, seed=seed)
    cost = torch.cdist(x0, x1) ** 2
    plan = sinkhorn_plan(cost, reg=0.05, num_iters=200)
    # independent pairing's expected cost is the mean of the cost matrix
    assert (plan * cost).sum().item() < cost.mean().item()


def test_sinkhorn_pair_rows_from_x1_and_cheaper_on_average():
    c = ot("sinkhorn", reg=0.05, num_iters=100)
    ind_cost, sk_cost = [], []
    for s in range(6):
        x0, x1 = _pair(c.draw(40, gen(s)))
        p0, p1 = c.pair(x0, x1, generator=gen(50 + s))
        assert torch.equal(p0, x0)
        # every partner is some row of x1
        match = (p1[:, None, :] == x1[None, :, :]).all(-1).any(1)
        assert match.all()
        ind_cost.append(mean_sq(x0, x1))
        sk_cost.append(mean_sq(p0, p1))
    assert sum(sk_cost) < sum(ind_cost)


def test_sinkhorn_sample_deterministic_with_seed():
    c = ot("sinkhorn")
    a0, a1 = _pair(c.sample(32, generator=gen(9)))
    b0, b1 = _pair(c.sample(32, generator=gen(9)))
    d0, d1 = _pair(c.sample(32, generator=gen(10)))
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert not torch.equal(a1, d1)


def test_sinkhorn_float32_on_cpu():
    c = MinibatchOTCoupling(get_dataset("gaussian"), get_dataset("moons"), method="sinkhorn")
    x0, x1 = _pair(c.sample(32, generator=gen(11)))
    assert x0.dtype == torch.float32 and x1.dtype == torch.float32
    assert torch.isfinite(x1).all()
    assert not math.isnan(mean_sq(x0, x1))
