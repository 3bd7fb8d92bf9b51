"""The few-step table: every method trained from one 1-RF teacher, benchmarked alike, quality beside cost.

:func:`few_step_from_config` trains (or reuses, stage by stage) under ``OUT``:

- ``1-RF``: the teacher (``reflow.teacher``, or the experiment trained as it is);
- ``reflow``: 2-RF on ``reflow.num_pairs`` pairs of the teacher (the reflow chain's round);
- ``distill``: one-step distillation of 2-RF's pairs (needs ``reflow``);
- ``apt``: adversarial post-training of the distilled model against real data (needs ``distill``; the
  ``apt`` section; its discriminator from the teacher), scored by the checkpoint its validation draw
  selected (``best.pt``);
- ``cd``: consistency distillation of the teacher (``train.objective: cd``, initialised from it; the
  ``consistency`` section's steps, lr and distance);
- ``ct``: consistency training from scratch (no teacher; the same steps), the baseline that shows what
  the teacher buys;
- ``cd-lora``: CD as a LoRA on the teacher's weights (``lora.rank``, :data:`LORA_RANK` when the config
  leaves it at 0; the teacher is the adapter disabled), benched as the base with the adapter merged.
- ``shortcut`` / ``meanflow``: any-step models (:mod:`flowmatch.distill.shortcut`,
  :mod:`flowmatch.distill.meanflow`) initialised from the flow their section's ``start`` names
  (``model.step_input: true``; the step projection starts at zero): the teacher (``1-RF``, stage
  ``Shortcut`` / ``Meanflow``) or 2-RF (``2-RF``, stage ``2-RF+Shortcut`` / ``2-RF+Meanflow``, needs
  ``reflow``: the straightened flow's jumps are short to learn), trained on real data, their sections'
  ``steps``, ``lr`` and ``velocity`` (the flow rows' velocity: the data's, or that flow's;
  :func:`anystep_stage`); one network for every budget, scored by its jumps (the ``anystep`` solver);
- ``ot-cfm``: flow matching on minibatch-OT pairs (``coupling.name: ot``) from scratch for
  ``ot_cfm.steps`` (default: the teacher's ``train.steps``): the straight-path baseline without a teacher.

:func:`composition_from_config` tests the LCM-LoRA claim on a toy task: a "style" LoRA fine-tunes the
teacher to another target (``upper_moon``: the upper moon of moons), an acceleration LoRA (CD) is
trained on the base, and on the style's target at NFE 1, 2 and 4 it compares the two composed, an
acceleration trained on the style model itself, and the style model with Euler.

Every flow model is scored by the reflow chain's bench (``reflow.bench_solvers`` at ``reflow.bench_nfes``),
the teacher also by every fixed-step solver of :data:`TEACHER_SOLVERS` at :data:`TABLE_NFES` (its best
solver at each budget, chosen on a validation draw of its own seed: ``validation_w2`` / ``validation_fd``);
the any-step models by their jumps at :data:`TABLE_NFES` (a shortcut model at
those up to ``shortcut.base_steps``), their straightness that of their ``h = 0`` field; the
consistency models also by multistep consistency sampling (:class:`~flowmatch.solvers.multistep.ConsistencySampler`)
at NFE 2, 4 and 8 on a uniform grid of re-noising times and at NFE 2 with the re-noising time ``t1``
chosen on a validation draw (its own seed, never the scored one) among :data:`T1_CANDIDATES`.

Cost columns, each *cumulative from the 1-RF teacher* (what it takes to get that model):
``steps`` (optimiser steps; APT's count both players'), ``wall_s`` (training seconds: steps / the run's steps/s; pair generation
not included), ``teacher_evals`` (velocity evaluations of a teacher per training sample: pairs x
NFE per pair for reflow, CD's teacher steps, one a flow row for shortcut and MeanFlow with
``velocity: teacher`` (0 with ``velocity: data``: real data and their own network); 0 for CT and OT-CFM,
which have no teacher and count only their own steps),
``params`` (trainable parameters of the last stage).
Writes ``OUT/few_step.json`` / ``.csv`` / ``.md`` (the stages.json schema plus ``method`` and the cost
columns), ``OUT/few_step_summary.md`` (the table: per method, its best W2 or FD at NFE 1, 2, 4 and 8
with the solver that reaches it, dopri5, straightness and the cost), ``OUT/few_step_best.json`` (those
cells as data) and the Pareto plots ``OUT/few_step_pareto_nfe.png`` (quality against NFE, a line per
method) and ``OUT/few_step_pareto_cost.png`` (quality against training seconds). On an image task
also ``OUT/few_step_memorisation.json``, the memorisation check of each method's one-step samples (the
teacher's by dopri5) and their precision and recall against the training images, summarised in
``few_step_summary.md``: a lower training-reference FD is not a better model when the samples copy
training images.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from flowmatch.bench import row_metric, rows_to_markdown, write_bench
from flowmatch.config import ExperimentConfig
from flowmatch.data.pairs import read_manifest
from flowmatch.data.task import is_image_task
from flowmatch.errors import FlowmatchError
from flowmatch.io import atomic_write_text
from flowmatch.pipelines import TrainSummary, bench_from_checkpoints
from flowmatch.reflow import generate_pairs
from flowmatch.reflow_chain import (apt_stage_config, reflow_stage_configs, selected_checkpoint, stage_config,
                                    train_stage)
from flowmatch.reports import stage_columns
from flowmatch.training import load_checkpoint

__all__ = ["FEW_STEP_METHODS", "ANYSTEP_METHODS", "TABLE_NFES", "TEACHER_SOLVERS", "T1_CANDIDATES", "LORA_RANK",
           "VALIDATION_N", "few_step_from_config", "anystep_stage", "best_t1", "few_step_summary", "few_step_best",
           "write_few_step_pareto", "write_few_step_index",
           "few_step_memorisation", "memorisation_summary", "composition_from_config"]

FEW_STEP_METHODS = ("reflow", "distill", "apt", "cd", "ct", "cd-lora", "shortcut", "meanflow", "ot-cfm")
ANYSTEP_METHODS = ("shortcut", "meanflow")
CONSISTENCY_METHODS = ("cd", "ct", "cd-lora")
TABLE_NFES = (1, 2, 4, 8)  # the table's budgets: every method's best W2 / FD at each
# the teacher's fixed-step solvers beside reflow.bench_solvers, so that its row at each NFE is its best solver's
TEACHER_SOLVERS = ("euler", "midpoint", "heun", "rk4", "ab2")
LORA_RANK = 4
T1_CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_VALIDATION_SEED = 10_007  # the validation draw's seed: never the bench's (0)
VALIDATION_N = 2000  # samples of the t1 validation draw (W2 on 5,000 points costs ~6x more; the choice is coarse)


def few_step_from_config(cfg: ExperimentConfig, out: str, *, methods: Sequence[str] = FEW_STEP_METHODS,
                         progress: bool = True, bench: bool = True) -> list[dict]:
    """Train every method of ``methods`` from one teacher and write the few-step table (see the
    module docstring); returns its rows. ``bench=False`` trains (or reuses) the stages and stops there,
    writing no table and returning ``[]``: a part of a table whose methods are trained by several
    processes (``make few-step-images``), benched once they are all done."""
    unknown = [m for m in methods if m not in FEW_STEP_METHODS]
    if unknown:
        raise FlowmatchError(f"unknown few-step method {unknown[0]!r}; valid methods: {', '.join(FEW_STEP_METHODS)}")
    if "distill" in methods and "reflow" not in methods:
        raise FlowmatchError("few-step method distill distils 2-RF's pairs: add reflow to --methods")
    if "apt" in methods and "distill" not in methods:
        raise FlowmatchError("few-step method apt post-trains the distilled one-step model: add reflow,distill "
                             "to --methods")
    for method in ANYSTEP_METHODS:
        if method in methods and getattr(cfg, method).start == "2-RF" and "reflow" not in methods:
            raise FlowmatchError(f"few-step method {method} starts from 2-RF ({method}.start=2-RF): add reflow to "
                                 f"--methods, or set {method}.start=1-RF")
    rc, cc = cfg.reflow, cfg.consistency
    stages: list[tuple[str, str, dict]] = []  # (method, checkpoint, cost)
    if rc.teacher:
        teacher = rc.teacher
        stages.append(("1-RF", teacher, _cost(teacher, None, 0, 0)))
    else:
        s = train_stage(stage_config(cfg, f"{cfg.name}-1RF"), out, "1-RF", progress)
        teacher = s.checkpoint
        stages.append(("1-RF", teacher, _cost(teacher, s, 0, 0)))
    base = stages[0][2]
    if "ot-cfm" in methods:  # the baseline without a teacher: minibatch-OT flow matching from scratch
        train = {"init": "random", "steps": cfg.ot_cfm.steps or cfg.train.steps}
        s = train_stage(stage_config(cfg, f"{cfg.name}-ot-cfm", coupling={"name": "ot"}, train=train),
                        out, "OT-CFM", progress)
        stages.append(("ot-cfm", s.checkpoint, _cost(s.checkpoint, s, 0, 0)))
    if "reflow" in methods:
        chain = reflow_stage_configs(cfg, out, 2, "distill" in methods)
        prev, cost = teacher, base
        for i, (label, stage_cfg, pairs) in enumerate(chain):
            generate_pairs(prev, pairs, rc.num_pairs, solver=rc.solver, nfe=rc.nfe, atol=rc.atol, rtol=rc.rtol,
                           shard_size=rc.shard_size, seed=rc.seed + i, progress=progress, guidance=cfg.eval.guidance)
            m = read_manifest(pairs)
            s = train_stage(stage_cfg, out, label, progress)
            cost = _cost(s.checkpoint, s, cost["steps"], cost["wall_s"], cost["teacher_evals"]
                         + m["count"] * m["nfe_per_sample"])
            stages.append(("reflow" if i == 0 else "distill", s.checkpoint, cost))
            prev = s.checkpoint
        if "apt" in methods:
            label = chain[-1][0]
            s = train_stage(apt_stage_config(cfg, prev, teacher, chain[-1][2], chain[0][2]), out, f"{label}+APT",
                            progress)
            stages.append(("apt", selected_checkpoint(s.checkpoint),
                           _cost(s.checkpoint, s, cost["steps"], cost["wall_s"], cost["teacher_evals"])))
    for method in CONSISTENCY_METHODS:
        if method not in methods:
            continue
        s = train_stage(_consistency_stage(cfg, method, teacher if method != "ct" else "random"), out,
                        method.upper(), progress)
        if method == "ct":  # no teacher: its own cost only
            stages.append(("ct", s.checkpoint, _cost(s.checkpoint, s, 0, 0)))
            continue
        cost = _cost(s.checkpoint, s, base["steps"], base["wall_s"])  # with its own teacher evaluations
        ckpt = s.checkpoint if method == "cd" else _merged(teacher, s.checkpoint, os.path.join(out, method.upper()))
        stages.append((method, ckpt, cost))
    for method in ANYSTEP_METHODS:
        if method not in methods:
            continue
        # from the start flow's weights on real data: its own steps on top of that flow's cost, and that flow's
        # evaluations where its flow rows regress its velocity (<method>.velocity: teacher)
        if getattr(cfg, method).start == "2-RF":
            init, start = next((c, cost) for m, c, cost in stages if m == "reflow")
            label = f"2-RF+{method.capitalize()}"
        else:
            init, start, label = teacher, base, method.capitalize()
        s = train_stage(anystep_stage(cfg, method, init), out, label, progress)
        stages.append((method, s.checkpoint, _cost(s.checkpoint, s, start["steps"], start["wall_s"],
                                                   start["teacher_evals"])))
    if not bench:
        return []
    rows = _bench(cfg, stages, progress)
    cols = stage_columns(rows)
    lead = ["method", *cols]
    rows = [{c: r.get(c) for c in lead} | {k: v for k, v in r.items() if k not in lead} for r in rows]
    write_bench(rows, out, plot=False, name="few_step", columns=lead + ["steps", "wall_s", "teacher_evals", "params"])
    summary = few_step_summary(rows)
    if is_image_task(cfg.data):
        memo = few_step_memorisation(cfg, stages)
        atomic_write_text(os.path.join(out, "few_step_memorisation.json"), json.dumps(memo, indent=1))
        summary += "\n" + memorisation_summary(memo)
    atomic_write_text(os.path.join(out, "few_step_summary.md"), summary)
    atomic_write_text(os.path.join(out, "few_step_costs.json"),
                      json.dumps({m: c for m, _, c in stages}, indent=1))
    write_few_step_pareto(rows, out, title=cfg.name)
    return rows


def write_few_step_index(out: str) -> str:
    """``OUT/few_step.md``: every task's ``OUT/<name>/few_step_summary.md`` under ``out``, by name, each
    under its name's heading (tasks written by separate runs, e.g. ``make few-step``'s parallel ones,
    gathered in one file). Returns its path."""
    parts = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name, "few_step_summary.md")
        if os.path.isfile(path):
            with open(path) as f:
                parts.append(f"## {name}\n\n" + f.read())
    dest = os.path.join(out, "few_step.md")
    atomic_write_text(dest, "\n".join(parts))
    return dest


def write_few_step_pareto(rows: Sequence[dict], out: str, *, title: Optional[str] = None) -> dict:
    """``OUT/few_step_best.json`` (:func:`few_step_best`: per method and NFE its best row, with the costs) and
    the Pareto plots of those points: ``few_step_pareto_nfe.png`` (quality against NFE, a line per method)
    and ``few_step_pareto_cost.png`` (quality against training wall seconds). Returns the paths."""
    from flowmatch.viz import plot_method_quality_vs_cost, plot_method_quality_vs_nfe

    metric = row_metric(rows)
    floor = f"{metric}_floor"
    floors = {r["method"]: r.get(floor) for r in rows}
    best = [p | {floor: floors.get(p["method"])} for p in few_step_best(rows)]
    paths = {"best": os.path.join(out, "few_step_best.json"), "nfe": os.path.join(out, "few_step_pareto_nfe.png"),
             "cost": os.path.join(out, "few_step_pareto_cost.png")}
    atomic_write_text(paths["best"], json.dumps(best, indent=1))
    plot_method_quality_vs_nfe(best, paths["nfe"], metric=metric, title=title)
    plot_method_quality_vs_cost(best, paths["cost"], metric=metric, cost="wall_s", title=title)
    return paths


def _consistency_stage(cfg: ExperimentConfig, method: str, init: str, name: Optional[str] = None):
    """The training config of ``cd``, ``ct`` or ``cd-lora`` from ``init`` (the consistency section's
    steps, lr and distance; one-step evaluation)."""
    cc = cfg.consistency
    lora = {"rank": cfg.lora.rank or LORA_RANK} if method == "cd-lora" else {"rank": 0}
    return stage_config(cfg, name or f"{cfg.name}-{method}",
                        train={"objective": "ct" if method == "ct" else "cd", "steps": cc.steps, "lr": cc.lr,
                               "loss": cc.loss, "init": init},
                        lora=lora, eval={"solver": "euler", "nfe": 1})


def anystep_stage(cfg: ExperimentConfig, method: str, init: str, name: Optional[str] = None):
    """The training config of ``shortcut`` or ``meanflow`` from ``init`` (a plain flow checkpoint, 1-RF or
    2-RF, initialises the step-input model, its step projection at zero): the section's ``steps`` and
    ``lr``, ``model.step_input: true``, evaluated by one jump of the ``anystep`` solver."""
    sec = getattr(cfg, method)
    return stage_config(cfg, name or f"{cfg.name}-{method}",
                        train={"objective": method, "steps": sec.steps, "lr": sec.lr, "init": init},
                        model={"step_input": True}, eval={"solver": "anystep", "nfe": 1})


def _merged(base: str, run_ckpt: str, run_dir: str, config: Optional[dict] = None, name: str = "merged.pt") -> str:
    """The base with a LoRA run's adapter merged at weight 1 (``run_dir/name``), for the bench."""
    from flowmatch.distill.adapters import AdapterSpec, merge_adapters

    adapter = os.path.join(os.path.dirname(run_ckpt), "adapter.pt")
    return merge_adapters(base, [AdapterSpec(adapter, 1.0)], os.path.join(run_dir, name), config=config)


