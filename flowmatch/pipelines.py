"""Pipelines: config -> runs -> artifacts. The CLI, make targets and notebooks call these short
entry points; evaluation lives in :mod:`flowmatch.evaluation`, the reflow chain in
:mod:`flowmatch.reflow_chain` and the markdown reports in :mod:`flowmatch.reports`.

- :func:`train_from_config`: train, then evaluate the EMA model (:func:`flowmatch.evaluation.evaluate`).
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

import flowmatch.evaluation as evaluation  # evaluation.evaluate: ``evaluate`` is train_from_config's flag
from flowmatch.bench import (BENCH_NFES, BENCH_SOLVERS, BenchResult, bench_suite, benchmark, write_bench,
                             write_suite)
from flowmatch.config import (ExperimentConfig, check_int, check_output_path, config_diff, from_dict, load_config,
                              to_dict)
from flowmatch.distill import adapters as lora_adapters
from flowmatch.data.task import build_source, build_task, is_image_task
from flowmatch.errors import FlowmatchError
from flowmatch.evaluation import LabeledField, check_image_metric, make_scorer, sampling_field, straightness_n
from flowmatch.reports import demo_report
from flowmatch.solvers import get_solver, num_steps_for, solve
from flowmatch.io import atomic_save, atomic_write_text
from flowmatch.training import (Tracker, build_components, last_checkpoint, load_checkpoint, load_model, read_metrics,
                                train)
from flowmatch.training.loop import holds_run
from flowmatch.training.objectives import unused_sections
from flowmatch.utils import make_generator, resolve_device

__all__ = ["TrainSummary", "describe_config", "train_from_config", "sample_from_checkpoint",
           "bench_checkpoints", "bench_from_checkpoints", "run_demo", "DEMO_SOLVERS", "DEMO_NFES"]

DEMO_SOLVERS = ("euler", "midpoint", "heun", "rk4", "dopri5")
DEMO_NFES = (1, 2, 4, 8, 16)


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
                        if not k.startswith(tuple(f"{s}." for s in (*unused_sections(cfg.train.objective),
                                                                    "tracking")))]
            if same and ck["step"] == cfg.train.steps:
                with open(summary_path) as f:
                    data = json.load(f)
                data["skipped"] = True
                return TrainSummary(**data)
        resume = holds_run(out)
    if evaluate and is_image_task(cfg.data):
        check_image_metric(cfg)
    result = train(cfg, out, resume=bool(resume), overwrite=overwrite, progress=progress, finish_tracker=False)
    if cfg.lora.rank > 0 and result.is_main:  # the adapter alone, with its provenance, beside the checkpoint
        lora_adapters.write_run_adapter(result.checkpoint)
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
        ev = evaluation.evaluate(result.model, cfg, out, tracker=tracker, step=result.step) if evaluate else {}
    finally:
        if tracker is not None:
            tracker.finish()
    summary = TrainSummary(name=cfg.name, run_dir=out, checkpoint=result.checkpoint, step=result.step,
                           steps_per_sec=sps, eval=ev)
    atomic_write_text(summary_path, json.dumps(summary.to_dict(), indent=1))
    return summary


def sample_from_checkpoint(ckpt: str, out: str, *, n: int = 1000, solver: str = "euler", nfe: Optional[int] = None,
                           atol: float = 1e-5, rtol: float = 1e-5, seed: int = 0, device: str = "auto",
                           use_ema: bool = True, batch_size: int = 10_000, progress: bool = True,
                           adapters: Sequence[str | lora_adapters.AdapterSpec] = ()) -> dict:
    """Sample ``n`` points from a checkpoint; saves ``{samples, x0, solver, num_steps, nfe, ...}`` to
    ``out`` (``.pt``, or ``.npz`` by extension) and returns that record without the tensors.

    The source draws are made at once (so the samples do not depend on ``batch_size``) and solved in
    batches of ``batch_size``; ``nfe`` is the evaluations per sample (for adaptive solvers, the
    largest over batches, each batch listed in ``nfe_per_batch``). ``adapters``: LoRA adapters composed
    on the checkpoint's model (``PATH`` or ``PATH:WEIGHT``, see :func:`~flowmatch.distill.adapters.apply_adapters`),
    each checked to be made for this checkpoint."""
    n, batch_size = check_int("n", n, 1), check_int("batch_size", batch_size, 1)
    check_output_path("out", out, kind="file")  # before any work: a bad path would lose the samples
    dev = resolve_device(device)
    specs = [a if isinstance(a, lora_adapters.AdapterSpec) else lora_adapters.parse_adapter_spec(a) for a in adapters]
    lm = load_model(ckpt, use_ema=use_ema, device=dev)
    if specs:
        lora_adapters.apply_adapters(lm.model, specs, base=ckpt)
    cfg = lm.config
    s = get_solver(solver, atol=atol, rtol=rtol)
    num_steps = num_steps_for(s, nfe, takes=("nfe",))
    x0 = build_source(cfg.data).sample(n, generator=make_generator(seed)).to(dev)
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
              "adapters": [{"path": os.path.abspath(a.path), "weight": a.weight} for a in specs],
              "num_steps": num_steps, "nfe": max(nfes),
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
    data = build_task(cfg.data)
    big = max(n, grid_n or n)
    res = bench_suite(_bench_fields(models, guidance, big), data.source, data.target,
                      solvers=solvers, nfes=nfes, grids=grids, n=n, grid_n=grid_n, likelihood_n=likelihood_n,
                      seed=seed, atol=atol, rtol=rtol, device=dev, progress=progress,
                      scorer=make_scorer(cfg, big, seed=seed, device=dev),
                      straightness_n=straightness_n(data.is_image))
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
                           names: Optional[Sequence[str]] = None, plot: bool = True,
                           straightness_draws: Optional[int] = None) -> list[dict]:
    """Benchmark checkpoints of one task on every solver x NFE on one time grid; returns the rows.
    With ``out``: ``bench.json``/``.csv``/``.md`` and ``bench_w2_vs_nfe.png`` (the compact form used
    by the demo and the reflow stage tables; :func:`bench_checkpoints` is the full bench).
    ``straightness_draws``: the source draws straightness is measured on (default: the task's,
    :func:`~flowmatch.evaluation.straightness_n`)."""
    dev = resolve_device(device)
    models, cfg, guidance = _load_task_models(ckpts, dev, names)
    data = build_task(cfg.data)
    rows = benchmark(_bench_fields(models, guidance, n), data.source, data.target,
                     solvers=solvers, nfes=nfes, n=n, seed=seed, grid=grid, atol=atol, rtol=rtol, device=dev,
                     progress=progress, scorer=make_scorer(cfg, n, seed=seed, device=dev),
                     straightness_n=straightness_draws or straightness_n(data.is_image))
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
    report = os.path.join(out, "report.md")
    atomic_write_text(report, demo_report(out, rows, summaries, plots, n=n, nfes=nfes, elapsed=elapsed))
    atomic_write_text(os.path.join(out, "summaries.json"),
                      json.dumps({k: v.to_dict() for k, v in summaries.items()}, indent=1))
    return report
