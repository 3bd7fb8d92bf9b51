"""Couplings: how (x0, x1) pairs are drawn. ``sample(batch_size, *, generator) -> CouplingSample``
(``x0``, ``x1`` and, where the data has them, the class labels ``y`` of ``x1``).

- :class:`IndependentCoupling`: x0 ~ source, x1 ~ target independently (I-CFM).
- :class:`MinibatchOTCoupling`: independent batches re-paired by optimal transport on the batch
  (OT-CFM, Tong et al. 2023; Pooladian et al. 2023). ``method="exact"`` solves the assignment
  problem on the squared-Euclidean batch cost on the CPU (a permutation: both marginals stay exact);
  ``method="sinkhorn"`` runs log-domain entropic Sinkhorn in torch on the batch's own device and
  draws, for each x0, its partner from the plan's row (no CPU round trip on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from flowmatch.data.toy import ToyDistribution
from flowmatch.errors import ConfigError
from flowmatch.utils import lookup

__all__ = ["CouplingSample", "Coupling", "IndependentCoupling", "MinibatchOTCoupling", "PairedCoupling", "sinkhorn_plan", "exact_assignment",
           "COUPLINGS", "get_coupling"]


@dataclass
class CouplingSample:
    """One joint draw of a batch: row ``i`` of ``x0`` (source, ``[B, *D]``) goes with row ``i`` of ``x1``
    (data, ``[B, *D]``); ``y`` (``[B]`` long) are the class labels of ``x1`` where the data has them,
    else ``None``. Labeled and unlabeled data are drawn from the same random stream."""

    x0: torch.Tensor
    x1: torch.Tensor
    y: Optional[torch.Tensor] = None


class Coupling:
    name = ""

    def sample(self, batch_size: int, *, generator: Optional[torch.Generator] = None) -> CouplingSample:
        raise NotImplementedError

    def has_labels(self) -> Optional[bool]:
        """Whether :meth:`sample` gives class labels: ``True`` / ``False`` where that is known without
        drawing, ``None`` otherwise (the first draw tells)."""
        return None

    def state_dict(self) -> dict:
        """State beyond the generator that a resumed run needs (none for stateless couplings)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class IndependentCoupling(Coupling):
    name = "independent"

    def __init__(self, source: ToyDistribution, target: ToyDistribution, device: torch.device | str = "cpu"):
        self.source, self.target, self.device = source, target, torch.device(device)

    def draw(self, batch_size: int, generator: Optional[torch.Generator] = None) -> CouplingSample:
        """Independent batches of the source and the target (the target's labels where it has them)."""
        x0 = self.source.sample(batch_size, generator=generator, device=self.device)
        if hasattr(self.target, "sample_labeled"):
            x1, y = self.target.sample_labeled(batch_size, generator=generator, device=self.device)
        else:
            x1, y = self.target.sample(batch_size, generator=generator, device=self.device), None
        return CouplingSample(x0, x1, y)

    def sample(self, batch_size, *, generator=None):
        return self.draw(batch_size, generator)

    def has_labels(self):
        if not hasattr(self.target, "sample_labeled"):
            return False
        return None if not hasattr(self.target, "labels") else self.target.labels is not None


def _sq_cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    a, b = x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1)
    return torch.cdist(a, b) ** 2


