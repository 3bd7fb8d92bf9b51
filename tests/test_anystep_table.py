"""Any-step models in the bench and the few-step table: the anystep solver (one jump a step), bench rows
of an any-step checkpoint, the shortcut / MeanFlow / OT-CFM methods with their costs, the table at NFE 1,
2, 4, 8 and its Pareto plots."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowmatch.errors import ConfigError, FlowmatchError
from flowmatch.few_step import TABLE_NFES, few_step_best, few_step_from_config, few_step_summary
from flowmatch.solvers import get_solver, solve

F64 = torch.float64
TINY = ("train.steps=20", "reflow.bench_n=64", "reflow.bench_nfes=[1,2]", "reflow.bench_solvers=[euler]",
        "shortcut.steps=10", "shortcut.base_steps=8", "meanflow.steps=10", "eval.atol=1e-3", "eval.rtol=1e-3")


class _DecayAverage:
    """The exact average velocity of the flow ``v = -x`` over ``[t, t + h]``: ``x (e^-h - 1) / h``
    (``-x`` at ``h = 0``), recording the steps it is asked for."""

    step_input = True

    def __init__(self):
        self.hs = []

    def __call__(self, x, t, h=None):
        self.hs.append(h.clone())
        return x * torch.where(h > 0, torch.expm1(-h) / h.clamp_min(1e-300), -torch.ones_like(h))[:, None]


def test_the_anystep_solver_jumps_exactly_with_the_true_average_velocity():
    x0 = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    for grid in ("uniform", "cosine"):  # any grid: each jump is exact, h = t' - t
        u = _DecayAverage()
        tr = solve(u, x0, "anystep", nfe=4, grid=grid)
        torch.testing.assert_close(tr.x1, x0 * math.exp(-1), rtol=1e-13, atol=1e-13)
        assert tr.nfe == 4 == len(u.hs)
        torch.testing.assert_close(torch.stack([h[0] for h in u.hs]), torch.diff(tr.ts))
    s = get_solver("anystep")
    assert (s.name, s.order, s.stages, s.adaptive) == ("anystep", 1, 1, False)


def test_the_anystep_solver_refuses_a_plain_flow_field():
    from flowmatch.models import MLPVelocity

    for field in (lambda x, t: -x, MLPVelocity(dim=2, hidden=8, depth=1)):
        with pytest.raises(ConfigError, match="^solver 'anystep' jumps with an any-step model") as e:
            solve(field, torch.zeros(4, 2), "anystep", nfe=2)
        assert "\n" not in str(e.value)
    assert MLPVelocity(dim=2, hidden=8, depth=1, step_input=True).step_input


def test_the_few_step_table_scores_shortcut_and_meanflow_at_every_budget(make_cfg, tmp_path):
    cfg = make_cfg(*TINY, "ot_cfm.steps=12")
    rows = few_step_from_config(cfg, str(tmp_path), methods=["shortcut", "meanflow", "ot-cfm"], progress=False)
    assert list(dict.fromkeys(r["method"] for r in rows)) == ["1-RF", "ot-cfm", "shortcut", "meanflow"]
    ot = next(r for r in rows if r["method"] == "ot-cfm")  # from scratch on minibatch-OT pairs: its own cost only
    assert (ot["steps"], ot["teacher_evals"], ot["params"]) == (12, 0, rows[0]["params"])  # ot_cfm.steps
    from flowmatch.training import load_checkpoint

    assert load_checkpoint(str(tmp_path / "OT-CFM" / "checkpoints" / "last.pt"))["config"]["coupling"]["name"] == "ot"
    for m in ("shortcut", "meanflow"):
        rs = [r for r in rows if r["method"] == m]
        assert sorted(r["nfe"] for r in rs) == list(TABLE_NFES) and {r["solver"] for r in rs} == {"anystep"}
        assert all(r["w2"] == r["w2"] and r["straightness"] is not None for r in rs)  # the h = 0 field's
        r = rs[0]  # cumulative from the teacher (20 steps) on real data: no teacher evaluations
        assert r["steps"] == 30 and r["teacher_evals"] == 0 and r["wall_s"] >= rows[0]["wall_s"]
        assert r["params"] > rows[0]["params"]  # the step projection on top of the teacher's weights
    # the teacher at its best solver: every fixed-step solver that fits each budget
    assert {r["solver"] for r in rows if r["method"] == "1-RF" and r["nfe"] == 4} >= {"euler", "heun", "rk4"}
    # ... chosen on a validation draw: every fixed-step teacher row at the table's budgets carries its score
    teacher = [r for r in rows if r["method"] == "1-RF" and r["nfe"] in TABLE_NFES and r["grid"] != "adaptive"]
    assert teacher and all(r["validation_w2"] == r["validation_w2"] for r in teacher)
    assert all(r["validation_w2"] != r["w2"] for r in teacher)  # another draw than the scored one
    table = (tmp_path / "few_step_summary.md").read_text()
    assert "| w2 NFE 1 | w2 NFE 2 | w2 NFE 4 | w2 NFE 8 |" in table and "| meanflow | " in table
    assert "(anystep)" in table and "straightness" in table
    assert few_step_summary(rows) == table
    best = json.loads((tmp_path / "few_step_best.json").read_text())
    assert {(b["method"], b["nfe"]) for b in best} >= {(m, k) for m in ("shortcut", "meanflow") for k in TABLE_NFES}
    for name in ("few_step_pareto_nfe.png", "few_step_pareto_cost.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_anystep_models_start_from_2rf_with_its_cost(make_cfg, tmp_path):
    """``start: 2-RF``: the any-step model is initialised from the chain's 2-RF (its weights, and its velocity
    with ``velocity: teacher``), in a stage of its own, its cost cumulative from 2-RF's (steps, pairs)."""
    from flowmatch.training import load_checkpoint

    cfg = make_cfg(*TINY, "reflow.num_pairs=64", "reflow.shard_size=64", "reflow.solver=euler", "reflow.nfe=4",
                   "reflow.steps=10", "shortcut.start=2-RF", "shortcut.velocity=teacher")
    rows = few_step_from_config(cfg, str(tmp_path), methods=["reflow", "shortcut"], progress=False)
    assert list(dict.fromkeys(r["method"] for r in rows)) == ["1-RF", "reflow", "shortcut"]
    cost = {r["method"]: r for r in rows}
    reflow_ckpt = str(tmp_path / "2-RF" / "checkpoints" / "last.pt")
    state = load_checkpoint(str(tmp_path / "2-RF+Shortcut" / "checkpoints" / "last.pt"))
    assert state["config"]["train"]["init"] == reflow_ckpt and not (tmp_path / "Shortcut").exists()
    evals = state["objective"]["state"]["teacher_evals"]  # one 2-RF velocity a flow row
    assert evals > 0
    assert cost["shortcut"]["steps"] == cost["reflow"]["steps"] + 10 == 40
    assert cost["shortcut"]["teacher_evals"] == cost["reflow"]["teacher_evals"] + evals == 64 * 4 + evals
    assert cost["shortcut"]["wall_s"] >= cost["reflow"]["wall_s"]
    # before any update its one jump is 2-RF's Euler step: the step projection starts at zero
    from flowmatch.training.checkpoint import load_model

    two_rf = load_model(reflow_ckpt).model.eval()
    fresh = anystep_start(cfg, reflow_ckpt)
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(solve(fresh, x0, "anystep", nfe=1).x1, solve(two_rf, x0, "euler", nfe=1).x1)
    with pytest.raises(FlowmatchError, match=r"^few-step method meanflow starts from 2-RF \(meanflow.start=2-RF\): "
                                             r"add reflow"):
        few_step_from_config(make_cfg(*TINY, "meanflow.start=2-RF"), str(tmp_path / "x"), methods=["meanflow"],
                             progress=False)


