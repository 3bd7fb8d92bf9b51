"""Exact log-likelihood of a flow by the instantaneous change of variables.

A velocity field ``v(x, t)`` transports the source density ``p0`` (t = 0) to a model density ``p1``
(t = 1). Along a trajectory of ``dx/dt = v(x, t)`` the log-density obeys (Chen et al. 2018,
"Neural ODEs", thm. 1; Grathwohl et al. 2019, FFJORD, eq. 4)

    d log p_t(x_t) / dt = -div v(x_t, t),

so for a data point ``x1``

    log p1(x1) = log p0(x0) - int_0^1 div v(x_t, t) dt,        x0 = x_t at t = 0.

We solve the augmented ODE for ``(x, delta)``

    dx/dt = v(x, t),    d delta/dt = div v(x, t),    x(1) = x1,  delta(1) = 0,

backwards from t = 1 to t = 0 with the package's solvers; then ``delta(0) = -int_0^1 div v dt`` and
``log p1(x1) = log p0(x(0)) + delta(0)``. The state is flattened to ``[B, D + 1]`` (x in the first
``D`` columns, ``delta`` in the last) so every solver, fixed-step or adaptive, sees one tensor.

The divergence ``div v = sum_i d v_i / d x_i`` is either

- ``exact``: one vector-Jacobian product per dimension (``D`` backward passes per evaluation; fine
  for toy data), or
- ``hutchinson``: the unbiased estimator ``E[eps^T (dv/dx) eps]`` with ``E[eps eps^T] = I``
  (Hutchinson 1989), Rademacher or Gaussian probes drawn once per solve and held fixed along it,
  as FFJORD does, so the integrand is a smooth function of t and adaptive solvers behave;
  ``num_probes`` independent probes are averaged. The resulting ``logp`` is an unbiased estimate
  of the model's ``log p1(x1)`` up to solver error.

A data point with a NaN or an inf gets ``logp`` NaN (and so do ``mean``, ``std`` and
``bits_per_dim``), with a warning saying how many (:mod:`flowmatch.metrics.guard`); the finite
points are solved as usual and keep their values.

Both assume the model treats batch rows independently (no batch statistics): row ``i`` of the
output may depend only on row ``i`` of the input. The computation is an evaluation metric: it runs
without building a graph through the solve (each divergence is computed under its own
``torch.enable_grad()`` and detached), so memory does not grow with the number of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from flowmatch.errors import ConfigError
from flowmatch.metrics.guard import finite_inputs
from flowmatch.solvers import Solver, get_solver, num_steps_for, time_grid
from flowmatch.utils import lookup

__all__ = [
    "LikelihoodResult", "log_likelihood", "exact_divergence", "hutchinson_divergence", "draw_probes",
    "DIVERGENCES", "PROBES", "AUTO_EXACT_MAX_DIM",
]

DIVERGENCES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
AUTO_EXACT_MAX_DIM = 8  # divergence="auto" is exact up to this many dimensions, Hutchinson above


@dataclass
class LikelihoodResult:
    """Model log-likelihood of a batch of data points, in nats.

    ``logp`` is ``[B]`` (float64): ``log p1(x1)``; ``x0`` ``[B, *D]`` is where each point lands at
    t = 0 and ``prior_logp`` ``[B]`` is ``log p0(x0)``, so ``logp = prior_logp - int_0^1 div v dt``.
    ``bits_per_dim = -mean / (D ln 2)`` on the data as given (no dequantisation or rescaling
    correction). ``nfe`` counts velocity evaluations (each also costs ``D`` backward passes for the
    exact divergence or ``num_probes`` for Hutchinson), summed over chunks.
    """

    logp: torch.Tensor
    prior_logp: torch.Tensor
    x0: torch.Tensor
    mean: float
    std: float
    bits_per_dim: float
    nfe: int
    divergence: str
    probe: Optional[str]  # None for the exact divergence
    num_probes: Optional[int]  # None for the exact divergence
    solver: str
    num_steps: Optional[int]  # None for adaptive solvers
    dim: int
    n: int

    def to_dict(self) -> dict:
        """Scalars only (JSON-ready): the tensors are left out."""
        return {"mean": self.mean, "std": self.std, "bits_per_dim": self.bits_per_dim, "nfe": self.nfe,
                "divergence": self.divergence, "probe": self.probe, "num_probes": self.num_probes,
                "solver": self.solver, "num_steps": self.num_steps, "dim": self.dim, "n": self.n}


def exact_divergence(v: Callable, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v(x, t), div_x v(x, t))`` with the divergence summed exactly over all ``D`` dimensions.

    ``x`` is ``[B, *D]``, ``t`` ``[B]``; returns ``[B, *D]`` and ``[B]``, both detached. Costs one
    forward pass and ``D`` vector-Jacobian products.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = _call(v, x, t)
        flat = out.reshape(x.shape[0], -1)
        d = flat.shape[1]
        div = torch.zeros(x.shape[0], dtype=out.dtype, device=out.device)
        if out.requires_grad:
            for i in range(d):
                (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < d - 1, allow_unused=True)
                if g is not None:
                    div = div + g.reshape(x.shape[0], -1)[:, i]
    return out.detach(), div.detach()


def hutchinson_divergence(v: Callable, x: torch.Tensor, t: torch.Tensor,
                          probes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v(x, t), estimate of div_x v(x, t))``: the mean over probes of ``eps^T (dv/dx) eps``.

    ``x`` is ``[B, *D]``, ``t`` ``[B]``, ``probes`` ``[K, B, *D]`` with ``E[eps eps^T] = I``;
    returns ``[B, *D]`` and ``[B]``, both detached. Costs one forward pass and ``K`` vector-Jacobian
    products.
    """
    if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
        raise ValueError(f"probes must be [K, *x.shape] = [K, {', '.join(map(str, x.shape))}], "
                         f"got {tuple(probes.shape)}")
    k = probes.shape[0]
    b = x.shape[0]
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = _call(v, x, t)
        div = torch.zeros(b, dtype=out.dtype, device=out.device)
        if out.requires_grad:
            for j in range(k):
                eps = probes[j]
                (g,) = torch.autograd.grad(out, x, grad_outputs=eps, retain_graph=j < k - 1, allow_unused=True)
                if g is not None:  # g = eps^T (dv/dx), row by row
                    div = div + (g * eps).reshape(b, -1).sum(dim=1)
    return out.detach(), (div / k).detach()


