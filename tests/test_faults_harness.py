"""The fault-injection benchmark's own logic (experiments/faults/run_faults.py): comparing a resumed run
directory with the reference, classifying writes, killing at a write, and the table it reports."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="the harness kills process trees found in /proc")

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "experiments", "faults", "run_faults.py")


@pytest.fixture(scope="module")
def rf():
    spec = importlib.util.spec_from_file_location("run_faults", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["run_faults"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def _run_dir(root, seed=0):
    """A small run directory shaped like flowmatch's: a checkpoint, metrics, a pair store, a summary."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(root / "checkpoints")
    os.makedirs(root / "pairs")
    torch.save({"model": {"w": torch.randn(4, 3, generator=g)}, "step": 20, "init_from": str(root / "teacher.pt"),
                "rng": {"generator": torch.Generator().manual_seed(1).get_state()}}, root / "checkpoints" / "last.pt")
    torch.save({"x0": torch.randn(5, 2, generator=g), "x1": torch.randn(5, 2, generator=g), "index": 0},
               root / "pairs" / "shard_00000.pt")
    (root / "pairs" / "manifest.json").write_text(json.dumps({"count": 5, "teacher_path": str(root / "teacher.pt")}))
    rows = [{"step": s, "train/loss": 1.0 / s, "train/steps_per_sec": 100.0 + s} for s in (5, 10, 15, 20)]
    rows.append({"step": 20, "eval/w2": 0.5})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "summary.json").write_text(json.dumps({"run_dir": str(root), "step": 20, "steps_per_sec": 123.0}))
    (root / "stages.md").write_text(f"| seconds |\n| {seed} |\n")


def test_identical_runs_in_other_directories_compare_exact(rf, tmp_path):
    _run_dir(tmp_path / "ref")
    _run_dir(tmp_path / "run")  # its own paths inside, other timings: neither counts
    (tmp_path / "run" / "stages.md").write_text("| seconds |\n| 7 |\n")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "train/lo')  # a torn last line from a kill is skipped, as the reader does
    c = rf.compare_runs(str(tmp_path / "ref"), str(tmp_path / "run"))
    assert c.exact and c.differs == [] and c.lost == [] and c.leftover_tmp == []


def test_an_altered_tensor_a_lost_row_and_a_leftover_temp_are_reported(rf, tmp_path):
    _run_dir(tmp_path / "ref")
    _run_dir(tmp_path / "run")
    shard = tmp_path / "run" / "pairs" / "shard_00000.pt"
    d = torch.load(shard, weights_only=True)
    d["x1"][2, 1] = torch.nextafter(d["x1"][2, 1], torch.tensor(float("inf")))  # one ulp
    torch.save(d, shard)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(lines[:1] + lines[2:] + lines[-1:]) + "\n")
    (tmp_path / "run" / "checkpoints" / ".tmp-ab12cd34-last.pt").write_bytes(b"torn")
    c = rf.compare_runs(str(tmp_path / "ref"), str(tmp_path / "run"))
    assert not c.exact
    assert c.differs == ["metrics.jsonl: extra row step 20 (eval, repeated)",  # a second evaluation row
                         "pairs/shard_00000.pt/x1: tensor 1 of 10 elements differ"]
    assert c.lost == ["metrics.jsonl: row step 10 (train) missing"]
    assert c.leftover_tmp == [os.path.join("checkpoints", ".tmp-ab12cd34-last.pt")]


def test_missing_unreadable_and_changed_fields_are_reported(rf, tmp_path):
    _run_dir(tmp_path / "ref")
    _run_dir(tmp_path / "run")
    os.remove(tmp_path / "run" / "stages.md")
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"\x00" * 10)
    (tmp_path / "run" / "pairs" / "manifest.json").write_text(json.dumps({"count": 6, "teacher_path": "elsewhere"}))
    c = rf.compare_runs(str(tmp_path / "ref"), str(tmp_path / "run"))
    assert "stages.md: missing" in c.lost
    assert any(x.startswith("checkpoints/last.pt: unreadable") for x in c.lost)
    # paths inside the run directories are compared relative to them
    assert c.differs == ["pairs/manifest.json/count: 5 vs 6",
                         "pairs/manifest.json/teacher_path: '<out>/teacher.pt' vs 'elsewhere'"]
    # bit for bit means bit for bit: NaN equals its own bits, -0.0 is not 0.0
    out = []
    rf.diff_values({"a": torch.tensor([float("nan"), 0.0])}, {"a": torch.tensor([float("nan"), -0.0])}, "f", out)
    assert out == ["f/a: tensor 1 of 2 elements differ"]
    assert rf._same_tensor(torch.tensor([float("nan")]), torch.tensor([float("nan")]))


