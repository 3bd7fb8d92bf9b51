"""Shortcut models (Frans et al. 2025, "One Step Diffusion via Shortcut Models") as an objective.

Time convention. Frans et al. already go forward from noise at ``t = 0`` to data at ``t = 1``
(``x_t = (1 - t) x_0 + t x_1``, their sec. 3), as we do: nothing changes sign. Their shortcut
``s(x_t, t, d)`` is the velocity whose Euler step of size ``d`` lands where the flow does,
``x_{t + d} = x_t + d s(x_t, t, d)``: the average velocity over ``[t, t + d]``, the function
:mod:`flowmatch.distill.anystep` samples with. Our model takes ``d`` as its step input ``h``
(``model.step_input``), embedded like ``t``; ``d -> 0`` is the plain flow model (``h = None`` is ``h = 0``).
Frans et al. embed ``log2(1 / d)`` instead; embedding ``d`` itself keeps one model input for the
shortcut and the MeanFlow families, and a step-input model initialised from a flow teacher is that
teacher at every ``d`` (the step projection starts at zero).

Objective (their eq. 5 / 6). With ``K = log2(base_steps)`` and the smallest step ``d_min = 1 / base_steps``:

- a fraction ``shortcut.self_consistency`` of each batch (1/8, the paper's) draws ``k ~ U{0, ..., K - 1}``,
  ``d = 2^-k``, a start on ``d``'s grid ``t = m d`` with ``m ~ U{0, ..., 2^k - 1}`` (so ``t + d <= 1``),
  and regresses the self-consistency target of two half steps of the target network ``s_tgt``

      s(x_t, t, d) ~ sg[(s_tgt(x_t, t, d/2) + s_tgt(x'_{t + d/2}, t + d/2, d/2)) / 2],
      x'_{t + d/2} = x_t + (d / 2) s_tgt(x_t, t, d/2);                                      (eq. 5)

- the rest draws ``t`` from the run's time sampler and regresses the flow-matching target at the
  smallest step, ``s(x_t, t, d_min) ~ u_t`` (eq. 6 with ``d = 0`` taken at ``d_min``, as the paper's code);
  with ``shortcut.velocity: teacher`` a frozen flow teacher's ``v(x_t, t)`` instead of ``u_t``
  (:class:`~flowmatch.distill.anystep.AnyStepObjective`).

``x_t`` and ``u_t`` come from the run's path and coupling. The distance is ``train.loss`` (``l2``: the
mean squared error over dimensions), averaged over the whole batch. The target network is an EMA of
the student with decay ``shortcut.ema`` (0: the student itself under stop-gradient).
"""

from __future__ import annotations

import math

import torch

from flowmatch.distill.anystep import AnyStepObjective
from flowmatch.training import OBJECTIVES, Batch
from flowmatch.training.objectives import frozen_copy, lerp_target
from flowmatch.training.losses import LOSSES
from flowmatch.types import LossOutput
from flowmatch.utils import expand_like, lookup

__all__ = ["shortcut_target", "Shortcut"]


def shortcut_target(s, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The self-consistency target of eq. 5 (see the module docstring): the mean of two half steps of
    ``s(x, t, h)`` (``[B, *D]``, ``[B]``, ``[B]`` -> ``[B, *D]``) from ``x`` ``[B, *D]`` at ``t`` ``[B]``
    with step ``d`` ``[B]``. Differentiable (call it under ``torch.no_grad`` for the stop-gradient)."""
    half = d / 2
    v1 = s(x, t, half)
    v2 = s(x + expand_like(half, x) * v1.to(x.dtype), t + half, half)
    return (v1 + v2) / 2


class Shortcut(AnyStepObjective):
    """Shortcut models' objective (see the module docstring); the model needs ``model.step_input: true``.
    Sample with :func:`~flowmatch.distill.anystep.sample_anystep` (``family="shortcut"``) at any power
    of two of steps up to ``shortcut.base_steps``. A batch is drawn as: the coupling's pairs; for the
    self-consistency rows (the first ``round(B * self_consistency)``) the levels ``k`` and the grid
    positions; for the others the times; the path noise."""

    name = "shortcut"
    section = "shortcut"

    def __init__(self, cfg, comp):
        super().__init__(cfg, comp)
        sc = cfg.shortcut
        self.ema, self.base_steps = float(sc.ema), int(sc.base_steps)
        self.batch_size = cfg.train.batch_size
        self.n_sc = int(round(self.batch_size * sc.self_consistency))
        self.distance = lookup(LOSSES, cfg.train.loss, "loss")

    def build_nets(self) -> dict:
        nets = super().build_nets()  # the teacher, with shortcut.velocity: teacher
        if self.ema == 0:
            return nets
        self.target = frozen_copy(self.comp.model)
        return {**nets, "target": self.target}

    @property
    def saved_nets(self) -> tuple:
        return ("target",) if self.ema > 0 else ()

    def draw(self, generator: torch.Generator) -> Batch:
        s = self.comp.coupling.sample(self.batch_size, generator=generator)
        n, dev, dtype = self.n_sc, self.device, s.x0.dtype
        levels = int(math.log2(self.base_steps))
        k = torch.randint(0, levels, (n,), generator=generator, device=dev)
        d_sc = torch.pow(2.0, -k.to(dtype))
        m = torch.floor(torch.rand(n, generator=generator, device=dev, dtype=dtype) / d_sc)
        t_sc = m * d_sc  # d's grid, exact in binary floating point
        t_fm = self.comp.time_sampler.sample(self.batch_size - n, generator=generator, device=dev, dtype=dtype)
        t = torch.cat([t_sc, t_fm])
        d = torch.cat([d_sc, torch.full_like(t_fm, 1.0 / self.base_steps)])
        ps = self.comp.path.sample(s.x0, s.x1, t, generator=generator)
        self.count_teacher(self.batch_size - n)  # the flow rows' teacher velocities (shortcut.velocity: teacher)
        return Batch(t=ps.t, xt=ps.xt, ut=ps.ut, x0=s.x0, x1=s.x1, extra={"d": d})

    def loss(self, nets, batch: Batch, player: str = "student") -> LossOutput:
        n, d = self.n_sc, batch.extra["d"]
        # the target network, or the unwrapped student (comp.model) under stop-gradient
        net = nets["target"] if self.ema > 0 else self.comp.model
        with torch.no_grad():
            sc = shortcut_target(lambda x, t, h: net(x, t, h=h), batch.xt[:n], batch.t[:n], d[:n])
            target = torch.cat([sc.to(batch.ut.dtype), self.velocity(nets, batch, slice(n, None))])
        pred = nets.student(batch.xt, batch.t, h=d)
        pred = pred.to(torch.promote_types(pred.dtype, target.dtype))
        per = self.distance((pred - target).reshape(pred.shape[0], -1))
        extra = {"shortcut/self_consistency": per[:n].mean().detach()} if n > 0 else None
        return LossOutput(per.mean(), per.detach(), batch.t, extra=extra)

    def after_update(self, nets) -> None:
        if self.ema > 0:  # target <- ema target + (1 - ema) student
            lerp_target(self.target, self.comp.model, self.ema)


OBJECTIVES[Shortcut.name] = Shortcut