def _cost(ckpt: str, s: Optional[TrainSummary], steps: int, wall: float, teacher_evals: float = 0) -> dict:
    """The cumulative cost of the model in ``ckpt``: its own run's optimiser steps (every player's: an APT
    step updates the discriminator ``apt.d_steps`` times, ``apt.d_warmup`` more in the first step, with
    distribution matching the fake flow ``apt.fake_steps`` times, and the generator once), seconds and the
    teacher evaluations its objective counted (``teacher_evals`` in its state: CD's teacher steps, the
    any-step models' teacher velocities, APT's DMD teacher) added to ``steps``, ``wall`` and
    ``teacher_evals``; ``params`` the trainable parameters of the model (a LoRA run's: the adapter's;
    APT's generator, not its discriminator)."""
    state = load_checkpoint(ckpt)
    run_steps = int(state["step"]) if s is not None else 0
    if s is not None:
        teacher_evals += ((state.get("objective") or {}).get("state") or {}).get("teacher_evals", 0)
    own_steps = run_steps * (1 + len(state.get("players") or {}))
    if state["config"]["train"]["objective"] == "apt":  # the discriminator may update more than once a step
        from flowmatch.distill.adversarial import discriminator_updates, fake_updates

        apt = state["config"]["apt"]
        own_steps = run_steps + discriminator_updates(apt, run_steps) + fake_updates(apt, run_steps)
    own_wall = (run_steps / s.steps_per_sec) if s is not None and s.steps_per_sec > 0 else 0.0
    floats = {k: v for k, v in state["model"].items() if v.is_floating_point()}
    lora = {k: v for k, v in floats.items() if "lora_" in k}
    params = sum(v.numel() for v in (lora or floats).values())
    return {"steps": steps + own_steps, "wall_s": round(wall + own_wall, 1), "teacher_evals": int(teacher_evals),
            "params": params}