def test_writes_are_classified_by_their_target(rf):
    assert rf.tmp_target(".tmp-ab_12cd3-shard_00002.pt") == "shard_00002.pt"
    assert rf.tmp_target("last.pt") is None
    assert rf.write_kind(os.path.join("run", "checkpoints", ".tmp-x1y2z3w4-last.pt")) == "checkpoint"
    assert rf.write_kind(os.path.join("pairs", ".tmp-x1y2z3w4-manifest.json")) == "manifest"
    assert rf.write_kind(os.path.join("pairs", "shard_00011.pt")) == "shard"
    assert rf.write_kind("metrics.jsonl") == "metrics"
    assert rf.write_kind(".tmp-x1y2z3w4-samples.pt") is None and rf.write_kind("summary.json") is None


def test_table_counts_each_outcome_and_json_is_written(rf, tmp_path):
    rec = dict(scenario="train", lost=[], leftover_tmp=[], injected=True, where="w", note="", detector="inotify")
    records = [
        {**rec, "kind": rf.TIME_KIND, "outcome": "resumed exactly"},
        {**rec, "kind": rf.TIME_KIND, "outcome": "failed to resume", "lost": ["x: missing"]},
        {**rec, "kind": rf.TIME_KIND, "outcome": None, "injected": False},
        {**rec, "kind": "checkpoint", "outcome": "resumed, differs", "leftover_tmp": [".tmp-a-last.pt"], "in_write": True},
    ]
    rows = rf.tally(records)
    assert [(r["scenario"], r["kill kind"]) for r in rows] == [("train", rf.TIME_KIND), ("train", "checkpoint"),
                                                             ("total", "")]
    t, c, total = rows
    assert (t["faults"], t["resumed exactly"], t["failed to resume"], t["data lost"], t["not injected"]) == (2, 1, 1, 1, 1)
    assert (c["resumed, differs"], c["leftover .tmp"], c["in write"]) == (1, 1, 1)
    assert (total["faults"], total["resumed exactly"], total["resumed, differs"], total["failed to resume"]) == (3, 1, 1, 1)
    md = rf.to_markdown(rows)
    assert md.splitlines()[0] == "| " + " | ".join(rf.COLUMNS) + " |"
    assert "| train | checkpoint | SIGKILL when its .tmp-* appears (inotify; in the write 1/1) | 1 | 0 | 1 | 0 | 0 | 1 |" in md
    assert "| train | random time | SIGKILL at a seeded random time | 2 | 1 | 0 | 1 | 1 | 0 |" in md
    rf.write_outputs(str(tmp_path), rows, records, {"seed": 0})
    saved = json.loads((tmp_path / "faults.json").read_text())
    assert saved["rows"] == rows and saved["seed"] == 0 and len(saved["faults"]) == 4
    assert (tmp_path / "faults.md").read_text().startswith(md)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    assert rf.outcome(0, rf.Comparison()) == "resumed exactly"
    assert rf.outcome(0, rf.Comparison(differs=["x"])) == "resumed, differs"
    assert rf.outcome(2, None) == rf.outcome(None, None) == "failed to resume"


def test_a_process_tree_is_killed_when_its_temporary_appears(rf, tmp_path):
    # the child starts a grandchild in a session of its own (as torchrun does), then begins a checkpoint write
    child = textwrap.dedent(f"""
        import os, subprocess, sys, time
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--out", {str(tmp_path / 'out')!r}],
                             start_new_session=True)
        open({str(tmp_path / 'grandchild.pid')!r}, "w").write(str(g.pid))
        time.sleep(0.3)
        os.makedirs({str(tmp_path / 'out' / 'checkpoints')!r}, exist_ok=True)
        open({str(tmp_path / 'out' / 'checkpoints' / '.tmp-abcd1234-last.pt')!r}, "wb").write(b"partial")
        time.sleep(60)
    """)
    res = rf.run_command([sys.executable, "-c", child], str(tmp_path / "out"), str(tmp_path / "log.txt"),
                         dict(os.environ), rf.Fault("checkpoint", occurrence=1), timeout=30)
    assert res.killed_at_s is not None and res.killed_at_s < 20 and res.rc == -9
    assert [e.kind for e in res.events] == ["checkpoint"]
    assert not rf._alive(int((tmp_path / "grandchild.pid").read_text()))
    assert rf.leftover_tmps(str(tmp_path / "out")) == [os.path.join("checkpoints", ".tmp-abcd1234-last.pt")]
    shutil.rmtree(tmp_path / "out")


