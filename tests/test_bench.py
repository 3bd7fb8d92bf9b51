"""Solver x NFE benchmark rows and their files, on analytic fields (no training)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from flowmatch.bench import BENCH_COLUMNS, benchmark, rows_to_csv, rows_to_markdown, write_bench
from flowmatch.data import get_dataset
from flowmatch.errors import UnknownNameError

STAGES = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
SHIFT = torch.tensor([2.0, -1.0])


def const_field(x, t):
    """A straight field: every trajectory is x0 + t * SHIFT."""
    return SHIFT.to(x.dtype).expand_as(x)


def rotation(x, t):
    return torch.stack([-x[:, 1], x[:, 0]], dim=1)


@pytest.fixture(scope="module")
def rows():
    src = get_dataset("gaussian", 2)
    return benchmark({"const": const_field, "rot": rotation}, src, src,
                     solvers=("euler", "midpoint", "heun", "rk4", "dopri5"), nfes=(1, 2, 4), n=200,
                     straightness_n=100, progress=False)


def test_row_keys(rows):
    for r in rows:
        for key in ("model", "solver", "num_steps", "nfe", "w2", "mmd", "straightness", "seconds", "n"):
            assert key in r, key
        assert set(BENCH_COLUMNS) <= set(r)
        assert r["n"] == 200 and r["seconds"] >= 0


def test_fixed_solver_settings_and_nfe(rows):
    expected = {(s, k) for s, st in STAGES.items() for k in (1, 2, 4) if k % st == 0}
    for model in ("const", "rot"):
        got = {(r["solver"], r["nfe"]) for r in rows if r["model"] == model and r["solver"] != "dopri5"}
        assert got == expected
    assert not any(r["solver"] == "rk4" and r["nfe"] in (1, 2) for r in rows)  # 4 stages do not divide 1 or 2
    assert not any(r["solver"] in ("heun", "midpoint") and r["nfe"] == 1 for r in rows)
    for r in rows:
        if r["solver"] in STAGES:
            assert r["nfe"] == r["num_steps"] * STAGES[r["solver"]]
            assert r["grid"] == "uniform"


def test_dopri5_row(rows):
    dop = [r for r in rows if r["solver"] == "dopri5"]
    assert [r["model"] for r in dop] == ["const", "rot"]
    for r in dop:
        assert r["nfe"] > 0 and r["num_steps"] is None and r["grid"] == "adaptive"


def test_straight_field_euler_one_step_matches_dopri5(rows):
    const = {(r["solver"], r["nfe"]): r for r in rows if r["model"] == "const"}
    euler1 = const[("euler", 1)]
    dop = next(r for r in rows if r["model"] == "const" and r["solver"] == "dopri5")
    assert euler1["w2"] == pytest.approx(dop["w2"], abs=1e-4)
    # every solver is exact on a constant field, so every row sees the same cloud
    for r in const.values():
        assert r["w2"] == pytest.approx(euler1["w2"], abs=1e-4)
        assert abs(r["straightness"]) < 1e-8
    # x1 = x0 + SHIFT with x0 ~ N(0, I) against N(0, I): W2 = |SHIFT| up to sampling error, which the
    # two-sample floor on the same n bounds (see test_metrics).
    assert abs(euler1["w2"] - float(SHIFT.norm())) <= 2 * euler1["w2_floor"]


def test_curved_field_needs_more_steps(rows):
    rot = {(r["solver"], r["nfe"]): r for r in rows if r["model"] == "rot"}
    assert rot[("euler", 1)]["straightness"] > 0.01
    # the rotation by 1 rad is solved far better by RK4 than by one Euler step
    dop = next(r for r in rows if r["model"] == "rot" and r["solver"] == "dopri5")
    assert abs(rot[("rk4", 4)]["w2"] - dop["w2"]) < abs(rot[("euler", 1)]["w2"] - dop["w2"])


def test_same_floor_on_every_row(rows):
    assert len({r["w2_floor"] for r in rows}) == 1
    assert rows[0]["w2_floor"] > 0


def test_unknown_solver_fails_before_work():
    src = get_dataset("gaussian", 2)
    calls = []

    def v(x, t):
        calls.append(1)
        return x

    with pytest.raises(UnknownNameError) as e:
        benchmark({"m": v}, src, src, solvers=("euler", "warp"), nfes=(1,), n=8, progress=False)
    assert "euler" in str(e.value) and "dopri5" in str(e.value)
    assert calls == []


def test_write_bench_files_round_trip(rows, tmp_path):
    out = str(tmp_path / "bench")
    paths = write_bench(rows, out)
    assert set(paths) == {"json", "csv", "md", "plot"}
    for key, name in (("json", "bench.json"), ("csv", "bench.csv"), ("md", "bench.md"), ("plot", "bench_w2_vs_nfe.png")):
        assert paths[key] == os.path.join(out, name) and os.path.getsize(paths[key]) > 0
    with open(paths["json"]) as f:
        assert json.load(f) == rows
    with open(paths["csv"]) as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == BENCH_COLUMNS
        csv_rows = list(reader)
    assert len(csv_rows) == len(rows)
    assert [int(r["nfe"]) for r in csv_rows] == [r["nfe"] for r in rows]
    with open(paths["md"]) as f:
        md = f.read().strip().splitlines()
    assert md[0] == "| " + " | ".join(BENCH_COLUMNS) + " |"
    assert len(md) == len(rows) + 2
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_write_bench_without_plot(rows, tmp_path):
    paths = write_bench(rows[:2], str(tmp_path), plot=False, name="b2")
    assert "plot" not in paths
    assert sorted(os.listdir(tmp_path)) == ["b2.csv", "b2.json", "b2.md"]


def test_table_helpers():
    rows = [{"a": 1, "b": 0.123456, "c": None}, {"a": 2, "b": float("nan"), "c": "x"}]
    md = rows_to_markdown(rows).splitlines()
    assert md == ["| a | b | c |", "|---|---|---|", "| 1 | 0.1235 | - |", "| 2 | nan | x |"]
    assert rows_to_markdown([]) == "" and rows_to_csv([]) == ""
    lines = rows_to_csv(rows, ["b", "a"]).splitlines()
    assert lines[0] == "b,a" and lines[1].endswith(",1")


# ------------------------------------------------------------------------------- the full suite

from flowmatch.bench import BENCH_NFES, MODEL_COLUMNS, bench_suite, pareto_front, pareto_table, write_suite  # noqa: E402
from flowmatch.metrics import mmd  # noqa: E402
from flowmatch.metrics.distances import MMDReference  # noqa: E402


def bend(x, t):
    """Bends only late in the path: zero velocity change before t = 0.5."""
    return torch.stack([torch.ones_like(x[:, 0]), 4 * torch.clamp(t - 0.5, min=0)], dim=1)


@pytest.fixture(scope="module")
def suite():
    src = get_dataset("gaussian", 2)
    return bench_suite({"const": const_field, "bend": bend}, src, src, solvers=("euler", "heun", "ab2", "renoise", "dopri5"),
                       grids=("uniform", "cosine"), n=150, grid_n=60, straightness_n=80, progress=False)


def test_suite_settings_every_row_states_its_n(suite):
    rows = suite.rows
    for r in rows:
        assert set(BENCH_COLUMNS) | {"pareto"} <= set(r)
        assert r["n"] == (60 if r["grid"] == "cosine" else 150)
    for model in ("const", "bend"):
        got = {(r["solver"], r["grid"], r["nfe"]) for r in rows if r["model"] == model}
        want = {(s, g, k) for g in ("uniform", "cosine") for s, st in (("euler", 1), ("heun", 2), ("ab2", 1),
                                                                      ("renoise", 1))
                for k in BENCH_NFES if k % st == 0}
        assert got - {x for x in got if x[0] == "dopri5"} == want
        assert [x for x in got if x[0] == "dopri5"][0][1] == "adaptive"  # adaptive once, not per grid
    floors = {r["n"]: r["w2_floor"] for r in rows}
    assert len(floors) == 2 and floors[60] != floors[150]


def test_suite_pareto_flags_match_the_front(suite):
    for model in ("const", "bend"):
        for n in (60, 150):
            rs = [r for r in suite.rows if r["model"] == model and r["n"] == n]
            front = pareto_front(rs)
            assert {id(r) for r in rs if r["pareto"]} == {id(r) for r in front}
            # no front row is beaten by any row on both axes
            for f in front:
                assert not any(o["nfe"] <= f["nfe"] and o["w2"] < f["w2"] for o in rs)
    # the straight field is solved exactly in one step: its front is the one-step rows only
    const_front = pareto_front([r for r in suite.rows if r["model"] == "const" and r["n"] == 150])
    assert {r["nfe"] for r in const_front} == {1}


def test_pareto_front_closed_form():
    rows = [{"nfe": 1, "w2": 3.0}, {"nfe": 2, "w2": 1.0}, {"nfe": 4, "w2": 2.0}, {"nfe": 8, "w2": 0.5},
            {"nfe": 8, "w2": 0.7}, {"nfe": 16, "w2": float("nan")}]
    assert [(r["nfe"], r["w2"]) for r in pareto_front(rows)] == [(1, 3.0), (2, 1.0), (8, 0.5)]


def test_suite_curvature_profile_locates_the_bend(suite):
    models = {m["model"]: m for m in suite.models}
    assert set(models) == {"const", "bend"} and all(set(MODEL_COLUMNS) <= set(m) for m in models.values())
    acc = [c for c in suite.curvature if c["model"] == "bend" and c["acceleration"] is not None]
    early = [c["acceleration"] for c in acc if c["t"] < 0.45]
    late = [c["acceleration"] for c in acc if c["t"] > 0.55]
    assert max(early) < 1e-10 and min(late) == pytest.approx(16.0, rel=1e-6)  # |dv/dt|^2 = 4^2 after t = 0.5
    assert models["bend"]["peak_curvature_t"] > 0.5
    assert models["const"]["straightness"] < 1e-12 < models["bend"]["straightness"]
    assert models["const"]["logp"] is None  # likelihood off by default


def test_pareto_table_names_the_best_setting(suite):
    md = pareto_table(suite.rows).splitlines()
    assert md[0].startswith("| model | n | floor | NFE <= 1 |") and len(md) == 4
    const = next(line for line in md if line.startswith("| const |"))
    assert const.split("|")[-3].strip().endswith("@1")  # even at NFE <= 32, one step already reaches the best W2 on a straight field


def test_write_suite_files(suite, tmp_path):
    paths = write_suite(suite, str(tmp_path))
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(["bench.json", "bench.csv", "bench.md", "models.json", "models.md", "curvature.json",
                            "pareto.md", "bench_pareto.png", "bench_curvature.png"])
    with open(paths["csv"]) as f:
        assert tuple(csv.DictReader(f).fieldnames) == BENCH_COLUMNS + ("pareto",)
    with open(paths["curvature"]) as f:
        assert len(json.load(f)) == len(suite.curvature)
    for key in ("pareto_plot", "curvature_plot"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_suite_bad_grid_fails_before_work():
    calls = []

    def v(x, t):
        calls.append(1)
        return x

    src = get_dataset("gaussian", 2)
    with pytest.raises(UnknownNameError, match="cosine"):
        bench_suite({"m": v}, src, src, grids=("uniform", "zigzag"), n=8, progress=False)
    assert calls == []


def test_mmd_reference_equals_mmd():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(70, 2, generator=g), torch.randn(90, 2, generator=g) + 0.3
    ref = MMDReference(y)
    assert ref(x) == pytest.approx(mmd(x, y), rel=1e-12, abs=1e-15)
    assert ref(y) == pytest.approx(mmd(y, y), abs=1e-12)


@pytest.mark.crosspath
def test_toy_scorer_scores_as_w2_and_mmd_do_one_after_the_other():
    # the W2 runs in a second thread while the MMD runs: the scores must be those of the plain calls.
    # Bit for bit on any host: a thread calls the same functions on the same tensors (POT's network
    # simplex is single-threaded C++), and at these sizes no op is split across intra-op threads
    from flowmatch.bench import ToyScorer
    from flowmatch.metrics import w2

    target = get_dataset("moons", 2)
    scorer = ToyScorer(target, 300, seed=4)
    x = get_dataset("gaussian", 2).sample(200, generator=torch.Generator().manual_seed(5))
    ref = target.reference(300, generator=torch.Generator().manual_seed(5))
    ref2 = target.sample(300, generator=torch.Generator().manual_seed(6))  # the floor's draw: i.i.d., as a model's
    assert scorer(x) == {"w2": w2(x, ref[:200]), "mmd": mmd(x, ref[:200])}
    assert scorer.floor(300) == {"w2_floor": w2(ref, ref2)}
    assert scorer(ref2)["w2"] == w2(ref2, ref)


@pytest.mark.parametrize("seed", [0, 3])
def test_toy_scorer_references_split_the_mixture_exactly(seed):
    # the reference holds row i around centre i mod 8, so n // 8 points (or one more) on each centre,
    # in every prefix the rows of a smaller n are scored on (an i.i.d. draw puts most rows elsewhere).
    # A 2-D noise norm of 3 is 5.3 sd; the next centre is 3.8 away. The floor's second draw is i.i.d.
    from flowmatch.bench import ToyScorer

    target = get_dataset("8gaussians", 2)
    scorer = ToyScorer(target, 203, seed=seed)
    own = target.centers()[torch.arange(203) % 8]
    assert float((scorer.ref - own).norm(dim=1).max()) < 3.0
    assert torch.equal(scorer.ref, target.reference(203, generator=torch.Generator().manual_seed(seed + 1)))
    assert torch.equal(scorer.ref2, target.sample(203, generator=torch.Generator().manual_seed(seed + 2)))


@pytest.mark.crosspath
def test_suite_scored_rows_at_once_equal_rows_scored_one_by_one():
    # a ToyScorer with workers > 1 scores the rows after the solves, several at once: same rows,
    # same order, same pareto flags as one row after each solve (bit for bit: the same kernels on the
    # same tensors in another thread, as in the test above)
    from flowmatch.bench import ToyScorer

    src, tgt = get_dataset("gaussian", 2), get_dataset("moons", 2)

    def run(workers):
        return bench_suite({"const": const_field, "bend": bend}, src, tgt, solvers=("euler", "heun", "dopri5"),
                           nfes=(1, 2, 4), grids=("uniform", "cosine"), n=120, grid_n=50, straightness_n=40,
                           progress=False, scorer=ToyScorer(tgt, 120, 0, workers=workers)).rows

    one, many = run(1), run(3)
    assert [list(r) for r in one] == [list(r) for r in many]  # keys in the same order
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_sec")} for r in one]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_sec")} for r in many]
    assert len(one) == 2 * (2 * (3 + 2) + 1) and all(r["w2"] == r["w2"] for r in one)  # finite scores
    assert {r["pareto"] for r in many} == {True, False}