def _bench(cfg: ExperimentConfig, stages: list, progress: bool) -> list[dict]:
    rc = cfg.reflow
    kw = dict(n=rc.bench_n, atol=cfg.eval.atol, rtol=cfg.eval.rtol, tracking="disabled", progress=progress,
              plot=False)
    flows = [(m, c) for m, c, _ in stages if m not in ANYSTEP_METHODS and m not in CONSISTENCY_METHODS]
    rows = bench_from_checkpoints([c for _, c in flows], None, solvers=rc.bench_solvers, nfes=rc.bench_nfes,
                                  names=[m for m, _ in flows], **kw)
    # a consistency model's velocity form at one Euler step (its one-step sample) and the adaptive solve; its
    # other budgets are its own sampler's (below), so its Euler rows at NFE > 1 would go unused
    consistency = [(m, c) for m, c, _ in stages if m in CONSISTENCY_METHODS]
    if consistency:
        rows += bench_from_checkpoints([c for _, c in consistency], None, solvers=rc.bench_solvers, nfes=[1],
                                       names=[m for m, _ in consistency], **kw)
    first = {r["model"]: r for r in rows}
    # the teacher at its best solver: the other fixed-step solvers at the table's NFEs (straightness: the first bench's)
    # (the bench's own solvers too where it skipped one of those NFEs; a row it has is not run twice)
    covered = set(TABLE_NFES) <= set(rc.bench_nfes)
    more_solvers = [s for s in TEACHER_SOLVERS if s not in rc.bench_solvers or not covered]
    if more_solvers:
        more = bench_from_checkpoints([stages[0][1]], None, solvers=more_solvers, nfes=list(TABLE_NFES),
                                      names=["1-RF"], straightness_draws=1, **kw)
        have = {(r["solver"], r["nfe"]) for r in rows if r["model"] == "1-RF"}
        rows += [r | {k: first["1-RF"][k] for k in ("straightness", "straightness_rel") if k in r} for r in more
                 if (r["solver"], r["nfe"]) not in have]
    # where the teacher has several fixed-step solvers, its best at each NFE is chosen on a validation draw
    # (source draws of its own seed, VALIDATION_N of them), never on the scored one: each of those rows
    # carries that draw's score
    fixed = list(dict.fromkeys(r["solver"] for r in rows
                               if r["model"] == "1-RF" and r["grid"] != "adaptive" and r["nfe"] in TABLE_NFES))
    if len(fixed) > 1:
        metric = row_metric(rows)
        val = bench_from_checkpoints([stages[0][1]], None, solvers=fixed, nfes=list(TABLE_NFES), names=["1-RF"],
                                     straightness_draws=1, **(kw | {"n": min(rc.bench_n, VALIDATION_N)}),
                                     seed=_VALIDATION_SEED)
        score = {(r["solver"], r["nfe"]): r[metric] for r in val}
        for r in rows:
            if r["model"] == "1-RF" and (r["solver"], r["nfe"]) in score:
                r[f"validation_{metric}"] = score[(r["solver"], r["nfe"])]
    # the any-step models: their jumps (the anystep solver) at the table's NFEs; the straightness of their
    # h = 0 field (the flow they hold beside their jumps). A shortcut model only at powers of two up to base_steps.
    anystep = [(m, c) for m, c, _ in stages if m in ANYSTEP_METHODS]
    if anystep:
        nfes = [k for k in TABLE_NFES if "shortcut" not in dict(anystep) or k <= cfg.shortcut.base_steps]
        rows += bench_from_checkpoints([c for _, c in anystep], None, solvers=["anystep"], nfes=nfes,
                                       names=[m for m, _ in anystep], **kw)
    if consistency:
        nfes = [k for k in (2, 4, 8) if k in rc.bench_nfes or k == 2]
        # the field's straightness is the first bench's: measured on one draw here, then taken from there
        more = bench_from_checkpoints([c for _, c in consistency], None, solvers=["consistency"], nfes=nfes,
                                      names=[m for m, _ in consistency], straightness_draws=1, **kw)
        rows += [r | {k: first[r["model"]][k] for k in ("straightness", "straightness_rel") if k in r} for r in more]
        from flowmatch.evaluation import make_scorer

        scorer = make_scorer(cfg, rc.bench_n, seed=0)  # the bench's seed-0 scorer, built once for every t1 row
        for m, c in consistency:
            t1, val = best_t1(c, cfg, progress=progress)
            # scored like the uniform two-step row (same source draws and reference, seed 0), at t1
            uniform = next(r for r in rows if r["model"] == m and r["solver"] == "consistency" and r["nfe"] == 2)
            (scores,) = _two_step_scores(c, cfg, [t1], seed=0, scorer=scorer)
            rows.append(uniform | scores | {"grid": f"t1={t1}", "t1": t1, "t1_validation": val})
    costs = {m: cost for m, _, cost in stages}
    for r in rows:
        r["method"] = r.pop("model")
        r["stage"] = r["method"]
        r["task"] = cfg.name
        r.update(costs[r["method"]])
    return rows


