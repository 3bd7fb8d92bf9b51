"""Frechet distance and kernel distance between sets of image features.

- :func:`gaussian_frechet`: the Frechet (2-Wasserstein) distance between two Gaussians (Dowson &
  Landau 1982), ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})``, the quantity FID
  reports (Heusel et al. 2017, eq. 6). The trace term is computed as the nuclear norm of
  ``S1^{1/2} S2^{1/2}`` (``S1^{1/2} S2 S1^{1/2} = A A^T`` with ``A = S1^{1/2} S2^{1/2}``, so its square
  root has the singular values of ``A`` as eigenvalues), each square root by a symmetric
  eigendecomposition in float64 with tiny negative eigenvalues clamped to 0. No non-symmetric
  ``sqrtm`` (and no complex parts to discard) is involved.
- :func:`frechet_distance`: the same between the Gaussians fitted to two feature sets ``[N, F]``
  (mean, covariance with the ``N - 1`` denominator).
- :func:`kernel_distance`: KID (Binkowski et al. 2018), the unbiased squared MMD with the cubic
  polynomial kernel ``k(x, y) = (x . y / F + 1)^3``, averaged over random subsets.
- :class:`ImageFeatureMetrics`: both, for images, in the feature space of a small classifier trained
  on the dataset (:class:`~flowmatch.models.classifier.FeatureClassifier`). Weights for ``digits`` and
  ``mnist5k`` ship with the package (``flowmatch/assets/classifier_{dataset}.pt``, made by
  ``experiments/classifiers/train_feature_classifier.py``). These numbers compare models on one
  dataset with one classifier; they are not Inception FIDs and not comparable with published ones.
- :func:`inception_fid`: the Inception FID through torchmetrics or torch-fidelity (``pip install
  'flowmatch[fid]'``), from a local Inception weights file; nothing is downloaded.

Non-finite input (a NaN or inf in an image, a feature set or a Gaussian's parameters): every metric
here returns NaN (KID: ``(nan, nan)``) and warns (:mod:`flowmatch.metrics.guard`).
"""

from __future__ import annotations

import importlib.resources
import inspect
import os
import zipfile
from typing import Optional

import torch

from flowmatch.data.task import FIXED_IMAGE_SHAPES
from flowmatch.errors import FlowmatchError
from flowmatch.io import safe_load
from flowmatch.metrics.guard import finite_inputs
from flowmatch.models.classifier import FeatureClassifier
from flowmatch.training.classifier import CLASSIFIER_FORMAT, CLASSIFIER_FORMAT_VERSION
from flowmatch.utils import make_generator, resolve_device

__all__ = ["gaussian_frechet", "frechet_distance", "kernel_distance", "load_feature_classifier",
           "shipped_classifier_path", "ImageFeatureMetrics", "inception_fid", "MetricError", "WeightsNotFoundError",
           "SHIPPED_CLASSIFIERS", "TRAIN_SCRIPT"]

SHIPPED_CLASSIFIERS = ("digits", "mnist5k")
TRAIN_SCRIPT = "experiments/classifiers/train_feature_classifier.py"
# kernel_distance computes the full kernel matrices once (for all subsets) up to this many rows per set
_GRAM_MAX = 4096


class MetricError(FlowmatchError):
    """A metric cannot be computed as asked: wrong feature classifier, wrong image shape, a missing
    optional package."""


class WeightsNotFoundError(MetricError, FileNotFoundError):
    """A weights file a metric needs does not exist."""


# --------------------------------------------------------------------------------------------------
# Gaussian statistics
# --------------------------------------------------------------------------------------------------


