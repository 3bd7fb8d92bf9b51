"""Plots (matplotlib, imported lazily with the Agg backend; never imported by core modules)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

__all__ = ["plot_samples", "plot_trajectories", "plot_w2_vs_nfe", "plot_loss_by_t", "plot_trajectory_grid",
           "plot_straightness_by_stage", "plot_pareto", "plot_curvature_by_t", "image_grid", "save_image_grid",
           "plot_image_panels", "plot_image_trajectories"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _lims(*clouds: torch.Tensor, q: float = 0.995):
    allp = torch.cat([c.reshape(-1, 2).float().cpu() for c in clouds])
    lo, hi = torch.quantile(allp, 1 - q, dim=0), torch.quantile(allp, q, dim=0)
    pad = 0.1 * (hi - lo)
    return (lo - pad).tolist(), (hi + pad).tolist()


def _panels(panels: dict, draw, lims, path: str, title: Optional[str], size: float = 3.3) -> str:
    """One panel per ``{label: data}`` on shared axes ``lims``; ``draw(ax, data)`` fills a panel."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    lo, hi = lims
    for ax, (label, data) in zip(axes[0], panels.items()):
        draw(ax, data)
        ax.set_title(label, fontsize=9)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _draw_trajectories(ax, xs: torch.Tensor, s: float = 3, legend: bool = False) -> None:
    xs = xs.float().cpu()
    ax.plot(xs[:, :, 0], xs[:, :, 1], color="olive", alpha=0.25, lw=0.6)
    ax.scatter(xs[0, :, 0], xs[0, :, 1], s=s, color="black", label="t = 0", zorder=3)
    ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=s, color="tab:blue", label="t = 1", zorder=3)
    if legend:
        ax.legend(loc="upper right", fontsize=7)


def plot_samples(panels: dict, path: str, *, title: Optional[str] = None, max_points: int = 4000) -> str:
    """One scatter panel per ``{label: [n, 2] tensor}``, on shared axes."""

    def draw(ax, x):
        x = x[:max_points].float().cpu()
        ax.scatter(x[:, 0], x[:, 1], s=1.5, alpha=0.5)

    return _panels(panels, draw, _lims(*panels.values()), path, title, size=3.2)


def plot_trajectories(xs: torch.Tensor, path: str, *, n: int = 300, title: Optional[str] = None) -> str:
    """Trajectories ``xs`` of shape ``[K+1, B, 2]``: start points, paths, end points."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 4))
    _draw_trajectories(ax, xs[:, :n], legend=True)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_w2_vs_nfe(rows: Sequence[dict], path: str, *, metric: str = "w2") -> str:
    """``metric`` against NFE (log x), one line per (model, solver); adaptive rows as markers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    models = list(dict.fromkeys(r["model"] for r in rows))
    styles = ["-", "--", ":", "-."]
    for mi, model in enumerate(models):
        for solver in dict.fromkeys(r["solver"] for r in rows if r["model"] == model):
            rs = sorted((r for r in rows if r["model"] == model and r["solver"] == solver), key=lambda r: r["nfe"])
            xs, ys = [r["nfe"] for r in rs], [r[metric] for r in rs]
            if rs and rs[0].get("grid") == "adaptive":
                ax.plot(xs, ys, marker="*", ls="none", ms=9, label=f"{model} {solver}")
            else:
                ax.plot(xs, ys, marker="o", ms=3, ls=styles[mi % len(styles)], label=f"{model} {solver}")
    floors = [r[f"{metric}_floor"] for r in rows if r.get(f"{metric}_floor") is not None]
    if floors:
        ax.axhline(sum(floors) / len(floors), color="gray", lw=0.8, ls=":", label="noise floor")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric.upper())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def plot_loss_by_t(losses: Sequence[float], path: str, *, title: Optional[str] = None) -> str:
    """Bar plot of the loss in each of the equal t-bins."""
    plt = _plt()
    k = len(losses)
    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar([(i + 0.5) / k for i in range(k)], losses, width=0.9 / k)
    ax.set_xlabel("t")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_trajectory_grid(trajs: dict, path: str, *, title: Optional[str] = None) -> str:
    """One trajectory panel per ``{label: [K+1, B, 2]}`` (same start points), on shared axes."""
    lims = _lims(*[xs[[0, -1]] for xs in trajs.values()])
    return _panels(trajs, lambda ax, xs: _draw_trajectories(ax, xs, s=2), lims, path, title)


