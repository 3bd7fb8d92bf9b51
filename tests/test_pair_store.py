"""The pair store's integrity: a generation trusts a shard on disk only if it provably belongs to it
(its plan id, index, seed, count and data hash); anything else is moved aside and regenerated, never
blessed into the manifest. Shards are compact; a resume clears a dead writer's temporaries."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from flowmatch.data.pairs import PairStore, PairStoreError, shard_name
from flowmatch.io import file_sha256
from flowmatch.training import train
from test_reflow import TEACHER_OVERRIDES, _gen, teacher  # noqa: F401 (teacher: the shared tiny teacher fixture)


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory, make_cfg):
    run = tmp_path_factory.mktemp("other")
    train(make_cfg(*TEACHER_OVERRIDES, "train.seed=7"), str(run), progress=False)
    return str(run / "checkpoints" / "last.pt")


def _rejected(store):
    d = store / "rejected"
    return sorted(os.listdir(d)) if d.exists() else []


def _same_store(a, b):
    """The two stores hold the same pairs and the same manifest (up to the directory they sit in)."""
    sa, sb = PairStore(str(a)), PairStore(str(b))
    assert torch.equal(sa.x0, sb.x0) and torch.equal(sa.x1, sb.x1)
    assert sa.manifest == sb.manifest


# --- item: a rerun never blesses an altered shard --------------------------------------------------

@pytest.mark.parametrize("value", [0.5, float("nan")])
def test_rerun_of_a_finished_store_moves_an_altered_shard_aside(teacher, tmp_path, capsys, value):
    _gen(teacher, tmp_path / "p")
    manifest = (tmp_path / "p" / "manifest.json").read_bytes()
    f = tmp_path / "p" / shard_name(2)
    good = f.read_bytes()
    x1 = torch.load(f, weights_only=True)["x1"]
    at = good.find(x1.numpy().tobytes())
    assert at > 0
    bad = bytearray(good)
    bad[at:at + 20] = torch.full((5,), value).numpy().tobytes()  # five floats of x1 changed in place
    f.write_bytes(bytes(bad))
    with pytest.raises(PairStoreError, match=f"{shard_name(2)} is corrupt"):
        PairStore(str(tmp_path / "p"))

    capsys.readouterr()
    _gen(teacher, tmp_path / "p")
    err = capsys.readouterr().err
    assert shard_name(2) in err and "rejected" in err and len(err.strip().splitlines()) == 1
    assert f.read_bytes() == good  # regenerated: the same pairs as before the edit
    assert (tmp_path / "p" / "manifest.json").read_bytes() == manifest  # the manifest was not rewritten to fit
    (moved,) = _rejected(tmp_path / "p")
    assert moved.startswith(shard_name(2) + ".") and (tmp_path / "p" / "rejected" / moved).read_bytes() == bytes(bad)
    PairStore(str(tmp_path / "p"))


def test_rerun_of_a_finished_store_keeps_only_the_files_its_manifest_records(teacher, tmp_path, capsys):
    _gen(teacher, tmp_path / "p", n=30)
    manifest = (tmp_path / "p" / "manifest.json").read_bytes()
    f = tmp_path / "p" / shard_name(1)
    good = f.read_bytes()
    d = torch.load(f, weights_only=True)
    torch.save({**d, "nfe": 7}, f)  # its data and their hash intact, its record changed: not the file written
    capsys.readouterr()
    _gen(teacher, tmp_path / "p", n=30)
    err = capsys.readouterr().err
    assert shard_name(1) in err and "manifest" in err
    assert f.read_bytes() == good and (tmp_path / "p" / "manifest.json").read_bytes() == manifest
    assert len(_rejected(tmp_path / "p")) == 1


# --- item: a resumed generation trusts only the shards it can prove --------------------------------

def _bad_shard(kind, teacher, other_teacher, tmp_path):
    """The bytes of a shard that must not be accepted as shard 3 of a 50-pair, 10-per-shard store."""
    if kind == "foreign":  # shard 3 of another teacher's store: same index, seed and count
        _gen(other_teacher, tmp_path / "foreign")
        return (tmp_path / "foreign" / shard_name(3)).read_bytes()
    if kind == "sibling":  # a copy of shard 1 of the same store
        return (tmp_path / "clean" / shard_name(1)).read_bytes()
    if kind == "count":  # shard 3 of a 35-pair store of the same teacher: 5 pairs
        _gen(teacher, tmp_path / "short", n=35)
        return (tmp_path / "short" / shard_name(3)).read_bytes()
    if kind == "bare":  # a bare tensor, not a shard's dict
        torch.save(torch.zeros(10, 2), tmp_path / "bare.pt")
        return (tmp_path / "bare.pt").read_bytes()
    if kind == "garbage":
        return b"not a torch file"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["foreign", "sibling", "count", "bare", "garbage"])
def test_resume_moves_aside_a_shard_it_cannot_prove(teacher, other_teacher, tmp_path, capsys, kind):
    _gen(teacher, tmp_path / "clean")
    shutil.copytree(tmp_path / "clean", tmp_path / "p")
    (tmp_path / "p" / "manifest.json").unlink()  # an unfinished store
    (tmp_path / "p" / shard_name(4)).unlink()
    bad = _bad_shard(kind, teacher, other_teacher, tmp_path)
    (tmp_path / "p" / shard_name(3)).write_bytes(bad)
    kept = (tmp_path / "p" / shard_name(0)).stat().st_mtime_ns

    capsys.readouterr()
    _gen(teacher, tmp_path / "p")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shard_name(3) in err[0] and "rejected" in err[0]
    (moved,) = _rejected(tmp_path / "p")
    assert (tmp_path / "p" / "rejected" / moved).read_bytes() == bad  # moved aside, not deleted
    assert (tmp_path / "p" / shard_name(0)).stat().st_mtime_ns == kept  # proven shards are kept
    _same_store(tmp_path / "p", tmp_path / "clean")


def _strip_to_old_format(store):
    """Rewrite a store as generations before shards were tied to their plan wrote it."""
    m = json.loads((store / "manifest.json").read_text())
    for sh in m["shards"]:
        f = store / sh["file"]
        d = torch.load(f, weights_only=True)
        torch.save({k: d[k] for k in ("x0", "x1", "index", "seed", "nfe")}, f)
        sh["sha256"] = file_sha256(str(f))
        sh.pop("data_sha256", None)
    m.pop("plan_id", None)
    (store / "manifest.json").write_text(json.dumps(m))
    plan = json.loads((store / "plan.json").read_text())
    plan.pop("plan_id", None)
    (store / "plan.json").write_text(json.dumps(plan))


def test_old_stores_are_read_and_their_shards_regenerated_on_resume(teacher, tmp_path, capsys):
    _gen(teacher, tmp_path / "clean", n=30)
    shutil.copytree(tmp_path / "clean", tmp_path / "old")
    _strip_to_old_format(tmp_path / "old")
    old = PairStore(str(tmp_path / "old"))  # students still read a store written before plan ids
    new = PairStore(str(tmp_path / "clean"))
    assert torch.equal(old.x0, new.x0) and torch.equal(old.x1, new.x1)

    capsys.readouterr()
    _gen(teacher, tmp_path / "old", n=30)  # none of its shards can be proven: all are regenerated
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(shard_name(i) in line for i, line in enumerate(err))
    assert len(_rejected(tmp_path / "old")) == 3
    _same_store(tmp_path / "old", tmp_path / "clean")


def test_store_reader_checks_what_each_shard_carries(teacher, tmp_path):
    _gen(teacher, tmp_path / "p", n=30)
    shutil.copyfile(tmp_path / "p" / shard_name(0), tmp_path / "p" / shard_name(2))
    with pytest.raises(PairStoreError, match=f"{shard_name(2)} is corrupt"):
        PairStore(str(tmp_path / "p"))
    with pytest.raises(PairStoreError, match=f"{shard_name(2)} is shard 0 of its generation, not shard 2"):
        PairStore(str(tmp_path / "p"), verify=False)
    torch.save(torch.zeros(10, 2), tmp_path / "p" / shard_name(2))
    with pytest.raises(PairStoreError, match=f"{shard_name(2)} holds a Tensor, not a shard"):
        PairStore(str(tmp_path / "p"), verify=False)


# --- item: compact shards -------------------------------------------------------------------------

def test_shards_are_no_larger_than_their_data(teacher, tmp_path):
    # dopri5's endpoint is a view into the whole solution ([2, n, *D]); the shard stores only the data
    _gen(teacher, tmp_path / "p", n=2000, shard_size=2000, solver="dopri5", nfe=None, atol=1e-4, rtol=1e-4)
    f = tmp_path / "p" / shard_name(0)
    d = torch.load(f, weights_only=True)
    data = 0
    for k in ("x0", "x1"):
        t = d[k]
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), k
        data += t.numel() * t.element_size()
    assert data == 2 * 2000 * 2 * 4
    assert f.stat().st_size < data + 4096  # the zip's headers and the few scalars, not a second copy


# --- item: a resume clears its own dead writers' temporaries --------------------------------------

def test_resume_removes_stale_temporaries_only(teacher, tmp_path):
    _gen(teacher, tmp_path / "p", n=30)
    (tmp_path / "p" / "manifest.json").unlink()
    (tmp_path / "p" / shard_name(2)).unlink()
    stale = [".tmp-k2j4_x9a-shard_00002.pt", ".tmp-abcd1234-manifest.json"]
    live = ".tmp-zzzz0000-shard_00002.pt"  # a writer of this run still at work (written after it started)
    others = ["notes.txt", ".tmp-x", "tmp-abcd1234-shard_00002.pt"]
    past = time.time() - 60
    for name in stale + others:
        (tmp_path / "p" / name).write_bytes(b"partial")
        os.utime(tmp_path / "p" / name, (past, past))
    (tmp_path / "p" / live).write_bytes(b"partial")
    future = time.time() + 3600
    os.utime(tmp_path / "p" / live, (future, future))

    # a rank other than 0 leaves the store's temporaries alone (rank 0 clears them before generation starts)
    _gen(teacher, tmp_path / "p", n=30, rank=1, world_size=2)
    assert all((tmp_path / "p" / name).exists() for name in stale)
    _gen(teacher, tmp_path / "p", n=30, rank=0, world_size=2)
    left = set(os.listdir(tmp_path / "p"))
    assert not left & set(stale)
    assert {live, *others} <= left
    _gen(teacher, tmp_path / "clean", n=30)
    _same_store(tmp_path / "p", tmp_path / "clean")


# --- item: what a teacher hash mismatch says --------------------------------------------------------

def test_edited_teacher_hash_names_both_hashes(teacher, tmp_path, make_cfg):
    _gen(teacher, tmp_path / "p", n=20)
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    m["teacher"]["sha256"] = "ab" * 32
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(m))
    cfg = make_cfg(*TEACHER_OVERRIDES, "coupling.name=paired", f"coupling.pairs={tmp_path / 'p'}", "train.steps=1")
    with pytest.raises(PairStoreError) as e:
        train(cfg, str(tmp_path / "r"), progress=False)
    msg = str(e.value)
    assert "abababababab" in msg and file_sha256(teacher)[:12] in msg and "changed since" not in msg
    assert len(msg.splitlines()) == 1