def _as_features(f: torch.Tensor, name: str) -> torch.Tensor:
    f = torch.as_tensor(f).detach().to("cpu", torch.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be a feature set of shape [N, F], got {list(f.shape)}")
    if f.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 feature vectors, got {f.shape[0]}")
    return f


def _mean_cov(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = f.mean(dim=0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    evals, evecs = torch.linalg.eigh((s + s.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def gaussian_frechet(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Squared Frechet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (``mu`` ``[F]``, ``cov``
    ``[F, F]``), in float64: ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})``.
    Round-off below zero is reported as 0. A NaN or inf in a parameter: NaN and a warning."""
    mu1, mu2 = (torch.as_tensor(m).detach().to("cpu", torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(c).detach().to("cpu", torch.float64) for c in (cov1, cov2))
    f = mu1.shape[0]
    if mu2.shape != (f,) or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"gaussian_frechet: shapes do not agree: mu1 {list(mu1.shape)}, cov1 {list(s1.shape)}, "
                         f"mu2 {list(mu2.shape)}, cov2 {list(s2.shape)}")
    if not finite_inputs("gaussian_frechet", mu1=mu1, cov1=s1, mu2=mu2, cov2=s2):
        return float("nan")
    return _frechet(mu1, s1, mu2, s2)


def _cross(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``tr((S1^1/2 S2 S1^1/2)^1/2)``, the covariances' shared term of the distance (0-d float64)."""
    return torch.linalg.svdvals(_sqrt_psd(s1) @ _sqrt_psd(s2)).sum()


def _frechet(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """:func:`gaussian_frechet` on checked float64 CPU parameters (no shape or finiteness checks)."""
    value = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * _cross(s1, s2)
    return max(float(value), 0.0)


def _frechet_terms(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> tuple[float, float]:
    """The two parts of :func:`_frechet`: the means' ``||mu1 - mu2||^2`` and the covariances'
    ``tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``; their sum is the distance (to rounding)."""
    return float((mu1 - mu2).pow(2).sum()), float(torch.trace(s1) + torch.trace(s2) - 2 * _cross(s1, s2))


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to feature sets ``f1`` ``[N1, F]`` and ``f2`` ``[N2, F]``.
    A NaN or inf in a feature: NaN and a warning."""
    a, b = _as_features(f1, "f1"), _as_features(f2, "f2")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    if not finite_inputs("frechet_distance", f1=a, f2=b):
        return float("nan")
    return _frechet(*_mean_cov(a), *_mean_cov(b))


def _cubic_kernel(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``k(x, y) = (x . y / F + 1)^3`` for all rows of ``p`` ``[n, F]`` and ``q`` ``[m, F]`` -> ``[n, m]``."""
    return (p @ q.T / p.shape[1] + 1).pow(3)


def kernel_distance(f1: torch.Tensor, f2: torch.Tensor, *, num_subsets: int = 100, subset_size: int = 1000,
                    generator: Optional[torch.Generator] = None) -> tuple[float, float]:
    """KID between feature sets ``f1`` ``[N1, F]`` and ``f2`` ``[N2, F]``: ``(mean, std)`` over
    ``num_subsets`` draws of the unbiased squared MMD (Gretton et al. 2012, eq. 3) with the kernel
    ``k(x, y) = (x . y / F + 1)^3``. Each draw takes ``m = min(subset_size, N1, N2)`` rows of each set
    without replacement; ``std`` is the population standard deviation of the draws. ``generator``
    picks the subsets; ``None`` means a fixed seed (0), so the result is reproducible. Sets of up to
    4,096 rows have their kernel matrices computed once for all subsets. A NaN or inf in a feature:
    ``(nan, nan)`` and a warning."""
    return _kernel_distance(_as_features(f1, "f1"), _as_features(f2, "f2"), num_subsets=num_subsets,
                            subset_size=subset_size, generator=generator, guard=True)


def _kernel_distance(a: torch.Tensor, b: torch.Tensor, *, num_subsets: int, subset_size: int,
                     generator: Optional[torch.Generator], guard: bool) -> tuple[float, float]:
    """:func:`kernel_distance` on float64 feature sets; ``guard=False`` when the caller has checked
    that the inputs the features come from are finite."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kernel_distance: feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"kernel_distance: num_subsets must be >= 1, got {num_subsets}")
    m = min(int(subset_size), a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"kernel_distance: subset_size must be >= 2, got {subset_size}")
    if guard and not finite_inputs("kernel_distance", stacklevel=4, f1=a, f2=b):
        return float("nan"), float("nan")
    g = generator if generator is not None else make_generator(0)
    na, nb, off = a.shape[0], b.shape[0], m * (m - 1)
    draws = [(torch.randperm(na, generator=g, device=g.device)[:m].cpu(),
              torch.randperm(nb, generator=g, device=g.device)[:m].cpu()) for _ in range(num_subsets)]
    if max(na, nb) <= _GRAM_MAX:
        # every kernel entry once; subset i's sums are s_i^T K s_i with s_i its 0/1 selection vector
        sel_a = torch.zeros(na, num_subsets, dtype=torch.float64)
        sel_b = torch.zeros(nb, num_subsets, dtype=torch.float64)
        for i, (ia, ib) in enumerate(draws):
            sel_a[ia, i], sel_b[ib, i] = 1.0, 1.0
        kaa, kbb, kab = _cubic_kernel(a, a), _cubic_kernel(b, b), _cubic_kernel(a, b)
        sxx = ((kaa @ sel_a) * sel_a).sum(0) - kaa.diagonal() @ sel_a
        syy = ((kbb @ sel_b) * sel_b).sum(0) - kbb.diagonal() @ sel_b
        sxy = ((kab @ sel_b) * sel_a).sum(0)
    else:
        sxx, syy, sxy = (torch.empty(num_subsets, dtype=torch.float64) for _ in range(3))
        for i, (ia, ib) in enumerate(draws):
            x, y = a[ia], b[ib]
            kxx, kyy = _cubic_kernel(x, x), _cubic_kernel(y, y)
            sxx[i], syy[i] = kxx.sum() - kxx.diagonal().sum(), kyy.sum() - kyy.diagonal().sum()
            sxy[i] = _cubic_kernel(x, y).sum()
    values = sxx / off + syy / off - 2 * sxy / (m * m)
    return float(values.mean()), float(values.std(correction=0))


# --------------------------------------------------------------------------------------------------
# The feature classifier
# --------------------------------------------------------------------------------------------------


def shipped_classifier_path(dataset: str) -> str:
    """Path of the shipped classifier weights of ``dataset`` (``digits`` or ``mnist5k``); the file may
    be missing in a source checkout where it was never made."""
    if dataset not in SHIPPED_CLASSIFIERS:
        raise MetricError(f"no feature classifier ships for dataset {dataset!r} (shipped: "
                          f"{', '.join(SHIPPED_CLASSIFIERS)}); train one with `python {TRAIN_SCRIPT} --dataset "
                          f"{dataset} --out PATH` and pass path=PATH")
    return str(importlib.resources.files("flowmatch").joinpath("assets", f"classifier_{dataset}.pt"))


def load_feature_classifier(dataset: str, path: Optional[str] = None, *,
                            device: str | torch.device = "cpu") -> FeatureClassifier:
    """The feature classifier of ``dataset`` in eval mode with gradients off: the shipped weights
    (``digits``, ``mnist5k``) or those at ``path`` (written by
    :func:`~flowmatch.training.classifier.save_feature_classifier`).

    The file is read with ``torch.load(weights_only=True)`` (a pickled object is refused). A file made
    for another dataset, or for images of another shape than ``dataset``'s, is a :class:`MetricError`;
    a missing file is a :class:`WeightsNotFoundError` naming the path and the script that makes it.
    """
    path = shipped_classifier_path(dataset) if path is None else os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"no feature classifier weights at {path}; make them with `python {TRAIN_SCRIPT} "
                                   f"--dataset {dataset} --out {path}`")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is truncated or foreign
        raise MetricError(f"feature classifier file {path} is truncated or not a torch file (not a zip archive)")
    blob = safe_load(path, "feature classifier file", error=MetricError)
    if not isinstance(blob, dict) or blob.get("format") != CLASSIFIER_FORMAT:
        raise MetricError(f"{path} is not a flowmatch feature classifier (no format={CLASSIFIER_FORMAT!r} entry)")
    if blob.get("format_version") != CLASSIFIER_FORMAT_VERSION:
        raise MetricError(f"feature classifier {path} has format version {blob.get('format_version')}; this "
                          f"flowmatch reads version {CLASSIFIER_FORMAT_VERSION}")
    info, state = blob.get("info"), blob.get("state_dict")
    keys = ("dataset", "shape", "num_classes", "width", "feature_dim")
    if not isinstance(info, dict) or not isinstance(state, dict) or any(k not in info for k in keys):
        raise MetricError(f"feature classifier {path} lacks its info ({', '.join(keys)}) or its state_dict")
    try:
        shape = tuple(int(s) for s in info["shape"])
    except (TypeError, ValueError):
        raise MetricError(f"feature classifier {path} has an unreadable image shape {info['shape']!r}") from None
    if info["dataset"] != dataset:
        raise MetricError(f"feature classifier {path} was trained on {info['dataset']!r} {list(shape)}, "
                          f"not on {dataset!r}")
    expected = FIXED_IMAGE_SHAPES.get(dataset)
    if len(shape) != 3 or shape[1] != shape[2] or (expected is not None and shape != tuple(expected)):
        want = list(expected) if expected is not None else "[C, H, H]"
        raise MetricError(f"feature classifier {path} takes images of shape {list(shape)}; {dataset} images are "
                          f"{want}")
    try:
        model = FeatureClassifier(shape[0], shape[1], int(info["num_classes"]), width=int(info["width"]),
                                  feature_dim=int(info["feature_dim"]))
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as e:
        raise MetricError(f"feature classifier {path}: weights do not fit the network its info describes "
                          f"({str(e).splitlines()[0]})") from None
    return model.to(resolve_device(device)).eval().requires_grad_(False)


class ImageFeatureMetrics:
    """Frechet distance and KID of image sets against one fixed ``reference`` set ``[N, C, H, W]``
    (pixels in [-1, 1]), in the feature space of ``dataset``'s feature classifier (``classifier``,
    else the weights at ``path``, else the shipped ones).

    The reference features (``ref_features`` ``[N, F]``, float64, CPU) and their mean and covariance
    are computed once. ``fd(x)`` and ``kid(x)`` compare ``x`` ``[M, C, H, W]`` with them; calling the
    object returns ``{"fd", "kid", "kid_std"}``. Non-finite images (in ``x``, or in the reference, warned
    about once when the object is built) give NaN scores and a warning, as every metric does.
    """

    def __init__(self, dataset: str, reference: torch.Tensor, *, classifier: Optional[FeatureClassifier] = None,
                 path: Optional[str] = None, device: str | torch.device = "cpu", batch_size: int = 500):
        if classifier is not None and path is not None:
            raise ValueError("ImageFeatureMetrics: pass a classifier or a path, not both")
        self.dataset, self.device, self.batch_size = dataset, resolve_device(device), int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"ImageFeatureMetrics: batch_size must be >= 1, got {batch_size}")
        if classifier is None:
            classifier = load_feature_classifier(dataset, path, device=self.device)
        self.classifier = classifier.to(self.device).eval().requires_grad_(False)
        self._check_shape(reference)
        self.finite = finite_inputs(f"{dataset} feature metrics", reference=reference)
        self.ref_features = self.features(reference)
        if self.ref_features.shape[0] < 2:
            raise ValueError("ImageFeatureMetrics needs a reference set of at least 2 images")
        self.ref_mean, self.ref_cov = _mean_cov(self.ref_features)

    def _check_shape(self, x: torch.Tensor) -> None:
        want = tuple(self.classifier.input_shape)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise MetricError(f"the {self.dataset} feature classifier takes images of shape [B, "
                              f"{', '.join(map(str, want))}]; got {list(x.shape)}")

    def _scorable(self, metric: str, x: torch.Tensor) -> bool:
        """False (with a warning about ``x``) when ``x`` or the reference holds a NaN or an inf."""
        self._check_shape(x)
        return self.finite and finite_inputs(metric, stacklevel=4, x=x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Classifier features of images ``x`` ``[M, C, H, W]`` -> ``[M, F]`` (float64, CPU)."""
        self._check_shape(x)
        out = []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i:i + self.batch_size].to(self.device, torch.float32)
                out.append(self.classifier.features(xb).to("cpu", torch.float64))
        return torch.cat(out) if out else torch.empty(0, self.classifier.feature_dim, dtype=torch.float64)

    def fd(self, x: torch.Tensor) -> float:
        """Frechet distance between ``x``'s features and the reference's (NaN for non-finite images)."""
        if not self._scorable("fd", x):
            return float("nan")
        f = _as_features(self.features(x), "x")
        return _frechet(*_mean_cov(f), self.ref_mean, self.ref_cov)

    def fd_terms(self, x: torch.Tensor) -> tuple[float, float]:
        """:meth:`fd`'s two parts, ``(means, covariances)``: how far ``x``'s feature mean lies from the
        reference's (``||mu - mu_ref||^2``) and what the covariances add (``tr(S + S_ref - 2 (S^1/2 S_ref
        S^1/2)^1/2)``); they sum to ``fd(x)`` (NaN for non-finite images)."""
        if not self._scorable("fd", x):
            return float("nan"), float("nan")
        f = _as_features(self.features(x), "x")
        return _frechet_terms(*_mean_cov(f), self.ref_mean, self.ref_cov)

    def kid(self, x: torch.Tensor, generator: Optional[torch.Generator] = None, *, num_subsets: int = 100,
            subset_size: int = 1000) -> tuple[float, float]:
        """KID ``(mean, std)`` between ``x``'s features and the reference's (:func:`kernel_distance`;
        ``(nan, nan)`` for non-finite images)."""
        if not self._scorable("kid", x):
            return float("nan"), float("nan")
        return _kernel_distance(_as_features(self.features(x), "x"), self.ref_features, num_subsets=num_subsets,
                                subset_size=subset_size, generator=generator, guard=False)

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict:
        if not self._scorable("fd and kid", x):
            return {"fd": float("nan"), "kid": float("nan"), "kid_std": float("nan")}
        f = _as_features(self.features(x), "x")
        kid, kid_std = _kernel_distance(f, self.ref_features, num_subsets=100, subset_size=1000, generator=generator,
                                        guard=False)
        return {"fd": _frechet(*_mean_cov(f), self.ref_mean, self.ref_cov), "kid": kid, "kid_std": kid_std}


# --------------------------------------------------------------------------------------------------
# Inception FID (optional packages)
# --------------------------------------------------------------------------------------------------


def _to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` in [-1, 1] -> ``[B, 3, H, W]`` uint8 (grayscale repeated to 3 channels)."""
    u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u8.repeat(1, 3, 1, 1) if u8.shape[1] == 1 else u8


def inception_fid(x: torch.Tensor, y: torch.Tensor, weights_path: str, *, batch_size: int = 100,
                  device: str | torch.device = "cpu") -> float:
    """Inception FID between images ``x`` (e.g. generated) and ``y`` (the reference), each
    ``[N, C, H, W]`` with ``C`` 1 or 3 and pixels in [-1, 1].

    The images are quantised to uint8, grayscale is repeated to 3 channels, and the backend resizes
    them to 299 x 299: torchmetrics' ``FrechetInceptionDistance`` (2048 pool features) when it accepts
    a local ``feature_extractor_weights_path``, else torch-fidelity's Inception feature extractor
    followed by :func:`frechet_distance`. ``weights_path`` is a local torch-fidelity Inception weights
    file (``weights-inception-2015-12-05-*.pth``); nothing is downloaded. The backends unpickle that
    file fully, so it must come from a trusted source.

    Non-finite images in ``x`` or ``y``: NaN and a warning. Only the error paths (missing weights
    file, neither package installed) are tested here: no Inception weights are available offline.
    """
    weights_path = os.fspath(weights_path)
    if not os.path.isfile(weights_path):
        raise WeightsNotFoundError(f"no Inception weights file at {weights_path}; inception_fid downloads nothing, "
                                   f"pass the path of a local Inception (torch-fidelity format) weights file")
    for name, t in (("x", x), ("y", y)):
        if t.ndim != 4 or t.shape[1] not in (1, 3) or t.shape[0] < 2:
            raise MetricError(f"inception_fid takes image sets [N >= 2, 1 or 3, H, W]; {name} is {list(t.shape)}")
    if not finite_inputs("inception_fid", x=x, y=y):
        return float("nan")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise MetricError("inception_fid needs torch-fidelity (and optionally torchmetrics): "
                          "pip install 'flowmatch[fid]'") from None
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        FrechetInceptionDistance = None
    dev = resolve_device(device)
    try:
        if (FrechetInceptionDistance is not None
                and "feature_extractor_weights_path" in inspect.signature(FrechetInceptionDistance).parameters):
            metric = FrechetInceptionDistance(feature=2048, normalize=False,
                                              feature_extractor_weights_path=weights_path).to(dev)
            for imgs, real in ((y, True), (x, False)):
                for i in range(0, imgs.shape[0], batch_size):
                    metric.update(_to_uint8_rgb(imgs[i:i + batch_size]).to(dev), real=real)
            return float(metric.compute())
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=weights_path).to(dev)
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise MetricError(f"Inception weights {weights_path} could not be used: {str(e).splitlines()[0]}") from None

    def feats(imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([net(_to_uint8_rgb(imgs[i:i + batch_size]).to(dev))[0].to("cpu", torch.float64)
                              for i in range(0, imgs.shape[0], batch_size)])

    return frechet_distance(feats(x), feats(y))
