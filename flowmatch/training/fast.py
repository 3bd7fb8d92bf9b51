"""One optimiser step of flow-matching training, plain or fast, and a run-directory-free trainer.

The step minimises ``mix * L(pairs) + (1 - mix) * L(real data)`` (``L`` the conditional flow-matching
loss of :func:`~flowmatch.training.losses.cfm_loss`; ``L(coupling)`` alone without real data) with
AdamW under a warm-up / cosine schedule, gradient clipping and an EMA of the weights.

Two modes, chosen by ``train.fast`` (``auto``: on with CUDA, off on the CPU):

- **plain**: the historical loop. The loss is read to the host (``loss.item()``) every step and a
  non-finite loss raises :class:`~flowmatch.errors.NonFiniteLossError` before the update; the
  loss-per-t-bin sums are accumulated on the CPU.
- **fast**: nothing inside a step waits for the device. The losses, the gradient norm and the t-bin
  sums stay on the device until the caller reads them (:meth:`Trainer.read_losses`,
  :meth:`Trainer.take_bins`; the loop does so at log and checkpoint steps, so a non-finite loss is
  reported, with the step it happened at, at the next log or checkpoint step at the latest, and
  before any checkpoint is written). AdamW is ``fused`` on CUDA and ``foreach`` elsewhere, clipping
  is ``clip_grad_norm_(..., foreach=True)`` and the EMA is one ``torch._foreach_lerp_``. On the CPU,
  without compilation, its numbers equal the plain step's exactly.

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

``Trainer.step() -> StepOutput`` does one optimiser step (no host synchronisation in the fast mode);
``Trainer.run(n)`` does ``n``; ``Trainer.sync() -> list[float]`` waits for the device and returns the
losses of the steps since the last read (raising ``NonFiniteLossError`` at the first non-finite one);
``Trainer.global_step`` counts steps; ``Trainer.plan`` is the resolved :class:`SpeedPlan`;
``Trainer.take_bins()`` returns the loss-per-t-bin sums and counts; ``Trainer.state_dict()`` /
``load_state_dict()`` are the checkpoint payload (model, EMA, optimiser, scheduler, coupling, step,
rng) that :func:`~flowmatch.training.loop.train` saves.
"""

from __future__ import annotations

import math
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from flowmatch.config import ExperimentConfig, TrainConfig
from flowmatch.couplings import MinibatchOTCoupling, PairedCoupling
from flowmatch.errors import ConfigError, NonFiniteLossError
from flowmatch.models import EMA
from flowmatch.training.builders import Components, build_components
from flowmatch.training.losses import LOSSES, cfm_loss, t_bin_sums
from flowmatch.types import PathSample
from flowmatch.utils import make_generator

__all__ = ["FAST_MODES", "COMPILE_MODES", "NUM_T_BINS", "SpeedPlan", "resolve_speed", "build_optimizer",
           "load_optimizer_state", "StepOutput", "TrainStep", "Trainer", "build_trainer"]

NUM_T_BINS = 10
FAST_MODES = ("auto", "on", "off")
_TORCH_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# "on" means torch.compile's mode "default"; the others after "off" are torch.compile modes.
COMPILE_MODES = ("auto", "on", "off") + _TORCH_MODES
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# Optimiser settings that describe the implementation, not the optimisation: a resumed run keeps
# its own (a checkpoint of a plain run may be resumed fast, and the reverse).
_IMPL_KEYS = ("foreach", "fused", "capturable")
# The losses waiting to be read are concatenated into one tensor when there are this many (bounds the
# number of live device tensors when a benchmark never reads).
_MAX_PENDING = 1024


@dataclass(frozen=True)
class SpeedPlan:
    """The resolved step: ``fast`` or plain; ``compile`` is a torch.compile mode or ``None`` (eager)."""

    fast: bool
    compile: Optional[str] = None


def _normal(value, key: str, valid: tuple) -> str:
    if isinstance(value, bool):
        value = "on" if value else "off"
    if value not in valid:
        raise ConfigError(f"train.{key} must be one of {', '.join(valid)}; got {value!r}")
    return value


