"""Line and bar figures from table rows: quality against NFE with the noise floor as a band, the
Pareto panels, curvature against t, loss per t-bin, straightness per stage; the few-step table's
methods against NFE and against training cost."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from flowmatch.errors import FlowmatchError
from flowmatch.viz._style import FLOOR_COLOR, LINESTYLES, MARKERS, PALETTE, figure, save, style

__all__ = ["FloorBand", "floor_band", "plot_quality_vs_nfe", "plot_w2_vs_nfe", "plot_pareto",
           "plot_curvature_by_t", "plot_loss_by_t", "plot_straightness_by_stage", "plot_method_quality_vs_nfe",
           "plot_method_quality_vs_cost"]


@dataclass(frozen=True)
class FloorBand:
    """The noise floor's sampling spread: the metric between two independent target draws of ``n``
    points lies in ``[lo, hi]`` (``mid`` its mean) over ``draws`` such pairs."""

    lo: float
    hi: float
    mid: float
    n: int
    draws: int

    @property
    def label(self) -> str:
        return f"noise floor, n = {self.n}: {self.draws} draws, min-max"


def floor_band(values: Sequence[float], n: int) -> FloorBand:
    """The :class:`FloorBand` of the floor values ``values`` measured on ``n`` points each."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        raise FlowmatchError("floor_band: no finite floor values")
    return FloorBand(min(vals), max(vals), sum(vals) / len(vals), int(n), len(vals))


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _series_key(rows: Sequence[dict]) -> str:
    return "stage" if rows and all("stage" in r for r in rows) else "model"


def _nfe_axis(ax, nfes: Sequence[float]) -> None:
    ax.set_xscale("log", base=2)
    ticks = [2 ** k for k in range(0, 12) if nfes and min(nfes) / 1.5 <= 2 ** k <= max(nfes) * 1.5]
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("NFE (function evaluations per sample)")
    ax.grid(alpha=0.3, which="major")


