"""Tracking: metrics.jsonl always, wandb lazily (disabled works without it; offline needs no network)."""

from __future__ import annotations

import glob
import json
import os
import sys

import pytest
import torch

from flowmatch.errors import ConfigError
from flowmatch.training import TRACKING_MODES, Tracker, read_metrics, train, trim_metrics


@pytest.fixture
def no_wandb(monkeypatch):
    """Make ``import wandb`` fail, as if it were not installed."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError):
        import wandb  # noqa: F401


def test_disabled_mode_works_without_wandb(no_wandb, tmp_path):
    run = str(tmp_path / "run")
    with Tracker(run, mode="disabled") as tr:
        tr.log({"train/loss": 1.5, "t": torch.tensor(2.0)}, 3)
        tr.log({"train/loss": float("nan")}, 4)
        tr.log_image("eval/x", "nope.png", 4)  # no-ops without wandb
        tr.log_table("bench/table", [{"a": 1}])
    assert not os.path.exists(os.path.join(run, "wandb"))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert lines[0] == {"step": 3, "train/loss": 1.5, "t": 2.0}
    assert lines[1]["step"] == 4 and lines[1]["train/loss"] == "nan"  # strict JSON: NaN as a string


def test_training_with_tracking_disabled_without_wandb(no_wandb, make_cfg, tmp_path):
    res = train(make_cfg("train.steps=4", "train.log_every=2"), str(tmp_path / "run"), progress=False)
    rows = read_metrics(os.path.join(res.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0]["train/loss"] == pytest.approx((res.losses[0] + res.losses[1]) / 2, rel=1e-6)


def test_offline_without_wandb_warns_and_keeps_metrics(no_wandb, tmp_path):
    run = str(tmp_path / "run")
    with pytest.warns(UserWarning, match="wandb is not installed"):
        tr = Tracker(run, mode="offline")
    tr.log({"x": 1}, 1)
    tr.finish()
    assert read_metrics(os.path.join(run, "metrics.jsonl")) == [{"step": 1, "x": 1}]


def test_online_without_wandb_is_a_config_error(no_wandb, tmp_path):
    with pytest.raises(ConfigError, match="disabled"):
        Tracker(str(tmp_path / "run"), mode="online")


def test_unknown_mode_lists_valid_modes(tmp_path):
    with pytest.raises(ConfigError) as e:
        Tracker(str(tmp_path / "run"), mode="cloud")
    for m in TRACKING_MODES:
        assert m in str(e.value)
    assert set(TRACKING_MODES) == {"offline", "online", "disabled"}


def test_tracker_appends_across_instances(tmp_path):
    run = str(tmp_path / "run")
    for step in (1, 2):
        with Tracker(run, mode="disabled") as tr:
            tr.log({"v": step * 10}, step)
    assert [r["v"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == [10, 20]


def test_read_metrics_skips_torn_line_and_missing_file(tmp_path):
    p = tmp_path / "metrics.jsonl"
    assert read_metrics(str(p)) == []
    p.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    assert read_metrics(str(p)) == [{"step": 1, "a": 1}, {"step": 2, "a": 2}]


def test_trim_metrics(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s} for s in range(1, 8)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 8, "tr')
    trim_metrics(str(p), 4)
    assert read_metrics(str(p)) == rows[:4]
    assert p.read_text().count("\n") == 4  # the torn line is gone too
    trim_metrics(str(p), 0)
    assert read_metrics(str(p)) == []
    trim_metrics(str(tmp_path / "absent.jsonl"), 3)  # no file: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def test_offline_mode_writes_wandb_run_under_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    # keep wandb's own settings, cache and data away from the user's home; never talk to a server
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = str(tmp_path / "run")
    tr = Tracker(run, mode="offline", project="flowmatch-test", name="t", config={"a": 1})
    tr.log({"train/loss": 0.5}, 1)
    tr.log_table("bench/table", [{"solver": "euler", "nfe": 1, "w2": 0.1}])
    tr.finish()
    offline_runs = glob.glob(os.path.join(run, "wandb", "offline-run-*"))
    assert len(offline_runs) == 1
    with open(os.path.join(run, "wandb_id.txt")) as f:
        run_id = f.read().strip()
    assert offline_runs[0].endswith(run_id)
    assert glob.glob(os.path.join(offline_runs[0], "*.wandb"))
    assert read_metrics(os.path.join(run, "metrics.jsonl")) == [{"step": 1, "train/loss": 0.5}]