def resolve_speed(fast: str | bool = "auto", compile: str | bool = "auto",
                  device: torch.device | str = "cpu") -> SpeedPlan:
    """Resolve ``train.fast`` / ``train.compile`` for ``device`` (unknown values: a ConfigError listing
    the valid ones). ``fast="auto"`` is on with CUDA, or when a compile mode is asked for explicitly;
    ``compile="auto"`` compiles the fast step on CUDA only. Compiling needs the fast step, so
    ``fast="off"`` with an explicit compile mode is an error."""
    fast = _normal(fast, "fast", FAST_MODES)
    compile = _normal(compile, "compile", COMPILE_MODES)
    cuda = torch.device(device).type == "cuda"
    explicit = compile not in ("auto", "off")
    if fast == "off" and explicit:
        raise ConfigError(f"train.compile={compile} compiles the fast step, but train.fast=off; "
                          f"set train.fast=on (or auto) or train.compile=off")
    on = fast == "on" or (fast == "auto" and (cuda or explicit))
    if not on or compile == "off" or (compile == "auto" and not cuda):
        return SpeedPlan(on, None)
    return SpeedPlan(True, "default" if compile in ("auto", "on") else compile)


def _lr_lambda(warmup: int, total: int, schedule: str = "constant", min_ratio: float = 0.0) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then constant or cosine decay to ``min_ratio`` at ``total``."""

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if schedule == "cosine":
            p = min(1.0, (s - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        return 1.0

    return f


def build_optimizer(model: torch.nn.Module, tc: TrainConfig, *, fast: bool = False,
                    device: torch.device | str = "cpu"):
    """AdamW (``fused`` on CUDA / ``foreach`` elsewhere when ``fast``; torch's default otherwise) and
    its LambdaLR schedule; returns ``(optimizer, scheduler)``."""
    kw = {}
    if fast:
        kw = {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tc.warmup_steps, tc.steps, tc.lr_schedule,
                                                              tc.lr_min_ratio))
    return opt, sched


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)`` keeping ``opt``'s implementation (foreach / fused / capturable):
    torch would take those from ``state``, and place AdamW's step counters by them."""
    groups = [{**saved, **{k: mine[k] for k in _IMPL_KEYS if k in mine}}
              for saved, mine in zip(state["param_groups"], opt.param_groups)]
    opt.load_state_dict({**state, "param_groups": groups})


def _draw(comp: Components, tc, mix: float, gen) -> list[tuple[float, PathSample]]:
    """The step's random draws, in the order :func:`_batch_loss` makes them: for each loss term its
    weight and path sample (pairs first, then real data)."""
    parts = []
    if comp.real_coupling is None or mix > 0:
        x0, x1 = comp.coupling.sample(tc.batch_size, generator=gen)
        t = comp.time_sampler.sample(tc.batch_size, generator=gen, device=comp.device)
        parts.append((1.0 if comp.real_coupling is None else mix, comp.path.sample(x0, x1, t, generator=gen)))
    if comp.real_coupling is not None:
        x0, x1 = comp.real_coupling.sample(tc.batch_size, generator=gen)
        t = comp.time_sampler.sample(tc.batch_size, generator=gen, device=comp.device)
        parts.append((1.0 - mix, comp.path.sample(x0, x1, t, generator=gen)))
    return parts


def _batch_loss(model, comp: Components, tc, mix: float, gen,
                loss_fn=cfm_loss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step's loss: ``mix * L(pairs) + (1 - mix) * L(real data)`` for a paired coupling with
    real data mixed in (each on its own batch of ``batch_size``), else ``L(coupling)``. With
    ``mix = 0`` no pair is drawn, so the run is plain flow matching draw for draw. Returns the loss,
    ``per_sample`` (``[B]`` or ``[2B]``) and the matching times ``t``."""
    parts = []
    if comp.real_coupling is None or mix > 0:
        x0, x1 = comp.coupling.sample(tc.batch_size, generator=gen)
        t = comp.time_sampler.sample(tc.batch_size, generator=gen, device=comp.device)
        parts.append((1.0 if comp.real_coupling is None else mix,
                      loss_fn(model, comp.path, x0, x1, t, generator=gen, loss=tc.loss), t))
    if comp.real_coupling is not None:
        x0, x1 = comp.real_coupling.sample(tc.batch_size, generator=gen)
        t = comp.time_sampler.sample(tc.batch_size, generator=gen, device=comp.device)
        parts.append((1.0 - mix, loss_fn(model, comp.path, x0, x1, t, generator=gen, loss=tc.loss), t))
    if len(parts) == 1:
        return parts[0][1].loss, parts[0][1].per_sample, parts[0][2]
    loss = sum(w * out.loss for w, out, _ in parts)
    return loss, torch.cat([out.per_sample for _, out, _ in parts]), torch.cat([t for _, _, t in parts])


def _bin_sums(per_sample: torch.Tensor, t: torch.Tensor, num_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~flowmatch.training.losses.t_bin_sums` without its ``bincount`` (which reads the
    maximum index to the host on CUDA): counts by ``index_add_`` of ones, the same integers."""
    idx = (t.detach() * num_bins).long().clamp_(0, num_bins - 1)
    sums = torch.zeros(num_bins, dtype=torch.float64, device=t.device).index_add_(0, idx, per_sample.detach().double())
    counts = torch.zeros(num_bins, dtype=torch.float64, device=t.device).index_add_(
        0, idx, torch.ones(idx.shape, dtype=torch.float64, device=t.device))
    return sums, counts


def _loss_terms(model, distance, num_bins: int, xts: tuple, ts: tuple, uts: tuple, weights: tuple):
    """The compiled part of a fast step: ``sum_k w_k mean_i d(v(xt_ki, t_ki), ut_ki)`` (the loss of
    :func:`_batch_loss` on drawn path samples) and its t-bin sums and counts."""
    per = []
    for xt, t, ut in zip(xts, ts, uts):
        v = model(xt, t)
        per.append(distance((v - ut).reshape(v.shape[0], -1)))
    if len(per) == 1:
        loss, per_sample, t = per[0].mean(), per[0], ts[0]
    else:
        loss = sum(w * p.mean() for w, p in zip(weights, per))
        per_sample, t = torch.cat(per), torch.cat(ts)
    sums, counts = _bin_sums(per_sample, t, num_bins)
    return loss, sums, counts


def _own_code(fn):
    """``fn`` with a code object of its own. torch.compile keeps compiled graphs, and its limit of 8
    recompilations, per code object: without this, the ninth differently shaped model compiled in one
    process (a benchmark sweep) would silently run eagerly."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


@dataclass
class StepOutput:
    """One step's results. ``loss`` and ``grad_norm`` (the total norm before clipping) are 0-d tensors
    on the device; ``lr`` is the learning rate the step used; ``value`` is the loss as a float in the
    plain mode (``None`` in the fast mode, which never reads it)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    value: Optional[float] = None


class TrainStep:
    """One optimiser step on ``model`` (see the module docstring for the plain and fast modes).

    ``compile`` (a torch.compile mode, fast mode only) compiles the loss from the drawn batch.
    ``loss_fn`` (``cfm_loss``'s signature) computes each term in the eager modes. The loss-per-t-bin
    sums and counts accumulate across steps until :meth:`take_bins`.
    """

    def __init__(self, model: torch.nn.Module, comp: Components, tc: TrainConfig, mix: float,
                 gen: torch.Generator, ema: EMA, opt: torch.optim.Optimizer, sched, *, fast: bool = False,
                 compile: Optional[str] = None, loss_fn=cfm_loss, num_bins: int = NUM_T_BINS):
        if compile is not None and not fast:
            raise ConfigError("a compiled step needs fast=True")
        if compile is not None and compile not in _TORCH_MODES:
            raise ConfigError(f"unknown torch.compile mode {compile!r}; valid modes: {', '.join(_TORCH_MODES)}")
        self.model, self.comp, self.tc, self.mix, self.gen = model, comp, tc, float(mix), gen
        self.ema, self.opt, self.sched = ema, opt, sched
        self.fast, self.compile_mode, self.loss_fn, self.num_bins = bool(fast), compile, loss_fn, num_bins
        self.params = [p for p in model.parameters()]
        self.max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        # plain: CPU accumulators (as the historical loop); fast: on the device, read by take_bins
        bins_dev = comp.device if self.fast else torch.device("cpu")
        self.bin_sum = torch.zeros(num_bins, dtype=torch.float64, device=bins_dev)
        self.bin_cnt = torch.zeros(num_bins, dtype=torch.float64, device=bins_dev)
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
        return self._fast() if self.fast else self._plain(step)

    def _plain(self, step: int) -> StepOutput:
        loss, per_sample, t = _batch_loss(self.model, self.comp, self.tc, self.mix, self.gen, self.loss_fn)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLossError(step, value)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model)
        s, c = t_bin_sums(per_sample, t, self.num_bins)
        self.bin_sum += s.cpu()
        self.bin_cnt += c.cpu()
        return StepOutput(loss.detach(), grad_norm, lr, value)

    def _fast(self) -> StepOutput:
        # Gradients are cleared before the forward (the same numbers): with CUDA graphs the previous
        # step's gradients live in the graphs' memory pool and must be dropped before the replay.
        self.opt.zero_grad(set_to_none=True)
        if self._compiled is not None:
            parts = _draw(self.comp, self.tc, self.mix, self.gen)
            if self._cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            loss, s, c = self._compiled(self.model, self._distance, self.num_bins, tuple(p.xt for _, p in parts),
                                        tuple(p.t for _, p in parts), tuple(p.ut for _, p in parts),
                                        tuple(w for w, _ in parts))
        else:
            loss, per_sample, t = _batch_loss(self.model, self.comp, self.tc, self.mix, self.gen, self.loss_fn)
            s, c = _bin_sums(per_sample, t, self.num_bins)
        loss.backward()
        # foreach clipping never reads the norm on the host (no error_if_nonfinite)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model, foreach=True)
        self.bin_sum += s
        self.bin_cnt += c
        # a CUDA-graph output is overwritten by the next replay: keep a copy of the loss
        loss = loss.detach().clone() if self._cudagraphs else loss.detach()
        return StepOutput(loss, grad_norm, lr)

    def take_bins(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The t-bin loss sums and counts (CPU float64, ``[num_bins]``) since the last call; resets them."""
        s, c = self.bin_sum.cpu().clone(), self.bin_cnt.cpu().clone()
        self.bin_sum.zero_()
        self.bin_cnt.zero_()
        return s, c


class Trainer:
    """Model, EMA, optimiser, schedule, generator and :class:`TrainStep` of one experiment, with no
    run directory (the training loop and speed benchmarks both drive one). See the module docstring."""

    def __init__(self, cfg: ExperimentConfig, comp: Components, *, fast: bool = False,
                 compile: Optional[str] = None, loss_fn=cfm_loss):
        tc = cfg.train
        self.cfg, self.components, self.model = cfg, comp, comp.model
        self.device = comp.device
        self.ema = EMA(self.model, tc.ema_decay)
        self.optimizer, self.scheduler = build_optimizer(self.model, tc, fast=fast, device=comp.device)
        self.generator = make_generator(tc.seed, comp.device)
        self.train_step = TrainStep(self.model, comp, tc, cfg.coupling.mix, self.generator, self.ema,
                                    self.optimizer, self.scheduler, fast=fast, compile=compile, loss_fn=loss_fn)
        self.fast, self.compile_mode = bool(fast), compile
        self.plan = SpeedPlan(self.fast, compile)
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

    def state_dict(self) -> dict:
        """The checkpoint payload: model, ema, optimizer, scheduler, coupling, step and rng."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "coupling": self.components.coupling.state_dict(), "step": self.global_step,
                "rng": {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}}

    def load_state_dict(self, ckpt: dict) -> None:
        """Restore a checkpoint's training state (any mode's checkpoint, into any mode)."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        load_optimizer_state(self.optimizer, ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.components.coupling.load_state_dict(ckpt.get("coupling", {}))
        self.generator.set_state(ckpt["rng"]["generator"].to(self.generator.get_state().device))
        torch.set_rng_state(ckpt["rng"]["torch"])
        self.global_step = int(ckpt["step"])
        self._pending, self._read = [], []


def build_trainer(cfg: ExperimentConfig, *, fast: Optional[bool] = None, compile: Optional[str] = None,
                  device: Optional[str | torch.device] = None, loss_fn=cfm_loss) -> Trainer:
    """A :class:`Trainer` for ``cfg`` on ``device`` (default ``cfg.train.device``); ``fast`` and
    ``compile`` default to ``cfg.train.fast`` / ``cfg.train.compile`` (resolved by
    :func:`resolve_speed`). Writes nothing: for benchmarks and scripts."""
    plan_in = (cfg.train.fast if fast is None else fast, cfg.train.compile if compile is None else compile)
    resolve_speed(*plan_in)  # refuse bad values before building anything
    comp = build_components(cfg, device)
    plan = resolve_speed(*plan_in, device=comp.device)
    return Trainer(cfg, comp, fast=plan.fast, compile=plan.compile, loss_fn=loss_fn)
