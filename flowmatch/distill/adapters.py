"""LoRA adapters (Hu et al. 2022) through peft: train, save, load, compose and merge.

A LoRA adapts a target layer ``W`` (Linear ``[out, in]`` or Conv2d ``[out, in, k, k]``) to
``W + (alpha / rank) B A`` with ``A`` of ``rank`` rows and ``B`` of ``rank`` columns (``B = 0`` at the
start, so a fresh adapter changes nothing). Only ``A`` and ``B`` are trained: one copy of the base
weights serves as the student (adapter on) and as a frozen teacher (adapter off).

Training (``lora.rank > 0``): :func:`~flowmatch.training.builders.build_components` initialises the
model from ``train.init``'s checkpoint as usual, then calls :func:`lora_from_config` (registered in
:data:`~flowmatch.training.builders.MODEL_ADAPTERS` when this module is imported), which injects
the LoRA and leaves only its parameters trainable; the trainer optimises the parameters that
require grad, the EMA averages the adapter (the frozen base is its own average). The run's
checkpoints hold the whole student and resume exactly; :func:`write_run_adapter` writes the adapter
alone (``train_from_config`` does it at the end of a LoRA run, as ``checkpoints/adapter.pt``).

For objective authors: a frozen teacher that is "the base without the adapter" is
``adapter_disabled(comp.model)`` (:class:`AdapterDisabled`): a module without parameters of its own,
called ``v(x, t, cond=None)``, that runs the student's module in eval mode with every adapter off
(bit for bit the base). Return it from ``Objective.build_nets`` as the ``teacher`` role and call it
under ``torch.no_grad()``. It toggles peft's per-layer switch around the call, so a compiled loss
breaks its graph there (set the objective's ``compilable = False``).

The adapter file (:func:`save_adapter`, read back only by :func:`load_adapter`, with
``torch.load(weights_only=True)``) is a plain dict::

    {"format": "flowmatch-lora-adapter", "version": 1,
     "tensors": {"<module>.lora_A.weight": [rank, in(, k, k)], "<module>.lora_B.weight": [out, rank(, 1, 1)], ...},
     "rank": int, "alpha": float, "targets": [module names],
     "base": {"sha256": hex SHA-256 of the base checkpoint file, "path": where it was at training},
     "objective": train.objective of the run, "step": int, "config": the run's resolved config}

Composition (:func:`apply_adapters`): adapters ``i`` with weights ``w_i`` act together as
``W + sum_i w_i (alpha_i / rank_i) B_i A_i``, each on its own targets; weight 0 is the base bit for
bit. :func:`merge_adapters` folds that sum into the weights and writes a full checkpoint.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from flowmatch.config import ExperimentConfig, from_dict, to_dict
from flowmatch.errors import CheckpointError, ConfigError
from flowmatch.io import atomic_save, check_format, file_sha256, safe_load
from flowmatch.models import MLPVelocity, UNetVelocity
from flowmatch.training.builders import MODEL_ADAPTERS
from flowmatch.training.checkpoint import FORMAT as CHECKPOINT_FORMAT
from flowmatch.training.checkpoint import load_checkpoint, load_model, save_checkpoint

__all__ = ["ADAPTER_FORMAT", "ADAPTER_VERSION", "AdapterError", "AdapterSpec", "AdapterDisabled", "DEFAULT_LAYERS",
           "default_targets", "resolve_targets", "add_lora", "has_adapter", "adapters_off", "adapter_disabled",
           "adapter_tensors", "lora_from_config", "adapter_from_checkpoint", "save_adapter", "write_run_adapter",
           "load_adapter", "parse_adapter_spec", "apply_adapters", "merge_adapters", "trainable_parameters"]

ADAPTER_FORMAT = "flowmatch-lora-adapter"
ADAPTER_VERSION = 1
_REQUIRED = ("format", "version", "tensors", "rank", "alpha", "targets", "base", "objective", "config")
_LORA_KEYS = (".lora_A.", ".lora_B.")

# The layer kinds a LoRA adapts by default, per model: the MLP's Linear layers; the UNet's convolutions
# (residual blocks, skips, down/up sampling, input and output), its attention projections (qkv, proj:
# 1x1 convolutions) and its time-embedding linears (the time MLP and each block's projection of it).
# Any other model: its Linear and Conv2d layers.
DEFAULT_LAYERS: dict[type, tuple[type, ...]] = {MLPVelocity: (nn.Linear,), UNetVelocity: (nn.Conv2d, nn.Linear)}
_ADAPTABLE = (nn.Linear, nn.Conv2d)


class AdapterError(CheckpointError):
    """An adapter file is unreadable, not an adapter, or made for another base."""


def _peft():
    import peft  # lazy: peft imports transformers (seconds), which `import flowmatch` must not pay for

    return peft


def _layers(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    """Names of the layers of ``kinds``; a layer that already holds an adapter counts as its base layer
    (its insides, the base layer and the adapters' own Linear / Conv2d, are not layers to adapt)."""
    out, inside = [], []
    for n, m in model.named_modules():
        if not n or any(n.startswith(f"{s}.") for s in inside):
            continue
        base = getattr(m, "base_layer", None)
        if base is not None and hasattr(m, "lora_A"):  # a peft LoRA layer
            inside.append(n)
            m = base
        if type(m) in kinds:
            out.append(n)
    return out


def default_targets(model: nn.Module) -> list[str]:
    """The names of the layers a LoRA adapts when ``lora.targets`` is null (:data:`DEFAULT_LAYERS`)."""
    kinds = next((k for cls, k in DEFAULT_LAYERS.items() if isinstance(model, cls)), _ADAPTABLE)
    return _layers(model, kinds)


def resolve_targets(model: nn.Module, targets: Optional[Sequence[str]] = None) -> list[str]:
    """The full names of the Linear / Conv2d layers of ``model`` that ``targets`` names (``None``: the
    defaults). A target names a module by its dotted name or a contiguous part of it (``qkv``,
    ``time_embed``, ``down.0``); every Linear / Conv2d at or under a named module is adapted. A target
    that names none is a :class:`ConfigError`."""
    if targets is None:
        return default_targets(model)
    layers = _layers(model, _ADAPTABLE)
    chosen: set[str] = set()
    for t in targets:
        hit = [n for n in layers if f".{t.strip('.')}." in f".{n}."]
        if not hit:
            shown = ", ".join(layers[:8]) + (", ..." if len(layers) > 8 else "")
            raise ConfigError(f"lora.targets: {t!r} names no Linear or Conv2d layer of {type(model).__name__} "
                              f"(its layers: {shown})")
        chosen.update(hit)
    return [n for n in layers if n in chosen]


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Optional[Sequence[str]] = None, *,
             name: str = "default") -> list[str]:
    """Inject a LoRA adapter ``name`` of ``rank`` and ``alpha`` into ``model`` in place (peft's
    ``inject_adapter_in_model``; ``A`` drawn from the global RNG, ``B = 0``) on the layers
    :func:`resolve_targets` picks; returns their names. Only the adapter's parameters then require grad."""
    names = resolve_targets(model, targets)
    if rank < 1:
        raise ConfigError(f"lora.rank = {rank}: an adapter needs rank >= 1")
    peft = _peft()
    config = peft.LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(names), lora_dropout=0.0,
                             bias="none")
    with warnings.catch_warnings():  # a second adapter (composition) is meant
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        peft.inject_adapter_in_model(config, model, adapter_name=name)
    return names


