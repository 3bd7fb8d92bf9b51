"""The fused MLP step (the fast step's CPU path for toy MLPs): the gradients of the written-out
backward are autograd's for every supported activation; a run agrees with the plain loop to float
rounding and keeps the per-parameter checkpoint format; kill-and-resume is exact within the mode and
works across modes; the model's weights live in the flat buffers; and every run it cannot train
takes the autograd step (or, with ``train.fused=on``, is refused with the reason).

The fused step and the plain loop run different kernels (written-out backward, flat buffers, fused
AdamW, one lerp over the flat EMA), so they are compared within ``FUSED_RTOL`` (tests/conftest.py says
how it was measured); the fused step against itself (resume, state round trip, the loop against
``build_trainer``) and its AdamW call against ``optimizer.step()`` run the same kernels and are
compared bit for bit."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import FUSED_RTOL, replay_objective
from test_training import _Interrupt  # the same kill-at-step callback as the plain loop's resume tests
from flowmatch.errors import ConfigError
from flowmatch.training import build_trainer, last_checkpoint, load_checkpoint, train
from flowmatch.training.fused_mlp import FUSED_ACTIVATIONS

pytestmark = pytest.mark.crosspath

ACTS = sorted(FUSED_ACTIVATIONS.values())
BASE = ("train.steps=30", "train.log_every=5", "train.ckpt_every=10", "train.weight_decay=0.01",
        "train.grad_clip=0.5")


@pytest.mark.parametrize("act", ACTS)
def test_written_out_backward_gives_autograds_gradients(make_cfg, act):
    cfg = make_cfg(f"model.activation={act}", "path.sigma=0.1", "train.batch_size=64")
    fused = build_trainer(cfg, fast=True)
    ref = build_trainer(cfg, fast=True, fused=False)
    assert fused.fused_mlp and not ref.fused_mlp
    ref.model.load_state_dict(fused.model.state_dict())
    # the same generator state: both draw the same batch, times and path noise
    la, _ = fused.train_step.accumulate()
    lb, _ = ref.train_step.accumulate()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    for (name, pa), pb in zip(fused.model.named_parameters(), ref.model.parameters()):
        assert pa.grad is not None and pa.grad.abs().sum() > 0, name
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-7, msg=name)
    # the model's gradients are views of the flat gradient the optimiser reads
    flat = torch.cat([p.grad.reshape(-1) for p in fused.model.parameters()])
    assert torch.equal(flat, fused.fused.param.grad)


@pytest.mark.parametrize("extra", [("coupling.name=independent",), ("coupling.name=ot", "coupling.method=exact"),
                                   ("path.sigma=0.1", "time.name=logit_normal", "model.activation=tanh")],
                         ids=["independent", "ot-exact", "sigma-logit-tanh"])
def test_fused_run_agrees_with_plain_loop(make_cfg, tmp_path, extra):
    plain = train(make_cfg(*BASE, *extra, "train.fast=off"), str(tmp_path / "plain"), progress=False)
    fused = train(make_cfg(*BASE, *extra, "train.fast=on", "train.fused=on"), str(tmp_path / "fused"),
                  progress=False)
    assert len(fused.losses) == 30
    assert fused.losses == pytest.approx(plain.losses, rel=FUSED_RTOL)
    ca, cb = load_checkpoint(plain.checkpoint), load_checkpoint(fused.checkpoint)
    for key in ("model",):
        for k, v in ca[key].items():
            torch.testing.assert_close(cb[key][k], v, rtol=FUSED_RTOL, atol=FUSED_RTOL)
    for k, v in ca["ema"]["model"].items():
        torch.testing.assert_close(cb["ema"]["model"][k], v, rtol=FUSED_RTOL, atol=FUSED_RTOL)
    # the checkpoint holds the per-parameter AdamW state of the other modes, fused AdamW's flags
    oa, ob = ca["optimizer"], cb["optimizer"]
    assert ob["param_groups"][0]["fused"] is True and ob["param_groups"][0]["params"] == oa["param_groups"][0]["params"]
    assert sorted(ob["state"]) == sorted(oa["state"])
    for i, st in oa["state"].items():
        assert float(ob["state"][i]["step"]) == float(st["step"]) == 30
        for k in ("exp_avg", "exp_avg_sq"):
            assert ob["state"][i][k].shape == st[k].shape
            torch.testing.assert_close(ob["state"][i][k], st[k], rtol=1e-2, atol=1e-5)


def test_fused_kill_and_resume_is_exact_and_moves_between_modes(make_cfg, tmp_path):
    base = (*BASE, "train.steps=20", "train.ckpt_every=5", "train.fast=on")
    a = train(make_cfg(*base), str(tmp_path / "a"), progress=False)
    run_b = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*base), run_b, progress=False, on_step=_Interrupt(13))
    assert load_checkpoint(last_checkpoint(run_b))["step"] == 10
    b = train(make_cfg(*base), run_b, resume=True, progress=False)
    assert b.start_step == 10 and b.losses == a.losses[10:]
    ca, cb = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k
    for k, v in ca["ema"]["model"].items():
        assert torch.equal(v, cb["ema"]["model"][k]), k
    # a fused checkpoint resumes in the plain loop, and a plain one in the fused step: each close
    # to the unbroken fused run
    for first, then in (("on", "off"), ("off", "on")):
        run = str(tmp_path / f"{first}-{then}")
        with pytest.raises(KeyboardInterrupt):
            train(make_cfg(*BASE, "train.steps=20", "train.ckpt_every=5", f"train.fast={first}"), run,
                  progress=False, on_step=_Interrupt(13))
        c = train(make_cfg(*BASE, "train.steps=20", "train.ckpt_every=5", f"train.fast={then}"), run,
                  resume=True, progress=False)
        assert c.start_step == 10 and c.losses == pytest.approx(a.losses[10:], rel=FUSED_RTOL)
        state = load_checkpoint(c.checkpoint)
        assert bool(state["optimizer"]["param_groups"][0]["fused"]) == (then == "on")
        for k, v in ca["model"].items():
            torch.testing.assert_close(state["model"][k], v, rtol=FUSED_RTOL, atol=FUSED_RTOL)


def test_trainer_state_round_trip_continues_exactly(make_cfg):
    cfg = make_cfg("coupling.name=ot")
    a = build_trainer(cfg, fast=True)
    a.run(6)
    state = a.state_dict()
    assert len(state["optimizer"]["state"]) == len(list(a.model.parameters()))
    b = build_trainer(cfg, fast=True)
    b.load_state_dict(state)
    a.sync()
    a.run(4)
    b.run(4)
    assert a.sync() == b.sync()
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


def test_weights_live_in_the_flat_buffers(make_cfg):
    tr = build_trainer(make_cfg(), fast=True)
    flat, ema = tr.fused.param, tr.fused.ema
    params = list(tr.model.parameters())
    assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in params)
    assert all(p.untyped_storage().data_ptr() == ema.untyped_storage().data_ptr() for p in tr.ema.model.parameters())
    # loading weights into the module writes the flat buffer the optimiser updates
    other = build_trainer(make_cfg("train.seed=5", "model.hidden=16"), fast=True)
    with torch.no_grad():
        for p in other.model.parameters():
            p.fill_(0.25)
    tr.model.load_state_dict(other.model.state_dict())
    assert torch.all(flat == 0.25)
    tr.run(1)
    assert not torch.all(flat == 0.25)  # and the step updates the module's weights
    assert not torch.all(params[0] == 0.25)


def test_fast_auto_takes_the_fused_step_on_the_cpu_where_it_can(make_cfg, tmp_path):
    # train.fast=auto (the default): the fused MLP step for a toy MLP run on the CPU ...
    auto = build_trainer(make_cfg())
    assert auto.fast and auto.fused_mlp
    # ... the plain loop wherever it cannot train the run, or when either switch says off
    for extra in (("train.fast=off",), ("train.fused=off",), ("train.loss=pseudo_huber",), ("model.activation=elu",),
                  ("train.grad_accum=2",)):
        tr = build_trainer(make_cfg(*extra))
        assert not tr.fast and not tr.fused_mlp, extra
    # an explicit fast=... keeps the caller's choice; an objective without a fused implementation
    # keeps the plain loop
    assert not build_trainer(make_cfg(), fast=False).fast
    replay = replay_objective([(torch.zeros(32, 2), torch.ones(32, 2), torch.rand(32))])
    assert not build_trainer(make_cfg(), objective=replay).fast
    assert not build_trainer(make_cfg(), fused=False).fast
    # the training loop resolves it the same way: its losses are the fused trainer's
    cfg = make_cfg("train.steps=12", "train.log_every=4", "train.ckpt_every=6")
    res = train(cfg, str(tmp_path / "run"), progress=False)
    ref = build_trainer(cfg)
    ref.run(12)
    assert ref.fused_mlp and res.losses == ref.sync()
    plain = train(make_cfg("train.steps=12", "train.log_every=4", "train.ckpt_every=6", "train.fast=off"),
                  str(tmp_path / "plain"), progress=False)
    assert plain.losses == pytest.approx(res.losses, rel=FUSED_RTOL)


def test_adamw_update_is_the_optimisers_own(make_cfg):
    # the step calls the fused AdamW kernel directly: the same floats as opt.step() on a twin
    cfg = make_cfg("train.weight_decay=0.05", "train.warmup_steps=3")
    a, b = build_trainer(cfg, fast=True), build_trainer(cfg, fast=True)
    a.run(1)
    b.run(1)
    for i in range(6):
        with torch.no_grad():
            for tr in (a, b):
                tr.fused.param.grad.copy_(torch.randn(tr.fused.param.shape, generator=torch.Generator().manual_seed(i)))
        a.fused.adamw_step(a.optimizer)
        b.optimizer.step()
        for tr in (a, b):
            tr.scheduler.step()
        assert torch.equal(a.fused.param, b.fused.param)
    assert torch.equal(a.optimizer.state[a.fused.param]["step"], b.optimizer.state[b.fused.param]["step"])
    assert not torch.equal(a.fused.param, build_trainer(cfg, fast=True).fused.param)


def test_t_bins_are_the_plain_loops(make_cfg):
    cfg = make_cfg("time.name=logit_normal")
    fused, plain = build_trainer(cfg, fast=True), build_trainer(cfg)
    assert fused.fused_mlp
    for tr in (fused, plain):
        tr.run(7)
        tr.sync()
    (fs, fc), (ps, pc) = fused.take_bins(), plain.take_bins()
    assert torch.equal(fc, pc) and fc.sum().item() == 7 * cfg.train.batch_size
    assert torch.allclose(fs, ps, rtol=FUSED_RTOL)
    assert fused.take_bins()[1].sum().item() == 0  # taking them resets them


@pytest.mark.parametrize("extra,reason", [
    (("train.grad_accum=2",), "micro-batch"),
    (("train.loss=pseudo_huber",), "l2"),
    (("train.precision=bf16",), "fp32"),
    (("model.activation=elu",), "ELU"),
    (("train.compile=on",), "compiled"),
])
def test_runs_it_cannot_train_take_the_autograd_step(make_cfg, extra, reason):
    tr = build_trainer(make_cfg(*extra), fast=True)
    assert not tr.fused_mlp
    with pytest.raises(ConfigError, match=reason):
        build_trainer(make_cfg(*extra, "train.fused=on"), fast=True)


def test_fused_settings_are_checked(make_cfg, tmp_path):
    # an objective without a fused implementation takes the autograd step
    tr = build_trainer(make_cfg(), fast=True, objective=replay_objective([(torch.zeros(32, 2), torch.ones(32, 2),
                                                                           torch.rand(32))]))
    assert not tr.fused_mlp
    assert not build_trainer(make_cfg("train.fused=off"), fast=True).fused_mlp
    assert not build_trainer(make_cfg(), fast=False).fused_mlp  # the plain loop is never fused
    with pytest.raises(ConfigError, match="train.fast=on"):
        build_trainer(make_cfg("train.fused=on"), fast=False)
    with pytest.raises(ConfigError, match="train.fused"):
        train(make_cfg("train.fused=sometimes"), str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run")
