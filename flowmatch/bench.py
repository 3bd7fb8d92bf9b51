"""Solver x grid x NFE x model benchmark -> rows ready for CSV, JSON, markdown and ``wandb.Table``.

Every row is one (model, solver, time grid, NFE) setting, sampled from the same source draws (fixed
seed) and scored against the same fresh evaluation reference of the target (``target.reference``:
an equal-weight mixture's components in exact shares, :mod:`flowmatch.data.toy`): W2 (exact, on
``n`` points), MMD, the wall time of the solve and samples/s. ``w2_floor`` is the W2 between that
reference and an independent i.i.d. draw of the target of the row's ``n`` (``target.sample``): what
a perfect model, whose samples are i.i.d. draws of the target, scores on n points. Rows on the
first grid (the headline rows, uniform by default) use ``n`` points; rows on the other grids may
use a smaller ``grid_n``; every row states its ``n``. ``pareto`` marks the rows no other row of the
same model and ``n`` beats on both NFE and W2.

Per model (computed once, repeated on its rows where scalar): straightness (RK4, 64 steps) and the
curvature profile along t (chord deviation and acceleration per grid time, see
:func:`flowmatch.metrics.straightness`), and optionally the log-likelihood of held-out target
draws by the instantaneous change of variables (:func:`flowmatch.metrics.likelihood.log_likelihood`;
needs a source with a density).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from flowmatch.config import check_file_name, check_int
from flowmatch.data import ToyDistribution
from flowmatch.errors import ConfigError
from flowmatch.metrics import straightness, w2
from flowmatch.metrics.distances import MMDReference
from flowmatch.solvers import get_solver, num_steps_for, parse_grid, solve
from flowmatch.utils import make_generator

__all__ = ["ToyScorer", "ImageScorer", "ValidationImageScorer", "bench_columns", "row_metric", "BENCH_COLUMNS", "MODEL_COLUMNS", "BENCH_SOLVERS", "BENCH_NFES", "BenchResult", "benchmark",
           "bench_suite", "pareto_front", "pareto_table", "write_bench", "write_suite", "rows_to_markdown",
           "rows_to_csv"]

BENCH_COLUMNS = ("model", "solver", "grid", "num_steps", "nfe", "w2", "w2_floor", "mmd", "straightness",
                 "straightness_rel", "seconds", "samples_per_sec", "n", "device")
MODEL_COLUMNS = ("model", "straightness", "straightness_rel", "peak_curvature_t", "logp", "bits_per_dim",
                 "logp_nfe", "logp_n", "logp_divergence")
BENCH_SOLVERS = ("euler", "midpoint", "heun", "rk4", "dopri5", "ab2", "renoise")
BENCH_NFES = (1, 2, 3, 4, 6, 8, 16, 32)


class ToyScorer:
    """Scores samples against a fresh evaluation reference of the target (``target.reference``, exact
    mixture shares; every prefix ``ref[:m]`` an exact split too): exact ``w2`` and ``mmd`` against
    ``n`` points (seed ``seed + 1``); ``w2_floor`` is the W2 between those and ``n`` i.i.d. target
    draws (``target.sample``, seed ``seed + 2``), the stand-in for a perfect model. Not a second
    exact-split reference: a model's samples carry their own binomial split, so two exact references
    lie closer together than a perfect model gets (n = 5,000, mean of 20 draws: moons 0.148 against
    0.160, 8gaussians 0.134 against 0.264), a floor no model could reach.
    The W2 runs in a second thread while the MMD runs in this one (POT's network simplex
    releases the GIL), so a row costs the slower of the two rather than their sum; ``workers``
    rows are scored at once by :func:`bench_suite`. Neither changes a score. ``quasi=True`` (model
    selection, ``apt.eval_noise=quasi``) draws the reference as ``target.quasi(n, seed=seed + 1)``
    instead: a low-discrepancy set whose W2 to a model's samples scatters less between draws."""

    metric = "w2"
    scores = ("w2", "mmd")

    def __init__(self, target, n: int, seed: int = 0, *, workers: Optional[int] = None, quasi: bool = False):
        self.ref = (target.quasi(n, seed=seed + 1) if quasi
                    else target.reference(n, generator=make_generator(seed + 1), device="cpu"))
        self.ref2 = target.sample(n, generator=make_generator(seed + 2), device="cpu")
        self._mmd: dict = {}
        # rows :func:`bench_suite` scores at once, after its timed solves (default: torch's thread count, at most 4)
        self.workers = max(1, min(4, torch.get_num_threads())) if workers is None else max(1, int(workers))

    def floor(self, m: int) -> dict:
        floor, self._mmd[m] = _at_once(lambda: w2(self.ref[:m], self.ref2[:m]), lambda: MMDReference(self.ref[:m]))
        return {"w2_floor": floor}

    def __call__(self, x1: torch.Tensor) -> dict:
        m = x1.shape[0]
        if m not in self._mmd:
            self._mmd[m] = MMDReference(self.ref[:m])
        dist, disc = _at_once(lambda: w2(x1, self.ref[:m]), lambda: self._mmd[m](x1))
        return {"w2": dist, "mmd": disc}

    def primary(self, x1: torch.Tensor) -> float:
        """The W2 of ``__call__`` alone (no MMD), e.g. for a validation choice."""
        return w2(x1, self.ref[: x1.shape[0]])


