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
from flowmatch.reflow import generate_pairs
from flowmatch.training import train

TEACHER_OVERRIDES = ("data.target=moons", "train.steps=30", "model.time_embedding=fourier", "model.fourier_scale=1.0")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, make_cfg):
    run = tmp_path_factory.mktemp("teacher")
    train(make_cfg(*TEACHER_OVERRIDES), str(run), progress=False)
    return str(run / "checkpoints" / "last.pt")


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory, make_cfg):
    run = tmp_path_factory.mktemp("other")
    train(make_cfg(*TEACHER_OVERRIDES, "train.seed=7"), str(run), progress=False)
    return str(run / "checkpoints" / "last.pt")


def _gen(teacher, out, n=50, shard_size=10, **kw):
    kw.setdefault("solver", "rk4")
    kw.setdefault("nfe", 8)
    return generate_pairs(teacher, str(out), n, shard_size=shard_size, progress=False, **kw)


def _rejected(store):
    d = store / "rejected"
    return sorted(os.listdir(d)) if d.exists() else []


def _same_store(a, b):
    """The two stores hold the same pairs and the same manifest (up to the directory they sit in)."""
    sa, sb = PairStore(str(a)), PairStore(str(b))
    assert torch.equal(sa.x0, sb.x0) and torch.equal(sa.x1, sb.x1)
    assert sa.manifest == sb.manifest


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
