"""The one rule every metric follows on non-finite input: it returns NaN and warns.

A metric given a NaN or an infinite value (in a sample, a feature set, a reference cloud or a
Gaussian's parameters) returns NaN (a tuple of NaN, a result whose numbers are NaN) and issues a
:class:`NonFiniteInputWarning` naming the metric, the input and how many of its rows are non-finite.
It does not raise: metrics score the samples of models and solvers, and a sampler that diverges
(a few-step solver on a curved field, a model that blew up in training) is a result to record,
not an error that should stop a sweep; the bench writes such a row with NaN scores and leaves it
off the Pareto front. NaN cannot pass for a score (it compares false with every number), where the
value computed anyway could: POT's W2 on a NaN cloud is clamped to 0.0, a perfect score.

Each public metric calls :func:`finite_inputs` once, on the inputs it was given, before any work.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["NonFiniteInputWarning", "finite_inputs", "non_finite_rows"]


class NonFiniteInputWarning(RuntimeWarning):
    """A metric was given non-finite input and returned NaN."""


def non_finite_rows(x) -> tuple[int, int, str]:
    """``(bad, total, unit)``: how many rows of ``x`` (``[B, *D]``) hold a NaN or an inf, out of ``B``;
    for a vector or a scalar (``[F]``, ``[]``, a Python number) the values are counted instead."""
    t = torch.as_tensor(x).detach()
    if not (t.is_floating_point() or t.is_complex()):
        return 0, (t.shape[0] if t.ndim >= 2 else t.numel()), "rows" if t.ndim >= 2 else "values"
    bad = ~torch.isfinite(t)
    if t.ndim >= 2:
        return int(bad.reshape(t.shape[0], -1).any(dim=1).sum()), t.shape[0], "rows"
    return int(bad.sum()), t.numel(), "values"


def finite_inputs(metric: str, stacklevel: int = 3, **inputs) -> bool:
    """True when every input is finite. Otherwise warns (:class:`NonFiniteInputWarning`, naming
    ``metric``, each non-finite input and its count of non-finite rows) and returns False: the
    caller then returns NaN without computing anything. ``stacklevel`` points the warning at the
    metric's caller (3: the caller of the function that calls this one)."""
    counts = {name: non_finite_rows(x) for name, x in inputs.items()}
    bad = [f"{b} of {n} {unit} of {name}" for name, (b, n, unit) in counts.items() if b]
    if not bad:
        return True
    warnings.warn(f"{metric}: non-finite input ({'; '.join(bad)} hold NaN or inf); returning NaN",
                  NonFiniteInputWarning, stacklevel=stacklevel)
    return False
