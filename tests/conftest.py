"""Shared fixtures: a tiny experiment config that trains in well under a second on a CPU."""

from __future__ import annotations

import getpass
import os
import tempfile

import pytest
import torch

from flowmatch.config import ExperimentConfig, apply_overrides

# torch.compile's on-disk cache (inductor) is shared by every ATEN_CPU_CAPABILITY, but what it stores
# is not: a graph compiled under one vector width and reloaded under another gave wrong numbers (a
# captured Euler solve off by 0.2) and crashed the process (measured with torch 2.13 on an AVX-512 host,
# ATEN_CPU_CAPABILITY=avx2 then =avx512). One cache directory per capability keeps the warm cache and
# makes `make test-portability` (the same tests under each capability) trustworthy. Subprocesses
# started by the tests inherit it. A cache directory chosen by the caller is left alone.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{torch.backends.cpu.get_cpu_capability().lower()}"))

# Tolerance for the fused MLP step against the plain loop (the same draws; another implementation:
# the backward written out, flat buffers, fused AdamW, one lerp for the EMA, so float32 sums are taken
# in another order and vector-width tails fall elsewhere). Measured over 30 steps of the tests' toy
# configs (independent, exact OT, sigma + logit-normal + tanh) under ATEN_CPU_CAPABILITY=default, avx2
# and avx512: largest relative loss difference 2.0e-7, largest EMA weight difference 2.1e-7 of the
# largest weight. 1e-5 leaves ~50x for other hosts and for growth with steps, and still catches a real
# difference: an EMA whose decay is scaled by 0.999 fails tests/test_fused_mlp.py (checked by hand).
FUSED_RTOL = 1e-5

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


def replay_objective(batches):
    """An objective (a ``(cfg, comp) -> Objective`` factory for ``build_trainer(..., objective=)``): flow
    matching on the given ``(x0, x1, t)`` batches in turn (cyclically) instead of drawn ones, so trainers
    (or DDP ranks) can be fed the same data in different micro-batches. ``Replay.calls`` counts draws."""
    from flowmatch.training import CFM, Batch

    class Replay(CFM):
        calls = 0

        def draw(self, generator):
            x0, x1, t = batches[Replay.calls % len(batches)]
            Replay.calls += 1
            ps = self.comp.path.sample(x0, x1, t, generator=generator)
            return Batch(t=ps.t, xt=ps.xt, ut=ps.ut, x0=x0, x1=x1)

        def fused_reason(self):  # the tests that replay compare autograd steps
            return "a test's replayed batches"

    return Replay


def nan_objective(call: int, factor: float = float("nan")):
    """An objective: flow matching whose ``call``-th loss is multiplied by ``factor`` (it has no fused
    implementation, so the step computes every loss through it)."""
    from flowmatch.training import CFM
    from flowmatch.types import LossOutput

    class NanAt(CFM):
        calls = 0

        def loss(self, nets, batch, player="student"):
            out = super().loss(nets, batch, player)
            NanAt.calls += 1
            return LossOutput(out.loss * factor, out.per_sample, out.t) if NanAt.calls == call else out

        def fused_reason(self):
            return "a test's objective"

    return NanAt
