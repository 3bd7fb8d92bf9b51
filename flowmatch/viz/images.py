"""Image figures: tiled grids, panels side by side, trajectories through time, and samples per
stage at a few NFE from the same noise beside real images."""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from flowmatch.errors import FlowmatchError
from flowmatch.viz._style import check_px, figure, save

__all__ = ["image_grid", "save_image_grid", "plot_image_panels", "plot_image_trajectories", "plot_image_stage_grid"]


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


def _show(ax, g: torch.Tensor) -> None:
    ax.imshow(g.squeeze(-1).numpy() if g.shape[-1] == 1 else g.numpy(), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def save_image_grid(x: torch.Tensor, path: str, *, nrow: int = 8, title: Optional[str] = None,
                    px: Optional[tuple[int, int]] = None) -> str:
    """Save images ``[N, C, H, W]`` in [-1, 1] as one tiled PNG (grayscale for one channel)."""
    g = image_grid(x, nrow)
    fig, ax = figure(px, (max(2.0, g.shape[1] / 30), max(2.0, g.shape[0] / 30) + (0.3 if title else 0)))
    _show(ax, g)
    if title:
        ax.set_title(title, fontsize=8)
    return save(fig, path)


def plot_image_panels(panels: Mapping[str, torch.Tensor], path: str, *, nrow: int = 8, title: Optional[str] = None,
                      px: Optional[tuple[int, int]] = None) -> str:
    """One tiled grid per ``{label: images [N, C, H, W]}`` side by side (e.g. a stage's samples at
    NFE 1, 2, 4 and adaptive)."""
    grids = {k: image_grid(x, nrow) for k, x in panels.items()}
    h, w = max(g.shape[0] for g in grids.values()), max(g.shape[1] for g in grids.values())
    pw = 2.8
    fig, axes = figure(px, (pw * len(grids), pw * h / w + 0.35 + (0.35 if title else 0)), ncols=len(grids),
                       squeeze=False)
    for ax, (label, g) in zip(axes[0], grids.items()):
        _show(ax, g)
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path)


def plot_image_trajectories(trajs: Mapping[str, torch.Tensor], path: str, *, n: int = 6, steps: int = 8,
                            title: Optional[str] = None, px: Optional[tuple[int, int]] = None) -> str:
    """Image trajectories ``{label: xs [T, B, C, H, W]}``: per label, ``n`` samples (rows) at
    ``steps`` evenly spaced times from t = 0 to 1 (columns); straight flows change their images
    linearly from noise to data."""
    panels = {}
    for label, xs in trajs.items():
        idx = torch.linspace(0, xs.shape[0] - 1, steps).round().long()
        sel = xs[idx][:, :n]  # [steps, n, C, H, W]
        panels[label] = sel.transpose(0, 1).reshape(-1, *xs.shape[2:])
    return plot_image_panels(panels, path, nrow=steps, title=title, px=px)


def plot_image_stage_grid(samples: Mapping[str, Mapping[str, torch.Tensor]], path: str, *,
                          real: Optional[torch.Tensor] = None, nrow: int = 4, title: Optional[str] = None,
                          px: Optional[tuple[int, int]] = None) -> str:
    """Image samples against real images: a row per stage and a column per solve
    (``samples[stage][label]`` ``[N, C, H, W]`` in [-1, 1], e.g. Euler NFE 1, 2, 4 from the same
    noise), each tiled ``nrow`` a row; ``real`` images ``[M, C, H, W]`` in a last column, a tile of
    the same size in each row (different images per row)."""
    check_px(px)
    if not samples or not any(samples.values()):
        raise FlowmatchError("plot_image_stage_grid: no samples to draw")
    ncols = max(len(c) for c in samples.values()) + (real is not None)
    tiles = [x for cols in samples.values() for x in cols.values()]
    per = max(len(x) for x in tiles)
    g0 = image_grid(tiles[0][:per], nrow)
    ratio = g0.shape[0] / g0.shape[1]
    pw = 1.9
    fig, axes = figure(px, (0.35 + pw * ncols, len(samples) * pw * ratio + 0.3 + (0.4 if title else 0)),
                       nrows=len(samples), ncols=ncols, squeeze=False)
    first = next(iter(samples.values()))
    for i, (stage, cols) in enumerate(samples.items()):
        for j, (label, x) in enumerate(cols.items()):
            _show(axes[i][j], image_grid(x[:per], nrow))
            if i == 0 or j >= len(first) or label != list(first)[j]:  # column titles on the top row
                axes[i][j].set_title(label, fontsize=9)
        for j in range(len(cols), ncols - (real is not None)):
            axes[i][j].axis("off")
        if real is not None:
            ax = axes[i][ncols - 1]
            _show(ax, image_grid(real[i * per:(i + 1) * per] if len(real) >= (i + 1) * per else real[:per], nrow))
            if i == 0:
                ax.set_title("real images", fontsize=9)
        axes[i][0].set_ylabel(stage, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return save(fig, path)
