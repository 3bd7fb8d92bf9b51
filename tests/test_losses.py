"""Flow-matching losses against values computed independently in the test."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowmatch.errors import UnknownNameError
from flowmatch.paths import get_path
from flowmatch.training.losses import LOSSES, cfm_loss, t_bin_sums
from flowmatch.types import LossOutput


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class PairVelocity(nn.Module):
    """Knows the pair it will be evaluated on and returns the exact conditional velocity x1 - x0."""

    def __init__(self, x0: torch.Tensor, x1: torch.Tensor):
        super().__init__()
        self.register_buffer("u", x1 - x0)

    def forward(self, x, t, cond=None):
        assert t.shape == (x.shape[0],)  # models always see t of shape [B]
        return self.u.clone()


class AffineField(nn.Module):
    """v(x, t) = a * x + t (broadcast over every non-batch dimension)."""

    def __init__(self, a: float = 2.0):
        super().__init__()
        self.a = a

    def forward(self, x, t, cond=None):
        return self.a * x + t.reshape(-1, *([1] * (x.ndim - 1)))


def _data(shape=(16, 2), seed=0, dtype=torch.float64):
    g = gen(seed)
    x0 = torch.randn(*shape, generator=g, dtype=dtype)
    x1 = 3.0 + torch.randn(*shape, generator=g, dtype=dtype)
    t = torch.rand(shape[0], generator=g, dtype=dtype)
    return x0, x1, t


@pytest.mark.parametrize("loss", ["l2", "pseudo_huber"])
@pytest.mark.parametrize("shape", [(16, 2), (8, 3, 4)])
def test_exact_velocity_gives_zero_loss(loss, shape):
    x0, x1, t = _data(shape)
    out = cfm_loss(PairVelocity(x0, x1), get_path("linear"), x0, x1, t, loss=loss)
    assert isinstance(out, LossOutput)
    assert out.per_sample.shape == (shape[0],)
    assert float(out.loss) == pytest.approx(0.0, abs=1e-12)
    assert torch.all(out.per_sample.abs() < 1e-12)


def test_wrong_velocity_gives_positive_loss():
    x0, x1, t = _data()
    out = cfm_loss(PairVelocity(x0, x1 + 1.0), get_path("linear"), x0, x1, t)
    # every coordinate is off by exactly 1, so the mean squared error per sample is 1
    assert torch.allclose(out.per_sample, torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(16, 2), (8, 3, 4)])
def test_l2_per_sample_matches_hand_computation(shape):
    x0, x1, t = _data(shape, seed=1)
    model = AffineField(2.0)
    out = cfm_loss(model, get_path("linear"), x0, x1, t, loss="l2")
    tb = t.reshape(-1, *([1] * (len(shape) - 1)))
    xt = tb * x1 + (1 - tb) * x0  # rectified-flow interpolant
    ut = x1 - x0
    v = 2.0 * xt + tb
    d = math.prod(shape[1:])
    expected = ((v - ut) ** 2).reshape(shape[0], -1).sum(dim=1) / d
    torch.testing.assert_close(out.per_sample, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-12, atol=1e-12)


def test_l2_on_cosine_path_matches_hand_computation():
    x0, x1, t = _data(seed=2)
    out = cfm_loss(AffineField(-1.0), get_path("cosine"), x0, x1, t)
    a, s = torch.sin(math.pi * t / 2)[:, None], torch.cos(math.pi * t / 2)[:, None]
    xt = a * x1 + s * x0
    ut = (math.pi / 2) * (s * x1 - a * x0)
    v = -xt + t[:, None]
    torch.testing.assert_close(out.per_sample, ((v - ut) ** 2).mean(dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(16, 2), (8, 3, 4), (4, 100)])
def test_pseudo_huber_formula(shape):
    x0, x1, t = _data(shape, seed=3)
    out = cfm_loss(AffineField(0.5), get_path("linear"), x0, x1, t, loss="pseudo_huber")
    tb = t.reshape(-1, *([1] * (len(shape) - 1)))
    err = (0.5 * (tb * x1 + (1 - tb) * x0) + tb - (x1 - x0)).reshape(shape[0], -1)
    d = err.shape[1]
    c = 0.00054 * math.sqrt(d)
    expected = torch.sqrt((err ** 2).sum(dim=1) + c ** 2) - c
    torch.testing.assert_close(out.per_sample, expected, rtol=1e-12, atol=1e-12)


def test_pseudo_huber_is_l1_like_for_large_errors_and_quadratic_for_small():
    fn = LOSSES["pseudo_huber"]
    d = 4
    c = 0.00054 * math.sqrt(d)
    big = torch.full((1, d), 10.0, dtype=torch.float64)  # ||e|| = 20 >> c: loss ~ ||e||
    assert float(fn(big)) == pytest.approx(20.0, abs=c)
    small = torch.full((1, d), 1e-6, dtype=torch.float64)  # ||e||^2 << c^2: loss ~ ||e||^2 / (2c)
    assert float(fn(small)) == pytest.approx(4e-12 / (2 * c), rel=1e-3)


def test_loss_gradient_flows_to_parameters():
    x0, x1, t = _data(dtype=torch.float32)
    model = nn.Linear(2, 2)
    wrapped = lambda x, tt: model(x)  # noqa: E731
    out = cfm_loss(wrapped, get_path("linear"), x0, x1, t)
    out.loss.backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
    assert model.weight.grad.abs().sum() > 0


def test_sigma_path_uses_generator_reproducibly():
    x0, x1, t = _data(seed=4)
    path = get_path("linear", sigma=0.3)
    a = cfm_loss(AffineField(), path, x0, x1, t, generator=gen(7))
    b = cfm_loss(AffineField(), path, x0, x1, t, generator=gen(7))
    c = cfm_loss(AffineField(), path, x0, x1, t, generator=gen(8))
    assert torch.equal(a.per_sample, b.per_sample)
    assert not torch.equal(a.per_sample, c.per_sample)


def test_unknown_loss_lists_valid_names():
    x0, x1, t = _data()
    with pytest.raises(UnknownNameError) as e:
        cfm_loss(AffineField(), get_path("linear"), x0, x1, t, loss="l3")
    assert "l2" in str(e.value) and "pseudo_huber" in str(e.value)


def test_t_bin_sums_edges():
    t = torch.tensor([0.05, 0.95, 1.0, 0.0, 0.5, 0.1, 0.099])
    per_sample = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    sums, counts = t_bin_sums(per_sample, t, 10)
    # bins are [i/10, (i+1)/10); t = 1.0 belongs to the last bin
    exp_sums = torch.zeros(10, dtype=torch.float64)
    exp_counts = torch.zeros(10, dtype=torch.float64)
    for value, b in [(1.0, 0), (2.0, 9), (4.0, 9), (8.0, 0), (16.0, 5), (32.0, 1), (64.0, 0)]:
        exp_sums[b] += value
        exp_counts[b] += 1
    assert sums.shape == (10,) and counts.shape == (10,)
    torch.testing.assert_close(sums, exp_sums)
    torch.testing.assert_close(counts, exp_counts)
    assert float(counts.sum()) == len(t)


def test_t_bin_sums_other_bin_count_and_no_grad():
    t = torch.tensor([0.0, 0.4, 0.7, 0.99])  # bins of width 1/3: 0, 1, 2, 2
    ps = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    sums, counts = t_bin_sums(ps * 2, t, 3)
    torch.testing.assert_close(counts, torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(sums, torch.tensor([2.0, 2.0, 4.0], dtype=torch.float64))
    assert not sums.requires_grad


class LabelShift(nn.Module):
    """v(x, t, cond) = cond (broadcast); records every call's cond."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, cond=None):
        self.seen.append(cond)
        c = torch.zeros(x.shape[0], dtype=x.dtype) if cond is None else cond.to(x.dtype)
        return c.reshape(-1, *([1] * (x.ndim - 1))).expand_as(x)


