"""Training objectives: the seam between a method and the trainer.

An objective is what EDM's ``loss_fn(net, images, labels)`` is to its trainer: the one place a
method says what it draws and what it minimises. The step, the plan, the loop and the checkpoint
know nothing of any particular objective. An objective

- owns its networks by role: ``student`` (the model of the run, always), and where it needs them a
  frozen ``teacher``, an EMA ``target`` or a ``discriminator`` (:meth:`Objective.build_nets`);
- draws a micro-batch, ``draw(generator) -> Batch``, from its own random stream: couplings, times,
  labels and their dropout, path noise, in a fixed order (so a resumed run redraws the same batches);
- computes a pure ``loss(nets, batch, player) -> LossOutput(loss, per_sample, t)``: no draws and no
  host reads, so the step can compile it as it is (``train.compile``), autocast it
  (``train.precision``) and run it under DistributedDataParallel;
- names the ``players`` it trains, in the order they update, one optimiser each (an adversarial
  objective alternates a generator and a discriminator: each player's update draws its own batch),
  and how many updates each makes in a step (:meth:`Objective.player_updates`: one by default);
- declares what the plan may do with it (:meth:`Objective.fused_reason`: whether the fused MLP step
  can stand in for its loss) and refuses what it cannot use (:meth:`Objective.check`) before any step;
- keeps its own state for exact resume (:meth:`Objective.state_dict`).

A new method is one subclass and one entry in :data:`OBJECTIVES` (its keys, if any, a section of the
config named like it): see ``tests/test_objective_seam.py`` for one written outside the package.

The velocity-regression objectives here minimise ``d(v_theta(xt, t, cond), ut)`` on draws
``(xt, t, ut)``; they differ only in what they draw:

- :class:`CFM`, conditional flow matching (Lipman et al. 2023, eq. 9; Liu et al. 2022, eq. 1) on the
  run's coupling (independent, minibatch OT or stored teacher pairs); with a paired coupling and
  ``coupling.mix`` = lambda < 1, ``lambda L(teacher pairs) + (1 - lambda) L(real data)``, each term on a
  batch of its own (the real-data term drawn with ``coupling.real``).
- :class:`OneStepDistill`, one-step distillation of a pair store (Liu et al. 2022, sec. 2.3): the student
  at ``t = 0`` regresses the one-step map, ``d(v_theta(x0, 0), x1 - x0)``, so that one Euler step
  ``x0 + v_theta(x0, 0)`` lands on the teacher's ``x1`` whatever the path (with the linear path this
  is the flow-matching loss at ``t = 0``, draw for draw).

``d`` is the mean squared error over dimensions (``l2``) or the pseudo-Huber distance of
:data:`~flowmatch.training.losses.LOSSES`. A class-conditional model is given its labels as ``cond``
(each replaced by the model's null class with probability ``train.class_dropout``, for classifier-free
guidance).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch import nn

from flowmatch.config import STAGE_SECTIONS, ExperimentConfig
from flowmatch.couplings import Coupling, PairedCoupling
from flowmatch.errors import ConfigError
from flowmatch.training.builders import Components
from flowmatch.training.losses import LOSSES, regression_loss
from flowmatch.types import LossOutput
from flowmatch.utils import lookup

__all__ = ["Batch", "Nets", "Validation", "Objective", "VelocityRegression", "CFM", "OneStepDistill", "OBJECTIVES",
           "build_objective", "unused_sections", "frozen_copy", "teacher_checkpoint", "frozen_teacher",
           "lerp_target"]


@dataclass
class Batch:
    """One micro-batch as an objective drew it. The velocity-regression objectives fill ``xt``
    (``[B, *D]``), ``t`` (``[B]``), ``ut`` (``[B, *D]``) and ``cond`` (``[B]`` long labels, or ``None``),
    ``weight`` (of this term in the loss) and ``more`` (further weighted terms, e.g. the real-data term
    of the mix); other objectives keep what they need in ``x0``, ``x1`` and ``extra``."""

    t: torch.Tensor
    xt: Optional[torch.Tensor] = None
    ut: Optional[torch.Tensor] = None
    cond: Optional[torch.Tensor] = None
    x0: Optional[torch.Tensor] = None
    x1: Optional[torch.Tensor] = None
    weight: float = 1.0
    more: tuple = ()
    extra: dict = field(default_factory=dict)

    def terms(self) -> tuple:
        """This batch and its further terms, in draw order."""
        return (self, *self.more)


@dataclass
class Validation:
    """An objective's validation at one step: ``scores`` to log under their keys; ``best``: whether the
    model is the best so far (the loop then writes ``checkpoints/best.pt`` with ``selection`` in it)."""

    scores: dict
    best: bool = False
    selection: dict = field(default_factory=dict)


class Nets(dict):
    """The networks an objective works with, by role (``nets.student``, ``nets["teacher"]``). The step
    hands :meth:`Objective.loss` the callables it should run: a trained network wrapped for data
    parallelism and memory layout where the plan says so."""

    def __getattr__(self, role: str):
        try:
            return self[role]
        except KeyError:
            raise AttributeError(f"no network with role {role!r}; roles: {', '.join(self)}") from None


class Objective:
    """The protocol (see the module docstring). Subclasses set :attr:`name` and implement
    :meth:`draw` and :meth:`loss`; the rest has defaults for a one-network objective."""

    name: ClassVar[str] = ""
    players: ClassVar[tuple[str, ...]] = ("student",)
    # the config section of this objective's own keys (None: it has none)
    section: ClassVar[Optional[str]] = None
    # roles other than the players whose weights are part of the training state (an EMA target); a
    # frozen teacher is rebuilt from its file, not saved
    saved_nets: tuple = ()
    # whether the plan may compile the loss (train.compile); False: auto stays eager, an explicit mode is refused
    compilable: bool = True

    def __init__(self, cfg: ExperimentConfig, comp: Components):
        self.cfg, self.comp = cfg, comp
        self.device = comp.device

    # -- networks and players
    def build_nets(self) -> dict[str, nn.Module]:
        """The networks of roles other than ``student`` (on the device): trained ones (a player's role)
        and frozen or EMA ones. None by default."""
        return {}

    def make_optimizer(self, player: str, params: list, impl: dict) -> Optional[torch.optim.Optimizer]:
        """The optimiser of ``player`` (``impl``: the plan's ``foreach`` / ``fused`` keywords); ``None``
        takes AdamW with the ``train`` section's settings."""
        return None

    def after_update(self, nets: Nets) -> None:
        """Called after every optimiser step of every player, outside autograd (e.g. an EMA target)."""

    def player_updates(self, player: str, step: int) -> int:
        """How many optimiser updates ``player`` makes in step ``step`` (from 1), each on a batch of its
        own; its schedule advances once a step. One by default."""
        return 1

    # -- the step's inputs and loss
    def check(self) -> None:
        """Refuse, with a :class:`~flowmatch.errors.ConfigError`, a coupling, model or setting this
        objective cannot use; called before training starts."""

    def draw(self, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def loss(self, nets: Nets, batch: Batch, player: str = "student") -> LossOutput:
        raise NotImplementedError

    def fused_reason(self) -> Optional[str]:
        """Why the fused MLP step cannot compute this objective's loss (``None``: it can; only the l2
        velocity regressions with one term and no labels can)."""
        return f"objective {self.name} has no fused implementation"

    def validate(self, step: int, model: nn.Module) -> Optional[Validation]:
        """Model selection: called by the loop with the EMA ``model`` before the first step of a fresh
        run (``step = 0``) and after every optimiser step, on every rank, outside autograd; ``None``:
        nothing at this step (the default)."""
        return None

    # -- state for exact resume
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class VelocityRegression(Objective):
    """``mean_i d(v(xt_i, t_i, cond_i), ut_i)`` summed over the batch's weighted terms; subclasses say
    how a term is drawn (:meth:`draw_term`) and which couplings the terms come from (:meth:`sources`)."""

    def __init__(self, cfg: ExperimentConfig, comp: Components):
        super().__init__(cfg, comp)
        self.loss_name = cfg.train.loss
        self.distance = lookup(LOSSES, self.loss_name, "loss")
        self.batch_size = cfg.train.batch_size
        self.class_cond = bool(cfg.model.class_cond)
        self.class_dropout = float(cfg.train.class_dropout)
        self.null_class = getattr(comp.model, "null_class", None) if self.class_cond else None

    def sources(self) -> list[tuple[float, Coupling]]:
        """``(weight, coupling)`` of each loss term."""
        return [(1.0, self.comp.coupling)]

    def check(self) -> None:
        if not self.class_cond:
            return
        if self.null_class is None:
            raise ConfigError(f"model.class_cond needs a model with class conditioning (a null_class); "
                              f"{type(self.comp.model).__name__} has none")
        for _, c in self.sources():
            if c.has_labels() is False:
                raise _unlabeled_error(c)

    def draw_term(self, coupling: Coupling, weight: float, generator: torch.Generator) -> Batch:
        raise NotImplementedError

    def draw(self, generator: torch.Generator) -> Batch:
        terms = [self.draw_term(c, w, generator) for w, c in self.sources()]
        terms[0].more = tuple(terms[1:])
        return terms[0]

    def _labels(self, y: Optional[torch.Tensor], coupling: Coupling, generator: torch.Generator):
        """The labels ``y`` the model is given, each dropped to the null class with probability
        ``train.class_dropout`` (one ``torch.rand`` of ``[B]``); ``None`` without class conditioning."""
        if not self.class_cond:
            return None
        if y is None:
            raise _unlabeled_error(coupling)
        # classifier-free guidance trains the unconditional field on the same network: a dropped label
        # becomes the null class. The draw is made whatever the probability.
        drop = torch.rand(y.shape[0], generator=generator, device=self.device) < self.class_dropout
        return y.masked_fill(drop.to(y.device), self.null_class)

    def loss(self, nets: Nets, batch: Batch, player: str = "student") -> LossOutput:
        return regression_loss(nets.student, batch.terms(), self.distance)

    def fused_reason(self) -> Optional[str]:
        if self.loss_name != "l2":
            return f"it computes the l2 loss only (loss {self.loss_name!r})"
        if self.class_cond:
            return "it has no class labels"
        if len(self.sources()) != 1:
            return "it has no real-data mix"
        return None

    def state_dict(self) -> dict:
        return {"coupling": self.comp.coupling.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.comp.coupling.load_state_dict(state.get("coupling", {}))


class CFM(VelocityRegression):
    """Conditional flow matching on the run's path, coupling and time sampler (see the module
    docstring). A term is drawn in this order: the coupling's batch (with its labels), the times, the
    label dropout, the path noise."""

    name = "cfm"

    def sources(self) -> list[tuple[float, Coupling]]:
        """``mix * L(pairs) + (1 - mix) * L(real data)`` for a paired coupling with real data mixed in
        (with ``mix = 0`` no pair is drawn, so the run is plain flow matching draw for draw), else
        ``L(coupling)``."""
        c, mix = self.comp, float(self.cfg.coupling.mix)
        if c.real_coupling is None:
            return [(1.0, c.coupling)]
        return ([(mix, c.coupling)] if mix > 0 else []) + [(1.0 - mix, c.real_coupling)]

    def draw_term(self, coupling: Coupling, weight: float, generator: torch.Generator) -> Batch:
        s = coupling.sample(self.batch_size, generator=generator)
        t = self.comp.time_sampler.sample(self.batch_size, generator=generator, device=self.device)
        cond = self._labels(s.y, coupling, generator)
        ps = self.comp.path.sample(s.x0, s.x1, t, generator=generator)
        return Batch(t=ps.t, xt=ps.xt, ut=ps.ut, cond=cond, x0=s.x0, x1=s.x1, weight=weight)


class OneStepDistill(VelocityRegression):
    """One-step distillation of the run's pair store: ``d(v(x0, 0), x1 - x0)`` (see the module
    docstring). Needs ``coupling.name: paired`` with ``coupling.mix: 1``; the time sampler and the
    path are not used (``x0 + v(x0, 0)`` is one Euler step from 0 to 1 on any path). A term is drawn
    as the pairs (with their labels), then the label dropout."""

    name = "distill"

    def check(self) -> None:
        cc = self.cfg.coupling
        if not isinstance(self.comp.coupling, PairedCoupling):
            raise ConfigError(f"train.objective=distill distils a pair store: it needs coupling.name=paired "
                              f"(with coupling.pairs from `flowmatch reflow generate`); got coupling.name={cc.name}")
        if self.comp.real_coupling is not None:
            raise ConfigError(f"train.objective=distill regresses the teacher's pairs only: coupling.mix must be 1 "
                              f"(got {cc.mix}); the real-data mix is train.objective=cfm's")
        super().check()

    def draw_term(self, coupling: Coupling, weight: float, generator: torch.Generator) -> Batch:
        s = coupling.sample(self.batch_size, generator=generator)
        t = torch.zeros(s.x0.shape[0], device=self.device, dtype=s.x0.dtype)
        cond = self._labels(s.y, coupling, generator)
        return Batch(t=t, xt=s.x0, ut=s.x1 - s.x0, cond=cond, x0=s.x0, x1=s.x1, weight=weight)


def _unlabeled_error(coupling: Coupling) -> ConfigError:
    return ConfigError(f"model.class_cond needs class labels, but the {coupling.name or type(coupling).__name__} "
                       f"coupling's data has none (a labeled image dataset, or a pair store made by a "
                       f"class-conditional teacher); set model.class_cond=false")


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every parameter frozen: an objective's target network."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def teacher_checkpoint(cfg: ExperimentConfig, section: str) -> Optional[str]:
    """The flow teacher an objective reads: ``<section>.teacher``, else ``train.init``'s checkpoint (``None``
    where neither names one: ``train.init`` ``auto`` or ``random``)."""
    init = cfg.train.init
    return getattr(cfg, section).teacher or (init if init not in ("auto", "random") else None)


def frozen_teacher(path: str, cfg: ExperimentConfig, key: str, device=None) -> nn.Module:
    """The flow checkpoint ``path``'s model (its EMA weights) on ``device``, in eval mode with every
    parameter frozen: an objective's teacher. ``key``: the config key that named it, for the one-line
    :class:`~flowmatch.errors.ConfigError` when its data shape is not that of ``cfg``'s run."""
    from flowmatch.data.task import data_shape
    from flowmatch.training.checkpoint import load_model

    teacher = load_model(path, device=device or "cpu")
    got, want = tuple(data_shape(teacher.config.data)), tuple(data_shape(cfg.data))
    if got != want:
        raise ConfigError(f"{key} {path} was trained on data of shape {got}; this run's data have shape {want}")
    return teacher.model.eval().requires_grad_(False)


@torch.no_grad()
def lerp_target(target: nn.Module, model: nn.Module, decay: float) -> None:
    """``target <- decay * target + (1 - decay) * model``, parameter by parameter (one multi-tensor lerp):
    the EMA target network of the consistency and shortcut objectives (no warm-up, unlike the run's EMA)."""
    torch._foreach_lerp_(list(target.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


OBJECTIVES: dict[str, type[Objective]] = {"cfm": CFM, "distill": OneStepDistill}


def unused_sections(objective: str) -> tuple[str, ...]:
    """The config sections a run of ``objective`` does not read: the pipeline-stage sections
    (:data:`~flowmatch.config.STAGE_SECTIONS`) and every other objective's own section. Two configs
    that differ only there describe the same run."""
    own = getattr(OBJECTIVES.get(objective), "section", None)
    sections = dict.fromkeys((*STAGE_SECTIONS, *(c.section for c in OBJECTIVES.values() if c.section)))
    return tuple(s for s in sections if s != own)


def build_objective(cfg: ExperimentConfig, comp: Components) -> Objective:
    """The objective ``train.objective`` names, built on ``comp`` and checked (an unknown name lists
    the valid ones)."""
    cls = lookup(OBJECTIVES, cfg.train.objective, "objective")
    objective = cls(cfg, comp)
    objective.check()
    return objective
