"""Resuming after faults: a run or chain stage stopped before its first checkpoint restarts, a killed
write's temporaries are cleaned up, a killed final evaluation is not logged twice, tracking.mode=online
without a login is refused before anything is written, and an unreadable checkpoint is told apart from
a refused pickle without ever suggesting an unsafe load."""

from __future__ import annotations

import os
import pickle
import tempfile

import pytest
import torch

import flowmatch.evaluation as evaluation_mod
import flowmatch.pipelines as pipelines_mod
from flowmatch.cli import main
from flowmatch.config import to_dict
from flowmatch.errors import CheckpointError, ConfigError, ConfigMismatchError, FlowmatchError, RunDirError
from flowmatch.io import TMP_PREFIX, is_temporary, remove_temporaries, safe_load
from flowmatch.pipelines import train_from_config
from flowmatch.reflow_chain import reflow_from_config
from flowmatch.training import Tracker, last_checkpoint, load_checkpoint, read_metrics, train
from flowmatch.training.tracking import check_tracking, wandb_login_found
from test_training import _Interrupt  # the same kill-at-step callback as the other resume tests


def _same_weights(a: str, b: str) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["step"] == cb["step"]
    for part in ("model",):
        for k, v in ca[part].items():
            assert torch.equal(v, cb[part][k]), k
    for k, v in ca["ema"]["model"].items():
        assert torch.equal(v, cb["ema"]["model"][k]), k