def draw_probes(shape: tuple, num_probes: int, kind: str = "rademacher", *,
                generator: Optional[torch.Generator] = None, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``num_probes`` probe tensors of ``shape`` (``[K, *shape]``) with zero mean and identity covariance:
    Rademacher (+-1 with probability 1/2 each) or standard Gaussian."""
    lookup({p: p for p in PROBES}, kind, "probe")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the data are on {device}")
    full = (int(num_probes), *shape)
    if kind == "gaussian":
        return torch.randn(full, generator=generator, device=device, dtype=dtype)
    bits = torch.randint(0, 2, full, generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def log_likelihood(v: Callable, x1: torch.Tensor, source_log_prob, *, solver: str | Solver = "dopri5",
                   num_steps: Optional[int] = None, atol: float = 1e-5, rtol: float = 1e-5,
                   divergence: str = "auto", num_probes: int = 1, probe: str = "rademacher",
                   generator: Optional[torch.Generator] = None,
                   chunk_size: Optional[int] = None) -> LikelihoodResult:
    """Model log-likelihood ``log p1(x1)`` of data ``x1`` (``[B, *D]``) under the flow of ``v``.

    Integrates the augmented ODE ``d(x, delta)/dt = (v, div v)`` from t = 1 to t = 0 and returns
    ``log p0(x0) - int_0^1 div v(x_t, t) dt`` per point (module docstring). ``source_log_prob`` is
    the source density: a callable ``[B, *D] -> [B]`` or an object with such a ``.log_prob``
    (e.g. ``flowmatch.data.toy.Gaussian``).

    ``solver`` is a name from ``flowmatch.solvers.SOLVERS`` or a ``Solver`` of order >= 1 that
    accepts a decreasing grid: adaptive ones use
    ``atol``/``rtol`` and share one step size over a chunk; fixed-step ones need ``num_steps``
    (uniform grid run backwards). ``divergence`` is ``"exact"``, ``"hutchinson"`` or ``"auto"``
    (exact when ``D <= 8``). Hutchinson probes (``probe`` = ``"rademacher"`` or ``"gaussian"``,
    ``num_probes`` averaged) are drawn from ``generator`` (on ``x1``'s device) and held fixed during
    each solve. ``chunk_size`` splits the batch into independent solves to bound memory.

    Rows of ``x1`` holding a NaN or an inf are not solved: their ``logp``, ``prior_logp`` and ``x0``
    are NaN, as are ``mean``, ``std`` and ``bits_per_dim``, and a warning gives their count.
    """
    x1 = _check_data(x1)
    div_name = lookup({d: d for d in DIVERGENCES}, divergence, "divergence")
    b, shape = x1.shape[0], tuple(x1.shape[1:])
    d = math.prod(shape)
    if div_name == "auto":
        div_name = "exact" if d <= AUTO_EXACT_MAX_DIM else "hutchinson"
    if div_name == "hutchinson":
        lookup({p: p for p in PROBES}, probe, "probe")
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ConfigError(f"num_probes must be a positive integer, got {num_probes!r}")
        if generator is not None and generator.device.type != x1.device.type:
            raise ValueError(f"generator is on {generator.device} but x1 is on {x1.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    log_p0 = _source_log_prob(source_log_prob)

    s = solver if isinstance(solver, Solver) else get_solver(solver, atol=atol, rtol=rtol)
    if s.order < 1:  # e.g. a sampler that is not a consistent ODE method: it would not follow v backwards
        raise ConfigError(f"solver {s.name!r} has order {s.order}: the likelihood needs a consistent ODE "
                          f"solver (order >= 1)")
    num_steps = num_steps_for(s, num_steps=num_steps, takes=("num_steps",))
    if s.adaptive:
        grid = torch.tensor([1.0, 0.0], dtype=x1.dtype, device=x1.device)
    else:
        grid = time_grid(num_steps, device=x1.device, dtype=x1.dtype).flip(0)  # 1 -> 0

    finite = finite_inputs("log_likelihood", x1=x1)
    keep = torch.isfinite(x1.reshape(b, -1)).all(dim=1) if not finite else None
    xs1 = x1 if finite else x1[keep]
    step = b if chunk_size is None else chunk_size
    x0s, deltas, nfe = [], [], 0
    with torch.no_grad():
        for start in range(0, xs1.shape[0], step):
            xc = xs1[start:start + step]
            probes = None
            if div_name == "hutchinson":
                probes = draw_probes(xc.shape, num_probes, probe, generator=generator, device=x1.device,
                                     dtype=x1.dtype)
            field = _AugmentedField(v, shape, probes)
            z1 = torch.cat([xc.reshape(xc.shape[0], d), xc.new_zeros(xc.shape[0], 1)], dim=1)
            traj = s.integrate(field, z1, grid)
            z0 = traj.x1
            x0s.append(z0[:, :d].reshape(xc.shape))
            deltas.append(z0[:, d])
            nfe += traj.nfe
    x0 = torch.cat(x0s) if x0s else x1.new_empty((0, *shape))
    delta = torch.cat(deltas).double() if deltas else x1.new_empty(0, dtype=torch.float64)  # -int_0^1 div v dt
    prior = log_p0(x0)
    nb = x0.shape[0]
    if not isinstance(prior, torch.Tensor) or prior.shape != (nb,):
        got = tuple(prior.shape) if isinstance(prior, torch.Tensor) else type(prior).__name__
        raise ValueError(f"source log_prob must return one value per point, shape [{nb}], got {got}; "
                         f"sum over the non-batch dimensions (e.g. torch.distributions.Independent)")
    prior = prior.detach().double()
    if not finite:  # the rows that were not solved: NaN
        full_x0 = torch.full_like(x1, float("nan"))
        full_x0[keep] = x0.to(x1.dtype)
        full_prior = torch.full((b,), float("nan"), dtype=torch.float64, device=prior.device)
        full_delta = torch.full((b,), float("nan"), dtype=torch.float64, device=delta.device)
        full_prior[keep.to(prior.device)], full_delta[keep.to(delta.device)] = prior, delta
        x0, prior, delta = full_x0, full_prior, full_delta
    logp = prior + delta
    mean = float(logp.mean())
    std = float(logp.std()) if b > 1 else 0.0
    return LikelihoodResult(logp=logp, prior_logp=prior, x0=x0, mean=mean, std=std,
                            bits_per_dim=-mean / (d * math.log(2)), nfe=nfe, divergence=div_name,
                            probe=probe if div_name == "hutchinson" else None,
                            num_probes=num_probes if div_name == "hutchinson" else None,
                            solver=s.name, num_steps=None if s.adaptive else num_steps, dim=d, n=b)


class _AugmentedField:
    """``z = [x (flattened), delta]`` of shape ``[B, D + 1]`` -> ``[v(x, t) (flattened), div v]``."""

    def __init__(self, v: Callable, shape: tuple, probes: Optional[torch.Tensor]):
        self.v, self.shape, self.probes = v, shape, probes
        self.d = math.prod(shape)

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = z.shape[0]
        x = z[:, :self.d].reshape(b, *self.shape)
        if self.probes is None:
            vx, div = exact_divergence(self.v, x, t)
        else:
            vx, div = hutchinson_divergence(self.v, x, t, self.probes)
        return torch.cat([vx.reshape(b, self.d).to(z.dtype), div.to(z.dtype)[:, None]], dim=1)


def _call(v: Callable, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = v(x, t)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"velocity model must return the shape of x, {tuple(x.shape)}; got {got}")
    return out


def _check_data(x1) -> torch.Tensor:
    if not isinstance(x1, torch.Tensor):
        raise TypeError(f"x1 must be a torch.Tensor of shape [B, *D], got {type(x1).__name__}")
    if x1.ndim < 2 or x1.shape[0] < 1 or x1[0].numel() < 1:
        raise ValueError(f"x1 must have shape [B, *D] with B >= 1 and D >= 1, got {tuple(x1.shape)}")
    if not x1.is_floating_point():
        raise TypeError(f"x1 must be floating point, got {x1.dtype}")
    return x1.detach()


def _source_log_prob(source) -> Callable[[torch.Tensor], torch.Tensor]:
    fn = getattr(source, "log_prob", None)
    if callable(fn):
        return fn
    if callable(source):
        return source
    raise TypeError(f"source_log_prob must be a callable [B, *D] -> [B] or have a .log_prob; "
                    f"got {type(source).__name__}")
