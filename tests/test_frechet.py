"""Frechet distance, KID and the feature classifier: closed forms and independent computations written
here (numpy / scipy), the shipped digits classifier on real images, and the loader's refusals."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

from flowmatch.data.images import get_image_dataset
from flowmatch.errors import FlowmatchError
from flowmatch.metrics import frechet
from flowmatch.metrics.frechet import (ImageFeatureMetrics, MetricError, WeightsNotFoundError, frechet_distance,
                                       gaussian_frechet, inception_fid, kernel_distance, load_feature_classifier,
                                       shipped_classifier_path)
from flowmatch.models.classifier import FeatureClassifier
from flowmatch.training.classifier import (CLASSIFIER_FORMAT, CLASSIFIER_FORMAT_VERSION, classifier_accuracy,
                                           save_feature_classifier, shift_images, train_feature_classifier)

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small convolutions and matrices run fastest on one thread, above all on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_spd(f: int, seed: int) -> torch.Tensor:
    a = torch.randn(f, f, generator=gen(seed), dtype=F64)
    return a @ a.T / f + 0.1 * torch.eye(f, dtype=F64)


# ------------------------------------------------------------------------------------ Gaussian math


def test_gaussian_frechet_diagonal_closed_form():
    # diagonal covariances commute: tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(a) - sqrt(b))^2
    g = gen(0)
    mu1, mu2 = torch.randn(16, generator=g, dtype=F64), torch.randn(16, generator=g, dtype=F64)
    a, b = torch.rand(16, generator=g, dtype=F64) * 3, torch.rand(16, generator=g, dtype=F64) * 3
    expected = sum((x - y) ** 2 for x, y in zip(mu1.tolist(), mu2.tolist()))
    expected += sum((math.sqrt(x) - math.sqrt(y)) ** 2 for x, y in zip(a.tolist(), b.tolist()))
    got = gaussian_frechet(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)
    assert gaussian_frechet(mu1, torch.diag(a), mu1, torch.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_gaussian_frechet_full_covariance_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    f = 12
    s1, s2 = random_spd(f, 1).numpy(), random_spd(f, 2).numpy()
    mu1, mu2 = np.linspace(-1, 1, f), np.linspace(0.5, -0.3, f)
    # the usual formula, with the (non-symmetric) product's principal square root
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2))))
    got = gaussian_frechet(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2), torch.from_numpy(s2))
    assert got == pytest.approx(expected, rel=1e-9)
    # symmetric in its two Gaussians
    assert gaussian_frechet(torch.from_numpy(mu2), torch.from_numpy(s2), torch.from_numpy(mu1),
                            torch.from_numpy(s1)) == pytest.approx(got, rel=1e-9)


def test_gaussian_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not agree"):
        gaussian_frechet(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))


def test_frechet_distance_uses_sample_mean_and_covariance():
    g = gen(3)
    f1 = torch.randn(400, 6, generator=g, dtype=F64)
    f2 = torch.randn(300, 6, generator=g, dtype=F64) @ random_spd(6, 4) + 0.5
    a, b = f1.numpy(), f2.numpy()
    expected = gaussian_frechet(torch.from_numpy(a.mean(0)), torch.from_numpy(np.cov(a, rowvar=False)),
                                torch.from_numpy(b.mean(0)), torch.from_numpy(np.cov(b, rowvar=False)))
    assert frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(f1.float(), f2.float()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n", [500, 40])  # 40 < F: a rank-deficient covariance
def test_frechet_distance_of_a_set_with_itself_is_zero(n):
    f = torch.randn(n, 64, generator=gen(5), dtype=F64) * 2 + 1
    scale = float(torch.trace(torch.cov(f.T)))
    assert frechet_distance(f, f) < 1e-6 * scale
    assert frechet_distance(f, f + 0.5) == pytest.approx(64 * 0.25, rel=1e-6)  # a shift: the mean term alone


def test_kernel_distance_one_full_subset_equals_the_unbiased_mmd():
    # with m = N the subset is the whole set (permuted), so KID is the full-set statistic, written out here
    g = gen(6)
    x, y = torch.randn(60, 5, generator=g, dtype=F64), torch.randn(50, 5, generator=g, dtype=F64) + 0.3
    xs, ys = x[:50].numpy(), y.numpy()
    k = lambda p, q: (p @ q.T / 5 + 1) ** 3  # noqa: E731
    m = 50
    kxx, kyy, kxy = k(xs, xs), k(ys, ys), k(xs, ys)
    expected = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.mean())
    mean, std = kernel_distance(x[:50], y, num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(expected, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kernel_distance_paths_agree_and_are_seeded(monkeypatch):
    g = gen(7)
    x, y = torch.randn(300, 8, generator=g), torch.randn(200, 8, generator=g) + 0.2
    fast = kernel_distance(x, y, num_subsets=20, subset_size=100, generator=gen(1))
    assert fast == kernel_distance(x, y, num_subsets=20, subset_size=100, generator=gen(1))
    assert fast != kernel_distance(x, y, num_subsets=20, subset_size=100, generator=gen(2))
    assert kernel_distance(x, y, num_subsets=20, subset_size=100) == kernel_distance(
        x, y, num_subsets=20, subset_size=100)  # no generator: a fixed seed
    monkeypatch.setattr(frechet, "_GRAM_MAX", 0)  # the per-subset path (large sets)
    slow = kernel_distance(x, y, num_subsets=20, subset_size=100, generator=gen(1))
    assert slow[0] == pytest.approx(fast[0], rel=1e-9, abs=1e-12)
    assert slow[1] == pytest.approx(fast[1], rel=1e-9, abs=1e-12)
    assert fast[0] > 3 * fast[1] / math.sqrt(20)  # shifted sets are told apart


def test_kernel_distance_rejects_bad_inputs():
    with pytest.raises(ValueError, match="feature sizes differ"):
        kernel_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        frechet_distance(torch.zeros(5), torch.zeros(5))


# ------------------------------------------------------------------------------------ the classifier


def test_classifier_shapes_and_shape_error():
    net = FeatureClassifier(1, 8, 10, width=8, feature_dim=16)
    x = torch.zeros(3, 1, 8, 8)
    assert net(x).shape == (3, 10) and net.features(x).shape == (3, 16)
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\].*\[3, 1, 28, 28\]"):
        net(torch.zeros(3, 1, 28, 28))
    assert FeatureClassifier(3, 32, 10, width=8)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_shift_images_moves_each_image_by_at_most_the_shift():
    x = torch.randn(16, 2, 6, 6, generator=gen(8))
    out = shift_images(x, 1, gen(9))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    shifts = set()
    for i in range(16):
        match = [(dy, dx) for dy in range(3) for dx in range(3)
                 if torch.equal(out[i], padded[i, :, dy:dy + 6, dx:dx + 6])]
        assert match, f"image {i} is not a shift of its input"
        shifts.add(match[0])
    assert len(shifts) > 1
    assert torch.equal(shift_images(x, 0, gen(9)), x)


def test_training_is_deterministic_and_round_trips(tmp_path):
    state = torch.random.get_rng_state()
    m1, info1 = train_feature_classifier("digits", steps=4, batch_size=16, width=8, feature_dim=16, seed=3)
    m2, info2 = train_feature_classifier("digits", steps=4, batch_size=16, width=8, feature_dim=16, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    assert info1 == info2 and not m1.training
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert {"dataset", "shape", "num_classes", "width", "feature_dim", "steps", "seed", "test_accuracy",
            "train_accuracy", "torch_version"} <= set(info1)
    assert info1["shape"] == [1, 8, 8] and info1["num_classes"] == 10
    path = str(tmp_path / "clf.pt")
    save_feature_classifier(m1, info1, path)
    loaded = load_feature_classifier("digits", path)
    x = torch.rand(5, 1, 8, 8, generator=gen(0)) * 2 - 1
    assert torch.equal(loaded.features(x), m1.features(x))
    with pytest.raises(ValueError, match="plain"):
        save_feature_classifier(m1, {**info1, "extra": torch.zeros(1)}, str(tmp_path / "bad.pt"))


# ---------------------------------------------------------------- the shipped digits classifier


@pytest.fixture(scope="module")
def digits():
    xt, yt = get_image_dataset("digits", split="test").tensors()
    xr, _ = get_image_dataset("digits", split="train").tensors()
    return xt, yt, xr


@pytest.fixture(scope="module")
def digits_metrics(digits):
    return ImageFeatureMetrics("digits", digits[0])


def noisy(x: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=gen(seed))).clamp(-1, 1)


def test_shipped_digits_classifier_accuracy(digits, digits_metrics):
    xt, yt, _ = digits
    assert classifier_accuracy(digits_metrics.classifier, xt, yt) >= 0.95


def test_fd_on_digits_is_zero_to_itself_and_grows_with_noise(digits, digits_metrics):
    xt, _, xr = digits
    m = digits_metrics
    scale = float(torch.trace(m.ref_cov))
    assert m.fd(xt) < 1e-6 * scale
    fds = [m.fd(noisy(xt, s, seed=10)) for s in (0.1, 0.3, 0.6)]
    assert 0 < fds[0] < fds[1] < fds[2], fds
    assert m.fd(xr) < 0.25 * fds[2]  # held-out real digits are far closer than noisy ones


def test_fd_terms_split_the_distance_into_the_means_and_the_covariances(digits, digits_metrics):
    """A shift of every image moves the feature mean; the two parts sum to the distance; the means' part is
    ||mu - mu_ref||^2 of the features as computed here."""
    xt, _, xr = digits
    m = digits_metrics
    for x in (xr, noisy(xt, 0.3, seed=12), (xt + 0.5).clamp(-1, 1)):
        means, covs = m.fd_terms(x)
        assert means + covs == pytest.approx(m.fd(x), rel=1e-9, abs=1e-12)
        f = m.features(x)
        assert means == pytest.approx(float((f.mean(0) - m.ref_mean).pow(2).sum()), rel=1e-9)
        assert means >= 0 and covs >= -1e-9
    assert m.fd_terms(xt)[0] < 1e-6 * float(torch.trace(m.ref_cov))  # the reference itself: no mean gap
    from flowmatch.metrics.guard import NonFiniteInputWarning

    with pytest.warns(NonFiniteInputWarning, match="fd: non-finite input"):
        assert all(math.isnan(v) for v in m.fd_terms(torch.full_like(xt[:4], float("nan"))))


def test_kid_on_digits_halves(digits):
    xt = digits[0]
    h = xt.shape[0] // 2
    m = ImageFeatureMetrics("digits", xt[:h])
    same, _ = m.kid(xt[h:])
    worse, _ = m.kid(noisy(xt[h:], 0.6, seed=11))
    assert worse > 0 and abs(same) < 0.1 * worse, (same, worse)
    row = m(xt[h:])
    assert set(row) == {"fd", "kid", "kid_std"} and row["kid"] == pytest.approx(same)


def test_image_metrics_reject_images_of_another_shape(digits_metrics):
    with pytest.raises(MetricError, match=r"\[B, 1, 8, 8\].*\[4, 1, 28, 28\]"):
        digits_metrics.fd(torch.zeros(4, 1, 28, 28))
    with pytest.raises(MetricError, match=r"\[B, 1, 8, 8\]"):
        ImageFeatureMetrics("digits", torch.zeros(10, 3, 8, 8))


# ---------------------------------------------------------------------------- the loader's refusals


def test_mnist5k_weights_are_not_digits_weights():
    with pytest.raises(MetricError, match="mnist5k"):
        load_feature_classifier("digits", shipped_classifier_path("mnist5k"))
    assert load_feature_classifier("mnist5k").input_shape == (1, 28, 28)


def test_weights_of_the_wrong_shape_are_refused(tmp_path):
    net = FeatureClassifier(1, 28, 10, width=8, feature_dim=16)
    path = str(tmp_path / "wrong_shape.pt")
    save_feature_classifier(net, {"dataset": "digits", "shape": [1, 28, 28], "num_classes": 10, "width": 8,
                                  "feature_dim": 16}, path)
    with pytest.raises(MetricError, match=r"\[1, 28, 28\].*\[1, 8, 8\]"):
        load_feature_classifier("digits", path)


def test_weights_that_do_not_fit_their_info_are_refused(tmp_path):
    net = FeatureClassifier(1, 8, 10, width=8, feature_dim=16)
    path = str(tmp_path / "misfit.pt")
    save_feature_classifier(net, {"dataset": "digits", "shape": [1, 8, 8], "num_classes": 10, "width": 16,
                                  "feature_dim": 16}, path)
    with pytest.raises(MetricError, match="do not fit"):
        load_feature_classifier("digits", path)
    torch.save({"format": "something-else"}, str(tmp_path / "foreign.pt"))
    with pytest.raises(MetricError, match="not a flowmatch feature classifier"):
        load_feature_classifier("digits", str(tmp_path / "foreign.pt"))


def test_missing_weights_and_unshipped_datasets(tmp_path):
    missing = str(tmp_path / "nowhere.pt")
    with pytest.raises(WeightsNotFoundError, match="nowhere.pt.*train_feature_classifier.py") as e:
        load_feature_classifier("digits", missing)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, FlowmatchError)
    with pytest.raises(MetricError, match="cifar10.*train_feature_classifier.py.*path"):
        load_feature_classifier("cifar10")
    with pytest.raises(MetricError, match="cifar10"):
        ImageFeatureMetrics("cifar10", torch.zeros(4, 3, 32, 32))


UNPICKLED = []


class Payload:
    def __reduce__(self):
        return (UNPICKLED.append, ("ran",))


def test_weights_file_is_loaded_weights_only(tmp_path):
    path = str(tmp_path / "pickled.pt")
    net = FeatureClassifier(1, 8, 10, width=8, feature_dim=16)
    torch.save({"format": CLASSIFIER_FORMAT, "format_version": CLASSIFIER_FORMAT_VERSION,
                "info": {"dataset": "digits", "shape": [1, 8, 8], "num_classes": 10, "width": 8, "feature_dim": 16,
                         "note": Payload()}, "state_dict": net.state_dict()}, path)
    with pytest.raises(MetricError, match="needs code to load .*refused"):
        load_feature_classifier("digits", path)
    assert UNPICKLED == []
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(MetricError, match="truncated or not a torch file"):
        load_feature_classifier("digits", str(tmp_path / "junk.pt"))


# ----------------------------------------------------------------------- Inception FID (errors only)


def test_inception_fid_needs_an_existing_weights_file(tmp_path):
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(WeightsNotFoundError, match="inception.pth"):
        inception_fid(x, x, str(tmp_path / "inception.pth"))


def test_inception_fid_without_the_packages_names_the_extra(tmp_path, monkeypatch):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3", "torchmetrics",
                 "torchmetrics.image", "torchmetrics.image.fid"):
        monkeypatch.setitem(sys.modules, name, None)  # importing these now fails
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(MetricError, match=r"pip install 'flowmatch\[fid\]'"):
        inception_fid(x, x, str(weights))
    assert os.path.exists(weights)
