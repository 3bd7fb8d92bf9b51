"""The command line, in process: exit codes, one-line errors, and the artifacts each command writes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from flowmatch.bench import BENCH_COLUMNS
from flowmatch.cli import main
from flowmatch.config import to_dict
from flowmatch.training import load_checkpoint, load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_yaml(path, data) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return str(path)


def snapshot(d) -> dict:
    """Every file under ``d`` with its bytes."""
    out = {}
    for root, _, files in os.walk(d):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = f.read()
    return out


def assert_user_error(rc: int, capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("flowmatch: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def cfg_yaml(tiny_cfg, tmp_path):
    return write_yaml(tmp_path / "tiny.yaml", to_dict(tiny_cfg))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_cfg):
    """One tiny run trained through the CLI, shared by the sample / bench tests (read-only)."""
    base = tmp_path_factory.mktemp("cli")
    # a time embedding that is smooth in t, so a 40-step RK4 solve is an accurate reference below
    cfg = write_yaml(base / "tiny.yaml", to_dict(make_cfg("model.time_embedding=fourier",
                                                             "model.fourier_scale=1.0")))
    out = str(base / "tinyrun")
    rc = main(["train", cfg, "--out", out, "--no-progress"])
    assert rc == 0
    return {"dir": out, "ckpt": os.path.join(out, "checkpoints", "last.pt"), "base": base}


# ------------------------------------------------------------------------------------------ config errors

def test_unknown_config_key(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "bad.yaml", {"train": {"stepz": 3}})
    line = assert_user_error(main(["train", cfg, "--out", str(tmp_path / "o")]), capsys, "stepz", "valid keys")
    for key in ("steps", "batch_size", "lr", "ema_decay"):
        assert key in line
    assert not (tmp_path / "o").exists()


def test_unknown_override_key(cfg_yaml, tmp_path, capsys):
    assert_user_error(main(["train", cfg_yaml, "--set", "model.widht=3", "--out", str(tmp_path / "o")]), capsys,
                      "widht", "hidden")


def test_wrong_type(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "bad.yaml", {"train": {"steps": "many"}})
    assert_user_error(main(["train", cfg, "--out", str(tmp_path / "o")]), capsys, "train.steps", "int")


def test_wrong_type_in_override(cfg_yaml, tmp_path, capsys):
    assert_user_error(main(["train", cfg_yaml, "--set", "train.lr=fast", "--out", str(tmp_path / "o")]), capsys,
                      "train.lr", "float")


def test_missing_config_file(tmp_path, capsys):
    assert_user_error(main(["train", str(tmp_path / "none.yaml")]), capsys, "not found")


@pytest.mark.parametrize("section,key,kind,valid", [
    ("data", "target", "dataset", ["moons", "8gaussians", "checkerboard"]),
    ("data", "source", "dataset", ["gaussian"]),
    ("path", "name", "path", ["linear", "cosine"]),
    ("coupling", "name", "coupling", ["independent", "ot"]),
    ("eval", "solver", "solver", ["euler", "dopri5"]),
    ("train", "loss", "loss", ["l2", "pseudo_huber"]),
])
def test_unknown_names_list_valid_ones(tiny_cfg, tmp_path, capsys, section, key, kind, valid):
    data = to_dict(tiny_cfg)
    data[section][key] = "nosuchthing"
    cfg = write_yaml(tmp_path / "bad.yaml", data)
    out = tmp_path / "o"
    line = assert_user_error(main(["train", cfg, "--out", str(out), "--no-progress"]), capsys,
                             f"unknown {kind} 'nosuchthing'")
    for v in valid:
        assert v in line
    assert not out.exists() or not os.listdir(out)  # nothing was written for an invalid config


# ------------------------------------------------------------------------------------------ run dirs

def test_resume_without_checkpoint(cfg_yaml, tmp_path, capsys):
    assert_user_error(main(["train", cfg_yaml, "--out", str(tmp_path / "fresh"), "--resume", "--no-progress"]),
                      capsys, "no checkpoint")


def test_output_dir_holding_another_run(trained, cfg_yaml, capsys):
    before = snapshot(trained["dir"])
    assert_user_error(main(["train", cfg_yaml, "--out", trained["dir"], "--no-progress"]), capsys,
                      "already holds a run", "--resume", "--overwrite")
    assert snapshot(trained["dir"]) == before


def test_dry_run_prints_resolved_config_and_writes_nothing(cfg_yaml, tiny_cfg, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    rc = main(["train", cfg_yaml, "--set", "train.lr=0.005", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0
    printed = yaml.safe_load(captured.out)
    expected = to_dict(tiny_cfg)
    expected["train"]["lr"] = 0.005
    assert printed == expected
    assert "parameters" in captured.out
    assert os.listdir(cwd) == []
    rc = main(["train", cfg_yaml, "--out", str(tmp_path / "o"), "--dry-run"])
    assert rc == 0 and not (tmp_path / "o").exists()


def test_dry_run_validates_names(tiny_cfg, tmp_path, capsys):
    data = to_dict(tiny_cfg)
    data["coupling"]["name"] = "magic"
    assert_user_error(main(["train", write_yaml(tmp_path / "b.yaml", data), "--dry-run"]), capsys,
                      "unknown coupling 'magic'")


# ------------------------------------------------------------------------------------------ train / sample

def test_train_wrote_a_run(trained):
    ck = load_checkpoint(trained["ckpt"])
    assert ck["step"] == 20
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "samples.pt"):
        assert os.path.isfile(os.path.join(trained["dir"], name)), name
    with open(os.path.join(trained["dir"], "summary.json")) as f:
        assert json.load(f)["step"] == 20


def test_sample_heun_records_steps_and_nfe(trained, tmp_path, capsys):
    out = str(tmp_path / "s.pt")
    rc = main(["sample", "--no-progress", trained["ckpt"], "--solver", "heun", "--nfe", "4", "--n", "50", "--out", out])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.split("  -> ")[0])
    assert printed["nfe"] == 4 and printed["num_steps"] == 2 and printed["solver"] == "heun"
    rec = torch.load(out, weights_only=True)
    assert rec["nfe"] == 4 and rec["num_steps"] == 2 and rec["n"] == 50
    assert rec["samples"].shape == (50, 2) and rec["x0"].shape == (50, 2)
    # two Heun (trapezoidal predictor-corrector) steps of h = 1/2, written out here
    v = load_model(trained["ckpt"]).model
    x = rec["x0"]
    with torch.no_grad():
        for t in (0.0, 0.5):
            tt, tn = torch.full((50,), t), torch.full((50,), t + 0.5)
            k1 = v(x, tt)
            k2 = v(x + 0.5 * k1, tn)
            x = x + 0.25 * (k1 + k2)
    torch.testing.assert_close(rec["samples"], x, rtol=1e-5, atol=1e-5)


def test_sample_dopri5_records_nfe(trained, tmp_path, capsys):
    out = str(tmp_path / "d.npz")
    rc = main(["sample", "--no-progress", trained["ckpt"], "--solver", "dopri5", "--n", "50", "--out", out])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.split("  -> ")[0])
    import numpy as np

    with np.load(out) as f:
        meta = json.loads(str(f["meta"]))
        samples, x0 = torch.from_numpy(f["samples"]), torch.from_numpy(f["x0"])
    assert meta["solver"] == "dopri5" and meta["num_steps"] is None
    assert isinstance(meta["nfe"], int) and meta["nfe"] >= 6  # at least one 6-stage step
    assert meta["nfe"] == printed["nfe"]
    # the adaptive solution agrees with a fine fixed-step RK4 solve written out here
    v = load_model(trained["ckpt"]).model
    x, K = x0.double(), 40
    v64 = lambda x, t: v(x.float(), t.float()).double()  # noqa: E731
    with torch.no_grad():
        for i in range(K):
            t, h = torch.full((50,), i / K, dtype=torch.float64), 1.0 / K
            k1 = v64(x, t)
            k2 = v64(x + 0.5 * h * k1, t + 0.5 * h)
            k3 = v64(x + 0.5 * h * k2, t + 0.5 * h)
            k4 = v64(x + h * k3, t + h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(samples.double(), x, rtol=1e-3, atol=1e-3)


def test_sample_unknown_solver(trained, tmp_path, capsys):
    line = assert_user_error(main(["sample", "--no-progress", trained["ckpt"], "--solver", "leapfrog", "--nfe", "4",
                                   "--out", str(tmp_path / "s.pt")]), capsys, "unknown solver 'leapfrog'")
    for s in ("euler", "midpoint", "heun", "rk4", "dopri5"):
        assert s in line
    assert not (tmp_path / "s.pt").exists()


@pytest.mark.parametrize("args,needle", [([], "nfe"), (["--nfe", "6"], "multiple of 4")])
def test_sample_bad_nfe(trained, tmp_path, capsys, args, needle):
    assert_user_error(main(["sample", "--no-progress", trained["ckpt"], "--solver", "rk4", *args, "--out", str(tmp_path / "s.pt")]),
                      capsys, needle)


@pytest.mark.parametrize("command", ["sample", "bench"])
def test_truncated_checkpoint(trained, tmp_path, capsys, command):
    with open(trained["ckpt"], "rb") as f:
        data = f.read()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(data[: len(data) // 2])
    extra = ["--nfe", "1", "--no-progress"] if command == "sample" else ["--n", "16", "--tracking", "disabled", "--no-progress"]
    out = tmp_path / "out"
    rc = main([command, str(bad), "--out", str(out), *extra])
    assert_user_error(rc, capsys, str(bad))
    assert not out.exists()


def test_missing_checkpoint(tmp_path, capsys):
    assert_user_error(main(["sample", "--no-progress", str(tmp_path / "no.pt"), "--nfe", "1", "--out", str(tmp_path / "s.pt")]),
                      capsys, "no.pt")


# ------------------------------------------------------------------------------------------ bench

def test_bench_writes_tables(trained, tmp_path, capsys):
    out = str(tmp_path / "bench")
    rc = main(["bench", trained["ckpt"], "--solvers", "euler,heun,dopri5,renoise", "--nfe", "1,2", "--n", "64",
               "--grids", "uniform,power:0.5", "--grid-n", "32", "--likelihood-n", "16",
               "--tracking", "disabled", "--no-progress", "--out", out])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| model | n | floor | NFE <= 1 |" in printed and "| model | straightness |" in printed
    assert sorted(os.listdir(out)) == ["bench.csv", "bench.json", "bench.md", "bench_curvature.png", "bench_pareto.png",
                                       "curvature.json", "models.json", "models.md", "pareto.md"]
    with open(os.path.join(out, "bench.json")) as f:
        rows = json.load(f)
    fixed = [("euler", 1), ("euler", 2), ("heun", 2), ("renoise", 1), ("renoise", 2)]
    assert [(r["solver"], r["nfe"]) for r in rows] == fixed[:3] + [("dopri5", rows[3]["nfe"])] + fixed[3:] + fixed
    assert rows[3]["grid"] == "adaptive" and rows[3]["nfe"] > 0
    assert [r["grid"] for r in rows[-5:]] == ["power:0.5"] * 5 and {r["n"] for r in rows[-5:]} == {32}
    for r in rows:
        assert set(BENCH_COLUMNS) <= set(r)
        assert r["model"] == "tinyrun" and r["task"] == "gaussian->8gaussians"
        assert r["n"] == (32 if r["grid"] == "power:0.5" else 64)
    with open(os.path.join(out, "models.json")) as f:
        (model,) = json.load(f)
    assert model["logp_n"] == 16 and model["logp"] < 0 and model["logp_divergence"] == "exact"
    with open(os.path.join(out, "bench.csv")) as f:
        assert tuple(csv.DictReader(f).fieldnames) == BENCH_COLUMNS + ("pareto",)
    assert not os.path.exists(os.path.join(out, "wandb"))


def test_bench_unknown_solver(trained, tmp_path, capsys):
    assert_user_error(main(["bench", trained["ckpt"], "--solvers", "euler,nope", "--n", "16", "--tracking",
                            "disabled", "--no-progress", "--out", str(tmp_path / "b")]), capsys,
                      "unknown solver 'nope'", "dopri5")


# ------------------------------------------------------------------------------------------ argparse

def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_python_m_flowmatch_help():
    proc = subprocess.run([sys.executable, "-m", "flowmatch", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for cmd in ("train", "sample", "bench", "demo"):
        assert cmd in proc.stdout
