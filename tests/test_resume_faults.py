"""Resuming after faults: a run or chain stage stopped before its first checkpoint restarts, a killed
write's temporaries are cleaned up, a killed final evaluation is not logged twice, tracking.mode=online
without a login is refused before anything is written, and an unreadable checkpoint is told apart from
a refused pickle without ever suggesting an unsafe load."""

from __future__ import annotations

import os
import pickle
import tempfile

import pytest
import torch

from flowmatch.errors import CheckpointError, FlowmatchError
from flowmatch.io import TMP_PREFIX, remove_temporaries, safe_load
from flowmatch.training import load_checkpoint


def _leave_temporary(directory: str, name: str) -> str:
    fd, p = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="-" + name, dir=directory)  # as atomic_write names it
    with os.fdopen(fd, "wb") as f:
        f.write(b"half a file")
    return p


def test_remove_temporaries_matches_atomic_writes_pattern(tmp_path):
    p = _leave_temporary(str(tmp_path), "x.pt")
    for name in (".tmp-short-x", ".tmp-abcdefgh", "a.tmp-abcdefgh-x", "x.tmp"):
        (tmp_path / name).write_text("keep")
    (tmp_path / "sub").mkdir()
    q = _leave_temporary(str(tmp_path / "sub"), "y.pt")
    assert remove_temporaries(str(tmp_path)) == [p]
    assert os.path.exists(q) and len(os.listdir(tmp_path)) == 5
    assert remove_temporaries(str(tmp_path / "absent")) == []


# ------------------------------------------------------------------ unreadable checkpoints

def _random_file(path, n=4096, seed=0) -> str:
    g = torch.Generator()
    g.manual_seed(seed)
    path.write_bytes(bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist()))
    return str(path)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_random_bytes_are_not_a_readable_checkpoint(tmp_path, seed):
    p = _random_file(tmp_path / "random.pt", seed=seed)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert "\n" not in msg and p in msg
    assert "not a readable checkpoint" in msg and "corrupt, truncated or not a torch file" in msg
    assert "weights_only" not in msg and "will likely succeed" not in msg


class _Runs:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_a_pickle_that_needs_code_is_refused_and_named(tmp_path, kind):
    p = tmp_path / "code.pt"
    if kind == "torch":
        torch.save({"format": "flowmatch-checkpoint", "obj": _Runs()}, str(p))
    else:
        p.write_bytes(pickle.dumps(_Runs()))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(p))
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    assert "needs code to load" in msg and "refused" in msg and ("getcwd" in msg)
    assert "weights_only" not in msg and "not a readable" not in msg


def test_truncated_torch_file_is_not_readable(tmp_path):
    p = tmp_path / "t.pt"
    torch.save({"x": torch.zeros(100)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FlowmatchError, match=r"pair shard .*t\.pt is not a readable pair shard"):
        safe_load(str(p), "pair shard")
    torch.save({"x": torch.ones(2)}, str(p))
    assert torch.equal(safe_load(str(p), "pair shard")["x"], torch.ones(2))