def _two_step_samples(ckpt: str, cfg: ExperimentConfig, t1s: Sequence[float], *, seed: int, n: int, scorer=None):
    """``(scorer, samples)``: the bench scorer of ``seed`` for ``n`` samples (source draws from ``seed``,
    reference from ``seed + 1``; ``scorer`` when given, which must be that one) and, per ``t1`` of
    ``t1s``, the ``n`` samples of two-step consistency sampling re-noised at ``t1``."""
    import torch

    from flowmatch.data.task import build_source
    from flowmatch.evaluation import make_scorer
    from flowmatch.solvers import get_solver
    from flowmatch.training import load_model
    from flowmatch.utils import make_generator

    model = load_model(ckpt).model
    scorer = scorer if scorer is not None else make_scorer(cfg, n, seed=seed)
    source = build_source(cfg.data)
    x0 = source.sample(n, generator=make_generator(seed))
    sampler = get_solver("consistency").for_source(source)  # re-noised with draws of the source
    with torch.no_grad():
        xs = [sampler.integrate(model, x0, torch.tensor([0.0, t1, 1.0])).x1 for t1 in t1s]
    return scorer, xs


def _two_step_scores(ckpt: str, cfg: ExperimentConfig, t1s: Sequence[float], *, seed: int,
                     scorer=None) -> list[dict]:
    """The bench scorer's scores (``w2``, ``mmd`` or ``fd``, ``kid``) of two-step consistency sampling
    re-noised at each ``t1`` of ``t1s``, on ``reflow.bench_n`` source draws and the reference of the
    bench's ``seed`` (the bench draws its source from ``seed`` and its reference from ``seed + 1``)."""
    scorer, xs = _two_step_samples(ckpt, cfg, t1s, seed=seed, n=cfg.reflow.bench_n, scorer=scorer)
    return [{k: float(v) for k, v in scorer(x1).items()} for x1 in xs]


