"""Any-step sampling: one network of average velocities for every number of steps.

The any-step objectives (:mod:`flowmatch.distill.shortcut`, :mod:`flowmatch.distill.meanflow`) train
the same function, a model ``u(x, t, h)`` with a step input (``model.step_input``): the average
velocity over the jump from ``t`` to ``t + h`` along the flow (``t = 0`` noise, ``t = 1`` data),

    u(x_t, t, h) = (1 / h) int_t^{t + h} v(x_tau, tau) dtau,      so      x_{t + h} = x_t + h u(x_t, t, h),

with ``u(x, t, 0) = v(x, t)``, the flow's velocity. Sampling in ``steps`` jumps on the uniform grid
``t_i = i / steps`` is then ``x_{t_{i+1}} = x_{t_i} + h u(x_{t_i}, t_i, h)`` with ``h = 1 / steps``
(Frans et al. 2025, Algorithm 2, where ``d = h``; Geng et al. 2025, eq. 12 in our time), one model
evaluation a step: the ``anystep`` solver (:class:`~flowmatch.solvers.anystep.AnyStep`), which the bench
uses too. A shortcut model is trained at ``h`` a power of two only (``family="shortcut"``
refuses other step counts); a MeanFlow model at every ``h``.

Both objectives regress the flow's velocity ``v`` somewhere: shortcut models at their smallest step,
MeanFlow at ``h = 0`` and inside its target ``v + h du/dt``. The papers take the path's conditional
velocity (``x1 - x0`` on the linear path), whose mean given ``x_t`` is ``v`` but whose spread around it
is the data's; where a flow teacher exists, ``<section>.velocity: teacher`` takes that teacher's
``v(x_t, t)`` at the same ``x_t`` instead (:class:`AnyStepObjective`): the same fixed point, without the
spread, at one teacher evaluation a row. With MeanFlow this is the Eulerian form of flow-map
self-distillation (Boffi et al. 2025, "How to build a consistency model: learning flow maps via
self-distillation"): the network learns the teacher's flow map, not the data's.
"""

from __future__ import annotations

from typing import Optional

import torch

from flowmatch.config import check_int
from flowmatch.errors import ConfigError
from flowmatch.solvers import get_solver, time_grid
from flowmatch.training import Batch, Objective
from flowmatch.training.objectives import frozen_teacher, teacher_checkpoint
from flowmatch.types import Trajectory

__all__ = ["ANYSTEP_FAMILIES", "sample_anystep", "check_anystep_config", "AnyStepObjective"]

ANYSTEP_FAMILIES = ("shortcut", "meanflow")


def sample_anystep(model, x0: torch.Tensor, steps: int, *, family: str = "meanflow", cond=None,
                   max_steps: Optional[int] = None, return_trajectory: bool = False) -> Trajectory:
    """``steps`` jumps of the average-velocity model ``model(x, t, cond, h=h)`` from ``x0`` ``[B, *D]``
    at ``t = 0`` to ``t = 1`` (see the module docstring): a :class:`~flowmatch.types.Trajectory` with
    ``nfe = steps``. ``family``: ``shortcut`` (``steps`` a power of two, at most ``max_steps`` where
    given: the steps it was trained at) or ``meanflow`` (any ``steps >= 1``). ``cond``: labels for a
    class-conditional model, or ``None``."""
    if family not in ANYSTEP_FAMILIES:
        raise ConfigError(f"family = {family!r}: must be one of {', '.join(ANYSTEP_FAMILIES)}")
    steps = check_int("steps", steps, 1)
    if family == "shortcut" and steps & (steps - 1):
        raise ConfigError(f"steps = {steps}: a shortcut model samples with a power of two of steps (d = 1 / steps)")
    if max_steps is not None and steps > max_steps:
        raise ConfigError(f"steps = {steps}: the model was trained for at most {max_steps} steps")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 holds non-finite values")
    field = model if cond is None else _Conditioned(model, cond)
    # the one implementation of the jump: the anystep solver (it refuses a model without a step input)
    return get_solver("anystep").integrate(field, x0, time_grid(steps, device=x0.device, dtype=x0.dtype),
                                           return_trajectory=return_trajectory)


class _Conditioned:
    """``model(x, t, cond, h=h)`` as a field ``u(x, t, h=h)`` of the same step input."""

    def __init__(self, model, cond):
        self.model, self.cond = model, cond
        self.step_input = getattr(model, "step_input", False)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, h: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(x, t, self.cond, h=h)


def check_anystep_config(cfg, objective: str) -> None:
    """Refuse, with a one-line :class:`~flowmatch.errors.ConfigError`, a config whose model the any-step
    objective ``objective`` cannot train: one without the step input, a class-conditional one."""
    if cfg.model.class_cond:
        raise ConfigError(f"train.objective={objective} does not take class labels yet; set model.class_cond=false")
    if not cfg.model.step_input:
        raise ConfigError(f"train.objective={objective} trains a model with a step input: set model.step_input=true")


class AnyStepObjective(Objective):
    """What the any-step objectives share: the model check (:func:`check_anystep_config`) and the
    velocity their flow rows regress, ``<section>.velocity`` (see the module docstring): ``data``, the
    batch's ``ut``; ``teacher``, the frozen flow checkpoint ``<section>.teacher`` (default: ``train.init``'s)
    at the batch's ``(x_t, t)``, its evaluations counted in ``teacher_evals`` (the few-step table's cost).
    Subclasses call :meth:`count_teacher` in ``draw`` (the loss stays pure) and :meth:`velocity` in
    ``loss``; their state is the coupling's and ``teacher_evals``."""

    def __init__(self, cfg, comp):
        super().__init__(cfg, comp)
        self.sec = getattr(cfg, self.section)
        self.teacher_evals = 0

    @property
    def uses_teacher(self) -> bool:
        return self.sec.velocity == "teacher"

    def teacher_path(self) -> Optional[str]:
        return teacher_checkpoint(self.cfg, self.section)

    def check(self) -> None:
        check_anystep_config(self.cfg, self.name)
        if self.uses_teacher and self.teacher_path() is None:
            raise ConfigError(f"{self.section}.velocity=teacher regresses a flow teacher's velocity: set "
                              f"{self.section}.teacher (or train.init) to its checkpoint")

    def build_nets(self) -> dict:
        if not self.uses_teacher:
            return {}
        return {"teacher": frozen_teacher(self.teacher_path(), self.cfg, f"{self.section}.teacher", self.device)}

    def count_teacher(self, rows: int) -> None:
        if self.uses_teacher:
            self.teacher_evals += rows

    def velocity(self, nets, batch: Batch, rows: slice = slice(None)) -> torch.Tensor:
        """The flow velocity at the batch's ``(x_t, t)`` for ``rows`` (call it under ``torch.no_grad``)."""
        if not self.uses_teacher:
            return batch.ut[rows]
        return nets["teacher"](batch.xt[rows], batch.t[rows]).to(batch.ut.dtype)

    def state_dict(self) -> dict:
        return {"coupling": self.comp.coupling.state_dict(), "teacher_evals": self.teacher_evals}

    def load_state_dict(self, state: dict) -> None:
        self.comp.coupling.load_state_dict(state.get("coupling", {}))
        self.teacher_evals = int(state.get("teacher_evals", 0))
