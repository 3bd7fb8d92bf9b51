"""The trainer of one experiment without a run directory: objective, plan, networks, optimisers, EMA
and the step, with the checkpoint payload (the training loop and speed benchmarks both drive one).

::

    trainer = build_trainer(cfg, fast="on", compile="default")   # keys replace cfg.train's
    trainer.run(20); trainer.sync()                                # warm-up (compiles)
    t0 = time.perf_counter(); trainer.run(1000); losses = trainer.sync()
    steps_per_sec = 1000 / (time.perf_counter() - t0)

``Trainer.step() -> StepOutput`` does one optimiser step of every player (no host read where
``plan.fast``); ``run(n)`` does ``n``; ``read_losses()`` returns the losses of the steps since the last
read, raising :class:`~flowmatch.errors.NonFiniteLossError` at the first non-finite one; ``sync()``
waits for the device first; ``take_bins()`` returns the loss-per-t-bin sums and counts;
``state_dict()`` / ``load_state_dict()`` are the checkpoint payload.

Data parallel: inside a process group of two or more ranks each trained network is wrapped in
``DistributedDataParallel``, rank ``r``'s generator is seeded ``seed + 1000 * r``, the reported loss
is the mean over the ranks (one all-reduce of a scalar per step, so every rank sees the same losses
and a non-finite loss stops every rank at the same step) and the t-bins are summed over them. The
EMA, optimisers and checkpoint hold the unwrapped modules.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from flowmatch.config import ExperimentConfig, TrainConfig
from flowmatch.couplings import MinibatchOTCoupling, PairedCoupling
from flowmatch.errors import CheckpointError, NonFiniteLossError
from flowmatch.models import EMA
from flowmatch.training import distributed as dist_utils
from flowmatch.training.builders import Components, build_components
from flowmatch.training.fused_mlp import FlatMLP, FusedMLPStep
from flowmatch.training.objectives import Nets, Objective, build_objective
from flowmatch.training.plan import Plan, resolve_plan
from flowmatch.training.schedule import lr_lambda
from flowmatch.training.step import Player, StepOutput, TBins, TrainStep
from flowmatch.utils import make_generator

__all__ = ["Trainer", "build_trainer", "build_optimizer", "load_optimizer_state"]

# Optimiser settings that describe the implementation, not the optimisation: a resumed run keeps
# its own (a checkpoint of a plain run may be resumed fast, and the reverse).
_IMPL_KEYS = ("foreach", "fused", "capturable")
# The losses waiting to be read are concatenated into one tensor when there are this many (bounds the
# number of live device tensors when a benchmark never reads).
_MAX_PENDING = 1024


def build_optimizer(params, tc: TrainConfig, impl: str = "foreach"):
    """AdamW over ``params`` with the ``train`` section's settings (``impl``: ``foreach`` or ``fused``)
    and its LambdaLR schedule; returns ``(optimizer, scheduler)``."""
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, **{impl: True})
    return opt, _schedule(opt, tc)


def _schedule(opt: torch.optim.Optimizer, tc: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, tc.steps, tc.lr_schedule,
                                                            tc.lr_min_ratio))


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)`` keeping ``opt``'s implementation (foreach / fused / capturable):
    torch would take those from ``state``, and place AdamW's step counters by them."""
    groups = [{**saved, **{k: mine[k] for k in _IMPL_KEYS if k in mine}}
              for saved, mine in zip(state["param_groups"], opt.param_groups)]
    opt.load_state_dict({**state, "param_groups": groups})


