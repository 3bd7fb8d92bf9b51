"""The reflow chain: 1-RF, then per round a pair store from the current teacher and the next k-RF
trained on it, then optionally one-step distillation; every stage benchmarked alike.

- :func:`stage_config` / :func:`train_stage`: a stage's config (the experiment's with some sections
  replaced) and its training into ``OUT/<label>`` (resumed or reused; a stage on disk made with another
  config is refused, naming what to remove); the few-step table (:mod:`flowmatch.few_step`) uses them too.
- :func:`reflow_stage_configs`: the training config of each stage after 1-RF; :func:`apt_stage_config`
  the adversarial post-training of the distilled model (``reflow.apt``).
- :func:`reflow_from_config`: the chain end to end (resumable stage by stage), its stage table and plots.
- :func:`stage_sample_grids`: per stage, image samples at a few NFE from the same noise.
- :func:`reflow_sweep`: one round per value of a config key, from one teacher.

Pair generation itself is :func:`flowmatch.reflow.generate_pairs`; the tables are built by
:mod:`flowmatch.reports`.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

from flowmatch.bench import rows_to_markdown, write_bench
from flowmatch.config import ExperimentConfig, apply_overrides, from_dict, to_dict
from flowmatch.data.pairs import read_manifest
from flowmatch.data.task import build_source, build_task, is_image_task
from flowmatch.errors import ConfigMismatchError, FlowmatchError
from flowmatch.evaluation import sampling_field
from flowmatch.io import remove_temporaries
from flowmatch.pipelines import TrainSummary, bench_from_checkpoints, train_from_config
from flowmatch.reflow import generate_pairs
from flowmatch.reports import reflow_targets, stage_columns
from flowmatch.solvers import solve
from flowmatch.io import atomic_write_text
from flowmatch.training import Tracker, load_model
from flowmatch.training.plan import resolve_precision
from flowmatch.utils import make_generator, resolve_device

# target-draw pairs behind the W2 plot's noise-floor band (the first is the stage table's floor)
FLOOR_DRAWS = 4

__all__ = ["FLOOR_DRAWS", "stage_config", "train_stage", "reflow_stage_configs", "apt_stage_config",
           "selected_checkpoint", "reflow_from_config", "stage_sample_grids", "reflow_sweep"]


def stage_config(cfg: ExperimentConfig, name: str, **sections) -> ExperimentConfig:
    """``cfg`` with ``name`` and the given sections' keys replaced (``coupling={...}`` etc.)."""
    d = to_dict(cfg)
    d["name"] = name
    for section, values in sections.items():
        d[section] = {**d[section], **values}
    return from_dict(d)


def reflow_stage_configs(cfg: ExperimentConfig, out: str, rounds: int, distill: bool) -> list[tuple[str, ExperimentConfig, str]]:
    """The chain's training stages after 1-RF: ``(label, config, pairs_dir)`` for 2-RF..K-RF and the
    optional distillation (``train.objective: distill`` with the ``distill`` section's steps, lr and
    loss). Stage k trains on the pairs of stage k - 1, initialised from it; with
    ``reflow.mix < 1`` its real-data term uses ``reflow.real`` (default: the experiment's own coupling)."""
    rc = cfg.reflow
    # a class-conditional teacher's pairs are made with guidance eval.guidance already: its students
    # learn the guided field and are sampled with plain conditioning (guidance 1)
    student_eval = {"guidance": 1.0} if cfg.model.class_cond else {}
    stages = []
    for k in range(2, rounds + 1):
        pairs = os.path.join(out, f"pairs-{k - 1}RF")
        stages.append((f"{k}-RF", stage_config(
            cfg, f"{cfg.name}-{k}RF", coupling={"name": "paired", "pairs": pairs, "mix": rc.mix,
                                                 "real": rc.real or cfg.coupling.name},
            time=to_dict(rc.time), train={"steps": rc.steps, "lr": rc.lr, "loss": rc.loss, "init": "auto"},
            eval=student_eval), pairs))
    if distill:
        pairs = os.path.join(out, f"pairs-{rounds}RF")
        dc = cfg.distill
        stages.append((f"{rounds}-RF+distill", stage_config(
            cfg, f"{cfg.name}-{rounds}RF-distill", coupling={"name": "paired", "pairs": pairs, "mix": 1.0},
            train={"objective": "distill", "steps": dc.steps, "lr": dc.lr, "loss": dc.loss, "init": "auto"},
            eval={"solver": "euler", "nfe": 1, **student_eval}), pairs))
    return stages


