"""2-D figures: trajectories per stage over the source and target densities, samples over the
target density (one panel per model, or a grid of models x solvers), all at equal scale on shared
limits, sized to their panels so no empty band is left."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from flowmatch.errors import FlowmatchError
from flowmatch.viz._style import (PALETTE, SOURCE_COLOR, TARGET_COLOR, aspect, check_px, density, figure, fit,
                                  frame, limits, points, save)

__all__ = ["plot_trajectory_grid", "plot_trajectories", "plot_samples", "plot_sample_grid"]

PANEL_IN = 3.4  # a panel's width in inches (340 px) when the caller gives no px
_HEAD_IN = 0.32  # a panel title's height
_TITLE_IN = 0.4  # the figure title's
_LEGEND_IN = 0.35


def _grid(nrows: int, ncols: int, lims, px, *, title: bool, legend: bool = False, left_in: float = 0.0,
          panel_in: float = PANEL_IN):
    """A figure of ``nrows`` x ``ncols`` equal-scale panels whose height follows the limits' aspect
    (so the panels fill it), and its ``[nrows, ncols]`` axes."""
    # 15 % taller than the panels need: the width binds, and :func:`fit` then takes the height's slack
    w = left_in + panel_in * ncols
    h = 1.15 * nrows * (panel_in * aspect(lims) + _HEAD_IN) + (_TITLE_IN if title else 0) + (_LEGEND_IN if legend else 0)
    fig, axes = figure(px, (w, h), nrows=nrows, ncols=ncols, squeeze=False)
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    return fig, axes


def _fmt(v: float) -> str:
    return f"{v:.2g}" if abs(v) < 0.01 else f"{v:.3g}"


def _paths(ax, xs: torch.Tensor, highlight: int) -> None:
    """Trajectories ``xs`` ``[T, B, 2]``: grey paths, hollow start points (t = 0), filled end points
    (t = 1); the first ``highlight`` in the palette's colours, drawn thicker on top, so the same
    source point can be followed from panel to panel."""
    xs = xs.detach().float().cpu()
    ax.plot(xs[:, :, 0], xs[:, :, 1], color="#303030", lw=0.8, alpha=0.7, zorder=2, solid_capstyle="round")
    ax.scatter(xs[0, :, 0], xs[0, :, 1], s=12, facecolors="white", edgecolors="#303030", lw=0.7, zorder=3)
    ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=9, color="#000000", zorder=3, lw=0)
    for i in range(min(highlight, xs.shape[1])):
        c = PALETTE[i % len(PALETTE)]
        ax.plot(xs[:, i, 0], xs[:, i, 1], color="white", lw=3.2, zorder=4, solid_capstyle="round")
        ax.plot(xs[:, i, 0], xs[:, i, 1], color=c, lw=1.8, zorder=5, solid_capstyle="round")
        ax.scatter(xs[0, i, 0], xs[0, i, 1], s=26, facecolors="white", edgecolors=c, lw=1.4, zorder=6)
        ax.scatter(xs[-1, i, 0], xs[-1, i, 1], s=26, color=c, edgecolors="white", lw=0.6, zorder=6)


def _finish(fig, path: str, title: Optional[str], px, *, target: bool) -> str:
    """The samples figures' legend (the target density), title and size, then save."""
    _legend(fig, source=False, target=target, paths=False)
    if title:
        fig.suptitle(title, fontsize=11)
    if px is None:
        fit(fig)
    return save(fig, path)


def _legend(fig, *, source: bool, target: bool, paths: bool, panels: int = 2) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    h = []
    if target:
        h.append(Patch(color=TARGET_COLOR, alpha=0.45, label="target density"))
    if source:
        h.append(Patch(color=SOURCE_COLOR, alpha=0.45, label="source density"))
    if paths:
        h += [Line2D([], [], color="#303030", marker="o", mfc="white", ms=4, lw=0.8, label="start (t = 0)"),
              Line2D([], [], color="black", marker="o", ms=3.5, ls="none", label="end (t = 1)")]
    if h:
        fig.legend(handles=h, loc="outside lower center", ncols=min(len(h), 2 * panels), fontsize=8, frameon=False)


