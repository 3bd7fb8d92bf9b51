"""2D toy distributions, vectorised and generated on the requested device.

Every distribution has ``sample(n, *, generator=None, device=None) -> [n, dim]``. When a
``generator`` is given, samples are drawn on its device unless ``device`` says otherwise (the two
must agree). Definitions:

- ``gaussian``: N(0, I) in any dimension; with ``shape=(C, H, W)`` (any tuple) it draws
  ``[n, *shape]`` with ``dim = prod(shape)``, the noise source of an image task.
- ``8gaussians``: equal-weight mixture with centres 5 (cos k pi/4, sin k pi/4), k = 0..7, and
  covariance sqrt(0.1) I (standard deviation 0.1 ** 0.25 per coordinate).
- ``moons``: scikit-learn's two interleaving half circles with Gaussian noise of std 0.2, then
  scaled as ``x * 3 - 1``. Each point of ``sample`` picks its moon independently (scikit-learn
  splits exactly in half; ``reference`` does, see below).
- ``checkerboard``: uniform on the 8 black squares of a 4x4 board on [-4, 4]^2.
- ``spirals``: two interleaved spirals (scaled to about [-4, 4]^2) with Gaussian noise 0.1.
- ``circles``: two concentric circles of radius 3 and 1.5 with Gaussian noise 0.08 * 3.

Evaluation references (``reference(n, *, generator=None, device=None) -> [n, dim]``). ``sample``
draws i.i.d. points, so each component of a mixture receives a binomial share of them: training
draws, and the samples of a model fed i.i.d. noise, are like that. A reference that models are
scored against need not be: its own binomial share only adds scatter (at n = 5,000 the W2 between
two draws has sd 0.019 on moons and 0.092 on 8gaussians with i.i.d. splits, 0.011 and 0.004 with
exact ones; ``experiments/toy/reference_split.py``). ``reference`` therefore draws the
equal-weight mixtures with an exact split, as scikit-learn's ``make_moons`` does, and otherwise the
same points' law: row ``i`` lies in component ``i mod K`` (``moons``: K = 2, even rows on the lower
moon and odd rows on the upper one, so an odd ``n`` puts its extra point on the lower moon as
scikit-learn does; ``8gaussians``: K = 8, component ``i mod 8``, so each centre gets ``n // 8``
points and centres ``0 .. n mod 8 - 1`` one more; ``circles`` and ``spirals``: K = 2 the same way).
The rows are interleaved, not shuffled: W2 and MMD do not depend on the order, and every prefix
``ref[:m]`` (the scorers score smaller rows on prefixes) is itself an exact split. The other
distributions (``gaussian``, ``upper_moon``, ``checkerboard``, whose squares follow from a
continuous coordinate) have no discrete component to split: their ``reference`` is ``sample``.

Quasi-random draws (``quasi(n, *, seed) -> [n, dim]``, ``gaussian``, ``8gaussians`` and ``moons``):
scrambled Sobol points through the inverse normal CDF, a mixture's components in exact shares. A
model's samples from such a draw carry no share noise of their own; model selection uses them
(``apt.eval_noise=quasi``) to compare checkpoints with less scatter than i.i.d. draws leave.

Draws at given positions (``8gaussians`` and ``moons``): ``position(x) -> [n]`` orders points along
the distribution's layout by one continuous number (``8gaussians``: the angle from -pi/8, so mode
``k`` covers ``[k pi/4, (k+1) pi/4)``; ``moons``: the angle along the upper moon, then 2 pi plus the
angle along the lower one), and ``at_quantiles(u, *, generator) -> [n, 2]`` draws the points whose
layout sits at quantiles ``u`` in [0, 1) (``8gaussians``: mode ``floor(8 u)``; ``moons``: the upper
moon for ``u < 1/2`` at angle ``2 pi u``, else the lower at ``pi (2 u - 1)``), their Gaussian noise
from ``generator``. With ``u`` i.i.d. uniform these are i.i.d. draws of the distribution, exactly as
``sample``'s; the noise floor coupled to a model (``flowmatch.metrics.floor``) takes ``u`` from the
model's own samples, so that the floor draw shares the model's split.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from flowmatch.errors import ConfigError
from flowmatch.utils import lookup

__all__ = ["ToyDistribution", "DATASETS", "get_dataset"]


class ToyDistribution:
    """Base class: subclasses implement ``_sample(n, g, device, dtype)``."""

    name: str = ""

    def __init__(self, dim: int = 2):
        if dim != 2:
            raise ConfigError(f"dataset {self.name!r} is 2-dimensional; got data.dim={dim}")
        self.dim = dim

    def sample(self, n: int, *, generator: Optional[torch.Generator] = None,
               device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draw ``n`` i.i.d. points, shape ``[n, dim]`` (training draws)."""
        return self._sample(int(n), generator, _device(generator, device), dtype)

    def reference(self, n: int, *, generator: Optional[torch.Generator] = None,
                  device: Optional[torch.device | str] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draw an evaluation reference of ``n`` points, shape ``[n, dim]``: a mixture's components
        get exact shares (row ``i`` in component ``i mod K``, see the module docstring); a
        distribution without discrete components draws as :meth:`sample` does."""
        return self._reference(int(n), generator, _device(generator, device), dtype)

    def quasi(self, n: int, *, seed: int, device: Optional[torch.device | str] = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A low-discrepancy draw of ``n`` points, shape as :meth:`sample`'s: scrambled Sobol points
        (``torch.quasirandom.SobolEngine``, scrambled from ``64 seed``) through the inverse normal CDF, a
        mixture's components in exact shares as in :meth:`reference` (component ``c``'s points from an
        engine of its own, scrambled from ``64 seed + c``, so that draws of two seeds share none). A
        model fed such a draw has no binomial or multinomial share noise of its own, so two models
        compared on it differ by less scatter than on i.i.d. draws (model selection,
        ``apt.eval_noise=quasi``). Only ``gaussian``, ``8gaussians`` and ``moons`` have one
        (:attr:`has_quasi`); the others raise a ConfigError."""
        if not self.has_quasi:
            raise ConfigError(f"dataset {self.name!r} has no quasi-random draw (gaussian, 8gaussians and moons do)")
        return self._quasi(int(n), int(seed), torch.device("cpu") if device is None else torch.device(device), dtype)

    def position(self, x: torch.Tensor) -> torch.Tensor:
        """``[n]`` (float64): where each point of ``x`` ``[n, 2]`` lies along the layout (module
        docstring); only ``8gaussians`` and ``moons`` have one (:attr:`has_positions`)."""
        if not self.has_positions:
            raise ConfigError(f"dataset {self.name!r} has no layout positions (8gaussians and moons do)")
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"{self.name} positions need x of shape [n, 2], got {tuple(x.shape)}")
        return self._position(x.detach().to("cpu", torch.float64))

    def at_quantiles(self, u: torch.Tensor, *, generator: Optional[torch.Generator] = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[n, 2]`` points (on the CPU) whose layout positions sit at quantiles ``u`` ``[n]`` in
        [0, 1], their noise drawn from ``generator``: i.i.d. draws of the distribution when ``u`` is
        i.i.d. uniform (module docstring)."""
        if not self.has_positions:
            raise ConfigError(f"dataset {self.name!r} has no layout positions (8gaussians and moons do)")
        u = torch.as_tensor(u, dtype=torch.float64).cpu()
        if u.ndim != 1 or not bool(((u >= 0) & (u <= 1)).all()):
            raise ValueError(f"{self.name} quantiles need a 1-D tensor of values in [0, 1], got shape "
                             f"{tuple(u.shape)}")
        return self._at_quantiles(u, generator, dtype)

    @property
    def has_positions(self) -> bool:
        """Whether :meth:`position` and :meth:`at_quantiles` are defined for this distribution."""
        return type(self)._position is not ToyDistribution._position

    def _position(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _at_quantiles(self, u: torch.Tensor, g: Optional[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    @property
    def has_quasi(self) -> bool:
        """Whether :meth:`quasi` is defined for this distribution."""
        return type(self)._quasi is not ToyDistribution._quasi

    def _sample(self, n: int, g: Optional[torch.Generator], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _quasi(self, n: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _reference(self, n: int, g: Optional[torch.Generator], device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
        return self._sample(n, g, device, dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim})"


def _device(generator: Optional[torch.Generator], device) -> torch.device:
    """The device to draw on: ``device``, else the generator's, else the CPU (the two must agree)."""
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but samples were requested on {device}")
    return device


def _components(n: int, k: int, device) -> torch.Tensor:
    """``[n]`` component of each row of an exact-split reference: row ``i`` in component ``i mod k``."""
    return torch.arange(n, device=device) % k


def _randn(n: int, d: int, g, device, dtype) -> torch.Tensor:
    return torch.randn(n, d, generator=g, device=device, dtype=dtype)


def _rand(n: int, g, device, dtype) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device, dtype=dtype)


