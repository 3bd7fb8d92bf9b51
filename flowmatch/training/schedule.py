"""The learning-rate schedule of a training run (``train.warmup_steps``, ``train.lr_schedule``,
``train.lr_min_ratio``): the one place that decides the factor on ``train.lr`` at each step."""

from __future__ import annotations

import math
from typing import Callable

from flowmatch.utils import lookup

__all__ = ["LR_SCHEDULES", "lr_lambda"]

LR_SCHEDULES = ("constant", "cosine")


def lr_lambda(warmup: int, total: int, schedule: str = "constant", min_ratio: float = 0.0) -> Callable[[int], float]:
    """The factor on the learning rate at optimiser step ``s`` (counted from 0), for ``LambdaLR``:
    a linear warm-up ``(s + 1) / warmup`` over ``warmup`` steps, then ``1`` (``constant``) or a
    cosine decay from 1 to ``min_ratio`` at step ``total`` (``cosine``). An unknown ``schedule``
    lists the valid ones."""
    lookup(dict.fromkeys(LR_SCHEDULES), schedule, "lr schedule")

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if schedule == "cosine":
            p = min(1.0, (s - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        return 1.0

    return f
