"""The fast training step (flowmatch.training.fast): the same numbers as the plain loop on the CPU
(eager exactly, compiled to float rounding), no host read inside a step, NaN handling without a
per-step check, exact kill-and-resume across modes, the trainer API and the config values."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flowmatch.training.loop as loop_mod
from flowmatch.config import TrainConfig, apply_overrides, from_dict
from flowmatch.errors import ConfigError, NonFiniteLossError
from flowmatch.models import EMA
from flowmatch.reflow import generate_pairs
from flowmatch.training import (build_trainer, last_checkpoint, load_checkpoint, read_metrics, resolve_speed,
                                train)
from flowmatch.training.fast import COMPILE_MODES, FAST_MODES, SpeedPlan
from flowmatch.types import LossOutput
from test_training import _Interrupt  # the same kill-at-step callback as the plain loop's resume tests


@pytest.fixture(scope="module")
def pair_store(tmp_path_factory, make_cfg):
    """A small reflow pair store (gaussian -> 8gaussians, the tiny config's data)."""
    root = tmp_path_factory.mktemp("pairs")
    teacher = train(make_cfg("train.steps=10"), str(root / "teacher"), progress=False)
    generate_pairs(teacher.checkpoint, str(root / "p"), 64, shard_size=32, solver="euler", nfe=2, progress=False)
    return str(root / "p")


def _extra(kind: str, pair_store: str) -> tuple:
    return {"independent": ("coupling.name=independent",),
            "ot-exact": ("coupling.name=ot", "coupling.method=exact"),
            "sigma-logit": ("path.sigma=0.1", "time.name=logit_normal"),
            "paired-mix": ("coupling.name=paired", f"coupling.pairs={pair_store}", "coupling.mix=0.25",
                           "coupling.real=ot", "train.init=random")}[kind]


def _assert_same_state(a: dict, b: dict) -> None:
    for key in ("model",):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    for k, v in a["ema"]["model"].items():
        assert torch.equal(v, b["ema"]["model"][k]), ("ema", k)


# --------------------------------------------------------------------------- same numbers


@pytest.mark.parametrize("kind", ["independent", "ot-exact", "sigma-logit", "paired-mix"])
def test_fast_step_equals_plain_loop_exactly_on_cpu(make_cfg, tmp_path, pair_store, kind):
    base = ("train.steps=30", "train.log_every=5", "train.ckpt_every=10", "train.weight_decay=0.01",
            "train.grad_clip=0.5", *_extra(kind, pair_store))
    plain = train(make_cfg(*base, "train.fast=off"), str(tmp_path / "plain"), progress=False)
    fast = train(make_cfg(*base, "train.fast=on", "train.compile=off"), str(tmp_path / "fast"), progress=False)
    assert len(fast.losses) == 30 and all(isinstance(v, float) for v in fast.losses)
    assert fast.losses == plain.losses
    ca, cb = load_checkpoint(plain.checkpoint), load_checkpoint(fast.checkpoint)
    _assert_same_state(ca, cb)
    # the fast run really used the multi-tensor optimiser (and the plain one did not)
    assert cb["optimizer"]["param_groups"][0]["foreach"] is True
    assert not ca["optimizer"]["param_groups"][0]["foreach"]
    rows_a = read_metrics(os.path.join(plain.run_dir, "metrics.jsonl"))
    rows_b = read_metrics(os.path.join(fast.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows_b] == [5, 10, 15, 20, 25, 30]
    for ra, rb in zip(rows_a, rows_b):
        assert set(ra) == set(rb)
        for key in ra:
            if key != "train/steps_per_sec":
                assert ra[key] == rb[key], key


def test_ema_foreach_update_equals_the_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    a, b = EMA(model, 0.9), EMA(model, 0.9)
    for _ in range(15):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        a.update(model)
        b.update(model, foreach=True)
    assert a.num_updates == b.num_updates == 15
    for pa, pb, p in zip(a.model.parameters(), b.model.parameters(), model.parameters()):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, p)  # it is an average, not a copy


class _HostReads(TorchDispatchMode):
    """Records reads of a tensor's value to the host (``.item()``, ``float()``, ``bool()``), except of
    the given tensors (AdamW's step counters, which live on the CPU without ``fused``)."""

    def __init__(self, allowed):
        super().__init__()
        self.allowed = allowed
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].data_ptr() not in self.allowed:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_fast_step_reads_nothing_back_from_the_device(make_cfg, fast):
    tr = build_trainer(make_cfg("coupling.name=ot", "coupling.method=sinkhorn", "coupling.num_iters=5"),
                       fast=fast, compile="off")
    tr.step()  # creates the optimiser state
    steps = {st["step"].data_ptr() for st in tr.optimizer.state.values()}
    with _HostReads(steps) as rec:
        tr.run(3)
    assert rec.reads == (0 if fast else 3)  # the plain loop reads its loss once per step
    assert len(tr.sync()) == 4 and tr.global_step == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CPU host reads are checked above")