def _sobol(n: int, d: int, seed: int) -> torch.Tensor:
    """``[n, d]`` scrambled Sobol points in (0, 1) (float64; scrambling keeps them off 0, clamped to be sure)."""
    u = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed).draw(n, dtype=torch.float64)
    return u.clamp(1e-12, 1 - 1e-12)


def _normal_quantile(u: torch.Tensor) -> torch.Tensor:
    """The standard normal quantile of ``u`` in (0, 1), elementwise."""
    return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


def _engine_seed(seed: int, c: int = 0) -> int:
    """The Sobol engine's scrambling seed of a quasi draw's component ``c`` (< 64): draws of different
    seeds (a model's source points and the reference it is scored against) share no engine, since
    engines of one seed scramble alike in every dimension they have in common."""
    return 64 * seed + c


def _per_component(n: int, k: int, seed: int, draw) -> torch.Tensor:
    """Rows of an exact split (row ``i`` in component ``i mod k``), component ``c``'s rows filled by
    ``draw(c, m, _engine_seed(seed, c))`` (``[m, d]``, its ``m`` rows in order)."""
    comps = _components(n, k, "cpu")
    parts = [draw(c, int((comps == c).sum()), _engine_seed(seed, c)) for c in range(k)]
    out = torch.empty(n, parts[0].shape[1], dtype=parts[0].dtype)
    for c, part in enumerate(parts):
        out[comps == c] = part
    return out