def anystep_start(cfg, init):
    """The shortcut stage's network as built from ``init``, before any update."""
    from flowmatch.few_step import anystep_stage
    from flowmatch.training import build_trainer

    return build_trainer(anystep_stage(cfg, "shortcut", init)).ema.model.eval()


def test_bench_rows_of_an_anystep_checkpoint(make_cfg, tmp_path):
    """The bench samples an any-step checkpoint with the anystep solver like any solver; a plain flow
    checkpoint is refused by it."""
    from flowmatch.few_step import anystep_stage
    from flowmatch.pipelines import bench_from_checkpoints, train_from_config

    teacher = train_from_config(make_cfg(*TINY), str(tmp_path / "t"), progress=False, evaluate=False).checkpoint
    ckpt = train_from_config(anystep_stage(make_cfg(*TINY), "meanflow", teacher), str(tmp_path / "mf"),
                             progress=False, evaluate=False).checkpoint
    rows = bench_from_checkpoints([ckpt], None, solvers=["anystep"], nfes=[1, 2, 4, 8], n=64, tracking="disabled",
                                  progress=False, plot=False, names=["mf"])
    assert [(r["solver"], r["nfe"], r["num_steps"]) for r in rows] == [("anystep", k, k) for k in (1, 2, 4, 8)]
    assert all(math.isfinite(r["w2"]) for r in rows)
    with pytest.raises(ConfigError, match="has no step input h"):
        bench_from_checkpoints([teacher], None, solvers=["anystep"], nfes=[1], n=64, tracking="disabled",
                               progress=False, plot=False)


