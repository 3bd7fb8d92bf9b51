"""Pipelines: config -> runs -> artifacts. The CLI, make targets and notebooks call these.

- :func:`train_from_config`: train, then evaluate the EMA model (W2, MMD, straightness, plots).
- :func:`sample_from_checkpoint`: draw samples with any solver and record the NFE used.
- :func:`bench_checkpoints`: the full solver x grid x NFE bench over checkpoints of one task
  (:func:`bench_from_checkpoints`: its compact one-grid form for the demo and stage tables).
- :func:`run_demo`: the toy experiments end to end, with ``report.md``.
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from flowmatch.bench import (BENCH_NFES, BENCH_SOLVERS, BenchResult, ToyScorer, bench_suite, benchmark,
                             rows_to_markdown, write_bench, write_suite)
from flowmatch.config import (ExperimentConfig, check_int, check_output_path, config_diff, from_dict, load_config,
                              to_dict)
from flowmatch.data.task import build_source, build_task, is_image_task
from flowmatch.data.pairs import read_manifest
from flowmatch.errors import ConfigError, ConfigMismatchError, FlowmatchError
from flowmatch.io import remove_temporaries
from flowmatch.metrics import straightness
from flowmatch.solvers import get_solver, solve
from flowmatch.training import (Tracker, atomic_save, atomic_write_text, build_components, last_checkpoint,
                                load_checkpoint, load_model, read_metrics, train)
from flowmatch.training.loop import holds_run
from flowmatch.utils import make_generator, resolve_device

__all__ = ["TrainSummary", "describe_config", "evaluate_model", "train_from_config", "sample_from_checkpoint",
           "reflow_stage_configs", "reflow_from_config", "reflow_targets", "write_reflow_summary",
           "reflow_sweep",
           "bench_checkpoints", "bench_from_checkpoints", "run_demo", "DEMO_SOLVERS", "DEMO_NFES"]

DEMO_SOLVERS = ("euler", "midpoint", "heun", "rk4", "dopri5")
DEMO_NFES = (1, 2, 4, 8, 16)
STAGE_COLUMNS = ("task", "stage", "solver", "num_steps", "nfe", "w2", "w2_floor", "mmd", "straightness",
                 "straightness_rel", "seconds", "n")
IMAGE_EVAL_BATCH = 2000  # images per solve in the end-of-training evaluation
IMAGE_STAGE_COLUMNS = ("task", "stage", "solver", "num_steps", "nfe", "fd", "fd_floor", "kid", "straightness",
                       "straightness_rel", "seconds", "n")


def stage_columns(rows: Sequence[dict]) -> tuple:
    """The stage table's columns: W2 (toy), FD (images), or both when one table holds both kinds."""
    kinds = {"fd" in r for r in rows}
    if kinds == {True}:
        return IMAGE_STAGE_COLUMNS
    if kinds == {True, False}:
        return STAGE_COLUMNS[:8] + ("fd", "fd_floor", "kid") + STAGE_COLUMNS[8:]
    return STAGE_COLUMNS


@dataclass
class TrainSummary:
    name: str
    run_dir: str
    checkpoint: str
    step: int
    steps_per_sec: float
    eval: dict = field(default_factory=dict)
    skipped: bool = False  # True when a finished run was found and reused

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def describe_config(cfg: ExperimentConfig) -> str:
    """Build everything the config names (validating it) and describe it; writes nothing."""
    comp = build_components(cfg, device="cpu")
    params = sum(p.numel() for p in comp.model.parameters())
    import yaml

    return (yaml.safe_dump(to_dict(cfg), sort_keys=False) +
            f"# model: {params:,} parameters; source={comp.source!r} target={comp.target!r} path={comp.path!r} "
            f"coupling={comp.coupling.name}\n")