class Gaussian(ToyDistribution):
    """N(0, I): draws ``[n, dim]``, or ``[n, *shape]`` when ``shape`` is given (then ``shape`` fixes
    ``dim = prod(shape)`` and the ``dim`` argument is not used)."""

    name = "gaussian"

    def __init__(self, dim: int = 2, shape: Optional[Sequence[int]] = None):
        if shape is not None:
            try:
                sizes = tuple(int(s) for s in shape)
                valid = len(sizes) > 0 and all(s >= 1 and s == t for s, t in zip(sizes, shape))
            except (TypeError, ValueError):
                valid = False
            if not valid:
                raise ConfigError(f"dataset 'gaussian' needs a shape of positive integer sizes, got shape={shape!r}")
            shape = sizes
            dim = math.prod(shape)
        if dim < 1:
            raise ConfigError(f"dataset 'gaussian' needs data.dim >= 1, got {dim}")
        self.dim = dim
        self.shape: Optional[tuple[int, ...]] = shape

    def _sample(self, n, g, device, dtype):
        if self.shape is not None:
            return torch.randn(n, *self.shape, generator=g, device=device, dtype=dtype)
        return _randn(n, self.dim, g, device, dtype)

    def _quasi(self, n, seed, device, dtype):
        z = _normal_quantile(_sobol(n, self.dim, _engine_seed(seed))).to(device=device, dtype=dtype)
        return z if self.shape is None else z.reshape(n, *self.shape)

    def __repr__(self) -> str:
        return f"Gaussian(dim={self.dim})" if self.shape is None else f"Gaussian(dim={self.dim}, shape={self.shape})"

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; 0, I) = -||x||^2 / 2 - (D / 2) log(2 pi)`` per point: ``x`` is ``[B, *D]`` with
        ``dim`` elements per point (summed over all non-batch dims); returns ``[B]``."""
        if x.ndim < 2 or x[0].numel() != self.dim:
            raise ValueError(f"gaussian of dim {self.dim} needs x of shape [B, *D] with {self.dim} elements "
                             f"per point, got {tuple(x.shape)}")
        sq = x.reshape(x.shape[0], -1).pow(2).sum(dim=1)
        return -0.5 * sq - 0.5 * self.dim * math.log(2 * math.pi)


class EightGaussians(ToyDistribution):
    name = "8gaussians"
    radius = 5.0
    std = 0.1 ** 0.25  # covariance sqrt(0.1) * I

    def centers(self, device=None, dtype=torch.float32) -> torch.Tensor:
        k = torch.arange(8, device=device, dtype=dtype) * (math.pi / 4)
        return self.radius * torch.stack([torch.cos(k), torch.sin(k)], dim=1)

    def _sample(self, n, g, device, dtype):
        idx = torch.randint(0, 8, (n,), generator=g, device=device)
        return self._around(idx, g, device, dtype)

    def _reference(self, n, g, device, dtype):
        return self._around(_components(n, 8, device), g, device, dtype)

    def _quasi(self, n, seed, device, dtype):
        centres = self.centers(dtype=torch.float64)
        x = _per_component(n, 8, seed, lambda c, m, s: centres[c] + self.std * _normal_quantile(_sobol(m, 2, s)))
        return x.to(device=device, dtype=dtype)

    def _position(self, x):
        return (torch.atan2(x[:, 1], x[:, 0]) + math.pi / 8) % (2 * math.pi)

    def _at_quantiles(self, u, g, dtype):
        return self._around((u * 8).floor().long().clamp(0, 7), g, torch.device("cpu"), dtype)

    def _around(self, idx, g, device, dtype):
        """Points around the centres ``idx`` (``[n]`` of 0..7)."""
        return self.centers(device, dtype)[idx] + self.std * _randn(len(idx), 2, g, device, dtype)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of the equal-weight mixture ``(1/8) sum_k N(x; c_k, std^2 I)``: ``x`` ``[B, 2]`` -> ``[B]``."""
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"8gaussians needs x of shape [B, 2], got {tuple(x.shape)}")
        d2 = torch.cdist(x, self.centers(x.device, x.dtype)).pow(2)  # [B, 8]
        comp = -0.5 * d2 / self.std ** 2 - math.log(2 * math.pi * self.std ** 2)
        return torch.logsumexp(comp, dim=1) - math.log(8)