def apt_stage_config(cfg: ExperimentConfig, generator: str, teacher: str, pairs: Optional[str] = None,
                     teacher_pairs: Optional[str] = None) -> ExperimentConfig:
    """The training config of adversarial post-training (``train.objective: apt``) of the one-step
    ``generator`` checkpoint, its discriminator from ``teacher`` (the chain's 1-RF): the ``apt``
    section's steps, APT's constant learning rates without warm-up or clipping, a real-data draw per
    update (the ``independent`` coupling; with ``apt.regression_weight > 0`` or ``apt.real_from_teacher > 0``
    a pair store feeds the regression term and the discriminator's teacher rows: ``pairs``, the last round's,
    or with ``apt.regression_pairs=teacher`` ``teacher_pairs``, the teacher's own), one-step evaluation. Image tasks draw their real images from the
    ``fit`` split, so that the ``val`` split that selects the checkpoint stays unseen by the
    discriminator (the teacher itself saw the whole training split)."""
    ac = cfg.apt
    if ac.regression_weight > 0 or ac.real_from_teacher > 0:
        if ac.regression_pairs == "teacher":
            pairs = teacher_pairs
        if pairs is None:
            key = "regression_weight" if ac.regression_weight > 0 else "real_from_teacher"
            raise FlowmatchError(f"apt.{key} = {getattr(ac, key)} reads a pair store (apt.regression_pairs="
                                 f"{ac.regression_pairs}): this APT stage has none (set apt.{key}=0)")
        coupling = {"name": "paired", "pairs": pairs, "mix": 1.0}
    else:
        coupling = {"name": "independent", "pairs": None, "mix": 1.0}
    data = {"split": "fit"} if is_image_task(cfg.data) else {}
    student_eval = {"guidance": 1.0} if cfg.model.class_cond else {}
    return stage_config(cfg, f"{cfg.name}-apt", coupling=coupling, data=data,
                        train={"objective": "apt", "init": generator, "steps": ac.steps, "grad_clip": 0.0,
                               "warmup_steps": 0, "lr_schedule": "constant"},
                        apt={"discriminator_init": teacher}, eval={"solver": "euler", "nfe": 1, **student_eval})


def selected_checkpoint(ckpt: str) -> str:
    """The checkpoint a stage is scored by: ``best.pt`` beside ``ckpt`` where the run selected one on
    its validation draw (APT), else ``ckpt``."""
    best = os.path.join(os.path.dirname(ckpt), "best.pt")
    return best if os.path.isfile(best) else ckpt