def best_t1(ckpt: str, cfg: ExperimentConfig, *, candidates: Sequence[float] = T1_CANDIDATES,
            progress: bool = False) -> tuple[float, float]:
    """The re-noising time ``t1`` of two-step consistency sampling with the best W2 (toy) or FD
    (images) on a validation draw (source and reference from seed :data:`_VALIDATION_SEED`, never the
    bench's) of ``min(reflow.bench_n, VALIDATION_N)`` samples, among ``candidates``; returns ``(t1, its
    validation score)``. Only that metric is computed (no MMD / KID)."""
    n = min(cfg.reflow.bench_n, VALIDATION_N)
    scorer, xs = _two_step_samples(ckpt, cfg, list(candidates), seed=_VALIDATION_SEED, n=n)
    scores = [scorer.primary(x1) for x1 in xs]
    i = min(range(len(scores)), key=lambda k: scores[k])
    return candidates[i], scores[i]


def few_step_memorisation(cfg: ExperimentConfig, stages: Sequence[tuple]) -> dict:
    """The memorisation check (:func:`flowmatch.evaluation.image_memorisation`) of each method's
    samples on ``reflow.bench_n`` source draws of the bench's seed (0): the teacher (``1-RF``) by
    dopri5 at ``eval.atol/rtol`` (the score it is compared with), every other method in one step (a
    consistency model's one step is the Euler step of its x1-prediction form), with the same samples'
    improved precision and recall against the training images (:func:`flowmatch.evaluation.
    precision_recall_checker`: which part of the FD is samples off the data, which data the samples miss).
    Returns ``{method: {"sampler", "pixels": summary, "features": summary, "precision", "recall"}}``
    (:meth:`MemorisationResult.summary`)."""
    import torch

    from flowmatch.data.task import build_source
    from flowmatch.evaluation import memorisation_checker, precision_recall_checker, sampling_field
    from flowmatch.solvers import solve
    from flowmatch.training import load_model
    from flowmatch.utils import make_generator

    n = cfg.reflow.bench_n
    x0 = build_source(cfg.data).sample(n, generator=make_generator(0))
    out, check, coverage = {}, memorisation_checker(cfg), precision_recall_checker(cfg)
    for method, ckpt, _ in stages:
        field = sampling_field(load_model(ckpt).model, n, cfg.eval.guidance)
        with torch.no_grad():
            if method == "1-RF":
                label, x1 = "dopri5", solve(field, x0, "dopri5", atol=cfg.eval.atol, rtol=cfg.eval.rtol).x1
            elif method in ANYSTEP_METHODS:  # its one jump, not an Euler step of its h = 0 field
                label, x1 = "anystep nfe 1", solve(field, x0, "anystep", nfe=1).x1
            else:
                label, x1 = "euler nfe 1", solve(field, x0, "euler", nfe=1).x1
        checks, pr = check(x1), coverage(x1)
        out[method] = {"sampler": label, **{space: r.summary() for space, r in checks.items()},
                       "precision": pr.precision, "recall": pr.recall}
    return out


