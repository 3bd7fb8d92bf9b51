"""One optimiser step of flow-matching training, plain or fast, and a run-directory-free trainer.

The step minimises ``mix * L(pairs) + (1 - mix) * L(real data)`` (``L`` the conditional flow-matching
loss of :func:`~flowmatch.training.losses.cfm_loss`; ``L(coupling)`` alone without real data) with
AdamW under a warm-up / cosine schedule, gradient clipping and an EMA of the weights.

Two modes, chosen by ``train.fast`` (``auto``: on with CUDA; on the CPU on where the fused MLP step
below can train the run, else off; see :func:`auto_fused`):

- **plain**: the historical loop. The loss is read to the host (``loss.item()``) every step and a
  non-finite loss raises :class:`~flowmatch.errors.NonFiniteLossError` before the update; the
  loss-per-t-bin sums are accumulated on the CPU.
- **fast**: nothing inside a step waits for the device. The losses, the gradient norm and the t-bin
  sums stay on the device until the caller reads them (:meth:`Trainer.read_losses`,
  :meth:`Trainer.take_bins`; the loop does so at log and checkpoint steps, so a non-finite loss is
  reported, with the step it happened at, at the next log or checkpoint step at the latest, and
  before any checkpoint is written). AdamW is ``fused`` on CUDA and ``foreach`` elsewhere, clipping
  is ``clip_grad_norm_(..., foreach=True)`` and the EMA is one ``torch._foreach_lerp_``. On the CPU,
  without compilation, its numbers equal the plain step's exactly, on any host: torch's CPU
  ``_foreach_*`` ops run the per-tensor kernels tensor by tensor, and foreach AdamW does the
  per-tensor AdamW's arithmetic in the same order.

  On the CPU, a toy MLP run takes the **fused MLP step** (:mod:`flowmatch.training.fused_mlp`;
  ``train.fused``: ``auto`` wherever it can run, ``on`` to require it, ``off`` for the autograd
  step, and with ``train.fast: auto`` the plain loop): the same draws, the MLP's forward and
  backward written out and the weights, gradients and EMA in flat buffers, about 2x the plain
  loop's steps/s on two CPU cores at width 64 (1.3-1.4x at width 256, batch 512); its numbers agree
  with the plain step's to float rounding. It calls no module forward, so forward hooks do not run.

  ``train.compile`` (``auto``: with the fast step on CUDA) wraps the loss computation from the drawn
  batch (model forward, distance, weighting, t-bins; the backward is compiled with it) in
  ``torch.compile(mode=...)``: ``on`` is mode ``default``; ``reduce-overhead`` (CUDA graphs) and the
  ``max-autotune`` modes are passed through. The random draws (coupling, times, path noise) stay
  eager, in the same order, so a compiled run sees the same batches; its losses agree with the plain
  step's to float rounding. The compiled step always computes the configured loss of
  :data:`~flowmatch.training.losses.LOSSES` (a custom ``loss_fn`` is used by the eager steps only).

Host round trips that remain in the fast mode on CUDA, by design: a minibatch-OT coupling with
``coupling.method=exact`` solves the assignment on the CPU (every step waits for the GPU; a warning
says so and names ``coupling.method=sinkhorn``, which runs on the device; the coupling is never
changed behind the user's back); a paired coupling whose store is memory-mapped gathers its rows on
the CPU. ``train(..., on_step=...)`` hands ``on_step`` the loss as a float, so with a callback the
loop reads the loss every step.

Benchmark API (no run directory, checkpoint or tracking)::

    trainer = build_trainer(cfg, fast=True, compile="default")   # None: take cfg.train.fast/compile
    trainer.run(20); trainer.sync()                               # warm-up (compiles)
    t0 = time.perf_counter(); trainer.run(1000); losses = trainer.sync()
    steps_per_sec = 1000 / (time.perf_counter() - t0)

The step's other settings, resolved with :func:`resolve_plan` into the :class:`SpeedPlan`:

- ``train.precision`` (``auto``: bf16 for image tasks on CUDA when the GPU has it, else fp32): ``bf16``
  runs the model's forward and the loss under ``torch.autocast(device_type, dtype=torch.bfloat16)``; the
  random draws, the backward's accumulation into the gradients, clipping, AdamW and the EMA stay fp32
  (the weights are never cast) and the loss is reduced in fp32 (:func:`~flowmatch.training.losses.cfm_loss`).
- ``train.channels_last`` (``auto``: on with CUDA): an image model (4-D data) is put in
  ``torch.channels_last`` once and each ``xt`` is converted before the forward; flat data is untouched.
- ``train.grad_accum``: ``grad_accum`` micro-batches of ``batch_size`` each, every micro-batch's loss
  divided by ``grad_accum`` before its backward, so the accumulated gradient is that of the mean loss
  over ``grad_accum * batch_size`` draws; then one clip, optimiser step and EMA update. The logged
  loss is the mean of the micro-batch losses; ``Trainer.global_step`` counts optimiser steps.

Class labels: with ``model.class_cond`` each term's batch is drawn with ``coupling.sample_labeled``
(the same random stream as ``sample``), then each label is replaced by the model's ``null_class``
with probability ``train.class_dropout`` (one ``torch.rand`` of ``[B]`` from the step's generator,
drawn whatever the probability, after the times and before the path noise), and the labels reach
the model as ``cond``. Unconditional runs draw exactly as before.

Data parallel: inside a process group of two or more ranks (:mod:`flowmatch.training.distributed`)
the :class:`Trainer` wraps the model in ``DistributedDataParallel`` (gradients averaged over the
ranks; micro-batches other than the last run under ``no_sync``), seeds rank ``r``'s generator with
``seed + 1000 * r``, and reports the loss averaged over the ranks (one all-reduce of a scalar per
step, so every rank sees the same losses and a non-finite loss stops every rank at the same step);
:meth:`Trainer.take_bins` sums the t-bins over the ranks. The EMA, optimiser and checkpoint hold
the unwrapped module.

``Trainer.step() -> StepOutput`` does one optimiser step (no host synchronisation in the fast mode);
``Trainer.run(n)`` does ``n``; ``Trainer.sync() -> list[float]`` waits for the device and returns the
losses of the steps since the last read (raising ``NonFiniteLossError`` at the first non-finite one);
``Trainer.global_step`` counts steps; ``Trainer.plan`` is the resolved :class:`SpeedPlan`;
``Trainer.take_bins()`` returns the loss-per-t-bin sums and counts; ``Trainer.state_dict()`` /
``load_state_dict()`` are the checkpoint payload (model, EMA, optimiser, scheduler, coupling, step,
rng; with several ranks also every rank's generator and coupling state) that
:func:`~flowmatch.training.loop.train` saves. ``Trainer.train_step.accumulate()`` runs the forward
and backward of one step without updating anything (the gradients are left in the parameters).
"""

