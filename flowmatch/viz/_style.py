"""What every figure shares: the lazy matplotlib import, the colour-blind-safe palette with a
marker and a line style per series (so series stay apart in greyscale), the figure size in pixels,
the atomic PNG write, shared axis limits and the density backgrounds."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from flowmatch.errors import FlowmatchError
from flowmatch.io import atomic_write

__all__ = ["DPI", "PALETTE", "MARKERS", "LINESTYLES", "TARGET_COLOR", "SOURCE_COLOR", "FLOOR_COLOR", "style", "plt_",
           "check_px", "figure", "fit", "save", "points", "limits", "aspect", "density", "frame"]

DPI = 100  # PNG pixels per inch: a figure of w x h inches is 100 w x 100 h pixels
# Okabe & Ito (2008), the palette that stays apart under the common colour blindnesses; ordered so
# neighbours differ in lightness too (blue, vermillion, bluish green, reddish purple, orange, sky blue, black)
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
# eleven markers and eight line styles against seven colours: the three cues cycle with coprime periods,
# so no two of the first 7 x 8 x 11 series look alike (the few-step table plots ten methods)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)), (0, (8, 2)), (0, (3, 1, 1, 1)))
TARGET_COLOR = "#0072B2"  # the target density's tint
SOURCE_COLOR = "#E69F00"  # the source density's tint
FLOOR_COLOR = "#888888"


def style(i: int) -> dict:
    """Colour, marker and line style of series ``i`` (each cycling with its own period): three cues, so a
    series is told apart in colour, in greyscale and under colour blindness."""
    return {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)],
            "ls": LINESTYLES[i % len(LINESTYLES)]}


def plt_():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def check_px(px) -> Optional[tuple[int, int]]:
    """``px`` is ``None`` (the figure's own size) or ``(width, height)`` in pixels, each in [64, 8000]."""
    if px is None:
        return None
    if (not isinstance(px, (tuple, list)) or len(px) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 64 <= v <= 8000 for v in px)):
        raise FlowmatchError(f"px = {px!r}: must be (width, height) in pixels, integers in [64, 8000]")
    return int(px[0]), int(px[1])


def figure(px, default: tuple[float, float], **kwargs):
    """A constrained-layout figure of ``px`` pixels (or ``default`` inches) and its axes
    (``plt.subplots`` keywords in ``kwargs``)."""
    px = check_px(px)
    size = (px[0] / DPI, px[1] / DPI) if px else default
    return plt_().subplots(figsize=size, layout="constrained", **kwargs)


def fit(fig, rounds: int = 4) -> None:
    """Shrink ``fig`` to its panels: an equal-scale panel fills only one side of the cell the
    layout gives it, the rest is an empty band; the figure loses the largest such slack of each
    row (height) and column (width), and its constrained layout is solved again, a few ``rounds``
    until nothing is left to take."""
    for _ in range(rounds):
        fig.canvas.draw()
        w, h = fig.get_size_inches()
        rows: dict = {}
        cols: dict = {}
        for ax in fig.axes:
            if not ax.get_visible() or not ax.axison or ax.get_subplotspec() is None:
                continue
            cell, box = ax.get_position(original=True), ax.get_position(original=False)
            ss = ax.get_subplotspec()
            r, c = ss.rowspan.start, ss.colspan.start
            rows[r] = min(rows.get(r, 1.0), cell.height - box.height)
            cols[c] = min(cols.get(c, 1.0), cell.width - box.width)
        dh, dw = sum(rows.values()) * h, sum(cols.values()) * w
        # never narrower than a figure legend or the title (the layout would cut them)
        wide = [a.get_window_extent().width / fig.dpi + 0.1 for a in fig.legends + ([fig._suptitle] if fig._suptitle else [])]
        dw = min(dw, max(0.0, w - max(wide, default=0.0)))
        if dw < 0.03 and dh < 0.03:
            return
        fig.set_size_inches(w - dw, h - dh)