def test_what_a_kill_left_on_disk_is_described(rf, tmp_path):
    _run_dir(tmp_path / "run")
    torch.save({"x0": torch.zeros(1)}, tmp_path / "run" / "pairs" / "shard_00001.pt")
    (tmp_path / "run" / "pairs" / "shard_00002.pt").write_bytes(b"torn")  # not complete: not counted
    done = rf.readable_artifacts(str(tmp_path / "run"))
    assert done == ["checkpoints/last.pt", "pairs/manifest.json", "pairs/shard_00000.pt", "pairs/shard_00001.pt"]
    assert rf.describe_state(str(tmp_path / "run"), done) == ".: checkpoint at step 20; pairs: 2 shards, manifest"
    assert rf.describe_state(str(tmp_path / "run"), []) == "no checkpoint, shard or manifest"


@pytest.mark.parametrize("use_inotify", [True, False])
def test_the_watcher_sees_temporaries_and_metrics_rows(rf, tmp_path, use_inotify):
    out = tmp_path / "out"
    w = rf.Watcher(str(out), use_inotify=use_inotify)
    events = []

    def drain():
        for _ in range(20):
            events.extend(w.wait(0.005, 0.0))

    os.makedirs(out / "checkpoints")
    (out / "checkpoints" / ".tmp-abcd1234-last.pt").write_bytes(b"partial")  # in a directory made just now
    drain()
    (out / "metrics.jsonl").write_text('{"step": 5}\n')
    drain()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 10}\n')
    drain()
    tmp = out / "checkpoints" / ".tmp-efgh5678-last.pt"
    tmp.write_bytes(b"whole")
    if w.method == "inotify":  # a temporary renamed away before anyone looked is still seen
        os.replace(tmp, out / "checkpoints" / "last.pt")
    drain()
    w.close()
    assert w.method == ("inotify" if use_inotify and sys.platform.startswith("linux") else "polling")
    assert [e.kind for e in events] == ["checkpoint", "metrics", "metrics", "checkpoint"]
    assert events[-1].path == os.path.join("checkpoints", ".tmp-efgh5678-last.pt")


def test_random_kills_land_before_the_first_checkpoint_and_between_checkpoints(rf):
    ref = rf.RunResult(rc=0, seconds=20.0, first_file_s=4.0,
                       events=[rf.Event(t, "checkpoint", "checkpoints/.tmp-x-last.pt") for t in (8.0, 9.0, 10.0)]
                       + [rf.Event(9.5, "metrics", "metrics.jsonl")])
    scn = rf.Scenario("train", lambda d: [], ("checkpoint", "metrics"))
    faults = rf.plan_faults(scn, ref, 3, seed=0)
    assert faults == rf.plan_faults(scn, ref, 3, seed=0)  # seeded
    assert [f.window for f in faults[:3]] == ["before the first checkpoint", "between checkpoints", "anywhere"]
    assert 4.0 <= faults[0].at <= 8.0 and 8.0 <= faults[1].at <= 10.0 and 4.0 <= faults[2].at <= 20.0
    assert [(f.kind, f.occurrence) for f in faults[3:]] == [("checkpoint", faults[3].occurrence), ("metrics", 1)]
    assert 1 <= faults[3].occurrence <= 3
    # a second metrics kill comes after the last row (the final evaluation's)
    ref.events.append(rf.Event(12.0, "metrics", "metrics.jsonl"))
    faults = rf.plan_faults(scn, ref, 0, seed=0)
    assert [(f.kind, f.occurrence) for f in faults if f.kind == "metrics"][-1] == ("metrics", 2)
    # one kill per scenario: the rotation picks the other window
    assert rf.plan_faults(scn, ref, 1, seed=0, rotate=1)[0].window == "between checkpoints"
