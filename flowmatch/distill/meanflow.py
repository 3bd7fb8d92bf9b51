"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling") as an objective.

Time convention. Ours: ``t = 0`` noise, ``t = 1`` data, velocities point towards the data. MeanFlow's
paper puts data at ``t = 0`` and noise at ``t = 1`` and samples backwards: ``z_r = z_t - (t - r)
u(z_t, r, t)`` for ``r < t`` (its eq. 5 / 12), with the average velocity ``u(z_t, r, t) = 1 / (t - r)
int_r^t v dtau`` (eq. 3). With ``t_ours = 1 - t_theirs`` a jump of theirs from ``t'`` down to ``r'`` is
ours from ``t = 1 - t'`` up to ``s = 1 - r'``; velocities change sign. Our model takes the start ``t``
and the step ``h = s - t >= 0`` (the paper's best input pair, ``(t, t - r)``, Table 1c) and predicts

    u(x_t, t, h) = (1 / h) int_t^{t + h} v(x_tau, tau) dtau,    x_{t + h} = x_t + h u(x_t, t, h),   (1)

the negative of the paper's ``u`` (``u_ours(x, 1 - t', t' - r') = -u_theirs(x, r', t')``); ``h = 0`` is the
flow's velocity ``v``.

The identity. Multiply (1) by ``h`` and differentiate in the start ``t`` with the end ``s = t + h``
fixed, along the flow (``dx_t / dt = v``): ``d/dt [(s - t) u] = -v(x_t, t)``, i.e. ``-u + h du/dt = -v``:

    u(x_t, t, h) = v(x_t, t) + h * du/dt,    du/dt = (d_x u) v + d_t u - d_h u,                       (2)

the paper's eq. 6 (``u = v - (t - r) du/dt``) in our time: ``du/dt`` is the Jacobian-vector product of
``(x, t, h) -> u`` with the tangent ``(v, 1, -1)``, the paper's ``(v, 0, 1)`` on ``(z, r, t)`` written
for our inputs (``d_t`` and ``d_h`` at fixed ``s``: ``dt = 1``, ``dh = -1``). It is computed in one
forward-mode pass by ``torch.func.jvp`` (:func:`meanflow_target`).

Objective (eq. 9 / 10). Draw ``(x0, x1)`` from the run's coupling, times ``(t, s)``, the path's ``x_t``
and its conditional velocity ``u_t`` (``x1 - x0`` on the linear path); the target is
``u_tgt = sg[u_t + h du/dt]`` with ``du/dt`` of the model at ``(x_t, t, h)`` along ``(u_t, 1, -1)``
(with ``meanflow.velocity: teacher``, a frozen flow teacher's ``v(x_t, t)`` in place of ``u_t``, in the
target and the tangent: :class:`~flowmatch.distill.anystep.AnyStepObjective`), and the loss the
adaptive weight of sec. 4.3: ``e / sg(e + eps)^p`` with ``e = ||u_theta - u_tgt||^2`` (the
squared norm over dimensions, the paper's) and ``p = meanflow.power`` (1: the paper's best), averaged over
the batch. Times (sec. 4.3, Table 1a/1b): two logit-normal draws, the smaller ``t`` and the larger ``s``;
a fraction ``1 - meanflow.jump_fraction`` (75%, the paper's) of the rows gets ``s = t`` (``h = 0``: the
flow-matching rows). The paper's logit-normal has mean -0.4 in its time, +0.4 in ours.

Data parallelism. ``torch.func.jvp`` cannot run through a DistributedDataParallel wrapper (its forward
copies into a captured tensor in place, which the functional transform refuses: a ``RuntimeError``
with torch 2.13, with or without autograd). The target is under stop-gradient, so the JVP runs on the unwrapped student
without autograd, and the gradient-carrying forward ``u_theta(x_t, t, h)`` runs through the wrapper the
step hands the loss: one extra forward a step, and the same gradients in one process and under DDP.
The loss is not compiled (``compilable = False``).
"""

from __future__ import annotations

from typing import Optional

import torch

from flowmatch.distill.anystep import AnyStepObjective
from flowmatch.training import OBJECTIVES, Batch
from flowmatch.types import LossOutput
from flowmatch.utils import expand_like

__all__ = ["meanflow_target", "meanflow_times", "adaptive_weight", "MeanFlow"]


def meanflow_target(u, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v + h du/dt`` (eq. 2 of the module docstring) for the average-velocity callable ``u(x, t, h)``
    (``[B, *D]``, ``[B]``, ``[B]`` -> ``[B, *D]``) at ``x`` ``[B, *D]``, ``t`` and ``h`` ``[B]``, with the
    velocity ``v`` ``[B, *D]`` as the tangent of ``x``: ``du/dt`` is ``torch.func.jvp`` of ``u`` along
    ``(v, 1, -1)``. Differentiable only through ``v`` and ``h`` (call it under ``torch.no_grad`` for the
    stop-gradient target)."""
    ones = torch.ones_like(t)
    _, dudt = torch.func.jvp(u, (x, t, h), (v.to(x.dtype), ones, -ones))
    return v + expand_like(h, v) * dudt.to(v.dtype)