@torch.no_grad()
def evaluate_model(model, cfg: ExperimentConfig, out_dir: Optional[str] = None, *,
                   tracker: Optional[Tracker] = None, step: Optional[int] = None) -> dict:
    """Sample ``cfg.eval.n`` points with the EMA ``model`` and score them against fresh target draws.

    Returns ``eval/w2``, ``eval/w2_floor``, ``eval/mmd``, ``eval/nfe``, ``eval/straightness`` (and
    its relative and per-dimension forms); for images ``eval/fd``, ``eval/fd_floor``,
    ``eval/fd_floor_n``, ``eval/kid`` instead of W2 and MMD (see :func:`_evaluate_images`). With ``out_dir``: ``samples.pt`` and, if
    ``cfg.eval.plots``, ``plots/samples.png``, ``plots/trajectories.png``, ``plots/loss_by_t.png``.
    """
    if is_image_task(cfg.data):
        return _evaluate_images(model, cfg, out_dir, tracker=tracker, step=step)
    ec = cfg.eval
    device = next(model.parameters()).device
    task = build_task(cfg.data)
    source, target = task.source, task.target
    x0 = source.sample(ec.n, generator=make_generator(ec.seed)).to(device)
    scorer = ToyScorer(target, ec.n, ec.seed)  # fresh target draws: seeds ec.seed + 1 and + 2
    solver = get_solver(ec.solver, atol=ec.atol, rtol=ec.rtol)
    traj = solve(model, x0, solver, nfe=None if solver.adaptive else ec.nfe, return_trajectory=True)
    x1 = traj.x1.float().cpu()
    st = straightness(model, x0[: min(ec.n, 1000)])
    scores = {**scorer.floor(ec.n), **scorer(x1)}
    res = {"eval/w2": scores["w2"], "eval/w2_floor": scores["w2_floor"], "eval/mmd": scores["mmd"], "eval/nfe": traj.nfe,
           "eval/solver": solver.name, "eval/straightness": st.straightness,
           "eval/straightness_rel": st.straightness_rel, "eval/straightness_per_dim": st.straightness_per_dim}
    if tracker is not None:
        tracker.log({k: v for k, v in res.items() if not isinstance(v, str)}, step or 0)
    if out_dir is not None:
        atomic_save({"samples": x1, "x0": x0.cpu(), "solver": solver.name, "nfe": traj.nfe}, os.path.join(out_dir, "samples.pt"))
        if ec.plots:
            from flowmatch.viz import plot_loss_by_t, plot_samples, plot_trajectories

            pd = os.path.join(out_dir, "plots")
            paths = {
                "samples": plot_samples({"source (t=0)": x0.cpu(), f"model ({solver.name}, NFE {traj.nfe})": x1,
                                         "target": scorer.ref}, os.path.join(pd, "samples.png"), title=cfg.name),
                "trajectories": plot_trajectories(traj.xs, os.path.join(pd, "trajectories.png"),
                                                  title=f"{cfg.name}: S/E|Z1-Z0|^2 = {st.straightness_rel:.3g}"),
            }
            rows = [r for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if "train/loss_t0" in r]
            if rows:
                last = rows[-1]
                bins = [last.get(f"train/loss_t{i}", float("nan")) for i in range(10)]
                paths["loss_by_t"] = plot_loss_by_t(bins, os.path.join(pd, "loss_by_t.png"),
                                                    title=f"loss by t at step {last['step']}")
            if tracker is not None:
                for key, p in paths.items():
                    tracker.log_image(f"eval/{key}", p, step)
    return res


def _loss_by_t_plot(out_dir: str, paths: dict) -> None:
    from flowmatch.viz import plot_loss_by_t

    rows = [r for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if "train/loss_t0" in r]
    if rows:
        last = rows[-1]
        bins = [last.get(f"train/loss_t{i}", float("nan")) for i in range(10)]
        paths["loss_by_t"] = plot_loss_by_t(bins, os.path.join(out_dir, "plots", "loss_by_t.png"),
                                            title=f"loss by t at step {last['step']}")


@torch.no_grad()
def _evaluate_images(model, cfg: ExperimentConfig, out_dir: Optional[str], *, tracker=None, step=None) -> dict:
    """:func:`evaluate_model` for images: ``eval/fd``, ``eval/fd_floor``, ``eval/kid`` in the
    classifier's feature space (and ``eval/inception_fid`` with ``eval.inception``), straightness on
    128 draws, a sample grid and image trajectories."""
    from flowmatch.evaluation import inception_score_of, make_scorer, sampling_field

    ec = cfg.eval
    device = next(model.parameters()).device
    task = build_task(cfg.data)
    x0 = task.source.sample(ec.n, generator=make_generator(ec.seed)).to(device)
    field_ = sampling_field(model, ec.n, ec.guidance)
    solver = get_solver(ec.solver, atol=ec.atol, rtol=ec.rtol)
    # solved in chunks of IMAGE_EVAL_BATCH (a big UNet on eval.n images at once would not fit a GPU);
    # an adaptive solver steps each chunk on its own, so NFE is the largest over chunks
    from flowmatch.evaluation import LabeledField

    chunks, nfe = [], 0
    for start in range(0, ec.n, IMAGE_EVAL_BATCH):
        stop = min(start + IMAGE_EVAL_BATCH, ec.n)
        v = field_ if field_ is model else LabeledField(model, field_.labels[start:stop], field_.scale)
        traj = solve(v, x0[start:stop], solver, nfe=None if solver.adaptive else ec.nfe)
        chunks.append(traj.x1.float().cpu())
        nfe = max(nfe, traj.nfe)
    x1 = torch.cat(chunks)
    scorer = make_scorer(cfg, ec.n, seed=ec.seed, device=device)
    st = straightness(field_, x0[: min(ec.n, 128)])
    res = {**{f"eval/{k}": v for k, v in {**scorer(x1), **scorer.floor(ec.n)}.items()}, "eval/nfe": nfe,
           "eval/solver": solver.name, "eval/straightness": st.straightness,
           "eval/straightness_rel": st.straightness_rel, "eval/straightness_per_dim": st.straightness_per_dim}
    fid = inception_score_of(cfg, x1, device=device)
    if fid is not None:
        res["eval/inception_fid"] = fid
    if tracker is not None:
        tracker.log({k: v for k, v in res.items() if not isinstance(v, str)}, step or 0)
    if out_dir is not None:
        atomic_save({"samples": x1, "x0": x0.cpu(), "solver": solver.name, "nfe": nfe},
                    os.path.join(out_dir, "samples.pt"))
        if ec.plots:
            from flowmatch.viz import plot_image_trajectories, save_image_grid

            pd = os.path.join(out_dir, "plots")
            k = getattr(model, "num_classes", None) or 8
            paths = {"samples": save_image_grid(x1[:64], os.path.join(pd, "samples.png"), nrow=k if k <= 16 else 8,
                                                title=f"{cfg.name}: {solver.name}, NFE {nfe}")}
            xs = solve(field_, x0[:8], "rk4", num_steps=16, return_trajectory=True).xs
            paths["trajectories"] = plot_image_trajectories({cfg.name: xs}, os.path.join(pd, "trajectories.png"),
                                                            n=8, steps=9, title=f"{cfg.name}: RK4 trajectories")
            _loss_by_t_plot(out_dir, paths)
            if tracker is not None:
                for key, p in paths.items():
                    tracker.log_image(f"eval/{key}", p, step)
    return res