def plot_trajectory_grid(trajs: Mapping[str, torch.Tensor], path: str, *, target: Optional[torch.Tensor] = None,
                         source: Optional[torch.Tensor] = None, straightness: Optional[Mapping[str, float]] = None,
                         n: int = 40, highlight: int = 3, ncols: Optional[int] = None, title: Optional[str] = None,
                         px: Optional[tuple[int, int]] = None) -> str:
    """One panel per ``{label: xs [T, B, 2]}`` (the same source points ``xs[0]`` in every panel):
    the first ``n`` trajectories over the ``target`` density (``[N, 2]`` draws, e.g. 20k) and the
    ``source``'s, at equal scale on limits shared by every panel; ``straightness[label]`` (S, the
    mean squared deviation from the straight line, 0 for straight paths) in the panel's title.
    ``ncols`` panels a row (default: all in one row); ``px`` the PNG's ``(width, height)``."""
    check_px(px)
    if not trajs:
        raise FlowmatchError("plot_trajectory_grid: no trajectories to draw")
    trajs = {k: v[:, :n] for k, v in trajs.items()}
    for k, v in trajs.items():
        if v.dim() != 3 or v.shape[-1] != 2:
            raise FlowmatchError(f"plot_trajectory_grid: trajectories {k!r} have shape {tuple(v.shape)}, "
                                 f"expected [T, B, 2]")
    target = points(target, "target") if target is not None else None
    source = points(source, "source") if source is not None else None
    clouds = [v[[0, -1]] for v in trajs.values()] + [c for c in (target, source) if c is not None]
    lims = limits(clouds, q=0.998)
    ncols = min(ncols or len(trajs), len(trajs))
    nrows = -(-len(trajs) // ncols)
    fig, axes = _grid(nrows, ncols, lims, px, title=bool(title), legend=True)
    for ax, (label, xs) in zip(axes.flat, trajs.items()):
        if source is not None:
            density(ax, source, lims, SOURCE_COLOR, strength=0.6)
        if target is not None:
            density(ax, target, lims, TARGET_COLOR)
        _paths(ax, xs, highlight)
        s = (straightness or {}).get(label)
        ax.set_title(f"{label}   S = {_fmt(s)}" if s is not None else label, fontsize=10)
        frame(ax, lims)
    for ax in axes.flat[len(trajs):]:
        ax.axis("off")
    _legend(fig, source=source is not None, target=target is not None, paths=True, panels=ncols)
    if title:
        fig.suptitle(title, fontsize=11)
    if px is None:
        fit(fig)
    return save(fig, path)


def plot_trajectories(xs: torch.Tensor, path: str, *, n: int = 40, title: Optional[str] = None,
                      target: Optional[torch.Tensor] = None, source: Optional[torch.Tensor] = None,
                      px: Optional[tuple[int, int]] = None) -> str:
    """One panel of the first ``n`` trajectories ``xs`` ``[T, B, 2]`` over the ``target`` and
    ``source`` densities (``[N, 2]`` draws each, optional)."""
    return plot_trajectory_grid({"": xs}, path, target=target, source=source, n=n, title=title, px=px)


def plot_samples(panels: Mapping[str, torch.Tensor], path: str, *, title: Optional[str] = None,
                 max_points: int = 4000, target: Optional[torch.Tensor] = None,
                 px: Optional[tuple[int, int]] = None) -> str:
    """One panel per ``{label: [n, 2]}`` at equal scale on shared limits, the first ``max_points``
    of each as dots, over the ``target`` density (``[N, 2]`` draws) when given."""
    check_px(px)
    if not panels:
        raise FlowmatchError("plot_samples: no panels to draw")
    panels = {k: points(v, k)[:max_points] for k, v in panels.items()}
    target = points(target, "target") if target is not None else None
    lims = limits(list(panels.values()) + ([target] if target is not None else []))
    fig, axes = _grid(1, len(panels), lims, px, title=bool(title), legend=target is not None)
    for ax, (label, x) in zip(axes[0], panels.items()):
        if target is not None:
            density(ax, target, lims, TARGET_COLOR)
        ax.scatter(x[:, 0], x[:, 1], s=2, color="black", alpha=0.55, lw=0, zorder=2)
        ax.set_title(label, fontsize=10)
        frame(ax, lims)
    return _finish(fig, path, title, px, target=target is not None)


def plot_sample_grid(samples: Mapping[str, Mapping[str, torch.Tensor]], path: str, *,
                     target: Optional[torch.Tensor] = None, notes: Optional[Mapping[str, Mapping[str, str]]] = None,
                     max_points: int = 2000, title: Optional[str] = None,
                     px: Optional[tuple[int, int]] = None) -> str:
    """Samples against the target: a row per model (e.g. a reflow stage) and a column per solve
    (e.g. Euler NFE 1, 2, 4 and dopri5), ``samples[row][column]`` ``[n, 2]`` as dots over the
    ``target`` density, all panels at equal scale on shared limits; ``notes[row][column]`` (e.g.
    ``"W2 0.41"``) in the panel's corner. Rows may name their columns differently (an adaptive
    solve's NFE), and the panels take the row's order of columns; column titles are drawn on the
    top row, and below it only where a row's column differs."""
    check_px(px)
    if not samples or not any(samples.values()):
        raise FlowmatchError("plot_sample_grid: no samples to draw")
    rows = {r: {c: points(x, f"{r}/{c}")[:max_points] for c, x in cols.items()} for r, cols in samples.items()}
    target = points(target, "target") if target is not None else None
    clouds = [x for cols in rows.values() for x in cols.values()] + ([target] if target is not None else [])
    lims = limits(clouds, q=0.995)
    ncols = max(len(c) for c in rows.values())
    fig, axes = _grid(len(rows), ncols, lims, px, title=bool(title), legend=target is not None, left_in=0.3,
                      panel_in=2.5)
    first = next(iter(rows.values()))
    for i, (r, cols) in enumerate(rows.items()):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(cols):
                ax.axis("off")
                continue
            c, x = list(cols.items())[j]
            if target is not None:
                density(ax, target, lims, TARGET_COLOR)
            ax.scatter(x[:, 0], x[:, 1], s=1.5, color="black", alpha=0.5, lw=0, zorder=2)
            top = list(first)[j] if j < len(first) else None
            if i == 0 or c != top:  # the top row names the columns; a row whose column differs says so
                ax.set_title(c, fontsize=9)
            note = (notes or {}).get(r, {}).get(c)
            if note:
                ax.text(0.03, 0.03, note, transform=ax.transAxes, fontsize=8, va="bottom", ha="left", zorder=4,
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85})
            frame(ax, lims)
            if j == 0:
                ax.set_ylabel(r, fontsize=10)
    return _finish(fig, path, title, px, target=target is not None)
