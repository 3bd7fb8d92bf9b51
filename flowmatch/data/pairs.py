"""Reading stored reflow pairs (written by :func:`flowmatch.reflow.generate_pairs`).

A pair store is a directory with ``manifest.json`` and shards ``shard_00000.pt``, ... each holding
``x0`` (source draws) and ``x1`` (the teacher's ODE endpoints), ``[count, *D]``, and, when the
manifest says ``labeled`` (a class-conditional teacher), ``y`` (``[count]``, the labels it was given). The manifest records
the teacher checkpoint's hash and config, the solver, the NFE per sample as measured, the seed, the
dtype, the data shape, and each shard's count and SHA-256. :class:`PairStore` refuses a store that
does not match what the caller expects, naming what is wrong.

Since stores carry a plan (``plan.json``, written before the first shard), each shard also holds
``index``, ``seed``, ``count``, ``plan`` (the plan's id, also the manifest's ``plan_id``) and
``data_sha256`` (:func:`shard_data_sha256` of its tensors, computed when it was written), so a shard
proves which generation it belongs to and that its data are the ones written. Stores written
before then (no ``plan_id``) are read as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Sequence

import torch

from flowmatch.errors import FlowmatchError
from flowmatch.io import file_sha256, safe_load

__all__ = ["PAIRS_FORMAT", "PAIRS_VERSION", "PairStoreError", "PairStore", "ShardedTensor", "read_manifest",
           "shard_name", "shard_data_sha256", "IN_MEMORY_BYTES"]

# Stores up to this size are concatenated in memory; larger ones stay memory-mapped shard by shard.
IN_MEMORY_BYTES = 1 << 30

PAIRS_FORMAT = "flowmatch-pairs"
PAIRS_VERSION = 1


class PairStoreError(FlowmatchError):
    """A pair store is missing, incomplete, corrupt or does not match the run."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.pt"


