"""Velocity models (pure ``nn.Module``s) and their EMA."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from flowmatch.errors import ConfigError
from flowmatch.models.ema import EMA
from flowmatch.models.embeddings import (STEP_KEYS, TIME_EMBEDDINGS, FourierEmbedding, SinusoidalEmbedding,
                                         load_flow_weights)
from flowmatch.models.mlp import ACTIVATIONS, MLPVelocity
from flowmatch.models.unet import UNET_PRESETS, ClassifierFreeGuidance, UNetVelocity, unet_kwargs
from flowmatch.models.classifier import FeatureClassifier
from flowmatch.utils import lookup

__all__ = ["EMA", "MLPVelocity", "SinusoidalEmbedding", "FourierEmbedding", "TIME_EMBEDDINGS", "ACTIVATIONS",
           "MODELS", "build_model", "STEP_KEYS", "load_flow_weights",
           "UNetVelocity", "UNET_PRESETS", "unet_kwargs", "ClassifierFreeGuidance", "FeatureClassifier"]

MODELS = {"mlp": MLPVelocity, "unet": UNetVelocity}


def build_model(model_cfg, shape: int | Sequence[int], num_classes: Optional[int] = None) -> nn.Module:
    """Build the velocity model a :class:`~flowmatch.config.ModelConfig` describes for data of one
    sample's ``shape`` (``(dim,)`` or an int for flat data, ``(C, H, W)`` for images); a
    ``class_cond`` model takes ``num_classes`` labels (plus the null label of guidance)."""
    cls = lookup(MODELS, model_cfg.name, "model")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if model_cfg.class_cond and not num_classes:
        raise ConfigError("model.class_cond needs a dataset with class labels")
    if cls is MLPVelocity:
        if len(shape) != 1:
            raise ConfigError(f"model.name=mlp takes flat data [B, D]; the data here is {list(shape)} images: "
                              f"use model.name=unet")
        if model_cfg.class_cond:
            raise ConfigError("model.class_cond is implemented by the unet model only")
        return cls(dim=shape[0], hidden=model_cfg.hidden, depth=model_cfg.depth, activation=model_cfg.activation,
                   time_embedding=model_cfg.time_embedding, time_dim=model_cfg.time_dim,
                   fourier_scale=model_cfg.fourier_scale, time_scale=model_cfg.time_scale,
                   step_input=model_cfg.step_input)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"model.name=unet takes square images [B, C, H, H]; the data here is {list(shape)}")
    kw = unet_kwargs(model_cfg.preset, base_channels=model_cfg.base_channels, channel_mult=model_cfg.channel_mult,
                     num_res_blocks=model_cfg.num_res_blocks, attention_resolutions=model_cfg.attention_resolutions,
                     dropout=model_cfg.dropout, num_heads=model_cfg.num_heads)
    try:
        return cls(shape[0], shape[1], num_classes=num_classes if model_cfg.class_cond else None,
                   time_scale=model_cfg.time_scale, step_input=model_cfg.step_input, **kw)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