def _lora_layers(model: nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_adapter(model: nn.Module) -> bool:
    """Whether ``model`` holds a LoRA layer (found by its parameters' names: peft is not imported)."""
    return any(".lora_A." in f".{n}" for n, _ in model.named_parameters())


def trainable_parameters(model: nn.Module) -> int:
    """The number of parameters of ``model`` that require grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every LoRA layer of ``model`` computes its base layer alone (peft's
    ``enable_adapters(False)``); on exit each layer's switch and every parameter's ``requires_grad``
    are as they were."""
    layers = _lora_layers(model)
    grads = [(p, p.requires_grad) for p in model.parameters()]
    was = [lay.disable_adapters for lay in layers]
    for lay in layers:
        lay.enable_adapters(False)
    try:
        yield model
    finally:
        for lay, off in zip(layers, was):
            lay.enable_adapters(not off)
        for p, g in grads:
            p.requires_grad_(g)


class AdapterDisabled(nn.Module):
    """``v(x, t, cond=None)`` of ``model`` with its adapters off, in eval mode: ``x`` ``[B, *D]``, ``t``
    ``[B]`` -> ``[B, *D]``, the base model's output bit for bit. Holds ``model`` without registering it,
    so it has no parameters or state of its own (a checkpoint stores the weights once, as the student)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._base = (model,)  # a tuple: not a submodule

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        m = self.base
        training = m.training
        m.eval()  # a teacher is deterministic: no dropout
        try:
            with adapters_off(m):
                return m(x, t, cond)
        finally:
            m.train(training)


def adapter_disabled(model: nn.Module) -> AdapterDisabled:
    """The frozen-teacher role over ``model`` with its adapters off (see :class:`AdapterDisabled`)."""
    return AdapterDisabled(model)


def adapter_tensors(state: dict, name: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA tensors of adapter ``name`` in a model ``state`` dict, keyed without the adapter's name
    (``net.0.lora_A.default.weight`` -> ``net.0.lora_A.weight``), cloned."""
    out = {}
    for k, v in state.items():
        for part in _LORA_KEYS:
            if f"{part}{name}." in k:
                out[k.replace(f"{part}{name}.", part)] = v.detach().clone()
    return out


def _targets_of(tensors: dict) -> list[str]:
    return sorted({k.split(".lora_A.")[0] for k in tensors if ".lora_A." in k})


def lora_from_config(model: nn.Module, cfg: ExperimentConfig) -> nn.Module:
    """The ``lora`` section's adapter on ``model`` (the hook of ``build_components``)."""
    add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
    return model


MODEL_ADAPTERS["lora"] = lora_from_config


def adapter_from_checkpoint(path: str, *, use_ema: bool = True) -> dict:
    """The adapter payload of a LoRA run's checkpoint (its EMA weights by default), with provenance:
    the base checkpoint's hash as the run recorded it when it started."""
    ckpt = load_checkpoint(path)
    cfg = from_dict(ckpt["config"])
    if cfg.lora.rank < 1:
        raise AdapterError(f"{path} is not a LoRA run's checkpoint (lora.rank = {cfg.lora.rank})")
    state = ckpt["ema"]["model"] if use_ema else ckpt["model"]
    tensors = adapter_tensors(state)
    base_path = ckpt.get("init_from")
    sha = ckpt.get("init_sha256") or (file_sha256(base_path) if base_path and os.path.isfile(base_path) else None)
    if not sha:
        raise AdapterError(f"{path}: the run records no base checkpoint hash (train.init)")
    return {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "tensors": tensors, "rank": cfg.lora.rank,
            "alpha": cfg.lora.alpha, "targets": _targets_of(tensors), "base": {"sha256": sha, "path": base_path},
            "objective": cfg.train.objective, "step": int(ckpt["step"]), "config": to_dict(cfg)}


def save_adapter(payload: dict, path: str) -> None:
    """Write an adapter payload atomically (tensors contiguous, on the CPU)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in payload["tensors"].items()}
    atomic_save({**payload, "tensors": tensors}, path)


def write_run_adapter(checkpoint: str, out: Optional[str] = None) -> str:
    """Write the adapter of a LoRA run's checkpoint to ``out`` (default ``adapter.pt`` beside it)."""
    out = out or os.path.join(os.path.dirname(checkpoint), "adapter.pt")
    save_adapter(adapter_from_checkpoint(checkpoint), out)
    return out


def load_adapter(path: str, *, base: Optional[str] = None, base_sha256: Optional[str] = None) -> dict:
    """Read and check an adapter file; with ``base`` (a checkpoint path) or ``base_sha256``, refuse an
    adapter made for another base, naming both hashes. Every failure is one :class:`AdapterError` line."""
    if not os.path.isfile(path):
        raise AdapterError(f"no adapter file at {path}")
    a = safe_load(path, "adapter", error=AdapterError)
    if isinstance(a, dict) and a.get("format") == CHECKPOINT_FORMAT:
        raise AdapterError(f"{path} is a full flowmatch checkpoint, not an adapter (pass it as the base, or write "
                           f"its run's adapter with `flowmatch adapter extract`)")
    check_format(a, path, "LoRA adapter", ADAPTER_FORMAT, ADAPTER_VERSION, _REQUIRED, error=AdapterError)
    t = a["tensors"]
    if (not isinstance(t, dict) or not t or not all(isinstance(v, torch.Tensor) for v in t.values())
            or not all(any(p in k for p in _LORA_KEYS) for k in t)):
        raise AdapterError(f"adapter {path} holds no LoRA tensors (only <module>.lora_A / .lora_B weights belong there)")
    if base is not None:
        base_sha256 = _sha(base)
    recorded = str(a["base"].get("sha256")) if isinstance(a["base"], dict) else "?"
    if base_sha256 is not None and recorded != base_sha256:
        where = f" {base}" if base is not None else ""
        raise AdapterError(f"adapter {path} was trained on base {recorded[:16]}..., but the base{where} hashes to "
                           f"{base_sha256[:16]}...: load it onto its own base")
    return a


@dataclass(frozen=True)
class AdapterSpec:
    """``--adapter PATH[:WEIGHT]``: an adapter file and the weight it is composed with."""

    path: str
    weight: float = 1.0


def parse_adapter_spec(text: str, arg: str = "--adapter") -> AdapterSpec:
    """``PATH`` (weight 1) or ``PATH:WEIGHT``; a weight that is not a finite number is a one-line
    :class:`ConfigError` naming the argument (a path that itself holds ``:`` and exists is a path)."""
    if ":" not in text or os.path.isfile(text):
        return AdapterSpec(text, 1.0)
    path, w = text.rsplit(":", 1)
    if not path:
        raise ConfigError(f"{arg} {text}: no adapter file before the ':' (expected PATH or PATH:WEIGHT)")
    try:
        weight = float(w)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise ConfigError(f"{arg} {text}: the weight {w!r} after the last ':' is not a finite number "
                          f"(expected PATH or PATH:WEIGHT, e.g. accel.pt:1.0)")
    return AdapterSpec(path, weight)


def _load_tensors(model: nn.Module, tensors: dict, name: str, path: str) -> None:
    own = {k: v for k, v in model.state_dict().items() if any(f"{p}{name}." in k for p in _LORA_KEYS)}
    want = {k.replace(".lora_A.", f".lora_A.{name}.").replace(".lora_B.", f".lora_B.{name}."): v
            for k, v in tensors.items()}
    if set(own) != set(want) or any(own[k].shape != want[k].shape for k in own):
        bad = sorted(set(own) ^ set(want)) or [k for k in own if own[k].shape != want[k].shape]
        raise AdapterError(f"adapter {path} does not fit the base model (at {bad[0]})")
    with torch.no_grad():
        for k, v in want.items():
            own[k].copy_(v)


def apply_adapters(model: nn.Module, specs: Sequence[AdapterSpec], *, base: Optional[str] = None,
                   base_sha256: Optional[str] = None) -> nn.Module:
    """Compose adapters on ``model`` in place: adapter ``i`` (file ``specs[i].path``) is injected as
    ``a{i}``, loaded and scaled by ``specs[i].weight``, and all are active together; ``base`` (or
    ``base_sha256``) is the checkpoint ``model`` was loaded from, checked against each adapter's record.
    The model is left in eval mode with no parameter requiring grad."""
    for i, spec in enumerate(specs):
        a = load_adapter(spec.path, base=base, base_sha256=base_sha256)
        name = f"a{i}"
        add_lora(model, int(a["rank"]), float(a["alpha"]), [f"{t}" for t in a["targets"]], name=name)
        _load_tensors(model, a["tensors"], name, spec.path)
        for lay in _lora_layers(model):
            lay.set_scale(name, spec.weight)
    names = [f"a{i}" for i in range(len(specs))]
    for lay in _lora_layers(model):
        lay.set_adapter(names, inference_mode=True)
    return model.eval().requires_grad_(False)


_SHA_CACHE: dict[tuple, str] = {}


def _sha(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = file_sha256(path)
    return _SHA_CACHE[key]


def _plain_state(model: nn.Module) -> dict:
    """``model``'s state without the adapters, keyed as the plain model's (``x.base_layer.w`` -> ``x.w``)."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items()
            if not any(p in k for p in _LORA_KEYS)}


def merge_adapters(base: str, specs: Sequence[AdapterSpec], out: str, *, config: Optional[dict] = None) -> str:
    """Fold the weighted adapters into the base checkpoint's (EMA) weights and write a full checkpoint
    to ``out``, which :func:`~flowmatch.training.load_model` loads like any other: ``model`` and
    ``ema`` the merged weights, ``step`` and ``config`` the base's (``config``: another config to record,
    e.g. a style adapter's task, which the bench then scores on), ``merged`` the provenance (the
    base's hash, each adapter's hash, weight, objective and step)."""
    if not specs:
        raise ConfigError("adapter merge needs at least one --adapter")
    ckpt = load_checkpoint(base)
    lm = load_model(base)
    model = apply_adapters(lm.model, specs, base=base)
    for lay in _lora_layers(model):
        lay.merge(adapter_names=[n for n in lay.lora_A.keys()])
    state = _plain_state(model)
    record = {"base_sha256": _sha(base), "base_path": os.path.abspath(base),
              "adapters": [{"sha256": file_sha256(s.path), "path": os.path.abspath(s.path), "weight": s.weight,
                            "objective": load_adapter(s.path)["objective"]} for s in specs]}
    ema = ckpt["ema"]
    save_checkpoint(out, {"model": state, "ema": {"model": state, "decay": ema.get("decay", 0.0),
                                                  "num_updates": ema.get("num_updates", 0)},
                          "step": int(ckpt["step"]), "config": ckpt["config"] if config is None else config,
                          "merged": record})
    return out
