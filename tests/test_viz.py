"""Every figure writes a PNG of the size asked for with something drawn in it; the default sizes
leave no empty band; the noise-floor band and its draws; the docs-figures script end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch import viz
from flowmatch.errors import FlowmatchError

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pixels(path) -> np.ndarray:
    with open(path, "rb") as f:
        assert f.read(8) == PNG, f"{path} is not a PNG"
    return np.asarray(Image.open(path).convert("RGB"))


def _drawn(path, px=None, min_colours: int = 6) -> np.ndarray:
    """The PNG at ``path`` has ``px`` = (width, height) pixels and its middle 80 % holds at least
    ``min_colours`` distinct colours (a blank or one-colour plot area has one or two)."""
    img = _pixels(path)
    if px is not None:
        assert (img.shape[1], img.shape[0]) == tuple(px), f"{path}: {img.shape[1]}x{img.shape[0]}, asked {px}"
    h, w, _ = img.shape
    mid = img[h // 10: h - h // 10, w // 10: w - w // 10].reshape(-1, 3)
    colours = len(np.unique(mid, axis=0))
    assert colours >= min_colours, f"{path}: {colours} distinct colours in the plot area"
    return img


def _longest_blank_rows(img: np.ndarray) -> int:
    """The longest run of rows that are white from edge to edge."""
    blank = (img >= 250).all(axis=(1, 2))
    best = run = 0
    for b in blank:
        run = run + 1 if b else 0
        best = max(best, run)
    return best


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    xs = torch.cumsum(0.1 * torch.randn(9, 30, 2, generator=g), 0)  # [T, B, 2] trajectories
    target = torch.randn(3000, 2, generator=g) * torch.tensor([2.0, 0.5]) + torch.tensor([0.0, 1.0])
    rows = [{"model": m, "stage": m, "solver": s, "nfe": k, "w2": 1.0 / k + i, "w2_floor": 0.1, "n": 100,
             "straightness": 0.5 / (i + 1), "grid": "adaptive" if s == "dopri5" else "uniform"}
            for i, m in enumerate(("1-RF", "2-RF")) for s, ks in (("euler", (1, 2, 4)), ("dopri5", (30,)))
            for k in ks]
    images = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    return {"xs": xs, "target": target, "rows": rows, "images": images}


def _figures(d, tmp_path, px):
    """Every public figure function once on tiny inputs, each with ``px``."""
    xs, target, rows, im = d["xs"], d["target"], d["rows"], d["images"]
    best = [{"method": m, "nfe": k, "w2": (1 + i) / k, "w2_floor": 0.1, "wall_s": 10.0 * i, "steps": 100 * (i + 1)}
            for i, m in enumerate(("1-RF", "shortcut", "meanflow")) for k in (1, 2, 4, 8)]
    p = lambda name: str(tmp_path / f"{name}.png")  # noqa: E731
    curv = ([{"model": m, "t": t / 4, "chord_deviation": 0.1 * (t + 1), "acceleration": None}
             for m in ("a", "b") for t in range(5)] + [{"model": "a", "t": 0.5, "chord_deviation": None,
                                                        "acceleration": 2.0}])
    return [
        viz.plot_samples({"x": xs[0], "y": xs[-1]}, p("samples"), title="t", target=target, px=px),
        viz.plot_trajectories(xs, p("traj"), title="t", target=target, source=xs[0], px=px),
        viz.plot_trajectory_grid({"a": xs, "b": xs.flip(0)}, p("grid"), target=target, source=target * 0.3,
                                 straightness={"a": 1.5, "b": 1e-4}, title="t", px=px),
        viz.plot_sample_grid({"1-RF": {"Euler 1": xs[0], "dopri5 (NFE 30)": xs[-1]}, "2-RF": {"Euler 1": xs[3]}},
                             p("sample_grid"), target=target, notes={"1-RF": {"Euler 1": "W2 0.5"}}, px=px),
        viz.plot_quality_vs_nfe(rows, p("quality"), floor=viz.floor_band([0.08, 0.1, 0.12], 100), px=px),
        viz.plot_w2_vs_nfe(rows, p("w2"), px=px),
        viz.plot_loss_by_t([1.0 + 0.1 * i for i in range(10)], p("loss"), px=px),
        viz.plot_straightness_by_stage(rows, p("straight"), px=px),
        viz.plot_pareto([{**r, "pareto": r["nfe"] == 1} for r in rows], p("pareto"), title="t", px=px),
        viz.plot_curvature_by_t(curv, p("curv"), px=px),
        viz.save_image_grid(im, p("img"), nrow=4, px=px),
        viz.plot_image_panels({"a": im, "b": -im}, p("panels"), nrow=4, px=px),
        viz.plot_image_trajectories({"a": torch.stack([im * (t / 4) for t in range(5)])}, p("imtraj"), n=3,
                                    steps=4, px=px),
        viz.plot_image_stage_grid({"1-RF": {"NFE 1": im, "NFE 2": -im}, "2-RF": {"NFE 1": im.flip(0)}},
                                  p("imstages"), real=torch.cat([im, im]), nrow=4, px=px),
        viz.plot_method_quality_vs_nfe(best, p("method_nfe"), title="t", px=px),
        viz.plot_method_quality_vs_cost(best, p("method_cost"), title="t", px=px),
    ]


def test_every_figure_writes_a_png_of_the_asked_size_with_content(data, tmp_path):
    paths = _figures(data, tmp_path, (480, 320))
    assert len(set(paths)) == len(paths) == 16
    exported = {n for n in viz.__all__ if n.startswith(("plot_", "save_"))}
    assert len(exported) == len(paths)  # every figure function of the package is in _figures (image_grid is data)
    for path in paths:
        _drawn(path, (480, 320))
        assert os.path.getsize(path) < 300_000


@pytest.mark.parametrize("name", ["plot_samples", "plot_trajectory_grid"])
def test_default_sizes_leave_no_empty_band(data, tmp_path, name):
    """Panels of equal scale on data wider than tall used to leave a band of blank rows (here 94
    of 237) between the title and the panels; now no gap is wider than a line of text."""
    wide = data["xs"] * torch.tensor([3.0, 1.0])
    path = str(tmp_path / f"{name}.png")
    if name == "plot_samples":
        viz.plot_samples({"a": wide[0], "b": wide[-1], "c": wide[4]}, path, title="a title")
    else:
        viz.plot_trajectory_grid({"a": wide, "b": wide, "c": wide}, path, title="a title")
    img = _drawn(path)
    assert _longest_blank_rows(img) <= 16, f"{_longest_blank_rows(img)} blank rows of {img.shape[0]}"


def test_the_floor_band_is_drawn_as_a_band(data, tmp_path):
    """With a :class:`FloorBand` the floor is a grey band of the figure's height share between
    lo and hi; with one stored floor value, no band (a dashed line)."""
    rows = data["rows"]
    band = viz.plot_quality_vs_nfe(rows, str(tmp_path / "band.png"), floor=viz.floor_band([0.05, 0.2], 100),
                                   px=(500, 400))
    line = viz.plot_quality_vs_nfe(rows, str(tmp_path / "line.png"), px=(500, 400))
    grey = lambda p: int((np.abs(_pixels(p).astype(int) - 219) <= 6).all(axis=2).sum())  # noqa: E731
    assert grey(band) > 20 * max(1, grey(line))


def test_floor_band_and_floor_draws():
    from flowmatch.bench import ToyScorer
    from flowmatch.data.toy import get_dataset
    from flowmatch.viz.docs import floor_draws

    b = viz.floor_band([0.3, 0.1, 0.2, float("nan")], 50)
    assert (b.lo, b.hi, b.n, b.draws) == (0.1, 0.3, 50, 3) and abs(b.mid - 0.2) < 1e-12
    assert "3 draws" in b.label and "n = 50" in b.label
    with pytest.raises(FlowmatchError, match="no finite floor values"):
        viz.floor_band([], 10)
    target = get_dataset("moons", 2)
    draws = floor_draws(target, 64, 3, seed=5)
    assert len(set(draws)) == 3  # independent pairs
    assert draws[0] == ToyScorer(target, 64, seed=5).floor(64)["w2_floor"]  # pair 0 is the bench's floor


@pytest.mark.parametrize("px", [(10, 300), (300,), (300.0, 200), "300x200", (True, 300)])
def test_bad_px_is_a_one_line_error(data, tmp_path, px):
    with pytest.raises(FlowmatchError, match=r"px = .*\(width, height\)") as e:
        viz.plot_samples({"a": data["xs"][0]}, str(tmp_path / "x.png"), px=px)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "x.png")


def test_points_of_the_wrong_shape_are_a_one_line_error(tmp_path):
    with pytest.raises(FlowmatchError, match=r"plot_trajectory_grid: trajectories 'a' have shape \(4, 3\)"):
        viz.plot_trajectory_grid({"a": torch.zeros(4, 3)}, str(tmp_path / "t.png"))
    with pytest.raises(FlowmatchError, match=r"target: expected 2-D points"):
        viz.plot_samples({"a": torch.zeros(5, 2)}, str(tmp_path / "s.png"), target=torch.zeros(5, 3))


def _docs_script():
    spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "experiments" / "docs_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_figures_script_in_smoke_mode(tmp_path, make_cfg, capsys):
    """``make figures``'s script on a tiny demo (an I-CFM and an OT run) and a tiny two-stage
    reflow chain: every figure written, each a PNG with content; an empty runs folder is a
    one-line error and exit code 2."""
    from flowmatch.pipelines import train_from_config

    runs = tmp_path / "runs"
    for name, extra in (("demo/runs/tiny_icfm", []), ("demo/runs/tiny_ot", ["coupling.name=ot"]),
                        ("reflow/tiny/1-RF", []), ("reflow/tiny/2-RF", ["train.seed=1"])):
        train_from_config(make_cfg("train.steps=5", *extra), str(runs / name), progress=False)
    rows = [{"stage": s, "solver": solver, "nfe": k, "w2": 1.0 / k, "w2_floor": 0.2, "n": 100, "grid": grid,
             "straightness": 0.5 if s == "1-RF" else 0.01}
            for s in ("1-RF", "2-RF") for solver, grid, ks in (("euler", "uniform", (1, 2, 4, 8)),
                                                               ("dopri5", "adaptive", (26,))) for k in ks]
    (runs / "reflow" / "tiny" / "stages.json").write_text(json.dumps(rows))
    script = _docs_script()
    assert script.main(["--smoke", "--runs", str(runs), "--out", str(tmp_path / "docs")]) == 0
    names = sorted(os.listdir(tmp_path / "docs"))
    assert names == ["demo_tiny_trajectories.png", "reflow_tiny_samples.png", "reflow_tiny_trajectories.png",
                     "reflow_tiny_w2_vs_nfe.png"]
    for n in names:
        _drawn(tmp_path / "docs" / n)
    assert "4 figures" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert script.main(["--smoke", "--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "d2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "neither demo/runs nor a chain with stages.json" in err


def test_series_differ_without_colour():
    """Seven series in a row get seven colours, markers and line styles, so they stay apart in greyscale
    and under colour blindness; the cues cycle with different periods, so the few-step table's ten methods
    (and many more) never share all three; the palette is the Okabe-Ito set (no red-green pair)."""
    from flowmatch.viz._style import PALETTE, style

    styles = [style(i) for i in range(7)]
    assert len({s["marker"] for s in styles}) == 7 and len({str(s["ls"]) for s in styles}) == 7
    assert len({s["color"] for s in styles}) == 7 and style(7)["color"] == style(0)["color"]
    many = [(s["color"], s["marker"], str(s["ls"])) for s in map(style, range(50))]
    assert len(set(many)) == 50 and len({m[1] for m in many[:10]}) == 10
    assert set(PALETTE) == {"#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"}
