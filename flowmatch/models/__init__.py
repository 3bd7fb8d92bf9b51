"""Velocity models (pure ``nn.Module``s) and their EMA."""

from __future__ import annotations

from torch import nn

from flowmatch.models.ema import EMA
from flowmatch.models.embeddings import TIME_EMBEDDINGS, FourierEmbedding, SinusoidalEmbedding
from flowmatch.models.mlp import ACTIVATIONS, MLPVelocity
from flowmatch.utils import lookup

__all__ = ["EMA", "MLPVelocity", "SinusoidalEmbedding", "FourierEmbedding", "TIME_EMBEDDINGS", "ACTIVATIONS",
           "MODELS", "build_model"]

MODELS = {"mlp": MLPVelocity}


def build_model(model_cfg, dim: int) -> nn.Module:
    """Build the velocity model described by a :class:`~flowmatch.config.ModelConfig` for data of ``dim``."""
    cls = lookup(MODELS, model_cfg.name, "model")
    return cls(dim=dim, hidden=model_cfg.hidden, depth=model_cfg.depth, activation=model_cfg.activation,
               time_embedding=model_cfg.time_embedding, time_dim=model_cfg.time_dim,
               fourier_scale=model_cfg.fourier_scale, time_scale=model_cfg.time_scale)
