"""Build the objects a config describes (data, path, coupling, time sampler, model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowmatch.config import ExperimentConfig
from flowmatch.couplings import Coupling, get_coupling
from flowmatch.data import ToyDistribution, get_dataset
from flowmatch.errors import ConfigError
from flowmatch.models import build_model
from flowmatch.paths import AffinePath, get_path
from flowmatch.solvers import get_solver
from flowmatch.timesteps import TimeSampler, get_time_sampler
from flowmatch.training.losses import LOSSES
from flowmatch.training.tracking import TRACKING_MODES
from flowmatch.utils import lookup, resolve_device

__all__ = ["Components", "build_components"]


@dataclass
class Components:
    device: torch.device
    source: ToyDistribution
    target: ToyDistribution
    path: AffinePath
    coupling: Coupling
    time_sampler: TimeSampler
    model: nn.Module


def build_components(cfg: ExperimentConfig, device: str | torch.device | None = None) -> Components:
    """Validate every name in ``cfg`` against its registry and build the training objects.

    The model is initialised from ``torch.manual_seed(cfg.train.seed)`` so a config fixes it.
    """
    dev = resolve_device(cfg.train.device if device is None else device)
    source = get_dataset(cfg.data.source, cfg.data.dim)
    target = get_dataset(cfg.data.target, cfg.data.dim)
    path = get_path(cfg.path.name, sigma=cfg.path.sigma)
    coupling = get_coupling(cfg.coupling.name, source, target, device=dev, method=cfg.coupling.method,
                            reg=cfg.coupling.reg, num_iters=cfg.coupling.num_iters)
    time_sampler = get_time_sampler(cfg.time.name, loc=cfg.time.loc, scale=cfg.time.scale, a=cfg.time.a)
    lookup(LOSSES, cfg.train.loss, "loss")
    get_solver(cfg.eval.solver)
    lookup({m: m for m in TRACKING_MODES}, cfg.tracking.mode, "tracking mode")
    lookup({m: m for m in ("constant", "cosine")}, cfg.train.lr_schedule, "lr schedule")
    t = cfg.train
    for key, value, low in (("train.steps", t.steps, 1), ("train.batch_size", t.batch_size, 1),
                            ("train.ckpt_every", t.ckpt_every, 1), ("train.log_every", t.log_every, 1),
                            ("eval.n", cfg.eval.n, 1)):
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, cfg.data.dim).to(dev)
    return Components(dev, source, target, path, coupling, time_sampler, model)