def _check_image_metric(cfg: ExperimentConfig) -> None:
    """Refuse, before training, an image task whose evaluation would have no feature classifier."""
    from flowmatch.metrics.frechet import SHIPPED_CLASSIFIERS, TRAIN_SCRIPT

    if cfg.eval.classifier is None and cfg.data.target not in SHIPPED_CLASSIFIERS:
        raise FlowmatchError(f"data.target={cfg.data.target}: no feature classifier ships for its Frechet distance; "
                             f"train one with {TRAIN_SCRIPT} --dataset {cfg.data.target} and set "
                             f"eval.classifier=PATH (shipped: {', '.join(SHIPPED_CLASSIFIERS)})")


def train_from_config(cfg: ExperimentConfig, out: str, *, resume: bool | str = False, overwrite: bool = False,
                      progress: bool = True, evaluate: bool = True) -> TrainSummary:
    """Train ``cfg`` into ``out`` and evaluate it; writes ``summary.json``.

    ``resume="auto"`` reuses a finished run (same config, ``summary.json`` present), resumes an
    unfinished one (one stopped before its first checkpoint is restarted), or starts a new one.
    """
    check_output_path("out", out)
    summary_path = os.path.join(out, "summary.json")
    if resume == "auto":
        if os.path.exists(summary_path) and os.path.exists(last_checkpoint(out)):
            ck = load_checkpoint(last_checkpoint(out))
            same = not [k for k in config_diff(to_dict(from_dict(ck["config"])), to_dict(cfg))
                        if not k.startswith(("reflow.", "tracking."))]
            if same and ck["step"] == cfg.train.steps:
                with open(summary_path) as f:
                    data = json.load(f)
                data["skipped"] = True
                return TrainSummary(**data)
        resume = holds_run(out)
    if evaluate and is_image_task(cfg.data):
        _check_image_metric(cfg)
    result = train(cfg, out, resume=bool(resume), overwrite=overwrite, progress=progress, finish_tracker=False)
    if not result.is_main:  # rank > 0 under torchrun: rank 0 evaluates and writes summary.json
        return TrainSummary(name=result.config.name, run_dir=out, checkpoint=result.checkpoint, step=result.step,
                            steps_per_sec=result.steps_per_sec, eval={})
    cfg = result.config
    tracker = result.tracker
    try:
        sps = result.steps_per_sec
        if result.start_step > 0:  # a resumed run: report the rate over all logged steps
            rates = [r["train/steps_per_sec"] for r in read_metrics(os.path.join(out, "metrics.jsonl"))
                     if "train/steps_per_sec" in r]
            sps = sum(rates) / len(rates) if rates else sps
        ev = evaluate_model(result.model, cfg, out, tracker=tracker, step=result.step) if evaluate else {}
    finally:
        if tracker is not None:
            tracker.finish()
    summary = TrainSummary(name=cfg.name, run_dir=out, checkpoint=result.checkpoint, step=result.step,
                           steps_per_sec=sps, eval=ev)
    atomic_write_text(summary_path, json.dumps(summary.to_dict(), indent=1))
    return summary


