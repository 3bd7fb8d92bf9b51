"""The report tables (flowmatch/reports.py) from hand-made bench rows, and the split of the pipelines:
each module exports only names it defines, so every public name has one import path."""

from __future__ import annotations

import importlib
import json

import pytest

from flowmatch.reports import STAGE_COLUMNS, reflow_targets, write_reflow_summary


def _row(stage: str, solver: str, nfe: int, w2: float, s: float, task: str = "moons") -> dict:
    return {"task": task, "stage": stage, "solver": solver, "num_steps": nfe if solver == "euler" else None,
            "nfe": nfe, "w2": w2, "w2_floor": 0.25, "mmd": 0.01, "straightness": s, "straightness_rel": s / 4,
            "seconds": 0.1, "n": 500}


ROWS = [_row("1-RF", "euler", 1, 2.0, 1.6), _row("1-RF", "dopri5", 44, 0.5, 1.6),
        _row("2-RF", "euler", 1, 1.0, 0.4), _row("2-RF", "dopri5", 20, 0.55, 0.4),
        _row("2-RF+distill", "euler", 1, 0.75, 0.1), _row("1-RF", "euler", 1, 3.0, 2.0, task="gaussians")]


def test_reflow_targets_ratios_from_the_stage_rows():
    moons, gaussians = reflow_targets(ROWS)
    assert moons["task"] == "moons" and moons["w2_floor"] == 0.25
    assert moons["S ratio 2-RF/1-RF"] == pytest.approx(0.4 / 1.6)
    assert (moons["1-RF dopri5 W2"], moons["2-RF dopri5 W2"]) == (0.5, 0.55)
    assert (moons["1-RF Euler-1 W2"], moons["2-RF Euler-1 W2"]) == (2.0, 1.0)
    assert moons["distilled stage"] == "2-RF+distill" and moons["distilled Euler-1 W2"] == 0.75
    assert moons["best one-step W2 / floor"] == pytest.approx(0.75 / 0.25)  # the distilled stage beats 2-RF
    # a task with 1-RF only: no 2-RF or distilled numbers, no ratio
    assert gaussians["S(2-RF)"] is None and gaussians["best one-step W2 / floor"] is None


def test_write_reflow_summary_writes_stage_and_target_tables(tmp_path):
    md = write_reflow_summary(ROWS, str(tmp_path))
    assert json.loads((tmp_path / "targets.json").read_text()) == reflow_targets(ROWS)
    assert (tmp_path / "targets.md").read_text() == md and "| moons |" in md
    header = (tmp_path / "stages.md").read_text().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == list(STAGE_COLUMNS)


@pytest.mark.parametrize("name", ["flowmatch.pipelines", "flowmatch.evaluation", "flowmatch.reports",
                                  "flowmatch.reflow_chain"])
def test_module_exports_only_what_it_defines(name):
    mod = importlib.import_module(name)
    elsewhere = [n for n in mod.__all__ if getattr(getattr(mod, n), "__module__", name) not in (name, None)
                 and callable(getattr(mod, n))]
    assert not elsewhere, f"{name}.__all__ re-exports {elsewhere}; import them from their own module"
