"""Typed experiment configs, YAML loading and the one override syntax (``--set train.lr=1e-3``).

Unknown keys are errors that list the valid keys; values are type-checked (an ``int`` is accepted
where a ``float`` is expected, nothing else is coerced). Names (datasets, paths, couplings, ...)
are checked when the objects are built, against their registries.

Ranges are checked here, once, when a section is built (its ``__post_init__``, so a config made in
Python is checked as one read from YAML or changed by ``--set``): a bad value is a
:class:`~flowmatch.errors.ConfigError` naming the key, the value and the valid range, e.g.
``eval.nfe = 0: must be an integer >= 1``. :func:`check_int`, :func:`check_float` and
:func:`check_file_name` are the helpers the solver and grid constructors and the bench use for their
own arguments; :func:`check_output_path` checks an output path before anything is computed.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import yaml

from flowmatch.errors import ConfigError

__all__ = [
    "DataConfig",
    "PathConfig",
    "CouplingConfig",
    "TimeConfig",
    "ModelConfig",
    "TrainConfig",
    "EvalConfig",
    "TrackingConfig",
    "ReflowConfig",
    "DistillConfig",
    "ConsistencyConfig",
    "ShortcutConfig",
    "MeanFlowConfig",
    "OtCfmConfig",
    "LoraConfig",
    "AptConfig",
    "ExperimentConfig",
    "FAST_MODES",
    "COMPILE_MODES",
    "FUSED_MODES",
    "PRECISIONS",
    "CHANNELS_LAST_MODES",
    "MOVED_KEYS",
    "STAGE_SECTIONS",
    "from_dict",
    "to_dict",
    "load_config",
    "save_config",
    "apply_overrides",
    "config_diff",
    "check_int",
    "check_float",
    "check_file_name",
    "check_output_path",
]


# --------------------------------------------------------------------------------------------------
# Range checks (the one place that words them)
# --------------------------------------------------------------------------------------------------


def check_int(key: str, value: Any, low: int = 1, high: Optional[int] = None, *, optional: bool = False) -> Any:
    """``value`` if it is an integer in ``[low, high]`` (``None`` too when ``optional``), else a
    :class:`ConfigError` ``"{key} = {value!r}: must be an integer >= {low}"`` (or ``in [low, high]``)."""
    if value is None and optional:
        return None
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low
            or (high is not None and value > high)):
        want = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key} = {value!r}: must be an integer {want}{' or null' if optional else ''}")
    return int(value)


def check_float(key: str, value: Any, *, gt: Optional[float] = None, ge: Optional[float] = None,
                lt: Optional[float] = None, le: Optional[float] = None, finite: bool = True,
                optional: bool = False) -> Any:
    """``float(value)`` if it is a number (not NaN; finite unless ``finite=False``) with ``value > gt``,
    ``>= ge``, ``< lt`` and ``<= le`` (those given), else a :class:`ConfigError` naming ``key``, the
    value and the range, e.g. ``"eval.atol = 0.0: must be a finite number > 0"``."""
    if value is None and optional:
        return None
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and not math.isnan(value)
    ok = ok and (not finite or math.isfinite(value))
    ok = ok and (gt is None or value > gt) and (ge is None or value >= ge)
    ok = ok and (lt is None or value < lt) and (le is None or value <= le)
    if not ok:
        low = f"[{ge:g}" if ge is not None else f"({gt:g}" if gt is not None else None
        high = f"{le:g}]" if le is not None else f"{lt:g})" if lt is not None else None
        if low and high:
            want = f"a number in {low}, {high}"
        else:
            bound = (f"> {gt:g}" if gt is not None else f">= {ge:g}" if ge is not None
                     else f"< {lt:g}" if lt is not None else f"<= {le:g}" if le is not None else "")
            want = f"a {'finite ' if finite else ''}number {bound}".rstrip()
        raise ConfigError(f"{key} = {value!r}: must be {want}{' or null' if optional else ''}")
    return float(value)


def check_file_name(key: str, value: Any) -> str:
    """``value`` if it is a bare file name (non-empty, no path separator, not ``.`` or ``..``), else a
    :class:`ConfigError`: such names become one component of a path the package writes to."""
    seps = [c for c in (os.sep, os.altsep, "/", "\\") if c]
    if (not isinstance(value, str) or not value.strip() or value in (".", "..") or "\0" in value
            or any(c in value for c in seps)):
        raise ConfigError(f"{key} = {value!r}: must be a non-empty file name without a path separator "
                          f"(not '.' or '..')")
    return value


def check_output_path(key: str, path: Any, *, kind: str = "dir") -> str:
    """``path`` if something of ``kind`` (``dir`` or ``file``) can be written there, else a
    :class:`ConfigError` naming ``key``, the path and why: empty, a regular file where a directory is
    needed (the path itself, or a parent), a directory where a file is needed. Reads the file system;
    writes nothing."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ConfigError(f"{key} = {path!r}: must be a non-empty path")
    path = os.fspath(path)
    if kind == "file" and (path.endswith(("/", os.sep)) or os.path.isdir(path)):
        raise ConfigError(f"{key} = {path!r}: must be a file path, not a directory")
    if kind == "dir" and os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key} = {path!r}: is a file, not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{key} = {path!r}: {parent} is a file, not a directory")
    return path


