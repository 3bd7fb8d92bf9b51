"""What "sample quality" means for a task, shared by training's evaluation, the bench and reflow.

Toy tasks score samples by exact W2 and MMD against fresh target draws (:class:`flowmatch.bench.ToyScorer`).
Image tasks score them in the feature space of a small classifier trained on the same dataset
(:class:`flowmatch.bench.ImageScorer`): Fréchet distance and KID against the training split; the
floor is the test split's FD to the same reference (real held-out images of that size). A
class-conditional model is sampled with labels ``0, 1, ..., K - 1, 0, 1, ...`` (balanced classes) and
classifier-free guidance of ``eval.guidance``.
"""

from __future__ import annotations

from typing import Optional

import torch

from flowmatch.bench import ImageScorer, ToyScorer
from flowmatch.data.task import build_task, is_image_task
from flowmatch.models import ClassifierFreeGuidance

__all__ = ["LabeledField", "sampling_field", "make_scorer", "image_reference", "inception_score_of"]


class LabeledField:
    """``v(x, t)`` of a class-conditional model for batches of up to ``len(labels)`` rows: a batch of
    ``B`` rows gets ``labels[:B]`` (so prefixes of one set of source draws keep their labels), with
    classifier-free guidance of ``scale``."""

    conditional = True  # the bench skips the likelihood of such fields

    def __init__(self, model, labels: torch.Tensor, scale: float = 1.0):
        self.model, self.labels, self.scale = model, labels, float(scale)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self.labels[: x.shape[0]].to(x.device)
        return ClassifierFreeGuidance(self.model, y, self.scale)(x, t)


def sampling_field(model, n: int, guidance: float = 1.0):
    """The field to integrate for ``n`` samples: ``model`` itself, or for a class-conditional model a
    :class:`LabeledField` with balanced labels ``i % K``."""
    k = getattr(model, "num_classes", None)
    if not k:
        return model
    return LabeledField(model, torch.arange(n) % k, guidance)


def image_reference(cfg, n: int, *, device: str | torch.device = "cpu"):
    """``(metrics, floor_images)`` for an image task: a :class:`~flowmatch.metrics.frechet.ImageFeatureMetrics`
    whose reference is the target's training split (at most ``max(n, 2000)`` images, a fixed subset)
    and the test split's images (for the floor)."""
    from flowmatch.metrics.frechet import ImageFeatureMetrics

    train = build_task(cfg.data, split="train").target
    test = build_task(cfg.data, split="test").target
    xr, _ = train.tensors()
    cap = max(n, 2000)
    if len(xr) > cap:
        xr = xr[torch.randperm(len(xr), generator=torch.Generator().manual_seed(0))[:cap]]
    metrics = ImageFeatureMetrics(cfg.data.target, xr, path=cfg.eval.classifier, device=device)
    xt, _ = test.tensors()
    return metrics, xt


def make_scorer(cfg, n: int, *, seed: int = 0, device: str | torch.device = "cpu"):
    """The bench scorer of ``cfg``'s task for rows of up to ``n`` samples."""
    if is_image_task(cfg.data):
        metrics, floor_images = image_reference(cfg, n, device=device)
        return ImageScorer(metrics, floor_images, seed)
    return ToyScorer(build_task(cfg.data).target, n, seed)


def inception_score_of(cfg, x1: torch.Tensor, *, device: str | torch.device = "cpu") -> Optional[float]:
    """Inception FID of samples ``x1`` against the training split when ``cfg.eval.inception`` names
    a local weights file; else None."""
    if not cfg.eval.inception:
        return None
    from flowmatch.metrics.frechet import inception_fid

    ref, _ = build_task(cfg.data, split="train").target.tensors()
    return inception_fid(x1, ref[: max(len(x1), 2000)], cfg.eval.inception, device=device)
