"""The plan: every ``auto`` of a training run resolved once, with the reason for each choice.

:func:`resolve_plan` reads the ``train`` section (``fast``, ``compile``, ``fused``, ``precision``,
``channels_last``, ``grad_accum``), the device, the task (image or not), the model, the objective's
capabilities and whether a process group is running, and returns a frozen :class:`Plan`. The trainer,
the step and the loop only read it: nothing downstream decides again.

- ``fast``: how often the loop reads the losses. Off (the plain loop) reads and checks every step's
  loss before its update, so a non-finite loss stops the run before it is applied; on leaves the
  losses, the gradient norm and the loss-per-t-bin sums on the device until the next log or
  checkpoint step (a non-finite loss is reported there, with the step it happened at, and never
  reaches a checkpoint). ``auto``: on with CUDA, or when a compile mode is asked for; on the CPU, on
  where the fused MLP step can train the run (it is the faster step there), else off. The update is the
  same in both: multi-tensor (``foreach``) AdamW, clipping and EMA (``fused`` AdamW on CUDA). On the
  CPU the numbers equal the per-tensor ones exactly, on any host: torch's CPU ``_foreach_*`` ops run
  the per-tensor kernels tensor by tensor, and foreach AdamW does the per-tensor arithmetic in the
  same order.
- ``compile`` (``auto``: with the fast loop on CUDA): the objective's loss, from the drawn batch
  (forward, distance, weighting; the backward is compiled with it), under ``torch.compile(mode=...)``;
  ``on`` is mode ``default``. The draws stay eager, so a compiled run sees the same batches.
- ``fused`` (``auto``: wherever it can run): the fused MLP step (:mod:`flowmatch.training.fused_mlp`),
  an implementation of the l2 velocity-regression objectives for a toy MLP on the CPU; ``on`` requires
  it, ``off`` never takes it. Its numbers agree with the autograd step's to float rounding.
- ``precision`` (``auto``: bf16 for image tasks on a CUDA device that has it, else fp32): ``bf16``
  runs the loss under ``torch.autocast``; draws, gradients, optimiser and EMA stay fp32.
- ``channels_last`` (``auto``: on with CUDA, image tasks only): the image model and each input in
  ``torch.channels_last``.
- ``grad_accum`` micro-batches make one optimiser step; ``ddp``: inside a process group of two or more
  ranks the trained networks are wrapped in ``DistributedDataParallel``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from flowmatch.config import COMPILE_MODES, ExperimentConfig, PRECISIONS
from flowmatch.errors import ConfigError
from flowmatch.training import distributed as dist_utils
from flowmatch.training.builders import Components
from flowmatch.training.fused_mlp import fused_mlp_reason

__all__ = ["Plan", "resolve_plan", "resolve_precision", "TORCH_COMPILE_MODES"]

# torch.compile modes (the values of train.compile after "auto", "on" and "off")
TORCH_COMPILE_MODES = COMPILE_MODES[3:]


@dataclass(frozen=True)
class Plan:
    """A resolved run (see the module docstring). ``compile`` is a torch.compile mode or ``None``;
    ``optimizer`` the AdamW implementation (``foreach`` or ``fused``); ``reasons`` pairs each key with
    why it was chosen. The defaults are the plain fp32 one-process step."""

    fast: bool = False
    compile: Optional[str] = None
    fused: bool = False
    precision: str = "fp32"
    channels_last: bool = False
    grad_accum: int = 1
    ddp: bool = False
    optimizer: str = "foreach"
    reasons: tuple = ()

    def describe(self) -> str:
        """One line per key: ``key = value: reason``."""
        return "\n".join(f"{k} = {getattr(self, k)}: {why}" for k, why in self.reasons)


def _is_image(comp: Components) -> bool:
    """Whether ``comp`` is an image task: a draw is an image ``[C, H, W]`` (the source's shape, else
    the target's), read from the components themselves (which tests may build by hand); for a config,
    :func:`flowmatch.data.task.is_image_task` gives the same answer."""
    for d in (comp.source, comp.target):
        shape = getattr(d, "shape", None)
        if shape is not None:
            return len(shape) == 3
    return False


def resolve_precision(precision: str = "auto", device: torch.device | str = "cpu", *, images: bool = True,
                      key: str = "train.precision") -> str:
    """``precision`` (the value of ``key``, e.g. ``reflow.precision`` for pair generation) on ``device``:
    ``fp32`` or ``bf16``. ``auto`` is bf16 for image models (``images``) on a CUDA device that supports
    it, fp32 elsewhere: on the CPU bf16 autocast is slower than fp32, and the small toy MLPs gain nothing
    from it while their W2 at the noise floor would feel the rounding."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{key} = {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if torch.device(device).type != "cuda" or not images:
        return "fp32"
    # a config resolved for CUDA on a machine without it (a dry run) still says bf16
    return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp32"


def resolve_plan(cfg: ExperimentConfig, comp: Optional[Components] = None, objective=None, *,
                 device: Optional[torch.device | str] = None, images: Optional[bool] = None,
                 distributed: Optional[bool] = None, **keys) -> Plan:
    """The :class:`Plan` of ``cfg`` for ``comp`` (its device, task and model) and ``objective`` (its
    capabilities). ``keys`` (``fast=``, ``compile=``, ``fused=``, ``precision=``, ``channels_last=``)
    replace the ``train`` section's values (a benchmark's choice), checked as the config checks them.
    Without ``comp``: ``device`` (default ``train.device``) and ``images`` (default ``False``), and no
    fused step. ``distributed`` defaults to whether a process group of two or more ranks runs."""
    from flowmatch.utils import resolve_device

    tc = replace(cfg.train, **{k: v for k, v in keys.items() if v is not None})
    dev = torch.device(device) if device is not None else comp.device if comp is not None else resolve_device(tc.device)
    if images is None:
        images = comp is not None and _is_image(comp)
    if distributed is None:
        distributed = dist_utils.is_distributed()
    elif distributed and not dist_utils.is_distributed():
        raise ConfigError("distributed training needs an initialised process group of two or more ranks "
                          "(start the run with torchrun)")
    cuda = dev.type == "cuda"
    why: list[tuple[str, str]] = []

    precision = resolve_precision(tc.precision, dev, images=images)
    why.append(("precision", f"train.precision={tc.precision}" + (
        f" ({'an image task' if images else 'not an image task'} on {dev.type})" if tc.precision == "auto" else "")))
    channels_last = images and (tc.channels_last == "on" or (tc.channels_last == "auto" and cuda))
    why.append(("channels_last", f"train.channels_last={tc.channels_last}"
                + ("" if images else " (flat data: no layout to change)")))

    explicit = tc.compile not in ("auto", "off")
    if tc.fast == "off" and explicit:
        raise ConfigError(f"train.compile={tc.compile} compiles the fast step, but train.fast=off; "
                          f"set train.fast=on (or auto) or train.compile=off")
    fast = tc.fast == "on" or (tc.fast == "auto" and (cuda or explicit))
    why.append(("fast", f"train.fast={tc.fast}" + (f" on {dev.type}" if tc.fast == "auto" else "")))
    compile_mode = None
    if fast and tc.compile != "off" and (tc.compile != "auto" or cuda):
        compile_mode = "default" if tc.compile in ("auto", "on") else tc.compile
    if compile_mode is not None and not getattr(objective, "compilable", True):
        if explicit:
            raise ConfigError(f"train.compile={tc.compile}: objective {objective.name} cannot be compiled")
        compile_mode = None
    why.append(("compile", f"train.compile={tc.compile}" + ("" if fast else " (the plain loop is eager)")))

    fused, fused_why = False, "train.fused=off"
    if tc.fast == "off" and tc.fused == "on":
        raise ConfigError("the fused MLP step (train.fused=on) is a fast step: set train.fast=on (or auto)")
    if tc.fused != "off" and (comp is None or objective is None):
        fused_why = "no model and objective to check (a plan without components)"
    elif tc.fused != "off":
        reason = _fused_reason(comp, objective, dev, precision, compile_mode, distributed, tc.grad_accum)
        if reason is None and (fast or tc.fast == "auto"):
            fused, fast = True, True
            fused_why = f"train.fused={tc.fused}: the run is a toy MLP regression on the CPU"
            if tc.fast == "auto":
                why[-2] = ("fast", "train.fast=auto: the fused MLP step is the faster step on the CPU")
        elif tc.fused == "on":
            raise ConfigError(f"train.fused=on, but the fused MLP step cannot train this run: {reason}")
        else:
            fused_why = f"train.fused=auto: {reason or 'the plain loop was asked for'}"
    why.append(("fused", fused_why))
    why.append(("grad_accum", f"train.grad_accum={tc.grad_accum}"))
    why.append(("ddp", "a process group of two or more ranks" if distributed else "one process"))
    optimizer = "fused" if cuda or fused else "foreach"
    why.append(("optimizer", "fused AdamW on CUDA" if cuda else "the fused MLP step's flat AdamW" if fused
                else "foreach AdamW (the per-tensor kernels, in the same order, on the CPU)"))
    return Plan(fast=fast, compile=compile_mode, fused=fused, precision=precision, channels_last=channels_last,
                grad_accum=tc.grad_accum, ddp=bool(distributed), optimizer=optimizer, reasons=tuple(why))


def _fused_reason(comp, objective, dev, precision, compile_mode, distributed, grad_accum) -> Optional[str]:
    """Why the fused MLP step cannot train this run (``None``: it can)."""
    if dev.type != "cpu":
        return f"it is a CPU path (device {dev})"
    if precision != "fp32":
        return "it is fp32 only"
    if distributed:
        return "it runs in one process"
    if grad_accum != 1:
        return "it takes one micro-batch per step"
    if compile_mode is not None:
        return "a compiled step was asked for"
    return fused_mlp_reason(comp.model) or objective.fused_reason()