def sample_from_checkpoint(ckpt: str, out: str, *, n: int = 1000, solver: str = "euler", nfe: Optional[int] = None,
                           atol: float = 1e-5, rtol: float = 1e-5, seed: int = 0, device: str = "auto",
                           use_ema: bool = True, batch_size: int = 10_000, progress: bool = True) -> dict:
    """Sample ``n`` points from a checkpoint; saves ``{samples, x0, solver, num_steps, nfe, ...}`` to
    ``out`` (``.pt``, or ``.npz`` by extension) and returns that record without the tensors.

    The source draws are made at once (so the samples do not depend on ``batch_size``) and solved in
    batches of ``batch_size``; ``nfe`` is the evaluations per sample (for adaptive solvers, the
    largest over batches, each batch listed in ``nfe_per_batch``)."""
    n, batch_size = check_int("n", n, 1), check_int("batch_size", batch_size, 1)
    check_output_path("out", out, kind="file")  # before any work: a bad path would lose the samples
    dev = resolve_device(device)
    lm = load_model(ckpt, use_ema=use_ema, device=dev)
    cfg = lm.config
    s = get_solver(solver, atol=atol, rtol=rtol)
    if s.adaptive and nfe is not None:
        raise FlowmatchError(f"solver {solver!r} is adaptive: it takes --atol/--rtol, not --nfe")
    if not s.adaptive and nfe is None:
        raise FlowmatchError(f"solver {solver!r} is fixed-step: give --nfe (a multiple of {s.stages})")
    x0 = build_source(cfg.data).sample(n, generator=make_generator(seed)).to(dev)
    from flowmatch.evaluation import LabeledField, sampling_field

    field_ = sampling_field(lm.model, n, cfg.eval.guidance)
    from tqdm.auto import tqdm  # lazy

    chunks, nfes = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="sample", disable=None if progress else True, leave=False):
            v = field_ if field_ is lm.model else LabeledField(lm.model, field_.labels[start:start + batch_size],
                                                               field_.scale)
            traj = solve(v, x0[start:start + batch_size], s, nfe=nfe, atol=atol, rtol=rtol)
            chunks.append(traj.x1.float().cpu())
            nfes.append(traj.nfe)
    seconds = time.perf_counter() - t0
    record = {"checkpoint": os.path.abspath(ckpt), "step": lm.step, "solver": s.name,
              "num_steps": None if s.adaptive else s.steps_for_nfe(nfe), "nfe": max(nfes),
              "nfe_per_batch": nfes, "batch_size": batch_size, "atol": atol if s.adaptive else None, "rtol": rtol if s.adaptive else None, "n": n, "seed": seed,
              "seconds": seconds}
    tensors = {"samples": torch.cat(chunks), "x0": x0.cpu()}
    if field_ is not lm.model:  # a class-conditional model: the labels it was given, and the guidance
        tensors["y"] = field_.labels.cpu()
        record["guidance"] = field_.scale
    if out.endswith(".npz"):
        import numpy as np

        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = out + ".tmp.npz"
        np.savez(tmp, **{k: v.numpy() for k, v in tensors.items()}, meta=json.dumps(record))
        os.replace(tmp, out)
    else:
        atomic_save({**tensors, **record}, out)
    return record


def _model_name(ckpt: str) -> str:
    d = os.path.dirname(os.path.abspath(ckpt))
    return os.path.basename(os.path.dirname(d)) if os.path.basename(d) == "checkpoints" else os.path.basename(ckpt)


def _load_task_models(ckpts: Sequence[str], dev, names: Optional[Sequence[str]]):
    if not ckpts:
        raise FlowmatchError("bench needs at least one checkpoint")
    loaded = [load_model(c, device=dev) for c in ckpts]
    tasks = {(m.config.data.source, m.config.data.target, m.config.data.dim, m.config.data.root,
              m.config.data.image_size, m.config.data.channels) for m in loaded}
    if len(tasks) > 1:
        raise FlowmatchError(f"bench compares checkpoints of one task; got {sorted(tasks)} "
                             f"(run bench once per task)")
    models: dict = {}
    guidance: dict = {}  # each checkpoint is sampled with its own eval.guidance
    for i, (c, m) in enumerate(zip(ckpts, loaded)):
        name = names[i] if names else _model_name(c)
        if name in models:
            name = f"{name}#{i}"
        models[name] = m.model
        guidance[name] = m.config.eval.guidance
    return models, loaded[0].config, guidance


def _bench_fields(models: dict, guidance: dict, n: int) -> dict:
    from flowmatch.evaluation import sampling_field

    return {name: sampling_field(m, n, guidance[name]) for name, m in models.items()}