def save(fig, path: str) -> str:
    """Write ``fig`` to ``path`` as a PNG of exactly the figure's pixel size (no tight-bbox crop, so
    a caller's ``px`` is kept), atomically, and close it."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt_().close(fig)
    buf.seek(0)
    # 256 colours without dithering: the figures hold a few flat colours and light gradients, and a
    # palette PNG of them is a third to a tenth of the RGBA one (a sample grid: ~650 KB -> ~150 KB).
    # The series' own colours are kept exactly: a median cut alone gives rare colours (a few
    # highlighted lines) the entry of a commoner neighbour, and blue turned teal.
    rgb = Image.open(buf).convert("RGB")
    fixed = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in PALETTE + (TARGET_COLOR, SOURCE_COLOR, FLOOR_COLOR)]
    fixed = list(dict.fromkeys(fixed + [(255, 255, 255), (0, 0, 0)]))
    no_dither = getattr(Image, "Dither", Image).NONE  # the enums are Pillow >= 9.1's; the constants before
    cut = rgb.quantize(colors=256 - len(fixed), method=getattr(Image, "Quantize", Image).MEDIANCUT, dither=no_dither)
    pal = Image.new("P", (1, 1))
    pal.putpalette([v for c in fixed for v in c] + cut.getpalette()[: 3 * (256 - len(fixed))])
    img = rgb.quantize(palette=pal, dither=no_dither)
    atomic_write(path, lambda f: img.save(f, format="PNG", optimize=True))
    return path


def points(x: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` as a float CPU ``[n, 2]`` tensor; a one-line error naming ``name`` otherwise."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise FlowmatchError(f"{name}: expected 2-D points [..., 2], got {shape}")
    return x.detach().reshape(-1, 2).float().cpu()


def limits(clouds: Sequence[torch.Tensor], q: float = 0.995, pad: float = 0.08, square: bool = False):
    """Shared axis limits ``((x0, x1), (y0, y1))`` holding the central ``q`` of every cloud's
    coordinates (``[..., 2]``) plus ``pad`` of the range; ``square`` widens the shorter side."""
    allp = torch.cat([c.reshape(-1, 2).float().cpu() for c in clouds if c.numel()])
    allp = allp[torch.isfinite(allp).all(1)]
    if len(allp) == 0:
        return (-1.0, 1.0), (-1.0, 1.0)
    lo, hi = torch.quantile(allp, 1 - q, dim=0), torch.quantile(allp, q, dim=0)
    span = (hi - lo).clamp_min(1e-6)
    lo, hi = lo - pad * span, hi + pad * span
    if square:
        mid, half = (lo + hi) / 2, (hi - lo).max() / 2
        lo, hi = mid - half, mid + half
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


def aspect(lims) -> float:
    """Height over width of axes with these limits at equal scale."""
    (x0, x1), (y0, y1) = lims
    return (y1 - y0) / max(x1 - x0, 1e-9)


def density(ax, x: torch.Tensor, lims, color: str, *, bins: Optional[int] = None, strength: float = 0.8) -> None:
    """A light 2-D histogram of the points ``x`` ``[n, 2]`` tinted ``color`` (empty bins
    transparent; the fullest bin at ``strength`` opacity) behind everything else on ``ax``."""
    from matplotlib.colors import LinearSegmentedColormap

    (x0, x1), (y0, y1) = lims
    x = x.reshape(-1, 2).float().cpu()
    bins = bins or int(min(90, max(25, len(x) ** 0.5 / 1.5)))  # ~20k draws: 90 bins a side; fewer: coarser
    hist = torch.histogramdd(x, bins=[bins, bins], range=[x0, x1, y0, y1]).hist  # [bins_x, bins_y]
    hist = hist / hist.max().clamp_min(1)
    img = hist.pow(0.6).T.numpy()  # a power below 1: the thin tails show beside the dense cores
    cmap = LinearSegmentedColormap.from_list("tint", [(1, 1, 1, 0), color])
    ax.imshow(img, origin="lower", extent=(x0, x1, y0, y1), cmap=cmap, vmin=0, vmax=1 / strength,
              interpolation="bilinear", zorder=0, aspect="auto")


def frame(ax, lims) -> None:
    """Equal scale, the shared limits, no ticks (the panels compare shapes, not coordinates)."""
    ax.set_xlim(*lims[0])
    ax.set_ylim(*lims[1])
    ax.set_aspect("equal", adjustable="box")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_color("#999999")
        s.set_linewidth(0.6)