def reflow_from_config(cfg: ExperimentConfig, out: str, *, rounds: Optional[int] = None,
                       distill: Optional[bool] = None, apt: Optional[bool] = None,
                       progress: bool = True) -> list[dict]:
    """The reflow chain: 1-RF (trained from ``cfg``, or ``cfg.reflow.teacher``), then for each round
    pairs from the current teacher and the next k-RF trained on them, then (``distill``) one-step
    distillation of the last round's pairs, then (``apt``, needs ``distill``) adversarial post-training
    of that one-step model against real data (stage ``K-RF+distill+APT``, scored by the checkpoint its
    validation draw selected). Every stage is benchmarked with the same bench.

    Writes ``OUT/stages.json`` (rows with ``task, stage, solver, nfe, w2, w2_floor, mmd,
    straightness``, ...; ``fd, fd_floor, kid`` in place of ``w2, w2_floor, mmd`` for images), ``stages.csv``, ``stages.md`` and plots under ``OUT/plots``. Stages
    already on disk are reused, so a killed chain resumes at the stage it reached.
    """
    from flowmatch.viz import plot_straightness_by_stage, plot_trajectory_grid, plot_w2_vs_nfe

    for d in (out, os.path.join(out, "plots")):  # a killed chain's own temporaries (the stage tables, plots)
        remove_temporaries(d)
    rc = cfg.reflow
    # bf16 for image teachers on a GPU (where it doubles the throughput), decided as train.precision is
    precision = resolve_precision(rc.precision, resolve_device("auto"), images=is_image_task(cfg.data),
                                  key="reflow.precision")
    rounds = rc.rounds if rounds is None else rounds
    distill = rc.distill if distill is None else distill
    apt = rc.apt if apt is None else apt
    if rounds < 1:
        raise FlowmatchError(f"reflow needs rounds >= 1, got {rounds}")
    if apt and not distill:
        raise FlowmatchError("the chain's APT stage post-trains the distilled one-step model: add --distill "
                             "(reflow.distill: true)")
    if rc.teacher:
        teacher = load_model(rc.teacher)
        if (teacher.config.data.source, teacher.config.data.target) != (cfg.data.source, cfg.data.target):
            raise FlowmatchError(f"reflow.teacher {rc.teacher} maps {teacher.config.data.source} -> "
                                 f"{teacher.config.data.target}, not {cfg.data.source} -> {cfg.data.target}")
        stages = [("1-RF", rc.teacher)]
    else:
        s1 = train_stage(stage_config(cfg, f"{cfg.name}-1RF"), out, "1-RF", progress)
        stages = [("1-RF", s1.checkpoint)]
    for i, (label, stage_cfg, pairs) in enumerate(reflow_stage_configs(cfg, out, rounds, distill)):
        generate_pairs(stages[-1][1], pairs, rc.num_pairs, solver=rc.solver, nfe=rc.nfe, atol=rc.atol, rtol=rc.rtol,
                       shard_size=rc.shard_size, seed=rc.seed + i, progress=progress, guidance=cfg.eval.guidance,
                       precision=precision)
        s = train_stage(stage_cfg, out, label, progress)
        stages.append((label, s.checkpoint))
    if apt:
        label, generator = stages[-1]
        s = train_stage(apt_stage_config(cfg, generator, stages[0][1], os.path.join(out, f"pairs-{rounds}RF"),
                                         os.path.join(out, "pairs-1RF")), out, f"{label}+APT", progress)
        stages.append((f"{label}+APT", selected_checkpoint(s.checkpoint)))
    rows = bench_from_checkpoints([c for _, c in stages], None, solvers=rc.bench_solvers, nfes=rc.bench_nfes,
                                  n=rc.bench_n, atol=cfg.eval.atol, rtol=cfg.eval.rtol, names=[lbl for lbl, _ in stages], tracking="disabled",
                                  progress=progress, plot=False)
    for r in rows:
        r["stage"] = r.pop("model")
        r["task"] = cfg.name
    cols = stage_columns(rows)
    rows = [{c: r[c] for c in cols} | {k: v for k, v in r.items() if k not in cols} for r in rows]
    write_bench(rows, out, plot=False, name="stages", columns=cols)
    pd = os.path.join(out, "plots")
    metric = "fd" if "fd" in cols else "w2"
    floor = None
    if metric == "w2":  # the floor's sampling spread as a band: FLOOR_DRAWS pairs of target draws (pair 0 the table's)
        from flowmatch.data.task import build_task
        from flowmatch.viz import floor_band
        from flowmatch.viz.docs import floor_draws

        floor = floor_band(floor_draws(build_task(cfg.data).target, rc.bench_n, FLOOR_DRAWS), rc.bench_n)
    plot_w2_vs_nfe([{**r, "model": r["stage"]} for r in rows], os.path.join(pd, f"{metric}_vs_nfe.png"), metric=metric,
                   floor=floor)
    plot_straightness_by_stage(rows, os.path.join(pd, "straightness.png"), title=cfg.name)
    image = is_image_task(cfg.data)
    x0 = build_source(cfg.data).sample(8 if image else 40, generator=make_generator(cfg.eval.seed))
    trajs = {}
    with torch.no_grad():
        for label, ckpt in stages:
            field_ = sampling_field(load_model(ckpt).model, len(x0), cfg.eval.guidance)
            trajs[label] = solve(field_, x0, "rk4", num_steps=16 if image else 32, return_trajectory=True).xs
    if image:
        from flowmatch.viz import plot_image_trajectories

        plot_image_trajectories(trajs, os.path.join(pd, "trajectories.png"), n=8, steps=9,
                                title=f"{cfg.name}: RK4 trajectories per stage")
        stage_sample_grids(stages, cfg, os.path.join(pd, "samples"), nfes=rc.bench_nfes)
    else:
        data = build_task(cfg.data)  # the densities behind the paths, and each stage's S from its rows
        plot_trajectory_grid(trajs, os.path.join(pd, "trajectories.png"),
                             target=data.target.sample(20_000, generator=make_generator(cfg.eval.seed + 1)),
                             source=data.source.sample(20_000, generator=make_generator(cfg.eval.seed + 2)),
                             straightness={r["stage"]: r["straightness"] for r in rows},
                             ncols=2 if len(trajs) == 4 else None,
                             title=f"{cfg.name}: RK4 trajectories from the same source points, per stage")
    if cfg.tracking.mode != "disabled":
        with Tracker(out, mode=cfg.tracking.mode, project=cfg.tracking.project, name=f"reflow {cfg.name}",
                     job_type="reflow") as tr:
            tr.log_table("reflow/stages", rows)
            for p in (f"{metric}_vs_nfe", "straightness", "trajectories"):
                tr.log_image(f"reflow/{p}", os.path.join(pd, f"{p}.png"))
    return rows