def plot_straightness_by_stage(rows: Sequence[dict], path: str, *, title: Optional[str] = None) -> str:
    """Straightness S of each stage (log scale), from stage-table rows (one value per stage)."""
    plt = _plt()
    per_stage = {}
    for r in rows:
        per_stage.setdefault(r["stage"], r["straightness"])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(per_stage), 3.2))
    ax.bar(list(per_stage), [max(v, 1e-12) for v in per_stage.values()], color="tab:olive")
    ax.set_yscale("log")
    ax.set_ylabel("straightness S")
    for i, v in enumerate(per_stage.values()):
        ax.text(i, max(v, 1e-12), f"{v:.2g}", ha="center", va="bottom", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


_SOLVER_COLORS = {"euler": "tab:blue", "midpoint": "tab:orange", "heun": "tab:green", "rk4": "tab:red",
                  "ab2": "tab:purple", "renoise": "tab:brown", "dopri5": "black"}
_GRID_STYLES = ["-", "--", ":", "-."]


def plot_pareto(rows: Sequence[dict], path: str, *, metric: str = "w2", title: Optional[str] = None) -> str:
    """Quality against NFE, one panel per model and one line per (solver, grid) in it; adaptive
    solvers as stars at the NFE they used; the noise floor of each ``n`` dotted; the model's
    Pareto front (rows flagged ``pareto``) circled."""
    plt = _plt()
    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = max(1, min(4, len(models)))  # no rows: one empty panel
    nrows = max(1, (len(models) + cols - 1) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    grids = list(dict.fromkeys(r["grid"] for r in rows if r["grid"] != "adaptive"))
    for ax, model in zip(axes.flat, models):
        rs = [r for r in rows if r["model"] == model and r.get(metric) == r.get(metric)]
        for solver in dict.fromkeys(r["solver"] for r in rs):
            color = _SOLVER_COLORS.get(solver)
            for grid in dict.fromkeys(r["grid"] for r in rs if r["solver"] == solver):
                line = sorted((r for r in rs if r["solver"] == solver and r["grid"] == grid), key=lambda r: r["nfe"])
                xs, ys = [r["nfe"] for r in line], [r[metric] for r in line]
                if grid == "adaptive":
                    ax.plot(xs, ys, marker="*", ls="none", ms=10, color=color or "black", label=f"{solver}")
                else:
                    ls = _GRID_STYLES[grids.index(grid) % len(_GRID_STYLES)]
                    ax.plot(xs, ys, marker="o", ms=2.5, ls=ls, lw=1, color=color, label=f"{solver} {grid}")
        front = [r for r in rs if r.get("pareto")]
        ax.scatter([r["nfe"] for r in front], [r[metric] for r in front], s=60, facecolors="none",
                   edgecolors="gray", lw=1, zorder=4, label="Pareto front")
        if rs and rs[0].get(f"{metric}_floor") is not None:
            for n_, floor in sorted({(r["n"], r[f"{metric}_floor"]) for r in rs}):
                ax.axhline(floor, color="gray", lw=0.8, ls=":")
                ax.text(1, floor, f" floor n={n_}", fontsize=6, va="bottom", color="gray")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("NFE")
        ax.grid(alpha=0.3, which="both")
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    axes[0][0].set_ylabel(metric.upper())
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def plot_curvature_by_t(curvature: Sequence[dict], path: str, *, title: Optional[str] = None) -> str:
    """Where trajectories bend: the chord deviation ``E||(Z1 - Z0) - v(Z_t, t)||^2`` and the
    acceleration ``E||dv/dt||^2`` against t, one line per model (log y)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    models = list(dict.fromkeys(r["model"] for r in curvature))
    for key, ax, label in (("chord_deviation", axes[0], "E|(Z1 - Z0) - v(Z_t, t)|^2"),
                           ("acceleration", axes[1], "E|dv(Z_t, t)/dt|^2")):
        for model in models:
            rs = [r for r in curvature if r["model"] == model and r.get(key) is not None]
            ax.plot([r["t"] for r in rs], [max(r[key], 1e-12) for r in rs], lw=1.2, label=model)
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def image_grid(x: torch.Tensor, nrow: int = 8, pad: int = 1) -> torch.Tensor:
    """Tile images ``[N, C, H, W]`` (pixels in [-1, 1]) into one ``[rows*(H+pad)+pad, nrow*(W+pad)+pad, C]``
    array in [0, 1] (white padding)."""
    x = x.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    out = torch.ones(rows * (h + pad) + pad, nrow * (w + pad) + pad, c)
    for i in range(n):
        r, k = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = \
            x[i].permute(1, 2, 0)
    return out


def save_image_grid(x: torch.Tensor, path: str, *, nrow: int = 8, title: Optional[str] = None) -> str:
    """Save images ``[N, C, H, W]`` in [-1, 1] as one tiled PNG (grayscale for one channel)."""
    plt = _plt()
    g = image_grid(x, nrow)
    fig, ax = plt.subplots(figsize=(max(2.0, g.shape[1] / 30), max(2.0, g.shape[0] / 30)))
    ax.imshow(g.squeeze(-1).numpy() if g.shape[-1] == 1 else g.numpy(), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    return _save(fig, path)


def plot_image_panels(panels: dict, path: str, *, nrow: int = 8, title: Optional[str] = None) -> str:
    """One tiled grid per ``{label: images [N, C, H, W]}`` side by side (e.g. a stage's samples at
    NFE 1, 2, 4 and adaptive)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (label, x) in zip(axes[0], panels.items()):
        g = image_grid(x, nrow)
        ax.imshow(g.squeeze(-1).numpy() if g.shape[-1] == 1 else g.numpy(), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_image_trajectories(trajs: dict, path: str, *, n: int = 6, steps: int = 8, title: Optional[str] = None) -> str:
    """Image trajectories ``{label: xs [T, B, C, H, W]}``: per label, ``n`` samples (rows) at
    ``steps`` evenly spaced times from t = 0 to 1 (columns); straight flows change their images
    linearly from noise to data."""
    panels = {}
    for label, xs in trajs.items():
        idx = torch.linspace(0, xs.shape[0] - 1, steps).round().long()
        sel = xs[idx][:, :n]  # [steps, n, C, H, W]
        panels[label] = sel.transpose(0, 1).reshape(-1, *xs.shape[2:])
    return plot_image_panels(panels, path, nrow=steps, title=title)
