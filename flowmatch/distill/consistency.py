"""Consistency distillation (CD) from a flow teacher and consistency training (CT), as objectives.

Time convention. Ours: ``t = 0`` noise, ``t = 1`` data. Consistency models (Song et al. 2023) and
improved consistency training (Song & Dhariwal 2023) index by a noise level that falls towards the
data, with the boundary at the data end; here that end is ``t = 1`` (``t_ours = 1 - t_theirs`` on a
unit interval, and velocities change sign: ``v_ours = -v_theirs``).

Parametrisation (the x1-prediction form of a velocity network): the consistency function is

    f_theta(x_t, t) = x_t + (1 - t) v_theta(x_t, t),

the endpoint one Euler step from ``t`` reaches. The boundary condition ``f(x, 1) = x`` holds exactly
(Song et al. 2023, eq. 5: ``c_skip = 1, c_out = 0`` at the data end), and a student initialised from
its flow teacher starts as the teacher's one-Euler-step prediction. Sampling: one step is one Euler
step of ``v_theta`` from 0 to 1; ``k`` steps re-noise each prediction with fresh noise at chosen times
(the ``consistency`` solver, :class:`~flowmatch.solvers.multistep.ConsistencySampler`).

Objective (Song et al. 2023, eq. 7 / 10). On the grid ``t_n = n / N`` (``n = 0..N``), draw
``n ~ U{0, ..., N - 1}``, a pair ``(x0, x1)`` from the run's coupling and ``x_{t_n} = (1 - t_n) x0 +
t_n x1``; the loss is

    lambda(t_n) d(f_theta(x_{t_n}, t_n), sg[f_target(x_hat_{t_{n+1}}, t_{n+1})]),  lambda = 1 / (t_{n+1} - t_n),

with ``x_hat_{t_{n+1}}`` one step of the frozen teacher from ``t_n`` (Euler or Heun: the solver
module's own ``step``) for CD, and the pair's own interpolant ``(1 - t_{n+1}) x0 + t_{n+1} x1`` for CT
(no teacher). The target network is an EMA of the student with decay ``mu`` (``mu = 0``: the student
itself under stop-gradient, as improved CT). ``d`` is ``l2`` (mean squared error over dimensions) or
pseudo-Huber ``sqrt(||e||^2 + c^2) - c`` on the per-sample L2 norm with ``c = 0.00054 sqrt(D)``
(improved CT's convention; :data:`~flowmatch.training.losses.LOSSES`). CT's grid follows improved
CT's curriculum (Song & Dhariwal 2023, eq. 6 / sec. 3.4): ``N(k) = min(s0 2^floor(k / K'), s1)`` intervals
at optimiser step ``k`` of ``K``, ``K' = floor(K / (log2 floor(s1 / s0) + 1))``; ``n`` is drawn
uniformly (improved CT's lognormal choice of ``n`` is not used here).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from flowmatch.errors import ConfigError
from flowmatch.solvers import get_solver
from flowmatch.training import OBJECTIVES, Batch, Objective
from flowmatch.training.objectives import frozen_copy, frozen_teacher, lerp_target, teacher_checkpoint
from flowmatch.types import LossOutput
from flowmatch.training.losses import LOSSES
from flowmatch.utils import expand_like, lookup

__all__ = ["consistency_fn", "ct_intervals", "ConsistencyDistillation", "ConsistencyTraining"]


def consistency_fn(v, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``f(x, t) = x + (1 - t) v(x, t)`` for ``x`` ``[B, *D]`` and ``t`` ``[B]`` (see the module docstring)."""
    out = v(x, t) if cond is None else v(x, t, cond)
    out = out.to(torch.promote_types(out.dtype, x.dtype))
    return x + expand_like(1 - t, x) * out


