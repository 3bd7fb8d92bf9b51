"""Shared fixtures: a tiny experiment config that trains in well under a second on a CPU."""

from __future__ import annotations

import pytest

from flowmatch.config import ExperimentConfig, apply_overrides

TINY_OVERRIDES = [
    "name=tiny",
    "data.source=gaussian",
    "data.target=8gaussians",
    "model.hidden=16",
    "model.depth=2",
    "model.time_dim=8",
    "train.steps=20",
    "train.batch_size=32",
    "train.warmup_steps=2",
    "train.ckpt_every=5",
    "train.log_every=5",
    "train.device=cpu",
    "train.lr=1e-2",
    "eval.n=64",
    "eval.solver=euler",
    "eval.nfe=4",
    "eval.plots=False",
    "tracking.mode=disabled",
]


def make_tiny_cfg(*extra: str) -> ExperimentConfig:
    """The tiny config with further ``section.key=value`` overrides applied."""
    return apply_overrides(ExperimentConfig(), TINY_OVERRIDES + list(extra))


@pytest.fixture
def tiny_cfg() -> ExperimentConfig:
    return make_tiny_cfg()


@pytest.fixture(scope="session")
def make_cfg():
    """Factory: ``make_cfg("train.steps=40", ...)`` -> the tiny config with those overrides."""
    return make_tiny_cfg


class ReplayLoss:
    """A loss function that evaluates the given ``(x0, x1, t)`` batches in turn (cyclically) instead of
    the drawn ones: trainers (or DDP ranks) can then be fed the same data in different micro-batches."""

    def __init__(self, batches):
        self.batches, self.calls = batches, 0

    def __call__(self, model, path, x0, x1, t, **kw):
        from flowmatch.training import cfm_loss

        b = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return cfm_loss(model, path, *b, **kw)