from __future__ import annotations

import contextlib
import math
import types
import warnings
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from flowmatch.config import ExperimentConfig, TrainConfig
from flowmatch.couplings import IndependentCoupling, MinibatchOTCoupling, PairedCoupling
from flowmatch.errors import ConfigError, NonFiniteLossError
from flowmatch.models import EMA
from flowmatch.training import distributed as dist_utils
from flowmatch.training.builders import Components, build_components
from flowmatch.training.fused_mlp import FlatMLP, fused_mlp_reason
from flowmatch.training.losses import LOSSES, cfm_loss, t_bin_sums
from flowmatch.training.schedule import lr_lambda
from flowmatch.utils import make_generator

__all__ = ["FAST_MODES", "COMPILE_MODES", "PRECISIONS", "CHANNELS_LAST_MODES", "NUM_T_BINS", "SpeedPlan",
           "resolve_speed", "resolve_plan", "resolve_precision", "resolve_channels_last", "build_optimizer",
           "load_optimizer_state", "auto_fused", "StepOutput", "TrainStep", "Trainer", "build_trainer"]

NUM_T_BINS = 10
FAST_MODES = ("auto", "on", "off")
_TORCH_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# "on" means torch.compile's mode "default"; the others after "off" are torch.compile modes.
COMPILE_MODES = ("auto", "on", "off") + _TORCH_MODES
PRECISIONS = ("auto", "fp32", "bf16")
CHANNELS_LAST_MODES = ("auto", "on", "off")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# Optimiser settings that describe the implementation, not the optimisation: a resumed run keeps
# its own (a checkpoint of a plain run may be resumed fast, and the reverse).
_IMPL_KEYS = ("foreach", "fused", "capturable")
# The losses waiting to be read are concatenated into one tensor when there are this many (bounds the
# number of live device tensors when a benchmark never reads).
_MAX_PENDING = 1024


@dataclass(frozen=True)
class SpeedPlan:
    """The resolved step: ``fast`` or plain; ``compile`` is a torch.compile mode or ``None`` (eager);
    ``precision`` is ``fp32`` or ``bf16`` (autocast of the forward and loss); ``channels_last`` says
    whether an image model and its inputs use the channels_last layout; ``grad_accum`` micro-batches
    make one optimiser step. The defaults are the historical fp32, contiguous, one-batch step."""

    fast: bool
    compile: Optional[str] = None
    precision: str = "fp32"
    channels_last: bool = False
    grad_accum: int = 1