def shard_data_sha256(shard: dict) -> str:
    """Hex SHA-256 of a shard's tensors ``x0``, ``x1`` and (when present) ``y``: names, dtypes, shapes and
    bytes, so it does not depend on how the file around them is laid out."""
    h = hashlib.sha256()
    for k in ("x0", "x1", "y"):
        if k in shard:
            t = shard[k].detach().cpu().contiguous()
            h.update(f"{k}:{t.dtype}:{list(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_manifest(path: str) -> dict:
    """Load and check ``path/manifest.json`` (format and version)."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise PairStoreError(f"no pair store at {path}")
    if not os.path.exists(mpath):
        raise PairStoreError(f"pair store {path} has no manifest.json (generation unfinished? rerun it to resume)")
    try:
        with open(mpath) as f:
            m = json.load(f)
    except json.JSONDecodeError as e:
        raise PairStoreError(f"{mpath} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != PAIRS_FORMAT:
        raise PairStoreError(f"{mpath} is not a flowmatch pair manifest")
    if m.get("version") != PAIRS_VERSION:
        raise PairStoreError(f"{mpath} has version {m.get('version')}; this flowmatch reads version {PAIRS_VERSION}")
    return m


class ShardedTensor:
    """Rows of several (memory-mapped) tensors addressed as one: ``t[idx]`` gathers rows by global
    index without loading the other shards' pages."""

    def __init__(self, parts: Sequence[torch.Tensor]):
        if not parts:
            raise ValueError("ShardedTensor needs at least one part")
        self.parts = list(parts)
        lengths = torch.tensor([len(p) for p in self.parts])
        self.starts = torch.cumsum(lengths, 0) - lengths
        self.shape = torch.Size([int(lengths.sum()), *self.parts[0].shape[1:]])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        shard = torch.searchsorted(self.starts, idx, right=True) - 1
        local = idx - self.starts[shard]
        out = torch.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for s in shard.unique().tolist():
            m = shard == s
            out[m] = self.parts[s][local[m]]
        return out

    def materialize(self) -> torch.Tensor:
        return torch.cat(self.parts)


class PairStore:
    """All pairs of a store, checked against the manifest and the caller's expectations.

    ``expect_shape``: the per-sample data shape the run needs; ``expect_teacher_sha256``: the teacher
    checkpoint the run was told to distil. Shards are memory-mapped when loaded (``mmap=True``) and
    verified against their SHA-256 unless ``verify=False``. ``x0`` and ``x1`` are plain tensors for
    stores up to ``in_memory_bytes``, else :class:`ShardedTensor` views of the memory-mapped shards.
    """

    def __init__(self, path: str, *, expect_shape: Optional[Sequence[int]] = None,
                 expect_teacher_sha256: Optional[str] = None, verify: bool = True,
                 in_memory_bytes: int = IN_MEMORY_BYTES):
        self.path = path
        self.manifest = m = read_manifest(path)
        shape = list(m["shape"])
        if expect_shape is not None and list(expect_shape) != shape:
            raise PairStoreError(f"pair store {path} holds data of shape {shape}; this run needs {list(expect_shape)}")
        if expect_teacher_sha256 is not None and m["teacher"]["sha256"] != expect_teacher_sha256:
            raise PairStoreError(f"pair store {path} was made by teacher {m['teacher']['sha256'][:12]}..., "
                                 f"not by the expected teacher {expect_teacher_sha256[:12]}...")
        x0s, x1s, ys = [], [], []
        labeled = bool(m.get("labeled", False))
        for sh in m["shards"]:
            f = os.path.join(path, sh["file"])
            if not os.path.exists(f):
                raise PairStoreError(f"pair store {path}: shard {sh['file']} is missing")
            if verify and file_sha256(f) != sh["sha256"]:
                raise PairStoreError(f"pair store {path}: shard {sh['file']} is corrupt or truncated "
                                     f"(checksum mismatch)")
            d = safe_load(f, "pair shard", error=PairStoreError, mmap=True)
            if not isinstance(d, dict) or not all(torch.is_tensor(d.get(k)) for k in ("x0", "x1")):
                raise PairStoreError(f"pair store {path}: shard {sh['file']} holds a {type(d).__name__}, not a shard "
                                     f"(a dict with tensors x0 and x1)")
            if "plan_id" in m and d.get("plan") != m["plan_id"]:
                raise PairStoreError(f"pair store {path}: shard {sh['file']} belongs to another generation "
                                     f"(plan {str(d.get('plan'))[:12]}, the manifest's is {m['plan_id'][:12]})")
            if "plan_id" in m and d.get("index") != len(x0s):
                raise PairStoreError(f"pair store {path}: shard {sh['file']} is shard {d.get('index')} of its "
                                     f"generation, not shard {len(x0s)}")
            if list(d["x0"].shape) != [sh["count"], *shape] or d["x1"].shape != d["x0"].shape:
                raise PairStoreError(f"pair store {path}: shard {sh['file']} holds {list(d['x0'].shape)}, "
                                     f"the manifest says {[sh['count'], *shape]}")
            if labeled and ("y" not in d or list(d["y"].shape) != [sh["count"]]):
                raise PairStoreError(f"pair store {path}: shard {sh['file']} lacks the class labels the manifest "
                                     f"promises (y of shape [{sh['count']}])")
            x0s.append(d["x0"])
            x1s.append(d["x1"])
            if labeled:
                ys.append(d["y"])
        if not x0s:
            raise PairStoreError(f"pair store {path} holds no shards")
        nbytes = 2 * sum(x.numel() * x.element_size() for x in x0s)
        if nbytes <= in_memory_bytes:
            self.x0, self.x1 = torch.cat(x0s), torch.cat(x1s)
        else:
            self.x0, self.x1 = ShardedTensor(x0s), ShardedTensor(x1s)
        # the labels the teacher was conditioned on (class-conditional teachers), [count] long
        self.y: Optional[torch.Tensor] = torch.cat(ys).long() if labeled else None
        if len(self.x0) != m["count"]:
            raise PairStoreError(f"pair store {path} holds {len(self.x0)} pairs; the manifest says {m['count']}")

    def __len__(self) -> int:
        return len(self.x0)

    def __repr__(self) -> str:
        return f"PairStore({self.path!r}, n={len(self)}, teacher={self.manifest['teacher']['sha256'][:12]})"
