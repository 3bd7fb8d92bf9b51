"""MLP velocity field ``v(x, t)`` for vector data ``[B, D]``."""

from __future__ import annotations

import torch
from torch import nn

from flowmatch.models.embeddings import FourierEmbedding, SinusoidalEmbedding, with_step, zero_linear
from flowmatch.utils import lookup

__all__ = ["MLPVelocity", "ACTIVATIONS"]

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "elu": nn.ELU}


class MLPVelocity(nn.Module):
    """``v(x, t) = MLP([x, emb(t)])``: ``x`` ``[B, dim]``, ``t`` ``[B]`` -> ``[B, dim]``.

    ``depth`` hidden layers of width ``hidden``; the time embedding is sinusoidal or random Fourier.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, activation: str = "silu",
                 time_embedding: str = "sinusoidal", time_dim: int = 64, fourier_scale: float = 16.0,
                 time_scale: float = 1000.0, step_input: bool = False):
        super().__init__()
        act = lookup(ACTIVATIONS, activation, "activation")
        if time_embedding == "fourier":
            self.time_embed: nn.Module = FourierEmbedding(time_dim, scale=fourier_scale)
        else:
            lookup({"sinusoidal": 0, "fourier": 0}, time_embedding, "time embedding")
            self.time_embed = SinusoidalEmbedding(time_dim, scale=time_scale)
        if depth < 1 or hidden < 1:
            raise ValueError(f"model depth and hidden must be >= 1, got depth={depth}, hidden={hidden}")
        layers: list[nn.Module] = []
        width_in = dim + time_dim
        for _ in range(depth):
            layers += [nn.Linear(width_in, hidden), act()]
            width_in = hidden
        layers.append(nn.Linear(width_in, dim))
        self.net = nn.Sequential(*layers)
        self.dim = dim
        self.step_proj = zero_linear(time_dim, time_dim) if step_input else None

    @property
    def step_input(self) -> bool:
        """Whether the model takes the step ``h`` of an any-step model (``model.step_input``)."""
        return self.step_proj is not None

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None, h=None) -> torch.Tensor:
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [B]=[{x.shape[0]}], got {tuple(t.shape)}")
        emb = with_step(self.time_embed(t).to(x.dtype), self.time_embed, self.step_proj, t, h)
        return self.net(torch.cat([x, emb.to(x.dtype)], dim=1))
