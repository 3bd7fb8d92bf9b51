"""Data-parallel training across processes with ``torch.distributed``, as ``torchrun`` starts it.

``torchrun --nproc_per_node N -m flowmatch train CONFIG --out DIR`` starts N processes with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment.
:func:`~flowmatch.training.loop.train` calls :func:`init_distributed_from_env`, which starts the
process group (gloo on the CPU, NCCL with CUDA, each process on ``cuda:LOCAL_RANK``); the model is
then wrapped in ``DistributedDataParallel`` and every rank trains on its own batches (see
:mod:`flowmatch.training.loop` for what each rank writes).

Randomness per rank (:func:`rank_seed`): rank ``r`` draws its batches from a generator seeded
``seed + 1000 * r``, so rank 0 keeps the single-process stream and a world of size 1 is the
single-process run draw for draw. A rank that resumes without a saved state of its own (a
checkpoint of another world size) re-seeds from ``(seed, rank, step)`` (:func:`resume_seed`).

Every helper is a no-op (or the identity) without an initialised process group of two or more
processes, so single-process code calls them unconditionally.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

from flowmatch.errors import FlowmatchError

__all__ = ["dist_info", "is_distributed", "init_distributed_from_env", "is_main", "barrier", "all_reduce_mean",
           "all_reduce_sum", "broadcast_object", "all_gather_object", "cleanup", "local_device", "rank_seed",
           "resume_seed", "RANK_SEED_STRIDE"]

# rank r's data generator is seeded seed + RANK_SEED_STRIDE * r (rank 0: the single-process seed)
RANK_SEED_STRIDE = 1000

_cleanup_registered = False


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise FlowmatchError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def is_distributed() -> bool:
    """True inside an initialised process group of two or more processes."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else from torchrun's environment
    (``RANK``, ``WORLD_SIZE``; ``(0, 1)`` outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def is_main() -> bool:
    """True on rank 0 (and in a single process): the process that writes files and logs."""
    return dist_info()[0] == 0


def init_distributed_from_env(backend: Optional[str] = None) -> bool:
    """Start the process group when torchrun's environment says ``WORLD_SIZE`` > 1.

    ``backend`` defaults to ``nccl`` with CUDA and ``gloo`` otherwise; with CUDA the process's
    device becomes ``cuda:LOCAL_RANK`` (NCCL and the object collectives use the current device).
    Returns True if this call started the group; it is destroyed at interpreter exit (or earlier by
    :func:`cleanup`). Returns False for a single process or a group that is already running.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise FlowmatchError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and "nccl" in backend:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
    dist.init_process_group(backend=backend)
    global _cleanup_registered
    if not _cleanup_registered:
        # without it torch warns at exit (NCCL) that the group was never destroyed
        atexit.register(cleanup)
        _cleanup_registered = True
    return True


def cleanup(sync: bool = False) -> None:
    """Destroy the process group if one is running.

    Unreachable objects are collected first: a ``DistributedDataParallel`` module left in a
    reference cycle (a trainer) would otherwise be freed after its group, at interpreter exit, and
    gloo aborts the process there ("terminate called without an active exception"). With
    ``sync=True`` every rank waits for the others before the group goes: pass it on the success
    path only, where every rank arrives (a rank that failed never does)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``device`` for this process: a CUDA device becomes ``cuda:LOCAL_RANK`` in a distributed run
    (one GPU per process, whatever index the config names)."""
    device = torch.device(device)
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", _env_int("LOCAL_RANK", dist.get_rank()) % torch.cuda.device_count())
    return device


def _comm_device() -> torch.device:
    """The device collectives run on: NCCL reduces CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, mean: bool) -> torch.Tensor:
    if not is_distributed():
        return tensor
    dev = _comm_device()
    buf = tensor if tensor.device == dev else tensor.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if mean:
        buf.div_(dist.get_world_size())
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (the identity in a single process); returns it."""
    return _all_reduce(tensor, mean=False)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` (floating point) over the ranks, in place; returns it."""
    return _all_reduce(tensor, mean=True)


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: Any = None, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself in a single process."""
    if not is_distributed():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """The data generator's seed on ``rank``: ``seed + 1000 * rank`` (rank 0 keeps ``seed``)."""
    return int(seed) + RANK_SEED_STRIDE * int(rank)


def resume_seed(seed: int, rank: int, step: int) -> int:
    """A 60-bit seed for ``rank`` resuming at ``step`` without a saved generator state of its own;
    a function of ``(seed, rank, step)`` only, so such a resume is reproducible."""
    return int(hashlib.sha256(f"flowmatch-train:{seed}:{rank}:{step}".encode()).hexdigest()[:15], 16)
