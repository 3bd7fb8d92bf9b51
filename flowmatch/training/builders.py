"""Build the objects a config describes (data, path, coupling, time sampler, model)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from flowmatch.config import ExperimentConfig
from flowmatch.config import config_diff, from_dict, to_dict
from flowmatch.couplings import Coupling, PairedCoupling, get_coupling
from flowmatch.data import ToyDistribution
from flowmatch.data.task import build_task
from flowmatch.data.pairs import PairStore, PairStoreError
from flowmatch.errors import CheckpointError, ConfigError
from flowmatch.io import file_sha256
from flowmatch.models import build_model, load_flow_weights
from flowmatch.paths import AffinePath, get_path
from flowmatch.solvers import get_solver
from flowmatch.timesteps import TimeSampler, get_time_sampler
from flowmatch.training.checkpoint import load_checkpoint
from flowmatch.training.losses import LOSSES
from flowmatch.training.schedule import LR_SCHEDULES
from flowmatch.training.tracking import TRACKING_MODES
from flowmatch.utils import lookup, resolve_device

__all__ = ["Components", "build_components", "MODEL_ADAPTERS"]

# Adapters added to a model after its initial weights, by config section: a higher layer registers the
# function of its section (flowmatch.distill.adapters registers "lora"), so training knows only that
# the section is on (``lora.rank > 0``) and that the function leaves trainable what it should train.
MODEL_ADAPTERS: dict[str, Callable[[nn.Module, ExperimentConfig], nn.Module]] = {}


@dataclass
class Components:
    device: torch.device
    source: ToyDistribution
    target: ToyDistribution
    path: AffinePath
    coupling: Coupling
    time_sampler: TimeSampler
    model: nn.Module
    real_coupling: Optional[Coupling] = None  # independent real-data pairs mixed in with weight 1 - mix
    pair_manifest: Optional[dict] = None  # the manifest of a paired coupling's store
    init_from: Optional[str] = None  # the checkpoint whose EMA weights initialised the model


def _paired(cfg: ExperimentConfig, task, dev) -> tuple[Coupling, Optional[Coupling], dict]:
    cc = cfg.coupling
    if not cc.pairs:
        raise ConfigError("coupling.name=paired needs coupling.pairs, the directory of a pair store "
                          "(made by `flowmatch reflow generate`)")
    if not 0.0 <= cc.mix <= 1.0:
        raise ConfigError(f"coupling.mix must be in [0, 1], got {cc.mix}")
    source, target = task.source, task.target
    store = PairStore(cc.pairs, expect_shape=list(task.shape))
    m = store.manifest
    if (m["source"], m["target"]) != (cfg.data.source, cfg.data.target):
        raise PairStoreError(f"pair store {cc.pairs} maps {m['source']} -> {m['target']}; this run is "
                             f"{cfg.data.source} -> {cfg.data.target}")
    real = None
    if cc.mix < 1.0:
        if cc.real == "paired":
            raise ConfigError("coupling.real is the real-data coupling: independent or ot, not paired")
        real = get_coupling(cc.real, source, target, device=dev, method=cc.method, reg=cc.reg, num_iters=cc.num_iters)
    return PairedCoupling(store.x0, store.x1, dev, y=store.y), real, m


def _init_weights(model: nn.Module, cfg: ExperimentConfig, manifest: Optional[dict]) -> Optional[str]:
    """Load the initial weights ``cfg.train.init`` asks for; returns the checkpoint used (or None)."""
    init = cfg.train.init
    if init == "random" or (init == "auto" and manifest is None):
        return None
    path = manifest["teacher_path"] if init == "auto" else init
    ckpt = load_checkpoint(path)
    if init == "auto" and (sha := file_sha256(path)) != (recorded := str(manifest["teacher"]["sha256"])):
        raise PairStoreError(f"the pair manifest records teacher hash {recorded[:16]}..., but the teacher checkpoint "
                             f"{path} hashes to {sha[:16]}... (the file or the manifest is not the one the pairs "
                             f"were made with); set train.init=random or a checkpoint path")
    # through from_dict, so a checkpoint written before a model key existed compares at its default
    theirs = from_dict(ckpt["config"]).model
    diff = config_diff(to_dict(theirs), to_dict(cfg.model))
    # a plain flow model initialises a step-input one (its zero-initialised step projection stays)
    if diff == ["step_input"] and cfg.model.step_input and not theirs.step_input:
        diff = []
    if diff:
        raise CheckpointError(f"cannot initialise from {path}: its model differs at model.{', model.'.join(diff)}")
    try:
        load_flow_weights(model, ckpt["ema"]["model"])
    except RuntimeError as e:
        raise CheckpointError(f"cannot initialise from {path}: {str(e).splitlines()[0]}") from None
    return path


def _add_adapter(model: nn.Module, cfg: ExperimentConfig, manifest: Optional[dict]) -> nn.Module:
    """``model`` with the ``lora`` section's adapter when ``lora.rank > 0`` (on the base weights that
    ``train.init`` names), else ``model``."""
    if cfg.lora.rank == 0:
        return model
    init = cfg.train.init
    if init == "random" or (init == "auto" and manifest is None):
        raise ConfigError(f"lora.rank = {cfg.lora.rank} trains an adapter on a base model: set train.init to the "
                          f"base checkpoint (train.init = {init} starts from random weights)")
    if "lora" not in MODEL_ADAPTERS:
        raise ConfigError("lora.rank > 0 needs the adapters of flowmatch.distill: import flowmatch.distill "
                          "(the CLI and the pipelines do)")
    return MODEL_ADAPTERS["lora"](model, cfg)


def build_components(cfg: ExperimentConfig, device: str | torch.device | None = None, *,
                     init_weights: bool = True) -> Components:
    """Validate every name in ``cfg`` against its registry and build the training objects.

    The model is initialised from ``torch.manual_seed(cfg.train.seed)`` so a config fixes it, then,
    if ``init_weights``, from the checkpoint ``cfg.train.init`` names (for a paired coupling the
    default is its teacher, checked against the pair manifest's hash); with ``lora.rank > 0`` a LoRA
    adapter is then added (:data:`MODEL_ADAPTERS`), leaving only its parameters trainable.
    """
    dev = resolve_device(cfg.train.device if device is None else device)
    task = build_task(cfg.data)
    source, target = task.source, task.target
    path = get_path(cfg.path.name, sigma=cfg.path.sigma)
    real, manifest = None, None
    if cfg.coupling.name == "paired":
        coupling, real, manifest = _paired(cfg, task, dev)
    else:
        coupling = get_coupling(cfg.coupling.name, source, target, device=dev, method=cfg.coupling.method,
                                reg=cfg.coupling.reg, num_iters=cfg.coupling.num_iters)
    time_sampler = get_time_sampler(cfg.time.name, loc=cfg.time.loc, scale=cfg.time.scale, a=cfg.time.a,
                                    value=cfg.time.value)
    lookup(LOSSES, cfg.train.loss, "loss")
    get_solver(cfg.eval.solver)
    lookup({m: m for m in TRACKING_MODES}, cfg.tracking.mode, "tracking mode")
    lookup(dict.fromkeys(LR_SCHEDULES), cfg.train.lr_schedule, "lr schedule")
    # numeric ranges (train.steps, batch_size, lr, eval.n, ...) are checked once, by the config sections
    for key, value in (("eval.classifier", cfg.eval.classifier), ("eval.inception", cfg.eval.inception)):
        if value and not os.path.isfile(value):  # found before training, not after it
            raise ConfigError(f"{key}: no such weights file {value}")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, task.shape, task.num_classes)
    init_from = _init_weights(model, cfg, manifest) if init_weights else None
    model = _add_adapter(model, cfg, manifest)  # after the base weights; a resumed run loads it all
    return Components(dev, source, target, path, coupling, time_sampler, model.to(dev), real, manifest, init_from)