def _check_ranges(cfg: Any, rules: dict) -> None:
    """Apply ``rules`` (key -> checker of ``(qualified key, value)``) to section ``cfg``."""
    for key, rule in rules.items():
        rule(f"{cfg._section}.{key}" if cfg._section else key, getattr(cfg, key))


def _int(low: int = 1, high: Optional[int] = None, optional: bool = False):
    return lambda k, v: check_int(k, v, low, high, optional=optional)


def _float(**kw):
    return lambda k, v: check_float(k, v, **kw)


def _ints(low: int = 1, optional: bool = False):
    def rule(k, v):
        if v is None and optional:
            return
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{k} = {v!r}: must be a non-empty list of integers >= {low}"
                              f"{' or null' if optional else ''}")
        for i, item in enumerate(v):
            check_int(f"{k}[{i}]", item, low)
    return rule


_PROBABILITY = dict(ge=0.0, le=1.0)


def _one_of(*valid: str):
    def rule(k, v):
        if v not in valid:
            raise ConfigError(f"{k} = {v!r}: must be one of {', '.join(valid)}")
    return rule


# the values of the training plan's keys (flowmatch.training.plan resolves the "auto"s)
FAST_MODES = ("auto", "on", "off")
# "on" means torch.compile's mode "default"; the others after "off" are torch.compile modes
COMPILE_MODES = ("auto", "on", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FUSED_MODES = ("auto", "on", "off")
PRECISIONS = ("auto", "fp32", "bf16")
# the velocity an any-step objective (shortcut, meanflow) regresses at h = 0: the path's, or a flow teacher's
ANYSTEP_VELOCITIES = ("data", "teacher")
# the flow of the chain the few-step table starts an any-step model from: the 1-RF teacher, or 2-RF
ANYSTEP_STARTS = ("1-RF", "2-RF")
CHANNELS_LAST_MODES = ("auto", "on", "off")


@dataclass
class DataConfig:
    """Source (t = 0) and target (t = 1) distributions; names from ``flowmatch.data.DATASETS`` (toy,
    ``dim`` 2) or ``flowmatch.data.IMAGE_DATASETS`` (images; their shape comes from the dataset, and
    a ``gaussian`` source takes it). ``root`` is the local directory of a torchvision-format dataset
    (``mnist``, ``fashion_mnist``, ``cifar10``) or of an image folder (``folder``); ``download`` lets
    torchvision fetch a missing one (never by default). ``image_size`` / ``channels`` fix the shape
    of an image folder's images. ``split`` is the split the training draws come from (``train``; or
    ``fit``, the training images less ``val``, for a run that selects on ``val``: see
    :mod:`flowmatch.data.images`)."""

    source: str = "gaussian"
    target: str = "moons"
    dim: int = 2
    root: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None
    channels: Optional[int] = None
    split: str = "train"

    _section: ClassVar[str] = "data"

    def __post_init__(self) -> None:
        _check_ranges(self, {"dim": _int(1), "image_size": _int(1, optional=True),
                             "channels": _int(1, optional=True)})


@dataclass
class PathConfig:
    """``linear`` (rectified flow) or ``cosine`` (VP / trigonometric); ``sigma`` > 0 adds constant
    Gaussian smoothing around the interpolant (I-CFM, Tong et al. 2023)."""

    name: str = "linear"
    sigma: float = 0.0

    _section: ClassVar[str] = "path"

    def __post_init__(self) -> None:
        _check_ranges(self, {"sigma": _float(ge=0.0)})


@dataclass
class CouplingConfig:
    """``independent``, ``ot`` (minibatch OT) or ``paired`` (stored reflow pairs).

    For ``ot``: ``method`` is ``exact`` (assignment on the batch cost) or ``sinkhorn`` (entropic, in
    torch on the batch's device; ``reg`` is relative to the mean batch cost). For ``paired``:
    ``pairs`` is the pair store's directory and ``mix`` the weight lambda of the loss on teacher pairs
    ("soft labels"); ``1 - mix`` weighs the ordinary flow-matching loss on real data ("hard labels"),
    drawn with the coupling ``real`` (``independent`` or ``ot``, with ``method``/``reg``/``num_iters``).
    ``mix = 1`` is pure reflow, ``mix = 0`` plain flow matching.
    """

    name: str = "independent"
    method: str = "exact"
    reg: float = 0.05
    num_iters: int = 100
    pairs: Optional[str] = None
    mix: float = 1.0
    real: str = "independent"

    _section: ClassVar[str] = "coupling"

    def __post_init__(self) -> None:
        _check_ranges(self, {"reg": _float(gt=0.0), "num_iters": _int(1), "mix": _float(**_PROBABILITY)})


@dataclass
class TimeConfig:
    """Training-time sampler: ``uniform``, ``logit_normal`` (``loc``, ``scale``), ``u_shaped`` (``a``)
    or ``constant`` (always ``value``; ``value: 0`` trains the one-step map, i.e. distillation)."""

    name: str = "uniform"
    loc: float = 0.0
    scale: float = 1.0
    a: float = 4.0
    value: float = 0.0

    _section: ClassVar[str] = "time"

    def __post_init__(self) -> None:
        _check_ranges(self, {"loc": _float(), "scale": _float(gt=0.0), "a": _float(gt=0.0),
                             "value": _float(**_PROBABILITY)})


@dataclass
class ModelConfig:
    """``mlp`` (toy data) or ``unet`` (images). MLP: ``hidden``, ``depth``, ``activation``;
    ``time_embedding`` is ``sinusoidal`` (of ``time_scale * t``) or ``fourier`` (random features of
    std ``fourier_scale``). UNet: ``preset`` (``flowmatch.models.UNET_PRESETS``) gives every UNet key
    left at ``null``: ``base_channels``, ``channel_mult``, ``num_res_blocks``,
    ``attention_resolutions`` (feature-map sizes with self-attention), ``dropout``, ``num_heads``.
    ``class_cond`` conditions on the dataset's labels (classifier-free guidance at sampling).
    ``step_input`` (off by default, so existing checkpoints load unchanged) gives the model a second time
    input, the step ``h`` of the any-step objectives (``shortcut``, ``meanflow``): the model is called
    ``v(x, t, cond, h=h)``, ``h`` goes through the time embedding and a zero-initialised projection
    (:mod:`flowmatch.models.embeddings`), and a plain flow checkpoint initialises it (``train.init``) as a
    model equal to that flow model for every ``h``."""

    name: str = "mlp"
    hidden: int = 256
    depth: int = 3
    activation: str = "silu"
    time_embedding: str = "sinusoidal"
    time_dim: int = 64
    time_scale: float = 1000.0
    fourier_scale: float = 16.0
    preset: str = "small"
    base_channels: Optional[int] = None
    channel_mult: Optional[list[int]] = None
    num_res_blocks: Optional[int] = None
    attention_resolutions: Optional[list[int]] = None
    dropout: Optional[float] = None
    num_heads: Optional[int] = None
    class_cond: bool = False
    step_input: bool = False

    _section: ClassVar[str] = "model"

    def __post_init__(self) -> None:
        _check_ranges(self, {"hidden": _int(1), "depth": _int(1), "time_dim": _int(2),
                             "time_scale": _float(gt=0.0), "fourier_scale": _float(gt=0.0),
                             "base_channels": _int(2, optional=True), "channel_mult": _ints(1, optional=True),
                             "num_res_blocks": _int(1, optional=True),
                             "attention_resolutions": lambda k, v: v is None or v == [] or _ints(1)(k, v),
                             "dropout": _float(ge=0.0, lt=1.0, optional=True), "num_heads": _int(1, optional=True)})


@dataclass
class TrainConfig:
    # The training objective, a name of flowmatch.training.objectives.OBJECTIVES: "cfm" (conditional flow
    # matching on the coupling, with the real-data mix of a paired coupling) or "distill" (the one-step
    # map of a pair store). Its own keys live in the config section of the same name, where it has one.
    objective: str = "cfm"
    steps: int = 5000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    lr_schedule: str = "constant"  # after warm-up: constant, or cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ckpt_every: int = 1000
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    loss: str = "l2"
    # Initial weights: "auto" (the teacher of a paired coupling, else random), "random", or a
    # checkpoint path (its EMA weights).
    init: str = "auto"
    # The plan (flowmatch.training.plan resolves every "auto", once, with its reason).
    # fast: whether the loop leaves the losses on the device between log steps ("on") or reads and checks
    # every step's loss before its update ("off", the plain loop). "auto": on with CUDA; on the CPU, on
    # where the fused MLP step can train the run, else off.
    fast: Union[str, bool] = "auto"
    # torch.compile of the fast step's loss (forward + backward): "auto" (with the fast step on CUDA),
    # "off", "on" (mode "default") or a torch.compile mode ("reduce-overhead", "max-autotune", ...).
    compile: Union[str, bool] = "auto"
    # The fused MLP step (flowmatch.training.fused_mlp), a CPU implementation of the l2 velocity-regression
    # objectives (cfm, distill) for toy MLPs: "auto"
    # (wherever it can run in the fast mode; train.fast=auto turns the fast mode on for it on the CPU),
    # "on" (required: an error where it cannot run) or "off" (with train.fast=auto: the plain loop).
    fused: Union[str, bool] = "auto"
    # Mixed precision of the forward/backward: "auto" (bf16 autocast for image models on CUDA, fp32 elsewhere),
    # "fp32" or "bf16". Weights, optimiser state and EMA stay fp32.
    precision: str = "auto"
    # channels_last memory format for image models: "auto" (on with CUDA), "on" or "off".
    channels_last: Union[str, bool] = "auto"
    # micro-batches of batch_size each, summed into one optimiser step (effective batch
    # grad_accum * batch_size * world size)
    grad_accum: int = 1
    # probability of dropping a class label in training (classifier-free guidance); class_cond only
    class_dropout: float = 0.1

    _section: ClassVar[str] = "train"

    def __post_init__(self) -> None:
        # YAML 1.1 reads a bare on / off as a boolean; keep the documented spelling.
        for key in ("fast", "compile", "fused", "channels_last"):
            value = getattr(self, key)
            if isinstance(value, bool):
                setattr(self, key, "on" if value else "off")
        _check_ranges(self, {"fast": _one_of(*FAST_MODES), "compile": _one_of(*COMPILE_MODES),
                             "fused": _one_of(*FUSED_MODES), "precision": _one_of(*PRECISIONS),
                             "channels_last": _one_of(*CHANNELS_LAST_MODES),
                             "steps": _int(1), "batch_size": _int(1), "lr": _float(gt=0.0),
                             "weight_decay": _float(ge=0.0), "warmup_steps": _int(0),
                             "lr_min_ratio": _float(**_PROBABILITY), "grad_clip": _float(ge=0.0, finite=False),
                             "ema_decay": _float(ge=0.0, lt=1.0), "ckpt_every": _int(1), "log_every": _int(1),
                             "grad_accum": _int(1), "class_dropout": _float(**_PROBABILITY)})


@dataclass
class EvalConfig:
    """End-of-training evaluation of the EMA model: ``n`` samples, W2 against fresh target draws
    (toy) or, for images, Fréchet distance and KID in the feature space of a small classifier
    (shipped for ``digits`` and ``mnist5k``; ``classifier`` is the weights file for other datasets)
    and, with ``inception`` (a local Inception weights file), Inception FID. A class-conditional
    model samples labels 0, 1, ..., K - 1 in turn with classifier-free guidance of scale ``guidance``."""

    n: int = 2000
    solver: str = "dopri5"
    nfe: int = 100
    atol: float = 1e-5
    rtol: float = 1e-5
    seed: int = 1234
    plots: bool = True
    classifier: Optional[str] = None
    inception: Optional[str] = None
    guidance: float = 1.0

    _section: ClassVar[str] = "eval"

    def __post_init__(self) -> None:
        _check_ranges(self, {"n": _int(1), "nfe": _int(1), "atol": _float(gt=0.0), "rtol": _float(gt=0.0),
                             "guidance": _float()})


@dataclass
class TrackingConfig:
    """``mode``: ``offline`` (default, no account needed), ``online`` or ``disabled``."""

    mode: str = "offline"
    project: str = "flowmatch"
    name: Optional[str] = None


@dataclass
class ReflowConfig:
    """The reflow chain (``flowmatch reflow run``): 1-RF is the experiment itself (or ``teacher``),
    then each round generates ``num_pairs`` pairs with its teacher and trains the next k-RF on them."""

    rounds: int = 2
    teacher: Optional[str] = None  # an existing 1-RF checkpoint instead of training one
    num_pairs: int = 50_000
    solver: str = "dopri5"
    nfe: Optional[int] = None  # fixed-step solvers only
    atol: float = 1e-5
    rtol: float = 1e-5
    shard_size: int = 10_000
    seed: int = 0
    # pair generation: "auto" (bf16 autocast for image teachers on CUDA, else fp32), "fp32", "bf16"
    precision: str = "auto"
    steps: int = 3000
    lr: float = 1e-3
    time: TimeConfig = field(default_factory=lambda: TimeConfig(name="u_shaped"))
    loss: str = "l2"
    mix: float = 1.0  # weight of the teacher-pair loss; 1 - mix on real data
    real: Optional[str] = None  # coupling of the real-data term (default: the experiment's own)
    distill: bool = False  # end the chain with a one-step distillation stage (its keys: the distill section)
    apt: bool = False  # then adversarial post-training of that one-step model (its keys: the apt section)
    bench_n: int = 5000
    bench_solvers: list[str] = field(default_factory=lambda: ["euler", "dopri5"])
    bench_nfes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])

    _section: ClassVar[str] = "reflow"

    def __post_init__(self) -> None:
        _check_ranges(self, {"rounds": _int(1), "num_pairs": _int(1), "nfe": _int(1, optional=True),
                             "atol": _float(gt=0.0), "rtol": _float(gt=0.0), "shard_size": _int(1),
                             "steps": _int(1), "lr": _float(gt=0.0), "mix": _float(**_PROBABILITY),
                             "bench_n": _int(1),
                             "bench_nfes": _ints(1)})


