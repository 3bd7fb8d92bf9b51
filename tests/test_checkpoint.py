"""Checkpoint files: every way a file can be wrong is a one-line CheckpointError; writes are atomic."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

import flowmatch.training.checkpoint as ckpt_mod
from flowmatch.errors import CheckpointError, FlowmatchError
from flowmatch.io import atomic_save, atomic_write_text, file_sha256
from flowmatch.training import load_checkpoint, load_model, save_checkpoint, train


class Foreign:
    """An arbitrary picklable object that weights_only loading must refuse."""

    def __init__(self):
        self.payload = [1, 2, 3]


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory, make_cfg):
    cfg = make_cfg("model.hidden=8", "model.depth=1", "train.steps=2", "train.batch_size=8")
    run = tmp_path_factory.mktemp("ckpt") / "run"
    return train(cfg, str(run), progress=False).checkpoint


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _assert_one_line(e: pytest.ExceptionInfo) -> None:
    assert isinstance(e.value, FlowmatchError)
    assert "\n" not in str(e.value)


def test_real_checkpoint_loads(real_ckpt):
    ck = load_checkpoint(real_ckpt)
    assert ck["format"] == ckpt_mod.FORMAT and ck["version"] == ckpt_mod.FORMAT_VERSION
    assert ck["step"] == 2


def test_truncated_checkpoint(real_ckpt, tmp_path):
    data = _read(real_ckpt)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(bad))
    _assert_one_line(e)
    assert str(bad) in str(e.value)
    with pytest.raises(CheckpointError):
        load_model(str(bad))


def test_random_bytes(tmp_path):
    g = torch.Generator()
    g.manual_seed(0)
    bad = tmp_path / "random.pt"
    bad.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(bad))
    _assert_one_line(e)


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.pt"
    bad.write_bytes(b"")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(bad))


def test_foreign_torch_file(tmp_path):
    p = tmp_path / "foreign.pt"
    torch.save({"a": 1}, str(p))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(p))
    assert "not a flowmatch checkpoint" in str(e.value)
    _assert_one_line(e)


def test_foreign_tensor_file(tmp_path):
    p = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), str(p))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(p))
    assert "not a flowmatch checkpoint" in str(e.value)


def test_pickled_object_is_refused_not_executed(tmp_path):
    p = tmp_path / "pickle.pt"
    torch.save({"format": ckpt_mod.FORMAT, "obj": Foreign()}, str(p))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(p))
    _assert_one_line(e)


def test_wrong_version(real_ckpt, tmp_path):
    ck = load_checkpoint(real_ckpt)
    ck["version"] = ckpt_mod.FORMAT_VERSION + 41
    p = tmp_path / "v.pt"
    torch.save(ck, str(p))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(p))
    assert "version" in str(e.value) and str(ckpt_mod.FORMAT_VERSION + 41) in str(e.value)


def test_missing_entries(real_ckpt, tmp_path):
    ck = load_checkpoint(real_ckpt)
    del ck["ema"]
    p = tmp_path / "m.pt"
    torch.save(ck, str(p))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(p))
    assert "ema" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path / "nope.pt"))
    assert "nope.pt" in str(e.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(tmp_path))  # a directory is not a checkpoint file


def test_weights_that_do_not_fit_the_config(real_ckpt, tmp_path):
    ck = load_checkpoint(real_ckpt)
    ck["config"]["model"]["hidden"] = 12
    p = tmp_path / "misfit.pt"
    torch.save(ck, str(p))
    with pytest.raises(CheckpointError) as e:
        load_model(str(p))
    _assert_one_line(e)


def test_invalid_config_in_checkpoint(real_ckpt, tmp_path):
    ck = load_checkpoint(real_ckpt)
    ck["config"]["model"]["no_such_key"] = 1
    p = tmp_path / "badcfg.pt"
    torch.save(ck, str(p))
    with pytest.raises(CheckpointError) as e:
        load_model(str(p))
    assert "no_such_key" in str(e.value)


def test_save_checkpoint_adds_format_and_version(tmp_path):
    p = str(tmp_path / "c.pt")
    save_checkpoint(p, {"model": {}, "ema": {}, "step": 3, "config": {}})
    ck = load_checkpoint(p)
    assert ck["format"] == ckpt_mod.FORMAT and ck["version"] == ckpt_mod.FORMAT_VERSION and ck["step"] == 3


def test_atomic_save_leaves_no_temp_files(tmp_path):
    p = tmp_path / "sub" / "x.pt"
    atomic_save({"w": torch.arange(5)}, str(p))
    atomic_save({"w": torch.arange(6)}, str(p))
    assert os.listdir(tmp_path / "sub") == ["x.pt"]
    assert torch.equal(torch.load(str(p), weights_only=True)["w"], torch.arange(6))


def test_atomic_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "x.pt"
    atomic_save({"w": torch.arange(5)}, str(p))
    before = _read(p)
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PARTIAL" * 10)  # some bytes reach the temporary file, then the write dies
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"w": torch.arange(100)}, str(p))
    monkeypatch.setattr(torch, "save", real_save)
    assert _read(p) == before
    assert os.listdir(tmp_path) == ["x.pt"]


def test_atomic_save_interrupt_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "x.pt"
    atomic_save({"w": 1}, str(p))
    before = _read(p)

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"w": 2}, str(p))
    assert _read(p) == before and os.listdir(tmp_path) == ["x.pt"]


def test_atomic_write_text(tmp_path):
    p = tmp_path / "a.txt"
    atomic_write_text(str(p), "hello\n")
    atomic_write_text(str(p), "world\n")
    assert p.read_text() == "world\n"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_file_sha256(tmp_path):
    p = tmp_path / "b.bin"
    p.write_bytes(b"flowmatch" * 1000)
    assert file_sha256(str(p)) == hashlib.sha256(b"flowmatch" * 1000).hexdigest()


def test_atomic_save_writes_equal_contents_as_the_same_bytes(tmp_path):
    # pickle's memo follows object identity: a shared list or an interned key is written as a back
    # reference, a fresh equal one in full. atomic_save makes the bytes a function of the contents only
    import json

    shared = [1, 2]
    a = {"step": 3, "x": torch.arange(4.0), "cfg": {"k": shared, "m": shared}, "names": ["step", "x"]}
    b = json.loads(json.dumps({"step": 3, "cfg": {"k": [1, 2], "m": [1, 2]}, "names": ["step", "x"]}))
    b = {"step": b["step"], "x": torch.arange(4.0), "cfg": b["cfg"], "names": b["names"]}
    atomic_save(a, str(tmp_path / "a.pt"))
    atomic_save(b, str(tmp_path / "b.pt"))
    assert file_sha256(str(tmp_path / "a.pt")) == file_sha256(str(tmp_path / "b.pt"))
    state = torch.nn.Linear(2, 2).state_dict()
    atomic_save(state, str(tmp_path / "s.pt"))
    loaded = torch.load(str(tmp_path / "s.pt"), weights_only=True)
    assert loaded._metadata == state._metadata  # the module's version record is kept


def test_resumed_run_writes_the_unbroken_runs_checkpoint_file(make_cfg, tmp_path):
    # the checkpoint's SHA-256 is the reflow pair store's teacher id: a chain killed and resumed mid-stage
    # must hash its teacher as the unbroken chain does
    from test_training import _Interrupt

    base = ("train.steps=20", "train.ckpt_every=5")
    a = train(make_cfg(*base), str(tmp_path / "a"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*base), str(tmp_path / "b"), progress=False, on_step=_Interrupt(13))
    b = train(make_cfg(*base), str(tmp_path / "b"), resume=True, progress=False)
    assert b.start_step == 10
    assert file_sha256(a.checkpoint) == file_sha256(b.checkpoint)
