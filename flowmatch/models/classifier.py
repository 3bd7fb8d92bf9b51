"""A small CNN classifier whose penultimate layer is the feature space of the Frechet distance on small
image datasets (digits 8x8, MNIST 28x28), where Inception features are neither meaningful nor cheap.

Layout, for ``x`` ``[B, C, H, W]`` in [-1, 1]::

    conv3x3(C -> w, stride s)   GroupNorm SiLU    H/s x W/s
    conv3x3(w -> w, stride 2)   GroupNorm SiLU    H/2s x W/2s
    conv3x3(w -> 2w)            GroupNorm SiLU
    conv3x3(2w -> 2w, stride 2) GroupNorm SiLU    H/4s x W/4s
    global average pool -> linear(2w -> feature_dim) -> SiLU    = features(x)  [B, feature_dim]
    linear(feature_dim -> num_classes)                          = forward(x)   [B, num_classes]

The stem stride ``s`` is 1 for images under 16 pixels (digits: 8 -> 4 -> 2) and 2 from 16 pixels on
(MNIST: 28 -> 14 -> 7 -> 4), which keeps the network equally cheap at both sizes (a 3x3 stride-2 conv
still sees every pixel). GroupNorm rather than BatchNorm: no running statistics, so the features of
one image do not depend on the batch it is evaluated in, nor on train/eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureClassifier"]


def _groups(channels: int) -> int:
    # the largest of 8, 4, 2, 1 that divides the channel count
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def _block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(_groups(c_out), c_out), nn.SiLU()]


class FeatureClassifier(nn.Module):
    """Small CNN classifier: ``forward(x)`` -> logits ``[B, num_classes]``, ``features(x)`` -> the
    penultimate activations ``[B, feature_dim]`` (the space the Frechet distance is measured in).

    ``x`` is ``[B, in_channels, image_size, image_size]`` with pixels in [-1, 1]; any other shape is a
    ``ValueError`` naming the expected and the given shape.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, *, width: int = 24,
                 feature_dim: int = 128):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("image_size", image_size), ("num_classes", num_classes),
                            ("width", width), ("feature_dim", feature_dim)):
            if int(value) < 1:
                raise ValueError(f"FeatureClassifier: {name} must be >= 1, got {value}")
        if num_classes < 2:
            raise ValueError(f"FeatureClassifier: num_classes must be >= 2, got {num_classes}")
        self.in_channels, self.image_size, self.num_classes = int(in_channels), int(image_size), int(num_classes)
        self.width, self.feature_dim = int(width), int(feature_dim)
        w = self.width
        self.stem_stride = 2 if self.image_size >= 16 else 1
        self.body = nn.Sequential(*_block(in_channels, w, self.stem_stride), *_block(w, w, 2),
                                  *_block(w, 2 * w, 1), *_block(2 * w, 2 * w, 2))
        self.embed = nn.Sequential(nn.Linear(2 * w, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image's shape ``(C, H, W)``."""
        return (self.in_channels, self.image_size, self.image_size)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            expected = "[B, " + ", ".join(map(str, self.input_shape)) + "]"
            raise ValueError(f"FeatureClassifier expects images of shape {expected}, got {list(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` of images ``x`` ``[B, C, H, W]``."""
        self._check(x)
        return self.embed(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.head(self.features(x))