@dataclass
class DistillConfig:
    """The one-step distillation objective (``train.objective: distill``, the chain's ``reflow.distill``
    stage): the student ``v(x0, 0)`` regresses the pair store's one-step map ``x1 - x0``. ``steps``,
    ``lr`` and ``loss`` are the stage's ``train.steps``, ``train.lr`` and ``train.loss`` where a
    pipeline trains it as a stage (a stand-alone run takes ``train.*``)."""

    steps: int = 2000
    lr: float = 1e-4
    loss: str = "l2"

    _section: ClassVar[str] = "distill"

    def __post_init__(self) -> None:
        _check_ranges(self, {"steps": _int(1), "lr": _float(gt=0.0)})


def _names(optional: bool = False):
    def rule(k, v):
        if v is None and optional:
            return
        if not isinstance(v, list) or not v or not all(isinstance(s, str) and s.strip() for s in v):
            raise ConfigError(f"{k} = {v!r}: must be a non-empty list of non-empty names{' or null' if optional else ''}")
    return rule


@dataclass
class LoraConfig:
    """A LoRA adapter (Hu et al. 2022) trained on the weights of ``train.init``'s checkpoint instead of a
    full copy (:mod:`flowmatch.distill.adapters`): every target layer ``W`` becomes
    ``W + (alpha / rank) B A`` with ``A`` ``[rank, in]`` and ``B`` ``[out, rank]`` (``B = 0`` at the start),
    and only ``A`` and ``B`` are trained. ``rank = 0`` turns it off. ``targets``: module names (or
    name suffixes) of the Linear / Conv2d layers to adapt; ``None`` takes the model type's defaults
    (the MLP: its Linear layers; the UNet: its convolutions, attention projections and time-embedding
    linears)."""

    rank: int = 0
    alpha: float = 8.0
    targets: Optional[list[str]] = None

    _section: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        _check_ranges(self, {"rank": _int(0), "alpha": _float(gt=0.0), "targets": _names(optional=True)})