def train_stage(cfg: ExperimentConfig, out: str, label: str, progress: bool) -> TrainSummary:
    """Train (or resume, or reuse) the chain's stage ``label`` in ``OUT/label``."""
    try:
        return train_from_config(cfg, os.path.join(out, label), resume="auto", progress=progress)
    except ConfigMismatchError as e:  # a stage on disk trained with another config: say what to remove
        raise ConfigMismatchError(f"reflow chain {out}: stage {label} on disk was trained with another config ({e}). "
                                  f"Remove {os.path.join(out, label)} and every stage and pair store after it to "
                                  f"retrain from there, or give the chain another --out") from None


@torch.no_grad()
def stage_sample_grids(stages: Sequence[tuple], cfg: ExperimentConfig, out_dir: str, *,
                       nfes: Sequence[int] = (1, 2, 4, 8), n: int = 40) -> list[str]:
    """Per stage, one PNG with ``n`` samples from the same noise at Euler NFE ``nfes`` and dopri5
    (``OUT/<stage>.png``); returns the paths."""
    from flowmatch.viz import plot_image_panels

    x0 = build_source(cfg.data).sample(n, generator=make_generator(cfg.eval.seed))
    paths = []
    for label, ckpt in stages:
        field_ = sampling_field(load_model(ckpt).model, n, cfg.eval.guidance)
        panels = {f"Euler NFE {k}": solve(field_, x0, "euler", nfe=k).x1 for k in nfes}
        ad = solve(field_, x0, "dopri5", atol=cfg.eval.atol, rtol=cfg.eval.rtol)
        panels[f"dopri5 (NFE {ad.nfe})"] = ad.x1
        paths.append(plot_image_panels(panels, os.path.join(out_dir, f"{label}.png"), nrow=8, title=label))
    return paths


def reflow_sweep(cfg: ExperimentConfig, out: str, key: str, values: Sequence, *, progress: bool = True) -> list[dict]:
    """One reflow round (1-RF -> pairs -> 2-RF) per value of the config ``key`` (e.g.
    ``reflow.num_pairs``, ``reflow.atol``, ``reflow.mix``), all from the same 1-RF teacher (trained
    once under ``OUT/teacher`` unless ``reflow.teacher`` names one). Writes ``OUT/sweep.json`` and
    ``OUT/sweep.md``: per value, the 2-RF's one-step and dopri5 W2, its straightness, the NFE per pair
    the teacher spent, the teacher's dopri5 W2 and the noise floor."""
    if is_image_task(cfg.data):
        raise FlowmatchError(f"reflow sweep reports W2 on toy tasks; {cfg.name} is an image task "
                             f"(run flowmatch reflow run once per value instead)")
    if cfg.reflow.teacher:
        teacher = cfg.reflow.teacher
    else:
        teacher = train_from_config(stage_config(cfg, f"{cfg.name}-1RF"), os.path.join(out, "teacher"),
                                    resume="auto", progress=progress).checkpoint
    results = []
    for value in values:
        tag = f"{key.split('.')[-1]}={value}"
        vcfg = apply_overrides(cfg, [f"{key}={value}", f"reflow.teacher={teacher}"])
        rows = reflow_from_config(vcfg, os.path.join(out, tag), rounds=2, distill=False, progress=progress)
        t = reflow_targets(rows)[0]
        manifest = read_manifest(os.path.join(out, tag, "pairs-1RF"))
        results.append({"key": key, "value": value, "2-RF Euler-1 W2": t["2-RF Euler-1 W2"],
                        "2-RF dopri5 W2": t["2-RF dopri5 W2"], "S(2-RF)": t["S(2-RF)"],
                        "teacher NFE per pair": manifest["nfe_per_sample"], "1-RF dopri5 W2": t["1-RF dopri5 W2"],
                        "w2_floor": t["w2_floor"], "n": rows[0]["n"]})
    atomic_write_text(os.path.join(out, "sweep.json"), json.dumps(results, indent=1))
    atomic_write_text(os.path.join(out, "sweep.md"), rows_to_markdown(results))
    return results
