"""One optimiser step of any objective: the update body every plan runs.

For each of the objective's players, in order, ``objective.player_updates(player, step)`` times (once for
most objectives): clear its gradients; ``grad_accum`` times draw a
micro-batch (``objective.draw``, eager), compute ``objective.loss(nets, batch, player)`` (compiled,
autocast and under DistributedDataParallel as the plan says) and backpropagate it divided by
``grad_accum`` (under DDP only the last micro-batch averages the gradients over the ranks; the others
run under ``no_sync``); clip the player's gradients (``clip_grad_norm_(..., foreach=True)``), step its
optimiser; ``objective.after_update``. Then its schedule, once a step. Then the EMA of the student (one multi-tensor
lerp). The plan's ``fast`` says only whether each micro-batch's loss is read (and checked) before its
backward (off: a non-finite loss raises :class:`~flowmatch.errors.NonFiniteLossError` before anything
is updated) or left on the device (on: the trainer reads the losses when the loop asks).

Host round trips that remain on CUDA, by design: a minibatch-OT coupling with ``coupling.method=exact``
solves the assignment on the CPU (a warning names ``coupling.method=sinkhorn``, which runs on the
device; the coupling is never changed behind the user's back); a paired coupling whose store is
memory-mapped gathers its rows on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass, field
from typing import Optional

import torch

from flowmatch.errors import NonFiniteLossError
from flowmatch.training import distributed as dist_utils
from flowmatch.training.losses import t_bin_sums

__all__ = ["NUM_T_BINS", "StepOutput", "Player", "TBins", "TrainStep"]

NUM_T_BINS = 10
# the per-sample losses are binned by t every this many micro-batches (and when the bins are taken)
_BIN_FLUSH = 64
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class StepOutput:
    """One step's results. ``loss`` (the student's, or the last player's without a student) and
    ``grad_norm`` (its total norm before clipping) are 0-d tensors on the device; ``lr`` is the
    learning rate the step used; ``value`` is the loss as a float where the plan reads every step
    (``None`` otherwise); ``losses`` holds every player's loss. With ``grad_accum`` > 1 a loss is the
    mean over the micro-batches; with several ranks, the mean over the ranks too."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    lr: float
    value: Optional[float] = None
    losses: dict = field(default_factory=dict)


@dataclass
class Player:
    """A trained network: its role, the module, what its forward calls (``net``: the module or its
    DistributedDataParallel wrapper), its parameters, optimiser and schedule."""

    name: str
    module: torch.nn.Module
    net: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object


