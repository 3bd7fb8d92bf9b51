"""Conditional flow-matching losses.

``L(theta) = E_{t, (x0, x1)} d(v_theta(x_t, t), u_t)`` (Lipman et al. 2023, eq. 9; Liu et al. 2022,
eq. 1) with ``d`` the mean squared error over dimensions (``l2``) or the pseudo-Huber distance
``sqrt(||e||^2 + c^2) - c`` with ``c = 0.00054 sqrt(D)`` (Song & Dhariwal 2023; used for reflow by
Lee et al. 2024).

A class-conditional model is given its labels as ``cond`` (``[B]`` long; the model's null class marks
a dropped label for classifier-free guidance). Under mixed precision the model's output is cast up
before the distance, so the loss is always reduced in (at least) fp32.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Optional

import torch

from flowmatch.paths import AffinePath
from flowmatch.types import LossOutput
from flowmatch.utils import lookup

__all__ = ["cfm_loss", "regression_loss", "LOSSES", "t_bin_sums"]


def _l2(err: torch.Tensor) -> torch.Tensor:
    return err.pow(2).mean(dim=1)


def _pseudo_huber(err: torch.Tensor) -> torch.Tensor:
    c = 0.00054 * math.sqrt(err.shape[1])
    return torch.sqrt(err.pow(2).sum(dim=1) + c * c) - c


LOSSES = {"l2": _l2, "pseudo_huber": _pseudo_huber}


def regression_loss(net, terms, distance) -> LossOutput:
    """``sum_k w_k mean_i d(v(xt_ki, t_ki, cond_ki), ut_ki)`` over ``terms`` (each with ``xt``
    ``[B, *D]``, ``t`` ``[B]``, ``ut`` ``[B, *D]``, ``cond`` ``[B]`` or ``None``, ``weight``): the one copy
    of the flow-matching loss (:func:`cfm_loss` and the velocity-regression objectives of
    :mod:`flowmatch.training.objectives` call it). One term: its mean, with weight 1 whatever its
    ``weight``. ``per_sample`` and ``t`` concatenate the terms'. The model is called ``net(xt, t)``
    without labels, ``net(xt, t, cond)`` with them."""
    per = []
    for b in terms:
        v = net(b.xt, b.t) if b.cond is None else net(b.xt, b.t, b.cond)
        # a bf16 output (autocast) is compared with the fp32 target in fp32: the reduction stays exact
        v = v.to(torch.promote_types(v.dtype, b.ut.dtype))
        per.append(distance((v - b.ut).reshape(v.shape[0], -1)))
    if len(per) == 1:
        return LossOutput(loss=per[0].mean(), per_sample=per[0], t=terms[0].t)
    loss = sum(b.weight * p.mean() for b, p in zip(terms, per))
    return LossOutput(loss=loss, per_sample=torch.cat(per), t=torch.cat([b.t for b in terms]))


def cfm_loss(model, path: AffinePath, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, *,
             generator: Optional[torch.Generator] = None, loss: str = "l2",
             cond: Optional[torch.Tensor] = None) -> LossOutput:
    """Flow-matching loss of ``model`` on pairs ``(x0, x1)`` (``[B, *D]``) at times ``t`` (``[B]``):
    the path sample (its noise from ``generator``), then :func:`regression_loss`.

    ``per_sample`` (``[B]``) is the distance for each row, so losses can be binned by ``t``.
    ``cond`` (``[B]`` long labels) is passed to the model as ``model(xt, t, cond)``; without it the
    model is called ``model(xt, t)``.
    """
    fn = lookup(LOSSES, loss, "loss")
    ps = path.sample(x0, x1, t, generator=generator)
    return regression_loss(model, [SimpleNamespace(xt=ps.xt, t=ps.t, ut=ps.ut, cond=cond, weight=1.0)], fn)


def t_bin_sums(per_sample: torch.Tensor, t: torch.Tensor, num_bins: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of ``per_sample`` in ``num_bins`` equal bins of ``t`` on [0, 1] (each ``[num_bins]``,
    float64). Counts are an ``index_add_`` of ones rather than a ``bincount``, which reads the maximum
    index to the host on CUDA: no host read, so the fast step can bin inside its compiled loss."""
    idx = (t.detach() * num_bins).long().clamp_(0, num_bins - 1)
    sums = torch.zeros(num_bins, dtype=torch.float64, device=t.device).index_add_(0, idx, per_sample.detach().double())
    counts = torch.zeros(num_bins, dtype=torch.float64, device=t.device).index_add_(
        0, idx, torch.ones(idx.shape, dtype=torch.float64, device=t.device))
    return sums, counts
