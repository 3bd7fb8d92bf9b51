"""Few-step samplers that are not classic Runge-Kutta methods: one velocity evaluation per step,
with state carried across steps (kept by the :meth:`Solver.init_state` / :meth:`Solver.advance` hooks of
the base class's one integrate loop).

- ``ab2``: the two-step Adams-Bashforth method on a variable grid. After a first Euler step, each
  step extrapolates the velocity linearly from the last two evaluations,
  ``x_{n+1} = x_n + h_n [(1 + r/2) v_n - (r/2) v_{n-1}]`` with ``r = h_n / h_{n-1}``, so it
  corrects for the change of velocity along the path (its curvature) at no extra NFE.
  Second order, ``nfe = num_steps``.
- ``renoise``: endpoint prediction re-noised with the *original* noise. On the rectified path
  ``x_t = t x1 + (1 - t) x0`` the model's endpoint prediction at ``(x, t)`` is
  ``x1_hat = x + (1 - t) v(x, t)``; the step goes to ``x_{t'} = t' x1_hat + (1 - t') x0`` with the
  ``x0`` the solve started from, in the way multistep consistency sampling re-noises an endpoint
  (Song et al. 2023, alg. 1), but deterministic. One step equals one Euler step. It is exact on a
  straight flow (where ``x0_hat = x0``) and *biased* on a curved one: as the steps shrink it tends to
  ``x = x0 + t v(x, t)``, not to the ODE solution, so its ``order`` is 0 (not a consistent ODE
  method). It is in the benchmark because that bias is what reflow removes.
- ``consistency``: multistep consistency sampling (Song et al. 2023, alg. 1, in our time convention:
  their noise level sigma falls as our t rises). Each step predicts the endpoint
  ``x1_hat = x + (1 - t) v(x, t)`` (the consistency function of a model in the x1-prediction form,
  :mod:`flowmatch.distill.consistency`) and re-noises it with *fresh* noise ``z`` to the next grid
  time, ``x_{t'} = t' x1_hat + (1 - t') z``; the grid's interior points are the re-noising times
  (``[0, t1, 1]``: two steps re-noised at ``t1``). ``z`` is drawn like the interpolant's ``x0``: from
  the task's source (``solver.for_source(source)``; the bench and the few-step table pass it: for
  8 Gaussians -> moons a draw of the 8 Gaussians, not N(0, I)), N(0, I) when none is given. One step
  equals one Euler step. The noise is drawn
  from a generator seeded ``seed`` at the start of each solve, so a solve is deterministic. The default
  seed is a large constant, not 0: noise from the stream that drew the source (benches and tests draw
  it from small seeds) would re-noise with ``z = x0``, which is the ``renoise`` solver (at two uniform
  steps, exactly Euler), not consistency sampling. For a consistency model, not an ODE method: ``order`` 0.
"""

from __future__ import annotations

import torch

from flowmatch.solvers.base import Field, Solver
from flowmatch.utils import expand_like

__all__ = ["AdamsBashforth2", "Renoise", "ConsistencySampler"]


class _OneEvalPerStep(Solver):
    """One velocity evaluation per step, with state carried from step to step: the base class runs
    the loop, a subclass's ``advance`` makes one step (``state`` starts as ``{"x0": x0}``)."""

    stages = 1

    def step(self, v: Field, x, t, t_next):
        raise NotImplementedError(f"{self.name} carries state across steps; use integrate()")

    def init_state(self, x0: torch.Tensor) -> dict:
        return {"x0": x0}


class AdamsBashforth2(_OneEvalPerStep):
    name, order = "ab2", 2

    def advance(self, v, x, t, t_next, state):
        vt = v(x, t)
        h = t_next - t
        v_prev, h_prev = state.get("v"), state.get("h")
        if v_prev is None:
            x = x + expand_like(h, x) * vt
        else:
            r = expand_like(h / h_prev, x)
            x = x + expand_like(h, x) * ((1 + 0.5 * r) * vt - 0.5 * r * v_prev)
        state["v"], state["h"] = vt, h
        return x


class Renoise(_OneEvalPerStep):
    name, order = "renoise", 0

    def advance(self, v, x, t, t_next, state):
        vt = v(x, t)
        x1_hat = x + expand_like(1 - t, x) * vt
        tn = expand_like(t_next, x)
        return tn * x1_hat + (1 - tn) * state["x0"]


# the consistency sampler's default noise seed: far from the small seeds sources are drawn with
CONSISTENCY_NOISE_SEED = 0x5EED_C0DE


class ConsistencySampler(_OneEvalPerStep):
    name, order = "consistency", 0

    def __init__(self, seed: int = CONSISTENCY_NOISE_SEED, source=None):
        self.seed = int(seed)
        # the re-noising draws z like the interpolant's x0: from the task's source (8 Gaussians for
        # 8gaussians -> moons), N(0, I) when none is given
        self.source = source

    def for_source(self, source) -> "ConsistencySampler":
        return ConsistencySampler(self.seed, source)

    def init_state(self, x0: torch.Tensor) -> dict:
        return {"gen": torch.Generator(x0.device).manual_seed(self.seed)}

    def advance(self, v, x, t, t_next, state):
        x1_hat = x + expand_like(1 - t, x) * v(x, t)
        # at t' = 1 the noise's weight is 0: the step returns x1_hat exactly (no host check)
        if self.source is None:
            z = torch.randn(x.shape, generator=state["gen"], device=x.device, dtype=x.dtype)
        else:
            z = self.source.sample(x.shape[0], generator=state["gen"], device=x.device).to(x.dtype)
        tn = expand_like(t_next, x)
        return tn * x1_hat + (1 - tn) * z
