"""Exponential moving average of a model's weights (evaluation uses the EMA copy)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """``shadow <- decay * shadow + (1 - decay) * param`` after every optimiser step.

    The effective decay is warmed up as ``min(decay, (1 + n) / (10 + n))`` so early averages are
    not dominated by the random initialisation. Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module, *, foreach: bool = False) -> None:
        """One EMA step towards ``model``'s weights. ``foreach=True`` does the same arithmetic with one
        multi-tensor ``torch._foreach_lerp_`` (a few kernel launches on a GPU instead of one per
        tensor; the numbers are those of the per-tensor loop)."""
        d = self._next_decay()
        if foreach:
            ema_ps, ps = list(self.model.parameters()), [p.detach() for p in model.parameters()]
            if len(ema_ps) != len(ps):
                raise ValueError(f"EMA holds {len(ema_ps)} parameters, the model {len(ps)}")
            if ps:
                torch._foreach_lerp_(ema_ps, ps, 1 - d)
        else:
            for ema_p, p in zip(self.model.parameters(), model.parameters()):
                ema_p.lerp_(p.detach(), 1 - d)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def _next_decay(self) -> float:
        self.num_updates += 1
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update_flat(self, shadow: torch.Tensor, params: torch.Tensor, buffers: list) -> None:
        """:meth:`update` where the EMA's parameters are views into ``shadow`` and the model's into
        ``params`` (flat buffers in the same order): one ``lerp_``, the same numbers. ``buffers``
        lists the (EMA buffer, model buffer) pairs to copy."""
        shadow.lerp_(params, 1 - self._next_decay())
        for ema_b, b in buffers:
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