class Moons(ToyDistribution):
    name = "moons"
    noise = 0.2

    def _sample(self, n, g, device, dtype):
        theta = math.pi * _rand(n, g, device, dtype)
        return self._place(theta, torch.rand(n, generator=g, device=device) < 0.5, g, device, dtype)

    def _reference(self, n, g, device, dtype):
        theta = math.pi * _rand(n, g, device, dtype)
        return self._place(theta, _components(n, 2, device) == 0, g, device, dtype)  # even rows: the lower moon

    def _quasi(self, n, seed, device, dtype):
        # per moon: the angle from the first Sobol coordinate, the noise from the other two
        u = _per_component(n, 2, seed, lambda c, m, s: _sobol(m, 3, s))
        z = _normal_quantile(u[:, 1:])
        x = self._place(math.pi * u[:, 0], _components(n, 2, "cpu") == 0, None, "cpu", torch.float64, noise=z)
        return x.to(device=device, dtype=dtype)

    def _position(self, x):
        p = (x + 1) / 3  # undo the scaling: the upper moon's centre at 0, the lower's at (1, 0.5)
        centre = torch.tensor([1.0, 0.5], dtype=p.dtype)
        lower = ((p - centre).norm(dim=1) - 1).abs() < (p.norm(dim=1) - 1).abs()

        def angle(y, x):  # in [-pi/2, 3 pi/2): continuous past both ends of a moon's [0, pi]
            return (torch.atan2(y, x) + math.pi / 2) % (2 * math.pi) - math.pi / 2

        return torch.where(lower, 2 * math.pi + angle(centre[1] - p[:, 1], centre[0] - p[:, 0]),
                           angle(p[:, 1], p[:, 0]))

    def _at_quantiles(self, u, g, dtype):
        lower = u >= 0.5
        theta = math.pi * (2 * u - lower.to(u.dtype))
        return self._place(theta.to(dtype), lower, g, torch.device("cpu"), dtype)

    def _place(self, theta, lower, g, device, dtype, noise=None):
        """Points at angles ``theta`` ``[n]`` on the lower moon where ``lower`` ``[n]`` holds, else the upper."""
        n = len(theta)
        upper_moon = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
        # (1 - cos, 0.5 - sin), the upper moon mirrored and shifted
        lower_moon = torch.tensor([1.0, 0.5], device=device, dtype=dtype) - upper_moon
        x = torch.where(lower[:, None], lower_moon, upper_moon)
        x = x + self.noise * (_randn(n, 2, g, device, dtype) if noise is None else noise)
        return x * 3 - 1


