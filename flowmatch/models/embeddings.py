"""Time embeddings: ``[B]`` times in [0, 1] -> ``[B, dim]`` features."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SinusoidalEmbedding", "FourierEmbedding", "TIME_EMBEDDINGS"]


class SinusoidalEmbedding(nn.Module):
    """Transformer-style sinusoids of ``scale * t`` at geometric frequencies (Vaswani et al. 2017).

    ``t`` in [0, 1] is multiplied by ``scale`` (default 1000) so the lowest frequencies still
    resolve small time differences.
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale
        self.dim = dim

    def parts(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cosine and sine halves of the features (in the features' dtype, fp32 by default):
        ``forward(t)`` is their concatenation cast to ``t``'s dtype."""
        arg = (self.scale * t)[:, None].to(self.freqs.dtype) * self.freqs[None, :]
        return torch.cos(arg), torch.sin(arg)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.parts(t), dim=1).to(t.dtype)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos 2 pi w t, sin 2 pi w t]``, ``w ~ N(0, scale^2)`` fixed at init
    (Tancik et al. 2020); ``w`` is a persistent buffer so checkpoints restore it."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        self.register_buffer("w", torch.randn(dim // 2) * scale)
        self.dim = dim

    def parts(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cosine and sine halves of the features: ``forward(t)`` is their concatenation."""
        arg = 2 * math.pi * t[:, None] * self.w[None, :].to(t.dtype)
        return torch.cos(arg), torch.sin(arg)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.parts(t), dim=1)


TIME_EMBEDDINGS = {"sinusoidal": SinusoidalEmbedding, "fourier": FourierEmbedding}