def memorisation_summary(memo: dict) -> str:
    """Markdown: per method, the copies fraction (samples closer to a training image than the held-out
    images' 5% quantile; 0.05 expected of new images), the median distance ratio and the verdict, in
    pixels and in classifier features, then precision and recall against the training images (``-``
    where an older file has none)."""
    lines = ["Memorisation check (each sample's nearest training image against the held-out test images'; "
             "copies = fraction closer than the held-out 5% quantile, 0.05 expected), and precision and recall "
             "against the training images (classifier features, k = 3):", "",
             "| method | sampler | copies (pixels) | median ratio (pixels) | copies (features) | "
             "median ratio (features) | memorises | precision | recall |", "|---|---|---|---|---|---|---|---|---|"]
    for method, m in memo.items():
        px, ft = m["pixels"], m["features"]
        verdicts = (px["memorises"], ft["memorises"])
        verdict = "n/a (non-finite)" if None in verdicts else ("yes" if any(verdicts) else "no")
        pr = " | ".join(f"{m[k]:.3f}" if k in m else "-" for k in ("precision", "recall"))
        lines.append(f"| {method} | {m['sampler']} | {px['copies_fraction']:.3f} | {px['median_ratio']:.3f} | "
                     f"{ft['copies_fraction']:.3f} | {ft['median_ratio']:.3f} | {verdict} | {pr} |")
    return "\n".join(lines) + "\n"