@pytest.mark.parametrize("methods,match", [(["mean-flow"], "unknown few-step method .mean-flow.*shortcut, meanflow"),
                                           (["shortcut", "cm"], "unknown few-step method .cm.")])
def test_bad_methods_are_refused(make_cfg, tmp_path, methods, match):
    with pytest.raises(FlowmatchError, match=match):
        few_step_from_config(make_cfg(*TINY), str(tmp_path), methods=methods, progress=False)


def test_the_cli_runs_the_anystep_methods_and_its_help_names_them(make_cfg, tmp_path, capsys):
    import yaml

    from flowmatch.cli import build_parser, main
    from flowmatch.config import to_dict

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(make_cfg(*TINY, "name=tiny"))))
    assert main(["distill", "run", str(cfg_path), "--methods", "shortcut,meanflow", "--out", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    table = (tmp_path / "out" / "few_step.md").read_text()
    assert "## tiny" in table and "| shortcut | " in table and "| meanflow | " in table
    assert (tmp_path / "out" / "tiny" / "few_step_pareto_cost.png").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "run", "--help"])
    assert "shortcut, meanflow, ot-cfm (default: all)" in " ".join(capsys.readouterr().out.split())


def test_train_only_parts_are_reused_by_the_run_that_benches_them(make_cfg, tmp_path, capsys):
    # make few-step-images: parts of the table trained in separate processes (--train-only), one bench after
    import yaml

    from flowmatch.cli import main
    from flowmatch.config import to_dict

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(make_cfg(*TINY, "name=tiny", "ot_cfm.steps=12"))))
    out = tmp_path / "out"
    for methods in ("shortcut", "ot-cfm"):
        assert main(["distill", "run", str(cfg_path), "--methods", methods, "--train-only", "--out", str(out),
                     "--no-progress"]) == 0
        assert f"trained {methods} under {out}/tiny (--train-only: no table)" in capsys.readouterr().out
    assert not (out / "tiny" / "few_step.json").exists() and not (out / "few_step.md").exists()
    ckpts = {label: out / "tiny" / label / "checkpoints" / "last.pt" for label in ("1-RF", "Shortcut", "OT-CFM")}
    before = {label: p.stat().st_mtime_ns for label, p in ckpts.items()}
    assert main(["distill", "run", str(cfg_path), "--methods", "shortcut,ot-cfm", "--out", str(out),
                 "--no-progress"]) == 0
    assert {label: p.stat().st_mtime_ns for label, p in ckpts.items()} == before  # reused, not retrained
    rows = json.loads((out / "tiny" / "few_step.json").read_text())
    assert {r["method"] for r in rows} == {"1-RF", "shortcut", "ot-cfm"}
    assert "| shortcut | " in (out / "few_step.md").read_text()


