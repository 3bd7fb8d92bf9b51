"""Reflow: pair generation (sharded, resumable, worker-count independent), the pair store's checks,
the paired coupling, the real-data mix, distillation and the k-RF chain."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from flowmatch.config import to_dict
from flowmatch.couplings import PairedCoupling
from flowmatch.data.pairs import PairStore, PairStoreError, shard_name
from flowmatch.errors import RunDirError
from flowmatch.io import atomic_save, file_sha256
from flowmatch.reflow import generate_pairs, shard_seed
from flowmatch.training import load_model, train
from flowmatch.utils import make_generator

TEACHER_OVERRIDES = ("data.target=moons", "train.steps=30", "model.time_embedding=fourier", "model.fourier_scale=1.0")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, make_cfg):
    run = tmp_path_factory.mktemp("teacher")
    train(make_cfg(*TEACHER_OVERRIDES), str(run), progress=False)
    return str(run / "checkpoints" / "last.pt")


def _gen(teacher, out, n=50, shard_size=10, **kw):
    kw.setdefault("solver", "rk4")
    kw.setdefault("nfe", 8)
    return generate_pairs(teacher, str(out), n, shard_size=shard_size, progress=False, **kw)


def _tensors(path):
    store = PairStore(str(path))
    return store.x0, store.x1


# --- generation ---------------------------------------------------------------------------------

def test_manifest_records_provenance(teacher, tmp_path):
    m = _gen(teacher, tmp_path / "p", n=25, shard_size=10)
    assert m["count"] == 25 and [s["count"] for s in m["shards"]] == [10, 10, 5]
    assert m["teacher"]["sha256"] == file_sha256(teacher)
    assert m["teacher"]["config"]["data"]["target"] == "moons"
    assert m["solver"] == {"name": "rk4", "adaptive": False, "atol": None, "rtol": None, "nfe": 8, "num_steps": 2,
                           "grid": "uniform"}
    assert all(s["nfe"] == 8 for s in m["shards"]) and m["nfe_per_sample"] == 8
    assert m["dtype"] == "float32" and m["shape"] == [2]
    assert [s["seed"] for s in m["shards"]] == [shard_seed(0, i) for i in range(3)]
    for s in m["shards"]:
        assert file_sha256(str(tmp_path / "p" / s["file"])) == s["sha256"]


def test_pairs_are_the_teachers_ode_endpoints(teacher, tmp_path):
    _gen(teacher, tmp_path / "p", n=10, shard_size=10)
    d = torch.load(tmp_path / "p" / shard_name(0), weights_only=True)
    model = load_model(teacher).model
    x0 = d["x0"]
    # two RK4 steps of h = 1/2, written out here
    with torch.no_grad():
        x = x0.clone()
        for t0 in (0.0, 0.5):
            h = 0.5
            t = torch.full((len(x),), t0)
            k1 = model(x, t)
            k2 = model(x + h / 2 * k1, t + h / 2)
            k3 = model(x + h / 2 * k2, t + h / 2)
            k4 = model(x + h * k3, t + h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(d["x1"], x, rtol=1e-5, atol=1e-5)
    # the source draws are N(0, I) from the shard's own seed
    torch.testing.assert_close(x0, torch.randn(10, 2, generator=make_generator(shard_seed(0, 0))))


@pytest.mark.crosspath
def test_pairs_identical_across_worker_counts(teacher, tmp_path):
    # bit for bit on any host: a shard is one solve of the same rows from its own seed, whichever
    # worker makes it, so every worker count runs the same kernels on the same tensors
    _gen(teacher, tmp_path / "one", n=45, shard_size=10)
    for rank in (2, 1, 0):  # three workers; rank 0 writes the manifest once all shards exist
        _gen(teacher, tmp_path / "three", n=45, shard_size=10, rank=rank, world_size=3)
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "three")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ma = json.loads((tmp_path / "one" / "manifest.json").read_text())
    mb = json.loads((tmp_path / "three" / "manifest.json").read_text())
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]


def test_different_seeds_give_different_pairs(teacher, tmp_path):
    _gen(teacher, tmp_path / "a", n=10, seed=0)
    _gen(teacher, tmp_path / "b", n=10, seed=1)
    assert not torch.equal(_tensors(tmp_path / "a")[0], _tensors(tmp_path / "b")[0])


def test_generation_resumes_after_kill_writing_only_missing_shards(teacher, tmp_path, monkeypatch):
    import flowmatch.reflow as reflow

    real_solve = reflow.solve
    calls = []

    def dying_solve(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while solving the third shard
        return real_solve(*a, **k)

    monkeypatch.setattr(reflow, "solve", dying_solve)
    with pytest.raises(KeyboardInterrupt):
        _gen(teacher, tmp_path / "p", n=50, shard_size=10)
    assert sorted(os.listdir(tmp_path / "p")) == ["plan.json", shard_name(0), shard_name(1)]  # no temp files
    with pytest.raises(PairStoreError, match="no manifest"):
        PairStore(str(tmp_path / "p"))
    kept = (tmp_path / "p" / shard_name(0)).stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(reflow, "solve", lambda *a, **k: (calls.append(1), real_solve(*a, **k))[1])
    _gen(teacher, tmp_path / "p", n=50, shard_size=10)
    assert len(calls) == 3  # shards 2, 3, 4 only
    assert (tmp_path / "p" / shard_name(0)).stat().st_mtime_ns == kept
    _gen(teacher, tmp_path / "clean", n=50, shard_size=10)
    a, b = _tensors(tmp_path / "p"), _tensors(tmp_path / "clean")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_truncated_shard_is_regenerated_on_resume(teacher, tmp_path):
    _gen(teacher, tmp_path / "p", n=20, shard_size=10)
    want = _tensors(tmp_path / "p")
    f = tmp_path / "p" / shard_name(1)
    f.write_bytes(f.read_bytes()[:100])
    (tmp_path / "p" / "manifest.json").unlink()
    _gen(teacher, tmp_path / "p", n=20, shard_size=10)
    got = _tensors(tmp_path / "p")
    assert torch.equal(want[1], got[1])


def test_adaptive_generation_records_measured_nfe(teacher, tmp_path):
    m = _gen(teacher, tmp_path / "p", n=20, shard_size=10, solver="dopri5", nfe=None, atol=1e-4, rtol=1e-4)
    assert m["solver"]["adaptive"] and m["solver"]["atol"] == 1e-4
    assert all(s["nfe"] >= 6 for s in m["shards"])  # at least one dopri5 step (6 stages) plus the probe
    assert m["nfe_per_sample"] == sum(s["nfe"] for s in m["shards"]) / 2


# --- refusals -----------------------------------------------------------------------------------

def test_store_refuses_mismatches(teacher, tmp_path, make_cfg):
    _gen(teacher, tmp_path / "p", n=20, shard_size=10)
    with pytest.raises(PairStoreError, match="shape"):
        PairStore(str(tmp_path / "p"), expect_shape=[3])
    with pytest.raises(PairStoreError, match="teacher"):
        PairStore(str(tmp_path / "p"), expect_teacher_sha256="0" * 64)

    bad = tmp_path / "corrupt"
    shutil.copytree(tmp_path / "p", bad)
    raw = bytearray((bad / shard_name(1)).read_bytes())
    raw[-30] ^= 0xFF
    (bad / shard_name(1)).write_bytes(bytes(raw))
    with pytest.raises(PairStoreError, match=f"{shard_name(1)} is corrupt"):
        PairStore(str(bad))

    missing = tmp_path / "missing"
    shutil.copytree(tmp_path / "p", missing)
    (missing / shard_name(0)).unlink()
    with pytest.raises(PairStoreError, match=f"{shard_name(0)} is missing"):
        PairStore(str(missing))

    with pytest.raises(PairStoreError, match="no pair store"):
        PairStore(str(tmp_path / "nowhere"))


def test_generation_refuses_a_directory_of_another_teacher(teacher, tmp_path, make_cfg):
    _gen(teacher, tmp_path / "p", n=20, shard_size=10)
    other = tmp_path / "other"
    train(make_cfg(*TEACHER_OVERRIDES, "train.seed=7"), str(other), progress=False)
    before = (tmp_path / "p" / shard_name(0)).read_bytes()
    with pytest.raises(PairStoreError, match="another generation"):
        _gen(str(other / "checkpoints" / "last.pt"), tmp_path / "p", n=20, shard_size=10)
    with pytest.raises(PairStoreError, match="another generation"):
        _gen(teacher, tmp_path / "p", n=20, shard_size=10, nfe=16)
    assert (tmp_path / "p" / shard_name(0)).read_bytes() == before


def test_training_refuses_pairs_of_another_task(teacher, tmp_path, make_cfg):
    _gen(teacher, tmp_path / "p", n=20, shard_size=10)  # gaussian -> moons
    cfg = make_cfg("data.target=8gaussians", "coupling.name=paired", f"coupling.pairs={tmp_path / 'p'}")
    with pytest.raises(PairStoreError, match="maps gaussian -> moons"):
        train(cfg, str(tmp_path / "run"), progress=False)
    with pytest.raises(Exception, match="coupling.pairs"):
        train(make_cfg("coupling.name=paired"), str(tmp_path / "run2"), progress=False)


def test_bad_teacher_and_unwritable_output_are_clear_errors(teacher, tmp_path, capsys):
    from flowmatch.cli import main

    assert main(["reflow", "generate", "--teacher", str(tmp_path / "none.pt"), "--n", "10", "--out",
                 str(tmp_path / "p"), "--no-progress"]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    broken = tmp_path / "broken.pt"
    broken.write_bytes(open(teacher, "rb").read()[:200])
    assert main(["reflow", "generate", "--teacher", str(broken), "--n", "10", "--out", str(tmp_path / "p"),
                 "--no-progress"]) == 2
    assert "truncated" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["reflow", "generate", "--teacher", teacher, "--n", "10", "--solver", "euler", "--nfe", "2",
                 "--out", str(blocker / "p"), "--no-progress"]) == 2
    assert "cannot write pairs" in capsys.readouterr().err


# --- paired coupling, mix, distillation ---------------------------------------------------------

def test_paired_coupling_visits_every_pair_once_per_epoch_and_resumes():
    x0 = torch.arange(10.0)[:, None]
    c = PairedCoupling(x0, 10 * x0)
    g = make_generator(0)
    seen = torch.cat([c.sample(5, generator=g).x0 for _ in range(2)]).flatten()
    assert sorted(seen.tolist()) == list(range(10))
    a = c.sample(4, generator=g)
    a0, a1 = a.x0, a.x1
    assert torch.equal(a1, 10 * a0)  # rows stay joint draws
    state, gstate = c.state_dict(), g.get_state()
    nxt = c.sample(7, generator=g).x0  # crosses into the third epoch
    assert c.epoch == 3
    c2 = PairedCoupling(x0, 10 * x0)
    c2.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(gstate)
    assert torch.equal(c2.sample(7, generator=g2).x0, nxt)


def _write_store(path, x0, x1, source="gaussian", target="gaussian"):
    """A pair store written by hand (manifest + one shard), as generate_pairs would."""
    os.makedirs(path, exist_ok=True)
    atomic_save({"x0": x0, "x1": x1, "index": 0, "seed": 0, "nfe": 0}, os.path.join(path, shard_name(0)))
    m = {"format": "flowmatch-pairs", "version": 1, "count": len(x0), "shard_size": len(x0), "num_shards": 1,
         "seed": 0, "dtype": "float32", "shape": list(x0.shape[1:]), "source": source, "target": target,
         "solver": {"name": "exact"}, "teacher": {"sha256": "analytic", "step": 0, "config": {}},
         "teacher_path": "", "nfe_per_sample": 0,
         "shards": [{"file": shard_name(0), "count": len(x0), "seed": 0, "nfe": 0,
                     "sha256": file_sha256(os.path.join(path, shard_name(0)))}]}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(m, f)


@pytest.mark.parametrize("distill", [False, True])
def test_student_of_an_analytic_linear_teacher_reproduces_its_map(tmp_path, make_cfg, distill):
    # Teacher: the linear map between N(0, I) and N(m, diag(s)^2), x1 = m + s * x0 (the OT map).
    m, s = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
    x0 = torch.randn(4096, 2, generator=make_generator(0))
    _write_store(tmp_path / "pairs", x0, m + s * x0)
    extra = ["time.name=constant", "time.value=0.0"] if distill else ["time.name=u_shaped"]
    cfg = make_cfg("data.target=gaussian", "coupling.name=paired", f"coupling.pairs={tmp_path / 'pairs'}",
                   "train.init=random", "train.steps=400", "train.batch_size=256", "train.lr=3e-3",
                   "train.ema_decay=0.9", "model.hidden=32", "model.time_embedding=fourier",
                   "model.fourier_scale=1.0", *extra)
    res = train(cfg, str(tmp_path / "run"), progress=False)
    xt = torch.randn(2000, 2, generator=make_generator(1))
    with torch.no_grad():
        one_step = xt + res.model(xt, torch.zeros(len(xt)))
    err = (one_step - (m + s * xt)).pow(2).sum(1).mean().item()
    spread = (m + s * xt).var(0).sum().item()
    assert err < 0.01 * spread, f"one-step map error {err:.4f} vs target spread {spread:.2f}"


@pytest.mark.crosspath
def test_mix_zero_is_plain_flow_matching(teacher, tmp_path, make_cfg):
    _gen(teacher, tmp_path / "p", n=20, shard_size=10)
    # both in the plain loop (train.fast=off): the same arithmetic, so the same floats (the fused MLP
    # step, which the independent run would take by default on the CPU, sums in another order)
    plain = train(make_cfg("data.target=moons", "train.fast=off"), str(tmp_path / "plain"), progress=False)
    mixed = train(make_cfg("data.target=moons", "coupling.name=paired", f"coupling.pairs={tmp_path / 'p'}",
                           "coupling.mix=0.0", "train.init=random", "train.fast=off"), str(tmp_path / "mixed"),
                  progress=False)
    assert plain.losses == mixed.losses


def test_mix_weighs_pairs_and_real_data(teacher, tmp_path, make_cfg, monkeypatch):
    from flowmatch.training import CFM, OBJECTIVES, regression_loss

    _gen(teacher, tmp_path / "p", n=20, shard_size=10)
    seen = []

    class Spy(CFM):  # each term's own loss
        def loss(self, nets, batch, player="student"):
            seen.extend(regression_loss(nets.student, [b], self.distance).loss.item() for b in batch.terms())
            return super().loss(nets, batch, player)

    monkeypatch.setitem(OBJECTIVES, "cfm", Spy)
    res = train(make_cfg("data.target=moons", "coupling.name=paired", f"coupling.pairs={tmp_path / 'p'}",
                         "coupling.mix=0.25", "train.steps=3", "train.init=random"), str(tmp_path / "r"),
                progress=False)
    assert len(seen) == 6  # a pair batch and a real batch per step
    for step in range(3):
        lp, lr = seen[2 * step], seen[2 * step + 1]
        assert res.losses[step] == pytest.approx(0.25 * lp + 0.75 * lr, rel=1e-5)


def test_reflow_init_defaults_to_the_teacher(teacher, tmp_path, make_cfg):
    _gen(teacher, tmp_path / "p", n=20, shard_size=10)
    cfg = make_cfg(*TEACHER_OVERRIDES, "coupling.name=paired", f"coupling.pairs={tmp_path / 'p'}", "train.steps=1",
                   "train.lr=1e-12", "train.warmup_steps=0")
    res = train(cfg, str(tmp_path / "r"), progress=False)
    t_model = load_model(teacher).model
    x, t = torch.randn(5, 2), torch.rand(5)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x, t), t_model(x, t), rtol=1e-4, atol=1e-4)
    assert torch.load(res.checkpoint, weights_only=True)["init_from"] == os.path.abspath(teacher)


def test_paired_training_resumes_exactly(teacher, tmp_path, make_cfg):
    _gen(teacher, tmp_path / "p", n=40, shard_size=20)
    cfg = make_cfg(*TEACHER_OVERRIDES, "coupling.name=paired", f"coupling.pairs={tmp_path / 'p'}", "train.steps=20")
    full = train(cfg, str(tmp_path / "a"), progress=False)

    def die(step, loss):
        if step == 13:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(tmp_path / "b"), progress=False, on_step=die)
    resumed = train(cfg, str(tmp_path / "b"), resume=True, progress=False)
    assert resumed.start_step == 10
    assert resumed.losses == full.losses[10:]
    assert torch.load(resumed.checkpoint, weights_only=True)["init_from"] == os.path.abspath(teacher)


# --- the chain ------------------------------------------------------------------------------------

CHAIN = ("name=chain", "data.target=moons", "model.hidden=32", "model.time_embedding=fourier", "model.fourier_scale=1.0",
         "train.steps=300", "train.batch_size=128", "train.lr=3e-3", "train.ckpt_every=300", "train.log_every=100",
         "reflow.num_pairs=2000", "reflow.shard_size=1000", "reflow.solver=rk4", "reflow.nfe=32", "reflow.steps=300",
         "reflow.lr=3e-3", "distill.steps=100", "reflow.bench_n=300", "reflow.bench_nfes=[1,4]")


def test_two_round_reflow_lowers_straightness_and_resumes(tmp_path, make_cfg):
    from flowmatch.reflow_chain import reflow_from_config

    cfg = make_cfg(*CHAIN)
    rows = reflow_from_config(cfg, str(tmp_path / "chain"), rounds=2, distill=True, progress=False)
    stages = {r["stage"]: r for r in rows if r["solver"] == "euler" and r["nfe"] == 1}
    assert list(stages) == ["1-RF", "2-RF", "2-RF+distill"]
    for r in rows:
        assert {"task", "stage", "solver", "nfe", "w2", "w2_floor", "mmd", "straightness"} <= set(r)
    assert stages["2-RF"]["straightness"] < 0.2 * stages["1-RF"]["straightness"]
    assert stages["2-RF"]["w2"] < stages["1-RF"]["w2"]  # one Euler step is far better after reflow
    saved = json.loads((tmp_path / "chain" / "stages.json").read_text())
    assert [r["stage"] for r in saved] == [r["stage"] for r in rows]
    for f in ("w2_vs_nfe.png", "straightness.png", "trajectories.png"):
        assert (tmp_path / "chain" / "plots" / f).stat().st_size > 1000

    ckpt = tmp_path / "chain" / "2-RF" / "checkpoints" / "last.pt"
    before = ckpt.stat().st_mtime_ns
    shutil.rmtree(tmp_path / "chain" / "2-RF+distill")  # as if the chain was killed during distillation
    rows2 = reflow_from_config(cfg, str(tmp_path / "chain"), rounds=2, distill=True, progress=False)
    assert ckpt.stat().st_mtime_ns == before  # finished stages are reused, not retrained
    assert [r["w2"] for r in rows2 if r["stage"] != "2-RF+distill"] == \
           [r["w2"] for r in rows if r["stage"] != "2-RF+distill"]

    # the same chain directory with another distillation: refused, naming the stage to remove
    changed = make_cfg(*CHAIN, "distill.lr=5e-4")
    with pytest.raises(RunDirError, match=r"stage 2-RF\+distill .*train\.lr.*Remove .*2-RF\+distill"):
        reflow_from_config(changed, str(tmp_path / "chain"), rounds=2, distill=True, progress=False)
    assert ckpt.stat().st_mtime_ns == before

    # experiments/toy/paired_w2.py: the one-step student against its teacher on the same draws
    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "toy", "paired_w2.py")
    subprocess.run([sys.executable, script, str(tmp_path / "chain"), "--student", "2-RF+distill", "--draws", "2",
                    "--n", "200", "--also", "2-RF:euler:1", "--also", "1-RF:dopri5", "--also", "2-RF:euler:1",
                    "--fit-n", "3000"], check=True, capture_output=True, timeout=300)
    paired = json.loads((tmp_path / "chain" / "paired_w2.json").read_text())
    s = paired["scores"]
    keys = ["teacher dopri5", "student euler 1", "2-RF euler 1", "1-RF dopri5"]
    assert list(s) == [*keys, "floor", *(f"floor coupled to {k}" for k in keys)]
    # each entry over its coupled floor (moons has layout positions), the ratio of the two means
    for k in keys:
        ratio = paired["summary"][f"{k} / its coupled floor"]
        assert ratio["ratio"] == pytest.approx(sum(s[k]) / sum(s[f"floor coupled to {k}"])) and ratio["se"] >= 0
    # the teacher's coupled floor is drawn through the same map on the same draws either way
    assert s["floor coupled to 1-RF dopri5"] == s["floor coupled to teacher dopri5"]
    assert all(len(v) == 2 for v in s.values()) and paired["n"] == 200
    diffs = [a - b for a, b in zip(s["student euler 1"], s["teacher dopri5"])]
    assert paired["summary"]["student - teacher (paired)"]["mean"] == pytest.approx(sum(diffs) / 2)
    # the same draws for every entry: 1-RF's dopri5 scored again is the teacher's score to the bit, and
    # 2-RF's one Euler step is the stage table's model (its first draw differs from the teacher's)
    assert s["1-RF dopri5"] == s["teacher dopri5"] and paired["summary"]["1-RF dopri5 - teacher (paired)"]["mean"] == 0
    assert s["2-RF euler 1"] != s["teacher dopri5"]
    assert s["floor"] != s["2-RF euler 1"]  # the repeated --also is scored once, not in the floor's place
    floor_diffs = [a - b for a, b in zip(s["floor"], s["teacher dopri5"])]
    assert paired["summary"]["floor - teacher (paired)"]["mean"] == pytest.approx(sum(floor_diffs) / 2)
    bad = subprocess.run([sys.executable, script, str(tmp_path / "chain"), "--also", "2-RF:euler"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--also '2-RF:euler': give STAGE:ADAPTIVE or STAGE:SOLVER:NFE" in bad.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.crosspath
def test_torchrun_two_gloo_processes_make_the_same_store(teacher, tmp_path):
    # bit for bit: each shard is the same solve in whichever process (as across worker counts above)
    _gen(teacher, tmp_path / "one", n=50, shard_size=10)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "flowmatch", "--", "reflow", "generate",
           "--teacher", teacher, "--n", "50", "--shard-size", "10", "--solver", "rk4", "--nfe", "8",
           "--out", str(tmp_path / "two"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("50 pairs in 5 shards") == 1  # rank 0 reports once
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cli_reflow_run_writes_stage_and_target_tables(tmp_path, make_cfg, capsys):
    import yaml

    from flowmatch.cli import main

    cfg = to_dict(make_cfg(*CHAIN, "train.steps=50", "reflow.steps=50", "reflow.num_pairs=500",
                           "reflow.shard_size=500", "reflow.bench_n=200"))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["reflow", "run", str(tmp_path / "a.yaml"), "--rounds", "2", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "S ratio 2-RF/1-RF" in out
    targets = json.loads((tmp_path / "out" / "targets.json").read_text())
    assert targets[0]["task"] == "chain"
    assert targets[0]["S ratio 2-RF/1-RF"] == pytest.approx(targets[0]["S(2-RF)"] / targets[0]["S(1-RF)"])
    stages = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert {r["stage"] for r in stages} == {"1-RF", "2-RF"}
    assert (tmp_path / "out" / "chain" / "stages.md").read_text().startswith("| task | stage |")
    assert main(["reflow", "run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o2")]) == 2


def test_large_stores_stay_memory_mapped_and_train_the_same(teacher, tmp_path):
    from flowmatch.data.pairs import ShardedTensor

    _gen(teacher, tmp_path / "p", n=45, shard_size=10)
    small = PairStore(str(tmp_path / "p"))
    big = PairStore(str(tmp_path / "p"), in_memory_bytes=0)
    assert isinstance(big.x0, ShardedTensor) and len(big.x0) == 45 and big.x0.shape == small.x0.shape
    idx = torch.tensor([44, 0, 9, 10, 23, 23, 30])
    assert torch.equal(big.x0[idx], small.x0[idx]) and torch.equal(big.x1[idx], small.x1[idx])
    assert torch.equal(big.x1.materialize(), small.x1)
    a, b = PairedCoupling(small.x0, small.x1), PairedCoupling(big.x0, big.x1)
    ga, gb = make_generator(5), make_generator(5)
    for _ in range(4):
        xa, xb = a.sample(16, generator=ga), b.sample(16, generator=gb)
        assert torch.equal(xa.x0, xb.x0) and torch.equal(xa.x1, xb.x1)


def test_sweep_shares_one_teacher_and_tabulates_each_value(tmp_path, make_cfg):
    from flowmatch.reflow_chain import reflow_sweep

    cfg = make_cfg(*CHAIN, "train.steps=50", "reflow.steps=30", "reflow.shard_size=500", "reflow.bench_n=100",
                   "reflow.bench_nfes=[1]")
    rows = reflow_sweep(cfg, str(tmp_path / "sw"), "reflow.num_pairs", [200, 400], progress=False)
    assert [r["value"] for r in rows] == [200, 400]
    teacher = str(tmp_path / "sw" / "teacher" / "checkpoints" / "last.pt")
    for r in rows:
        tag = tmp_path / "sw" / f"num_pairs={r['value']}"
        m = json.loads((tag / "pairs-1RF" / "manifest.json").read_text())
        assert m["count"] == r["value"] and m["teacher"]["sha256"] == file_sha256(teacher)
        assert r["teacher NFE per pair"] == 32 and r["2-RF Euler-1 W2"] > 0
    assert len({r["1-RF dopri5 W2"] for r in rows}) == 1  # the same teacher, benchmarked the same way
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text()) == rows


@pytest.mark.parametrize("solver,nfe", [("dopri5", 8), ("rk4", 6), ("rk4", None)])
def test_generation_refuses_an_nfe_as_solve_does(teacher, tmp_path, solver, nfe):
    from flowmatch.errors import ConfigError
    from flowmatch.solvers import get_solver, num_steps_for

    out = tmp_path / "pairs"
    with pytest.raises(ConfigError) as e:
        generate_pairs(teacher, str(out), 10, solver=solver, nfe=nfe, shard_size=10, device="cpu")
    with pytest.raises(ConfigError) as ref:
        num_steps_for(get_solver(solver), nfe, takes=("nfe",))
    assert str(e.value) == str(ref.value)
    assert not out.exists()