class UpperMoon(Moons):
    """The upper moon of :class:`Moons` alone (the same noise and scale): a "style" of the moons task
    for fine-tuning experiments."""

    name = "upper_moon"

    def _sample(self, n, g, device, dtype):
        theta = math.pi * _rand(n, g, device, dtype)
        x = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1) + self.noise * _randn(n, 2, g, device, dtype)
        return x * 3 - 1

    def _reference(self, n, g, device, dtype):  # one moon: nothing to split
        return self._sample(n, g, device, dtype)

    _quasi = ToyDistribution._quasi  # the moons' quasi draw would place half on the lower moon
    _position, _at_quantiles = ToyDistribution._position, ToyDistribution._at_quantiles  # one moon: no split


class Checkerboard(ToyDistribution):
    name = "checkerboard"

    def _sample(self, n, g, device, dtype):
        x1 = _rand(n, g, device, dtype) * 4 - 2
        x2_ = _rand(n, g, device, dtype) - 2 * torch.randint(0, 2, (n,), generator=g, device=device).to(dtype)
        x2 = x2_ + torch.floor(x1).remainder(2)
        return torch.stack([x1, x2], dim=1) * 2


class Spirals(ToyDistribution):
    name = "spirals"

    def _sample(self, n, g, device, dtype):
        return self._draw(n, None, g, device, dtype)

    def _reference(self, n, g, device, dtype):
        return self._draw(n, _components(n, 2, device) == 0, g, device, dtype)  # even rows: the mirrored spiral

    def _draw(self, n, flip, g, device, dtype):
        """``flip`` ``[n]`` (True: the mirrored spiral), or None to draw it i.i.d. with probability 1/2."""
        r = torch.sqrt(_rand(n, g, device, dtype)) * (540 * 2 * math.pi / 360)
        dx = -torch.cos(r) * r + _rand(n, g, device, dtype) * 0.5
        dy = torch.sin(r) * r + _rand(n, g, device, dtype) * 0.5
        if flip is None:
            flip = torch.rand(n, generator=g, device=device) < 0.5
        sign = torch.where(flip, -1.0, 1.0).to(dtype)
        x = torch.stack([dx, dy], dim=1) * sign[:, None] / 3
        return x + 0.1 * _randn(n, 2, g, device, dtype)


class Circles(ToyDistribution):
    name = "circles"

    def _sample(self, n, g, device, dtype):
        theta = 2 * math.pi * _rand(n, g, device, dtype)
        return self._place(theta, torch.rand(n, generator=g, device=device) < 0.5, g, device, dtype)

    def _reference(self, n, g, device, dtype):
        theta = 2 * math.pi * _rand(n, g, device, dtype)
        return self._place(theta, _components(n, 2, device) == 0, g, device, dtype)  # even rows: the inner circle

    def _place(self, theta, inner, g, device, dtype):
        """Points at angles ``theta`` ``[n]`` on the inner circle where ``inner`` ``[n]`` holds, else the outer."""
        n = len(theta)
        radius = torch.where(inner, 0.5, 1.0).to(dtype)
        x = radius[:, None] * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
        return (x + 0.08 * _randn(n, 2, g, device, dtype)) * 3


DATASETS: dict[str, type[ToyDistribution]] = {
    cls.name: cls for cls in (Gaussian, EightGaussians, Moons, UpperMoon, Checkerboard, Spirals, Circles)
}


def get_dataset(name: str, dim: int = 2, *, shape: Optional[Sequence[int]] = None) -> ToyDistribution:
    """Build a toy distribution by name (an unknown name lists the valid ones). ``shape`` (e.g.
    ``(1, 28, 28)``) makes ``gaussian`` draw ``[n, *shape]``; the other datasets are 2-D only."""
    cls = lookup(DATASETS, name, "dataset")
    if shape is None:
        return cls(dim=dim)
    if cls is not Gaussian:
        raise ConfigError(f"dataset {name!r} is 2-dimensional and takes no shape; got shape={tuple(shape)} "
                          f"(only 'gaussian' takes one)")
    return cls(dim=dim, shape=shape)
