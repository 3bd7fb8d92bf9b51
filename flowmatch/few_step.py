"""The few-step table: every method trained from one 1-RF teacher, benchmarked alike, quality beside cost.

:func:`few_step_from_config` trains (or reuses, stage by stage) under ``OUT``:

- ``1-RF``: the teacher (``reflow.teacher``, or the experiment trained as it is);
- ``reflow``: 2-RF on ``reflow.num_pairs`` pairs of the teacher (the reflow chain's round);
- ``distill``: one-step distillation of 2-RF's pairs (needs ``reflow``);
- ``cd``: consistency distillation of the teacher (``train.objective: cd``, initialised from it; the
  ``consistency`` section's steps, lr and distance);
- ``ct``: consistency training from scratch (no teacher; the same steps), the baseline that shows what
  the teacher buys.

Every model is scored by the reflow chain's bench (Euler at ``reflow.bench_nfes`` and dopri5); the
consistency models also by multistep consistency sampling (:class:`~flowmatch.solvers.multistep.ConsistencySampler`)
at NFE 2, 4 and 8 on a uniform grid of re-noising times and at NFE 2 with the re-noising time ``t1``
chosen on a validation draw (its own seed, never the scored one) among :data:`T1_CANDIDATES`.

Cost columns, each *cumulative from the 1-RF teacher* (what it takes to get that model):
``steps`` (optimiser steps), ``wall_s`` (training seconds: steps / the run's steps/s; pair generation
not included), ``teacher_evals`` (velocity evaluations of a teacher per training sample: pairs x
NFE per pair for reflow, CD's teacher steps), ``params`` (trainable parameters of the last stage).
Writes ``OUT/few_step.json`` / ``.csv`` / ``.md`` (the stages.json schema plus ``method`` and the cost
columns) and ``OUT/few_step_summary.md`` (per method: best W2 or FD at NFE 1 and 2, and the cost).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

from flowmatch.bench import rows_to_markdown, write_bench
from flowmatch.config import ExperimentConfig
from flowmatch.data.pairs import read_manifest
from flowmatch.errors import FlowmatchError
from flowmatch.io import atomic_write_text
from flowmatch.pipelines import TrainSummary, bench_from_checkpoints
from flowmatch.reflow import generate_pairs
from flowmatch.reflow_chain import stage_config, train_stage, reflow_stage_configs
from flowmatch.reports import stage_columns
from flowmatch.training import load_checkpoint

__all__ = ["FEW_STEP_METHODS", "T1_CANDIDATES", "few_step_from_config"]

FEW_STEP_METHODS = ("reflow", "distill", "cd", "ct")
T1_CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_VALIDATION_SEED = 10_007  # the validation draw's seed: never the bench's (0)


def few_step_from_config(cfg: ExperimentConfig, out: str, *, methods: Sequence[str] = FEW_STEP_METHODS,
                         progress: bool = True) -> list[dict]:
    """Train every method of ``methods`` from one teacher and write the few-step table (see the
    module docstring); returns its rows."""
    unknown = [m for m in methods if m not in FEW_STEP_METHODS]
    if unknown:
        raise FlowmatchError(f"unknown few-step method {unknown[0]!r}; valid methods: {', '.join(FEW_STEP_METHODS)}")
    if "distill" in methods and "reflow" not in methods:
        raise FlowmatchError("few-step method distill distils 2-RF's pairs: add reflow to --methods")
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
    for method in ("cd", "ct"):
        if method not in methods:
            continue
        init = teacher if method == "cd" else "random"
        stage_cfg = stage_config(cfg, f"{cfg.name}-{method}",
                                  train={"objective": method, "steps": cc.steps, "lr": cc.lr, "loss": cc.loss,
                                         "init": init},
                                  eval={"solver": "euler", "nfe": 1})
        s = train_stage(stage_cfg, out, method.upper(), progress)
        evals = load_checkpoint(s.checkpoint)["objective"]["state"].get("teacher_evals", 0)
        if method == "cd":
            stages.append(("cd", s.checkpoint, _cost(s.checkpoint, s, base["steps"], base["wall_s"], evals)))
        else:  # no teacher: its own cost only
            stages.append(("ct", s.checkpoint, _cost(s.checkpoint, s, 0, 0, 0)))
    rows = _bench(cfg, stages, progress)
    cols = stage_columns(rows)
    lead = ["method", *cols]
    rows = [{c: r.get(c) for c in lead} | {k: v for k, v in r.items() if k not in lead} for r in rows]
    write_bench(rows, out, plot=False, name="few_step", columns=lead + ["steps", "wall_s", "teacher_evals", "params"])
    atomic_write_text(os.path.join(out, "few_step_summary.md"), few_step_summary(rows))
    atomic_write_text(os.path.join(out, "few_step_costs.json"),
                      json.dumps({m: c for m, _, c in stages}, indent=1))
    return rows


def _cost(ckpt: str, s: Optional[TrainSummary], steps: int, wall: float, teacher_evals: float = 0) -> dict:
    """The cumulative cost of the model in ``ckpt``: its own run's steps and seconds added to
    ``steps`` and ``wall``; ``params`` its trainable parameters."""
    state = load_checkpoint(ckpt)
    own_steps = int(state["step"]) if s is not None else 0
    own_wall = (own_steps / s.steps_per_sec) if s is not None and s.steps_per_sec > 0 else 0.0
    params = sum(v.numel() for v in state["model"].values() if v.is_floating_point())
    return {"steps": steps + own_steps, "wall_s": round(wall + own_wall, 1), "teacher_evals": int(teacher_evals),
            "params": params}


def _bench(cfg: ExperimentConfig, stages: list, progress: bool) -> list[dict]:
    rc = cfg.reflow
    kw = dict(n=rc.bench_n, atol=cfg.eval.atol, rtol=cfg.eval.rtol, tracking="disabled", progress=progress,
              plot=False)
    rows = bench_from_checkpoints([c for _, c, _ in stages], None, solvers=rc.bench_solvers, nfes=rc.bench_nfes,
                                  names=[m for m, _, _ in stages], **kw)
    consistency = [(m, c) for m, c, _ in stages if m in ("cd", "ct")]
    if consistency:
        nfes = [k for k in (2, 4, 8) if k in rc.bench_nfes or k == 2]
        rows += bench_from_checkpoints([c for _, c in consistency], None, solvers=["consistency"], nfes=nfes,
                                       names=[m for m, _ in consistency], **kw)
        for m, c in consistency:
            t1, val = best_t1(c, cfg, progress=progress)
            rho = math.log(t1) / math.log(0.5)  # power grid: t1 = 0.5 ** rho at two steps
            r = bench_from_checkpoints([c], None, solvers=["consistency"], nfes=[2], grid=f"power:{rho:.6g}",
                                       names=[m], **kw)[0]
            rows.append(r | {"t1": t1, "t1_validation": val})
    costs = {m: cost for m, _, cost in stages}
    for r in rows:
        r["method"] = r.pop("model")
        r["stage"] = r["method"]
        r["task"] = cfg.name
        r.update(costs[r["method"]])
    return rows


def best_t1(ckpt: str, cfg: ExperimentConfig, *, candidates: Sequence[float] = T1_CANDIDATES,
            progress: bool = False) -> tuple[float, float]:
    """The re-noising time ``t1`` of two-step consistency sampling with the best W2 (toy) or FD
    (images) on a validation draw (seed :data:`_VALIDATION_SEED`, ``reflow.bench_n`` points); returns
    ``(t1, its validation score)``."""
    best = None
    for t1 in candidates:
        rho = math.log(t1) / math.log(0.5)
        r = bench_from_checkpoints([ckpt], None, solvers=["consistency"], nfes=[2], grid=f"power:{rho:.6g}",
                                   n=cfg.reflow.bench_n, seed=_VALIDATION_SEED, tracking="disabled",
                                   progress=progress, plot=False)[0]
        score = r.get("fd", r.get("w2"))
        if best is None or score < best[1]:
            best = (t1, score)
    return best


def few_step_summary(rows: Sequence[dict]) -> str:
    """Markdown: per method, the best metric at NFE 1 and at NFE 2 (with the solver that reaches it), the
    adaptive solve, and the cost columns."""
    metric = "fd" if rows and "fd" in rows[0] else "w2"
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]

        def best(nfe):
            c = [r for r in rs if r["nfe"] == nfe and r["solver"] not in ("dopri5",) and r.get(metric) == r.get(metric)]
            if not c:
                return "-"
            b = min(c, key=lambda r: r[metric])
            extra = f", t1 {b['t1']}" if "t1" in b and b.get("t1") is not None else ""
            return f"{b[metric]:.3f} ({b['solver']}{extra})"

        ad = [r for r in rs if r["solver"] == "dopri5"]
        first = rs[0]
        out.append({"method": method, f"{metric} NFE 1": best(1), f"{metric} NFE 2": best(2),
                    f"dopri5 {metric} (NFE)": f"{ad[0][metric]:.3f} ({ad[0]['nfe']})" if ad else "-",
                    "floor": f"{first[f'{metric}_floor']:.3f}", "steps": first["steps"], "wall_s": first["wall_s"],
                    "teacher_evals": first["teacher_evals"], "params": first["params"]})
    return rows_to_markdown(out)
