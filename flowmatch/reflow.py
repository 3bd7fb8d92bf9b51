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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Optional

import torch

from flowmatch.config import to_dict
from flowmatch.data.task import build_source
from flowmatch.data.pairs import PAIRS_FORMAT, PAIRS_VERSION, PairStoreError, read_manifest, shard_name
from flowmatch.errors import ConfigError, FlowmatchError
from flowmatch.models import ClassifierFreeGuidance
from flowmatch.io import atomic_save, atomic_write_text, file_sha256
from flowmatch.solvers import get_solver, solve
from flowmatch.training.checkpoint import load_model
from flowmatch.training.distributed import dist_info, init_distributed_from_env  # noqa: F401 (re-exported)
from flowmatch.utils import make_generator, resolve_device

__all__ = ["shard_seed", "generate_pairs", "dist_info", "init_distributed_from_env"]


def shard_seed(seed: int, index: int) -> int:
    """A 63-bit seed for shard ``index`` of a store seeded with ``seed`` (independent of workers)."""
    return int(hashlib.sha256(f"flowmatch-pairs:{seed}:{index}".encode()).hexdigest()[:15], 16)


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _read_shard(path: str, count: int, shape: list) -> Optional[dict]:
    """The shard at ``path`` if it exists, loads and holds ``count`` pairs of ``shape``; else None."""
    if not os.path.exists(path):
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable shard is regenerated
        return None
    ok = list(d["x0"].shape) == [count, *shape] and d["x1"].shape == d["x0"].shape
    return d if ok else None


def _plan_key(plan: dict) -> dict:
    """The parts of a plan that must match for a resumed generation (not paths or timings)."""
    return {k: v for k, v in plan.items() if k not in ("teacher_path", "created")} | {
        "teacher": {k: plan["teacher"][k] for k in ("sha256", "step")}}


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
    if s.adaptive and nfe is not None:
        raise ConfigError(f"solver {solver!r} is adaptive: give atol/rtol, not nfe")
    if not s.adaptive:
        if nfe is None or s.steps_for_nfe(nfe) is None:
            raise ConfigError(f"solver {solver!r} needs nfe, a positive multiple of {s.stages}; got {nfe}")
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
                   "num_steps": None if s.adaptive else s.steps_for_nfe(nfe), "grid": "adaptive" if s.adaptive else "uniform"},
        "teacher": {"sha256": teacher_sha, "step": lm.step, "config": to_dict(cfg)},
        "teacher_path": os.path.abspath(teacher),
    }
    if classes or precision != "fp32":  # keys only where they say something, so toy plans are unchanged
        plan |= {"labeled": bool(classes), "guidance": guidance if classes else None, "precision": precision}
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
        with open(plan_path) as f:
            old = json.load(f)
        have, want = _plan_key(old), _plan_key(plan)
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise PairStoreError(f"{out_dir} holds pairs of another generation (differs in {', '.join(diff)}); "
                                 f"use a new output directory")
    elif rank == 0:
        atomic_write_text(plan_path, json.dumps(plan, indent=1))
    _barrier(world_size)

    from tqdm.auto import tqdm  # lazy

    mine = [i for i in range(num_shards) if i % world_size == rank]
    lm.model.eval()
    for i in tqdm(mine, desc=f"pairs (rank {rank})" if world_size > 1 else "pairs", disable=None if progress else True, leave=False):
        count = min(shard_size, n - i * shard_size)
        path = os.path.join(out_dir, shard_name(i))
        if _read_shard(path, count, shape) is not None:
            continue
        sd = shard_seed(seed, i)
        g = make_generator(sd)
        x0 = source.sample(count, generator=g).to(dev)
        record = {}
        v = lm.model
        if classes:
            y = torch.randint(0, classes, (count,), generator=g).to(dev)
            v = ClassifierFreeGuidance(lm.model, y, guidance)
            record["y"] = y.cpu()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            traj = solve(v, x0, s, nfe=nfe, atol=atol, rtol=rtol)
        atomic_save({"x0": x0.float().cpu(), "x1": traj.x1.float().cpu(), "index": i, "seed": sd, "nfe": traj.nfe,
                     **record}, path)
    _barrier(world_size)
    mpath = os.path.join(out_dir, "manifest.json")
    if rank == 0:
        shards = []
        for i in range(num_shards):
            path = os.path.join(out_dir, shard_name(i))
            count = min(shard_size, n - i * shard_size)
            d = _read_shard(path, count, shape)
            if d is None:
                raise PairStoreError(f"shard {shard_name(i)} in {out_dir} is missing after generation")
            shards.append({"file": shard_name(i), "count": count, "seed": int(d["seed"]), "nfe": int(d["nfe"]),
                           "sha256": file_sha256(path)})
        manifest = {**plan, "shards": shards,
                    "nfe_per_sample": sum(sh["nfe"] * sh["count"] for sh in shards) / n}
        atomic_write_text(mpath, json.dumps(manifest, indent=1))
    _barrier(world_size)
    if rank != 0 and not os.path.exists(mpath):
        return None  # ranks run without a process group (one after another): rank 0 writes the manifest last
    return read_manifest(out_dir)

