"""Data-parallel training on the CPU (gloo): two ranks, each on its part of a fixed batch, give the
single process's gradient, loss and step on the whole batch (plain and fast, with gradient
accumulation under no_sync); every rank's stream resumes exactly; rank 0 alone prepares the run
directory; and ``torchrun --nproc_per_node 2 -m flowmatch train`` writes one checkpoint and one
metrics file from rank 0, and resumes.

Each multi-process test runs under a deadline, so a hang fails instead of blocking the suite."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import make_tiny_cfg, replay_objective
from flowmatch.config import save_config
from flowmatch.errors import FlowmatchError
from flowmatch.training import build_trainer, load_checkpoint, read_metrics, train
from flowmatch.training import distributed as du
from flowmatch.utils import make_generator

REPO = pathlib.Path(__file__).resolve().parents[1]
WORLD = 2
QUARTER = 8  # rows per micro-batch: 2 ranks x 2 micro-batches x 8 = the whole batch of 32
# a small clip, so the step depends on the (averaged) gradient's norm too
BASE = ("train.grad_clip=0.05", "train.weight_decay=0.01")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quarters() -> list:
    g = make_generator(11)
    x0 = torch.randn(4 * QUARTER, 2, generator=g)
    x1 = 2 + torch.randn(4 * QUARTER, 2, generator=g)
    t = torch.rand(4 * QUARTER, generator=g)
    return [(x0[i:i + QUARTER], x1[i:i + QUARTER], t[i:i + QUARTER]) for i in range(0, 4 * QUARTER, QUARTER)]


def _resume_cfg():
    return make_tiny_cfg("coupling.name=ot", "train.grad_accum=2")


def _worker(rank: int, world: int, port: int, out_dir: str, results=None) -> None:
    """Rank ``rank``'s process: join the group, save ``results(rank, out_dir)`` (default
    :func:`_rank_results`) to ``out_dir/rank{rank}.pt``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert du.init_distributed_from_env() is True
    ok = False
    try:
        # the trainers (and their DDP modules) live in _rank_results only: gone before the group is
        torch.save((results or _rank_results)(rank, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
        ok = True
    finally:
        du.cleanup(sync=ok)


def _rank_results(rank: int, out_dir: str) -> dict:
    res = {"info": du.dist_info(), "main": du.is_main(),
           "mean": du.all_reduce_mean(torch.tensor([float(rank)])).item(),
           "sum": du.all_reduce_sum(torch.tensor([rank + 1.0])).item(),
           "bcast": du.broadcast_object({"from": rank}), "gather": du.all_gather_object(rank)}
    q = _quarters()
    for fast in (False, True):
        # rank r's micro-batches are quarters 2r and 2r + 1 of the fixed batch
        tr = build_trainer(make_tiny_cfg(*BASE, "train.grad_accum=2", f"train.batch_size={QUARTER}"), fast=fast,
                           objective=replay_objective([q[2 * rank], q[2 * rank + 1]]))
        assert isinstance(tr.net, DistributedDataParallel) and tr.world_size == WORLD
        loss, _ = tr.train_step.accumulate()
        res[f"loss_{fast}"] = loss.item()
        res[f"grads_{fast}"] = [p.grad.clone() for p in tr.model.parameters()]
        out = tr.step()
        res[f"step_loss_{fast}"] = out.loss.item()
        res[f"params_{fast}"] = [p.detach().clone() for p in tr.model.parameters()]
        res[f"ema_{fast}"] = [p.detach().clone() for p in tr.ema.model.parameters()]
    # exact resume: every rank takes its own generator back from the checkpoint payload
    cfg = _resume_cfg()
    a = build_trainer(cfg, fast=True)
    a.run(4)
    res["unbroken"] = a.sync()
    _, counts = a.take_bins()
    res["bin_count"] = counts.sum().item()
    b = build_trainer(cfg, fast=True)
    b.run(2)
    first = b.sync()
    state = b.state_dict()
    c = build_trainer(cfg, fast=True)
    c.load_state_dict(state)
    c.run(2)
    res["resumed"] = first + c.sync()
    res["world_size"] = state["world_size"]
    res["rank_generators"] = [r["generator"] for r in state["ranks"]]
    res["main_generator"] = state["rng"]["generator"]
    # rank 0 refuses a directory that holds another run; rank 1 stops with it instead of waiting
    held = os.path.join(out_dir, "held")
    if rank == 0:
        os.makedirs(held)
        open(os.path.join(held, "config.yaml"), "w").close()
    du.barrier()
    try:
        train(make_tiny_cfg(), held, progress=False)
        res["refused"] = None
    except FlowmatchError as e:
        res["refused"] = f"{type(e).__name__}: {e}"
    return res


def _spawn(out_dir: str, timeout: float = 120.0, results=None) -> list[dict]:
    """Run ``results`` (a module-level function of ``(rank, out_dir)``) on every rank; their results."""
    ctx = mp.start_processes(_worker, args=(WORLD, _free_port(), out_dir, results), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} ranks did not finish within {timeout:.0f} s (a collective hung?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _spawn(str(tmp_path_factory.mktemp("ddp")))


def test_collectives_and_rank_info(ranks):
    for r, res in enumerate(ranks):
        assert res["info"] == (r, WORLD) and res["main"] == (r == 0)
        assert res["mean"] == 0.5 and res["sum"] == 3.0
        assert res["bcast"] == {"from": 0} and res["gather"] == [0, 1]


@pytest.mark.crosspath  # two ranks against one process: other reduction order, within rel 1e-6
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_two_ranks_with_accumulation_equal_one_process_on_the_whole_batch(ranks, fast):
    q = _quarters()
    whole = tuple(torch.cat([part[i] for part in q]) for i in range(3))
    ref = build_trainer(make_tiny_cfg(*BASE, f"train.batch_size={4 * QUARTER}"), fast=fast, objective=replay_objective([whole]))
    assert ref.world_size == 1 and ref.net is ref.model
    loss, _ = ref.train_step.accumulate()
    grads = [p.grad.clone() for p in ref.model.parameters()]
    out = ref.step()
    for res in ranks:
        assert res[f"loss_{fast}"] == pytest.approx(loss.item(), rel=1e-6)  # the mean over the ranks
        assert res[f"step_loss_{fast}"] == pytest.approx(out.loss.item(), rel=1e-6)
        for a, b in zip(res[f"grads_{fast}"], grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(res[f"params_{fast}"], ref.model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for a, b in zip(res[f"ema_{fast}"], ref.ema.model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_every_rank_resumes_its_own_stream_and_rank_zero_keeps_the_single_process_one(ranks):
    for res in ranks:
        assert len(res["unbroken"]) == 4 and res["resumed"] == res["unbroken"]
        assert res["world_size"] == WORLD
        # the t-bins are summed over the ranks: 4 steps x 2 micro-batches x 32 rows x 2 ranks
        assert res["bin_count"] == 4 * 2 * 32 * WORLD
    assert ranks[0]["unbroken"] == ranks[1]["unbroken"]  # the logged loss is the mean over the ranks
    g0, g1 = ranks[0]["rank_generators"]
    assert not torch.equal(g0, g1)  # each rank draws its own batches
    assert torch.equal(ranks[0]["main_generator"], g0)
    # rank 0's generator is seeded as a single process's: after the same draws, the same state
    single = build_trainer(_resume_cfg(), fast=True)
    single.run(2)
    assert torch.equal(single.generator.get_state(), g0)


def test_a_refusal_on_rank_zero_stops_every_rank(ranks):
    assert ranks[0]["refused"].startswith("RunDirError") and "already holds a run" in ranks[0]["refused"]
    assert ranks[1]["refused"].startswith("RunDirError") and "rank 0 could not prepare" in ranks[1]["refused"]


def _torchrun(args: list, timeout: float = 150.0) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           "-m", "flowmatch", "train", *args, "--no-progress"]
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {timeout:.0f} s")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def test_torchrun_train_writes_from_rank_zero_only_and_resumes(tmp_path):
    cfg = make_tiny_cfg("train.steps=4", "train.ckpt_every=2", "train.log_every=2", "train.fast=on",
                        "train.grad_accum=2", "tracking.mode=disabled")
    path = str(tmp_path / "tiny.yaml")
    save_config(cfg, path)
    run = tmp_path / "run"
    _torchrun([path, "--out", str(run)])
    assert sorted(os.listdir(run / "checkpoints")) == ["last.pt"]
    ckpt = load_checkpoint(str(run / "checkpoints" / "last.pt"))
    assert ckpt["step"] == 4 and ckpt["world_size"] == WORLD and len(ckpt["ranks"]) == WORLD
    rows = read_metrics(str(run / "metrics.jsonl"))
    # one writer: each training row once, and the evaluation's row once
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert [r["step"] for r in rows if "train/loss" not in r] == [4]
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows if "train/loss" in r)
    assert not list(run.glob("wandb*"))

    _torchrun([path, "--out", str(run), "--resume", "--set", "train.steps=6"])
    ckpt = load_checkpoint(str(run / "checkpoints" / "last.pt"))
    assert ckpt["step"] == 6 and sorted(os.listdir(run / "checkpoints")) == ["last.pt"]
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
