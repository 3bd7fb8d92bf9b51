"""Checkpoints: plain dicts written atomically, loaded with ``weights_only=True``.

A checkpoint is ``{format, version, model, ema, optimizer, scheduler, objective, step, config, rng}``
(``objective``: the training objective's name and state; an objective with other networks adds
``nets`` and ``players``, see :meth:`~flowmatch.training.trainer.Trainer.state_dict`); the model is
rebuilt from ``config`` (never unpickled).
"""

from __future__ import annotations

import os

import torch

from flowmatch.config import ExperimentConfig, from_dict
from flowmatch.errors import CheckpointError, ConfigError
from flowmatch.io import atomic_save, check_format, safe_load
from flowmatch.data.task import data_shape, num_classes
from flowmatch.models import build_model

__all__ = ["FORMAT", "FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "load_model", "LoadedModel"]

FORMAT = "flowmatch-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("format", "version", "model", "ema", "step", "config")


def save_checkpoint(path: str, state: dict) -> None:
    """Write a checkpoint dict (adds ``format`` and ``version``) atomically."""
    atomic_save({"format": FORMAT, "version": FORMAT_VERSION, **state}, path)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint; every failure is a one-line :class:`CheckpointError` (a file that
    is not a readable torch file, and one holding pickled objects, which are refused, are told apart)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint file at {path}")
    ckpt = safe_load(path, "checkpoint", error=CheckpointError, map_location=map_location)
    return check_format(ckpt, path, "checkpoint", FORMAT, FORMAT_VERSION, REQUIRED, error=CheckpointError)


class LoadedModel:
    """A model rebuilt from a checkpoint: ``model`` (EMA weights by default), ``config``, ``step``, ``path``."""

    def __init__(self, model: torch.nn.Module, config: ExperimentConfig, step: int, path: str):
        self.model, self.config, self.step, self.path = model, config, step, path


def load_model(path: str, *, use_ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the velocity model from a checkpoint's config and load its (EMA) weights, in eval mode."""
    ckpt = load_checkpoint(path)
    try:
        cfg = from_dict(ckpt["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} holds an invalid config: {e}") from None
    if cfg.lora.rank > 0:  # its weights are a base's with an adapter injected: not the plain model's
        raise CheckpointError(f"{path} is a LoRA run's checkpoint (lora.rank = {cfg.lora.rank}): use its adapter "
                              f"(adapter.pt beside it) on the base, e.g. `flowmatch sample BASE --adapter ADAPTER`, "
                              f"or `flowmatch adapter merge` for a full checkpoint")
    state = ckpt["ema"]["model"] if use_ema else ckpt["model"]
    classes = None
    if cfg.model.class_cond:  # from the weights (the class embedding has a row per class + the null one),
        emb = state.get("class_embed.weight") if isinstance(state, dict) else None  # not by loading the data
        classes = int(emb.shape[0]) - 1 if emb is not None else num_classes(cfg.data)
    model = build_model(cfg.model, data_shape(cfg.data), classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the model of its config "
                              f"({str(e).splitlines()[0]})") from None
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model, cfg, int(ckpt["step"]), path)