@pytest.fixture
def no_login(tmp_path, monkeypatch):
    """No wandb credentials anywhere (env, ~/.netrc, wandb's settings file), and a wandb.init that fails
    the test if it is ever called (no network in tests)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    wandb = pytest.importorskip("wandb")

    def never(*a, **k):
        raise AssertionError("wandb.init was called")

    monkeypatch.setattr(wandb, "init", never)
    return home


# ------------------------------------------------------------------ a run stopped before its first checkpoint

def test_resume_restarts_a_run_killed_before_its_first_checkpoint(make_cfg, tmp_path, capsys):
    cfg = make_cfg("train.steps=8", "train.ckpt_every=100", "train.log_every=1")
    full = train(cfg, str(tmp_path / "full"), progress=False)
    run = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False, on_step=_Interrupt(2))
    assert os.path.isfile(os.path.join(run, "config.yaml")) and not os.path.exists(last_checkpoint(run))
    # a plain rerun still refuses (the directory is someone's run), and names what it holds
    with pytest.raises(RunDirError, match="before its first checkpoint.*--resume"):
        train(cfg, run, progress=False)
    capsys.readouterr()
    res = train(cfg, run, resume=True, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "restarting it from step 0" in err[0] and run in err[0]
    assert res.start_step == 0 and res.losses == full.losses  # the restart is the unbroken run
    _same_weights(full.checkpoint, res.checkpoint)
    assert [r["step"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == list(range(1, 9))


def test_resume_of_a_directory_without_any_run_is_still_refused(tiny_cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="no checkpoint"):
        train(tiny_cfg, str(tmp_path / "empty"), resume=True, progress=False)


def test_train_from_config_auto_restarts_a_run_killed_before_its_first_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg("train.steps=6", "train.ckpt_every=100")
    run = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False, on_step=_Interrupt(3))
    s = train_from_config(cfg, run, resume="auto", progress=False)
    assert s.step == 6 and not s.skipped and load_checkpoint(last_checkpoint(run))["step"] == 6


def test_chain_stage_killed_before_its_first_checkpoint_restarts(make_cfg, tmp_path, monkeypatch, capsys):
    chain = ("data.target=moons", "train.steps=6", "train.ckpt_every=100", "reflow.num_pairs=64",
             "reflow.shard_size=64", "reflow.solver=euler", "reflow.nfe=4", "reflow.steps=6",
             "reflow.bench_n=64", "reflow.bench_nfes=[1]", "reflow.bench_solvers=[euler]")
    cfg = make_cfg(*chain)
    whole = reflow_from_config(cfg, str(tmp_path / "whole"), rounds=2, distill=False, progress=False)

    real_train = pipelines_mod.train
    killed = []

    def kill_2rf_at_step_2(cfg_, run_dir, **kw):
        if run_dir.endswith("2-RF") and not killed:
            killed.append(run_dir)
            kw["on_step"] = _Interrupt(2)
        return real_train(cfg_, run_dir, **kw)

    out = tmp_path / "chain"
    monkeypatch.setattr(pipelines_mod, "train", kill_2rf_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        reflow_from_config(cfg, str(out), rounds=2, distill=False, progress=False)
    assert (out / "2-RF" / "config.yaml").is_file() and not (out / "2-RF" / "checkpoints" / "last.pt").exists()
    capsys.readouterr()
    rows = reflow_from_config(cfg, str(out), rounds=2, distill=False, progress=False)
    err = capsys.readouterr().err
    assert "restarting it from step 0" in err and "2-RF" in err
    assert [r["w2"] for r in rows] == [r["w2"] for r in whole]
    _same_weights(str(tmp_path / "whole" / "2-RF" / "checkpoints" / "last.pt"),
                  str(out / "2-RF" / "checkpoints" / "last.pt"))
    # a stage really trained with another config is still refused, naming what to remove
    with pytest.raises(ConfigMismatchError, match=r"stage 2-RF on disk was trained with another config.*Remove"):
        reflow_from_config(make_cfg(*chain, "reflow.lr=5e-3"), str(out), rounds=2, distill=False, progress=False)


# ------------------------------------------------------------------ a killed write's temporaries, a killed evaluation

def _leave_temporary(directory: str, name: str) -> str:
    fd, p = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + name, dir=directory)  # as atomic_write names it
    with os.fdopen(fd, "wb") as f:
        f.write(b"half a file")
    return p


def test_resume_removes_the_temporaries_of_a_killed_write_only(make_cfg, tmp_path, capsys):
    cfg = make_cfg("train.steps=10", "train.ckpt_every=5")
    run = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False, on_step=_Interrupt(8))
    stale = [_leave_temporary(os.path.join(run, "checkpoints"), "last.pt"), _leave_temporary(run, "samples.pt")]
    assert all(is_temporary(p) for p in stale)
    kept = [os.path.join(run, ".tmp-notes.txt"), os.path.join(run, "checkpoints", "last.pt.tmp-mine")]
    for p in kept:
        with open(p, "w") as f:
            f.write("user's")
    capsys.readouterr()
    res = train(cfg, run, resume=True, progress=False)
    assert res.start_step == 5 and res.step == 10
    assert not any(os.path.exists(p) for p in stale)
    assert all(os.path.exists(p) for p in kept)
    assert "removed 2 temporary file(s)" in capsys.readouterr().err


def test_remove_temporaries_matches_atomic_writes_pattern(tmp_path):
    p = _leave_temporary(str(tmp_path), "x.pt")
    for name in (".tmp-short-x", ".tmp-abcdefgh", "a.tmp-abcdefgh-x", "x.tmp"):
        (tmp_path / name).write_text("keep")
    (tmp_path / "sub").mkdir()
    q = _leave_temporary(str(tmp_path / "sub"), "y.pt")
    assert remove_temporaries(str(tmp_path)) == [p]
    assert os.path.exists(q) and len(os.listdir(tmp_path)) == 5
    assert remove_temporaries(str(tmp_path / "absent")) == []


def test_run_killed_during_its_final_evaluation_logs_it_once(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("train.steps=10", "train.ckpt_every=5")
    whole = train_from_config(cfg, str(tmp_path / "whole"), progress=False)
    real_save = evaluation_mod.atomic_save

    def killed_saving_samples(obj, path):
        raise KeyboardInterrupt  # after the evaluation row, before samples.pt and summary.json

    run = str(tmp_path / "run")
    monkeypatch.setattr(evaluation_mod, "atomic_save", killed_saving_samples)
    with pytest.raises(KeyboardInterrupt):
        train_from_config(cfg, run, progress=False)
    assert sum("eval/w2" in r for r in read_metrics(os.path.join(run, "metrics.jsonl"))) == 1
    monkeypatch.setattr(evaluation_mod, "atomic_save", real_save)
    s = train_from_config(cfg, run, resume=True, progress=False)
    assert s.eval == whole.eval
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [r["step"] for r in read_metrics(os.path.join(whole.run_dir, "metrics.jsonl"))]
    assert sum("eval/w2" in r for r in rows) == 1 and sum(r["step"] == 10 for r in rows) == 2


def test_steps_extended_after_evaluation_keep_the_earlier_evaluation(make_cfg, tmp_path):
    run = str(tmp_path / "run")
    train_from_config(make_cfg("train.steps=5"), run, progress=False)
    train_from_config(make_cfg("train.steps=10"), run, resume=True, progress=False)
    rows = read_metrics(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in rows if "eval/w2" in r] == [5, 10]


# ------------------------------------------------------------------ tracking.mode=online without a login

def test_online_without_login_is_refused_before_the_run_dir_exists(no_login, make_cfg, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"tracking.mode=online needs a wandb login.*tracking.mode=offline") as e:
        train(make_cfg("tracking.mode=online"), str(run), progress=False)
    assert "\n" not in str(e.value)
    assert not run.exists()
    with pytest.raises(ConfigError, match="wandb login"):
        Tracker(str(tmp_path / "tr"), mode="online")
    assert not (tmp_path / "tr").exists()


def test_cli_online_without_login_is_one_line(no_login, make_cfg, tmp_path, capsys):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(to_dict(make_cfg())))
    out = tmp_path / "out"
    rc = main(["train", str(cfg), "--out", str(out), "--set", "tracking.mode=online", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "WANDB_API_KEY" in err[0]
    assert not out.exists()
    # the same command with another mode then runs (nothing was left to block it)
    assert main(["train", str(cfg), "--out", str(out), "--set", "tracking.mode=disabled", "--no-progress"]) == 0


def test_login_is_found_where_wandb_looks_for_it(no_login, monkeypatch):
    assert not wandb_login_found()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_login_found()
    check_tracking("online")  # passes: a key is there
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = no_login / ".netrc"
    netrc.write_text("machine example.org login user password other\n")
    netrc.chmod(0o600)
    assert not wandb_login_found()  # an entry for another host
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert wandb_login_found()
    netrc.unlink()
    (no_login / "wandb-config").mkdir()
    (no_login / "wandb-config" / "settings").write_text("[default]\napi_key = " + "k" * 40 + "\n")
    assert wandb_login_found()
    check_tracking("offline")
    with pytest.raises(ConfigError, match="disabled"):
        check_tracking("cloud")


def test_failed_tracker_start_leaves_a_run_that_resume_restarts(make_cfg, tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")

    def broken(*a, **k):
        raise RuntimeError("could not start\nsecond line")

    monkeypatch.setattr(wandb, "init", broken)
    run = str(tmp_path / "run")
    cfg = make_cfg("train.steps=4", "tracking.mode=offline")
    with pytest.raises(FlowmatchError) as e:
        train(cfg, run, progress=False)
    assert "\n" not in str(e.value) and "could not start" in str(e.value)
    res = train(make_cfg("train.steps=4"), run, resume=True, progress=False)
    assert res.start_step == 0 and res.step == 4
    assert not os.path.exists(os.path.join(run, "wandb_id.txt"))


# ------------------------------------------------------------------ unreadable checkpoints

def _random_file(path, n=4096, seed=0) -> str:
    g = torch.Generator()
    g.manual_seed(seed)
    path.write_bytes(bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist()))
    return str(path)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_random_bytes_are_not_a_readable_checkpoint(tmp_path, seed):
    p = _random_file(tmp_path / "random.pt", seed=seed)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert "\n" not in msg and p in msg
    assert "not a readable checkpoint" in msg and "corrupt, truncated or not a torch file" in msg
    assert "weights_only" not in msg and "will likely succeed" not in msg


class _Runs:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_a_pickle_that_needs_code_is_refused_and_named(tmp_path, kind):
    p = tmp_path / "code.pt"
    if kind == "torch":
        torch.save({"format": "flowmatch-checkpoint", "obj": _Runs()}, str(p))
    else:
        p.write_bytes(pickle.dumps(_Runs()))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(p))
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    assert "needs code to load" in msg and "refused" in msg and ("getcwd" in msg)
    assert "weights_only" not in msg and "not a readable" not in msg


def test_truncated_torch_file_is_not_readable(tmp_path):
    p = tmp_path / "t.pt"
    torch.save({"x": torch.zeros(100)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FlowmatchError, match=r"pair shard .*t\.pt is not a readable pair shard"):
        safe_load(str(p), "pair shard")
    torch.save({"x": torch.ones(2)}, str(p))
    assert torch.equal(safe_load(str(p), "pair shard")["x"], torch.ones(2))


def test_restart_before_the_first_checkpoint_keeps_other_files_in_checkpoints(make_cfg, tmp_path):
    # a run killed before its first checkpoint is restarted, but a file someone put into checkpoints/
    # (not one the run wrote) is not the run's to delete
    run = tmp_path / "run"
    base = ("train.steps=6", "train.ckpt_every=100", "train.log_every=2")
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*base), str(run), progress=False, on_step=_Interrupt(3))
    assert not (run / "checkpoints" / "last.pt").exists()
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "backup.pt").write_bytes(b"mine")
    res = train(make_cfg(*base), str(run), resume=True, progress=False)
    assert res.start_step == 0 and os.path.exists(res.checkpoint)
    assert (run / "checkpoints" / "backup.pt").read_bytes() == b"mine"