class TBins:
    """Loss-per-t-bin sums and counts: per-sample losses and their times are queued on the device
    and binned in one go every ``_BIN_FLUSH`` micro-batches (no host read)."""

    def __init__(self, device: torch.device, num_bins: int = NUM_T_BINS, reduce: bool = False):
        self.num_bins, self.reduce = num_bins, reduce
        self.sum = torch.zeros(num_bins, dtype=torch.float64, device=device)
        self.cnt = torch.zeros(num_bins, dtype=torch.float64, device=device)
        self._queue: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, per_sample: torch.Tensor, t: Optional[torch.Tensor]) -> None:
        if t is None:
            return
        self._queue.append((per_sample.detach(), t.detach()))
        if len(self._queue) >= _BIN_FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._queue:
            s, c = t_bin_sums(torch.cat([p for p, _ in self._queue]), torch.cat([t for _, t in self._queue]),
                              self.num_bins)
            self._queue.clear()
            self.sum += s
            self.cnt += c

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums and counts (CPU float64, ``[num_bins]``) since the last call, summed over the ranks
        when ``reduce`` (a collective: every rank calls it at the same steps); resets them."""
        self._flush()
        s, c = self.sum.clone(), self.cnt.clone()
        if self.reduce:
            dist_utils.all_reduce_sum(s)
            dist_utils.all_reduce_sum(c)
        self.sum.zero_()
        self.cnt.zero_()
        return s.cpu(), c.cpu()


def _loss_call(objective, nets, batch, player: str, amp_device: str, amp: bool):
    """The part of a step the plan may compile: the objective's loss on a drawn batch, under bf16
    autocast when ``amp``."""
    with torch.autocast(amp_device, dtype=torch.bfloat16, enabled=amp):
        return objective.loss(nets, batch, player)


def _own_code(fn):
    """``fn`` with a code object of its own. torch.compile keeps compiled graphs, and its limit of 8
    recompilations, per code object: without this, the ninth differently shaped model compiled in one
    process (a benchmark sweep) would silently run eagerly."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class TrainStep:
    """The update body (see the module docstring) for ``objective`` with the callables ``nets`` hands
    its loss, the ``players`` it trains (in order), the student's ``ema`` and the resolved ``plan``.
    ``generator`` is the run's random stream (the objective's draws); ``bins`` collects the main
    player's loss per t-bin."""

    def __init__(self, objective, nets, players: list[Player], plan, generator: torch.Generator, ema,
                 student: torch.nn.Module, max_norm: float, bins: TBins, device: torch.device):
        self.objective, self.nets, self.players, self.plan, self.student = objective, nets, players, plan, student
        self.gen, self.ema, self.max_norm, self.bins, self.device = generator, ema, max_norm, bins, device
        names = [p.name for p in players]
        self.main = "student" if "student" in names else names[-1]
        self.ddp = plan.ddp
        self._cudagraphs = plan.compile in _CUDAGRAPH_MODES and device.type == "cuda"
        self._loss = _loss_call if plan.compile is None else torch.compile(_own_code(_loss_call), mode=plan.compile,
                                                                         dynamic=False)
        self._amp = (device.type, plan.precision == "bf16")
        self._multi = len(players) > 1
        # the losses' extra scalars (LossOutput.extra): sums and counts on the device, since the last take
        self._extra: dict[str, tuple] = {}

    def take_extras(self) -> dict[str, float]:
        """The mean of each extra scalar since the last call (over the ranks too with several); resets
        them. A collective under DDP: every rank calls it at the same steps."""
        out = {}
        for k, (s, n) in sorted(self._extra.items()):
            out[k] = (self._reduced(s) / n).item()
        self._extra.clear()
        return out

    def _reduced(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` (detached) averaged over the ranks; itself in a single process."""
        return dist_utils.all_reduce_mean(loss.detach().clone()) if self.ddp else loss.detach()

    def accumulate(self, step: int = 0, player: Optional[Player] = None) -> tuple[torch.Tensor, Optional[float]]:
        """Clear ``player``'s gradients (default: the first player), then the forward and backward of
        ``grad_accum`` micro-batches; nothing is updated. Returns the mean micro-batch loss (0-d,
        detached, averaged over the ranks) and, where the plan reads every step, the same as a float."""
        player = self.players[0] if player is None else player
        n = self.plan.grad_accum
        # Gradients are cleared before the forward (the same numbers): with CUDA graphs the previous
        # step's gradients live in the graphs' memory pool and must be dropped before the replay.
        player.optimizer.zero_grad(set_to_none=True)
        total, value, reduced = None, None, None
        for i in range(n):
            sync = player.net.no_sync() if self.ddp and i < n - 1 else contextlib.nullcontext()
            with sync:
                batch = self.objective.draw(self.gen)
                if self._cudagraphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = self._loss(self.objective, self.nets, batch, player.name, *self._amp)
                loss = out.loss
                if not self.plan.fast:
                    reduced = self._reduced(loss)
                    value = reduced.item()
                    if not math.isfinite(value):
                        raise NonFiniteLossError(step, value, player=player.name if self._multi else None)
                (loss if n == 1 else loss / n).backward()
            per_sample, t = out.per_sample, out.t
            if self._cudagraphs:
                # a CUDA-graph output is overwritten by the next replay: keep copies of the outputs and,
                # before the next micro-batch, of the gradients the first backward handed over
                loss, per_sample = loss.detach().clone(), per_sample.detach().clone()
                t = None if t is None else t.detach().clone()
                if n > 1 and i == 0:
                    for p in player.params:
                        if p.grad is not None:
                            p.grad = p.grad.clone()
            total = loss.detach() if total is None else total + loss.detach()
            for k, v in (out.extra or {}).items():
                s, c = self._extra.get(k, (0.0, 0))
                self._extra[k] = (s + v.detach().float(), c + 1)
            if player.name == self.main:
                self.bins.add(per_sample, t)
        if n == 1:
            return (reduced if reduced is not None else self._reduced(total)), value
        total = self._reduced(total / n)
        return total, (None if self.plan.fast else total.item())

    def __call__(self, step: int) -> StepOutput:
        """Step number ``step`` (from 1; used in error messages)."""
        losses, main = {}, None
        for player in self.players:
            lr = player.scheduler.get_last_lr()[0]
            for _ in range(self.objective.player_updates(player.name, step)):
                loss, value = self.accumulate(step, player)
                # foreach clipping never reads the norm on the host (no error_if_nonfinite)
                grad_norm = torch.nn.utils.clip_grad_norm_(player.params, self.max_norm, foreach=True)
                player.optimizer.step()
                with torch.no_grad():
                    self.objective.after_update(self.nets)
            player.scheduler.step()
            losses[player.name] = loss
            if player.name == self.main:
                main = StepOutput(loss, grad_norm, lr, value)
        self.ema.update(self.student, foreach=True)
        main.losses = losses
        return main