def _log_y(ax) -> None:
    """Log y with labelled ticks at 1, 2 and 5 times the powers of ten (a short range spans no
    decade, and bare minor ticks give no scale)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _finish_vs_nfe(fig, ax, rows: Sequence[dict], path: str, *, metric: str, floor: Optional[FloorBand],
                   title: Optional[str]) -> str:
    """The common ending of a metric-against-NFE figure of ``rows``: the floor, log axes, labels, the
    legend outside on the right; saved to ``path``."""
    _draw_floor(ax, rows, metric, floor)
    _log_y(ax)
    _nfe_axis(ax, [r["nfe"] for r in rows])
    ax.set_ylabel(metric.upper())
    if title:
        ax.set_title(title, fontsize=10)
    if rows:
        fig.legend(*ax.get_legend_handles_labels(), fontsize=7.5, loc="outside right upper", frameon=False)
    return save(fig, path)


def _draw_floor(ax, rows: Sequence[dict], metric: str, floor: Optional[FloorBand]) -> None:
    if floor is not None:
        ax.axhspan(floor.lo, floor.hi, color=FLOOR_COLOR, alpha=0.3, lw=0, zorder=0, label=floor.label)
        ax.axhline(floor.mid, color=FLOOR_COLOR, lw=0.8, zorder=0)
        return
    stored = sorted({(r.get("n"), r[f"{metric}_floor"]) for r in rows if _finite(r.get(f"{metric}_floor"))},
                    key=lambda p: p[1])
    if len(stored) > 1:  # floors of several sizes: the band they span
        ax.axhspan(stored[0][1], stored[-1][1], color=FLOOR_COLOR, alpha=0.3, lw=0, zorder=0,
                   label=f"noise floor ({len(stored)} stored values)")
    elif stored:  # one stored draw: no spread to show, so a line that says so
        ax.axhline(stored[0][1], color=FLOOR_COLOR, lw=1.2, ls=(0, (4, 2)), zorder=0,
                   label=f"noise floor (one draw{f', n = {stored[0][0]}' if stored[0][0] else ''})")


def plot_quality_vs_nfe(rows: Sequence[dict], path: str, *, metric: str = "w2", series: Optional[str] = None,
                        floor: Optional[FloorBand] = None, title: Optional[str] = None,
                        px: Optional[tuple[int, int]] = None) -> str:
    """``metric`` (e.g. ``w2``, ``fd``) against NFE on log-log axes: a line per series (the rows'
    ``series`` key, default ``stage`` when every row has one, else ``model``) and fixed-step
    solver and time grid (colour and marker per series, line style per solver/grid); adaptive solves (``grid ==
    "adaptive"``) as large hollow markers at the NFE they measured; the noise floor as a grey band
    (``floor``, its spread over several draws; without it the rows' stored ``{metric}_floor``
    values: a band over several, a dashed line labelled "one draw" for a single one)."""
    key = series or _series_key(rows)
    rows = [r for r in rows if _finite(r.get(metric)) and _finite(r.get("nfe"))]
    names = list(dict.fromkeys(r[key] for r in rows))
    # a line per fixed-step (solver, time grid); the grid named only when the rows hold several
    lines = list(dict.fromkeys((r["solver"], r.get("grid")) for r in rows if r.get("grid") != "adaptive"))
    grids = len({g for _, g in lines}) > 1
    many = len(lines) > 1
    fig, ax = figure(px, (7.2 if many or len(names) > 3 else 6.4, 3.8))
    for i, name in enumerate(names):
        st = style(i)
        for j, (solver, grid) in enumerate(lines):
            line = sorted((r for r in rows if r[key] == name and r["solver"] == solver and r.get("grid") == grid),
                          key=lambda r: r["nfe"])
            what = f"{solver} {grid}" if grids else solver
            if line:
                ax.plot([r["nfe"] for r in line], [r[metric] for r in line], color=st["color"], marker=st["marker"],
                        ms=4.5, lw=1.6, ls=LINESTYLES[j % len(LINESTYLES)] if many else st["ls"],
                        label=f"{name} {what}" if many else f"{name} ({what})")
        for r in (r for r in rows if r[key] == name and r.get("grid") == "adaptive"):
            ax.plot([r["nfe"]], [r[metric]], ls="none", marker=st["marker"], ms=10, mfc="white", mec=st["color"],
                    mew=2, label=f"{name} {r['solver']} (measured NFE)", zorder=4)
    return _finish_vs_nfe(fig, ax, rows, path, metric=metric, floor=floor, title=title)


def plot_w2_vs_nfe(rows: Sequence[dict], path: str, *, metric: str = "w2", floor: Optional[FloorBand] = None,
                   title: Optional[str] = None, px: Optional[tuple[int, int]] = None) -> str:
    """:func:`plot_quality_vs_nfe` with a line per ``model``."""
    return plot_quality_vs_nfe(rows, path, metric=metric, series="model", floor=floor, title=title, px=px)


def plot_pareto(rows: Sequence[dict], path: str, *, metric: str = "w2", title: Optional[str] = None,
                px: Optional[tuple[int, int]] = None) -> str:
    """Quality against NFE, one panel per model and one line per (solver, grid) in it; adaptive
    solvers as large hollow markers at the NFE they used; the noise floor of each ``n`` dashed; the
    model's Pareto front (rows flagged ``pareto``) circled."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = max(1, min(4, len(models)))  # no rows: one empty panel
    nrows = max(1, (len(models) + cols - 1) // cols)
    fig, axes = figure(px, (3.6 * cols + 1.6, 3.0 * nrows + 0.4), nrows=nrows, ncols=cols, squeeze=False,
                       sharey=True)
    grids = list(dict.fromkeys(r["grid"] for r in rows if r["grid"] != "adaptive"))
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    for ax, model in zip(axes.flat, models):
        rs = [r for r in rows if r["model"] == model and _finite(r.get(metric))]
        for solver in dict.fromkeys(r["solver"] for r in rs):
            k = solvers.index(solver)
            color, marker = PALETTE[k % len(PALETTE)], MARKERS[k % len(MARKERS)]
            for grid in dict.fromkeys(r["grid"] for r in rs if r["solver"] == solver):
                line = sorted((r for r in rs if r["solver"] == solver and r["grid"] == grid), key=lambda r: r["nfe"])
                xs, ys = [r["nfe"] for r in line], [r[metric] for r in line]
                if grid == "adaptive":
                    ax.plot(xs, ys, marker=marker, ls="none", ms=9, mfc="white", mec=color, mew=2, label=solver)
                else:
                    ls = LINESTYLES[grids.index(grid) % len(LINESTYLES)]
                    ax.plot(xs, ys, marker=marker, ms=3, ls=ls, lw=1.2, color=color, label=f"{solver} {grid}")
        front = [r for r in rs if r.get("pareto")]
        ax.scatter([r["nfe"] for r in front], [r[metric] for r in front], s=70, facecolors="none",
                   edgecolors="black", lw=0.8, zorder=4, label="Pareto front")
        for n_, fl in sorted({(r.get("n"), r[f"{metric}_floor"]) for r in rs if _finite(r.get(f"{metric}_floor"))}):
            ax.axhline(fl, color=FLOOR_COLOR, lw=1, ls=(0, (4, 2)))
            ax.text(1, fl, f" floor n={n_}", fontsize=6.5, va="bottom", color="#555555")
        _log_y(ax)
        _nfe_axis(ax, [r["nfe"] for r in rs])
        ax.set_title(model, fontsize=9)
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    axes[0][0].set_ylabel(metric.upper())
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=10)
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="outside right upper", frameon=False)
    return save(fig, path)