def bench_checkpoints(ckpts: Sequence[str], out: Optional[str] = None, *,
                      solvers: Sequence[str] = BENCH_SOLVERS, nfes: Sequence[int] = BENCH_NFES,
                      grids: Sequence[str] = ("uniform",), n: int = 2000, grid_n: Optional[int] = None,
                      likelihood_n: int = 0, seed: int = 0, atol: float = 1e-5, rtol: float = 1e-5,
                      device: str = "auto", tracking: str = "offline", progress: bool = True,
                      names: Optional[Sequence[str]] = None, plot: bool = True) -> BenchResult:
    """The full bench (:func:`flowmatch.bench.bench_suite`) on checkpoints of one task (same source,
    target and dimension). With ``out``: :func:`flowmatch.bench.write_suite`'s files, and a wandb
    table, W2 scalars and the plots unless ``tracking`` is ``disabled``."""
    if out is not None:
        check_output_path("out", out)
    dev = resolve_device(device)
    models, cfg, guidance = _load_task_models(ckpts, dev, names)
    from flowmatch.evaluation import make_scorer

    data = build_task(cfg.data)
    big = max(n, grid_n or n)
    res = bench_suite(_bench_fields(models, guidance, big), data.source, data.target,
                      solvers=solvers, nfes=nfes, grids=grids, n=n, grid_n=grid_n, likelihood_n=likelihood_n,
                      seed=seed, atol=atol, rtol=rtol, device=dev, progress=progress,
                      scorer=make_scorer(cfg, big, seed=seed, device=dev),
                      straightness_n=128 if data.is_image else 1000)
    task = f"{cfg.data.source}->{cfg.data.target}"
    for r in res.rows + res.models:
        r["task"] = task
    if out is not None:
        paths = write_suite(res, out, plot=plot)
        if tracking != "disabled":
            with Tracker(out, mode=tracking, name=f"bench {task}", job_type="bench") as tr:
                tr.log_table("bench/table", res.rows)
                tr.log_table("bench/models", res.models)
                metric = "fd" if data.is_image else "w2"
                for r in res.rows:
                    if r["n"] == n:
                        tr.log({f"bench/{r['model']}/{r['solver']}/{r['grid']}/nfe{r['nfe']}/{metric}": r[metric]}, 0)
                for key in ("pareto_plot", "curvature_plot"):
                    if key in paths:
                        tr.log_image(f"bench/{key[:-5]}", paths[key])
    return res


def bench_from_checkpoints(ckpts: Sequence[str], out: Optional[str] = None, *,
                           solvers: Sequence[str] = DEMO_SOLVERS, nfes: Sequence[int] = DEMO_NFES, n: int = 2000,
                           seed: int = 0, grid: str = "uniform", atol: float = 1e-5, rtol: float = 1e-5,
                           device: str = "auto", tracking: str = "offline", progress: bool = True,
                           names: Optional[Sequence[str]] = None, plot: bool = True) -> list[dict]:
    """Benchmark checkpoints of one task on every solver x NFE on one time grid; returns the rows.
    With ``out``: ``bench.json``/``.csv``/``.md`` and ``bench_w2_vs_nfe.png`` (the compact form used
    by the demo and the reflow stage tables; :func:`bench_checkpoints` is the full bench)."""
    dev = resolve_device(device)
    models, cfg, guidance = _load_task_models(ckpts, dev, names)
    from flowmatch.evaluation import make_scorer

    data = build_task(cfg.data)
    rows = benchmark(_bench_fields(models, guidance, n), data.source, data.target,
                     solvers=solvers, nfes=nfes, n=n, seed=seed, grid=grid, atol=atol, rtol=rtol, device=dev,
                     progress=progress, scorer=make_scorer(cfg, n, seed=seed, device=dev),
                     straightness_n=128 if data.is_image else 1000)
    task = f"{cfg.data.source}->{cfg.data.target}"
    for r in rows:
        r["task"] = task
    if out is not None:
        paths = write_bench(rows, out, plot=plot)
        if tracking != "disabled":
            with Tracker(out, mode=tracking, name=f"bench {task}", job_type="bench") as tr:
                tr.log_table("bench/table", rows)
                metric = "fd" if data.is_image else "w2"
                for r in rows:
                    tr.log({f"bench/{r['solver']}/nfe{r['nfe']}/{metric}": r[metric]}, 0)
                if "plot" in paths:
                    tr.log_image(f"bench/{metric}_vs_nfe", paths["plot"])
    return rows


