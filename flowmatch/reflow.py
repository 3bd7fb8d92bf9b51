"""Reflow pair generation: a teacher flow's ODE maps source draws x0 to endpoints x1; the pairs
(x0, x1) are the coupling a student (k+1-rectified flow) is trained on (Liu, Gong & Liu 2022).

Pairs are versioned data artifacts: :func:`generate_pairs` writes shards atomically and then a
``manifest.json`` (see :mod:`flowmatch.data.pairs`). Every shard has its own seed, derived from the
store's seed and the shard index, and each shard is solved as one batch. The shard is the unit of
integration on purpose: an adaptive solver's step sizes are shared by a batch, and even fixed-step
float arithmetic can change in the last bit with the batch's shape, so splitting shards into other
batches would make the pairs depend on the batch size. Choose ``shard_size`` to fit the device's
memory; the stored pairs are then the same whatever the number of workers. A killed run resumes and
writes only the missing shards. Under ``torchrun --nproc_per_node N`` each rank takes the shards
``i`` with ``i % N == rank`` (gloo on the CPU, NCCL with CUDA).

A store is never rewritten to match its contents. ``plan.json`` (teacher hash, solver, seed, counts
and the plan's id, the hash of all that) is written before the first shard; each shard carries its
index, seed, count, the plan's id and the hash of its data. A rerun keeps a shard on disk only if
all of these check out (and, for a finished store, its file is the one the manifest records); any
other file in a shard's place is moved to ``rejected/<name>.<UTC time>`` (never deleted), named in a
one-line message on stderr, and regenerated. Temporaries of writers killed mid-write are removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Optional

import torch

from flowmatch.config import to_dict
from flowmatch.data.task import build_source
from flowmatch.data.pairs import (PAIRS_FORMAT, PAIRS_VERSION, PairStoreError, read_manifest, shard_data_sha256,
                                   shard_name)
from flowmatch.errors import ConfigError, FlowmatchError
from flowmatch.models import ClassifierFreeGuidance
from flowmatch.io import atomic_save, atomic_write_text, file_sha256, remove_temporaries, safe_load
from flowmatch.solvers import get_solver, num_steps_for, solve
from flowmatch.training.checkpoint import load_model
from flowmatch.training.distributed import dist_info
from flowmatch.utils import make_generator, resolve_device

__all__ = ["shard_seed", "plan_id", "generate_pairs", "REJECTED_DIR"]

# where a generation moves the files it finds in a shard's place and cannot prove to be that shard
REJECTED_DIR = "rejected"


def shard_seed(seed: int, index: int) -> int:
    """A 63-bit seed for shard ``index`` of a store seeded with ``seed`` (independent of workers)."""
    return int(hashlib.sha256(f"flowmatch-pairs:{seed}:{index}".encode()).hexdigest()[:15], 16)


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _check_shard(path: str, *, index: int, count: int, shape: list, seed: int, pid: str, labeled: bool,
                 file_sha256_: Optional[str] = None) -> tuple[Optional[dict], Optional[str]]:
    """``(shard, None)`` if the file at ``path`` provably is shard ``index`` of the generation ``pid``
    (its index, seed, count, plan id, shapes and data hash, and ``file_sha256_`` when given); ``(None,
    None)`` if there is no file; else ``(None, why)``, ``why`` a few words on what is wrong."""
    if not os.path.lexists(path):
        return None, None
    try:
        d = safe_load(path, "shard", mmap=True)
    except FlowmatchError as e:  # an unreadable shard is moved aside and regenerated
        return None, f"cannot be loaded ({e})"
    if not isinstance(d, dict):
        return None, f"holds a {type(d).__name__}, not a shard"
    if "plan" not in d:
        return None, "carries no plan id (written before shards were tied to their generation)"
    if d["plan"] != pid:
        return None, f"belongs to another generation (plan {str(d['plan'])[:12]}, this one is {pid[:12]})"
    if d.get("index") != index:
        return None, f"is shard {d.get('index')} of this generation, not shard {index}"
    if d.get("seed") != seed or d.get("count") != count:
        return None, f"has seed {d.get('seed')} and count {d.get('count')}, not {seed} and {count}"
    want = [count, *shape]
    for k in ("x0", "x1"):
        t = d.get(k)
        if not torch.is_tensor(t) or t.dtype != torch.float32 or list(t.shape) != want:
            return None, f"holds no float32 {k} of shape {want}"
    if labeled and not (torch.is_tensor(d.get("y")) and list(d["y"].shape) == [count]):
        return None, f"lacks the class labels y of shape [{count}]"
    if not isinstance(d.get("nfe"), int):
        return None, "records no NFE"
    if d.get("data_sha256") != shard_data_sha256(d):
        return None, "holds data that do not match the hash recorded when it was written (altered or corrupt)"
    if file_sha256_ is not None and file_sha256(path) != file_sha256_:
        return None, "is not the file the manifest records"
    return d, None


def _move_aside(path: str, out_dir: str, why: str) -> str:
    """Move ``path`` to ``out_dir/rejected/<name>.<UTC time>`` and say so on one line; returns the new path."""
    rejected = os.path.join(out_dir, REJECTED_DIR)
    os.makedirs(rejected, exist_ok=True)
    name = os.path.basename(path)
    ns = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"
    dest = os.path.join(rejected, f"{name}.{stamp}")
    while os.path.lexists(dest):
        dest += "_"
    os.rename(path, dest)
    print(f"pairs: {name} in {out_dir} {why}; moved it to {dest} and regenerating it", file=sys.stderr, flush=True)
    return dest


def _plan_key(plan: dict) -> dict:
    """The parts of a plan that must match for a resumed generation (not paths, timings or its id)."""
    return {k: v for k, v in plan.items() if k not in ("teacher_path", "created", "plan_id")} | {
        "teacher": {k: plan["teacher"][k] for k in ("sha256", "step")}}


def plan_id(plan: dict) -> str:
    """The id of a generation: the hex SHA-256 of its plan's key (:func:`_plan_key`, canonical JSON).
    The number of workers is not part of it: the pairs do not depend on it."""
    return hashlib.sha256(json.dumps(_plan_key(plan), sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def generate_pairs(teacher: str, out_dir: str, n: int, *, solver: str = "dopri5", nfe: Optional[int] = None,
                   atol: float = 1e-5, rtol: float = 1e-5, shard_size: int = 10_000, seed: int = 0,
                   device: str | torch.device = "auto", progress: bool = True,
                   rank: Optional[int] = None, world_size: Optional[int] = None,
                   guidance: float = 1.0, precision: str = "fp32") -> Optional[dict]:
    """Integrate the teacher's EMA model from ``n`` source draws; store the pairs in ``out_dir``.

    A class-conditional teacher is given labels drawn uniformly per shard (after the shard's noise,
    from the shard's generator) and integrated with classifier-free guidance of scale ``guidance``
    (1 = the conditional field); its shards store the labels ``y`` and the manifest says
    ``labeled``. ``precision="bf16"`` integrates under bf16 autocast (the pairs are stored in fp32).

    Returns the manifest (on every rank, after all shards are written; ``None`` on a rank > 0 run
    without a process group, where rank 0, run last, writes it). Fixed-step solvers take
    ``nfe`` (a multiple of their stages), adaptive ones ``atol``/``rtol``; the manifest records the
    NFE each shard really used.
    """
    started = time.time()  # temporaries older than this were left by writers of an earlier run
    if n < 1 or shard_size < 1:
        raise ConfigError(f"pair generation needs n >= 1 and shard_size >= 1, got n={n}, shard_size={shard_size}")
    r0, w0 = dist_info()
    rank = r0 if rank is None else rank
    world_size = w0 if world_size is None else world_size
    if str(device) == "auto" and torch.cuda.is_available() and world_size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    dev = resolve_device(device)
    teacher_sha = file_sha256(teacher) if os.path.isfile(teacher) else None
    lm = load_model(teacher, device=dev)  # clear CheckpointError when missing or corrupt
    cfg = lm.config
    s = get_solver(solver, atol=atol, rtol=rtol)
    num_steps = num_steps_for(s, nfe, takes=("nfe",))
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"pair generation precision must be fp32 or bf16, got {precision!r}")
    source = build_source(cfg.data)  # the noise only: the target's images are not needed here
    shape = list(getattr(source, "shape", None) or (cfg.data.dim,))
    classes = getattr(lm.model, "num_classes", None)
    num_shards = math.ceil(n / shard_size)
    plan = {
        "format": PAIRS_FORMAT, "version": PAIRS_VERSION, "count": n, "shard_size": shard_size,
        "num_shards": num_shards, "seed": seed, "dtype": "float32", "shape": shape,
        "source": cfg.data.source, "target": cfg.data.target,
        "solver": {"name": s.name, "adaptive": s.adaptive, "atol": atol if s.adaptive else None,
                   "rtol": rtol if s.adaptive else None, "nfe": None if s.adaptive else nfe,
                   "num_steps": num_steps, "grid": "adaptive" if s.adaptive else "uniform"},
        "teacher": {"sha256": teacher_sha, "step": lm.step, "config": to_dict(cfg)},
        "teacher_path": os.path.abspath(teacher),
    }
    if classes or precision != "fp32":  # keys only where they say something, so toy plans are unchanged
        plan |= {"labeled": bool(classes), "guidance": guidance if classes else None, "precision": precision}
    pid = plan["plan_id"] = plan_id(plan)
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write-test-{rank}")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise FlowmatchError(f"cannot write pairs to {out_dir}: {e.strerror}") from None
    plan_path = os.path.join(out_dir, "plan.json")
    if os.path.exists(plan_path):  # every rank checks, so all of them fail alike (no rank left at a barrier)
        try:
            with open(plan_path) as f:
                old = json.load(f)
            have = _plan_key(old)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise PairStoreError(f"{plan_path} is not a pair generation plan; use a new output directory") from None
        want = _plan_key(plan)
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise PairStoreError(f"{out_dir} holds pairs of another generation (differs in {', '.join(diff)}); "
                                 f"use a new output directory")
        if rank == 0 and old.get("plan_id") != pid:  # a plan written before plans had ids: record it
            atomic_write_text(plan_path, json.dumps(plan, indent=1))
    elif rank == 0:
        atomic_write_text(plan_path, json.dumps(plan, indent=1))
    if rank == 0:  # before the barrier: no other rank of this run writes until rank 0 has passed it
        stale = remove_temporaries(out_dir, older_than=started)
        if stale:
            print(f"pairs: removed {len(stale)} temporary file(s) of an interrupted writer from {out_dir}: "
                  f"{', '.join(os.path.basename(p) for p in stale)}", file=sys.stderr, flush=True)
    # a finished store's manifest (of this plan) records each shard's file: a shard must still be that file
    recorded = {}
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            old_manifest = json.load(f)
        if isinstance(old_manifest, dict) and old_manifest.get("plan_id") == pid:
            recorded = {sh["file"]: sh["sha256"] for sh in old_manifest["shards"]}
    except (OSError, ValueError, TypeError, KeyError):
        pass  # no manifest yet, or one of no use: it is rewritten from proven shards at the end
    labeled = bool(classes)
    _barrier(world_size)

    from tqdm.auto import tqdm  # lazy

    mine = [i for i in range(num_shards) if i % world_size == rank]
    lm.model.eval()
    for i in tqdm(mine, desc=f"pairs (rank {rank})" if world_size > 1 else "pairs", disable=None if progress else True, leave=False):
        count = min(shard_size, n - i * shard_size)
        path = os.path.join(out_dir, shard_name(i))
        sd = shard_seed(seed, i)
        d, why = _check_shard(path, index=i, count=count, shape=shape, seed=sd, pid=pid, labeled=labeled,
                              file_sha256_=recorded.get(shard_name(i)))
        if d is not None:
            continue
        if why is not None:
            _move_aside(path, out_dir, why)
        g = make_generator(sd)
        x0 = source.sample(count, generator=g).to(dev)
        record = {}
        v = lm.model
        if classes:
            y = torch.randint(0, classes, (count,), generator=g).to(dev)
            v = ClassifierFreeGuidance(lm.model, y, guidance)
            record["y"] = y.cpu().clone()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            traj = solve(v, x0, s, nfe=nfe, atol=atol, rtol=rtol)
        # compact copies: an endpoint can be a view into the whole solution, and torch.save writes a
        # view's entire storage
        shard = {"x0": x0.float().cpu().clone(), "x1": traj.x1.float().cpu().clone(), "index": i, "seed": sd,
                 "nfe": int(traj.nfe), "count": count, "plan": pid, **record}
        atomic_save({**shard, "data_sha256": shard_data_sha256(shard)}, path)
    _barrier(world_size)
    mpath = os.path.join(out_dir, "manifest.json")
    if rank == 0:
        shards = []
        for i in range(num_shards):
            path = os.path.join(out_dir, shard_name(i))
            count = min(shard_size, n - i * shard_size)
            d, why = _check_shard(path, index=i, count=count, shape=shape, seed=shard_seed(seed, i), pid=pid,
                                  labeled=labeled)
            if d is None:
                raise PairStoreError(f"shard {shard_name(i)} in {out_dir} "
                                     f"{why or 'is missing'} after generation; rerun to regenerate it")
            shards.append({"file": shard_name(i), "count": count, "seed": int(d["seed"]), "nfe": int(d["nfe"]),
                           "sha256": file_sha256(path), "data_sha256": d["data_sha256"]})
        manifest = {**plan, "shards": shards,
                    "nfe_per_sample": sum(sh["nfe"] * sh["count"] for sh in shards) / n}
        atomic_write_text(mpath, json.dumps(manifest, indent=1))
    _barrier(world_size)
    if rank != 0 and not os.path.exists(mpath):
        return None  # ranks run without a process group (one after another): rank 0 writes the manifest last
    return read_manifest(out_dir)

