"""The training loop: learning, checkpoints, exact kill-and-resume, NaN handling, run-dir safety."""

from __future__ import annotations

import json
import os

import pytest
import torch

import flowmatch.training.loop as loop_mod
from flowmatch.config import to_dict
from flowmatch.errors import NonFiniteLossError, RunDirError, UnknownNameError
from flowmatch.pipelines import train_from_config
from conftest import nan_objective
from flowmatch.training import (OBJECTIVES, FORMAT_VERSION, last_checkpoint, load_checkpoint, load_model, read_metrics,
                                train)
from flowmatch.types import LossOutput


def _file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _probe(dim: int = 2, b: int = 32):
    g = torch.Generator()
    g.manual_seed(123)
    return torch.randn(b, dim, generator=g), torch.rand(b, generator=g)


def test_loss_decreases(make_cfg, tmp_path):
    cfg = make_cfg("train.steps=120", "train.log_every=20", "train.ckpt_every=120")
    res = train(cfg, str(tmp_path / "run"), progress=False)
    assert len(res.losses) == 120 and res.step == 120 and res.start_step == 0
    assert all(torch.isfinite(torch.tensor(res.losses)))
    first, last = sum(res.losses[:10]) / 10, sum(res.losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)
    rows = read_metrics(os.path.join(res.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [20, 40, 60, 80, 100, 120]
    # fixed keys, including loss per t-bin (bins of a 20-step interval with batch 32 are non-empty)
    for key in ["train/loss", "train/lr", "train/grad_norm", "train/steps_per_sec"] + [f"train/loss_t{i}" for i in range(10)]:
        assert key in rows[-1], key
    # the logged train/loss is the mean of the interval's per-step losses
    assert rows[0]["train/loss"] == pytest.approx(sum(res.losses[:20]) / 20, rel=1e-6)


def test_warmup_learning_rate_is_logged(make_cfg, tmp_path):
    cfg = make_cfg("train.steps=6", "train.log_every=1", "train.warmup_steps=4", "train.lr=0.01")
    res = train(cfg, str(tmp_path / "run"), progress=False)
    lrs = [r["train/lr"] for r in read_metrics(os.path.join(res.run_dir, "metrics.jsonl"))]
    # linear warm-up (s + 1) / warmup for s = 0..3, then constant
    assert lrs == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_checkpoint_round_trip(tiny_cfg, tmp_path):
    run = str(tmp_path / "run")
    res = train(tiny_cfg, run, progress=False)
    assert res.checkpoint == last_checkpoint(run) and os.path.isfile(res.checkpoint)
    assert os.path.isfile(os.path.join(run, "config.yaml"))
    ckpt = load_checkpoint(res.checkpoint)
    for key in ("model", "ema", "optimizer", "step", "config", "rng", "version"):
        assert key in ckpt, key
    assert ckpt["step"] == tiny_cfg.train.steps
    assert ckpt["version"] == FORMAT_VERSION
    assert ckpt["config"] == to_dict(tiny_cfg)
    assert isinstance(ckpt["rng"]["generator"], torch.Tensor)

    x, t = _probe()
    with torch.no_grad():
        ema_out = res.model(x, t)
        raw_out = res.components.model.eval()(x, t)
    lm = load_model(res.checkpoint)
    assert lm.step == tiny_cfg.train.steps and to_dict(lm.config) == to_dict(tiny_cfg)
    assert not lm.model.training
    assert all(not p.requires_grad for p in lm.model.parameters())
    with torch.no_grad():
        assert torch.equal(lm.model(x, t), ema_out)
        assert torch.equal(load_model(res.checkpoint, use_ema=False).model(x, t), raw_out)
    assert not torch.equal(ema_out, raw_out)  # the EMA copy is a different model after 20 steps


class _Interrupt:
    def __init__(self, at: int):
        self.at = at

    def __call__(self, step: int, loss: float) -> None:
        if step == self.at:
            raise KeyboardInterrupt


def _run_killed_and_resumed(cfg, tmp_path, at: int = 13):
    """``(a, b, ca, cb)``: ``cfg`` trained unbroken into ``tmp_path/a``, and into ``tmp_path/b`` killed at step
    ``at`` then resumed; ``ca``, ``cb`` their last checkpoints. The run must checkpoint every 10 steps."""
    a = train(cfg, str(tmp_path / "a"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(tmp_path / "b"), progress=False, on_step=_Interrupt(at))
    b = train(cfg, str(tmp_path / "b"), progress=False, resume=True)
    return a, b, load_checkpoint(a.checkpoint), load_checkpoint(last_checkpoint(str(tmp_path / "b")))


@pytest.mark.parametrize("extra", [
    ("coupling.name=independent",),
    ("coupling.name=ot", "coupling.method=exact"),
    ("coupling.name=independent", "path.sigma=0.1"),
], ids=["independent", "ot-exact", "sigma"])
def test_kill_and_resume_equals_unbroken_run(make_cfg, tmp_path, extra):
    cfg = make_cfg("train.steps=20", "train.ckpt_every=5", "train.log_every=1", *extra)
    a = train(cfg, str(tmp_path / "a"), progress=False)
    assert len(a.losses) == 20

    run_b = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_b, progress=False, on_step=_Interrupt(13))
    assert load_checkpoint(last_checkpoint(run_b))["step"] == 10
    # the killed run logged steps 1..12 before dying at 13
    assert [r["step"] for r in read_metrics(os.path.join(run_b, "metrics.jsonl"))] == list(range(1, 13))

    b = train(cfg, run_b, resume=True, progress=False)
    assert b.start_step == 10 and b.step == 20
    assert b.losses == a.losses[10:]  # exact equality on the CPU

    ca, cb = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
    assert cb["step"] == 20
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    for k, v in ca["ema"]["model"].items():
        assert torch.equal(v, cb["ema"]["model"][k]), k

    rows_a = read_metrics(os.path.join(a.run_dir, "metrics.jsonl"))
    rows_b = read_metrics(os.path.join(run_b, "metrics.jsonl"))
    steps_b = [r["step"] for r in rows_b]
    assert steps_b == list(range(1, 21))  # no duplicated steps after the resume
    for ra, rb in zip(rows_a, rows_b):
        assert ra["train/loss"] == rb["train/loss"] and ra["train/lr"] == rb["train/lr"]


def test_nan_loss_stops_with_step_and_keeps_checkpoint(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "cfm", nan_objective(7))
    run = str(tmp_path / "run")
    with pytest.raises(NonFiniteLossError) as e:
        train(make_cfg("train.steps=20", "train.ckpt_every=5"), run, progress=False)
    assert e.value.step == 7
    assert "step 7" in str(e.value)
    assert e.value.checkpoint == last_checkpoint(run)
    ckpt = load_checkpoint(last_checkpoint(run))
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_before_first_checkpoint_says_none_was_written(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "cfm", nan_objective(1, float("inf")))
    with pytest.raises(NonFiniteLossError) as e:
        train(make_cfg(), str(tmp_path / "run"), progress=False)
    assert e.value.step == 1 and e.value.checkpoint is None
    assert "no checkpoint" in str(e.value)


def test_second_run_into_same_dir_is_refused(tiny_cfg, tmp_path):
    run = str(tmp_path / "run")
    train(tiny_cfg, run, progress=False)
    before = _file_bytes(last_checkpoint(run))
    with pytest.raises(RunDirError) as e:
        train(tiny_cfg, run, progress=False)
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value)
    assert _file_bytes(last_checkpoint(run)) == before


def test_overwrite_replaces_the_run(make_cfg, tmp_path):
    run = str(tmp_path / "run")
    train(make_cfg("train.steps=10"), run, progress=False)
    with open(os.path.join(run, "stale.txt"), "w") as f:
        f.write("old")
    res = train(make_cfg("train.steps=5", "train.seed=3"), run, overwrite=True, progress=False)
    assert res.step == 5
    assert not os.path.exists(os.path.join(run, "stale.txt"))
    ckpt = load_checkpoint(last_checkpoint(run))
    assert ckpt["step"] == 5 and ckpt["config"]["train"]["seed"] == 3
    assert max(r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))) == 5


