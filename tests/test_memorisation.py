"""Memorisation check and held-out FD: a generator that copies training images must not pass as a
better model. On the 8x8 digits, with ``fit`` as the training images, ``val`` (never in ``fit``) as
an honest model's samples and ``test`` as the held-out reference."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from flowmatch.bench import ImageScorer
from flowmatch.data import get_image_dataset
from flowmatch.metrics.frechet import ImageFeatureMetrics
from flowmatch.metrics.guard import NonFiniteInputWarning
from flowmatch.metrics.memorisation import (EXACT_COPY_DISTANCE, MemorisationReference, MemorisationResult, memorisation,
                                           nearest_distances)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits():
    return {s: get_image_dataset("digits", s).tensors()[0] for s in ("train", "test", "val", "fit")}


@pytest.fixture(scope="module")
def fit_metrics(digits):
    return ImageFeatureMetrics("digits", digits["fit"])


# --------------------------------------------------------------------------- nearest distances


def test_nearest_distances_is_the_brute_force_minimum():
    x = torch.randn(37, 3, 4, generator=gen(0))
    ref = torch.randn(53, 3, 4, generator=gen(1)) * 2
    brute = torch.cdist(x.reshape(37, -1).double(), ref.reshape(53, -1).double()).min(dim=1).values
    got = nearest_distances(x, ref, batch_size=8)  # several batches of x
    assert got.dtype == torch.float64 and got.shape == (37,)
    assert torch.allclose(got, brute, rtol=1e-6, atol=1e-6)
    # a verbatim copy is at distance exactly 0 (recomputed directly, no cancellation error)
    assert torch.equal(nearest_distances(ref[[4, 9, 4]] * 1.0, ref), torch.zeros(3, dtype=torch.float64))


def test_nearest_distances_refuses_other_sizes_and_warns_on_nan():
    with pytest.raises(ValueError, match="values a row"):
        nearest_distances(torch.zeros(2, 5), torch.zeros(3, 4))
    x = torch.zeros(3, 4)
    x[1, 2] = float("nan")
    with pytest.warns(NonFiniteInputWarning, match="nearest_distances"):
        d = nearest_distances(x, torch.ones(5, 4))
    assert torch.isnan(d).all() and d.shape == (3,)


# --------------------------------------------------------------------------- the check on digits


def test_a_copier_is_flagged_and_new_images_are_not(digits):
    fit, val, test = digits["fit"], digits["val"], digits["test"]
    copier = fit[torch.randint(0, len(fit), (400,), generator=gen(2))]  # training images verbatim
    r = memorisation(copier, fit, test)
    assert isinstance(r, MemorisationResult) and r.space == "pixels"
    assert (r.n, r.n_held_out, r.n_train) == (400, 297, 1300)
    assert r.copies_fraction == 1.0 and r.exact_copies_fraction == 1.0 and r.median == 0.0 and r.memorises is True
    # real digits the model never trained on sit as far from the training images as held-out ones
    honest = memorisation(val, fit, test)
    assert honest.memorises is False and honest.exact_copies_fraction == 0.0
    assert honest.copies_fraction <= honest.limit and 0.8 < honest.median_ratio < 1.25
    # the held-out images score the quantile itself (their own threshold)
    assert memorisation(test, fit, test).copies_fraction == pytest.approx(0.05, abs=1 / 297)
    # near-copies are caught too: no exact copy, but far closer than held-out images
    near = memorisation((copier + 0.1 * torch.randn(copier.shape, generator=gen(3))).clamp(-1, 1), fit, test)
    assert near.exact_copies_fraction == 0.0 and near.memorises is True and near.copies_fraction > 0.9


def test_the_check_in_classifier_feature_space(digits, fit_metrics):
    fit, val, test = digits["fit"], digits["val"], digits["test"]
    copier = memorisation(fit[:300], fit, test, features=fit_metrics.features)
    honest = memorisation(val, fit, test, features=fit_metrics.features)
    assert copier.space == honest.space == "features"
    assert copier.memorises is True and copier.copies_fraction == 1.0
    assert honest.memorises is False and honest.threshold == copier.threshold > 0


def test_a_reference_featurises_its_images_once_and_scores_each_set_as_the_function_does(digits, fit_metrics):
    fit, val, test = digits["fit"], digits["val"], digits["test"]
    calls = []

    def features(x):
        calls.append(len(x))
        return fit_metrics.features(x)

    ref = MemorisationReference(fit, test, features=features)
    assert calls == [len(fit), len(test)]  # the reference side, once
    sets = [fit[:120], val[:150], (val[:80] + 0.05).clamp(-1, 1)]
    for x in sets:
        got, want = ref(x).summary(), memorisation(x, fit, test, features=fit_metrics.features).summary()
        assert got == want
    assert calls == [len(fit), len(test)] + [len(x) for x in sets]  # then the samples alone
    assert ref(fit[:120]).copies_fraction == 1.0
    with pytest.raises(ValueError, match="quantile"):
        MemorisationReference(fit, test, quantile=0.0)


def test_the_limit_is_three_standard_errors_above_the_quantile(digits):
    r = memorisation(digits["val"][:100], digits["fit"], digits["test"], quantile=0.1)
    assert r.limit == pytest.approx(0.1 + 3 * math.sqrt(0.1 * 0.9 * (1 / 100 + 1 / 297)))
    assert r.threshold == pytest.approx(float(torch.quantile(r.held_out_distances, 0.1)))
    assert r.copies_fraction == pytest.approx(float((r.distances < r.threshold).double().mean()))
    assert set(r.summary()) == {k for k, v in r.__dict__.items() if not isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="quantile"):
        memorisation(digits["val"], digits["fit"], digits["test"], quantile=1.0)


def test_non_finite_samples_give_nan_and_no_verdict(digits):
    x = digits["val"][:10].clone()
    x[3, 0, 2, 2] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = memorisation(x, digits["fit"], digits["test"])
    assert any(issubclass(w.category, NonFiniteInputWarning) for w in caught)
    assert r.memorises is None and math.isnan(r.copies_fraction) and math.isnan(r.median)


def test_exact_copy_distance_is_far_below_any_two_digits(digits):
    # the exact-copy tolerance cannot swallow a real neighbour: the closest distinct digits are far apart
    d = nearest_distances(digits["test"], digits["fit"])
    assert float(d.min()) > 1e4 * EXACT_COPY_DISTANCE


# --------------------------------------------------------------------------- held-out FD


def test_fd_test_exposes_a_copier_that_beats_the_floor(digits):
    train, test = digits["train"], digits["test"]
    metrics = ImageFeatureMetrics("digits", train)
    held_out = ImageFeatureMetrics("digits", test, classifier=metrics.classifier)
    scorer = ImageScorer(metrics, test, 0, held_out)
    plain = ImageScorer(metrics, test, 0)
    assert scorer.scores == ("fd", "kid", "fd_test") and plain.scores == ("fd", "kid")
    copier = train[torch.randint(0, len(train), (1000,), generator=gen(4))]
    s = scorer(copier)
    # the training-reference FD is what it was, and the copier beats real held-out images on it
    assert s["fd"] == plain(copier)["fd"] == metrics.fd(copier) and s["kid"] == plain(copier)["kid"]
    assert s["fd"] < scorer.floor(297)["fd_floor"]
    # against the held-out split it is no better than real new images scored against the training split
    assert s["fd_test"] > 2 * s["fd"]
    # and the column is scored against the test split: the test images are at FD ~0 there, not on fd
    t = scorer(test)
    assert t["fd_test"] < 1e-6 * float(torch.trace(held_out.ref_cov)) < t["fd"]


def test_make_scorer_adds_fd_test_against_the_test_split():
    from flowmatch.config import from_dict
    from flowmatch.evaluation import EVAL_KEYS, image_memorisation, make_scorer

    cfg = from_dict({"data": {"source": "gaussian", "target": "digits"}})
    scorer = make_scorer(cfg, 64)
    assert scorer.scores[-1] == "fd_test" and "fd_test" in EVAL_KEYS["fd"]
    test, _ = get_image_dataset("digits", "test").tensors()
    assert torch.equal(scorer.held_out.ref_features, scorer.metrics.features(test))
    train, _ = get_image_dataset("digits", "train").tensors()
    checks = image_memorisation(cfg, train[:150])
    assert set(checks) == {"pixels", "features"}
    assert all(c.memorises is True and c.n_train == 1500 and c.n_held_out == 297 for c in checks.values())


def test_the_validation_scorer_of_an_image_task_is_the_val_split():
    """APT's model selection scores against the val split (held out of data.split=fit), never the
    test split nor the bench's training reference: the val images themselves score an FD of ~0 there."""
    from flowmatch.config import from_dict
    from flowmatch.evaluation import make_scorer, validation_scorer

    cfg = from_dict({"data": {"source": "gaussian", "target": "digits"}})
    val, _ = get_image_dataset("digits", "val").tensors()
    scorer = validation_scorer(cfg, 200, seed=1)
    assert scorer.metric == "fd" and scorer.primary(val) < 1e-6
    assert make_scorer(cfg, 200).primary(val) > 0.05  # the bench's reference is another set of images