def few_step_summary(rows: Sequence[dict], nfes: Sequence[int] = TABLE_NFES) -> str:
    """Markdown, one line a method: the metric (W2 toy, FD images) at each NFE of ``nfes`` with the
    solver that reaches it (:func:`_best_row`: the teacher's solver at each budget and a consistency
    model's re-noising time chosen on validation draws), the adaptive solve, the straightness of its field (an any-step model's: of its
    ``h = 0`` field; a consistency model's: of its velocity form), the floor and the cost columns."""
    metric = row_metric(rows)
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        line = {"method": method}
        for k in nfes:
            b = _best_row(rs, k, metric)
            extra = f", t1 {b['t1']}" if b is not None and b.get("t1") is not None else ""
            line[f"{metric} NFE {k}"] = "-" if b is None else f"{b[metric]:.3f} ({b['solver']}{extra})"
        ad = [r for r in rs if r["solver"] == "dopri5"]
        first = rs[0]
        st = first.get("straightness")
        line |= {f"dopri5 {metric} (NFE)": f"{ad[0][metric]:.3f} ({ad[0]['nfe']})" if ad else "-",
                 "straightness": "-" if st is None else f"{st:.4f}",
                 "floor": f"{first[f'{metric}_floor']:.3f}", "steps": first["steps"], "wall_s": first["wall_s"],
                 "teacher_evals": first["teacher_evals"], "params": first["params"]}
        out.append(line)
    return rows_to_markdown(out)


def _best_row(rows: Sequence[dict], nfe: int, metric: str) -> Optional[dict]:
    """The table's row of ``rows`` (one method's) at exactly ``nfe`` fixed-step evaluations (no adaptive
    row, a finite ``metric``), or ``None``. Nothing is chosen on the scored draw: where rows carry a
    ``validation_<metric>`` (the teacher's solvers) the lowest validation score wins; a consistency model
    is sampled by its own sampler, at NFE 2 re-noised at the ``t1`` its validation draw chose; any other
    method has one sampler a budget (Euler for a flow, the jumps of an any-step model)."""
    c = [r for r in rows if r["nfe"] == nfe and r["solver"] != "dopri5" and r["grid"] != "adaptive"
         and r.get(metric) == r.get(metric)]
    if not c:
        return None
    key = f"validation_{metric}"
    if any(key in r for r in c):
        return min((r for r in c if key in r), key=lambda r: r[key])
    own = [r for r in c if r["solver"] == "consistency"]
    if own:
        return ([r for r in own if r.get("t1") is not None] or own)[0]
    return min(c, key=lambda r: r[metric])