def _normal(value, key: str, valid: tuple) -> str:
    if isinstance(value, bool):
        value = "on" if value else "off"
    if value not in valid:
        raise ConfigError(f"train.{key} must be one of {', '.join(valid)}; got {value!r}")
    return value


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def resolve_precision(precision: str = "auto", device: torch.device | str = "cpu", *, images: bool = True,
                      key: str = "train.precision") -> str:
    """``train.precision`` (or another ``key``'s, e.g. ``reflow.precision``) for ``device``: ``fp32`` or
    ``bf16``. ``auto`` is bf16 for image models (``images``) on a CUDA device that supports it and fp32
    elsewhere: on the CPU bf16 autocast is slower than fp32 (ask for it explicitly, e.g. in tests), and
    the small toy MLPs gain nothing from it while their W2 at the noise floor would feel the rounding.
    Unknown values: a ConfigError naming ``key`` and listing the valid ones."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "auto":
        return precision
    if not _is_cuda(device) or not images:
        return "fp32"
    # a config resolved for CUDA on a machine without it (a dry run) still says bf16
    return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp32"


def resolve_channels_last(channels_last: str | bool = "auto", device: torch.device | str = "cpu") -> bool:
    """``train.channels_last`` for ``device``: ``auto`` is on with CUDA (where convolutions are faster
    in that layout), off elsewhere. Unknown values: a ConfigError listing the valid ones."""
    value = _normal(channels_last, "channels_last", CHANNELS_LAST_MODES)
    return value == "on" or (value == "auto" and _is_cuda(device))


def _grad_accum(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"train.grad_accum must be an integer >= 1, got {value!r}")
    return value


def resolve_speed(fast: str | bool = "auto", compile: str | bool = "auto",
                  device: torch.device | str = "cpu", *, precision: str = "fp32",
                  channels_last: str | bool = "off", grad_accum: int = 1,
                  images: bool = True) -> SpeedPlan:
    """Resolve ``train.fast`` / ``train.compile`` (and, given, ``precision``, ``channels_last`` and
    ``grad_accum``; their keyword defaults are the historical step) for ``device`` (unknown values: a
    ConfigError listing the valid ones); ``images`` says whether the task is an image one (``auto``
    precision is bf16 and channels_last applies for images only). ``fast="auto"`` is on with CUDA, or
    when a compile mode is asked for explicitly; ``compile="auto"`` compiles the fast step on CUDA only. Compiling needs the
    fast step, so ``fast="off"`` with an explicit compile mode is an error. :func:`resolve_plan`
    resolves all of a config's keys."""
    fast = _normal(fast, "fast", FAST_MODES)
    compile = _normal(compile, "compile", COMPILE_MODES)
    rest = dict(precision=resolve_precision(precision, device, images=images),
                channels_last=resolve_channels_last(channels_last, device) and images,
                grad_accum=_grad_accum(grad_accum))
    cuda = _is_cuda(device)
    explicit = compile not in ("auto", "off")
    if fast == "off" and explicit:
        raise ConfigError(f"train.compile={compile} compiles the fast step, but train.fast=off; "
                          f"set train.fast=on (or auto) or train.compile=off")
    on = fast == "on" or (fast == "auto" and (cuda or explicit))
    if not on or compile == "off" or (compile == "auto" and not cuda):
        return SpeedPlan(on, None, **rest)
    return SpeedPlan(True, "default" if compile in ("auto", "on") else compile, **rest)


def auto_fused(plan: SpeedPlan, cfg: ExperimentConfig, comp: Components, *, distributed: bool = False,
               loss_fn=None) -> SpeedPlan:
    """``plan`` with the fast step switched on where ``train.fast: auto`` left it off on the CPU and
    the fused MLP step can train the run (:func:`~flowmatch.training.fused_mlp.fused_mlp_reason`:
    a toy MLP run, fp32, l2, one process, ...): there it is the faster step with the plain loop's
    numbers to float rounding. ``train.fused: off`` or ``train.fast: off`` keep the plain loop;
    ``loss_fn`` other than :func:`cfm_loss` (a test's or a script's) keeps it too."""
    tc = cfg.train
    if (plan.fast or _normal(tc.fast, "fast", FAST_MODES) != "auto" or _normal(tc.fused, "fused", FAST_MODES) == "off"
            or comp.device.type != "cpu" or plan.compile is not None):
        return plan
    reason = fused_mlp_reason(comp.model, comp, tc, distributed=distributed, precision=plan.precision, compile=None,
                              class_cond=cfg.model.class_cond, default_loss=loss_fn in (None, cfm_loss))
    return plan if reason is not None else replace(plan, fast=True)


def _check_class_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ConfigError(f"train.class_dropout must be a probability in [0, 1], got {p!r}")
    return float(p)


def _is_image(comp) -> bool:
    """Whether ``comp`` (:class:`Components`) is an image task: a draw is an image ``[C, H, W]``
    (the source's shape, else the target's). The one answer for ``precision: auto`` and
    ``channels_last`` (which applies to 4-D batches only)."""
    for d in (comp.source, comp.target):
        shape = getattr(d, "shape", None)
        if shape is not None:
            return len(shape) == 3
    return False


def resolve_plan(tc: TrainConfig, device: torch.device | str = "cpu", *, images: bool = True) -> SpeedPlan:
    """The :class:`SpeedPlan` of a config's ``train`` section on ``device`` (every step key checked,
    ``class_dropout`` too, so a bad value is refused before anything is built or written); ``images``
    says whether the data are images (``precision: auto`` is bf16 for them only)."""
    _check_class_dropout(tc.class_dropout)
    _normal(tc.fused, "fused", FAST_MODES)
    return resolve_speed(tc.fast, tc.compile, device, precision=tc.precision, channels_last=tc.channels_last,
                         grad_accum=tc.grad_accum, images=images)


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, *, fast: bool = False,
                    device: torch.device | str = "cpu", params: Optional[list] = None):
    """AdamW (``fused`` on CUDA / ``foreach`` elsewhere when ``fast``; torch's default otherwise) and
    its LambdaLR schedule; returns ``(optimizer, scheduler)``. ``params`` (default ``model``'s) with
    ``fast`` on the CPU: the fused MLP step's one flat parameter, updated by fused AdamW."""
    kw = {}
    if fast:
        kw = {"fused": True} if torch.device(device).type == "cuda" or params is not None else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters() if params is None else params, lr=tc.lr,
                            weight_decay=tc.weight_decay, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, tc.steps, tc.lr_schedule,
                                                             tc.lr_min_ratio))
    return opt, sched


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)`` keeping ``opt``'s implementation (foreach / fused / capturable):
    torch would take those from ``state``, and place AdamW's step counters by them."""
    groups = [{**saved, **{k: mine[k] for k in _IMPL_KEYS if k in mine}}
              for saved, mine in zip(state["param_groups"], opt.param_groups)]
    opt.load_state_dict({**state, "param_groups": groups})


