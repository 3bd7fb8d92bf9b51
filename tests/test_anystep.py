"""Any-step models: shortcut models and MeanFlow (flowmatch.distill.shortcut, .meanflow, .anystep).

Closed forms written here: the average velocity of ``v = a t + b``, of ``v = -x`` and of the marginal
flow from N(0, 1) to N(mu, sigma^2) under the independent coupling (``x_t = t mu + std(t) z``,
``std(t)^2 = (1 - t)^2 + t^2 sigma^2``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_tiny_cfg
from flowmatch.config import apply_overrides
from flowmatch.distill import (MeanFlow, Shortcut, adaptive_weight, check_anystep_config, meanflow_target,
                               meanflow_times, sample_anystep, shortcut_target)
from flowmatch.errors import CheckpointError, ConfigError
from flowmatch.models import MLPVelocity, UNetVelocity
from flowmatch.training import Batch, build_trainer, load_model, train
from flowmatch.utils import make_generator
from test_ddp import _spawn
from test_models import DATA
from test_training import _run_killed_and_resumed

F64 = torch.float64
M, S = torch.tensor([2.0, -1.0], dtype=F64), 0.5  # the straight map x1 = M + S x0


def _straight_v(x, t, h=None):
    """The straight flow of x1 = M + S x0: v(x, t) = M + (S - 1) x0, x0 = (x - t M) / (1 + t (S - 1))."""
    t = t[:, None]
    return M + (S - 1) * (x - t * M) / (1 + t * (S - 1))


def _draws(n=64, seed=0):
    g = make_generator(seed)
    x = torch.randn(n, 2, generator=g, dtype=F64)
    t = 0.9 * torch.rand(n, generator=g, dtype=F64)
    h = (1 - t) * torch.rand(n, generator=g, dtype=F64)
    return x, t, h


# --------------------------------------------------------------------------- shortcut targets


@pytest.mark.parametrize("k", range(8))
def test_the_shortcut_target_of_a_straight_field_is_its_flow_target_at_every_d(k):
    x, _, _ = _draws()
    d = torch.full((64,), 2.0 ** -k, dtype=F64)
    t = torch.floor(torch.rand(64, generator=make_generator(k), dtype=F64) / d) * d  # d's grid
    target = shortcut_target(_straight_v, x, t, d)
    torch.testing.assert_close(target, _straight_v(x, t), rtol=1e-12, atol=1e-12)
    # not vacuous: on the curved v = -x two half Euler steps average to -x (1 - d / 4), not -x
    curved = shortcut_target(lambda x, t, h: -x, x, t, d)
    torch.testing.assert_close(curved, -x * (1 - d[:, None] / 4), rtol=1e-12, atol=1e-12)


def test_shortcut_draws_put_the_self_consistency_rows_on_their_grids():
    cfg = make_tiny_cfg("train.objective=shortcut", "model.step_input=true", "shortcut.base_steps=16",
                        "train.batch_size=256", "shortcut.self_consistency=0.25")
    tr = build_trainer(cfg)
    b = tr.objective.draw(make_generator(0))
    d, t, n = b.extra["d"], b.t, 64
    k = -torch.log2(d[:n])
    assert torch.equal(k, k.round()) and set(k.long().tolist()) == {0, 1, 2, 3}  # d = 1 .. 2 / base_steps
    assert torch.equal(t[:n] / d[:n], (t[:n] / d[:n]).round()) and bool((t[:n] + d[:n] <= 1).all())
    assert torch.equal(d[n:], torch.full((192,), 1 / 16))
    torch.testing.assert_close(b.xt, (1 - t[:, None]) * b.x0 + t[:, None] * b.x1)


# --------------------------------------------------------------------------- MeanFlow targets


def test_the_meanflow_target_of_a_linear_in_time_field_is_its_average_velocity():
    x, t, h = _draws()
    h[:16] = 0  # the flow-matching rows: u = v
    a, b = torch.tensor([1.5, -2.0], dtype=F64), torch.tensor([0.3, 0.7], dtype=F64)

    def u(x, t, h):  # (1 / h) int_t^{t + h} (a tau + b) dtau
        return a * (t + h / 2)[:, None] + b + 0 * x

    v = a * t[:, None] + b + 0 * x
    torch.testing.assert_close(meanflow_target(u, x, t, h, v), u(x, t, h), rtol=1e-12, atol=1e-12)


def test_the_meanflow_target_of_v_equals_minus_x_is_its_average_velocity():
    x, t, h = _draws()  # h > 0

    def u(x, t, h):  # x_{t + h} = x e^{-h}: u = x (e^{-h} - 1) / h
        return x * (torch.expm1(-h) / h)[:, None]

    torch.testing.assert_close(meanflow_target(u, x, t, h, -x), u(x, t, h), rtol=1e-10, atol=1e-12)
    # the identity's sign: the tangent of h is -1 (the end t + h fixed); with +1 the target is off
    wrong = -x + h[:, None] * torch.func.jvp(u, (x, t, h), (-x, torch.ones_like(t), torch.ones_like(t)))[1]
    assert (wrong - u(x, t, h)).abs().max() > 1e-2


@pytest.mark.parametrize("mu,sigma", [(2.0, 0.5), (-1.0, 3.0)])
def test_the_meanflow_target_of_the_gaussian_to_gaussian_flow_is_its_average_velocity(mu, sigma):
    x, t, h = _draws()

    def std(t):
        return torch.sqrt((1 - t) ** 2 + (t * sigma) ** 2)

    def v(x, t):  # the marginal velocity of N(0, 1) -> N(mu, sigma^2) under the independent coupling
        dstd = (-(1 - t) + t * sigma ** 2) / std(t)
        return mu + (dstd / std(t))[:, None] * (x - t[:, None] * mu)

    def u(x, t, h):  # (x_{t + h} - x_t) / h along the flow map x_s = s mu + std(s) / std(t) (x_t - t mu)
        s = t + h
        xs = s[:, None] * mu + (std(s) / std(t))[:, None] * (x - t[:, None] * mu)
        return (xs - x) / h[:, None]

    torch.testing.assert_close(meanflow_target(u, x, t, h, v(x, t)), u(x, t, h), rtol=1e-9, atol=1e-10)


def test_the_jvp_matches_central_finite_differences_on_a_network():
    torch.manual_seed(0)
    net = MLPVelocity(dim=2, hidden=32, depth=2, time_dim=16, step_input=True, time_scale=10.0).double()
    nn.init.normal_(net.step_proj.weight, std=0.5)
    x, t, h = _draws(16)
    v = torch.randn(16, 2, generator=make_generator(5), dtype=F64)

    def u(x, t, h):
        return net(x, t, h=h)

    with torch.no_grad():
        dudt = (meanflow_target(u, x, t, h, v) - v) / h[:, None]
        eps = 1e-6  # along (v, 1, -1): x + e v, t + e, h - e
        fd = (u(x + eps * v, t + eps, h - eps) - u(x - eps * v, t - eps, h + eps)) / (2 * eps)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-7)
    assert dudt.abs().mean() > 0.1


def test_the_jvp_matches_finite_differences_through_the_unet_with_attention():
    torch.manual_seed(0)  # float32 (the UNet embeds in fp32) and time_scale 1, so a step of 1e-2 resolves it
    net = UNetVelocity(1, 8, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                       step_input=True, time_scale=1.0)
    nn.init.normal_(net.out_conv.weight, std=0.1)
    nn.init.normal_(net.step_proj.weight, std=0.1)
    g = make_generator(2)
    x, v = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    t, h = 0.5 * torch.rand(3, generator=g), 0.5 * torch.rand(3, generator=g)

    def u(x, t, h):
        return net(x, t, h=h)

    with torch.no_grad():
        dudt = (meanflow_target(u, x, t, h, v) - v) / h[:, None, None, None]
        eps = 1e-2
        fd = (u(x + eps * v, t + eps, h - eps) - u(x - eps * v, t - eps, h + eps)) / (2 * eps)
    assert (dudt - fd).abs().max() < 1e-2 * fd.abs().max()  # measured 1.2e-3 of it


def test_meanflow_times_and_the_adaptive_weight():
    t, h = meanflow_times(20000, jump_fraction=0.25, logit_mean=0.4, logit_std=1.0, generator=make_generator(0))
    assert bool((t >= 0).all() and (h >= 0).all() and (t + h <= 1).all())
    assert (h > 0).double().mean().item() == pytest.approx(0.25, abs=0.01)
    # the paper's logit-normal(-0.4, 1) in its time t' = 1 - t: the logit of both draws has mean +0.4 here
    both = torch.logit(torch.cat([t[h > 0], (t + h)[h > 0]]))  # the two draws of the jump rows
    assert both.mean().item() == pytest.approx(0.4, abs=0.05) and both.std().item() == pytest.approx(1.0, abs=0.05)
    e = torch.tensor([0.0, 1e-3, 1.0, 100.0], requires_grad=True)
    w = adaptive_weight(e, 1.0, 1e-3)
    torch.testing.assert_close(w, e.detach() / (e.detach() + 1e-3))
    w.sum().backward()  # the weight is under stop-gradient: d/de = 1 / (e + eps)
    torch.testing.assert_close(e.grad, 1 / (e.detach() + 1e-3))
    assert torch.equal(adaptive_weight(e, 0.0, 1e-3), e)


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("family,steps", [("meanflow", 1), ("meanflow", 3), ("shortcut", 1), ("shortcut", 8)])
def test_anystep_sampling_with_the_exact_average_velocity_lands_on_the_flow(family, steps):
    x0 = torch.randn(32, 2, generator=make_generator(1), dtype=F64)
    calls = []

    def u(x, t, cond=None, h=None):  # v = -x: every jump exact
        calls.append(h)
        return x * (torch.expm1(-h) / h)[:, None]

    u.step_input = True  # the field declares its step input (the anystep solver refuses one that does not)
    traj = sample_anystep(u, x0, steps, family=family, return_trajectory=True)
    torch.testing.assert_close(traj.x1, x0 * math.exp(-1), rtol=1e-12, atol=1e-12)
    assert traj.nfe == steps == len(calls) and traj.xs.shape == (steps + 1, 32, 2)
    assert all(torch.allclose(h, torch.full_like(h, 1 / steps)) for h in calls)


def test_anystep_sampling_refuses_bad_steps():
    x0, u = torch.randn(4, 2), (lambda x, t, cond=None, h=None: x)
    u.step_input = True
    for steps, family, match in [(0, "meanflow", "steps = 0: must be an integer >= 1"),
                                 (2.5, "meanflow", "must be an integer"),
                                 (3, "shortcut", "steps = 3: a shortcut model samples with a power of two"),
                                 (4, "euler", "family = 'euler': must be one of shortcut, meanflow")]:
        with pytest.raises(ConfigError, match=match):
            sample_anystep(u, x0, steps, family=family)
    with pytest.raises(ConfigError, match="trained for at most 8 steps"):
        sample_anystep(u, x0, 16, family="shortcut", max_steps=8)
    with pytest.raises(ValueError, match="non-finite"):
        sample_anystep(u, torch.tensor([[float("nan"), 0.0]]), 1)
    with pytest.raises(ConfigError, match="^solver 'anystep' jumps with an any-step model .*MLPVelocity has no step "
                                          "input h: sample it with a flow solver") as e:
        sample_anystep(MLPVelocity(dim=2, hidden=8, depth=1), x0, 2)  # a plain flow model: refused, not run
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- config and refusals


@pytest.mark.parametrize("key,value,match", [
    ("shortcut.self_consistency", 1.5, r"must be a number in \[0, 1\]"),
    ("shortcut.self_consistency", -0.1, r"must be a number in \[0, 1\]"),
    ("shortcut.base_steps", 12, "must be a power of two"),
    ("shortcut.base_steps", 1, "must be an integer >= 2"),
    ("shortcut.ema", 1.0, r"must be a number in \[0, 1\)"),
    ("meanflow.jump_fraction", 2.0, r"must be a number in \[0, 1\]"),
    ("meanflow.eps", ".nan", "meanflow.eps = nan"),
    ("meanflow.logit_mean", ".inf", "must be a finite number"),
    ("meanflow.logit_std", 0.0, "must be a finite number > 0"),
    ("meanflow.power", -1.0, "must be a finite number >= 0"),
])
def test_the_config_sections_check_their_ranges(key, value, match):
    with pytest.raises(ConfigError, match=match):
        make_tiny_cfg(f"{key}={value}")


def test_the_defaults_are_the_papers():
    cfg = make_tiny_cfg()
    assert (cfg.shortcut.self_consistency, cfg.shortcut.base_steps) == (0.125, 128)
    assert (cfg.meanflow.jump_fraction, cfg.meanflow.logit_mean, cfg.meanflow.logit_std) == (0.25, 0.4, 1.0)
    assert (cfg.meanflow.power, cfg.meanflow.eps, cfg.model.step_input) == (1.0, 1e-3, False)


@pytest.mark.parametrize("objective", ["shortcut", "meanflow"])
def test_the_objectives_refuse_a_model_without_step_input_and_class_labels(objective):
    with pytest.raises(ConfigError, match=f"train.objective={objective} trains a model with a step input"):
        build_trainer(make_tiny_cfg(f"train.objective={objective}"))
    cfg = apply_overrides(make_tiny_cfg(), ["model.class_cond=true", "model.step_input=true"])
    with pytest.raises(ConfigError, match=f"train.objective={objective} does not take class labels yet"):
        check_anystep_config(cfg, objective)


# --------------------------------------------------------------------------- training from a teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return train(make_tiny_cfg("train.steps=10"), str(tmp_path_factory.mktemp("teacher")), progress=False).checkpoint


@pytest.mark.parametrize("init", ["teacher", "v1"])
def test_a_step_input_student_starts_as_its_flow_teacher(teacher, init):
    path = teacher if init == "teacher" else str(DATA / "plain_mlp_v1.pt")  # a checkpoint of the code before
    cfg = make_tiny_cfg("train.objective=meanflow", "model.step_input=true", f"train.init={path}")
    tr = build_trainer(cfg)
    ref = load_model(path).model
    x, t, _ = _draws(16)
    x, t = x.float(), t.float()
    with torch.no_grad():
        for h in (None, torch.full((16,), 0.5), torch.rand(16, generator=make_generator(3))):
            assert torch.equal(tr.model(x, t, h=h), ref(x, t))
    with pytest.raises(CheckpointError, match="its model differs at model.hidden"):
        build_trainer(apply_overrides(cfg, ["model.hidden=8"]))


@pytest.mark.parametrize("extra", [("train.objective=shortcut", "shortcut.base_steps=8", "shortcut.ema=0.9"),
                                   ("train.objective=shortcut", "shortcut.base_steps=4", "shortcut.ema=0"),
                                   ("train.objective=meanflow", "meanflow.jump_fraction=0.5"),
                                   ("train.objective=meanflow", "meanflow.velocity=teacher")],
                         ids=["shortcut-ema", "shortcut-sg", "meanflow", "meanflow-teacher"])
def test_kill_and_resume_equals_the_unbroken_run(tmp_path, teacher, extra):
    cfg = make_tiny_cfg(*extra, "model.step_input=true", f"train.init={teacher}", "train.steps=20")
    a, b, ca, cb = _run_killed_and_resumed(cfg, tmp_path)
    assert b.start_step == 10 and b.losses == a.losses[10:]
    assert ("target" in ca.get("nets", {})) == ("shortcut.ema=0.9" in extra)
    evals = ca["objective"]["state"]["teacher_evals"]  # counted a row each, resumed with the run
    assert evals == cb["objective"]["state"]["teacher_evals"] == (20 * 32 if "velocity=teacher" in extra[1] else 0)
    for k, v in ca["ema"]["model"].items():
        assert torch.equal(v, cb["ema"]["model"][k])
    assert all(math.isfinite(x) for x in a.losses)
    model = load_model(a.checkpoint).model  # rebuilt from its config with the step input, loaded strictly
    assert model.step_proj is not None and model.step_proj.weight.abs().sum() > 0
    x0 = torch.randn(8, 2, generator=make_generator(4))
    family = extra[0].split("=")[1]
    assert torch.isfinite(sample_anystep(model, x0, 2, family=family, max_steps=8).x1).all()


@pytest.mark.parametrize("objective,rows", [("shortcut", "shortcut.self_consistency=0"),
                                            ("meanflow", "meanflow.jump_fraction=0")])
def test_with_the_teachers_velocity_a_student_at_its_teacher_has_no_flow_loss(teacher, objective, rows):
    """Every row a flow row (no self-consistency rows; h = 0): the student starts as its teacher, so with
    ``velocity: teacher`` its loss is zero, and with the paper's conditional velocity it is not; the teacher's
    evaluations are counted a row each."""
    losses = {}
    for velocity in ("teacher", "data"):
        cfg = make_tiny_cfg(f"train.objective={objective}", rows, "model.step_input=true", f"train.init={teacher}",
                            f"{objective}.velocity={velocity}", "train.batch_size=32")
        tr = build_trainer(cfg)
        batch = tr.objective.draw(make_generator(5))
        assert tr.objective.teacher_evals == (32 if velocity == "teacher" else 0)
        with torch.no_grad():
            out = tr.objective.loss(tr.nets, batch)
        losses[velocity] = out.per_sample
    assert torch.equal(losses["teacher"], torch.zeros(32)) and bool((losses["data"] > 0).all())


@pytest.mark.parametrize("objective", ["shortcut", "meanflow"])
def test_the_teachers_velocity_needs_a_teacher_of_the_same_data(tmp_path, teacher, objective):
    base = (f"train.objective={objective}", "model.step_input=true", f"{objective}.velocity=teacher")
    with pytest.raises(ConfigError, match=f"^{objective}.velocity=teacher regresses a flow teacher's velocity: set "
                                          f"{objective}.teacher \\(or train.init\\) to its checkpoint$"):
        build_trainer(make_tiny_cfg(*base))
    other = train(make_tiny_cfg("train.steps=2", "data.target=gaussian", "data.dim=3"), str(tmp_path),
                  progress=False).checkpoint
    with pytest.raises(ConfigError, match=f"^{objective}.teacher .* was trained on data of shape \\(3,\\); this "
                                          f"run's data have shape \\(2,\\)$"):
        build_trainer(make_tiny_cfg(*base, f"train.init={teacher}", f"{objective}.teacher={other}"))


def test_meanflow_learns_a_one_step_map_that_one_euler_step_of_flow_matching_misses():
    from flowmatch.data.toy import get_dataset
    from flowmatch.metrics import w2

    target = get_dataset("8gaussians").sample(1000, generator=make_generator(9))
    x0 = torch.randn(1000, 2, generator=make_generator(8))
    scores = {}
    for objective in ("cfm", "meanflow"):
        tr = build_trainer(make_tiny_cfg(f"train.objective={objective}", "model.step_input=true", "model.hidden=64",
                                         "model.time_dim=32", "train.batch_size=256", "train.lr=3e-3",
                                         "train.ema_decay=0.99", "train.steps=200"))
        tr.run(200)
        with torch.no_grad():
            scores[objective] = w2(sample_anystep(tr.ema.model, x0, 1).x1, target)
    # measured: cfm 3.44 (one Euler step lands near the mean), meanflow 2.14 (ratio 0.62)
    assert scores["meanflow"] < 0.8 * scores["cfm"], scores


# --------------------------------------------------------------------------- under DDP

ROWS = 32  # the whole batch; each of the 2 ranks takes half


def _meanflow_batch():
    g = make_generator(11)
    x0 = torch.randn(ROWS, 2, generator=g)
    x1 = 2 + torch.randn(ROWS, 2, generator=g)
    t, h = meanflow_times(ROWS, jump_fraction=0.5, logit_mean=0.4, logit_std=1.0, generator=g)
    return x0, x1, t, h


def _replay_meanflow(rows: slice):
    class Replay(MeanFlow):
        def draw(self, generator):
            x0, x1, t, h = (a[rows] for a in _meanflow_batch())
            ps = self.comp.path.sample(x0, x1, t, generator=generator)
            return Batch(t=ps.t, xt=ps.xt, ut=ps.ut, x0=x0, x1=x1, extra={"h": h})

    return Replay


def _shortcut_batch(rows: list):
    """Rows ``rows`` of a fixed shortcut batch of ``ROWS``: rows 0-3 carry self-consistency targets
    (rank 0 takes 0, 1 and 4-17; rank 1 takes 2, 3 and 18-31; one process takes them all in order)."""
    g = make_generator(12)
    x0, x1 = torch.randn(ROWS, 2, generator=g), 2 + torch.randn(ROWS, 2, generator=g)
    d = torch.full((ROWS,), 1 / 8)
    d[:4] = torch.tensor([0.5, 0.25, 1.0, 0.25])
    t = torch.rand(ROWS, generator=g)
    t[:4] = torch.floor(t[:4] / d[:4]) * d[:4]
    idx = torch.tensor(rows)
    return x0[idx], x1[idx], t[idx], d[idx]


def _replay_shortcut(rows: list):
    class Replay(Shortcut):
        def draw(self, generator):
            x0, x1, t, d = _shortcut_batch(rows)
            ps = self.comp.path.sample(x0, x1, t, generator=generator)
            return Batch(t=ps.t, xt=ps.xt, ut=ps.ut, x0=x0, x1=x1, extra={"d": d})

    return Replay


def _trainer(objective: str, rows, batch_size: int):
    replay = _replay_meanflow(rows) if objective == "meanflow" else _replay_shortcut(rows)
    # self_consistency 0.125: 2 rows of each rank's 16, 4 of the whole 32
    tr = build_trainer(make_tiny_cfg(f"train.objective={objective}", "model.step_input=true", "train.grad_clip=0.05",
                                     f"train.batch_size={batch_size}", "shortcut.base_steps=8", "shortcut.ema=0.9"),
                       fast=False, objective=replay)
    with torch.no_grad():  # a step projection away from zero, the same on every rank
        tr.model.step_proj.weight.copy_(torch.randn(tr.model.step_proj.weight.shape, generator=make_generator(5)))
    return tr


def _rank_rows(objective: str, rank: int):
    half = ROWS // 2
    if objective == "meanflow":
        return slice(rank * half, (rank + 1) * half)
    return [2 * rank, 2 * rank + 1, *range(4 + 14 * rank, 18 + 14 * rank)]


def _anystep_rank(rank: int, out_dir: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    res = {}
    for objective in ("meanflow", "shortcut"):
        tr = _trainer(objective, _rank_rows(objective, rank), ROWS // 2)
        assert isinstance(tr.net, DistributedDataParallel)
        loss, _ = tr.train_step.accumulate()
        res[objective] = {"loss": loss.item(), "grads": [p.grad.clone() for p in tr.model.parameters()]}
        tr.step()
        res[objective]["params"] = [p.detach().clone() for p in tr.model.parameters()]
    return res


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _spawn(str(tmp_path_factory.mktemp("anystep_ddp")), results=_anystep_rank)


@pytest.mark.crosspath  # two ranks against one process: another reduction order, within rel 1e-5
@pytest.mark.parametrize("objective", ["meanflow", "shortcut"])
def test_two_process_ddp_gives_the_single_process_gradient(ranks, objective):
    ref = _trainer(objective, slice(0, ROWS) if objective == "meanflow" else list(range(ROWS)), ROWS)
    assert ref.world_size == 1
    loss, _ = ref.train_step.accumulate()
    grads = [p.grad.clone() for p in ref.model.parameters()]
    assert grads[-1].abs().sum() > 0 and ref.model.step_proj.weight.grad.abs().sum() > 0
    ref.step()
    for res in (r[objective] for r in ranks):
        assert res["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for a, b in zip(res["grads"], grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(res["params"], ref.model.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