def _headline(rows: list[dict], summaries: dict[str, TrainSummary]) -> str:
    """Per-experiment table: W2 at Euler NFE 1..16 and dopri5, straightness, train steps/s."""
    header = ["experiment", "task", "coupling"] + [f"Euler {k}" for k in DEMO_NFES] + [
        "dopri5 (NFE)", "W2 floor", "straightness S", "S / E|Z1-Z0|^2", "train steps/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, s in summaries.items():
        rs = [r for r in rows if r["model"] == name]
        if not rs:
            continue
        eul = {r["nfe"]: r["w2"] for r in rs if r["solver"] == "euler"}
        dop = [r for r in rs if r["solver"] == "dopri5"]
        cfgc = load_checkpoint(s.checkpoint)["config"]
        cells = [name, rs[0]["task"], cfgc["coupling"]["name"]] + [f"{eul[k]:.3f}" if k in eul else "-" for k in DEMO_NFES]
        cells += [f"{dop[0]['w2']:.3f} ({dop[0]['nfe']})" if dop else "-", f"{rs[0]['w2_floor']:.3f}",
                  f"{rs[0]['straightness']:.3f}", f"{rs[0]['straightness_rel']:.4f}", f"{s.steps_per_sec:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_demo(out: str = "runs/demo", configs: Optional[Sequence[str]] = None, *, overrides: Sequence[str] = (),
             n: int = 2000, progress: bool = True, solvers: Sequence[str] = DEMO_SOLVERS,
             nfes: Sequence[int] = DEMO_NFES) -> str:
    """Train every toy config (``experiments/toy/*.yaml`` but the ``reflow_*`` chains, by default), benchmark each task's models on
    ``solvers`` x ``nfes`` and write ``OUT/report.md`` with tables and plots. Finished runs are reused,
    unfinished ones resumed. Returns the report's path."""
    check_output_path("out", out)
    check_int("n", n, 1)  # before the training, not after it
    if configs is None:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        configs = sorted(p for p in glob.glob(os.path.join(here, "experiments", "toy", "*.yaml"))
                         if not os.path.basename(p).startswith("reflow_"))
    if not configs:
        raise FlowmatchError("run_demo found no experiment configs")
    t_start = time.perf_counter()
    summaries: dict[str, TrainSummary] = {}
    cfgs: dict[str, ExperimentConfig] = {}
    for path in configs:
        cfg = load_config(path, list(overrides))
        if is_image_task(cfg.data):
            raise FlowmatchError(f"demo runs toy configs; {path} is an image task (use flowmatch reflow run or "
                                 f"make images)")
        if cfg.name in cfgs:
            raise FlowmatchError(f"two demo configs share the name {cfg.name!r}")
        cfgs[cfg.name] = cfg
        summaries[cfg.name] = train_from_config(cfg, os.path.join(out, "runs", cfg.name), resume="auto",
                                                progress=progress)
    by_task: dict[tuple, list[str]] = {}
    for name, cfg in cfgs.items():
        by_task.setdefault((cfg.data.source, cfg.data.target), []).append(name)
    rows: list[dict] = []
    plots = []
    for (src, tgt), names in by_task.items():
        task_rows = bench_from_checkpoints([summaries[nm].checkpoint for nm in names], None, solvers=solvers,
                                           nfes=nfes, n=n, names=names, tracking="disabled", progress=progress)
        rows += task_rows
        from flowmatch.viz import plot_w2_vs_nfe

        plots.append(plot_w2_vs_nfe(task_rows, os.path.join(out, "plots", f"w2_vs_nfe_{src}_to_{tgt}.png")))
    write_bench(rows, out, plot=False)
    elapsed = time.perf_counter() - t_start
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731
    md = ["# flowmatch demo report", "",
          "Made by `make demo` (`flowmatch demo --out " + out + "`): each config under `experiments/toy/` is trained "
          "on the CPU, then its EMA model is sampled from the same source draws with every solver at NFE "
          f"{', '.join(map(str, nfes))} and with dopri5 (atol = rtol = 1e-5). W2 is exact on n = {n} samples "
          f"against fresh target draws; the W2 floor is the W2 between two independent target draws of n = {n} "
          "(no sampler can beat it on n points). W2 on 2,000 points is noisy: across source and reference seeds the same "
          "model's W2 moves by about +-0.05 here, so smaller differences are not significant. Straightness S = int_0^1 E|(Z1 - Z0) - v(Z_t, t)|^2 dt, summed "
          "over dimensions, along RK4 trajectories with 64 steps from 1,000 source draws. Heun and midpoint cost "
          "2 NFE per step, RK4 4 (Heun's last step is a full Heun step).", "",
          f"Total time of this invocation: {elapsed:.0f} s (finished runs are reused).", "",
          "## Headline: W2 against NFE (Euler) and dopri5", "", _headline(rows, summaries), "",
          "## All solvers", "", rows_to_markdown(rows, ("model", "solver", "num_steps", "nfe", "w2", "w2_floor", "mmd",
                                                         "seconds")), ""]
    md += ["## W2 against NFE", ""] + [f"![{rel(p)}]({rel(p)})" for p in plots] + [""]
    md += ["## Samples and trajectories", ""]
    for name, s in summaries.items():
        pd = os.path.join(s.run_dir, "plots")
        md += [f"### {name}", "", f"![samples]({rel(os.path.join(pd, 'samples.png'))}) "
               f"![trajectories]({rel(os.path.join(pd, 'trajectories.png'))})", ""]
    report = os.path.join(out, "report.md")
    atomic_write_text(report, "\n".join(md))
    atomic_write_text(os.path.join(out, "summaries.json"),
                      json.dumps({k: v.to_dict() for k, v in summaries.items()}, indent=1))
    return report


def _stage_config(cfg: ExperimentConfig, name: str, **sections) -> ExperimentConfig:
    """``cfg`` with ``name`` and the given sections' keys replaced (``coupling={...}`` etc.)."""
    from flowmatch.config import from_dict

    d = to_dict(cfg)
    d["name"] = name
    for section, values in sections.items():
        d[section] = {**d[section], **values}
    return from_dict(d)


def reflow_stage_configs(cfg: ExperimentConfig, out: str, rounds: int, distill: bool) -> list[tuple[str, ExperimentConfig, str]]:
    """The chain's training stages after 1-RF: ``(label, config, pairs_dir)`` for 2-RF..K-RF and the
    optional distillation. Stage k trains on the pairs of stage k - 1, initialised from it; with
    ``reflow.mix < 1`` its real-data term uses ``reflow.real`` (default: the experiment's own coupling)."""
    rc = cfg.reflow
    # a class-conditional teacher's pairs are made with guidance eval.guidance already: its students
    # learn the guided field and are sampled with plain conditioning (guidance 1)
    student_eval = {"guidance": 1.0} if cfg.model.class_cond else {}
    stages = []
    for k in range(2, rounds + 1):
        pairs = os.path.join(out, f"pairs-{k - 1}RF")
        stages.append((f"{k}-RF", _stage_config(
            cfg, f"{cfg.name}-{k}RF", coupling={"name": "paired", "pairs": pairs, "mix": rc.mix,
                                                 "real": rc.real or cfg.coupling.name},
            time=to_dict(rc.time), train={"steps": rc.steps, "lr": rc.lr, "loss": rc.loss, "init": "auto"},
            eval=student_eval), pairs))
    if distill:
        pairs = os.path.join(out, f"pairs-{rounds}RF")
        stages.append((f"{rounds}-RF+distill", _stage_config(
            cfg, f"{cfg.name}-{rounds}RF-distill", coupling={"name": "paired", "pairs": pairs, "mix": 1.0},
            time={"name": "constant", "value": 0.0},
            train={"steps": rc.distill_steps, "lr": rc.distill_lr, "loss": rc.distill_loss, "init": "auto"},
            eval={"solver": "euler", "nfe": 1, **student_eval}), pairs))
    return stages


def reflow_from_config(cfg: ExperimentConfig, out: str, *, rounds: Optional[int] = None,
                       distill: Optional[bool] = None, progress: bool = True) -> list[dict]:
    """The reflow chain: 1-RF (trained from ``cfg``, or ``cfg.reflow.teacher``), then for each round
    pairs from the current teacher and the next k-RF trained on them, then (``distill``) one-step
    distillation of the last round's pairs. Every stage is benchmarked with the same bench.

    Writes ``OUT/stages.json`` (rows with ``task, stage, solver, nfe, w2, w2_floor, mmd,
    straightness``, ...; ``fd, fd_floor, kid`` in place of ``w2, w2_floor, mmd`` for images), ``stages.csv``, ``stages.md`` and plots under ``OUT/plots``. Stages
    already on disk are reused, so a killed chain resumes at the stage it reached.
    """
    from flowmatch.reflow import generate_pairs
    from flowmatch.viz import plot_straightness_by_stage, plot_trajectory_grid, plot_w2_vs_nfe

    for d in (out, os.path.join(out, "plots")):  # a killed chain's own temporaries (the stage tables, plots)
        remove_temporaries(d)
    rc = cfg.reflow
    if rc.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"reflow.precision must be auto, fp32 or bf16; got {rc.precision!r}")
    rounds = rc.rounds if rounds is None else rounds
    distill = rc.distill if distill is None else distill
    if rounds < 1:
        raise FlowmatchError(f"reflow needs rounds >= 1, got {rounds}")
    if rc.teacher:
        teacher = load_model(rc.teacher)
        if (teacher.config.data.source, teacher.config.data.target) != (cfg.data.source, cfg.data.target):
            raise FlowmatchError(f"reflow.teacher {rc.teacher} maps {teacher.config.data.source} -> "
                                 f"{teacher.config.data.target}, not {cfg.data.source} -> {cfg.data.target}")
        stages = [("1-RF", rc.teacher)]
    else:
        s1 = _train_stage(_stage_config(cfg, f"{cfg.name}-1RF"), out, "1-RF", progress)
        stages = [("1-RF", s1.checkpoint)]
    for i, (label, stage_cfg, pairs) in enumerate(reflow_stage_configs(cfg, out, rounds, distill)):
        precision = rc.precision
        if precision == "auto":  # bf16 for image teachers on a GPU, where it doubles the throughput
            precision = "bf16" if torch.cuda.is_available() and is_image_task(cfg.data) else "fp32"
        generate_pairs(stages[-1][1], pairs, rc.num_pairs, solver=rc.solver, nfe=rc.nfe, atol=rc.atol, rtol=rc.rtol,
                       shard_size=rc.shard_size, seed=rc.seed + i, progress=progress, guidance=cfg.eval.guidance,
                       precision=precision)
        s = _train_stage(stage_cfg, out, label, progress)
        stages.append((label, s.checkpoint))
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
    plot_w2_vs_nfe([{**r, "model": r["stage"]} for r in rows], os.path.join(pd, f"{metric}_vs_nfe.png"), metric=metric)
    plot_straightness_by_stage(rows, os.path.join(pd, "straightness.png"), title=cfg.name)
    image = is_image_task(cfg.data)
    from flowmatch.evaluation import sampling_field

    x0 = build_source(cfg.data).sample(8 if image else 300, generator=make_generator(cfg.eval.seed))
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
        plot_trajectory_grid(trajs, os.path.join(pd, "trajectories.png"),
                             title=f"{cfg.name}: RK4 trajectories per stage")
    if cfg.tracking.mode != "disabled":
        with Tracker(out, mode=cfg.tracking.mode, project=cfg.tracking.project, name=f"reflow {cfg.name}",
                     job_type="reflow") as tr:
            tr.log_table("reflow/stages", rows)
            for p in (f"{metric}_vs_nfe", "straightness", "trajectories"):
                tr.log_image(f"reflow/{p}", os.path.join(pd, f"{p}.png"))
    return rows