class _ChannelsLastCall:
    """``net`` called with a 4-D ``x`` in the channels_last layout its weights are in."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x, t, *args, **kwargs):
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x, t, *args, **kwargs)


class Trainer:
    """See the module docstring. ``objective``: a callable ``(cfg, comp) -> Objective`` (default: the
    one ``train.objective`` names); ``plan``: a resolved :class:`Plan` (default: :func:`resolve_plan`
    of ``cfg``, ``comp`` and the objective, with ``keys`` replacing ``train`` keys)."""

    def __init__(self, cfg: ExperimentConfig, comp: Components, *,
                 objective: Optional[Callable[[ExperimentConfig, Components], Objective]] = None,
                 plan: Optional[Plan] = None, distributed: Optional[bool] = None, **keys):
        tc = cfg.train
        self.cfg, self.components, self.model, self.device = cfg, comp, comp.model, comp.device
        if objective is None:
            self.objective = build_objective(cfg, comp)
        else:
            self.objective = objective(cfg, comp)
            self.objective.check()
        self.plan = plan if plan is not None else resolve_plan(cfg, comp, self.objective, distributed=distributed,
                                                               **keys)
        self.fast = self.plan.fast
        self.rank, self.world_size = dist_utils.dist_info() if self.plan.ddp else (0, 1)
        # the objective's other networks (a discriminator, a frozen teacher, an EMA target) are built
        # after the student, so the student's initialisation does not depend on them
        self.nets_raw: dict[str, torch.nn.Module] = {"student": self.model, **self.objective.build_nets()}
        if self.plan.channels_last:
            # once, before the DDP wrapper, the EMA copy and the optimiser see the parameters
            for m in self.nets_raw.values():
                m.to(memory_format=torch.channels_last)
        wrapped = {}
        for role, m in self.nets_raw.items():
            net = m
            if self.plan.ddp and role in self.objective.players:
                ids = [comp.device.index if comp.device.index is not None else torch.cuda.current_device()] \
                    if comp.device.type == "cuda" else None
                # every parameter takes part in every forward, so the reducer need not search for unused ones
                net = DistributedDataParallel(m, device_ids=ids, find_unused_parameters=False)
            wrapped[role] = net
        self.net = wrapped["student"]
        self.nets = Nets({r: (_ChannelsLastCall(n) if self.plan.channels_last else n) for r, n in wrapped.items()})
        self.ema = EMA(self.model, tc.ema_decay)
        self.fused: Optional[FlatMLP] = FlatMLP(self.model, self.ema.model) if self.plan.fused else None
        self.players: list[Player] = []
        for name in self.objective.players:
            module = self.nets_raw[name]
            # the parameters that require grad: all of them, or an adapter's alone (a frozen base)
            params = [self.fused.param] if (self.fused is not None and name == "student") else \
                [p for p in module.parameters() if p.requires_grad]
            impl = {self.plan.optimizer: True}
            opt = self.objective.make_optimizer(name, params, impl)
            if opt is None:
                opt, sched = build_optimizer(params, tc, self.plan.optimizer)
            else:
                sched = _schedule(opt, tc)
            self.players.append(Player(name, module, wrapped[name], params, opt, sched))
        student = next((p for p in self.players if p.name == "student"), None)
        self.optimizer = student.optimizer if student else None
        self.scheduler = student.scheduler if student else None
        self.generator = make_generator(dist_utils.rank_seed(tc.seed, self.rank), comp.device)
        if self.rank > 0:
            # the global RNG (dropout inside the model) gets a stream of its own on each rank too;
            # rank 0 keeps the single-process one
            torch.manual_seed(dist_utils.rank_seed(tc.seed, self.rank))
        self.bins = TBins(comp.device, reduce=self.plan.ddp)
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        if self.fused is not None:
            self.train_step = FusedMLPStep(self.objective, self.fused, self.generator, self.ema, self.optimizer,
                                           self.scheduler, max_norm, self.bins)
        else:
            self.train_step = TrainStep(self.objective, self.nets, self.players, self.plan, self.generator,
                                        self.ema, self.model, max_norm, self.bins, comp.device)
        if self.plan.fast and comp.device.type == "cuda":
            _warn_host_round_trips(comp)
        self.global_step = 0
        self._pending: list[torch.Tensor] = []  # fast: losses not yet read, from step _pending_from
        self._pending_from = 1
        self._read: list[float] = []  # plain: losses already on the host, not yet handed out
        for m in self.nets_raw.values():
            if any(p.requires_grad for p in m.parameters()):
                m.train()

    def step(self) -> StepOutput:
        """One optimiser step of every player (no host read where ``plan.fast``; otherwise a
        non-finite loss raises ``NonFiniteLossError`` before the update)."""
        out = self.train_step(self.global_step + 1)
        self.global_step += 1
        if self.fast:
            if not self._pending:
                self._pending_from = self.global_step
            # several players: every player's loss is kept (in player order), so a non-finite one is named
            self._pending.append(torch.stack([out.losses[n] for n in self.objective.players])
                                 if len(self.players) > 1 else out.loss)
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
        """The per-step losses since the last read (one device read where ``plan.fast``); raises
        ``NonFiniteLossError`` with the first non-finite loss's step and value."""
        if self.fast:
            names = self.objective.players if len(self.players) > 1 else (None,)
            flat = torch.cat([p.reshape(-1) for p in self._pending]).tolist() if self._pending else []
            first, self._pending = self._pending_from, []
            rows = [flat[i:i + len(names)] for i in range(0, len(flat), len(names))]
            for i, row in enumerate(rows):
                for name, v in zip(names, row):
                    if not math.isfinite(v):
                        raise NonFiniteLossError(first + i, v, player=name)
            main = names.index(self.train_step.main) if len(names) > 1 else 0
            values = [row[main] for row in rows]
        else:
            values, self._read = self._read, []
        return values

    def sync(self) -> list[float]:
        """Wait for every queued step on the device, then :meth:`read_losses`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.read_losses()

    def take_extras(self) -> dict[str, float]:
        """The mean of each extra scalar the objective's losses logged since the last call
        (:attr:`~flowmatch.types.LossOutput.extra`); none for the fused step."""
        take = getattr(self.train_step, "take_extras", None)
        return take() if take is not None else {}

    def take_bins(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss-per-t-bin sums and counts since the last call (see :class:`~flowmatch.training.step.TBins`)."""
        return self.bins.take()

    @property
    def fused_mlp(self) -> bool:
        """Whether the step is the fused MLP step (:mod:`flowmatch.training.fused_mlp`)."""
        return self.fused is not None

    # ------------------------------------------------------------------ checkpoint payload

    def _optimizer_state(self, player: Player) -> dict:
        """A player's optimiser ``state_dict``, per parameter in every plan (the fused step's flat state
        is split)."""
        state = player.optimizer.state_dict()
        return self.fused.optimizer_state_to_params(state) if (self.fused is not None and player.name == "student") \
            else state

    def _rank_state(self) -> dict:
        return {"generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                "objective": self.objective.state_dict()}

    def state_dict(self) -> dict:
        """The checkpoint payload: ``model`` (the student), ``ema``, ``optimizer`` and ``scheduler``
        (the student's), ``objective`` (its name and state), ``step``, ``rng`` (this rank's); for an
        objective with other players or saved networks (an EMA target), ``nets`` (their weights) and
        ``players`` (the other players' optimiser and schedule). With several ranks also ``world_size`` and ``ranks`` (every rank's
        generator, global RNG and objective state, in rank order): a collective, so every rank calls it."""
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                 "objective": {"name": self.objective.name, "state": self.objective.state_dict()},
                 "step": self.global_step,
                 "rng": {"generator": self.generator.get_state(), "torch": torch.get_rng_state()}}
        for p in self.players:
            if p.name == "student":
                state["optimizer"], state["scheduler"] = self._optimizer_state(p), p.scheduler.state_dict()
            else:
                state.setdefault("players", {})[p.name] = {"optimizer": self._optimizer_state(p),
                                                           "scheduler": p.scheduler.state_dict()}
        others = {r: m.state_dict() for r, m in self.nets_raw.items()
                  if r != "student" and (r in self.objective.players or r in self.objective.saved_nets)}
        if others:
            state["nets"] = others
        if self.world_size > 1:
            state["world_size"] = self.world_size
            state["ranks"] = dist_utils.all_gather_object(self._rank_state())
        return state

    def load_state_dict(self, ckpt: dict) -> None:
        """Restore a checkpoint's training state (written under any plan, into any plan). A checkpoint
        of another objective is refused, naming both.

        Rank 0 (and a single process) takes the checkpoint's ``rng`` and objective state; rank ``r`` > 0
        takes its own entry of ``ranks`` when the checkpoint was written by a world of the same size,
        else it re-seeds its generator and global RNG from ``(seed, rank, step)``
        (:func:`~flowmatch.training.distributed.resume_seed`) and starts its objective's state afresh.
        A checkpoint written before objectives existed is a ``cfm`` one (its ``coupling`` state is the
        objective's)."""
        saved = ckpt.get("objective", {"name": "cfm", "state": {"coupling": ckpt.get("coupling", {})}})
        if saved["name"] != self.objective.name:
            raise CheckpointError(f"the checkpoint was trained with objective {saved['name']!r}; this run's is "
                                  f"{self.objective.name!r} (train.objective): resume it with its own objective")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        for role, sd in ckpt.get("nets", {}).items():
            self.nets_raw[role].load_state_dict(sd)
        for p in self.players:
            st = {"optimizer": ckpt["optimizer"], "scheduler": ckpt["scheduler"]} if p.name == "student" \
                else ckpt["players"][p.name]
            opt_state = st["optimizer"]
            if self.fused is not None and p.name == "student":  # a per-parameter state, whichever plan wrote it
                opt_state = self.fused.optimizer_state_from_params(opt_state)
            load_optimizer_state(p.optimizer, opt_state)
            p.scheduler.load_state_dict(st["scheduler"])
        self.global_step = int(ckpt["step"])
        own = None
        if self.rank == 0:
            own = {"generator": ckpt["rng"]["generator"], "torch": ckpt["rng"]["torch"], "objective": saved["state"]}
        elif ckpt.get("world_size") == self.world_size and len(ckpt.get("ranks") or []) == self.world_size:
            own = ckpt["ranks"][self.rank]
            if "objective" not in own:  # written before objectives existed
                own = {**own, "objective": {"coupling": own.get("coupling", {})}}
        if own is not None:
            self.objective.load_state_dict(own["objective"])
            self.generator.set_state(own["generator"].to(self.generator.get_state().device))
            torch.set_rng_state(own["torch"])
        else:
            seed = dist_utils.resume_seed(self.cfg.train.seed, self.rank, self.global_step)
            self.generator.manual_seed(seed)
            torch.manual_seed(seed + 1)
        self._pending, self._read = [], []