def few_step_best(rows: Sequence[dict], nfes: Sequence[int] = TABLE_NFES) -> list[dict]:
    """Per method and NFE of ``nfes``: ``{method, nfe, solver, <metric>, steps, wall_s, teacher_evals,
    params}`` of its best row (:func:`few_step_summary`'s cells, as data: the Pareto plots' points)."""
    metric = row_metric(rows)
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        for k in nfes:
            b = _best_row(rs, k, metric)
            if b is not None:
                out.append({"method": method, "nfe": k, "solver": b["solver"], metric: b[metric],
                            **{c: b[c] for c in ("steps", "wall_s", "teacher_evals", "params")}})
    return out


def composition_from_config(cfg: ExperimentConfig, out: str, *, style_target: str = "upper_moon",
                            nfes: Sequence[int] = (1, 2, 4), progress: bool = True) -> list[dict]:
    """The LCM-LoRA composition claim on a toy task (see the module docstring). Trains under ``OUT``:
    the 1-RF teacher (``1-RF``, reused from the few-step table when it is there), a style LoRA on it
    (``style-LoRA``: flow matching onto ``style_target`` for ``consistency.steps`` steps at ``train.lr``, rank
    ``lora.rank`` or :data:`LORA_RANK`), an acceleration LoRA on the base (``CD-LORA``: as the few-step
    table's ``cd-lora``) and one on the style model (``CD-LORA-style``); then scores on the style's target,
    at Euler NFE ``nfes`` and consistency sampling at NFE 2 and 4: ``style+accel`` (the two adapters
    composed at weight 1), ``style+own accel`` (the dedicated acceleration) and ``style`` (Euler).
    Writes ``OUT/composition.json`` / ``.md``."""
    from flowmatch.config import to_dict
    from flowmatch.distill.adapters import AdapterSpec, merge_adapters

    rc = cfg.reflow
    teacher = rc.teacher or train_stage(stage_config(cfg, f"{cfg.name}-1RF"), out, "1-RF", progress).checkpoint
    rank = cfg.lora.rank or LORA_RANK
    style_cfg = stage_config(cfg, f"{cfg.name}-style-lora", data={"target": style_target},
                             train={"init": teacher, "steps": cfg.consistency.steps}, lora={"rank": rank})
    style = train_stage(style_cfg, out, "style-LoRA", progress).checkpoint
    style_adapter = os.path.join(os.path.dirname(style), "adapter.pt")
    accel = train_stage(_consistency_stage(cfg, "cd-lora", teacher), out, "CD-LORA", progress).checkpoint
    accel_adapter = os.path.join(os.path.dirname(accel), "adapter.pt")
    style_task = to_dict(stage_config(cfg, f"{cfg.name}-style", data={"target": style_target}))
    style_model = merge_adapters(teacher, [AdapterSpec(style_adapter)], os.path.join(out, "style.pt"), config=style_task)
    composed = merge_adapters(teacher, [AdapterSpec(style_adapter), AdapterSpec(accel_adapter)],
                              os.path.join(out, "style+accel.pt"), config=style_task)
    own_cfg = stage_config(_consistency_stage(cfg, "cd-lora", style_model, f"{cfg.name}-cd-lora-style"),
                           f"{cfg.name}-cd-lora-style", data={"target": style_target})
    own = train_stage(own_cfg, out, "CD-LORA-style", progress).checkpoint
    own_model = _merged(style_model, own, out, config=style_task, name="style+own accel.pt")
    models = [("style+accel", composed), ("style+own accel", own_model), ("style", style_model)]
    kw = dict(n=rc.bench_n, atol=cfg.eval.atol, rtol=cfg.eval.rtol, tracking="disabled", progress=progress, plot=False)
    rows = bench_from_checkpoints([c for _, c in models], None, solvers=["euler"], nfes=list(nfes),
                                  names=[m for m, _ in models], **kw)
    rows += bench_from_checkpoints([c for _, c in models[:2]], None, solvers=["consistency"],
                                   nfes=[k for k in nfes if k > 1], names=[m for m, _ in models[:2]], **kw)
    for r in rows:
        r["task"] = f"{cfg.data.source}->{style_target}"
    cols = ["model", "solver", "nfe", "w2", "w2_floor", "mmd"]
    write_bench(rows, out, plot=False, name="composition", columns=cols)
    return rows