def test_resume_and_overwrite_exclude_each_other(tiny_cfg, tmp_path):
    with pytest.raises(RunDirError):
        train(tiny_cfg, str(tmp_path / "run"), resume=True, overwrite=True, progress=False)


def test_resume_without_checkpoint_is_refused(tiny_cfg, tmp_path):
    with pytest.raises(RunDirError) as e:
        train(tiny_cfg, str(tmp_path / "empty"), resume=True, progress=False)
    assert "no checkpoint" in str(e.value)


def test_output_path_that_is_a_file_is_refused(tiny_cfg, tmp_path):
    p = tmp_path / "file"
    p.write_text("x")
    with pytest.raises(RunDirError):
        train(tiny_cfg, str(p), progress=False)


def test_resume_with_different_model_config_names_the_key(make_cfg, tmp_path):
    run = str(tmp_path / "run")
    train(make_cfg("train.steps=5"), run, progress=False)
    before = _file_bytes(last_checkpoint(run))
    with pytest.raises(RunDirError) as e:
        train(make_cfg("train.steps=10", "model.hidden=8"), run, resume=True, progress=False)
    assert "model.hidden" in str(e.value)
    assert "model.depth" not in str(e.value)
    assert _file_bytes(last_checkpoint(run)) == before


def test_resume_accepts_the_same_file_by_another_path_only(make_cfg, tmp_path, monkeypatch):
    """A path in the config (here train.init) given relatively once and absolutely the next time, or
    through a symlink, is the same run; another file is not."""
    init = train(make_cfg("train.steps=3"), str(tmp_path / "init"), progress=False).checkpoint
    other = train(make_cfg("train.steps=3", "train.seed=1"), str(tmp_path / "other"), progress=False).checkpoint
    os.symlink(os.path.dirname(init), str(tmp_path / "link"))
    monkeypatch.chdir(tmp_path)
    run = str(tmp_path / "run")
    train(make_cfg("train.steps=4", f"train.init={os.path.abspath(init)}"), run, progress=False)
    for same in (os.path.relpath(init), os.path.join("link", os.path.basename(init))):
        more = train(make_cfg("train.steps=5", f"train.init={same}"), run, resume=True, progress=False)
        assert more.step == 5
        # the run keeps its own config
        assert load_checkpoint(last_checkpoint(run))["config"]["train"]["init"] == os.path.abspath(init)
    with pytest.raises(RunDirError, match="train.init"):
        train(make_cfg("train.steps=6", f"train.init={other}"), run, resume=True, progress=False)


