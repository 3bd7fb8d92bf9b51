"""Time embeddings: ``[B]`` times in [0, 1] -> ``[B, dim]`` features; the optional step input.

A model built with ``step_input=True`` (``model.step_input``) takes a second time, the step ``h`` ``[B]``
(``v(x, t, cond=None, h=None)``): the span of the jump the any-step objectives train, Frans et al.'s
``d`` or MeanFlow's ``t - r``. It goes through the model's own time embedding (the same sinusoids and,
in the UNet, the same MLP) and is added to the time features through a zero-initialised linear map,
``step_proj``; ``h = None`` is ``h = 0``. So a step-input model whose other weights are a plain flow
model's (:func:`load_flow_weights`) is that model for every ``h`` until training moves ``step_proj``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["SinusoidalEmbedding", "FourierEmbedding", "TIME_EMBEDDINGS", "STEP_KEYS", "zero_linear", "step_features", "with_step",
           "load_flow_weights"]


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


# the weights a step-input model has and a plain one lacks (the zero-initialised projection)
STEP_KEYS = ("step_proj.weight", "step_proj.bias")


def zero_linear(dim_in: int, dim_out: int) -> nn.Linear:
    """A ``Linear(dim_in, dim_out)`` whose weight and bias start at zero."""
    lin = nn.Linear(dim_in, dim_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def with_step(emb: torch.Tensor, embed, proj: Optional[nn.Module], t: torch.Tensor, h) -> torch.Tensor:
    """The time features ``emb`` ``[B, dim]`` of a model with the step ``h`` added (:func:`step_features`)
    when the model has a step input (``proj``, its ``step_proj``), else ``emb`` itself; ``h`` given to a
    model without one is a ``ValueError``."""
    if proj is not None:
        return emb + step_features(embed, proj, t, h)
    if h is not None:
        raise ValueError("this model has no step input h (model.step_input=false)")
    return emb


def step_features(embed, proj: nn.Module, t: torch.Tensor, h) -> torch.Tensor:
    """``proj(embed(h))`` ``[B, dim]`` for the step ``h`` ``[B]`` (``None``: zeros like ``t``) through the
    time embedding ``embed`` (its features cast to ``proj``'s dtype); ``h`` must have the shape of ``t``."""
    if h is None:
        h = torch.zeros_like(t)
    if not torch.is_tensor(h) or h.shape != t.shape:
        raise ValueError(f"the step h must have shape [B]={list(t.shape)}, got "
                         f"{tuple(h.shape) if torch.is_tensor(h) else type(h).__name__}")
    return proj(embed(h.to(t.dtype)).to(proj.weight.dtype))


def load_flow_weights(model: nn.Module, state: dict) -> None:
    """Load a model's ``state`` into ``model``: strictly, except that a plain model's weights (no
    :data:`STEP_KEYS`) go into a step-input model, whose ``step_proj`` then keeps its zero start. Any other
    missing or unexpected key is a ``RuntimeError`` naming it."""
    has_step = getattr(model, "step_proj", None) is not None
    if not has_step or any(k in state for k in STEP_KEYS):
        model.load_state_dict(state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k not in STEP_KEYS] + list(unexpected)
    if bad:
        raise RuntimeError(f"weights do not fit the model: {'missing' if bad[0] in missing else 'unexpected'} "
                           f"key {bad[0]!r} (and {len(bad) - 1} more)")
