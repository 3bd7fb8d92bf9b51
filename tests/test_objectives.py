"""The objectives (flowmatch.training.objectives): one-step distillation is flow matching at t = 0
draw for draw, the registry and the refusals before training, the checkpoint's objective, and the
config keys that moved to the distill section."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from flowmatch.config import ExperimentConfig, apply_overrides, from_dict, load_config
from flowmatch.errors import CheckpointError, ConfigError, FlowmatchError
from flowmatch.training import (OBJECTIVES, Batch, Nets, OneStepDistill, build_components, build_objective,
                                build_trainer, load_checkpoint, train)
from flowmatch.utils import make_generator
from test_step import pair_store  # noqa: F401 (the module's pair-store fixture)


def _distill(make_cfg, pairs, *extra):
    return make_cfg("coupling.name=paired", f"coupling.pairs={pairs}", "train.objective=distill", *extra)


@pytest.mark.crosspath  # two code paths; bit for bit because 1 * x0 + 0 * x1 and x1 - x0 are exact
def test_distill_is_flow_matching_at_t0_draw_for_draw(make_cfg, pair_store):  # noqa: F811
    """With the linear path, ``train.objective=distill`` equals CFM at constant t = 0 bit for bit (how
    the chain distilled before the objective existed): xt = 1 * x0 + 0 * x1 and ut = x1 - x0 exactly."""
    old = build_trainer(make_cfg("coupling.name=paired", f"coupling.pairs={pair_store}", "time.name=constant",
                                 "time.value=0", "train.fast=off"))
    new = build_trainer(_distill(make_cfg, pair_store, "train.fast=off"))
    old.run(5)
    new.run(5)
    assert old.sync() == new.sync()
    for a, b in zip(old.model.parameters(), new.model.parameters()):
        assert torch.equal(a, b)


def test_distill_regresses_the_one_step_map_on_any_path(make_cfg, pair_store):  # noqa: F811
    cfg = _distill(make_cfg, pair_store, "path.name=cosine")  # cosine's velocity at 0 is (pi/2) x1: not the map
    comp = build_components(cfg)
    batch = build_objective(cfg, comp).draw(make_generator(0))
    assert torch.equal(batch.t, torch.zeros(cfg.train.batch_size))
    assert torch.equal(batch.xt, batch.x0) and torch.equal(batch.ut, batch.x1 - batch.x0)


@pytest.mark.parametrize("extra,match", [
    (("train.objective=consistency",), "unknown objective 'consistency'.*cd, cfm, ct, distill"),
    (("train.objective=distill",), "needs coupling.name=paired.*got coupling.name=independent"),
])
def test_bad_objective_is_refused_before_the_run_dir(make_cfg, tmp_path, extra, match):
    with pytest.raises(FlowmatchError, match=match):
        train(make_cfg(*extra), str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_distill_with_a_real_data_mix_is_refused(make_cfg, pair_store):  # noqa: F811
    with pytest.raises(ConfigError, match="coupling.mix must be 1"):
        build_trainer(_distill(make_cfg, pair_store, "coupling.mix=0.5"))


def test_checkpoint_names_its_objective_and_old_checkpoints_are_cfm(make_cfg, tmp_path, pair_store):  # noqa: F811
    res = train(_distill(make_cfg, pair_store, "train.steps=5"), str(tmp_path / "d"), progress=False)
    ckpt = load_checkpoint(res.checkpoint)
    assert ckpt["objective"]["name"] == "distill"
    cfm = build_trainer(make_cfg("coupling.name=paired", f"coupling.pairs={pair_store}"))
    with pytest.raises(CheckpointError, match="objective 'distill'; this run's is 'cfm'"):
        cfm.load_state_dict(ckpt)
    # a checkpoint written before objectives existed: its coupling state at the top, read as cfm's
    old = {k: v for k, v in ckpt.items() if k != "objective"} | {"coupling": ckpt["objective"]["state"]["coupling"]}
    cfm.load_state_dict(old)
    assert cfm.global_step == 5 and cfm.components.coupling.pos == ckpt["objective"]["state"]["coupling"]["pos"]


def test_moved_config_keys_load_at_their_new_place(tmp_path):
    cfg = from_dict({"reflow": {"distill_steps": 7, "distill_lr": 0.5, "distill_loss": "pseudo_huber"}})
    assert (cfg.distill.steps, cfg.distill.lr, cfg.distill.loss) == (7, 0.5, "pseudo_huber")
    path = tmp_path / "old.yaml"
    path.write_text("reflow:\n  distill_steps: 9\n")
    with pytest.warns(FutureWarning, match="reflow.distill_steps is now distill.steps"):
        assert load_config(str(path)).distill.steps == 9
    with pytest.raises(ConfigError, match="reflow.distill_lr is now distill.lr"):
        apply_overrides(ExperimentConfig(), ["reflow.distill_lr=1e-3"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert from_dict({"distill": {"steps": 3}}).distill.steps == 3


def test_registry_and_nets():
    assert OBJECTIVES["distill"] is OneStepDistill and OneStepDistill.players == ("student",)
    nets = Nets(student=torch.nn.Identity())
    assert isinstance(nets.student, torch.nn.Identity)
    with pytest.raises(AttributeError, match="no network with role 'teacher'; roles: student"):
        nets.teacher
    b = Batch(t=torch.zeros(2), more=(Batch(t=torch.ones(2)),))
    assert [x.t.sum().item() for x in b.terms()] == [0.0, 2.0]