def test_steps_can_be_extended_on_resume(make_cfg, tmp_path):
    full = train(make_cfg("train.steps=20"), str(tmp_path / "full"), progress=False)
    run = str(tmp_path / "run")
    first = train(make_cfg("train.steps=10"), run, progress=False)
    assert first.step == 10 and load_checkpoint(last_checkpoint(run))["step"] == 10
    # eval.* and tracking.* may change too
    # so may the pipeline stages' sections (reflow, distill, the few-step table's ot_cfm): a run is the same run
    more = train(make_cfg("train.steps=20", "eval.n=32", "ot_cfm.steps=7", "reflow.num_pairs=9"), run, resume=True,
                 progress=False)
    assert more.start_step == 10 and more.step == 20 and len(more.losses) == 10
    assert load_checkpoint(last_checkpoint(run))["step"] == 20
    assert first.losses + more.losses == full.losses
    assert more.config.eval.n == 32


def test_train_from_config_writes_summary_and_reuses_finished_run(tiny_cfg, tmp_path):
    run = str(tmp_path / "run")
    s = train_from_config(tiny_cfg, run, progress=False)
    assert s.step == tiny_cfg.train.steps and not s.skipped
    with open(os.path.join(run, "summary.json")) as f:
        data = json.load(f)
    for key in ("eval/w2", "eval/w2_floor", "eval/mmd", "eval/nfe", "eval/straightness"):
        assert key in data["eval"], key
    assert data["eval"]["eval/nfe"] == tiny_cfg.eval.nfe  # euler: one evaluation per step
    assert os.path.isfile(os.path.join(run, "samples.pt"))
    assert not os.path.exists(os.path.join(run, "plots"))  # eval.plots=False
    before = _file_bytes(last_checkpoint(run))
    again = train_from_config(tiny_cfg, run, resume="auto", progress=False)
    assert again.skipped and again.eval == s.eval
    assert _file_bytes(last_checkpoint(run)) == before


def test_lr_schedule_warmup_then_cosine_to_min_ratio():
    from flowmatch.training.schedule import lr_lambda

    f = lr_lambda(warmup=10, total=110, schedule="cosine", min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)  # linear warm-up (s + 1) / warmup
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay: cos(pi / 2) = 0
    assert f(110) == pytest.approx(0.1)
    g = lr_lambda(warmup=0, total=100, schedule="constant")
    assert {g(s) for s in (0, 50, 99)} == {1.0}


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_trainer_follows_the_one_lr_schedule(make_cfg, schedule):
    """The optimiser's learning rate at every step is ``train.lr`` times :func:`lr_lambda`'s factor,
    and an unknown schedule is refused with the names :data:`LR_SCHEDULES` lists."""
    from flowmatch.training.trainer import build_trainer
    from flowmatch.training.schedule import LR_SCHEDULES, lr_lambda

    cfg = make_cfg("train.steps=8", "train.warmup_steps=3", f"train.lr_schedule={schedule}", "train.lr_min_ratio=0.2")
    tr = build_trainer(cfg, fast=False, compile="off")
    f = lr_lambda(3, 8, schedule, 0.2)
    for s in range(8):
        assert tr.optimizer.param_groups[0]["lr"] == cfg.train.lr * f(s)
        tr.step()
    with pytest.raises(UnknownNameError) as e:
        lr_lambda(3, 8, "linear")
    with pytest.raises(UnknownNameError) as e2:
        build_trainer(make_cfg("train.lr_schedule=linear"))
    assert str(e.value) == str(e2.value) and all(n in str(e.value) for n in LR_SCHEDULES)