# the fast step bins its per-sample losses by t every this many micro-batches (see TrainStep._add_bins)
_BIN_FLUSH = 64


def _loss_terms(model, distance, num_bins: int, xts: tuple, ts: tuple, uts: tuple, conds: tuple, weights: tuple,
                amp_device: str, amp: bool):
    """The compiled part of a fast step: ``sum_k w_k mean_i d(v(xt_ki, t_ki, cond_ki), ut_ki)`` (the
    eager step's loss on drawn path samples; ``cond`` ``None`` calls ``v(xt, t)``) and its t-bin sums
    and counts. With ``amp`` the forward runs under bf16 autocast and its output is cast to fp32
    before the distance."""
    vs = []
    with torch.autocast(amp_device, dtype=torch.bfloat16, enabled=amp):
        for xt, t, y in zip(xts, ts, conds):
            vs.append(model(xt, t) if y is None else model(xt, t, y))
    per = []
    for v, ut in zip(vs, uts):
        if amp:
            v = v.float()
        per.append(distance((v - ut).reshape(v.shape[0], -1)))
    if len(per) == 1:
        loss, per_sample, t = per[0].mean(), per[0], ts[0]
    else:
        loss = sum(w * p.mean() for w, p in zip(weights, per))
        per_sample, t = torch.cat(per), torch.cat(ts)
    sums, counts = t_bin_sums(per_sample, t, num_bins)
    return loss, sums, counts


def _own_code(fn):
    """``fn`` with a code object of its own. torch.compile keeps compiled graphs, and its limit of 8
    recompilations, per code object: without this, the ninth differently shaped model compiled in one
    process (a benchmark sweep) would silently run eagerly."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class _ChannelsLastCall:
    """``net`` called with a 4-D ``x`` in the channels_last layout its weights are in (what the loss
    function is handed as the model when ``train.channels_last`` is on)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x, t, cond=None):
        x = _to_channels_last(x)
        return self.net(x, t) if cond is None else self.net(x, t, cond)


def _labeled(coupling) -> Optional[bool]:
    """Whether ``coupling`` draws class labels: True / False where that is known without drawing,
    ``None`` otherwise (the first draw tells)."""
    if isinstance(coupling, PairedCoupling):
        return coupling.y is not None
    if isinstance(coupling, IndependentCoupling):
        target = coupling.target
        if not hasattr(target, "sample_labeled"):
            return False
        if hasattr(target, "labels"):
            return target.labels is not None
    return None


def _unlabeled_error(coupling) -> ConfigError:
    return ConfigError(f"model.class_cond needs class labels, but the {coupling.name or type(coupling).__name__} "
                       f"coupling's data has none (a labeled image dataset, or a pair store made by a "
                       f"class-conditional teacher); set model.class_cond=false")