def _train_stage(cfg: ExperimentConfig, out: str, label: str, progress: bool) -> TrainSummary:
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
    from flowmatch.evaluation import sampling_field
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


def reflow_targets(rows: list[dict]) -> list[dict]:
    """Per task, the numbers reflow is judged by: straightness of 2-RF over 1-RF, one-step W2 of
    2-RF and of the distilled stage against the noise floor and against 1-RF's dopri5 W2, and
    2-RF's dopri5 W2 against 1-RF's (reflow should keep the marginals)."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        get = lambda stage, solver, nfe=None: next((r for r in rs if r["stage"] == stage and r["solver"] == solver  # noqa: E731
                                                    and (nfe is None or r["nfe"] == nfe)), None)
        one, two = get("1-RF", "euler", 1), get("2-RF", "euler", 1)
        ada1, ada2 = get("1-RF", "dopri5"), get("2-RF", "dopri5")
        dist = next((r for r in rs if r["stage"].endswith("+distill") and r["solver"] == "euler" and r["nfe"] == 1), None)
        if one is None:
            continue
        m = "fd" if "fd" in one else "w2"
        M = m.upper()
        floor = one[f"{m}_floor"]
        row = {"task": task, f"{m}_floor": floor, "S(1-RF)": one["straightness"],
               "S(2-RF)": two["straightness"] if two else None,
               "S ratio 2-RF/1-RF": two["straightness"] / one["straightness"] if two else None,
               f"1-RF dopri5 {M}": ada1[m] if ada1 else None, f"2-RF dopri5 {M}": ada2[m] if ada2 else None,
               f"1-RF Euler-1 {M}": one[m], f"2-RF Euler-1 {M}": two[m] if two else None,
               "distilled stage": dist["stage"] if dist else None, f"distilled Euler-1 {M}": dist[m] if dist else None}
        best = min(w for w in (row[f"2-RF Euler-1 {M}"], row[f"distilled Euler-1 {M}"]) if w is not None) if (two or dist) else None
        row[f"best one-step {M} / floor"] = best / floor if best is not None and floor else None
        if m == "fd":  # the image target: one-step distilled FD against 1-RF's adaptive FD
            row["distilled Euler-1 FD / 1-RF dopri5 FD"] = (dist[m] / ada1[m]) if dist and ada1 else None
        out.append(row)
    return out


def write_reflow_summary(rows: list[dict], out: str) -> str:
    """Write every chain's stage rows to ``OUT/stages.json``/``.csv``/``.md`` and the target table to
    ``OUT/targets.json``/``.md``; returns the target table as markdown."""
    write_bench(rows, out, plot=False, name="stages", columns=stage_columns(rows))
    targets = reflow_targets(rows)
    md = rows_to_markdown(targets)
    atomic_write_text(os.path.join(out, "targets.json"), json.dumps(targets, indent=1))
    atomic_write_text(os.path.join(out, "targets.md"), md)
    return md


def reflow_sweep(cfg: ExperimentConfig, out: str, key: str, values: Sequence, *, progress: bool = True) -> list[dict]:
    """One reflow round (1-RF -> pairs -> 2-RF) per value of the config ``key`` (e.g.
    ``reflow.num_pairs``, ``reflow.atol``, ``reflow.mix``), all from the same 1-RF teacher (trained
    once under ``OUT/teacher`` unless ``reflow.teacher`` names one). Writes ``OUT/sweep.json`` and
    ``OUT/sweep.md``: per value, the 2-RF's one-step and dopri5 W2, its straightness, the NFE per pair
    the teacher spent, the teacher's dopri5 W2 and the noise floor."""
    from flowmatch.config import apply_overrides

    if is_image_task(cfg.data):
        raise FlowmatchError(f"reflow sweep reports W2 on toy tasks; {cfg.name} is an image task "
                             f"(run flowmatch reflow run once per value instead)")
    if cfg.reflow.teacher:
        teacher = cfg.reflow.teacher
    else:
        teacher = train_from_config(_stage_config(cfg, f"{cfg.name}-1RF"), os.path.join(out, "teacher"),
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
