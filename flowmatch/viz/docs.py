"""The README's figures, made from the outputs of ``make demo`` (``RUNS/demo``), ``make reflow``
(``RUNS/reflow/<task>``) and, when it has run, ``make images`` (``RUNS/images/digits``): the data are drawn here (stage checkpoints solved from fixed source
draws, target and source draws for the densities, noise-floor draws for the band) and handed to the
figure functions of :mod:`flowmatch.viz`. ``make figures`` (``experiments/docs_figures.py``) writes
them under ``docs/``:

- ``reflow_<task>_trajectories.png``: per stage, 40 RK4 trajectories from the same source points
  over the target and source densities, S in each title.
- ``reflow_<task>_samples.png``: stages x (Euler NFE 1, 2, 4, dopri5), 2,000 samples from the same
  source draws over the target density, the stage table's W2 in each panel.
- ``reflow_<task>_w2_vs_nfe.png``: the stage table's W2 against NFE, the noise floor's spread over
  ``floor_draws`` pairs of target draws as a band.
- ``reflow_<task>_samples.png`` for an image chain: stages x Euler NFE 1, 2, 4 from the same noise
  beside real test images.
- ``demo_<task>_trajectories.png``: I-CFM against minibatch-OT trajectories of the demo.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from flowmatch.errors import FlowmatchError

__all__ = ["DocsFigureSizes", "FULL", "SMOKE", "docs_figures", "reflow_figures", "demo_figures", "floor_draws"]


@dataclass(frozen=True)
class DocsFigureSizes:
    """How much data each figure draws: ``paths`` trajectories (RK4, ``traj_steps`` steps),
    ``density_n`` target and source draws for the backgrounds, ``samples_n`` samples a panel,
    ``floor_draws`` noise-floor pairs of ``floor_n`` points (``None``: the table's ``n``),
    ``images`` samples a panel for image chains, ``atol``/``rtol`` of the dopri5 panels."""

    paths: int = 40
    traj_steps: int = 32
    density_n: int = 20_000
    samples_n: int = 2_000
    floor_draws: int = 6
    floor_n: Optional[int] = None
    images: int = 16
    atol: float = 1e-5
    rtol: float = 1e-5


FULL = DocsFigureSizes()
SMOKE = DocsFigureSizes(paths=8, traj_steps=4, density_n=500, samples_n=200, floor_draws=2, floor_n=100, images=4,
                        atol=1e-3, rtol=1e-3)


def floor_draws(target, n: int, draws: int, seed: int = 0) -> list[float]:
    """W2 between an evaluation reference of ``n`` points of ``target`` (``target.reference``) and
    ``n`` independent i.i.d. draws (``target.sample``, what a perfect model's samples are), ``draws``
    times: pair ``k`` uses seeds ``seed + 2k + 1`` and ``seed + 2k + 2``, so pair 0 is the bench's
    own floor (:class:`flowmatch.bench.ToyScorer` with ``seed``)."""
    from flowmatch.metrics.distances import w2
    from flowmatch.utils import make_generator

    out = []
    for k in range(draws):
        a = target.reference(n, generator=make_generator(seed + 2 * k + 1), device="cpu")
        b = target.sample(n, generator=make_generator(seed + 2 * k + 2), device="cpu")
        out.append(w2(a, b))
    return out


def _stage_rows(task_dir: str) -> list[dict]:
    path = os.path.join(task_dir, "stages.json")
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, ValueError) as e:
        raise FlowmatchError(f"{path}: cannot read the stage table ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "stage" in r for r in rows):
        raise FlowmatchError(f"{path}: not a stage table (a list of rows with a 'stage')")
    return rows


def _checkpoint(d: str) -> str:
    p = os.path.join(d, "checkpoints", "last.pt")
    if not os.path.isfile(p):
        raise FlowmatchError(f"{d}: no checkpoint at checkpoints/last.pt (run its make target first)")
    return p


def _row(rows: Sequence[dict], stage: str, solver: str, nfe: Optional[int] = None) -> Optional[dict]:
    for r in rows:
        if r["stage"] == stage and r["solver"] == solver and (nfe is None or r["nfe"] == nfe):
            return r
    return None


@torch.no_grad()
def reflow_figures(task_dir: str, out: str, *, sizes: DocsFigureSizes = FULL, seed: int = 0) -> list[str]:
    """The figures of one reflow chain ``task_dir`` (``stages.json`` and ``<stage>/checkpoints``),
    written as ``OUT/reflow_<task>_*.png``; returns their paths."""
    from flowmatch.data.task import build_task, is_image_task
    from flowmatch.evaluation import sampling_field
    from flowmatch.solvers import solve
    from flowmatch.training.checkpoint import load_model
    from flowmatch.utils import make_generator
    from flowmatch.viz.curves import floor_band, plot_quality_vs_nfe
    from flowmatch.viz.images import plot_image_stage_grid
    from flowmatch.viz.toy import plot_sample_grid, plot_trajectory_grid

    rows = _stage_rows(task_dir)
    task = os.path.basename(os.path.normpath(task_dir))
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    models = {s: load_model(_checkpoint(os.path.join(task_dir, s))) for s in stages}
    cfg = next(iter(models.values())).config
    metric = "fd" if any("fd" in r for r in rows) else "w2"
    paths = []
    if is_image_task(cfg.data):
        data = build_task(cfg.data, split="test")
        x0 = data.source.sample(sizes.images, generator=make_generator(seed))
        grid = {}
        for s, m in models.items():
            field_ = sampling_field(m.model, len(x0), m.config.eval.guidance)
            grid[s] = {f"Euler NFE {k}": solve(field_, x0, "euler", nfe=k).x1 for k in (1, 2, 4)}
        real = data.target.sample(sizes.images * len(grid), generator=make_generator(seed + 1))
        paths.append(plot_image_stage_grid(grid, os.path.join(out, f"reflow_{task}_samples.png"), real=real,
                                           nrow=max(1, int(sizes.images ** 0.5)),
                                           title=f"{task}: the same noise, per stage and NFE"))
        paths.append(plot_quality_vs_nfe(rows, os.path.join(out, f"reflow_{task}_{metric}_vs_nfe.png"), metric=metric,
                                         series="stage", title=f"{task}: {metric.upper()} against NFE per stage"))
        return paths
    data = build_task(cfg.data)
    g = make_generator(seed)
    x0 = data.source.sample(max(sizes.paths, sizes.samples_n), generator=g)
    target = data.target.sample(sizes.density_n, generator=make_generator(seed + 101))
    source = data.source.sample(sizes.density_n, generator=make_generator(seed + 102))
    trajs, straight = {}, {}
    for s, m in models.items():
        trajs[s] = solve(m.model, x0[:sizes.paths], "rk4", num_steps=sizes.traj_steps, return_trajectory=True).xs
        r = _row(rows, s, rows[0]["solver"])
        if r is not None and r.get("straightness") is not None:
            straight[s] = r["straightness"]
    paths.append(plot_trajectory_grid(trajs, os.path.join(out, f"reflow_{task}_trajectories.png"), target=target,
                                      source=source, straightness=straight, n=sizes.paths,
                                      ncols=2 if len(trajs) == 4 else None,
                                      title=f"{task}: RK4 trajectories from the same source points, per stage"))
    grid, notes = {}, {}
    xs = x0[:sizes.samples_n]
    for s, m in models.items():
        grid[s], notes[s] = {}, {}
        for k in (1, 2, 4):
            label = f"Euler NFE {k}"
            grid[s][label] = solve(m.model, xs, "euler", nfe=k).x1
            r = _row(rows, s, "euler", k)
            if r is not None and r.get(metric) is not None:
                notes[s][label] = f"{metric.upper()} {r[metric]:.3f}"
        ad = solve(m.model, xs, "dopri5", atol=sizes.atol, rtol=sizes.rtol)
        grid[s]["dopri5"] = ad.x1
        r = _row(rows, s, "dopri5")
        # the table's W2 with the table's NFE (its n draws); without a row, the NFE of this solve
        notes[s]["dopri5"] = (f"{metric.upper()} {r[metric]:.3f}, NFE {r['nfe']}" if r is not None
                              and r.get(metric) is not None else f"NFE {ad.nfe}")
    paths.append(plot_sample_grid(grid, os.path.join(out, f"reflow_{task}_samples.png"), target=target, notes=notes,
                                  title=f"{task}: samples over the target density (W2 from the stage table)"))
    n = sizes.floor_n or int(rows[0].get("n") or 5000)
    band = floor_band(floor_draws(data.target, n, sizes.floor_draws, seed), n) if sizes.floor_draws else None
    paths.append(plot_quality_vs_nfe(rows, os.path.join(out, f"reflow_{task}_{metric}_vs_nfe.png"), metric=metric,
                                     series="stage", floor=band, title=f"{task}: W2 against NFE per stage"))
    return paths


@torch.no_grad()
def demo_figures(demo_dir: str, out: str, *, sizes: DocsFigureSizes = FULL, seed: int = 0) -> list[str]:
    """Per demo task with both an ``<task>_icfm`` and an ``<task>_ot`` run under ``demo_dir/runs``:
    their trajectories from the same source points, ``OUT/demo_<task>_trajectories.png``."""
    from flowmatch.data.task import build_task
    from flowmatch.metrics.straightness import straightness
    from flowmatch.solvers import solve
    from flowmatch.training.checkpoint import load_model
    from flowmatch.utils import make_generator
    from flowmatch.viz.toy import plot_trajectory_grid

    runs = os.path.join(demo_dir, "runs")
    names = sorted(os.listdir(runs)) if os.path.isdir(runs) else []
    try:
        with open(os.path.join(demo_dir, "bench.json")) as f:
            bench = json.load(f)
    except (OSError, ValueError):
        bench = []
    paths = []
    for task in sorted({n[: -len("_icfm")] for n in names if n.endswith("_icfm")}):
        if f"{task}_ot" not in names:
            continue
        models = {label: load_model(_checkpoint(os.path.join(runs, f"{task}_{suffix}")))
                  for label, suffix in (("independent pairs (I-CFM)", "icfm"), ("minibatch OT pairs", "ot"))}
        data = build_task(next(iter(models.values())).config.data)
        x0 = data.source.sample(sizes.paths, generator=make_generator(seed))
        trajs = {k: solve(m.model, x0, "rk4", num_steps=sizes.traj_steps, return_trajectory=True).xs
                 for k, m in models.items()}
        straight = {}
        for k, m in models.items():  # the bench table's S (RK4, 64 steps, 1,000 draws); measured here without one
            r = next((r for r in bench if r.get("model") == os.path.basename(os.path.dirname(os.path.dirname(m.path)))
                      and r.get("straightness") is not None), None)
            straight[k] = r["straightness"] if r else straightness(
                m.model, data.source.sample(min(1000, sizes.density_n), generator=make_generator(seed + 103)),
                num_steps=sizes.traj_steps).straightness
        paths.append(plot_trajectory_grid(
            trajs, os.path.join(out, f"demo_{task}_trajectories.png"), straightness=straight, n=sizes.paths,
            target=data.target.sample(sizes.density_n, generator=make_generator(seed + 101)),
            source=data.source.sample(sizes.density_n, generator=make_generator(seed + 102)),
            title=f"{task}: the same source points, two couplings"))
    return paths


def docs_figures(runs: str = "runs", out: str = "docs", *, sizes: DocsFigureSizes = FULL, seed: int = 0,
                 tasks: Optional[Sequence[str]] = None) -> list[str]:
    """Every figure :mod:`flowmatch.viz.docs` makes from ``RUNS/demo`` and each chain under
    ``RUNS/reflow`` (``make reflow``) and ``RUNS/images`` (``make images``), only ``tasks`` when
    given, written under ``out``; returns their paths. A missing folder is skipped; none at all is
    an error."""
    demo = os.path.join(runs, "demo")
    chains = sorted(os.path.join(runs, kind, d) for kind in ("reflow", "images")
                    if os.path.isdir(os.path.join(runs, kind)) for d in os.listdir(os.path.join(runs, kind))
                    if os.path.isfile(os.path.join(runs, kind, d, "stages.json")) and (tasks is None or d in tasks))
    if not os.path.isdir(os.path.join(demo, "runs")) and not chains:
        raise FlowmatchError(f"{runs}: neither demo/runs nor a chain with stages.json under reflow/ or images/ "
                             f"(run make demo and make reflow first)")
    paths = demo_figures(demo, out, sizes=sizes, seed=seed) if os.path.isdir(os.path.join(demo, "runs")) else []
    for d in chains:
        paths += reflow_figures(d, out, sizes=sizes, seed=seed)
    return paths
