"""The class balance and ambiguous samples of image sets (flowmatch.metrics.classes): hand values, the data
itself through the shipped digits classifier, and bad input."""

import math
import warnings

import numpy as np
import pytest
import torch

from flowmatch.data.images import get_image_dataset
from flowmatch.errors import FlowmatchError
from flowmatch.evaluation import class_balance_checker
from flowmatch.metrics import ClassBalanceReference, NonFiniteInputWarning, class_balance
from flowmatch.metrics.frechet import load_feature_classifier
from tests.conftest import make_tiny_cfg

PROBS = torch.tensor([[0.95, 0.03, 0.02],   # class 0, sure
                      [0.60, 0.30, 0.10],   # class 0, ambiguous
                      [0.05, 0.90, 0.05],   # class 1, at the threshold: not ambiguous
                      [0.10, 0.10, 0.80]], dtype=torch.float64)  # class 2, ambiguous
SHARES = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)  # PROBS' argmax shares
Q = torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64)


def test_hand_values():
    # argmax shares (0.5, 0.25, 0.25) against (0.2, 0.4, 0.4): TV = (0.3 + 0.15 + 0.15) / 2
    r = class_balance(PROBS, Q)
    assert r.class_tv == pytest.approx(0.3, abs=1e-12)
    assert r.ambiguous == 0.5 and (r.threshold, r.n_samples) == (0.9, 4)
    assert class_balance(PROBS, SHARES).class_tv == pytest.approx(0.0, abs=1e-12)
    assert class_balance(PROBS, SHARES, threshold=0.5).ambiguous == 0.0
    assert class_balance(PROBS, SHARES, threshold=1.0).ambiguous == 1.0


def test_reference_applies_its_logits_in_batches():
    logits = PROBS.log()  # softmax(log p) = p
    # threshold 0.85: softmax(log 0.9) may round below 0.9
    ref = ClassBalanceReference(lambda x: logits[x[:, 0].long()], torch.tensor([0, 1, 1, 2, 2]), 3, threshold=0.85,
                                batch_size=3)
    assert torch.allclose(ref.freq, Q)
    r = ref(torch.arange(4.0)[:, None].repeat(1, 2))  # "images" that index the rows above
    assert r.class_tv == pytest.approx(0.3, abs=1e-12) and r.ambiguous == 0.5


@pytest.fixture(scope="module")
def digits_check():
    return class_balance_checker(make_tiny_cfg("data.target=digits"))


def test_the_data_itself_is_balanced_and_sure_and_noise_is_not(digits_check):
    # the classifier trained on these training digits: their shares match their labels' (0.0007 measured) and
    # it is sure of almost all of them (0.0013 below 0.9); the held-out test digits (297) score a TV about
    # sqrt(C / (2 pi M)) = 0.07 from their finite size alone (0.091 measured) and 0.0067 ambiguous
    train, labels = get_image_dataset("digits", "train").tensors()
    test, _ = get_image_dataset("digits", "test").tensors()
    r_train, r_test = digits_check(train), digits_check(test)
    assert r_train.class_tv < 0.01 and r_train.ambiguous < 0.01 and r_train.n_samples == 1500
    assert 0.02 < r_test.class_tv < 0.2 and r_test.ambiguous < 0.05
    # the same against the classifier applied by hand
    clf = load_feature_classifier("digits")
    with torch.no_grad():
        want = class_balance(clf(test).softmax(dim=1), torch.bincount(labels, minlength=10).double() / len(labels))
    assert (r_test.class_tv, r_test.ambiguous) == pytest.approx((want.class_tv, want.ambiguous), abs=1e-12)
    # uniform pixel noise is no digit: far from the balance and often unsure (0.71 and 0.36 measured)
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    r_noise = digits_check(noise)
    assert r_noise.class_tv > 0.5 and r_noise.ambiguous > 0.2


def test_non_finite_images_give_nan_and_a_warning(digits_check):
    x, _ = get_image_dataset("digits", "test").tensors()
    x = x[:8].clone()
    x[3, 0, 2, 2] = float("nan")
    with pytest.warns(NonFiniteInputWarning, match="class_balance"):
        r = digits_check(x)
    assert math.isnan(r.class_tv) and math.isnan(r.ambiguous)
    with pytest.warns(NonFiniteInputWarning):
        r = class_balance(torch.full((2, 3), float("nan")), Q)
    assert math.isnan(r.class_tv) and math.isnan(r.ambiguous)


@pytest.mark.parametrize("kwargs, match", [
    ({"threshold": 0.0}, "threshold must be in"),
    ({"threshold": 1.5}, "threshold must be in"),
    ({"threshold": float("nan")}, "threshold must be in"),
    ({"ref_freq": torch.tensor([0.5, 0.6, 0.1])}, "sum to 1"),
    ({"ref_freq": torch.tensor([1.2, -0.1, -0.1])}, "non-negative"),
    ({"ref_freq": torch.tensor([1.0])}, r"\[C >= 2\]"),
    ({"probs": PROBS[:, :2]}, r"probs must be \[M >= 1, 3\]"),
    ({"probs": PROBS[:0]}, r"probs must be \[M >= 1, 3\]"),
    ({"probs": PROBS.log()}, "not logits"),
])
def test_bad_input_is_named(kwargs, match):
    args = {"probs": PROBS, "ref_freq": Q} | kwargs
    with pytest.raises(ValueError, match=match):
        class_balance(args.pop("probs"), args.pop("ref_freq"), **args)


@pytest.mark.parametrize("labels, num_classes, match", [
    (torch.tensor([0, 1, 3]), 3, r"integers in \[0, 3\)"),
    (torch.tensor([0.0, 1.0]), 3, "integers"),
    (torch.tensor([], dtype=torch.long), 3, "non-empty"),
    (torch.tensor([0, 0]), 1, "num_classes must be an integer >= 2"),
])
def test_bad_reference_is_named(labels, num_classes, match):
    with pytest.raises(ValueError, match=match):
        ClassBalanceReference(lambda x: x, labels, num_classes)


def test_a_dataset_without_labels_is_refused(tmp_path):
    from PIL import Image

    for k in range(4):  # a flat folder: images without classes
        Image.fromarray(np.full((8, 8), 40 * k, np.uint8)).save(tmp_path / f"img{k}.png")
    cfg = make_tiny_cfg("data.target=folder", f"data.root={tmp_path}", "data.image_size=8", "data.channels=1")
    with warnings.catch_warnings(), pytest.raises(FlowmatchError, match="folder has no labels"):
        class_balance_checker(cfg)
