"""Solver x NFE x model benchmark -> rows ready for CSV, JSON, markdown and ``wandb.Table``.

Every row is one (model, solver, NFE) setting, sampled from the same source draws (fixed seed) and
scored against the same fresh target draws: W2 (exact, on ``n`` points), MMD, the wall time of the
solve and samples/s. ``w2_floor`` is the W2 between two independent target draws of the same size
(the noise floor no sampler can beat on n points). Straightness is a property of the model, so it
is computed once per model (RK4, 64 steps) and repeated on its rows.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from typing import Iterable, Optional, Sequence

import torch

from flowmatch.data import ToyDistribution
from flowmatch.metrics import mmd, straightness, w2
from flowmatch.solvers import get_solver, solve
from flowmatch.utils import make_generator

__all__ = ["BENCH_COLUMNS", "benchmark", "write_bench", "rows_to_markdown", "rows_to_csv"]

BENCH_COLUMNS = ("model", "solver", "grid", "num_steps", "nfe", "w2", "w2_floor", "mmd", "straightness",
                 "straightness_rel", "seconds", "samples_per_sec", "n", "device")


@torch.no_grad()
def benchmark(models: dict, source: ToyDistribution, target: ToyDistribution, *,
              solvers: Sequence[str] = ("euler", "midpoint", "heun", "rk4", "dopri5"),
              nfes: Sequence[int] = (1, 2, 4, 8, 16), n: int = 2000, seed: int = 0, grid: str = "uniform",
              atol: float = 1e-5, rtol: float = 1e-5, straightness_n: int = 1000, device: str | torch.device = "cpu",
              progress: bool = True) -> list[dict]:
    """Benchmark every ``models[name]`` (a callable ``v(x, t)``) on every solver and NFE.

    Fixed-step solvers are run at each NFE in ``nfes`` that is a multiple of their stages (others
    are skipped); adaptive solvers once, at ``atol``/``rtol``, reporting the NFE they used.
    """
    device = torch.device(device)
    for name in solvers:
        get_solver(name)  # unknown names fail before any work
    x0 = source.sample(n, generator=make_generator(seed), device="cpu").to(device)
    ref = target.sample(n, generator=make_generator(seed + 1), device="cpu")
    ref2 = target.sample(n, generator=make_generator(seed + 2), device="cpu")
    w2_floor = w2(ref, ref2)
    settings = []
    for solver in solvers:
        s = get_solver(solver, atol=atol, rtol=rtol)
        if s.adaptive:
            settings.append((s, None))
        else:
            settings += [(s, k) for k in nfes if s.steps_for_nfe(k) is not None]

    from tqdm.auto import tqdm  # lazy

    rows: list[dict] = []
    bar = tqdm(total=len(models) * len(settings), desc="bench", disable=None if progress else True, leave=False)
    for model_name, v in models.items():
        st = straightness(v, x0[:straightness_n])
        for s, nfe in settings:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if s.adaptive:
                traj = solve(v, x0, s)
            else:
                traj = solve(v, x0, s, nfe=nfe, grid=grid)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            x1 = traj.x1.float().cpu()
            finite = bool(torch.isfinite(x1).all())
            rows.append({
                "model": model_name, "solver": s.name, "grid": "adaptive" if s.adaptive else grid,
                "num_steps": None if s.adaptive else s.steps_for_nfe(nfe), "nfe": traj.nfe,
                "w2": w2(x1, ref) if finite else float("nan"), "w2_floor": w2_floor,
                "mmd": mmd(x1, ref) if finite else float("nan"),
                "straightness": st.straightness, "straightness_rel": st.straightness_rel,
                "seconds": seconds, "samples_per_sec": n / max(seconds, 1e-12), "n": n, "device": str(device),
            })
            bar.update(1)
    bar.close()
    return rows


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

    Returns the paths written.
    """
    from flowmatch.training.checkpoint import atomic_write_text

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "csv": os.path.join(out_dir, f"{name}.csv"),
             "md": os.path.join(out_dir, f"{name}.md")}
    atomic_write_text(paths["json"], json.dumps(rows, indent=1))
    atomic_write_text(paths["csv"], rows_to_csv(rows, columns or BENCH_COLUMNS))
    atomic_write_text(paths["md"], rows_to_markdown(rows, columns or BENCH_COLUMNS))
    if plot:
        from flowmatch.viz import plot_w2_vs_nfe

        paths["plot"] = os.path.join(out_dir, f"{name}_w2_vs_nfe.png")
        plot_w2_vs_nfe(rows, paths["plot"])
    return paths
