"""Improved precision and recall (flowmatch.metrics.coverage) against hand-computed cases."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from flowmatch.metrics.coverage import (PrecisionRecall, PrecisionRecallReference, knn_radii,
                                        precision_recall)
from flowmatch.metrics.guard import NonFiniteInputWarning


def _col(*v):
    return torch.tensor(v, dtype=torch.float64)[:, None]


def test_a_one_dimensional_case_by_hand():
    # real 0..4: each one's nearest other point is 1 away (k = 1); the samples 0.5 and 10 are 9.5 apart
    real, samples = _col(0, 1, 2, 3, 4), _col(0.5, 10)
    assert knn_radii(real, 1).tolist() == [1.0] * 5
    assert knn_radii(real, 2).tolist() == [2.0, 1.0, 1.0, 1.0, 2.0]
    r = precision_recall(samples, real, k=1)
    assert isinstance(r, PrecisionRecall) and (r.k, r.n_real, r.n_samples) == (1, 5, 2)
    assert r.precision == 0.5  # 0.5 lies in the ball of 0 (or 1); 10 in none
    assert r.recall == 1.0  # every real point is within 9.5 of the sample 0.5
    # the samples 0.5, 1.5 and 2.5 (radius 1 at k = 1): 0 .. 3.5 covered, 4 not
    r = precision_recall(_col(0.5, 1.5, 2.5), real, k=1)
    assert (r.precision, r.recall) == (1.0, 0.8)


def test_the_data_itself_far_samples_and_a_dropped_mode():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 4, generator=g, dtype=torch.float64)
    same = precision_recall(real, real)
    assert (same.precision, same.recall) == (1.0, 1.0)
    far = precision_recall(real + 100.0, real)
    assert (far.precision, far.recall) == (0.0, 0.0)
    # two well-separated modes; a generator that keeps one of them is precise and reaches half the data
    left, right = torch.randn(200, 2, generator=g, dtype=torch.float64), torch.randn(200, 2, generator=g,
                                                                                     dtype=torch.float64)
    data = torch.cat([left - 20.0, right + 20.0])
    one_mode = torch.randn(400, 2, generator=g, dtype=torch.float64) - 20.0
    r = precision_recall(one_mode, data)
    assert r.precision > 0.9 and r.recall == pytest.approx(0.5, abs=0.05)
    assert r.recall <= 0.5  # not one point of the right mode is reached


def test_a_reference_featurises_the_real_set_once_and_scores_as_the_function():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(120, 1, 3, 3, generator=g)
    calls = []

    def features(x):
        calls.append(len(x))
        return x.reshape(len(x), -1)[:, :5] * 2.0

    ref = PrecisionRecallReference(real, k=3, features=features)
    assert calls == [120]
    sets = [torch.randn(80, 1, 3, 3, generator=g) * s for s in (0.5, 1.0, 2.0)]
    for x in sets:
        assert ref(x) == precision_recall(x, real, k=3, features=features)
    # the tighter set is the more precise and reaches less of the data
    tight, wide = ref(sets[0]), ref(sets[2])
    assert tight.precision > wide.precision and tight.recall < wide.recall


def test_bad_input_is_refused_or_scored_nan():
    real = torch.randn(10, 2, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=r"k = 10 needs 1 <= k < the 10 points"):
        precision_recall(real, real, k=10)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        PrecisionRecallReference(real, k=0)
    with pytest.raises(ValueError, match="samples have 3 values a row, the real set 2"):
        precision_recall(torch.zeros(5, 3), real)
    bad = real.clone()
    bad[4, 1] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = precision_recall(bad, real, k=2)
    assert any(issubclass(w.category, NonFiniteInputWarning) for w in caught)
    assert math.isnan(r.precision) and math.isnan(r.recall) and r.n_samples == 10