def _at_once(first: Callable, second: Callable) -> tuple:
    """``(first(), second())``, ``first`` run in a second thread while ``second`` runs in this one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(first)
        b = second()
        return pending.result(), b


class ImageScorer:
    """Scores image samples in a classifier's feature space (:mod:`flowmatch.metrics.frechet`):
    Fréchet distance ``fd`` and ``kid`` against the reference split held by ``metrics``;
    ``fd_floor`` is the FD of ``floor_images`` (the other split, up to ``m`` of them) to it, what
    real held-out images of that size score. With ``held_out`` (feature metrics whose reference is
    the held-out split, :func:`flowmatch.evaluation.image_reference` makes them) each row also gets
    ``fd_test``, the FD against the held-out images: a generator that copies training images scores
    a low ``fd`` but not a low ``fd_test`` (see also :mod:`flowmatch.metrics.memorisation`)."""

    metric = "fd"

    def __init__(self, metrics, floor_images: torch.Tensor, seed: int = 0, held_out=None):
        self.metrics, self.floor_images, self.seed, self.held_out = metrics, floor_images, seed, held_out
        self.scores = ("fd", "kid") + (("fd_test",) if held_out is not None else ())

    def floor(self, m: int) -> dict:
        # the held-out split may hold fewer than m images: the floor says how many it used
        return {"fd_floor": self.metrics.fd(self.floor_images[:m]), "fd_floor_n": min(m, len(self.floor_images))}

    def __call__(self, x1: torch.Tensor) -> dict:
        kid, _ = self.metrics.kid(x1, generator=make_generator(self.seed))
        out = {"fd": self.metrics.fd(x1), "kid": kid}
        if self.held_out is not None:
            out["fd_test"] = self.held_out.fd(x1)
        return out

    def primary(self, x1: torch.Tensor) -> float:
        """The FD of ``__call__`` alone (no KID), e.g. for a validation choice."""
        return self.metrics.fd(x1)


class ValidationImageScorer(ImageScorer):
    """:class:`ImageScorer` against the ``val`` split (``metrics``' reference, ``val_images``) for model
    selection, with ``copies``: the memorisation check (:func:`flowmatch.metrics.memorisation.memorisation`,
    in the classifier's features) of the samples against ``fit_images``, the training images a
    ``data.split=fit`` run learns from, with the val images as the new images: the fraction of samples
    nearer a fit image than 95% of the val images are (0.05 expected of new digits, more of a
    generator drifting towards its training images)."""

    def __init__(self, metrics, val_images: torch.Tensor, fit_images: torch.Tensor, seed: int = 0):
        from flowmatch.metrics.memorisation import MemorisationReference

        super().__init__(metrics, val_images, seed)
        self.fit_images = fit_images
        self.scores = self.scores + ("copies",)
        # the fit and val images featurised, and the val images' nearest-fit distances, once
        self.copies_reference = MemorisationReference(fit_images, val_images, features=metrics.features)

    def __call__(self, x1: torch.Tensor) -> dict:
        out = super().__call__(x1)
        out["copies"] = self.copies_reference(x1.detach().cpu()).copies_fraction
        return out


def bench_columns(metric: str = "w2") -> tuple:
    """:data:`BENCH_COLUMNS` for rows scored by ``metric`` (``w2`` toy; ``fd`` images, with ``fd_test``
    after ``kid``)."""
    if metric == "w2":
        return BENCH_COLUMNS
    swap = {"w2": ("fd",), "w2_floor": ("fd_floor",), "mmd": ("kid", "fd_test")}
    return tuple(x for c in BENCH_COLUMNS for x in swap.get(c, (c,)))


@dataclass
class BenchResult:
    rows: list  # one dict per (model, solver, grid, NFE): BENCH_COLUMNS + pareto
    models: list = field(default_factory=list)  # one dict per model: MODEL_COLUMNS
    curvature: list = field(default_factory=list)  # one dict per (model, t): chord deviation, acceleration


def _settings(solvers, nfes, grids, atol, rtol, source=None):
    out = []
    for gi, g in enumerate(grids):
        for name in solvers:
            s = get_solver(name, atol=atol, rtol=rtol).for_source(source)
            if s.adaptive:
                if gi == 0:  # adaptive solvers choose their own grid: once
                    out.append((s, None, "adaptive", True))
            else:
                out += [(s, k, g, gi == 0) for k in nfes if s.steps_for_nfe(k) is not None]
    return out


def pareto_front(rows: Sequence[dict], metric: str = "w2", rtol: float = 1e-6) -> list[dict]:
    """The rows no other row beats: lower ``metric`` at no more NFE, or the same ``metric`` (to
    ``rtol``, so the float32 rounding of the samples does not split ties) at fewer NFE. Compare rows of one model and
    one ``n`` only."""
    ok = [r for r in rows if r.get(metric) == r.get(metric)]  # drop nan

    def beats(o, r) -> bool:
        tol = rtol * max(abs(o[metric]), abs(r[metric]))
        lower, same = o[metric] < r[metric] - tol, abs(o[metric] - r[metric]) <= tol
        return (o["nfe"] <= r["nfe"] and lower) or (o["nfe"] < r["nfe"] and same)

    front = [r for r in ok if not any(beats(o, r) for o in ok if o is not r)]
    return sorted(front, key=lambda r: r["nfe"])


@torch.no_grad()
def bench_suite(models: dict, source: ToyDistribution, target: ToyDistribution, *,
                solvers: Sequence[str] = BENCH_SOLVERS, nfes: Sequence[int] = BENCH_NFES,
                grids: Sequence[str] = ("uniform",), n: int = 2000, grid_n: Optional[int] = None, seed: int = 0,
                atol: float = 1e-5, rtol: float = 1e-5, straightness_n: int = 1000, likelihood_n: int = 0,
                likelihood_solver: str = "dopri5", device: str | torch.device = "cpu",
                progress: bool = True, scorer=None) -> BenchResult:
    """Benchmark every ``models[name]`` (a callable ``v(x, t)``) on every solver, grid and NFE.

    Fixed-step solvers run at each NFE in ``nfes`` that is a multiple of their stages (others are
    skipped), on each grid of ``grids`` (names of :data:`flowmatch.solvers.GRIDS`, ``power:RHO``
    for an exponent); adaptive solvers once, at ``atol``/``rtol``, reporting the NFE they used.
    Rows on ``grids[0]`` and adaptive rows use ``n`` points, the other grids ``grid_n`` (default
    ``n``). ``likelihood_n > 0`` adds the log-likelihood of that many held-out target draws per
    model (skipped, with ``logp`` None, when the source has no ``log_prob``).

    ``scorer`` scores the samples of a row (default :class:`ToyScorer`: ``w2``, ``w2_floor``,
    ``mmd``; images use :class:`ImageScorer`: ``fd``, ``fd_floor``, ``kid``); the metrics score a
    row whose samples hold a NaN or an inf (a diverged solve) NaN, with a warning. A scorer with
    ``workers > 1`` scores the rows after all solves, that many at once (no solve is timed while
    rows are scored); others score each row after its solve.

    Every argument is checked before any work: ``nfes`` integers >= 1, ``n``, ``grid_n`` and
    ``straightness_n`` >= 1, ``likelihood_n`` >= 0, tolerances > 0, known solvers and grids, and at
    least one row to run.
    """
    device = torch.device(device)
    grids = [g for g in grids]
    if not grids:
        raise ConfigError("bench needs at least one time grid")
    for i, k in enumerate(nfes):
        check_int(f"nfes[{i}]", k, 1)
    n, straightness_n = check_int("n", n, 1), check_int("straightness_n", straightness_n, 1)
    grid_n, likelihood_n = check_int("grid_n", grid_n, 1, optional=True), check_int("likelihood_n", likelihood_n, 0)
    for g in grids:
        parse_grid(g)  # unknown grids fail before any work
    for name in solvers:
        get_solver(name, atol=atol, rtol=rtol)  # unknown names and bad tolerances fail before any work
    settings = _settings(solvers, nfes, grids, atol, rtol, source)
    if not settings:
        per_step = ", ".join(f"{s.name} {s.stages}" for s in map(get_solver, solvers))
        raise ConfigError(f"bench: no row to run: no NFE of [{', '.join(map(str, nfes))}] is a multiple of the "
                          f"evaluations per step of a solver ({per_step or 'no solver given'})")
    grid_n = n if grid_n is None else grid_n
    sizes = sorted({n, grid_n})
    big = max(sizes)
    x0_all = source.sample(big, generator=make_generator(seed), device="cpu")
    if scorer is None:
        scorer = ToyScorer(target, big, seed)
    floors = {m: scorer.floor(m) for m in sizes}

    from tqdm.auto import tqdm  # lazy

    result = BenchResult(rows=[])
    deferred = []  # (row, samples) scored after the solves
    later = getattr(scorer, "workers", 1) > 1
    bar = tqdm(total=len(models) * len(settings) * (2 if later else 1), desc="bench",
               disable=None if progress else True, leave=False)
    for model_name, v in models.items():
        x0s = x0_all.to(device)
        st = straightness(v, x0s[:straightness_n])
        peak = max(range(len(st.accel_per_t)), key=lambda i: st.accel_per_t[i])
        info = {"model": model_name, "straightness": st.straightness, "straightness_rel": st.straightness_rel,
                "peak_curvature_t": st.accel_ts[peak], "logp": None, "bits_per_dim": None, "logp_nfe": None,
                "logp_n": None, "logp_divergence": None}
        # a class-conditional field (labels i % K) would condition held-out images on the wrong classes
        if likelihood_n > 0 and hasattr(source, "log_prob") and not getattr(v, "conditional", False):
            from flowmatch.metrics.likelihood import log_likelihood  # lazy: only when asked for

            held_out = target.sample(likelihood_n, generator=make_generator(seed + 3), device="cpu").to(device)
            lk = log_likelihood(v, held_out, source.log_prob, solver=likelihood_solver, atol=atol, rtol=rtol)
            info.update(logp=lk.mean, bits_per_dim=lk.bits_per_dim, logp_nfe=lk.nfe, logp_n=likelihood_n,
                        logp_divergence=lk.divergence)
        result.models.append(info)
        result.curvature += [{"model": model_name, "t": t, "chord_deviation": c, "acceleration": None}
                             for t, c in zip(st.ts, st.per_t)]
        result.curvature += [{"model": model_name, "t": t, "chord_deviation": None, "acceleration": a}
                             for t, a in zip(st.accel_ts, st.accel_per_t)]
        for s, nfe, grid, headline in settings:
            m = n if headline else grid_n
            x0 = x0s[:m]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            traj = solve(v, x0, s) if s.adaptive else solve(v, x0, s, nfe=nfe, grid=grid)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            x1 = traj.x1.float().cpu()
            row = {
                "model": model_name, "solver": s.name, "grid": grid,
                "num_steps": num_steps_for(s, nfe), "nfe": traj.nfe,
                **dict.fromkeys(scorer.scores, float("nan")), **floors[m],
                "straightness": st.straightness, "straightness_rel": st.straightness_rel, "logp": info["logp"],
                "seconds": seconds, "samples_per_sec": m / max(seconds, 1e-12), "n": m, "device": str(device),
            }
            # a diverged solve (a NaN or inf sample) is scored NaN by the metrics themselves
            # (flowmatch.metrics.guard), with a warning
            if later:
                deferred.append((row, x1))
            else:
                row.update(scorer(x1))
            result.rows.append(row)
            bar.update(1)
    if deferred:
        with ThreadPoolExecutor(max_workers=scorer.workers) as pool:
            for (row, _), scores in zip(deferred, pool.map(lambda item: scorer(item[1]), deferred)):
                row.update(scores)
                bar.update(1)
    bar.close()
    for model_name in models:
        for m in sizes:
            rows = [r for r in result.rows if r["model"] == model_name and r["n"] == m]
            front = pareto_front(rows, scorer.metric)
            for r in rows:
                r["pareto"] = any(r is f for f in front)
    return result


def benchmark(models: dict, source: ToyDistribution, target: ToyDistribution, *,
              solvers: Sequence[str] = ("euler", "midpoint", "heun", "rk4", "dopri5"),
              nfes: Sequence[int] = (1, 2, 4, 8, 16), n: int = 2000, seed: int = 0, grid: str = "uniform",
              atol: float = 1e-5, rtol: float = 1e-5, straightness_n: int = 1000, device: str | torch.device = "cpu",
              progress: bool = True, scorer=None) -> list[dict]:
    """The rows of :func:`bench_suite` on one time ``grid`` (all at ``n`` points), without likelihood."""
    return bench_suite(models, source, target, solvers=solvers, nfes=nfes, grids=(grid,), n=n, seed=seed,
                       atol=atol, rtol=rtol, straightness_n=straightness_n, device=device, progress=progress,
                       scorer=scorer).rows


def row_metric(rows: Sequence[dict]) -> str:
    """``fd`` for rows of image samples, else ``w2``."""
    return "fd" if rows and "fd" in rows[0] else "w2"


def pareto_table(rows: Sequence[dict], budgets: Sequence[int] = BENCH_NFES, *, metric: Optional[str] = None) -> str:
    """Markdown: per model, the best ``metric`` reachable within each NFE budget, with the solver
    and grid that reach it (on the rows of the model's largest ``n``), and the adaptive row."""
    metric = metric or row_metric(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    head = ["model", "n", "floor"] + [f"NFE <= {b}" for b in budgets] + ["adaptive (NFE)"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for model in models:
        rs = [r for r in rows if r["model"] == model]
        m = max(r["n"] for r in rs)
        rs = [r for r in rs if r["n"] == m and r.get(metric) == r.get(metric)]
        fixed = [r for r in rs if r["grid"] != "adaptive"]
        cells = [model, str(m), _fmt(rs[0].get(f"{metric}_floor")) if rs else "-"]
        for b in budgets:
            cand = [r for r in fixed if r["nfe"] <= b]
            if cand:
                lo = min(r[metric] for r in cand)  # ties (to 1e-6) go to the cheaper row
                best = min((r for r in cand if r[metric] <= lo + 1e-6 * abs(lo)), key=lambda r: (r["nfe"], r[metric]))
                cells.append(f"{best[metric]:.3f} {best['solver']}/{best['grid']}@{best['nfe']}")
            else:
                cells.append("-")
        ad = [r for r in rs if r["grid"] == "adaptive"]
        cells.append(f"{ad[0][metric]:.3f} {ad[0]['solver']} ({ad[0]['nfe']})" if ad else "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}"
    return str(v)


def rows_to_markdown(rows: Iterable[dict], columns: Optional[Sequence[str]] = None) -> str:
    rows = list(rows)
    if not rows:
        return ""
    cols = list(columns or rows[0].keys())
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def rows_to_csv(rows: Iterable[dict], columns: Optional[Sequence[str]] = None) -> str:
    rows = list(rows)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(columns or rows[0].keys()), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def write_bench(rows: list[dict], out_dir: str, *, plot: bool = True, name: str = "bench",
                columns: Optional[Sequence[str]] = None) -> dict:
    """Write ``{name}.json`` (every key), ``{name}.csv`` and ``{name}.md`` (``columns``, default
    :data:`BENCH_COLUMNS`) and (``plot``) ``{name}_w2_vs_nfe.png``.

    Returns the paths written. ``name`` is a bare file name (no path separator).
    """
    from flowmatch.io import atomic_write_text

    check_file_name("name", name)

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "csv": os.path.join(out_dir, f"{name}.csv"),
             "md": os.path.join(out_dir, f"{name}.md")}
    atomic_write_text(paths["json"], json.dumps(rows, indent=1))
    metric = row_metric(rows)
    columns = columns or bench_columns(metric)
    atomic_write_text(paths["csv"], rows_to_csv(rows, columns))
    atomic_write_text(paths["md"], rows_to_markdown(rows, columns))
    if plot:
        from flowmatch.viz import plot_w2_vs_nfe

        paths["plot"] = os.path.join(out_dir, f"{name}_{metric}_vs_nfe.png")
        plot_w2_vs_nfe(rows, paths["plot"], metric=metric)
    return paths


def write_suite(result: BenchResult, out_dir: str, *, plot: bool = True, name: str = "bench") -> dict:
    """Write :func:`write_bench`'s files for ``result.rows`` (with a ``pareto`` column), plus
    ``models.json``/``.md`` (per-model straightness, curvature peak, log-likelihood),
    ``curvature.json``, ``pareto.md`` and (``plot``) ``{name}_pareto.png`` and ``{name}_curvature.png``
    (``name`` is checked by :func:`write_bench`, the first writer)."""
    from flowmatch.io import atomic_write_text

    metric = row_metric(result.rows)
    cols = tuple(bench_columns(metric)) + ("pareto",)
    paths = write_bench(result.rows, out_dir, plot=False, name=name, columns=cols)
    paths["models"] = os.path.join(out_dir, "models.json")
    atomic_write_text(paths["models"], json.dumps(result.models, indent=1))
    atomic_write_text(os.path.join(out_dir, "models.md"), rows_to_markdown(result.models, MODEL_COLUMNS))
    paths["curvature"] = os.path.join(out_dir, "curvature.json")
    atomic_write_text(paths["curvature"], json.dumps(result.curvature, indent=1))
    paths["pareto_md"] = os.path.join(out_dir, "pareto.md")
    atomic_write_text(paths["pareto_md"], pareto_table(result.rows))
    if plot:
        from flowmatch.viz import plot_curvature_by_t, plot_pareto

        paths["pareto_plot"] = plot_pareto(result.rows, os.path.join(out_dir, f"{name}_pareto.png"), metric=metric)
        paths["curvature_plot"] = plot_curvature_by_t(result.curvature, os.path.join(out_dir, f"{name}_curvature.png"))
    return paths