@dataclass
class StepOutput:
    """One step's results. ``loss`` and ``grad_norm`` (the total norm before clipping) are 0-d tensors
    on the device; ``lr`` is the learning rate the step used; ``value`` is the loss as a float in the
    plain mode (``None`` in the fast mode, which never reads it). With ``grad_accum`` > 1 the loss is
    the mean over the micro-batches; with several ranks, the mean over the ranks too."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    value: Optional[float] = None


class TrainStep:
    """One optimiser step on ``model`` (see the module docstring for the plain and fast modes).

    ``net`` is what the forward calls (``model`` itself, or its ``DistributedDataParallel`` wrapper);
    the optimiser, clipping and EMA act on ``model``. ``compile`` (a torch.compile mode, fast mode
    only) compiles the loss from the drawn batch. ``loss_fn`` (``cfm_loss``'s signature; ``cond=`` is
    passed only with class labels) computes each term in the eager modes. ``precision``
    (``fp32``/``bf16``), ``channels_last`` and ``class_cond`` are resolved values; ``grad_accum`` and
    ``class_dropout`` come from ``tc``. The loss-per-t-bin sums and counts accumulate across steps
    until :meth:`take_bins`.
    """

    def __init__(self, model: torch.nn.Module, comp: Components, tc: TrainConfig, mix: float,
                 gen: torch.Generator, ema: EMA, opt: torch.optim.Optimizer, sched, *, fast: bool = False,
                 compile: Optional[str] = None, loss_fn=cfm_loss, num_bins: int = NUM_T_BINS,
                 net: Optional[torch.nn.Module] = None, precision: str = "fp32", channels_last: bool = False,
                 class_cond: bool = False, fused: Optional[FlatMLP] = None):
        if compile is not None and not fast:
            raise ConfigError("a compiled step needs fast=True")
        if compile is not None and compile not in _TORCH_MODES:
            raise ConfigError(f"unknown torch.compile mode {compile!r}; valid modes: {', '.join(_TORCH_MODES)}")
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"the step's precision must be fp32 or bf16 (resolve train.precision first); "
                              f"got {precision!r}")
        self.model, self.comp, self.tc, self.mix, self.gen = model, comp, tc, float(mix), gen
        self.net = model if net is None else net
        self.ema, self.opt, self.sched = ema, opt, sched
        self.fast, self.compile_mode, self.loss_fn, self.num_bins = bool(fast), compile, loss_fn, num_bins
        self.precision, self.channels_last = precision, bool(channels_last)
        self.grad_accum = _grad_accum(tc.grad_accum)
        self._ddp = isinstance(self.net, DistributedDataParallel)
        # what the eager loss function calls: the net, converting xt to channels_last when asked
        self._forward = _ChannelsLastCall(self.net) if self.channels_last else self.net
        self.class_cond = bool(class_cond)
        self.class_dropout = _check_class_dropout(tc.class_dropout)
        self.null_class = None
        if self.class_cond:
            self.null_class = getattr(model, "null_class", None)
            if self.null_class is None:
                raise ConfigError(f"model.class_cond needs a model with class conditioning (a null_class); "
                                  f"{type(model).__name__} has none")
            for c in (comp.coupling, comp.real_coupling):
                if c is not None and _labeled(c) is False:
                    raise _unlabeled_error(c)
        self.params = [p for p in model.parameters()]
        if fused is not None and not fast:
            raise ConfigError("the fused MLP step is a fast step: it needs fast=True")
        self.fused = fused  # the fused MLP step's flat buffers (see flowmatch.training.fused_mlp)
        self.max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        # plain: CPU accumulators (as the historical loop); fast: on the device, read by take_bins
        bins_dev = comp.device if self.fast else torch.device("cpu")
        self.bin_sum = torch.zeros(num_bins, dtype=torch.float64, device=bins_dev)
        self.bin_cnt = torch.zeros(num_bins, dtype=torch.float64, device=bins_dev)
        self._bin_queue: list[tuple[torch.Tensor, torch.Tensor]] = []  # (per-sample losses, t) not yet binned
        self._compiled = None
        self._cudagraphs = compile in _CUDAGRAPH_MODES and comp.device.type == "cuda"
        if compile is not None:
            self._distance = LOSSES[tc.loss]
            self._compiled = torch.compile(_own_code(_loss_terms), mode=compile, dynamic=False)
        if self.fast and comp.device.type == "cuda":
            for c in (comp.coupling, comp.real_coupling):
                if isinstance(c, MinibatchOTCoupling) and c.method == "exact":
                    warnings.warn("coupling.method=exact solves the OT assignment on the CPU, so every fast step "
                                  "waits for the GPU; coupling.method=sinkhorn pairs on the device", stacklevel=2)
                if isinstance(c, PairedCoupling) and not c.on_device:
                    warnings.warn("the paired coupling's store is gathered on the CPU every step; load it as "
                                  "tensors to keep the fast step on the device", stacklevel=2)

    def __call__(self, step: int) -> StepOutput:
        """Step number ``step`` (from 1; used in error messages)."""
        return self._fast(step) if self.fast else self._plain(step)

    # ------------------------------------------------------------------ draws and losses

    def _terms(self) -> list:
        """``(weight, coupling)`` of each loss term: ``mix * L(pairs) + (1 - mix) * L(real data)`` for a
        paired coupling with real data mixed in (each on its own batch of ``batch_size``; with
        ``mix = 0`` no pair is drawn, so the run is plain flow matching draw for draw), else
        ``L(coupling)``."""
        c = self.comp
        if c.real_coupling is None:
            return [(1.0, c.coupling)]
        return ([(self.mix, c.coupling)] if self.mix > 0 else []) + [(1.0 - self.mix, c.real_coupling)]

    def _draw(self, coupling) -> tuple:
        """One term's ``(x0, x1, t, cond)``, drawn in this order: the coupling's batch, the times and,
        with class labels, the label dropout (the path noise follows, in the loss)."""
        b, gen, dev = self.tc.batch_size, self.gen, self.comp.device
        if not self.class_cond:
            x0, x1 = coupling.sample(b, generator=gen)
            return x0, x1, self.comp.time_sampler.sample(b, generator=gen, device=dev), None
        x0, x1, y = coupling.sample_labeled(b, generator=gen)
        if y is None:
            raise _unlabeled_error(coupling)
        t = self.comp.time_sampler.sample(b, generator=gen, device=dev)
        # classifier-free guidance trains the unconditional field on the same network: a dropped
        # label becomes the null class. The draw is made whatever the probability, so the stream
        # does not depend on it.
        drop = torch.rand(y.shape[0], generator=gen, device=dev) < self.class_dropout
        return x0, x1, t, y.masked_fill(drop.to(y.device), self.null_class)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.comp.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _eager_micro(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One micro-batch's loss (each term drawn and then evaluated by ``loss_fn`` in turn), its
        ``per_sample`` (``[B]`` or ``[2B]``) and the matching times ``t``."""
        parts = []
        for w, coupling in self._terms():
            x0, x1, t, y = self._draw(coupling)
            kw = {} if y is None else {"cond": y}
            # autocast covers the forward and the loss only: the draws (an OT coupling's cost matrix
            # among them) stay fp32
            with self._autocast():
                out = self.loss_fn(self._forward, self.comp.path, x0, x1, t, generator=self.gen, loss=self.tc.loss,
                                   **kw)
            parts.append((w, out, t))
        if len(parts) == 1:
            return parts[0][1].loss, parts[0][1].per_sample, parts[0][2]
        loss = sum(w * out.loss for w, out, _ in parts)
        return loss, torch.cat([out.per_sample for _, out, _ in parts]), torch.cat([t for _, _, t in parts])

    def _compiled_micro(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One micro-batch through the compiled loss: the draws (and the path noise) eager, in the
        eager step's order; returns the loss and its t-bin sums and counts."""
        parts = []
        for w, coupling in self._terms():
            x0, x1, t, y = self._draw(coupling)
            ps = self.comp.path.sample(x0, x1, t, generator=self.gen)
            parts.append((w, _to_channels_last(ps.xt) if self.channels_last else ps.xt, ps.t, ps.ut, y))
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(self.net, self._distance, self.num_bins, tuple(p[1] for p in parts),
                              tuple(p[2] for p in parts), tuple(p[3] for p in parts), tuple(p[4] for p in parts),
                              tuple(p[0] for p in parts), self.comp.device.type, self.precision == "bf16")

    def _reduced(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` (detached) averaged over the ranks; itself in a single process."""
        if not self._ddp:
            return loss.detach()
        return dist_utils.all_reduce_mean(loss.detach().clone())

    def accumulate(self, step: int = 0) -> tuple[torch.Tensor, Optional[float]]:
        """Clear the gradients, then the forward and backward of ``grad_accum`` micro-batches (each loss
        divided by ``grad_accum``, so the gradients are those of the mean loss); nothing is updated.

        Returns ``(loss, value)``: the mean micro-batch loss (0-d, detached, averaged over the ranks)
        and, in the plain mode, the same as a float (``None`` in the fast mode). The plain mode reads
        each micro-batch's loss before its backward and raises ``NonFiniteLossError(step, value)`` on
        a non-finite one. Under DDP only the last micro-batch's backward averages the gradients over
        the ranks (the others run under ``no_sync``)."""
        if self.fused is not None:
            with torch.no_grad():
                return self._fused_accumulate(), None
        n = self.grad_accum
        # Gradients are cleared before the forward (the same numbers): with CUDA graphs the previous
        # step's gradients live in the graphs' memory pool and must be dropped before the replay.
        self.opt.zero_grad(set_to_none=True)
        total, value, reduced = None, None, None
        for i in range(n):
            sync = self.net.no_sync() if self._ddp and i < n - 1 else contextlib.nullcontext()
            with sync:
                if self._compiled is not None:
                    loss, s, c = self._compiled_micro()
                else:
                    loss, per_sample, t = self._eager_micro()
                if not self.fast:
                    reduced = self._reduced(loss)
                    value = reduced.item()
                    if not math.isfinite(value):
                        raise NonFiniteLossError(step, value)
                (loss if n == 1 else loss / n).backward()
            if self._cudagraphs:
                # a CUDA-graph output is overwritten by the next replay: keep copies of the loss and,
                # before the next micro-batch, of the gradients the first backward handed over
                loss = loss.detach().clone()
                if n > 1 and i == 0:
                    for p in self.params:
                        if p.grad is not None:
                            p.grad = p.grad.clone()
            total = loss.detach() if total is None else total + loss.detach()
            if self._compiled is not None:  # the compiled loss binned its own t's
                self.bin_sum += s
                self.bin_cnt += c
            elif self.fast:
                self._add_bins(per_sample, t)
            else:
                s, c = t_bin_sums(per_sample, t, self.num_bins)
                self.bin_sum += s.cpu()
                self.bin_cnt += c.cpu()
        if n == 1:
            # the plain mode has read (and reduced) this step's loss already
            return (reduced if reduced is not None else self._reduced(total)), value
        total = self._reduced(total / n)
        return total, (None if self.fast else total.item())

    def _fused_accumulate(self) -> torch.Tensor:
        """The fused MLP step's forward and backward: the eager step's draws, the written-out MLP."""
        x0, x1, t, _ = self._draw(self.comp.coupling)
        ps = self.comp.path.sample(x0, x1, t, generator=self.gen)
        out = self.fused.loss_and_grads(ps.xt, ps.t, ps.ut)
        self._add_bins(out.per_sample, t)
        return out.loss

    def _add_bins(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        """Queue a micro-batch's per-sample losses and times for the t-bins; every
        ``_BIN_FLUSH`` micro-batches (and in :meth:`take_bins`) the queue is binned in one go by
        :func:`~flowmatch.training.losses.t_bin_sums`, on the device, with no host read."""
        self._bin_queue.append((per_sample.detach(), t.detach()))
        if len(self._bin_queue) >= _BIN_FLUSH:
            self._flush_bins()

    def _flush_bins(self) -> None:
        if not self._bin_queue:
            return
        per_sample = torch.cat([p for p, _ in self._bin_queue])
        t = torch.cat([t for _, t in self._bin_queue])
        self._bin_queue.clear()
        sums, counts = t_bin_sums(per_sample, t, self.num_bins)
        self.bin_sum += sums
        self.bin_cnt += counts

    def _plain(self, step: int) -> StepOutput:
        loss, value = self.accumulate(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model)
        return StepOutput(loss, grad_norm, lr, value)

    def _fast(self, step: int) -> StepOutput:
        if self.fused is not None:
            with torch.no_grad():  # one context for the whole step: nothing here builds a graph
                loss = self._fused_accumulate()
                grad_norm = self.fused.clip_(self.max_norm)
                lr = self.sched.get_last_lr()[0]
                self.fused.adamw_step(self.opt)
                self.sched.step()
                self.ema.update_flat(self.fused.ema, self.fused.param, self.fused.buffers)
            return StepOutput(loss, grad_norm, lr)
        loss, _ = self.accumulate(step)
        # foreach clipping never reads the norm on the host (no error_if_nonfinite)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model, foreach=True)
        return StepOutput(loss, grad_norm, lr)

    def take_bins(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The t-bin loss sums and counts (CPU float64, ``[num_bins]``) since the last call, summed over
        the ranks (a collective under DDP: every rank calls it at the same steps); resets them."""
        self._flush_bins()
        s, c = self.bin_sum.clone(), self.bin_cnt.clone()
        if self._ddp:
            dist_utils.all_reduce_sum(s)
            dist_utils.all_reduce_sum(c)
        self.bin_sum.zero_()
        self.bin_cnt.zero_()
        return s.cpu(), c.cpu()


class Trainer:
    """Model, EMA, optimiser, schedule, generator and :class:`TrainStep` of one experiment, with no
    run directory (the training loop and speed benchmarks both drive one). See the module docstring.

    ``precision`` / ``channels_last`` default to the config's (resolved for the device); ``fast`` and
    ``compile`` are resolved values (see :func:`resolve_plan`). ``distributed`` (default: inside a
    process group of two or more ranks) wraps the model in ``DistributedDataParallel``; rank ``r``
    draws from a generator seeded ``train.seed + 1000 * r``.
    """

    def __init__(self, cfg: ExperimentConfig, comp: Components, *, fast: bool = False,
                 compile: Optional[str] = None, loss_fn=cfm_loss, precision: Optional[str] = None,
                 channels_last: Optional[str | bool] = None, distributed: Optional[bool] = None,
                 fused: Optional[bool] = None):
        tc = cfg.train
        self.cfg, self.components, self.model = cfg, comp, comp.model
        self.device = comp.device
        images = _is_image(comp)
        precision = resolve_precision(tc.precision if precision is None else precision, comp.device, images=images)
        cl = resolve_channels_last(tc.channels_last if channels_last is None else channels_last, comp.device)
        cl = cl and images
        self.fast, self.compile_mode = bool(fast), compile
        self.plan = SpeedPlan(self.fast, compile, precision, cl, _grad_accum(tc.grad_accum))
        if cl:
            # once, before the DDP wrapper, the EMA copy and the optimiser see the parameters
            self.model.to(memory_format=torch.channels_last)
        if distributed is None:
            distributed = dist_utils.is_distributed()
        if distributed and not dist_utils.is_distributed():
            raise ConfigError("distributed training needs an initialised process group of two or more ranks "
                              "(start the run with torchrun)")
        self.rank, self.world_size = dist_utils.dist_info() if distributed else (0, 1)
        self.net: torch.nn.Module = self.model
        if distributed:
            ids = [comp.device.index if comp.device.index is not None else torch.cuda.current_device()] \
                if comp.device.type == "cuda" else None
            # every parameter takes part in every forward (the class embedding included), so the
            # reducer need not search for unused ones
            self.net = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=False)
        self.ema = EMA(self.model, tc.ema_decay)
        # the fused MLP step (fused=None: train.fused; auto: wherever it can run in the fast mode;
        # True / on: required; False / off: never)
        if fused is None:
            fused = {"auto": None, "on": True, "off": False}[_normal(tc.fused, "fused", FAST_MODES)]
        self.fused: Optional[FlatMLP] = None
        if fast and fused is not False:
            reason = fused_mlp_reason(self.model, comp, tc, distributed=distributed, precision=precision,
                                      compile=compile, class_cond=cfg.model.class_cond,
                                      default_loss=loss_fn is cfm_loss)
            if reason is None:
                self.fused = FlatMLP(self.model, self.ema.model)
            elif fused:
                raise ConfigError(f"train.fused=on, but the fused MLP step cannot train this run: {reason}")
        elif fused:
            raise ConfigError("the fused MLP step (train.fused=on) is a fast step: set train.fast=on")
        self.optimizer, self.scheduler = build_optimizer(
            self.model, tc, fast=fast, device=comp.device, params=None if self.fused is None else [self.fused.param])
        self.generator = make_generator(dist_utils.rank_seed(tc.seed, self.rank), comp.device)
        if self.rank > 0:
            # the global RNG (dropout inside the model) gets a stream of its own on each rank too;
            # rank 0 keeps the single-process one
            torch.manual_seed(dist_utils.rank_seed(tc.seed, self.rank))
        self.train_step = TrainStep(self.model, comp, tc, cfg.coupling.mix, self.generator, self.ema,
                                    self.optimizer, self.scheduler, fast=fast, compile=compile, loss_fn=loss_fn,
                                    net=self.net, precision=precision, channels_last=cl,
                                    class_cond=cfg.model.class_cond, fused=self.fused)
        self.global_step = 0
        self._pending: list[torch.Tensor] = []  # fast: losses not yet read, from step _pending_from
        self._pending_from = 1
        self._read: list[float] = []  # plain: losses already on the host, not yet handed out
        self.model.train()

    def step(self) -> StepOutput:
        """One optimiser step (no host synchronisation in the fast mode); plain mode raises
        ``NonFiniteLossError`` at once on a non-finite loss."""
        out = self.train_step(self.global_step + 1)
        self.global_step += 1
        if self.fast:
            if not self._pending:
                self._pending_from = self.global_step
            self._pending.append(out.loss)
            if len(self._pending) >= _MAX_PENDING:
                self._pending = [torch.cat([p.reshape(-1) for p in self._pending])]
        else:
            self._read.append(out.value)
        return out

    def run(self, n: int) -> None:
        """``n`` optimiser steps."""
        for _ in range(int(n)):
            self.step()

    def read_losses(self) -> list[float]:
        """The per-step losses since the last read (one device read in the fast mode); raises
        ``NonFiniteLossError`` with the first non-finite loss's step and value."""
        if self.fast:
            values = torch.cat([p.reshape(-1) for p in self._pending]).tolist() if self._pending else []
            first, self._pending = self._pending_from, []
            for i, v in enumerate(values):
                if not math.isfinite(v):
                    raise NonFiniteLossError(first + i, v)
        else:
            values, self._read = self._read, []
        return values

    def sync(self) -> list[float]:
        """Wait for every queued step on the device, then :meth:`read_losses`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.read_losses()

    def take_bins(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss-per-t-bin sums and counts since the last call (see :meth:`TrainStep.take_bins`)."""
        return self.train_step.take_bins()

    def _rank_state(self) -> dict:
        return {"generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                "coupling": self.components.coupling.state_dict()}

    @property
    def fused_mlp(self) -> bool:
        """Whether the step is the fused MLP step (:mod:`flowmatch.training.fused_mlp`)."""
        return self.fused is not None

    def _optimizer_state(self) -> dict:
        """The optimiser's ``state_dict``, per parameter in every mode (the fused step's flat state
        is split)."""
        state = self.optimizer.state_dict()
        return state if self.fused is None else self.fused.optimizer_state_to_params(state)

    def state_dict(self) -> dict:
        """The checkpoint payload: model, ema, optimizer, scheduler, coupling, step and rng (this
        rank's). With several ranks also ``world_size`` and ``ranks`` (every rank's generator, global
        RNG and coupling state, in rank order): a collective, so every rank calls it."""
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                 "optimizer": self._optimizer_state(), "scheduler": self.scheduler.state_dict(),
                 "coupling": self.components.coupling.state_dict(), "step": self.global_step,
                 "rng": {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}}
        if self.world_size > 1:
            state["world_size"] = self.world_size
            state["ranks"] = dist_utils.all_gather_object(self._rank_state())
        return state

    def load_state_dict(self, ckpt: dict) -> None:
        """Restore a checkpoint's training state (any mode's checkpoint, into any mode).

        Rank 0 (and a single process) takes the checkpoint's ``rng`` and ``coupling``; rank ``r`` > 0
        takes its own entry of ``ranks`` when the checkpoint was written by a world of the same
        size, else (a checkpoint of another world size) it re-seeds its generator and global RNG from
        ``(seed, rank, step)`` (:func:`~flowmatch.training.distributed.resume_seed`) and starts its
        coupling afresh."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        opt_state = ckpt["optimizer"]
        if self.fused is not None:  # a per-parameter state, whichever mode wrote it
            opt_state = self.fused.optimizer_state_from_params(opt_state)
        load_optimizer_state(self.optimizer, opt_state)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.global_step = int(ckpt["step"])
        own = None
        if self.rank == 0:
            own = {"generator": ckpt["rng"]["generator"], "torch": ckpt["rng"]["torch"],
                   "coupling": ckpt.get("coupling", {})}
        elif ckpt.get("world_size") == self.world_size and len(ckpt.get("ranks") or []) == self.world_size:
            own = ckpt["ranks"][self.rank]
        if own is not None:
            self.components.coupling.load_state_dict(own["coupling"])
            self.generator.set_state(own["generator"].to(self.generator.get_state().device))
            torch.set_rng_state(own["torch"])
        else:
            seed = dist_utils.resume_seed(self.cfg.train.seed, self.rank, self.global_step)
            self.generator.manual_seed(seed)
            torch.manual_seed(seed + 1)
        self._pending, self._read = [], []


def build_trainer(cfg: ExperimentConfig, *, fast: Optional[bool] = None, compile: Optional[str] = None,
                  device: Optional[str | torch.device] = None, loss_fn=cfm_loss, precision: Optional[str] = None,
                  channels_last: Optional[str | bool] = None, distributed: Optional[bool] = None,
                  fused: Optional[bool] = None) -> Trainer:
    """A :class:`Trainer` for ``cfg`` on ``device`` (default ``cfg.train.device``); ``fast``,
    ``compile``, ``precision`` and ``channels_last`` default to the config's (resolved by
    :func:`resolve_plan`); ``fused`` as :class:`Trainer`'s (``False``: the autograd fast step even
    where the fused MLP step could run). Writes nothing: for benchmarks and scripts."""
    tc = cfg.train
    keys = dict(fast=tc.fast if fast is None else fast, compile=tc.compile if compile is None else compile,
                precision=tc.precision if precision is None else precision,
                channels_last=tc.channels_last if channels_last is None else channels_last)
    cfg_keys = replace(tc, **keys)
    resolve_plan(cfg_keys)  # refuse bad values before building anything
    comp = build_components(cfg, device)
    plan = resolve_plan(cfg_keys, comp.device, images=_is_image(comp))
    if fast is None and fused is not False:
        plan = auto_fused(plan, cfg, comp, loss_fn=loss_fn,
                          distributed=dist_utils.is_distributed() if distributed is None else distributed)
    return Trainer(cfg, comp, fast=plan.fast, compile=plan.compile, loss_fn=loss_fn, precision=plan.precision,
                   channels_last=plan.channels_last, distributed=distributed, fused=fused)