def _warn_host_round_trips(comp: Components) -> None:
    for c in (comp.coupling, comp.real_coupling):
        if isinstance(c, MinibatchOTCoupling) and c.method == "exact":
            warnings.warn("coupling.method=exact solves the OT assignment on the CPU, so every fast step "
                          "waits for the GPU; coupling.method=sinkhorn pairs on the device", stacklevel=3)
        if isinstance(c, PairedCoupling) and not c.on_device:
            warnings.warn("the paired coupling's store is gathered on the CPU every step; load it as "
                          "tensors to keep the fast step on the device", stacklevel=3)


def build_trainer(cfg: ExperimentConfig, *, device: Optional[str | torch.device] = None,
                  objective: Optional[Callable[[ExperimentConfig, Components], Objective]] = None,
                  distributed: Optional[bool] = None, **keys) -> Trainer:
    """A :class:`Trainer` for ``cfg`` on ``device`` (default ``train.device``); ``keys`` (``fast=``,
    ``compile=``, ``fused=``, ``precision=``, ``channels_last=``) replace the ``train`` section's
    values. Writes nothing: for benchmarks and scripts."""
    resolve_plan(cfg, device=device or "cpu", **keys)  # refuse bad keys before building anything
    return Trainer(cfg, build_components(cfg, device), objective=objective, distributed=distributed, **keys)
