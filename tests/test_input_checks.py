"""Bad input at the boundaries: every metric on non-finite input (NaN and a warning, never a score),
one-line CLI errors where a traceback used to be, and the range of every numeric and path input
(config sections, solver and grid constructors, the bench)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import yaml

from flowmatch.bench import ToyScorer, bench_suite
from flowmatch.cli import main
from flowmatch.config import to_dict
from flowmatch.data.toy import Gaussian, get_dataset
from flowmatch.metrics import (ImageFeatureMetrics, NonFiniteInputWarning, frechet_distance,
                               gaussian_frechet, gaussian_w2, kernel_distance, log_likelihood, mmd, straightness, w2)
from flowmatch.metrics.distances import MMDReference
from flowmatch.models.classifier import FeatureClassifier

BAD = [float("nan"), float("inf"), float("-inf")]


def cloud(n: int = 64, d: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def spoiled(x: torch.Tensor, value: float, rows=(3,)) -> torch.Tensor:
    x = x.clone()
    for r in rows:
        x[r, -1] = value
    return x


def nan_with_warning(fn, match: str):
    with pytest.warns(NonFiniteInputWarning, match=match):
        out = fn()
    return out


# ------------------------------------------------------------------------------- metrics on NaN / inf


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("method", ["pot", "scipy"])
def test_w2_of_a_non_finite_cloud_is_nan_not_a_perfect_score(value, method):
    if method == "pot":
        pytest.importorskip("ot")
    x, y = cloud(seed=0), cloud(seed=1)
    out = nan_with_warning(lambda: w2(spoiled(x, value, rows=(3, 9)), y, method=method), r"w2: .*2 of 64 rows of x")
    assert math.isnan(out)
    assert math.isnan(nan_with_warning(lambda: w2(x, spoiled(y, value), method=method), r"1 of 64 rows of y"))
    assert w2(x, y, method=method) > 0.1  # finite clouds: a score, no warning


@pytest.mark.parametrize("value", BAD)
def test_mmd_and_its_reference_form_are_nan_on_non_finite_input(value):
    x, y = cloud(seed=0), cloud(seed=1)
    assert math.isnan(nan_with_warning(lambda: mmd(spoiled(x, value), y), r"mmd: .*1 of 64 rows of x"))
    assert math.isnan(nan_with_warning(lambda: mmd(x, spoiled(y, value)), r"mmd: .*1 of 64 rows of y"))
    ref = MMDReference(y)
    assert math.isnan(nan_with_warning(lambda: ref(spoiled(x, value)), r"mmd: .*1 of 64 rows of x"))
    assert ref(x) == pytest.approx(mmd(x, y), rel=1e-12)
    bad_ref = nan_with_warning(lambda: MMDReference(spoiled(y, value)), r"mmd: .*1 of 64 rows of y")
    assert math.isnan(bad_ref(x))


def test_toy_scorer_scores_a_diverged_sample_nan():
    scorer = ToyScorer(get_dataset("8gaussians"), 64, seed=0)
    with pytest.warns(NonFiniteInputWarning):
        scores = scorer(spoiled(cloud(), float("nan")))
    assert set(scores) == {"w2", "mmd"} and all(math.isnan(v) for v in scores.values())


@pytest.mark.parametrize("value", BAD)
def test_gaussian_closed_forms_are_nan_on_non_finite_parameters(value):
    m = torch.zeros(3)
    assert math.isnan(nan_with_warning(lambda: gaussian_w2(torch.tensor([0.0, value, 0.0]), 1.0, m, 1.0),
                                       r"gaussian_w2: .*1 of 3 values of mean1"))
    assert math.isnan(nan_with_warning(lambda: gaussian_w2(m, value, m, 1.0), r"1 of 1 values of std1"))
    cov = torch.eye(3)
    assert math.isnan(nan_with_warning(lambda: gaussian_frechet(m, spoiled(cov, value, rows=(0,)), m, cov),
                                       r"gaussian_frechet: .*1 of 3 rows of cov1"))
    assert gaussian_frechet(m, cov, m + 1, cov) == pytest.approx(3.0)


@pytest.mark.parametrize("value", BAD)
def test_frechet_distance_and_kid_are_nan_on_non_finite_features(value):
    f1, f2 = cloud(40, 5, seed=0), cloud(40, 5, seed=1)
    assert math.isnan(nan_with_warning(lambda: frechet_distance(spoiled(f1, value), f2),
                                       r"frechet_distance: .*1 of 40 rows of f1"))
    kid = nan_with_warning(lambda: kernel_distance(f1, spoiled(f2, value), num_subsets=3, subset_size=10),
                           r"kernel_distance: .*1 of 40 rows of f2")
    assert all(math.isnan(k) for k in kid)
    assert math.isfinite(frechet_distance(f1, f2)) and all(math.isfinite(k) for k in kernel_distance(f1, f2))


def test_image_feature_metrics_are_nan_on_non_finite_images():
    torch.manual_seed(0)
    clf = FeatureClassifier(1, 8, 10, width=4, feature_dim=8)
    g = torch.Generator().manual_seed(0)
    ref, x = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    metrics = ImageFeatureMetrics("digits", ref, classifier=clf)
    bad = x.clone()
    bad[5, 0, 2, 2] = float("nan")
    assert math.isnan(nan_with_warning(lambda: metrics.fd(bad), r"fd: .*1 of 32 rows of x"))
    assert all(math.isnan(k) for k in nan_with_warning(lambda: metrics.kid(bad), r"kid: .*1 of 32 rows of x"))
    assert all(math.isnan(v) for v in nan_with_warning(lambda: metrics(bad), r"1 of 32 rows of x").values())
    good = metrics(x)
    assert good["fd"] == metrics.fd(x) and math.isfinite(good["kid"])
    bad_ref = nan_with_warning(lambda: ImageFeatureMetrics("digits", bad, classifier=clf), r"1 of 32 rows of reference")
    assert math.isnan(bad_ref.fd(x))


@pytest.mark.parametrize("value", BAD)
def test_straightness_of_non_finite_start_points_is_nan(value):
    res = nan_with_warning(lambda: straightness(lambda x, t: -x, spoiled(cloud(), value), num_steps=4),
                           r"straightness: .*1 of 64 rows of x0")
    assert math.isnan(res.straightness) and math.isnan(res.straightness_rel) and res.nfe == 0
    assert len(res.per_t) == 5 and all(math.isnan(p) for p in res.per_t)


@pytest.mark.parametrize("value", BAD)
def test_likelihood_of_a_non_finite_point_is_nan_and_the_others_are_kept(value):
    x1 = cloud(6, 2, seed=2).double()
    src = Gaussian(2)
    v = lambda x, t: 0.5 * x  # noqa: E731
    ok = log_likelihood(v, x1, src, solver="rk4", num_steps=8)
    res = nan_with_warning(lambda: log_likelihood(v, spoiled(x1, value, rows=(2,)), src, solver="rk4", num_steps=8),
                           r"log_likelihood: .*1 of 6 rows of x1")
    keep = [0, 1, 3, 4, 5]
    assert torch.isnan(res.logp[2]) and torch.isnan(res.x0[2]).all()
    torch.testing.assert_close(res.logp[keep], ok.logp[keep], rtol=1e-12, atol=1e-12)
    assert math.isnan(res.mean) and math.isnan(res.bits_per_dim)


def test_bench_row_of_a_diverging_field_is_nan_and_the_other_rows_unchanged():
    src, tgt = Gaussian(2), get_dataset("8gaussians")

    def blows_up_late(x, t):  # infinite velocity from t = 0.5 on: one Euler step never sees it, two do
        return torch.where(t[:, None] < 0.5, -x, x * float("inf"))

    kw = dict(solvers=["euler"], nfes=[1, 2], n=64, straightness_n=16, progress=False)
    with pytest.warns(NonFiniteInputWarning, match=r"(w2|mmd): .*64 of 64 rows of x"):
        rows = bench_suite({"m": blows_up_late}, src, tgt, **kw).rows
    one, two = rows
    assert two["nfe"] == 2 and math.isnan(two["w2"]) and math.isnan(two["mmd"]) and not two["pareto"]
    assert one["nfe"] == 1 and math.isfinite(one["w2"]) and one["pareto"]
    (alone,) = bench_suite({"m": blows_up_late}, src, tgt, **{**kw, "nfes": [1]}).rows
    assert (alone["w2"], alone["mmd"], alone["w2_floor"]) == (one["w2"], one["mmd"], one["w2_floor"])