def meanflow_times(n: int, *, jump_fraction: float, logit_mean: float, logit_std: float,
                   generator: Optional[torch.Generator] = None, device=None,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, h)`` ``[n]`` each: two draws of ``sigmoid(N(logit_mean, logit_std^2))`` (one ``randn`` of
    ``[2, n]``), ``t`` the smaller and ``t + h`` the larger; then, one ``rand`` of ``[n]``, the rows not
    under ``jump_fraction`` get ``h = 0``."""
    z = torch.randn(2, n, generator=generator, device=device, dtype=dtype)
    a = torch.sigmoid(logit_mean + logit_std * z)
    t, s = a.min(dim=0).values, a.max(dim=0).values
    jump = torch.rand(n, generator=generator, device=device, dtype=dtype) < jump_fraction
    return t, torch.where(jump, s - t, torch.zeros_like(t))


def adaptive_weight(e: torch.Tensor, power: float, eps: float) -> torch.Tensor:
    """``e / sg(e + eps)^power`` for per-sample squared errors ``e`` ``[B]`` (Geng et al. 2025, sec. 4.3)."""
    return e / (e.detach() + eps).pow(power)


class MeanFlow(AnyStepObjective):
    """MeanFlow's objective (see the module docstring) on the run's coupling and path; the model needs
    ``model.step_input: true``. Sample with :func:`~flowmatch.distill.anystep.sample_anystep` in 1 or 2
    steps (or any number). A batch is drawn as: the coupling's pairs, the times (:func:`meanflow_times`),
    the path noise."""

    name = "meanflow"
    section = "meanflow"
    compilable = False  # torch.func.jvp inside the loss

    def __init__(self, cfg, comp):
        super().__init__(cfg, comp)
        mc = cfg.meanflow
        self.jump_fraction, self.logit_mean, self.logit_std = mc.jump_fraction, mc.logit_mean, mc.logit_std
        self.power, self.eps = mc.power, mc.eps
        self.batch_size = cfg.train.batch_size

    def draw(self, generator: torch.Generator) -> Batch:
        s = self.comp.coupling.sample(self.batch_size, generator=generator)
        t, h = meanflow_times(self.batch_size, jump_fraction=self.jump_fraction, logit_mean=self.logit_mean,
                              logit_std=self.logit_std, generator=generator, device=self.device, dtype=s.x0.dtype)
        ps = self.comp.path.sample(s.x0, s.x1, t, generator=generator)
        self.count_teacher(self.batch_size)  # every row's teacher velocity (meanflow.velocity: teacher)
        return Batch(t=ps.t, xt=ps.xt, ut=ps.ut, x0=s.x0, x1=s.x1, extra={"h": h})

    def loss(self, nets, batch: Batch, player: str = "student") -> LossOutput:
        h = batch.extra["h"]
        # the JVP runs on the unwrapped student (comp.model; a DDP wrapper is not functional), without autograd
        raw = self.comp.model
        with torch.no_grad():
            v = self.velocity(nets, batch)
            target = meanflow_target(lambda x, t, hh: raw(x, t, h=hh), batch.xt, batch.t, h, v)
        pred = nets.student(batch.xt, batch.t, h=h)
        pred = pred.to(torch.promote_types(pred.dtype, target.dtype))
        e = (pred - target).reshape(pred.shape[0], -1).pow(2).sum(dim=1)
        weighted = adaptive_weight(e, self.power, self.eps)
        # per sample: the squared error e (the weighted loss is ~1 wherever e >> eps)
        return LossOutput(weighted.mean(), e.detach(), batch.t, extra={"meanflow/sq_error": e.detach().mean()})


OBJECTIVES[MeanFlow.name] = MeanFlow