def test_cond_reaches_the_model_and_changes_the_loss():
    x0, x1, t = _data(shape=(6, 2))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    model = LabelShift()
    with_cond = cfm_loss(model, get_path("linear"), x0, x1, t, cond=y)
    assert model.seen[-1] is y
    # hand computation: v = y on every coordinate, u = x1 - x0
    want = ((y[:, None].double() - (x1 - x0)) ** 2).mean(dim=1)
    torch.testing.assert_close(with_cond.per_sample, want)
    without = cfm_loss(model, get_path("linear"), x0, x1, t)
    assert model.seen[-1] is None
    assert not torch.allclose(with_cond.per_sample, without.per_sample)
    # a model with no cond parameter is still called as v(x, t) when no labels are given
    two_args = lambda x, tt: x  # noqa: E731
    assert torch.isfinite(cfm_loss(two_args, get_path("linear"), x0, x1, t).loss)


@pytest.mark.crosspath
def test_low_precision_output_is_reduced_in_fp32():
    x0, x1, t = _data(shape=(32, 4), dtype=torch.float32)
    exact = AffineField()
    bf16 = lambda x, tt, cond=None: exact(x, tt).to(torch.bfloat16)  # noqa: E731
    out = cfm_loss(bf16, get_path("linear"), x0, x1, t)
    assert out.loss.dtype == torch.float32 and out.per_sample.dtype == torch.float32
    # the same as the fp32 loss of the rounded output: the cast happens before the distance
    rounded = lambda x, tt, cond=None: exact(x, tt).to(torch.bfloat16).float()  # noqa: E731
    ref = cfm_loss(rounded, get_path("linear"), x0, x1, t)
    assert torch.equal(out.per_sample, ref.per_sample)
