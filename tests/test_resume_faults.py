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

from flowmatch.errors import CheckpointError, ConfigError, FlowmatchError
from flowmatch.io import TMP_PREFIX, remove_temporaries, safe_load
from flowmatch.training import load_checkpoint
from flowmatch.training.tracking import check_tracking, wandb_login_found


@pytest.fixture
def no_login(tmp_path, monkeypatch):
    """No wandb credentials anywhere (env, ~/.netrc, wandb's settings file), and a wandb.init that fails
    the test if it is ever called (no network in tests)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "wandb-config"))
    wandb = pytest.importorskip("wandb")

    def never(*a, **k):
        raise AssertionError("wandb.init was called")

    monkeypatch.setattr(wandb, "init", never)
    return home


def test_login_is_found_where_wandb_looks_for_it(no_login, monkeypatch):
    assert not wandb_login_found()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_login_found()
    check_tracking("online")  # passes: a key is there
    monkeypatch.delenv("WANDB_API_KEY")
    netrc = no_login / ".netrc"
    netrc.write_text("machine example.org login user password other\n")
    netrc.chmod(0o600)
    assert not wandb_login_found()  # an entry for another host
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert wandb_login_found()
    netrc.unlink()
    (no_login / "wandb-config").mkdir()
    (no_login / "wandb-config" / "settings").write_text("[default]\napi_key = " + "k" * 40 + "\n")
    assert wandb_login_found()
    check_tracking("offline")
    with pytest.raises(ConfigError, match="disabled"):
        check_tracking("cloud")



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