def plot_curvature_by_t(curvature: Sequence[dict], path: str, *, title: Optional[str] = None,
                        px: Optional[tuple[int, int]] = None) -> str:
    """Where trajectories bend: the chord deviation ``E||(Z1 - Z0) - v(Z_t, t)||^2`` and the
    acceleration ``E||dv/dt||^2`` against t, one line per model (log y)."""
    fig, axes = figure(px, (10, 3.6), ncols=2)
    models = list(dict.fromkeys(r["model"] for r in curvature))
    for key, ax, label in (("chord_deviation", axes[0], "E|(Z1 - Z0) - v(Z_t, t)|^2"),
                           ("acceleration", axes[1], "E|dv(Z_t, t)/dt|^2")):
        for i, model in enumerate(models):
            rs = [r for r in curvature if r["model"] == model and r.get(key) is not None]
            st = style(i)
            ax.plot([r["t"] for r in rs], [max(r[key], 1e-12) for r in rs], lw=1.4, color=st["color"], ls=st["ls"],
                    marker=st["marker"], ms=3, markevery=max(1, len(rs) // 8), label=model)
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="major")
    if models:
        axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path)


def plot_loss_by_t(losses: Sequence[float], path: str, *, title: Optional[str] = None,
                   px: Optional[tuple[int, int]] = None) -> str:
    """Bar plot of the loss in each of the equal t-bins."""
    k = len(losses)
    fig, ax = figure(px, (4.5, 3))
    ax.bar([(i + 0.5) / k for i in range(k)], losses, width=0.9 / max(k, 1), color=PALETTE[0])
    ax.set_xlabel("t")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=9)
    return save(fig, path)


