"""The few-step table (flowmatch.few_step): every method from one teacher, benched alike, with costs."""

from __future__ import annotations

import json

import pytest

from flowmatch.errors import FlowmatchError
from flowmatch.few_step import T1_CANDIDATES, few_step_from_config

TINY = ("train.steps=20", "reflow.num_pairs=64", "reflow.shard_size=64", "reflow.solver=euler", "reflow.nfe=4",
        "reflow.steps=10", "distill.steps=10", "consistency.steps=10", "consistency.num_steps=4",
        "reflow.bench_n=64", "reflow.bench_nfes=[1,2]", "reflow.bench_solvers=[euler,dopri5]",
        "eval.atol=1e-3", "eval.rtol=1e-3")


def test_every_method_is_benched_with_its_cost_and_reused(make_cfg, tmp_path):
    cfg = make_cfg(*TINY)
    rows = few_step_from_config(cfg, str(tmp_path), methods=["reflow", "distill", "cd", "ct"], progress=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assert methods == ["1-RF", "reflow", "distill", "cd", "ct"]
    by = {m: [r for r in rows if r["method"] == m] for m in methods}
    cost = {m: by[m][0] for m in methods}
    assert cost["1-RF"]["steps"] == 20 and cost["reflow"]["steps"] == 30 and cost["distill"]["steps"] == 40
    assert cost["cd"]["steps"] == 30 and cost["ct"]["steps"] == 10  # cumulative from the teacher; CT has none
    assert cost["reflow"]["teacher_evals"] == 64 * 4 and cost["distill"]["teacher_evals"] == 2 * 64 * 4
    assert cost["cd"]["teacher_evals"] == 10 * 32 and cost["ct"]["teacher_evals"] == 0  # steps x batch x 1 Euler
    assert all(c["params"] == cost["1-RF"]["params"] > 0 for c in cost.values())
    for m in ("cd", "ct"):  # consistency sampling at 2 steps, uniform and with t1 chosen on a validation draw
        two = [r for r in by[m] if r["solver"] == "consistency" and r["nfe"] == 2]
        assert len(two) == 2 and sum("t1" in r for r in two) == 1
        assert next(r["t1"] for r in two if "t1" in r) in T1_CANDIDATES
        # its velocity form by one Euler step (the one-step sample) and the adaptive solve; no unused Euler rows
        assert [r["nfe"] for r in by[m] if r["solver"] == "euler"] == [1]
        assert sum(r["solver"] == "dopri5" for r in by[m]) == 1
    saved = json.loads((tmp_path / "few_step.json").read_text())
    assert [r["method"] for r in saved] == [r["method"] for r in rows]
    assert "| cd |" in (tmp_path / "few_step_summary.md").read_text()
    before = (tmp_path / "CD" / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = few_step_from_config(cfg, str(tmp_path), methods=["cd"], progress=False)
    assert (tmp_path / "CD" / "checkpoints" / "last.pt").stat().st_mtime_ns == before  # reused, not retrained
    assert {r["method"] for r in again} == {"1-RF", "cd"}


@pytest.mark.parametrize("methods,match", [(["cm"], "unknown few-step method .cm.*reflow, distill, apt, cd, ct, cd-lora"),
                                           (["distill"], "add reflow")])
def test_bad_methods_are_refused(make_cfg, tmp_path, methods, match):
    with pytest.raises(FlowmatchError, match=match):
        few_step_from_config(make_cfg(*TINY), str(tmp_path), methods=methods, progress=False)


def test_lora_acceleration_and_composition(make_cfg, tmp_path):
    from flowmatch.few_step import composition_from_config

    cfg = make_cfg(*TINY)
    rows = few_step_from_config(cfg, str(tmp_path), methods=["cd-lora"], progress=False)
    lora = next(r for r in rows if r["method"] == "cd-lora")
    full = next(r for r in rows if r["method"] == "1-RF")
    assert 0 < lora["params"] < full["params"] and lora["teacher_evals"] == 10 * 32
    assert (tmp_path / "CD-LORA" / "checkpoints" / "adapter.pt").is_file()
    comp = composition_from_config(cfg, str(tmp_path), progress=False)
    assert {r["model"] for r in comp} == {"style+accel", "style+own accel", "style"}
    assert all(r["task"] == "gaussian->upper_moon" and r["w2"] == r["w2"] for r in comp)
    assert {(r["solver"], r["nfe"]) for r in comp if r["model"] == "style"} == {("euler", k) for k in (1, 2, 4)}
    assert (tmp_path / "composition.md").is_file()


def test_best_t1_is_the_minimum_on_its_own_validation_draw(make_cfg, tmp_path, monkeypatch):
    import torch

    import flowmatch.few_step as fs
    from flowmatch.data.task import build_task
    from flowmatch.few_step import _VALIDATION_SEED, _consistency_stage, best_t1
    from flowmatch.metrics.distances import w2
    from flowmatch.pipelines import train_from_config
    from flowmatch.solvers import get_solver
    from flowmatch.training import load_model
    from flowmatch.utils import make_generator

    monkeypatch.setattr(fs, "VALIDATION_N", 300)
    teacher = train_from_config(make_cfg(*TINY), str(tmp_path / "t"), progress=False,
                                evaluate=False).checkpoint
    cfg = make_cfg(*TINY, "reflow.bench_n=500")  # the bench's n: above VALIDATION_N
    ckpt = train_from_config(_consistency_stage(cfg, "cd", teacher), str(tmp_path / "cd"), progress=False,
                             evaluate=False).checkpoint
    t1, score = best_t1(ckpt, cfg, candidates=(0.2, 0.5, 0.8))
    # by hand: VALIDATION_N (< bench_n: 300 of 500) source draws of the validation seed, its (exact-split)
    # reference from seed + 1
    task, model = build_task(cfg.data), load_model(ckpt).model
    x0 = task.source.sample(300, generator=make_generator(_VALIDATION_SEED))
    ref = task.target.reference(300, generator=make_generator(_VALIDATION_SEED + 1))
    with torch.no_grad():
        by_hand = {c: w2(get_solver("consistency").integrate(model, x0, torch.tensor([0.0, c, 1.0])).x1, ref)
                   for c in (0.2, 0.5, 0.8)}
    assert score == pytest.approx(by_hand[t1], rel=1e-6) and score == min(by_hand.values())


APT = ("apt.steps=6", "apt.eval_every=3", "apt.eval_n=64")


@pytest.mark.parametrize("which,want", [("last_round", "out/pairs-2RF"), ("teacher", "out/pairs-1RF")])
def test_apt_stage_regresses_the_pair_store_apt_regression_pairs_names(make_cfg, which, want):
    from flowmatch.reflow_chain import apt_stage_config

    cfg = make_cfg(*TINY, "apt.regression_weight=1", f"apt.regression_pairs={which}")
    stage = apt_stage_config(cfg, "gen.pt", "teacher.pt", "out/pairs-2RF", "out/pairs-1RF")
    assert (stage.coupling.name, stage.coupling.pairs) == ("paired", want)
    assert stage.apt.discriminator_init == "teacher.pt" and stage.train.init == "gen.pt"
    with pytest.raises(FlowmatchError, match=f"apt.regression_weight = 1.0 reads a pair store \\(apt.regression_pairs={which}\\): this APT"):
        apt_stage_config(cfg, "gen.pt", "teacher.pt", *(("out/pairs-2RF", None) if which == "teacher" else (None,)))
    plain = apt_stage_config(make_cfg(*TINY), "gen.pt", "teacher.pt", "out/pairs-2RF", "out/pairs-1RF")
    assert (plain.coupling.name, plain.coupling.pairs) == ("independent", None)
    # the discriminator's teacher rows read the same store, with or without the regression
    mixed = apt_stage_config(make_cfg(*TINY, "apt.real_from_teacher=0.5", f"apt.regression_pairs={which}"),
                             "gen.pt", "teacher.pt", "out/pairs-2RF", "out/pairs-1RF")
    assert (mixed.coupling.name, mixed.coupling.pairs) == ("paired", want)


def test_apt_post_trains_the_distilled_model_and_is_scored_by_its_selected_checkpoint(make_cfg, tmp_path):
    import torch

    from flowmatch.reflow_chain import reflow_from_config

    cfg = make_cfg(*TINY, *APT)
    rows = few_step_from_config(cfg, str(tmp_path), methods=["reflow", "distill", "apt"], progress=False)
    cost = {r["method"]: r for r in rows}
    stage = tmp_path / "2-RF+distill+APT" / "checkpoints"
    best = torch.load(stage / "best.pt", weights_only=True)
    assert best["objective"]["name"] == "apt" and best["step"] in (0, 3, 6)
    # optimiser steps: both players' (6 discriminator + 6 generator updates) on top of the distillation's
    assert cost["apt"]["steps"] == cost["distill"]["steps"] + 12
    assert cost["apt"]["teacher_evals"] == cost["distill"]["teacher_evals"]
    assert cost["apt"]["params"] == cost["distill"]["params"]  # the generator's, not the discriminator's
    # the chain's APT stage is the same stage (reused: the few-step table ran in the chain's directory)
    before = (stage / "last.pt").stat().st_mtime_ns
    chain = reflow_from_config(cfg, str(tmp_path), rounds=2, distill=True, apt=True, progress=False)
    assert (stage / "last.pt").stat().st_mtime_ns == before
    by = {(r["stage"], r["solver"], r["nfe"]): r["w2"] for r in chain}
    assert by[("2-RF+distill+APT", "euler", 1)] == next(r["w2"] for r in rows if r["method"] == "apt"
                                                         and r["solver"] == "euler" and r["nfe"] == 1)
    with pytest.raises(FlowmatchError, match="APT stage post-trains the distilled .*--distill"):
        reflow_from_config(cfg, str(tmp_path), rounds=2, distill=False, apt=True, progress=False)
    with pytest.raises(FlowmatchError, match="apt post-trains the distilled .*add reflow,distill"):
        few_step_from_config(cfg, str(tmp_path), methods=["apt"], progress=False)