def ct_intervals(step: int, total: int, s0: int, s1: int) -> int:
    """Improved CT's discretisation curriculum: the number of grid intervals at optimiser step ``step``
    (from 0) of ``total``, doubling from ``s0`` up to ``s1``."""
    if s1 < s0:
        raise ConfigError(f"the CT curriculum must end at or above its start: s1 = {s1} < s0 = {s0}")
    stages = int(math.log2(s1 // s0)) + 1
    per = max(1, total // stages)
    return min(s0 * 2 ** (step // per), s1)


class _Consistency(Objective):
    """What CD and CT share: the draws, the target network and the loss."""

    section = "consistency"

    def __init__(self, cfg, comp):
        super().__init__(cfg, comp)
        cc = cfg.consistency
        self.mu, self.batch_size = float(cc.mu), cfg.train.batch_size
        self.distance = lookup(LOSSES, cfg.train.loss, "loss")
        self.updates = 0  # optimiser steps taken (CT's curriculum; part of the state)

    def check(self) -> None:
        if self.cfg.model.class_cond:
            raise ConfigError(f"train.objective={self.name} does not take class labels yet; set model.class_cond=false")

    def build_nets(self) -> dict:
        if self.mu == 0:
            return {}
        self.target = frozen_copy(self.comp.model)
        return {"target": self.target}

    def intervals(self) -> int:
        raise NotImplementedError

    def next_point(self, nets, x: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor,
                   t_next: torch.Tensor) -> torch.Tensor:
        """``x_hat`` at ``t_next`` from ``x`` at ``t`` (no gradient)."""
        raise NotImplementedError

    def draw(self, generator: torch.Generator) -> Batch:
        s = self.comp.coupling.sample(self.batch_size, generator=generator)
        n_int = self.intervals()
        n = torch.randint(0, n_int, (self.batch_size,), generator=generator, device=self.device)
        t = n.to(s.x0.dtype) / n_int
        t_next = (n + 1).to(s.x0.dtype) / n_int
        xt = expand_like(1 - t, s.x0) * s.x0 + expand_like(t, s.x1) * s.x1
        return Batch(t=t, xt=xt, x0=s.x0, x1=s.x1, extra={"t_next": t_next})

    def loss(self, nets, batch: Batch, player: str = "student") -> LossOutput:
        t, t_next = batch.t, batch.extra["t_next"]
        with torch.no_grad():
            x_next = self.next_point(nets, batch.xt, batch.x0, batch.x1, t, t_next)
            target = consistency_fn(nets["target"] if self.mu > 0 else nets.student, x_next, t_next)
        pred = consistency_fn(nets.student, batch.xt, t)
        per = self.distance((pred - target.to(pred.dtype)).reshape(pred.shape[0], -1)) / (t_next - t)
        return LossOutput(per.mean(), per, t)

    def after_update(self, nets) -> None:
        self.updates += 1
        if self.mu > 0:  # target <- mu target + (1 - mu) student
            lerp_target(self.target, self.comp.model, self.mu)

    def state_dict(self) -> dict:
        return {"coupling": self.comp.coupling.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.comp.coupling.load_state_dict(state.get("coupling", {}))
        self.updates = int(state.get("updates", 0))

    @property
    def saved_nets(self) -> tuple:
        return ("target",) if self.mu > 0 else ()


class ConsistencyDistillation(_Consistency):
    """CD: the next point is one step of the frozen flow teacher (``consistency.teacher``, default
    ``train.init``'s checkpoint; its EMA weights) by ``consistency.teacher_solver``. With a LoRA
    (``lora.rank > 0``: the student is ``train.init``'s weights plus an adapter) the teacher is the
    student with its adapter disabled: one copy of the weights."""

    name = "cd"

    def __init__(self, cfg, comp):
        super().__init__(cfg, comp)
        self.solver = get_solver(cfg.consistency.teacher_solver)
        # the disabled-adapter teacher switches the adapter off inside the loss: not one graph
        self.compilable = cfg.lora.rank == 0
        self.teacher_evals = 0  # velocity evaluations of the teacher (per sample): the cost table's

    def teacher_path(self) -> Optional[str]:
        return teacher_checkpoint(self.cfg, "consistency")

    def check(self) -> None:
        super().check()
        if self.teacher_path() is None:
            raise ConfigError("train.objective=cd distils a flow teacher: set consistency.teacher (or train.init) "
                              "to its checkpoint")
        cc, init = self.cfg.consistency, self.cfg.train.init
        if self.cfg.lora.rank > 0 and cc.teacher and cc.teacher != init:
            raise ConfigError(f"train.objective=cd with a LoRA distils the adapter's own base: consistency.teacher "
                              f"({cc.teacher}) must be train.init ({init}) or unset")

    def build_nets(self) -> dict:
        if self.cfg.lora.rank > 0:  # the base under the adapter is the teacher
            from flowmatch.distill.adapters import adapter_disabled

            return {**super().build_nets(), "teacher": adapter_disabled(self.comp.model)}
        teacher = frozen_teacher(self.teacher_path(), self.cfg, "consistency.teacher", self.device)
        return {**super().build_nets(), "teacher": teacher}

    def intervals(self) -> int:
        return self.cfg.consistency.num_steps

    def draw(self, generator: torch.Generator) -> Batch:
        batch = super().draw(generator)
        self.teacher_evals += self.batch_size * self.solver.stages  # counted here: the loss stays pure
        return batch

    def next_point(self, nets, x, x0, x1, t, t_next):
        return self.solver.step(nets["teacher"], x, t, t_next)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "teacher_evals": self.teacher_evals}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.teacher_evals = int(state.get("teacher_evals", 0))


class ConsistencyTraining(_Consistency):
    """CT: no teacher; the next point is the same pair's interpolant at ``t_next``, on improved CT's
    curriculum of grids."""

    name = "ct"

    def intervals(self) -> int:
        cc = self.cfg.consistency
        return ct_intervals(self.updates, self.cfg.train.steps, cc.ct_s0, cc.ct_s1)

    def next_point(self, nets, x, x0, x1, t, t_next):
        return expand_like(1 - t_next, x0) * x0 + expand_like(t_next, x1) * x1


OBJECTIVES.update({ConsistencyDistillation.name: ConsistencyDistillation,
                   ConsistencyTraining.name: ConsistencyTraining})