def plot_straightness_by_stage(rows: Sequence[dict], path: str, *, title: Optional[str] = None,
                               px: Optional[tuple[int, int]] = None) -> str:
    """Straightness S of each stage (log scale), from stage-table rows (one value per stage)."""
    per_stage = {}
    for r in rows:
        per_stage.setdefault(r["stage"], r["straightness"])
    fig, ax = figure(px, (1.4 + 1.1 * len(per_stage), 3.2))
    ax.bar(list(per_stage), [max(v, 1e-12) for v in per_stage.values()], color=PALETTE[0])
    ax.set_yscale("log")
    ax.set_ylabel("straightness S")
    for i, v in enumerate(per_stage.values()):
        ax.text(i, max(v, 1e-12), f"{v:.2g}", ha="center", va="bottom", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save(fig, path)


def _method_points(points: Sequence[dict], metric: str) -> tuple[list, list]:
    pts = [p for p in points if _finite(p.get(metric)) and _finite(p.get("nfe"))]
    return pts, list(dict.fromkeys(p["method"] for p in pts))


def plot_method_quality_vs_nfe(points: Sequence[dict], path: str, *, metric: str = "w2",
                               title: Optional[str] = None, px: Optional[tuple[int, int]] = None) -> str:
    """``metric`` against NFE (log-log), one line per method through its best row at each NFE (``points``:
    ``{method, nfe, <metric>, ...}``, e.g. :func:`flowmatch.few_step.few_step_best`), lower-left is better;
    the noise floor of the points' ``{metric}_floor`` when they carry one."""
    pts, methods = _method_points(points, metric)
    fig, ax = figure(px, (6.8, 3.8))
    for i, m in enumerate(methods):
        st = style(i)
        line = sorted((p for p in pts if p["method"] == m), key=lambda p: p["nfe"])
        ax.plot([p["nfe"] for p in line], [p[metric] for p in line], color=st["color"], marker=st["marker"],
                ls=st["ls"], ms=5, lw=1.6, label=m)
    return _finish_vs_nfe(fig, ax, pts, path, metric=metric, floor=None, title=title)


def plot_method_quality_vs_cost(points: Sequence[dict], path: str, *, metric: str = "w2", cost: str = "wall_s",
                                title: Optional[str] = None, px: Optional[tuple[int, int]] = None) -> str:
    """``metric`` against a method's training cost (``cost``: ``wall_s`` or ``steps``, cumulative from its
    teacher), one colour and marker per method; a method's NFE budgets share its cost, so they stand in a
    column joined by a thin line, each labelled with its NFE. Log axes (the cost axis symmetric-log when a
    cost is 0: a teacher given, not trained)."""
    pts, methods = _method_points(points, metric)
    pts = [p for p in pts if _finite(p.get(cost))]
    fig, ax = figure(px, (6.8, 3.8))
    for i, m in enumerate(methods):
        st = style(i)
        col = sorted((p for p in pts if p["method"] == m), key=lambda p: p["nfe"])
        if not col:
            continue
        ax.plot([p[cost] for p in col], [p[metric] for p in col], color=st["color"], lw=0.8, alpha=0.6)
        ax.plot([p[cost] for p in col], [p[metric] for p in col], ls="none", color=st["color"], marker=st["marker"],
                ms=5, label=m)
        for p in col:
            ax.annotate(str(p["nfe"]), (p[cost], p[metric]), xytext=(4, 0), textcoords="offset points", fontsize=6.5,
                        va="center", color=st["color"])
    _draw_floor(ax, pts, metric, None)
    _log_y(ax)
    if pts and min(p[cost] for p in pts) > 0:
        ax.set_xscale("log")
    else:
        ax.set_xscale("symlog", linthresh=1.0)
    from matplotlib.ticker import FuncFormatter

    for fmt in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):  # 30, not 3 x 10^1
        fmt(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel({"wall_s": "training cost (wall seconds, from the teacher on)",
                   "steps": "training cost (optimiser steps, from the teacher on)"}.get(cost, cost))
    ax.set_ylabel(metric.upper() + " (labels: NFE)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if pts:
        fig.legend(*ax.get_legend_handles_labels(), fontsize=7.5, loc="outside right upper", frameon=False)
    return save(fig, path)
