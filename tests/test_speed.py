"""The speed benchmark's pieces (the timings themselves live in `make gpu-bench`, not in tests)."""

from __future__ import annotations

import json

import pytest
import torch

from flowmatch.errors import ConfigError
from flowmatch.speed import SPEED_COLUMNS, reference_train_loop, speed_bench, speed_table, write_speed


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_reference_loop_learns(coupling):
    losses = reference_train_loop(coupling, 60, seed=0)
    assert len(losses) == 60 and all(map(lambda v: v == v, losses))
    assert sum(losses[-10:]) < sum(losses[:10])  # the tutorial loop trains
    assert reference_train_loop(coupling, 5, seed=0) == losses[:5]  # seeded


@pytest.mark.crosspath  # eager capture vs the Python loop: the same kernels
def test_speed_sample_section_checks_and_writes(tmp_path):
    res = speed_bench(device="cpu", size="small", sections=("sample",), capture_mode="eager")
    rows = res["rows"]
    assert [r["variant"] for r in rows][1:] == ["python loop", "torchdiffeq euler", "floor: 16 x one forward"]
    assert all(set(SPEED_COLUMNS) <= set(r) and r["value"] > 0 for r in rows)
    (check,) = res["checks"]
    assert check["ok"] and check["value"] == 0.0  # eager capture computes the loop's numbers exactly
    paths = write_speed(res, str(tmp_path))
    with open(paths["json"]) as f:
        assert json.load(f)["rows"] == rows
    assert "| sample |" in speed_table(res) and "CPU" in speed_table(res)


def test_speed_bad_size():
    with pytest.raises(ConfigError, match="small"):
        speed_bench(device="cpu", size="huge", sections=())
    assert torch.get_num_threads() >= 1


def test_unet_section_measures_plain_and_fast_images_per_second(monkeypatch):
    """The image-throughput rows, on the tiny UNet and the 8x8 digits so it runs in seconds."""
    import dataclasses

    import flowmatch.speed as speed

    real = speed.unet_config
    monkeypatch.setattr(speed, "unet_config", lambda dev: dataclasses.replace(
        real(dev, batch=16, preset="tiny"), data=dataclasses.replace(real(dev).data, target="digits")))
    rows = speed._unet_rows(torch.device("cpu"), dataclasses.replace(speed.SIZES["small"], unet_steps=2), None)
    assert [r["variant"] for r in rows] == ["plain", "fast"]
    assert all(r["unit"] == "images/s" and r["value"] > 0 and r["n"] == 16 for r in rows)
    assert rows[0]["ratio"] is None and rows[1]["ratio"] == pytest.approx(rows[1]["value"] / rows[0]["value"])
    assert "M params" in rows[1]["note"] and "fast=True" in rows[1]["note"]
    assert real(torch.device("cpu")).model.preset == "small" and real(torch.device("cpu")).train.batch_size == 128


def test_train_section_times_the_loops_in_turns_and_checks_the_fast_step():
    """Tiny sizes: the rows and the check, not the speed. On the CPU the fast row is the fused MLP step."""
    import dataclasses

    import flowmatch.speed as speed

    sz = dataclasses.replace(speed.SIZES["small"], train_steps=6, train_warmup=1, check_steps=3, train_rounds=2)
    rows, checks = speed._train_rows(torch.device("cpu"), sz, None)
    assert [(r["what"], r["variant"]) for r in rows] == [
        (w, v) for w in ("I-CFM", "OT-CFM") for v in ("reference", "plain", "fast")]
    assert all(r["unit"] == "steps/s" and r["value"] > 0 and r["n"] == 256 for r in rows)
    for r in rows:
        assert "median of 2 rounds" in r["note"] and len(r["rounds"]) == 2
        assert r["value"] == pytest.approx(sum(r["rounds"]) / 2)
        if r["variant"] != "reference":
            ref = next(x for x in rows if x["what"] == r["what"] and x["variant"] == "reference")
            # the median of the per-round ratios (the loops of a round ran back to back)
            per_round = sorted(a / b for a, b in zip(r["rounds"], ref["rounds"]))
            assert r["ratio"] == pytest.approx((per_round[0] + per_round[1]) / 2)
    assert all("fused MLP step" in r["note"] for r in rows if r["variant"] == "fast")
    assert [c["ok"] for c in checks] == [True, True] and all(c["value"] < 1e-3 for c in checks)
