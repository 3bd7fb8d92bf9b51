"""Consistency distillation and training (flowmatch.distill.consistency) and the consistency sampler."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_tiny_cfg
from flowmatch.config import apply_overrides
from flowmatch.distill.consistency import ConsistencyDistillation, consistency_fn, ct_intervals
from flowmatch.errors import ConfigError
from flowmatch.models import build_model
from flowmatch.solvers import get_solver, time_grid
from flowmatch.training import LOSSES, build_trainer, load_checkpoint, train
from flowmatch.utils import make_generator
from test_training import _run_killed_and_resumed

M, S = torch.tensor([2.0, -1.0]), 0.5  # the analytic teacher's map x1 = M + S x0


class _Straight(nn.Module):
    """The straight flow of x1 = M + S x0: v(x, t) = M + (S - 1) x0 with x0 = (x - t M) / (1 + t (S - 1))."""

    def forward(self, x, t, cond=None):
        t = t[:, None]
        return M + (S - 1) * (x - t * M) / (1 + t * (S - 1))


class _AnalyticCD(ConsistencyDistillation):
    def teacher_path(self):
        return "analytic"

    def build_nets(self):
        return {**super(ConsistencyDistillation, self).build_nets(), "teacher": _Straight()}


def test_boundary_is_exact_and_one_step_is_one_euler_step():
    torch.manual_seed(0)
    model = build_model(make_tiny_cfg().model, (2,))
    x = torch.randn(64, 2, generator=make_generator(1))
    assert torch.equal(consistency_fn(model, x, torch.ones(64)), x)
    one = get_solver("consistency").integrate(model, x, time_grid(1)).x1
    assert torch.equal(one, get_solver("euler").integrate(model, x, time_grid(1)).x1)
    two = [get_solver("consistency").integrate(model, x, torch.tensor([0.0, 0.3, 1.0])).x1 for _ in range(2)]
    assert torch.equal(two[0], two[1]) and not torch.equal(two[0], one)  # seeded fresh noise


def test_pseudo_huber_closed_form_and_its_c():
    e = torch.tensor([[3.0, 4.0, 0.0, 0.0]])  # ||e|| = 5, D = 4
    c = 0.00054 * math.sqrt(4)
    assert LOSSES["pseudo_huber"](e).item() == pytest.approx(math.sqrt(25 + c * c) - c, rel=1e-6)
    assert LOSSES["l2"](e).item() == pytest.approx(25 / 4)


def test_cd_on_a_straight_teacher_recovers_its_map_in_one_step():
    cfg = make_tiny_cfg("train.objective=cd", "model.hidden=64", "train.steps=600", "train.lr=3e-3",
                        "train.batch_size=128", "train.loss=l2", "consistency.num_steps=8", "train.fast=off")
    tr = build_trainer(cfg, objective=_AnalyticCD)
    # the teacher step is the solver module's own step
    batch = tr.objective.draw(make_generator(3))
    want = get_solver("euler").step(_Straight(), batch.xt, batch.t, batch.extra["t_next"])
    assert torch.equal(tr.objective.next_point(tr.nets, batch.xt, None, None, batch.t, batch.extra["t_next"]), want)
    tr.run(600)
    x0 = torch.randn(2000, 2, generator=make_generator(7))
    with torch.no_grad():
        err = (consistency_fn(tr.ema.model, x0, torch.zeros(2000)) - (M + S * x0)).norm(dim=1).mean().item()
    assert err < 0.1, err  # the map's own scale: E||x1|| ~ 2.3; measured 0.076 (2.2 at initialisation)
    assert tr.objective.teacher_evals == 601 * 128  # one Euler step per sample per step (and the draw above)


def test_ct_curriculum_doubles_to_its_end():
    assert [ct_intervals(k, 800, 10, 1280) for k in (0, 99, 100, 250, 799)] == [10, 10, 20, 40, 1280]
    assert ct_intervals(5, 10, 4, 4) == 4
    with pytest.raises(ConfigError, match="consistency.ct_s1 = 5: the CT curriculum must end at or above"):
        make_tiny_cfg("consistency.ct_s0=10", "consistency.ct_s1=5")


@pytest.mark.parametrize("extra", [("train.objective=ct", "consistency.ct_s0=2", "consistency.ct_s1=8"),
                                   ("train.objective=cd", "consistency.mu=0.9")], ids=["ct", "cd-ema-target"])
def test_kill_and_resume_equals_the_unbroken_run(tmp_path, extra):
    teacher = train(make_tiny_cfg("train.steps=10"), str(tmp_path / "teacher"), progress=False)
    cfg = make_tiny_cfg(*extra, f"train.init={teacher.checkpoint}", "train.steps=20")
    a, b, ca, cb = _run_killed_and_resumed(cfg, tmp_path)
    assert b.start_step == 10 and b.losses == a.losses[10:]
    assert ca["objective"] == cb["objective"]  # the curriculum's step count and the teacher's evaluations too
    assert ("target" in ca.get("nets", {})) == ("mu=0.9" in extra[-1])
    for k, v in ca["ema"]["model"].items():
        assert torch.equal(v, cb["ema"]["model"][k])


def test_cd_refuses_a_missing_teacher_and_one_of_another_shape(tmp_path):
    with pytest.raises(ConfigError, match="set consistency.teacher"):
        build_trainer(make_tiny_cfg("train.objective=cd", "train.init=random"))
    img = train(apply_overrides(make_tiny_cfg(), ["data.target=digits", "model.name=unet", "model.preset=tiny",
                                                    "train.steps=1", "train.batch_size=4"]),
                str(tmp_path / "img"), progress=False)
    with pytest.raises(ConfigError, match=r"shape \(1, 8, 8\); this run's data have shape \(2,\)"):
        build_trainer(make_tiny_cfg("train.objective=cd", f"consistency.teacher={img.checkpoint}", "train.init=random"))


def test_cd_with_a_lora_uses_the_disabled_adapter_as_its_teacher(tmp_path):
    import flowmatch.distill.adapters as adapters

    teacher = train(make_tiny_cfg("train.steps=10"), str(tmp_path / "teacher"), progress=False)
    cfg = make_tiny_cfg("train.objective=cd", f"train.init={teacher.checkpoint}", "lora.rank=2", "train.steps=6")
    tr = build_trainer(cfg)
    assert isinstance(tr.nets_raw["teacher"], adapters.AdapterDisabled) and not tr.objective.compilable
    trainable = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.5 * sum(p.numel() for p in tr.model.parameters())
    base = load_checkpoint(teacher.checkpoint)["ema"]["model"]
    tr.run(6)
    x = torch.randn(16, 2, generator=make_generator(2))
    with torch.no_grad():  # the teacher is still the base: only the adapter trained
        ref = build_model(cfg.model, (2,))
        ref.load_state_dict(base)
        assert torch.equal(tr.nets_raw["teacher"](x, torch.full((16,), 0.3)), ref(x, torch.full((16,), 0.3)))
    with pytest.raises(ConfigError, match="must be train.init"):
        build_trainer(apply_overrides(cfg, [f"consistency.teacher={tmp_path / 'other.pt'}"]))
