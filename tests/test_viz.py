"""Every plot function writes a PNG (matplotlib's Agg backend, no display)."""

from __future__ import annotations

import torch

from flowmatch import viz

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_every_plot_writes_a_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(5, 40, 2, generator=g)
    rows = [{"model": m, "stage": m, "solver": s, "nfe": k, "w2": 1.0 / k, "w2_floor": 0.1, "straightness": 0.5,
             "grid": "adaptive" if s == "dopri5" else "uniform"}
            for m in ("a", "b") for s, ks in (("euler", (1, 2, 4)), ("dopri5", (30,))) for k in ks]
    paths = [
        viz.plot_samples({"x": xs[0], "y": xs[-1]}, str(tmp_path / "s.png"), title="t"),
        viz.plot_trajectories(xs, str(tmp_path / "t.png"), title="t"),
        viz.plot_trajectory_grid({"a": xs, "b": xs}, str(tmp_path / "g.png"), title="t"),
        viz.plot_w2_vs_nfe(rows, str(tmp_path / "w.png")),
        viz.plot_loss_by_t([1.0] * 10, str(tmp_path / "l.png")),
        viz.plot_straightness_by_stage(rows, str(tmp_path / "st.png")),
        viz.plot_pareto([{**r, "n": 100, "pareto": r["nfe"] == 1} for r in rows], str(tmp_path / "p.png"), title="t"),
        viz.plot_curvature_by_t([{"model": m, "t": t / 4, "chord_deviation": 0.1 * t, "acceleration": None}
                                 for m in ("a", "b") for t in range(5)] +
                                [{"model": "a", "t": 0.5, "chord_deviation": None, "acceleration": 2.0}],
                                str(tmp_path / "c.png")),
    ]
    assert all(_png(p) for p in paths)
    assert len(set(paths)) == 8