@dataclass
class ConsistencyConfig:
    """Consistency distillation (``train.objective: cd``) and consistency training (``ct``),
    :mod:`flowmatch.distill.consistency`. ``num_steps`` is CD's grid (N intervals of [0, 1]); CT's grid
    follows improved CT's curriculum from ``ct_s0`` to ``ct_s1`` intervals. ``mu`` is the EMA decay of
    the target network (0: the online network under stop-gradient, as improved CT). ``teacher`` is the
    flow checkpoint CD distils (default: ``train.init``'s checkpoint); ``teacher_solver`` its step
    (``euler`` or ``heun``). ``steps``, ``lr`` and ``loss`` are the stage's ``train.*`` where a pipeline
    trains it as a stage (the distance: ``l2`` or ``pseudo_huber``)."""

    steps: int = 2000
    lr: float = 1e-4
    loss: str = "pseudo_huber"
    num_steps: int = 16
    mu: float = 0.0
    teacher: Optional[str] = None
    teacher_solver: str = "euler"
    ct_s0: int = 10
    ct_s1: int = 1280

    _section: ClassVar[str] = "consistency"

    def __post_init__(self) -> None:
        _check_ranges(self, {"steps": _int(1), "lr": _float(gt=0.0), "num_steps": _int(1),
                             "mu": _float(ge=0.0, lt=1.0), "teacher_solver": _one_of("euler", "heun"),
                             "ct_s0": _int(1), "ct_s1": _int(1)})
        if self.ct_s1 < self.ct_s0:
            raise ConfigError(f"consistency.ct_s1 = {self.ct_s1}: the CT curriculum must end at or above its "
                              f"start consistency.ct_s0 = {self.ct_s0}")