def test_the_index_gathers_every_tasks_table_written_by_separate_runs(tmp_path):
    from flowmatch.few_step import write_few_step_index

    for name, text in (("b_task", "| method |\n| b |\n"), ("a_task", "| method |\n| a |\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "few_step_summary.md").write_text(text)
    (tmp_path / "no_table").mkdir()  # a directory without a table (a reflow chain's only) is skipped
    (tmp_path / "stages.md").write_text("not a task")
    index = (tmp_path / "few_step.md")
    assert write_few_step_index(str(tmp_path)) == str(index)
    assert index.read_text() == "## a_task\n\n| method |\n| a |\n\n## b_task\n\n| method |\n| b |\n"


def test_the_table_chooses_nothing_on_the_scored_draw():
    """The teacher's solver at each budget is the one with the lowest validation score (not the lowest
    scored W2); a consistency model's two-step cell is its validation-chosen t1 row, whatever scores lower."""
    cost = {"steps": 1, "wall_s": 1.0, "teacher_evals": 0, "params": 1}

    def row(method, solver, nfe, w2, **kw):
        return {"method": method, "solver": solver, "nfe": nfe, "grid": "uniform", "w2": w2, **cost, **kw}

    rows = [row("1-RF", "euler", 2, 0.50, validation_w2=0.40), row("1-RF", "midpoint", 2, 0.45, validation_w2=0.41),
            row("cd", "euler", 2, 0.30), row("cd", "consistency", 2, 0.20),
            row("cd", "consistency", 2, 0.25, t1=0.7)]
    best = {(b["method"], b["nfe"]): b for b in few_step_best(rows, nfes=(2,))}
    assert best[("1-RF", 2)]["solver"] == "euler" and best[("1-RF", 2)]["w2"] == 0.50
    assert best[("cd", 2)]["w2"] == 0.25


def test_the_settings_script_trains_each_setting_and_scores_it_on_validation_draws(make_cfg, tmp_path):
    """experiments/toy/anystep_settings.py: one row per grid value (and per baseline), each scored at every
    NFE on the same validation draws; its monotone test reads paired differences."""
    import importlib.util
    import os
    import subprocess
    import sys

    import yaml

    from flowmatch.config import to_dict
    from flowmatch.pipelines import train_from_config

    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "toy", "anystep_settings.py")
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(to_dict(make_cfg(*TINY, "name=tiny"))))
    teacher = train_from_config(make_cfg(*TINY), str(tmp_path / "t"), progress=False, evaluate=False).checkpoint
    subprocess.run([sys.executable, script, str(cfg_path), teacher, "--method", "shortcut", "--grid",
                    "shortcut.ema=0,0.5", "--set", "shortcut.steps=4", "--baseline", teacher, "--draws", "2",
                    "--n", "64", "--out", str(tmp_path / "out")], check=True, capture_output=True, timeout=300)
    out = json.loads((tmp_path / "out" / "anystep_settings.json").read_text())
    base, *rows = out["rows"]
    assert base["baseline"] == teacher and len(base["scores"]["1"]) == 2
    assert [r["shortcut.ema"] for r in rows] == ["0", "0.5"] and all(r["steps"] == 4 for r in rows)
    for r in rows:
        assert sorted(r["scores"], key=int) == ["1", "2", "4", "8"] and all(len(v) == 2 for v in r["scores"].values())
        assert r["w2 nfe 1"] == pytest.approx(sum(r["scores"]["1"]) / 2)
    assert rows[0]["scores"] != rows[1]["scores"]  # the setting changed the model
    assert "| shortcut.ema |" in (tmp_path / "out" / "anystep_settings.md").read_text()
    spec = importlib.util.spec_from_file_location("anystep_settings", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.monotone({1: [0.5, 0.6, 0.7], 2: [0.4, 0.5, 0.6]})
    assert not mod.monotone({1: [0.5, 0.6, 0.7], 2: [0.6, 0.71, 0.8]})  # worse at NFE 2 on every draw
    assert mod.monotone({1: [0.5, 0.6], 2: [0.6, 0.5]})  # up on one draw, down on the other: noise


def test_paired_w2_takes_an_anystep_entry():
    import importlib.util
    import os

    script = os.path.join(os.path.dirname(__file__), "..", "experiments", "toy", "paired_w2.py")
    spec = importlib.util.spec_from_file_location("paired_w2", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod._entry("Shortcut:anystep:1") == ("Shortcut", "anystep", 1)
    assert mod._entry("2-RF:dopri5") == ("2-RF", "dopri5", None)
    with pytest.raises(SystemExit, match="anystep"):  # the message lists the step solvers too
        mod._entry("Shortcut:anystep")