def exact_assignment(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Permutation ``perm`` minimising ``sum_i ||x0_i - x1_perm[i]||^2``.

    Solved on the CPU by POT's network simplex (``ot.emd``: with equal uniform weights its optimal
    vertex is a permutation matrix; about 2x faster than scipy at batch 256), or scipy's
    ``linear_sum_assignment`` when POT is not installed.
    """
    cost = _sq_cost(x0, x1).detach().to("cpu", torch.float64).numpy()
    n = cost.shape[0]
    if cost.shape[0] != cost.shape[1]:
        raise ValueError(f"exact OT pairing needs equal batch sizes, got {cost.shape}")
    try:
        import numpy as np
        import ot  # lazy: POT
    except ImportError:
        from scipy.optimize import linear_sum_assignment  # lazy

        rows, cols = linear_sum_assignment(cost)
        perm = torch.empty(n, dtype=torch.long)
        perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
        return perm.to(x1.device)
    w = np.full(n, 1.0 / n)
    plan = ot.emd(w, w, cost, numItermax=1_000_000)
    return torch.as_tensor(plan.argmax(axis=1), dtype=torch.long).to(x1.device)


def sinkhorn_plan(cost: torch.Tensor, reg: float, num_iters: int = 100) -> torch.Tensor:
    """Entropic OT plan between uniform marginals, log-domain Sinkhorn (on ``cost``'s device).

    ``cost`` is ``[n, m]``; ``reg`` is the entropic weight in units of the mean cost. Returns the
    ``[n, m]`` plan whose rows sum to ~1/n and columns to ~1/m.
    """
    n, m = cost.shape
    c = cost / cost.mean().clamp_min(1e-12)
    # math.log, not a float32 torch.log: float64 plans would otherwise carry ~1e-8 marginal errors
    log_a = torch.full((n,), -math.log(n), device=cost.device, dtype=cost.dtype)
    log_b = torch.full((m,), -math.log(m), device=cost.device, dtype=cost.dtype)
    f = torch.zeros(n, device=cost.device, dtype=cost.dtype)
    g = torch.zeros(m, device=cost.device, dtype=cost.dtype)
    k = -c / reg
    for _ in range(num_iters):
        f = log_a - torch.logsumexp(k + g[None, :], dim=1)
        g = log_b - torch.logsumexp(k + f[:, None], dim=0)
    return torch.exp(k + f[:, None] + g[None, :])


class MinibatchOTCoupling(IndependentCoupling):
    name = "ot"

    def __init__(self, source, target, device="cpu", method: str = "exact", reg: float = 0.05, num_iters: int = 100):
        super().__init__(source, target, device)
        if method not in ("exact", "sinkhorn"):
            raise ConfigError(f"unknown OT method {method!r}; valid OT methods: exact, sinkhorn")
        if reg <= 0:
            raise ConfigError(f"coupling.reg must be > 0, got {reg}")
        self.method, self.reg, self.num_iters = method, float(reg), int(num_iters)

    def assign(self, x0: torch.Tensor, x1: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Row ``i`` of ``x0`` is paired with row ``idx[i]`` of ``x1``: ``idx`` (``[B]`` long)."""
        if self.method == "exact":
            return exact_assignment(x0, x1)
        plan = sinkhorn_plan(_sq_cost(x0, x1), self.reg, self.num_iters)
        rows = plan / plan.sum(dim=1, keepdim=True)
        return torch.multinomial(rows, 1, generator=generator).squeeze(1)

    def pair(self, x0: torch.Tensor, x1: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-pair given batches by OT; returns ``(x0, x1[perm])``."""
        return x0, x1[self.assign(x0, x1, generator)]

    def sample(self, batch_size, *, generator=None):
        d = self.draw(batch_size, generator)
        idx = self.assign(d.x0, d.x1, generator)
        return CouplingSample(d.x0, d.x1[idx], None if d.y is None else d.y[idx])


class PairedCoupling(Coupling):
    """Stored joint draws ``(x0[i], x1[i])`` (reflow pairs): row i of a batch is one pair.

    Batches walk through a random permutation of the pairs, drawn anew from ``generator`` each
    epoch; the permutation and position are part of :meth:`state_dict`, so a resumed run sees the
    same batches as an unbroken one.
    """

    name = "paired"

    def __init__(self, x0, x1, device: torch.device | str = "cpu", y=None):
        if x0.shape != x1.shape or x0.shape[0] == 0:
            raise ValueError(f"paired coupling needs equal, non-empty x0 and x1, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        if y is not None and tuple(y.shape) != (x0.shape[0],):
            raise ValueError(f"paired coupling labels must have shape [{x0.shape[0]}], got {tuple(y.shape)}")
        self.device = torch.device(device)
        # Tensors move to the device once; row-indexable stores (memory-mapped shards) are gathered
        # on the CPU batch by batch.
        self.on_device = isinstance(x0, torch.Tensor)
        self.x0, self.x1 = (x0.to(self.device), x1.to(self.device)) if self.on_device else (x0, x1)
        self.y = None if y is None else (y.to(self.device) if self.on_device and isinstance(y, torch.Tensor) else y)
        self.perm: Optional[torch.Tensor] = None
        self.pos = 0
        self.epoch = 0

    def __len__(self) -> int:
        return self.x0.shape[0]

    def _indices(self, batch_size: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        parts, need = [], batch_size
        while need > 0:
            if self.perm is None or self.pos >= len(self):
                dev = generator.device if generator is not None else self.device
                self.perm = torch.randperm(len(self), generator=generator, device=dev).to(self.device)
                self.pos = 0
                self.epoch += 1
            take = self.perm[self.pos:self.pos + need]
            parts.append(take)
            self.pos += take.numel()
            need -= take.numel()
        return torch.cat(parts)

    def sample(self, batch_size, *, generator=None):
        idx = self._indices(batch_size, generator)
        if self.on_device:
            return CouplingSample(self.x0[idx], self.x1[idx], None if self.y is None else self.y[idx])
        idx = idx.cpu()
        y = None if self.y is None else self.y[idx].to(self.device)
        return CouplingSample(self.x0[idx].to(self.device), self.x1[idx].to(self.device), y)

    def has_labels(self):
        return self.y is not None

    def state_dict(self) -> dict:
        return {"perm": None if self.perm is None else self.perm.cpu(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.perm = None if state.get("perm") is None else state["perm"].to(self.device)
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])


COUPLINGS = {"independent": IndependentCoupling, "ot": MinibatchOTCoupling}


def get_coupling(name: str, source: ToyDistribution, target: ToyDistribution, *, device="cpu",
                 method: str = "exact", reg: float = 0.05, num_iters: int = 100) -> Coupling:
    """Build a sampled coupling by name (an unknown name lists the valid ones; ``paired`` couplings
    are built from a pair store, see :class:`PairedCoupling`)."""
    cls = lookup({**COUPLINGS, "paired": PairedCoupling}, name, "coupling")
    if cls is PairedCoupling:
        raise ConfigError("a paired coupling is built from stored pairs: PairedCoupling(x0, x1)")
    if cls is MinibatchOTCoupling:
        return cls(source, target, device, method=method, reg=reg, num_iters=num_iters)
    return cls(source, target, device)