@dataclass
class ShortcutConfig:
    """Shortcut models (``train.objective: shortcut``, Frans et al. 2025; :mod:`flowmatch.distill.shortcut`).
    A fraction ``self_consistency`` of each batch (1/8, the paper's) regresses the self-consistency
    target of two half steps of the ``ema`` target network (its decay; 0: the student under
    stop-gradient) at steps ``d = 2^-k``, ``k = 0 .. log2(base_steps) - 1``; the rest regresses the
    flow-matching target at the smallest step ``d = 1 / base_steps`` (128, the paper's). ``base_steps``
    must be a power of two >= 2. ``velocity``: that flow-matching target, the path's conditional
    velocity (``data``, the paper's) or a frozen flow teacher's velocity at the same point (``teacher``:
    the checkpoint ``teacher``, default ``train.init``'s). Needs ``model.step_input: true``. ``steps`` and
    ``lr`` are the stage's ``train.*`` where a pipeline trains it from a teacher (the few-step table's
    ``shortcut``); ``start`` is the flow of the chain that table starts it from (its weights, and its
    velocity with ``velocity: teacher``): ``1-RF`` (the teacher, the paper's setting) or ``2-RF`` (the
    reflowed, straighter flow; needs the table's ``reflow`` method)."""

    self_consistency: float = 0.125
    base_steps: int = 128
    ema: float = 0.999
    velocity: str = "data"
    teacher: Optional[str] = None
    steps: int = 2000
    lr: float = 1e-4
    start: str = "1-RF"

    _section: ClassVar[str] = "shortcut"

    def __post_init__(self) -> None:
        _check_ranges(self, {"self_consistency": _float(**_PROBABILITY), "base_steps": _int(2),
                             "ema": _float(ge=0.0, lt=1.0), "velocity": _one_of(*ANYSTEP_VELOCITIES),
                             "steps": _int(1), "lr": _float(gt=0.0), "start": _one_of(*ANYSTEP_STARTS)})
        if self.base_steps & (self.base_steps - 1):
            raise ConfigError(f"shortcut.base_steps = {self.base_steps}: must be a power of two >= 2")


@dataclass
class MeanFlowConfig:
    """MeanFlow (``train.objective: meanflow``, Geng et al. 2025; :mod:`flowmatch.distill.meanflow`).
    Times: two draws of ``sigmoid(N(logit_mean, logit_std))`` in our convention (``t = 0`` noise), the
    smaller the start ``t`` and the larger the end ``s``; a fraction ``1 - jump_fraction`` of the rows
    then gets ``s = t`` (the flow-matching rows). The paper's values are ``jump_fraction`` 0.25 and a
    logit-normal of mean -0.4 and std 1.0 in its time (``t_theirs = 1 - t_ours``), which is mean +0.4
    here. ``power`` ``p`` and ``eps`` make the adaptive weight ``e / sg(e + eps)^p`` of the squared error
    ``e`` (p = 0: plain squared error). ``velocity``: the ``v`` of the target ``v + h du/dt`` and of the
    tangent, the path's conditional velocity (``data``, the paper's) or a frozen flow teacher's velocity
    at the same point (``teacher``: the checkpoint ``teacher``, default ``train.init``'s). Needs
    ``model.step_input: true``. ``steps`` and ``lr`` are the stage's ``train.*`` where a pipeline trains
    it from a teacher (the few-step table's ``meanflow``); ``start``: the chain's flow that table starts
    it from, ``1-RF`` or ``2-RF`` (as the shortcut section's)."""

    jump_fraction: float = 0.25
    logit_mean: float = 0.4
    logit_std: float = 1.0
    power: float = 1.0
    eps: float = 1e-3
    velocity: str = "data"
    teacher: Optional[str] = None
    steps: int = 2000
    lr: float = 1e-4
    start: str = "1-RF"

    _section: ClassVar[str] = "meanflow"

    def __post_init__(self) -> None:
        _check_ranges(self, {"jump_fraction": _float(**_PROBABILITY), "logit_mean": _float(),
                             "logit_std": _float(gt=0.0), "power": _float(ge=0.0), "eps": _float(gt=0.0),
                             "velocity": _one_of(*ANYSTEP_VELOCITIES), "steps": _int(1), "lr": _float(gt=0.0),
                             "start": _one_of(*ANYSTEP_STARTS)})