def test_fast_step_does_not_synchronise_on_cuda(make_cfg):
    tr = build_trainer(make_cfg("train.device=cuda", "coupling.name=ot", "coupling.method=sinkhorn"), fast=True,
                       compile="off")
    tr.run(2)
    tr.sync()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tr.run(3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(tr.sync()) == 3


def test_compiled_fast_step_matches_plain(make_cfg, tmp_path, pair_store):
    """torch.compile (inductor, CPU) of the loss with two terms (pairs + real data): the same draws,
    losses equal to float rounding. Compiling takes ~20 s on an idle 2-core CPU with a cold cache."""
    base = ("train.steps=10", "train.log_every=5", "train.ckpt_every=10", *_extra("paired-mix", pair_store))
    plain = train(make_cfg(*base, "train.fast=off"), str(tmp_path / "plain"), progress=False)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    comp = train(make_cfg(*base, "train.fast=auto", "train.compile=default"), str(tmp_path / "comp"), progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it was compiled
    assert comp.losses == pytest.approx(plain.losses, rel=1e-4)
    ca, cb = load_checkpoint(plain.checkpoint), load_checkpoint(comp.checkpoint)
    for k, v in ca["ema"]["model"].items():
        torch.testing.assert_close(cb["ema"]["model"][k], v, rtol=1e-4, atol=1e-5)
    rows_a = read_metrics(os.path.join(plain.run_dir, "metrics.jsonl"))
    rows_b = read_metrics(os.path.join(comp.run_dir, "metrics.jsonl"))
    for i in range(10):
        key = f"train/loss_t{i}"
        assert (key in rows_a[-1]) == (key in rows_b[-1])
        if key in rows_a[-1]:
            assert rows_b[-1][key] == pytest.approx(rows_a[-1][key], rel=1e-4)


# --------------------------------------------------------------------------- non-finite losses


def _nan_at(monkeypatch, call: int) -> None:
    real = loop_mod.cfm_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            return LossOutput(loss=out.loss * float("nan"), per_sample=out.per_sample)
        return out

    monkeypatch.setattr(loop_mod, "cfm_loss", flaky)


def test_fast_nan_loss_raises_by_the_next_checkpoint_and_never_saves_it(make_cfg, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 7)
    run = str(tmp_path / "run")
    # log_every=50: the NaN of step 7 is found when step 10 is about to be checkpointed
    with pytest.raises(NonFiniteLossError) as e:
        train(make_cfg("train.steps=20", "train.ckpt_every=5", "train.log_every=50", "train.fast=on"), run,
              progress=False)
    assert e.value.step == 7 and "step 7" in str(e.value)
    assert e.value.checkpoint == last_checkpoint(run)
    ckpt = load_checkpoint(last_checkpoint(run))
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(v).all() for v in ckpt["ema"]["model"].values())


def test_fast_nan_before_first_checkpoint_says_none_was_written(make_cfg, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 2)
    with pytest.raises(NonFiniteLossError) as e:
        train(make_cfg("train.fast=on"), str(tmp_path / "run"), progress=False)
    assert e.value.step == 2 and e.value.checkpoint is None
    assert not os.path.exists(last_checkpoint(str(tmp_path / "run")))


def test_trainer_reports_nan_at_sync_with_its_step(make_cfg):
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        out = loop_mod.cfm_loss(*args, **kwargs)
        calls["n"] += 1
        return LossOutput(loss=out.loss * float("inf"), per_sample=out.per_sample) if calls["n"] == 3 else out

    tr = build_trainer(make_cfg(), fast=True, compile="off", loss_fn=flaky)
    tr.run(5)  # nothing is read inside the steps
    with pytest.raises(NonFiniteLossError) as e:
        tr.sync()
    assert e.value.step == 3 and e.value.checkpoint is None


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("first,then", [("on", "on"), ("off", "on"), ("on", "off")],
                         ids=["fast-fast", "plain-then-fast", "fast-then-plain"])
def test_fast_kill_and_resume_equals_unbroken_run(make_cfg, tmp_path, first, then):
    base = ("train.steps=20", "train.ckpt_every=5", "train.log_every=4", "coupling.name=ot")
    a = train(make_cfg(*base, "train.fast=on"), str(tmp_path / "a"), progress=False)

    run_b = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*base, f"train.fast={first}"), run_b, progress=False, on_step=_Interrupt(13))
    assert load_checkpoint(last_checkpoint(run_b))["step"] == 10
    b = train(make_cfg(*base, f"train.fast={then}"), run_b, resume=True, progress=False)
    assert b.start_step == 10 and b.config.train.fast == then
    assert b.losses == a.losses[10:]
    ca, cb = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
    assert cb["step"] == 20
    _assert_same_state(ca, cb)
    # the resumed run kept its own optimiser implementation, whatever the checkpoint's
    assert bool(cb["optimizer"]["param_groups"][0]["foreach"]) == (then == "on")
    rows_a = read_metrics(os.path.join(a.run_dir, "metrics.jsonl"))
    rows_b = read_metrics(os.path.join(run_b, "metrics.jsonl"))
    assert [r["step"] for r in rows_b] == [4, 8, 12, 16, 20]
    for ra, rb in zip(rows_a, rows_b):
        if ra["step"] != 12:  # the resumed run logs step 12 for its steps 11..12 only
            assert ra["train/loss"] == rb["train/loss"] and ra["train/grad_norm"] == rb["train/grad_norm"]
            assert all(ra.get(f"train/loss_t{i}") == rb.get(f"train/loss_t{i}") for i in range(10))


