"""The noise floor of a sample-based score, drawn coupled to a model, and the ratio of two paired means.

A model's W2 against a reference of n points is compared with the noise floor: the W2 that i.i.d.
draws of the target itself (what a perfect model's samples are) score against the same reference.
Between independent draws both scatter by far more than they differ: at n = 5,000 the floor's W2 on
8gaussians moves by 0.05 a draw (17% of it), mostly from the draw's multinomial split over the modes,
which the reference does not share; the model's samples carry a split of their own. Over 10 draws
the ratio of the two means is then uncertain by 6-8%.

:class:`CoupledFloor` draws the floor through the model's own split instead. On an independent fit
draw it learns the distribution of the model's layout positions (``ToyDistribution.position``: the
angle around 8gaussians' circle of modes; the moon and the angle along it), and for each of the
model's samples it draws the target point at the same quantile (``ToyDistribution.at_quantiles``,
fresh Gaussian noise). The quantiles of the model's i.i.d. samples are i.i.d. uniform (up to the fit
draw's empirical CDF: with 500,000 fit points a quantile is off by at most about 0.002), so the floor
draw is an i.i.d. draw of the target, as the floor asks; but it has (nearly) the model's split and
ordering, so the paired difference between the model and its floor scatters 2.6-6 times less than
the unpaired one (moons 2.6, 8gaussians 6 times, one-step models at n = 5,000; README). What is left
is the model's own error: mode weights (a model whose modes are not equally likely pays for it, the
floor does not), mass between modes or off the moons, and the shape of its modes.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["CoupledFloor", "paired_ratio"]


class CoupledFloor:
    """The noise floor drawn through a model's split (module docstring).

    ``target``: a toy distribution with layout positions (``target.has_positions``: ``8gaussians``,
    ``moons``); ``fit_samples`` ``[N, 2]``: the model's samples from a source draw of their own (not
    the draws it is scored on).
    """

    def __init__(self, target, fit_samples: torch.Tensor):
        if not target.has_positions:
            raise ValueError(f"a coupled floor needs a target with layout positions (8gaussians, moons), "
                             f"got {target.name!r}")
        if len(fit_samples) < 2:
            raise ValueError(f"a coupled floor needs at least 2 fit samples, got {len(fit_samples)}")
        self.target = target
        self._sorted = target.position(fit_samples).sort().values.numpy()
        self._levels = (np.arange(len(self._sorted)) + 0.5) / len(self._sorted)

    def quantiles(self, samples: torch.Tensor) -> torch.Tensor:
        """``[n]`` (float64) quantiles of the samples' layout positions under the fit draw's
        distribution (its empirical CDF, linearly interpolated)."""
        pos = self.target.position(samples).numpy()
        return torch.from_numpy(np.interp(pos, self._sorted, self._levels, left=0.0, right=1.0))

    def draw(self, samples: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``[n, 2]`` target points at the samples' quantiles (on the CPU, in the samples' dtype), their
        noise from ``generator``: one floor draw, paired with ``samples``."""
        return self.target.at_quantiles(self.quantiles(samples), generator=generator, dtype=samples.dtype)


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``mean(a) / mean(b)`` over paired draws and its standard error by the delta method,
    ``sd(a_i - r b_i) / (sqrt(k) mean(b))`` for ``k`` draws (at least 2)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired_ratio needs two paired sequences of at least 2 draws, got {len(a)} and {len(b)}")
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    if mb == 0:
        raise ValueError("paired_ratio: the denominator's mean is 0")
    r = ma / mb
    return r, statistics.stdev([x - r * y for x, y in zip(a, b)]) / (math.sqrt(len(a)) * abs(mb))
