"""Classic explicit Runge-Kutta steps. ``h = t_next - t`` is ``[B]``, broadcast over ``[B, *D]`` by
:func:`~flowmatch.utils.expand_like`.

NFE per step: Euler 1, midpoint 2, Heun 2, RK4 4. Heun here is the full trapezoidal
predictor-corrector on every step, the last one included (no final Euler step), so Heun with N
steps costs exactly 2N evaluations.
"""

from __future__ import annotations

from flowmatch.solvers.base import Field, Solver
from flowmatch.utils import expand_like

__all__ = ["Euler", "Midpoint", "Heun", "RK4"]


class Euler(Solver):
    name, order, stages = "euler", 1, 1

    def step(self, v: Field, x, t, t_next):
        return x + expand_like(t_next - t, x) * v(x, t)


class Midpoint(Solver):
    name, order, stages = "midpoint", 2, 2

    def step(self, v: Field, x, t, t_next):
        h = t_next - t
        hb = expand_like(h, x)
        k1 = v(x, t)
        return x + hb * v(x + 0.5 * hb * k1, t + 0.5 * h)


class Heun(Solver):
    name, order, stages = "heun", 2, 2

    def step(self, v: Field, x, t, t_next):
        hb = expand_like(t_next - t, x)
        k1 = v(x, t)
        k2 = v(x + hb * k1, t_next)
        return x + 0.5 * hb * (k1 + k2)


class RK4(Solver):
    name, order, stages = "rk4", 4, 4

    def step(self, v: Field, x, t, t_next):
        h = t_next - t
        hb = expand_like(h, x)
        k1 = v(x, t)
        k2 = v(x + 0.5 * hb * k1, t + 0.5 * h)
        k3 = v(x + 0.5 * hb * k2, t + 0.5 * h)
        k4 = v(x + hb * k3, t_next)
        return x + hb / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