# --------------------------------------------------------------------------- trainer API


def test_build_trainer_writes_nothing_and_counts_steps(make_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("train.fast=off")
    tr = build_trainer(cfg, fast=True)
    assert tr.plan == SpeedPlan(True, None)  # fast on the CPU: not compiled unless asked
    out = tr.step()
    assert out.value is None and out.loss.ndim == 0 and out.lr == pytest.approx(cfg.train.lr / 2)
    tr.run(4)
    losses = tr.sync()
    assert tr.global_step == 5 and len(losses) == 5 and tr.sync() == []
    sums, counts = tr.take_bins()
    assert counts.sum().item() == 5 * cfg.train.batch_size and torch.isfinite(sums).all()
    state = tr.state_dict()
    assert state["step"] == 5 and {"model", "ema", "optimizer", "scheduler", "coupling", "rng"} <= set(state)
    assert os.listdir(tmp_path) == []
    # the same seed and config: a plain trainer makes the same steps
    plain = build_trainer(cfg)
    plain.run(5)
    assert not plain.fast and plain.sync() == losses


def test_trainer_state_round_trip_continues_exactly(make_cfg):
    cfg = make_cfg()
    a = build_trainer(cfg, fast=True)
    a.run(6)
    ref = a.sync()
    b = build_trainer(cfg, fast=True)
    b.run(3)
    first = b.sync()
    c = build_trainer(cfg, fast=True)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    c.run(3)
    assert c.global_step == 6 and first + c.sync() == ref


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("fast,compile,device,expected", [
    ("auto", "auto", "cpu", SpeedPlan(False, None)),
    ("auto", "auto", "cuda", SpeedPlan(True, "default")),
    ("on", "auto", "cpu", SpeedPlan(True, None)),
    ("on", "on", "cpu", SpeedPlan(True, "default")),
    ("auto", "reduce-overhead", "cpu", SpeedPlan(True, "reduce-overhead")),
    ("on", "off", "cuda", SpeedPlan(True, None)),
    ("off", "auto", "cuda", SpeedPlan(False, None)),
    (True, False, "cuda", SpeedPlan(True, None)),
])
def test_resolve_speed(fast, compile, device, expected):
    assert resolve_speed(fast, compile, device) == expected


@pytest.mark.parametrize("key,value,valid", [("fast", "fastest", FAST_MODES), ("compile", "turbo", COMPILE_MODES)])
def test_bad_speed_value_lists_the_valid_ones(make_cfg, tmp_path, key, value, valid):
    with pytest.raises(ConfigError) as e:
        train(make_cfg(f"train.{key}={value}"), str(tmp_path / "run"), progress=False)
    msg = str(e.value)
    assert f"train.{key}" in msg and repr(value) in msg
    assert all(v in msg for v in valid)
    assert not os.path.exists(tmp_path / "run")  # refused before the run directory was touched
    with pytest.raises(ConfigError):
        build_trainer(make_cfg(f"train.{key}={value}"))


def test_compile_without_the_fast_step_is_refused():
    with pytest.raises(ConfigError, match="train.fast=off"):
        resolve_speed("off", "default", "cpu")


def test_yaml_on_off_are_read_as_the_documented_strings():
    cfg = apply_overrides(from_dict({}), ["train.fast=on", "train.compile=off"])
    assert cfg.train.fast == "on" and cfg.train.compile == "off"  # YAML 1.1 reads them as booleans
    assert TrainConfig(fast=False).fast == "off"
    assert TrainConfig().fast == "auto" and TrainConfig().compile == "auto"
    with pytest.raises(ConfigError, match="train.fast"):
        from_dict({"train": {"fast": 1}})
    assert "train.fast" in loop_mod.RESUMABLE_KEYS and "train.compile" in loop_mod.RESUMABLE_KEYS