@dataclass
class OtCfmConfig:
    """The few-step table's OT-CFM baseline (``ot-cfm``: flow matching on minibatch-OT pairs from random
    weights, no teacher). ``steps``: its ``train.steps`` (``None``: the experiment's own, the teacher's
    budget); its other training keys are the ``train`` section's."""

    steps: Optional[int] = None

    _section: ClassVar[str] = "ot_cfm"

    def __post_init__(self) -> None:
        _check_ranges(self, {"steps": _int(1, optional=True)})


# the discriminator's differentiable augmentations (``apt.augment``, images only)
APT_AUGMENTS = ("translation", "cutout")


@dataclass
class AptConfig:
    """Adversarial post-training of a one-step generator (``train.objective: apt``,
    :mod:`flowmatch.distill.adversarial`). The generator is ``train.init``'s one-step checkpoint; the
    discriminator's backbone is ``discriminator_init``'s flow checkpoint (the teacher, all of it
    trained) or ``random`` (the ablation). ``loss``: ``ns`` (non-saturating) or ``relativistic``
    (pairing). ``r1``: ``approx`` (``r1_lambda * ||D(x) - D(x + r1_sigma * eps)||^2`` on real ``x``,
    ``r1_sigma`` a standard deviation), ``exact`` (``r1_lambda * r1_sigma^2 * ||grad_x D(x)||^2``, the
    approximation's small-sigma expectation, so both modes penalise alike) or ``none``. ``r2_lambda`` (0: off)
    adds the same penalty, in the same mode and with the same ``r1_sigma``, on the generated rows (R2; the
    approximated R1 and R2 of APT's follow-up, Lin et al. 2025, "Autoregressive Adversarial Post-Training",
    and R3GAN's R1 + R2, Huang et al. 2024). ``t_shift``
    shifts the discriminator's time draw towards the noise end (1: uniform; below 1: towards the data).
    ``noise_inputs``: the discriminator sees real and generated samples noised to its time ``t``
    (``t x + (1 - t) n``, as APT's and LADD's) instead of clean ones. ``fourier_features`` (0: off; MLP
    discriminators only) adds a head on ``fourier_features`` random Fourier features of ``x`` (frequencies
    ``N(0, fourier_scale^2)``), summed with the feature head's logit. ``lr_g`` / ``lr_d``: the
    RMSProp (alpha 0.9) learning rates of the generator and the discriminator. ``regression_weight``
    keeps the one-step regression onto the run's pair store beside the adversarial loss (0: off;
    needs ``coupling.name=paired``); ``regression_pairs``: which pair store a pipeline's APT stage
    regresses, ``last_round`` (the last reflow round's, which the distilled generator learnt) or
    ``teacher`` (the teacher's own, ``pairs-1RF``: its dopri5 samples, which the rounds after it only
    approximate). ``real_from_teacher`` (0: off): the fraction of the discriminator's real rows taken from
    the pair store's teacher samples instead of the data (the first ``round(f * batch)`` rows of each real
    batch; needs ``coupling.name=paired``): soft labels beside the hard ones on the discriminator's side, a
    real set the discriminator cannot learn by heart. ``augment`` (images only): ``none`` or a comma-separated list of
    ``translation`` and ``cutout``, the differentiable augmentations of every image the discriminator
    sees (real and generated, both players, R1), against a discriminator that learns a few thousand
    training images by heart. ``d_steps``: discriminator updates per generator update (each on a batch of
    its own); ``d_warmup``: discriminator updates before the generator's first (in the first step), so
    that the generator starts against a discriminator that has learnt what it can. ``d_train``: ``all`` (APT:
    every parameter of the discriminator trained) or ``heads`` (the teacher's backbone frozen, its logit heads
    alone trained: FreezeD, Mo et al. 2020, a discriminator with less room to learn few training images by
    heart). ``dmd_weight`` (0: off) adds distribution matching (DMD2, Yin et al. 2024) to the generator's loss
    with that weight: the gap between a fake flow's and the teacher's (``discriminator_init``'s) denoised
    predictions at the generated samples noised to a time in [0.02, 0.98]; the fake flow (player
    ``fake_score``, initialised from the teacher) learns the generator's samples by flow matching, ``fake_steps``
    Adam updates a step at learning rate ``lr_fake``. ``adversarial_weight`` scales the GAN loss in the
    generator's loss (1; 0: DMD and regression alone, the discriminator still trained for its logs). Every
    ``eval_every`` updates (0: never) the EMA generator is scored on ``eval_draws`` validation draws of ``eval_n`` (the
    mean of their scores) and the best is kept as ``checkpoints/best.pt``; ``eval_noise``: the validation
    draws' source points i.i.d. (``iid``) or quasi-random (``quasi``: scrambled Sobol, a mixture's components
    in exact shares, :meth:`flowmatch.data.toy.ToyDistribution.quasi`), which leaves less scatter between
    two checkpoints' scores; ``eval_min_gain``: a checkpoint replaces the start only when its score is
    lower than the start's by more than this (0: any gain; the lowest of those that are is kept).
    ``lecam_weight`` (0: off) adds LeCam's regulariser (Tseng et al. 2021, "Regularizing Generative Adversarial
    Networks under Limited Data") to the discriminator's loss with that weight: the logits on real rows are
    pulled down to the moving average of those on generated rows, and those on generated rows up to the
    average on real ones (each only from the far side), so that a discriminator with few real images cannot
    drive the two sides apart by learning the images by heart; ``lecam_decay``: the averages' decay (0.99, as
    theirs). ``eval_max_copies`` (image runs on ``data.split=fit``; 1: off): a checkpoint replaces the start only
    when its validation ``copies`` (the memorisation check against the fit images with the val images as
    new ones, :class:`~flowmatch.bench.ValidationImageScorer`; 0.05 expected of new images) is at most
    this, so that a generator drifting towards its discriminator's training images is not kept for the
    FD that drift buys. ``steps``
    is the stage's ``train.steps`` where a pipeline trains it as a stage. Of the ``train`` section the run reads
    ``batch_size`` (each player's batch), ``ema_decay`` (the generator's EMA), ``warmup_steps`` /
    ``lr_schedule`` (applied to both learning rates; APT's is constant: ``warmup_steps=0``) and ``seed``;
    not ``lr`` or ``weight_decay``; ``grad_clip`` must be 0.

    Defaults, from short runs on N(0, I) -> moons from the distilled one-step model (batch 512):
    ``lr_g`` 1e-5 and ``lr_d`` 1e-4; a generator rate of 1e-4 raised the validation W2 by half within
    20 updates. ``r1_lambda`` 100 and ``r1_sigma`` 0.01 are APT's image values (``sigma`` relative to
    data of a few units here). ``noise_inputs`` stays off: on moons (``t_shift`` 0.5, ``lr_d`` 1e-3) the
    discriminator stayed at chance and the validation W2 rose from 0.204 to 0.212 in 400 updates.
    ``fourier_features`` stays 0 by default (the images' UNet has no such head); on the toy tasks a
    discriminator without it stayed at chance (``apt/d_loss`` ~ 2 ln 2 with ``lr_d`` up to 3e-3 and
    batch 2048, as did a fresh MLP classifier on 50,000 samples a side), one with 128 learned the
    8gaussians task's mode bridges within a few hundred updates."""

    steps: int = 600
    lr_g: float = 1e-5
    lr_d: float = 1e-4
    loss: str = "ns"
    r1: str = "approx"
    r1_lambda: float = 100.0
    r1_sigma: float = 0.01
    r2_lambda: float = 0.0
    t_shift: float = 1.0
    noise_inputs: bool = False
    fourier_features: int = 0
    fourier_scale: float = 1.0
    discriminator_init: Optional[str] = None
    regression_weight: float = 0.0
    regression_pairs: str = "last_round"
    real_from_teacher: float = 0.0
    augment: str = "none"
    d_steps: int = 1
    d_warmup: int = 0
    d_train: str = "all"
    adversarial_weight: float = 1.0
    dmd_weight: float = 0.0
    lr_fake: float = 1e-4
    fake_steps: int = 1
    lecam_weight: float = 0.0
    lecam_decay: float = 0.99
    eval_every: int = 50
    eval_n: int = 2000
    eval_draws: int = 1
    eval_noise: str = "iid"
    eval_min_gain: float = 0.0
    eval_max_copies: float = 1.0

    _section: ClassVar[str] = "apt"

    @property
    def augments(self) -> tuple[str, ...]:
        """``augment`` as a tuple of its kinds (empty for ``none``)."""
        return () if self.augment == "none" else tuple(self.augment.split(","))

    def __post_init__(self) -> None:
        _check_ranges(self, {"steps": _int(1), "lr_g": _float(gt=0.0), "lr_d": _float(gt=0.0),
                             "loss": _one_of("ns", "relativistic"), "r1": _one_of("approx", "exact", "none"),
                             "r1_lambda": _float(ge=0.0), "r1_sigma": _float(gt=0.0), "r2_lambda": _float(ge=0.0),
                             "t_shift": _float(gt=0.0),
                             "fourier_features": _int(0), "fourier_scale": _float(gt=0.0),
                             "regression_weight": _float(ge=0.0),
                             "regression_pairs": _one_of("last_round", "teacher"),
                             "real_from_teacher": _float(**_PROBABILITY), "d_steps": _int(1), "d_warmup": _int(0),
                             "d_train": _one_of("all", "heads"), "adversarial_weight": _float(ge=0.0),
                             "dmd_weight": _float(ge=0.0), "lr_fake": _float(gt=0.0), "fake_steps": _int(1),
                             "lecam_weight": _float(ge=0.0), "lecam_decay": _float(ge=0.0, lt=1.0),
                             "eval_every": _int(0), "eval_n": _int(2), "eval_draws": _int(1),
                             "eval_noise": _one_of("iid", "quasi"), "eval_min_gain": _float(ge=0.0),
                             "eval_max_copies": _float(**_PROBABILITY)})
        kinds = self.augments
        if len(set(kinds)) != len(kinds) or not set(kinds) <= set(APT_AUGMENTS):
            raise ConfigError(f"apt.augment = {self.augment!r}: must be 'none' or a comma-separated list of "
                              f"{', '.join(APT_AUGMENTS)} (each at most once)")
        if self.discriminator_init is not None and (not isinstance(self.discriminator_init, str)
                                                    or not self.discriminator_init.strip()):
            raise ConfigError(f"apt.discriminator_init = {self.discriminator_init!r}: must be a checkpoint path "
                              f"or 'random'")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    path: PathConfig = field(default_factory=PathConfig)
    coupling: CouplingConfig = field(default_factory=CouplingConfig)
    time: TimeConfig = field(default_factory=TimeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    reflow: ReflowConfig = field(default_factory=ReflowConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    apt: AptConfig = field(default_factory=AptConfig)
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    ot_cfm: OtCfmConfig = field(default_factory=OtCfmConfig)

    _section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_file_name("name", self.name)  # a run's directory is runs/<name>, a chain's stage OUT/<name>


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.2); PyYAML's YAML 1.1 resolver needs a
    dot (``1.0e-3``) and would hand ``lr: 1e-3`` / ``--set train.lr=1e-3`` over as a string."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_load(stream: Any) -> Any:
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` checked against annotation ``tp`` (int accepted for float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {' or '.join(_type_name(a) for a in typing.get_args(tp))}, "
                          f"got {type(value).__name__} {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of {_type_name(item)}, got {type(value).__name__} {value!r}")
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return _from_dict(tp, value, where)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")  # pragma: no cover


def _from_dict(cls: type, data: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; valid keys{' of ' + where if where else ''}: "
                          f"{', '.join(names)}")
    kwargs = {k: _check_value(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a section nested under another name (reflow.time): say where it is
        own = getattr(cls, "_section", None)
        if own and where and where != own and str(e).startswith(f"{own}."):
            raise ConfigError(f"{where}{str(e)[len(own):]}") from None
        raise


# Sections that configure pipeline stages (the reflow chain, the distillation stage, the few-step table's
# OT-CFM baseline), not the run they are saved with: a run is the same run, and resumes, whatever they say
# (so are the sections of the objectives a run does not train: flowmatch.training.objectives.unused_sections).
STAGE_SECTIONS = ("reflow", "distill", "ot_cfm")

# Keys that moved: old dotted key -> new one. A config (or a checkpoint's) with an old key loads
# as before, its value under the new key; ``--set`` of an old key is refused naming the new one.
MOVED_KEYS = {"reflow.distill_steps": "distill.steps", "reflow.distill_lr": "distill.lr",
              "reflow.distill_loss": "distill.loss"}


def _migrate(data: dict) -> tuple[dict, list[str]]:
    """``data`` with the values of :data:`MOVED_KEYS`' old keys under their new ones (a new key given
    too wins); returns the old keys found."""
    found = []
    for old, new in MOVED_KEYS.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        section = data.get(osec)
        if isinstance(section, dict) and okey in section:
            if not found:
                data = copy.deepcopy(data)
                section = data[osec]
            value = section.pop(okey)
            target = data.setdefault(nsec, {})
            if isinstance(target, dict):
                target.setdefault(nkey, value)
            found.append(old)
    return data, found


def from_dict(data: dict | None, cls: type = ExperimentConfig) -> Any:
    """Build a config dataclass from a nested dict, refusing unknown keys and wrong types (keys that
    moved, :data:`MOVED_KEYS`, are read at their new place)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    if cls is ExperimentConfig:
        data, _ = _migrate(data)
    return _from_dict(cls, data, "")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (YAML / JSON / checkpoint friendly)."""
    return dataclasses.asdict(cfg)


def load_config(path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config and apply ``key=value`` overrides."""
    try:
        with open(path) as f:
            data = _yaml_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if isinstance(data, dict):
        _, moved = _migrate(data)
        if moved:
            warnings.warn(f"{path}: {', '.join(f'{k} is now {MOVED_KEYS[k]}' for k in moved)} (read there; "
                          f"rename the key to silence this)", FutureWarning, stacklevel=2)
    try:
        cfg = from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(cfg, overrides or [])


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config as YAML."""
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars); returns a new config."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        if key.strip() in MOVED_KEYS:
            raise ConfigError(f"override {item!r}: {key.strip()} is now {MOVED_KEYS[key.strip()]}")
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                valid = ", ".join(k for k, v in node.items() if isinstance(v, dict)) if isinstance(node, dict) else ""
                raise ConfigError(f"override {item!r}: unknown config section {'.'.join(parts[:i + 1])}; "
                                  f"valid sections: {valid}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown config key {key}; valid keys: {', '.join(node)}")
        try:
            node[parts[-1]] = _yaml_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return from_dict(data, type(cfg))


def config_diff(a: Any, b: Any) -> list[str]:
    """Dotted keys whose values differ between two configs (or nested dicts)."""
    da = a if isinstance(a, dict) else to_dict(a)
    db = b if isinstance(b, dict) else to_dict(b)
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y:
            out.append(prefix)

    walk(copy.deepcopy(da), copy.deepcopy(db), "")
    return out
