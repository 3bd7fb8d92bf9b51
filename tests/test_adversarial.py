"""Adversarial post-training (objective ``apt``, flowmatch.distill.adversarial): its R1 penalties against
closed forms, the discriminator built from the teacher, the players' alternation, a 1-D GAN toy, exact
resume through the loop, model selection (best.pt) and the bad inputs."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import flowmatch.evaluation  # noqa: F401 - registers the validation scorer
from conftest import make_tiny_cfg
from flowmatch.config import apply_overrides, to_dict
from flowmatch.distill.adversarial import (AdversarialPostTraining, Discriminator, LogitAnchors, approx_r1, augment,
                                           augment_params, discriminator_loss, discriminator_updates, dmd_gradient,
                                           dmd_loss, exact_r1, fake_updates, generator_loss, lecam, one_step,
                                           shifted_time)
from flowmatch.data.task import build_task
from flowmatch.errors import ConfigError, NonFiniteLossError
from flowmatch.metrics.distances import w2
from flowmatch.models import build_model
from flowmatch.training import (OBJECTIVES, build_trainer, load_checkpoint, load_model, read_metrics,
                                save_checkpoint, train)
from flowmatch.training.objectives import Validation
from flowmatch.types import LossOutput
from test_training import _Interrupt


# --------------------------------------------------------------------------- fixtures: a teacher and a one-step model


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny flow teacher (cfm) and a tiny one-step model (ct, from the teacher) on gaussian -> 8gaussians."""
    root = tmp_path_factory.mktemp("apt")
    teacher = train(make_tiny_cfg("train.steps=10", "train.fast=off"), str(root / "teacher"), progress=False).checkpoint
    gen = train(make_tiny_cfg("train.objective=ct", "train.steps=5", "train.fast=off", f"train.init={teacher}"),
                str(root / "gen"), progress=False).checkpoint
    return {"teacher": teacher, "gen": gen, "root": root}


def _cfg(ckpts, *extra):
    return make_tiny_cfg("train.objective=apt", f"train.init={ckpts['gen']}", f"apt.discriminator_init={ckpts['teacher']}",
                         "train.grad_clip=0", "train.warmup_steps=0", "train.fast=off", "apt.eval_every=0",
                         "apt.lr_g=1e-3", "apt.lr_d=1e-3", *extra)


def _edited(ckpts, which: str, name: str, **sections) -> str:
    """A copy of checkpoint ``which`` whose config has ``sections`` replaced (keys of each)."""
    ckpt = load_checkpoint(ckpts[which])
    cfg = copy.deepcopy(ckpt["config"])
    for section, keys in sections.items():
        cfg[section].update(keys)
    path = str(ckpts["root"] / f"{name}.pt")
    save_checkpoint(path, {**{k: v for k, v in ckpt.items() if k not in ("format", "version")}, "config": cfg})
    return path


# --------------------------------------------------------------------------- R1 against closed forms


def test_approx_r1_matches_its_small_sigma_expansion():
    """D(x) = a.x + b x.x: D(x + s e) - D(x) = s e.g + b s^2 |e|^2 with g = a + 2 b x, so
    E (D(x) - D(x + s e))^2 = s^2 |g|^2 + b^2 s^4 d (d + 2), the leading term lambda s^2 |grad D|^2."""
    gen = torch.Generator().manual_seed(0)
    d_dim, n, sigma, b = 3, 200_000, 0.05, 0.7
    a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    x = torch.tensor([[0.3, -0.2, 1.0], [1.5, 0.4, -0.7]], dtype=torch.float64)

    def d(z, t):
        return z @ a + b * (z * z).sum(1)

    grad = a + 2 * b * x  # [2, 3]
    t = torch.zeros(n, dtype=torch.float64)
    for i in range(2):
        xi = x[i].expand(n, d_dim)
        eps = torch.randn(n, d_dim, generator=gen, dtype=torch.float64)
        mc = approx_r1(d, xi, t, eps, sigma).mean().item()
        expected = sigma ** 2 * grad[i].pow(2).sum().item() + b ** 2 * sigma ** 4 * d_dim * (d_dim + 2)
        assert mc == pytest.approx(expected, rel=0.015)  # Monte Carlo: relative sd sqrt(2 / n) = 0.3%
        leading = sigma ** 2 * grad[i].pow(2).sum().item()
        assert mc == pytest.approx(leading, rel=0.02)  # the O(sigma^4) term is below 0.1% here
    # exact R1 is |grad_x D|^2 itself
    assert torch.allclose(exact_r1(d, x, t[:2]), grad.pow(2).sum(1))


def test_loss_functions_and_time_shift():
    dr, df = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0])
    sp = torch.nn.functional.softplus
    assert torch.allclose(discriminator_loss(dr, df), sp(-dr) + sp(df))
    assert torch.allclose(discriminator_loss(dr, df, "relativistic"), sp(df - dr))
    assert torch.allclose(generator_loss(None, df), sp(-df))
    assert torch.allclose(generator_loss(dr, df, "relativistic"), sp(dr - df))
    u = torch.linspace(0, 1, 11)
    assert torch.allclose(shifted_time(u, 1.0), 1 - u)
    t3 = shifted_time(u, 3.0)  # towards the noise end (t = 0 in our convention), endpoints kept
    assert t3[0] == 1 and t3[-1] == 0 and bool((t3[1:-1] < (1 - u)[1:-1]).all())


def test_lecam_penalises_each_side_past_the_other_sides_anchor_and_its_anchors_are_debiased_averages():
    dr, df = torch.tensor([2.0, -0.5]), torch.tensor([0.5, -1.0])
    # real logits above the fake anchor 0.2, fake logits below the real anchor 1.0: each from the far side only
    want = torch.tensor([(2.0 - 0.2) ** 2 + (1.0 - 0.5) ** 2, 0.0 + (1.0 + 1.0) ** 2])
    assert torch.allclose(lecam(dr, df, torch.tensor(1.0), torch.tensor(0.2)), want)
    assert torch.equal(lecam(dr, df, torch.tensor(-5.0), torch.tensor(5.0)), torch.zeros(2))
    anchors = LogitAnchors(0.9)
    a_real, a_fake = anchors.update(dr, df)  # zero-debiased: the first update is the batch's means
    assert a_real.item() == pytest.approx(0.75) and a_fake.item() == pytest.approx(-0.25)
    a_real, a_fake = anchors.update(torch.tensor([3.0]), torch.tensor([1.0]))
    assert a_real.item() == pytest.approx((0.9 * 0.1 * 0.75 + 0.1 * 3.0) / (1 - 0.9 ** 2))
    assert a_fake.item() == pytest.approx((0.9 * 0.1 * -0.25 + 0.1 * 1.0) / (1 - 0.9 ** 2))
    again = LogitAnchors(0.9)
    again.load_state_dict(anchors.state_dict())
    assert [v.item() for v in again.update(dr, df)] == [v.item() for v in anchors.update(dr, df)]


def test_lecam_is_added_to_the_discriminators_loss_alone(ckpts):
    trainer = build_trainer(_cfg(ckpts, "apt.lecam_weight=2", "apt.r1=none"))
    obj, disc = trainer.objective, trainer.nets_raw["discriminator"]
    batch = obj.draw(torch.Generator().manual_seed(0))
    with torch.no_grad():
        d_real, d_fake = disc(batch.x1, batch.t), disc(one_step(trainer.model, batch.x0), batch.t)
    out = obj.loss(trainer.nets, batch, "discriminator")
    # the first update's anchors are its own batch means
    want = 2 * lecam(d_real, d_fake, d_real.mean(), d_fake.mean()).mean()
    assert want > 0 and out.extra["apt/lecam"].item() == pytest.approx(want.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(out.extra["apt/d_loss"].item() + want.item(), rel=1e-5)
    assert "apt/lecam" not in obj.loss(trainer.nets, batch, "student").extra
    assert obj.anchors.n == 1 and "lecam" in obj.state_dict()
    assert build_trainer(_cfg(ckpts)).objective.anchors is None  # off by default


def test_lecam_keeps_the_discriminators_logits_on_the_two_sides_closer(ckpts, tmp_path):
    """The same 30 updates from the same start, with and without LeCam: with it the discriminator's mean logits
    on real and on generated rows stay nearer each other."""
    gaps = {}
    for w in (0, 5):
        train(_cfg(ckpts, "train.steps=30", "train.log_every=30", "apt.lr_g=1e-6", "apt.lr_d=3e-3",
                   f"apt.lecam_weight={w}"), str(tmp_path / str(w)), progress=False)
        row = [r for r in read_metrics(str(tmp_path / str(w) / "metrics.jsonl")) if "apt/d_real" in r][-1]
        gaps[w] = row["apt/d_real"] - row["apt/d_fake"]
    assert gaps[0] > 0 and abs(gaps[5]) < 0.5 * gaps[0], gaps


# --------------------------------------------------------------------------- the discriminator


def test_discriminator_backbone_equals_the_teacher_at_initialisation(ckpts):
    trainer = build_trainer(_cfg(ckpts))
    disc = trainer.nets_raw["discriminator"]
    teacher = load_model(ckpts["teacher"]).model
    mine, theirs = disc.backbone.state_dict(), teacher.state_dict()
    last = len(teacher.net) - 1  # the velocity output layer: dropped (its output is not a feature)
    assert set(theirs) - set(mine) == {f"net.{last}.weight", f"net.{last}.bias"}
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k
    # the features are the teacher's hidden activations, every layer's
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o)) for m in teacher.net[:-1]
             if not isinstance(m, torch.nn.Linear)]
    x, t = torch.randn(5, 2, generator=torch.Generator().manual_seed(1)), torch.rand(5)
    with torch.no_grad():
        teacher(x, t)
        feats = disc.features(x, t)
    for h in hooks:
        h.remove()
    assert len(feats) == len(acts) == 2 and all(torch.equal(f, a) for f, a in zip(feats, acts))
    # every parameter is trained, the generator's student is train.init's EMA weights
    assert all(p.requires_grad for p in disc.parameters())
    gen = load_model(ckpts["gen"]).model.state_dict()
    assert all(torch.equal(v, gen[k]) for k, v in trainer.model.state_dict().items())
    rand = build_trainer(_cfg(ckpts, "apt.discriminator_init=random")).nets_raw["discriminator"]
    assert not torch.equal(rand.backbone.net[0].weight, disc.backbone.net[0].weight)


def test_heads_only_discriminator_keeps_the_teachers_backbone_and_trains_its_head(ckpts, tmp_path):
    run = tmp_path / "heads"
    train(_cfg(ckpts, "apt.d_train=heads", "train.steps=3"), str(run), progress=False)
    state = load_checkpoint(str(run / "checkpoints" / "last.pt"))
    disc = state["nets"]["discriminator"]
    teacher = load_model(ckpts["teacher"]).model.state_dict()
    backbone = {k[len("backbone."):]: v for k, v in disc.items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(v, teacher[k]) for k, v in backbone.items())  # frozen
    trainer = build_trainer(_cfg(ckpts, "apt.d_train=heads"))
    start = trainer.nets_raw["discriminator"].head.weight.detach().clone()
    assert not torch.equal(disc["head.weight"], start)  # the head trained
    # the discriminator's optimiser holds the head alone
    own = {id(p) for g in trainer.players[0].optimizer.param_groups for p in g["params"]}
    head = {id(p) for p in trainer.nets_raw["discriminator"].head.parameters()}
    assert own == head
    with pytest.raises(ConfigError, match="apt.d_train=heads freezes the teacher's backbone"):
        build_trainer(_cfg(ckpts, "apt.d_train=heads", "apt.discriminator_init=random"))


@pytest.mark.parametrize("model", ["mlp", "unet"])
def test_every_discriminator_parameter_gets_a_gradient(model):
    torch.manual_seed(0)
    if model == "mlp":
        cfg, shape = make_tiny_cfg(), (2,)
    else:
        cfg, shape = make_tiny_cfg("model.name=unet", "model.preset=tiny"), (1, 8, 8)
    disc = Discriminator(build_model(cfg.model, shape, None))
    x = torch.randn(4, *shape, requires_grad=True)
    out = disc(x, torch.rand(4))
    assert out.shape == (4,)
    out.sum().backward()
    missing = [n for n, p in disc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    if model == "unet":  # heads at the middle block, the up path's 8x8 -> 4x4 end and the output norm
        assert len(disc.heads) == 3 and sorted(f.shape[-1] for f in disc.features(x, torch.rand(4))) == [4, 4, 8]


def test_fourier_head_adds_a_logit_on_random_fourier_features_of_the_input(ckpts):
    trainer = build_trainer(_cfg(ckpts, "apt.fourier_features=16", "apt.fourier_scale=0.5"))
    disc = trainer.nets_raw["discriminator"]
    assert disc.fourier_w.shape == (2, 16)
    assert disc.fourier_w.std().item() == pytest.approx(0.5, rel=0.5)  # 32 draws of N(0, 0.5^2)
    x, t = torch.randn(6, 2, generator=torch.Generator().manual_seed(3)), torch.rand(6)
    with torch.no_grad():
        z = x @ disc.fourier_w
        by_hand = (disc.head(disc.norm(torch.cat(disc.features(x, t), 1))).squeeze(1)
                   + disc.fourier(torch.cat([z.sin(), z.cos()], 1)).squeeze(1))
        assert torch.allclose(disc(x, t), by_hand, atol=1e-6)
    # the branch trains with the rest (the discriminator's optimiser holds it) and is checkpointed
    own = {id(p) for p in trainer.players[0].optimizer.param_groups[0]["params"]}
    assert all(id(p) in own for p in disc.fourier.parameters())
    assert "fourier_w" in disc.state_dict()
    # the same seed, the same frequencies; without the key, no branch
    again = build_trainer(_cfg(ckpts, "apt.fourier_features=16", "apt.fourier_scale=0.5")).nets_raw["discriminator"]
    assert torch.equal(again.fourier_w, disc.fourier_w)
    assert build_trainer(_cfg(ckpts)).nets_raw["discriminator"].fourier is None


def test_fourier_head_is_refused_for_a_unet_and_out_of_range():
    with pytest.raises(ConfigError, match=r"^apt\.fourier_features = 4: the Fourier head reads vector data"):
        Discriminator(build_model(make_tiny_cfg("model.name=unet", "model.preset=tiny").model, (1, 8, 8), None),
                      fourier_features=4)
    with pytest.raises(ConfigError, match=r"^apt\.fourier_features = -1: must be"):
        apply_overrides(make_tiny_cfg(), ["apt.fourier_features=-1"])
    with pytest.raises(ConfigError, match=r"^apt\.fourier_scale = 0.0: must be a finite number > 0$"):
        apply_overrides(make_tiny_cfg(), ["apt.fourier_scale=0"])


# --------------------------------------------------------------------------- players


@pytest.mark.parametrize("d_steps, d_warmup", [(1, 0), (3, 2)])
def test_players_alternate_and_each_optimiser_moves_only_its_own_parameters(ckpts, d_steps, d_warmup):
    trainer = build_trainer(_cfg(ckpts, f"apt.d_steps={d_steps}", f"apt.d_warmup={d_warmup}"))
    disc, student = trainer.nets_raw["discriminator"], trainer.model
    calls = []

    def snapshot():
        return ([p.detach().clone() for p in disc.parameters()], [p.detach().clone() for p in student.parameters()])

    def changed(before, after):
        return any(not torch.equal(a, b) for a, b in zip(before, after))

    for p in trainer.players:
        assert isinstance(p.optimizer, torch.optim.RMSprop)
        group = p.optimizer.param_groups[0]
        assert group["alpha"] == 0.9 and group["weight_decay"] == 0
        own = {id(q) for q in (disc if p.name == "discriminator" else student).parameters()}
        assert {id(q) for q in group["params"]} == own
        before = {}
        p.optimizer.register_step_pre_hook(lambda opt, a, k, _b=before: _b.update(state=snapshot()))
        p.optimizer.register_step_post_hook(
            lambda opt, a, k, _b=before, _n=p.name: calls.append(
                (_n, changed(_b["state"][0], snapshot()[0]), changed(_b["state"][1], snapshot()[1]))))
    for _ in range(2):
        trainer.step()
    d, g = ("discriminator", True, False), ("student", False, True)
    # d_steps discriminator updates a step and d_warmup more before the generator's first, each on a batch of its own
    assert calls == [d] * (d_warmup + d_steps) + [g] + [d] * d_steps + [g]
    assert [p.scheduler.last_epoch for p in trainer.players] == [2, 2]  # the schedules advance once a step


# --------------------------------------------------------------------------- a 1-D GAN


def test_adversarial_loss_moves_an_affine_generator_to_the_targets_mean_and_scale():
    """G(z) = a z + c against N(2, 0.5^2), a discriminator linear in (x, x^2) with approximated R1 and
    RMSProp (alpha 0.9) for both: G ends at |a| = 0.5, c = 2 (from a = 1, c = 0)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    a, c = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(0.0))
    lin = torch.nn.Linear(2, 1)

    def d(x, t):
        return lin(torch.stack([x, x * x], 1)).squeeze(1)

    opt_g = torch.optim.RMSprop([a, c], lr=1e-2, alpha=0.9)
    opt_d = torch.optim.RMSprop(lin.parameters(), lr=1e-2, alpha=0.9)
    t, trace = torch.zeros(256), []
    for i in range(900):
        z, x, eps = (torch.randn(256, generator=gen) for _ in range(3))
        x = 2.0 + 0.5 * x
        d_real = d(x, t)
        loss_d = discriminator_loss(d_real, d((a * z + c).detach(), t)).mean() \
            + 100 * approx_r1(d, x, t, eps, 0.1, d_x=d_real).mean()
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = generator_loss(None, d(a * torch.randn(256, generator=gen) + c, t)).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        if i >= 800:
            trace.append((abs(a.item()), c.item()))
    scale, mean = (sum(v) / len(trace) for v in zip(*trace))
    assert abs(mean - 2.0) < 0.1 and abs(scale - 0.5) < 0.08, (mean, scale)


# --------------------------------------------------------------------------- distribution matching (DMD)


class _GaussianFlow(torch.nn.Module):
    """The exact velocity of the straight path from N(0, 1) to N(m, s^2) in 1-D: ``E[x - n | x_t]`` at
    ``x_t = t x + (1 - t) n`` (``V = t^2 s^2 + (1 - t)^2``; ``E[x | x_t] = m + t s^2 (x_t - t m) / V``,
    ``E[n | x_t] = (1 - t) (x_t - t m) / V``), on ``[B, 1]``."""

    def __init__(self, m: float, s: float):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x, t):
        t = t.reshape(-1, 1)
        var = t ** 2 * self.s ** 2 + (1 - t) ** 2
        r = (x - t * self.m) / var
        return self.m + t * self.s ** 2 * r - (1 - t) * r


def test_dmd_gradient_is_the_gap_of_the_two_flows_denoised_means():
    """With exact flows of N(m_F, 1) (fake) and N(m_T, 1) (teacher): x_hat = E[x | x_t] (Tweedie), so the
    gradient is (m_F - m_T)(1 - t^2 / V) / mean|x - x_hat_T|; zero when the two flows agree."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1, generator=g, dtype=torch.float64) + 0.5  # float64: w is small for some rows
    n = torch.randn(64, 1, generator=g, dtype=torch.float64)
    t = 0.02 + 0.96 * torch.rand(64, generator=g, dtype=torch.float64)
    teacher, fake = _GaussianFlow(2.0, 1.0), _GaussianFlow(0.5, 1.0)
    got = dmd_gradient(teacher, fake, x, t, n)
    tt = t.reshape(-1, 1)
    var = tt ** 2 + (1 - tt) ** 2
    xt = tt * x + (1 - tt) * n
    x_hat_t = 2.0 + tt * (xt - tt * 2.0) / var
    want = (0.5 - 2.0) * (1 - tt ** 2 / var) / (x - x_hat_t).abs()
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.equal(dmd_gradient(teacher, teacher, x, t, n), torch.zeros_like(x))


def test_distribution_matching_moves_an_affine_generator_to_the_teachers_mean_and_scale():
    """G(z) = a z + c, the teacher the exact flow to N(2, 0.5^2), the fake flow the exact flow of G's
    current distribution N(c, a^2): DMD's loss (0.5 mean (x - sg(x - grad))^2) under RMSProp takes G
    from a = 1, c = 0 to |a| = 0.5, c = 2."""
    gen = torch.Generator().manual_seed(0)
    a, c = torch.nn.Parameter(torch.tensor(1.0)), torch.nn.Parameter(torch.tensor(0.0))
    opt = torch.optim.RMSprop([a, c], lr=1e-2, alpha=0.9)
    teacher, trace = _GaussianFlow(2.0, 0.5), []
    for i in range(600):
        z, n = torch.randn(256, 1, generator=gen), torch.randn(256, 1, generator=gen)
        t = 0.02 + 0.96 * torch.rand(256, generator=gen)
        x = a * z + c
        with torch.no_grad():
            grad = dmd_gradient(teacher, _GaussianFlow(c.item(), abs(a.item())), x.detach(), t, n)
        loss = dmd_loss(x, grad).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 500:
            trace.append((abs(a.item()), c.item()))
    scale, mean = (sum(v) / len(trace) for v in zip(*trace))
    assert abs(mean - 2.0) < 0.05 and abs(scale - 0.5) < 0.05, (mean, scale)


def test_distribution_matching_players_start_from_the_teacher_and_move_only_their_own_parameters(ckpts):
    trainer = build_trainer(_cfg(ckpts, "apt.dmd_weight=1", "apt.fake_steps=2", "apt.lr_fake=3e-4"))
    nets = trainer.nets_raw
    assert [p.name for p in trainer.players] == ["discriminator", "fake_score", "student"]
    teacher_sd = load_model(ckpts["teacher"]).model.state_dict()
    for role in ("teacher", "fake_score"):
        sd = nets[role].state_dict()
        assert sd.keys() == teacher_sd.keys() and all(torch.equal(sd[k], teacher_sd[k]) for k in sd), role
    assert not any(p.requires_grad for p in nets["teacher"].parameters())
    fake = next(p for p in trainer.players if p.name == "fake_score")
    assert isinstance(fake.optimizer, torch.optim.Adam) and fake.optimizer.param_groups[0]["lr"] == 3e-4
    assert {id(q) for q in fake.optimizer.param_groups[0]["params"]} == {id(q) for q in nets["fake_score"].parameters()}
    order, snap = [], {}

    def state():
        return {r: [p.detach().clone() for p in m.parameters()] for r, m in
                (("discriminator", nets["discriminator"]), ("fake_score", nets["fake_score"]),
                 ("student", trainer.model), ("teacher", nets["teacher"]))}

    for p in trainer.players:
        p.optimizer.register_step_pre_hook(lambda opt, a, k: snap.update(before=state()))
        p.optimizer.register_step_post_hook(lambda opt, a, k, _n=p.name: order.append(
            (_n, sorted(r for r, ps in state().items()
                        if any(not torch.equal(x, y) for x, y in zip(ps, snap["before"][r]))))))
    trainer.step()
    assert order == [("discriminator", ["discriminator"]), ("fake_score", ["fake_score"]),
                     ("fake_score", ["fake_score"]), ("student", ["student"])]


def test_distribution_matching_needs_the_teachers_checkpoint(ckpts):
    with pytest.raises(ConfigError, match="apt.dmd_weight = 1.0 matches the teacher's distribution"):
        build_trainer(_cfg(ckpts, "apt.dmd_weight=1", "apt.discriminator_init=random"))


def test_distribution_matching_noises_towards_the_runs_source_and_needs_a_straight_path_teacher(ckpts):
    """DMD's x_t interpolates to the teacher's x0: on an 8 Gaussians source its noise rows are 8 Gaussians
    draws (radius 5), not N(0, I); a teacher on the cosine path or with path.sigma > 0 is refused."""
    obj = build_trainer(_cfg(ckpts, "apt.dmd_weight=1", "data.source=8gaussians")).objective
    n = obj.draw(torch.Generator().manual_seed(0)).extra["dmd_n"]
    assert n.shape == (obj.batch_size, 2) and bool((n.norm(dim=1) > 2.5).all())
    for name, path in (("cosine", {"name": "cosine"}), ("smoothed", {"sigma": 0.1})):
        teacher = _edited(ckpts, "teacher", f"{name}_teacher", path=path)
        with pytest.raises(ConfigError, match="apt.dmd_weight = 1.0 denoises on the straight path"):
            build_trainer(_cfg(ckpts, "apt.dmd_weight=1", f"apt.discriminator_init={teacher}"))


def test_adversarial_weight_zero_leaves_the_generator_to_the_other_terms(ckpts):
    """adversarial_weight=0 with DMD: the generator's gradient is DMD's alone (the GAN loss is logged)."""
    cfg = _cfg(ckpts, "apt.dmd_weight=1", "apt.adversarial_weight=0")
    trainer = build_trainer(cfg)
    obj = trainer.objective
    batch = obj.draw(torch.Generator().manual_seed(1))
    out = obj.loss(trainer.nets, batch, "student")
    assert out.extra["apt/g_loss"] > 0 and torch.allclose(out.loss, out.extra["apt/dmd"])


# --------------------------------------------------------------------------- the loop: resume, logs, selection


@pytest.mark.parametrize("extra", [(), ("apt.d_steps=2", "apt.d_warmup=3"), ("apt.dmd_weight=1", "apt.fake_steps=2"),
                                   ("apt.lecam_weight=0.5",), ("apt.r2_lambda=50",)])
def test_exact_resume_of_both_players_and_logged_keys(ckpts, tmp_path, extra):
    cfg = _cfg(ckpts, *extra)
    a = train(cfg, str(tmp_path / "a"), progress=False)
    ckpt = load_checkpoint(a.checkpoint)
    roles = {"discriminator"} | ({"fake_score"} if cfg.apt.dmd_weight > 0 else set())  # the teacher is not saved
    assert ckpt["objective"]["name"] == "apt" and set(ckpt["nets"]) == roles
    assert set(ckpt["players"]) == roles and all(ckpt["players"][r]["optimizer"]["state"] for r in roles)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(tmp_path / "b"), progress=False, on_step=_Interrupt(13))
    b = train(cfg, str(tmp_path / "b"), progress=False, resume=True)
    assert b.start_step == 10 and a.losses[10:] == b.losses  # bit for bit: the same kernels in the same order
    other = load_checkpoint(b.checkpoint)
    for part in ("model", "ema"):
        for k, v in _flat(ckpt[part]).items():
            assert torch.equal(v, _flat(other[part])[k]), (part, k)
    for r in roles:
        for k, v in ckpt["nets"][r].items():
            assert torch.equal(v, other["nets"][r][k]), (r, k)
        for k, v in _flat(ckpt["players"][r]["optimizer"]["state"]).items():
            assert torch.equal(v, _flat(other["players"][r]["optimizer"]["state"])[k]), (r, k)
    for k, v in _flat(ckpt["optimizer"]["state"]).items():
        assert torch.equal(v, _flat(other["optimizer"]["state"])[k])
    assert torch.equal(ckpt["rng"]["generator"], other["rng"]["generator"])
    assert ckpt["objective"]["state"]["teacher_evals"] == other["objective"]["state"]["teacher_evals"] \
        == (cfg.train.steps * cfg.train.batch_size if cfg.apt.dmd_weight > 0 else 0)  # a call per generated sample
    rows = [r for r in read_metrics(str(tmp_path / "a" / "metrics.jsonl")) if "train/loss" in r]
    keys = ("apt/d_loss", "apt/g_loss", "apt/r1", "apt/d_real", "apt/d_fake") \
        + (("apt/dmd", "apt/fake_loss") if cfg.apt.dmd_weight > 0 else ()) \
        + (("apt/lecam",) if cfg.apt.lecam_weight > 0 else ()) + (("apt/r2",) if cfg.apt.r2_lambda > 0 else ())
    if cfg.apt.lecam_weight > 0:  # LeCam's anchors resume with the rest
        ours, theirs = ckpt["objective"]["state"]["lecam"], other["objective"]["state"]["lecam"]
        assert ours["n"] == theirs["n"] == cfg.train.steps and torch.equal(ours["acc"], theirs["acc"])
    assert len(rows) == 4 and all(all(math.isfinite(r[k]) for k in keys) for r in rows)
    assert all(r["apt/r1"] > 0 for r in rows) and all(r.get("apt/r2", 1) > 0 for r in rows)


def test_few_step_cost_counts_every_discriminator_update(ckpts, tmp_path):
    from flowmatch.few_step import _cost

    res = train(_cfg(ckpts, "train.steps=4", "apt.d_steps=2", "apt.d_warmup=3"), str(tmp_path / "r"), progress=False)
    assert _cost(res.checkpoint, res, 100, 0.0)["steps"] == 100 + 4 + (4 * 2 + 3)  # generator, then discriminator
    plain = train(_cfg(ckpts, "train.steps=4"), str(tmp_path / "p"), progress=False)
    assert _cost(plain.checkpoint, plain, 0, 0.0)["steps"] == 8  # APT's own: one update of each player a step
    assert discriminator_updates({}, 0) == 0 and discriminator_updates({"d_warmup": 3}, 1) == 4
    dmd = train(_cfg(ckpts, "train.steps=4", "apt.dmd_weight=1", "apt.fake_steps=3"), str(tmp_path / "m"),
                progress=False)
    cost = _cost(dmd.checkpoint, dmd, 0, 0.0)
    assert cost["steps"] == 4 + 4 + 4 * 3  # generator, discriminator, fake flow
    assert cost["teacher_evals"] == 4 * dmd.config.train.batch_size  # the DMD teacher: one call a generated sample
    assert fake_updates({"dmd_weight": 0.0, "fake_steps": 3}, 4) == 0 and fake_updates({"dmd_weight": 1}, 4) == 4


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("extra", [("apt.loss=relativistic",), ("apt.r1=exact",), ("apt.r1=none",),
                                   ("apt.t_shift=3.0", "train.fast=on")])
def test_loss_and_penalty_options_train(ckpts, tmp_path, extra):
    res = train(_cfg(ckpts, "train.steps=4", *extra), str(tmp_path / "r"), progress=False)
    rows = [r for r in read_metrics(str(tmp_path / "r" / "metrics.jsonl")) if "apt/r1" in r]
    assert len(res.losses) == 4 and all(math.isfinite(v) for v in res.losses)
    assert (rows[-1]["apt/r1"] == 0) == ("apt.r1=none" in extra)


def test_exact_r1_in_the_loss_is_lambda_sigma_squared_times_the_gradient_norm(ckpts):
    trainer = build_trainer(_cfg(ckpts, "apt.r1=exact", "apt.r1_lambda=7", "apt.r1_sigma=0.3"))
    obj, batch = trainer.objective, trainer.objective.draw(torch.Generator().manual_seed(0))
    out = obj.loss(trainer.nets, batch, "discriminator")
    disc = trainer.nets_raw["discriminator"]
    x = batch.x1.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(disc(x, batch.t).sum(), x)
    assert out.extra["apt/r1"].item() == pytest.approx(7 * 0.09 * g.pow(2).sum(1).mean().item(), rel=1e-5)


@pytest.mark.parametrize("mode", ["approx", "exact"])
def test_r2_is_r1s_penalty_on_the_generated_rows_in_the_discriminators_loss_alone(ckpts, mode):
    trainer = build_trainer(_cfg(ckpts, f"apt.r1={mode}", "apt.r1_lambda=0", "apt.r2_lambda=7", "apt.r1_sigma=0.3"))
    obj, disc = trainer.objective, trainer.nets_raw["discriminator"]
    batch = obj.draw(torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = one_step(trainer.model, batch.x0)
    if mode == "approx":  # with its own noise, not R1's
        eps = batch.extra["eps_fake"]
        assert eps.shape == batch.x1.shape and not torch.equal(eps, batch.extra["eps"])
        with torch.no_grad():
            want = 7 * (disc(fake, batch.t) - disc(fake + 0.3 * eps, batch.t)).pow(2).mean().item()
    else:
        x = fake.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(disc(x, batch.t).sum(), x)
        want = 7 * 0.09 * g.pow(2).sum(1).mean().item()
    out = obj.loss(trainer.nets, batch, "discriminator")
    assert want > 0 and out.extra["apt/r2"].item() == pytest.approx(want, rel=1e-5)
    assert out.extra["apt/r1"].item() == 0  # R1 off: the loss is the adversarial part and R2
    assert out.loss.item() == pytest.approx(out.extra["apt/d_loss"].item() + want, rel=1e-5)
    out.loss.backward()  # R2 trains the discriminator: its gradient differs from the loss without it
    with_r2 = [p.grad.clone() for p in disc.parameters() if p.grad is not None]
    disc.zero_grad(set_to_none=True)
    plain = build_trainer(_cfg(ckpts, f"apt.r1={mode}", "apt.r1_lambda=0"))
    plain.nets_raw["discriminator"].load_state_dict(disc.state_dict())
    plain.model.load_state_dict(trainer.model.state_dict())
    plain.objective.loss(plain.nets, batch, "discriminator").loss.backward()
    without = [p.grad for p in plain.nets_raw["discriminator"].parameters() if p.grad is not None]
    assert len(with_r2) == len(without) and any(not torch.allclose(a, b) for a, b in zip(with_r2, without))
    assert "apt/r2" not in obj.loss(trainer.nets, batch, "student").extra


def test_r2_draws_its_noise_after_everything_else_and_is_off_by_default(ckpts):
    """A run without R2 draws what it drew before R2 existed; with it, the same batch and one more draw."""
    plain, r2 = (build_trainer(_cfg(ckpts, *extra)).objective for extra in ((), ("apt.r2_lambda=1",)))
    a, b = (obj.draw(torch.Generator().manual_seed(3)) for obj in (plain, r2))
    assert "eps_fake" not in a.extra and plain.ac.r2_lambda == 0
    for k in ("x0", "x1", "t"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert set(b.extra) == set(a.extra) | {"eps_fake"} and torch.equal(a.extra["eps"], b.extra["eps"])


def test_r2_needs_r1s_form(ckpts):
    with pytest.raises(ConfigError, match=r"^apt\.r2_lambda = 1.0 takes apt\.r1's form .*apt\.r1=none"):
        build_trainer(_cfg(ckpts, "apt.r1=none", "apt.r2_lambda=1"))


@pytest.mark.parametrize("noise_inputs", [False, True])
def test_discriminator_inputs_are_clean_or_noised_to_its_time(ckpts, noise_inputs):
    trainer = build_trainer(_cfg(ckpts, f"apt.noise_inputs={str(noise_inputs).lower()}", "apt.r1=exact",
                                 "apt.r1_sigma=0.5"))
    obj, disc, student = trainer.objective, trainer.nets_raw["discriminator"], trainer.model
    batch = obj.draw(torch.Generator().manual_seed(0))
    t = batch.t[:, None]
    with torch.no_grad():
        fake = batch.x0 + student(batch.x0, torch.zeros_like(batch.t))
    if noise_inputs:
        assert set(batch.extra) == {"eps", "n_real", "n_fake"}
        real_in = t * batch.x1 + (1 - t) * batch.extra["n_real"]
        fake_in = t * fake + (1 - t) * batch.extra["n_fake"]
        assert not torch.allclose(real_in, batch.x1)
    else:
        assert set(batch.extra) == {"eps"}
        real_in, fake_in = batch.x1, fake
    out_d = obj.loss(trainer.nets, batch, "discriminator")
    out_g = obj.loss(trainer.nets, batch, "student")
    with torch.no_grad():
        d_real, d_fake = disc(real_in, batch.t), disc(fake_in, batch.t)
    assert out_d.extra["apt/d_real"].item() == pytest.approx(d_real.mean().item(), rel=1e-5, abs=1e-7)
    assert out_d.extra["apt/d_fake"].item() == pytest.approx(d_fake.mean().item(), rel=1e-5, abs=1e-7)
    assert out_g.extra["apt/g_loss"].item() == pytest.approx(
        torch.nn.functional.softplus(-d_fake).mean().item(), rel=1e-5)
    x = real_in.clone().requires_grad_(True)  # R1 at the inputs the discriminator saw
    (g,) = torch.autograd.grad(disc(x, batch.t).sum(), x)
    assert out_d.extra["apt/r1"].item() == pytest.approx(100 * 0.25 * g.pow(2).sum(1).mean().item(), rel=1e-5)


def test_best_checkpoint_is_written_at_the_validation_minimum(ckpts, tmp_path):
    cfg = _cfg(ckpts, "apt.eval_every=4", "apt.eval_n=64", "apt.lr_g=3e-3")
    train(cfg, str(tmp_path / "s"), progress=False)
    curve = [(r["step"], r["apt/val_w2"]) for r in read_metrics(str(tmp_path / "s" / "metrics.jsonl"))
             if "apt/val_w2" in r]
    assert [s for s, _ in curve] == [0, 4, 8, 12, 16, 20]
    best = load_checkpoint(str(tmp_path / "s" / "checkpoints" / "best.pt"))
    step, score = min(curve, key=lambda sv: sv[1])
    assert best["selection"] == {"step": step, "metric": "w2", "score": score} and best["step"] == step
    assert len({round(v, 9) for _, v in curve}) > 1  # the generator moved: the minimum is a choice
    # the stored EMA generator scores what was logged
    model = load_model(str(tmp_path / "s" / "checkpoints" / "best.pt")).model
    obj = AdversarialPostTraining(cfg, build_trainer(cfg).components)
    assert obj.validate(0, model).scores["apt/val_w2"] == pytest.approx(score, abs=1e-9)
    assert load_checkpoint(str(tmp_path / "s" / "checkpoints" / "last.pt"))["objective"]["state"]["best"]["step"] == step


def test_validation_over_several_draws_scores_their_mean(ckpts):
    """``apt.eval_draws = 3``: the score is the mean of three draws' scores, the first of them the single
    draw's of ``eval_draws = 1`` (same seed), the others of seeds of their own."""
    from flowmatch.distill.adversarial import VALIDATION_SEED
    from flowmatch.evaluation import validation_scorer
    from flowmatch.utils import make_generator

    one_cfg = _cfg(ckpts, "apt.eval_every=4", "apt.eval_n=64")
    cfg = apply_overrides(one_cfg, ["apt.eval_draws=3"])
    model = load_model(ckpts["gen"]).model
    one = AdversarialPostTraining(one_cfg, build_trainer(one_cfg).components).validate(0, model).scores["apt/val_w2"]
    obj = AdversarialPostTraining(cfg, build_trainer(cfg).components)
    got = obj.validate(0, model).scores["apt/val_w2"]
    source = build_trainer(cfg).components.source
    each = []
    with torch.no_grad():
        for i in range(3):
            seed = VALIDATION_SEED + 1000 * i
            x0 = source.sample(64, generator=make_generator(seed))
            each.append(float(validation_scorer(cfg, 64, seed=seed)(one_step(model, x0))["w2"]))
    assert each[0] == pytest.approx(one, abs=1e-9) and len({round(v, 9) for v in each}) == 3
    assert got == pytest.approx(sum(each) / 3, abs=1e-9)
    with pytest.raises(ConfigError, match="apt.eval_draws = 0"):
        apply_overrides(cfg, ["apt.eval_draws=0"])


@pytest.mark.parametrize("gain, kept", [(0.0, [0, 1, 3]), (0.05, [0, 3]), (0.5, [0])])
def test_a_checkpoint_replaces_the_start_only_by_more_than_eval_min_gain(ckpts, gain, kept):
    """Scores 1.0 (the start), 0.97, 0.99, 0.90, 0.95: with no margin each new low is kept; with 0.05 the
    start stays until 0.90; with 0.5 it is never replaced. A resumed objective keeps the start's score."""
    cfg = _cfg(ckpts, "apt.eval_every=1", "train.steps=10", f"apt.eval_min_gain={gain}")
    obj = AdversarialPostTraining(cfg, build_trainer(cfg).components)
    scores = iter([1.0, 0.97, 0.99, 0.90, 0.95])

    class Scorer:
        metric = "w2"

        def __call__(self, x1):
            return {"w2": next(scores)}

    obj._val = [(torch.zeros(4, 2), Scorer())]
    model = load_model(ckpts["gen"]).model
    marks = [obj.validate(step, model).best for step in range(3)]
    resumed = AdversarialPostTraining(cfg, build_trainer(cfg).components)
    resumed.load_state_dict(obj.state_dict())
    resumed._val = obj._val
    marks += [resumed.validate(step, model).best for step in (3, 4)]
    assert [i for i, m in enumerate(marks) if m] == kept
    assert resumed.best["step"] == kept[-1] and resumed.first == 1.0


@pytest.mark.parametrize("limit,kept", [(1.0, [0, 1, 3]), (0.05, [0, 2, 4])])
def test_a_checkpoint_that_copies_more_than_eval_max_copies_is_not_kept(ckpts, limit, kept):
    """Scores (FD, copies) 1.0 / 0.03 (the start), 0.90 / 0.08, 0.95 / 0.04, 0.85 / 0.06, 0.93 / 0.05: with
    no limit each new low is kept; at 0.05 only the checkpoints that copy no more than that."""
    import dataclasses

    cfg = _cfg(ckpts, "apt.eval_every=1", "train.steps=10")
    obj = AdversarialPostTraining(cfg, build_trainer(cfg).components)
    obj.ac = dataclasses.replace(obj.ac, eval_max_copies=limit)
    scores = iter([(1.0, 0.03), (0.90, 0.08), (0.95, 0.04), (0.85, 0.06), (0.93, 0.05)])

    class Scorer:
        metric = "fd"

        def __call__(self, x1):
            fd, copies = next(scores)
            return {"fd": fd, "copies": copies}

    obj._val = [(torch.zeros(4, 2), Scorer())]
    model = load_model(ckpts["gen"]).model
    vals = [obj.validate(step, model) for step in range(5)]
    assert [i for i, v in enumerate(vals) if v.best] == kept
    assert [v.scores["apt/val_copies"] for v in vals] == [0.03, 0.08, 0.04, 0.06, 0.05]
    # a limit where there is nothing to count copies against is refused
    with pytest.raises(ConfigError, match="apt.eval_max_copies = 0.05: the copies are counted against the fit"):
        build_trainer(_cfg(ckpts, "apt.eval_max_copies=0.05"))


def test_validation_image_scorer_counts_copies_of_the_fit_images(tmp_path):
    """On data.split=fit the validation scorer adds ``copies``: the fit images themselves are all copies,
    the val images (the new ones) 5% by construction; on the whole training split there is none."""
    from flowmatch.bench import ImageScorer, ValidationImageScorer
    from flowmatch.evaluation import validation_scorer

    cfg = make_tiny_cfg("data.target=digits", "data.split=fit", "model.name=unet", "model.preset=tiny")
    scorer = validation_scorer(cfg, 200, seed=3)
    assert isinstance(scorer, ValidationImageScorer) and scorer.scores == ("fd", "kid", "copies")
    fit, _ = build_task(cfg.data, split="fit").target.tensors()
    val, _ = build_task(cfg.data, split="val").target.tensors()
    assert scorer(fit[:200])["copies"] == 1.0
    assert scorer(val)["copies"] == pytest.approx(0.05, abs=0.006)  # 10 of the 200 below their 5% quantile
    out = scorer(fit[:100] * 0.5)
    assert set(out) == {"fd", "kid", "copies"} and 0.0 <= out["copies"] <= 1.0
    whole = validation_scorer(make_tiny_cfg("data.target=digits", "model.name=unet", "model.preset=tiny"), 200,
                              seed=3)
    assert type(whole) is ImageScorer and "copies" not in whole(val)


def test_quasi_validation_scores_the_sources_quasi_draws(ckpts):
    """``apt.eval_noise = quasi``: each validation draw's source points are the source's quasi-random draw
    of the draw's seed, its reference the target's of the seed + 1; a source or target without one is
    refused."""
    from flowmatch.distill.adversarial import VALIDATION_SEED
    from flowmatch.evaluation import validation_scorer

    cfg = _cfg(ckpts, "apt.eval_every=4", "apt.eval_n=64", "apt.eval_draws=2", "apt.eval_noise=quasi")
    model = load_model(ckpts["gen"]).model
    got = AdversarialPostTraining(cfg, build_trainer(cfg).components).validate(0, model).scores["apt/val_w2"]
    source = build_trainer(cfg).components.source
    each = []
    with torch.no_grad():
        for i in range(2):
            seed = VALIDATION_SEED + 1000 * i
            scorer = validation_scorer(cfg, 64, seed=seed, quasi=True)
            assert torch.equal(scorer.ref, build_trainer(cfg).components.target.quasi(64, seed=seed + 1))
            each.append(float(scorer(one_step(model, source.quasi(64, seed=seed)))["w2"]))
    assert got == pytest.approx(sum(each) / 2, abs=1e-9)
    iid = _cfg(ckpts, "apt.eval_every=4", "apt.eval_n=64", "apt.eval_draws=2")
    assert AdversarialPostTraining(iid, build_trainer(iid).components).validate(0, model).scores["apt/val_w2"] != \
        pytest.approx(got, abs=1e-6)
    for key in ("source", "target"):
        bad = _cfg(ckpts, "apt.eval_every=4", "apt.eval_noise=quasi", f"data.{key}=checkerboard")
        with pytest.raises(ConfigError, match="apt.eval_noise=quasi: 'checkerboard' has no quasi-random draw"):
            AdversarialPostTraining(bad, build_trainer(bad).components)


def test_regression_term_on_a_pair_store(ckpts, tmp_path):
    from flowmatch.reflow import generate_pairs

    generate_pairs(ckpts["teacher"], str(tmp_path / "pairs"), 64, solver="euler", nfe=2, shard_size=64, progress=False,
                   device="cpu")
    res = train(_cfg(ckpts, "train.steps=4", "apt.regression_weight=0.5", "coupling.name=paired",
                     f"coupling.pairs={tmp_path / 'pairs'}"), str(tmp_path / "r"), progress=False)
    rows = [r for r in read_metrics(str(tmp_path / "r" / "metrics.jsonl")) if "apt/regression" in r]
    assert rows and rows[-1]["apt/regression"] > 0 and all(math.isfinite(v) for v in res.losses)


def test_real_from_teacher_takes_the_first_real_rows_from_the_pair_store_and_resumes_exactly(ckpts, tmp_path):
    from flowmatch.reflow import generate_pairs

    pairs = tmp_path / "pairs"
    generate_pairs(ckpts["teacher"], str(pairs), 64, solver="euler", nfe=2, shard_size=64, progress=False,
                   device="cpu")
    store = torch.load(pairs / "shard_00000.pt", weights_only=True)["x1"]
    rows = {tuple(r.tolist()) for r in store}
    cfg = _cfg(ckpts, "apt.real_from_teacher=0.25", "coupling.name=paired", f"coupling.pairs={pairs}",
               "train.batch_size=16")
    trainer = build_trainer(cfg)
    batch = trainer.objective.draw(trainer.generator)
    assert batch.x1.shape == (16, 2)
    assert all(tuple(r.tolist()) in rows for r in batch.x1[:4])  # round(0.25 * 16) rows: teacher samples
    assert not any(tuple(r.tolist()) in rows for r in batch.x1[4:])  # the rest: the data's
    # the pair store's position is checkpointed: a resumed run draws the same batches
    a = train(cfg, str(tmp_path / "a"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, str(tmp_path / "b"), progress=False, on_step=_Interrupt(13))
    b = train(cfg, str(tmp_path / "b"), progress=False, resume=True)
    assert b.start_step == 10 and a.losses[10:] == b.losses
    assert "coupling" in load_checkpoint(a.checkpoint)["objective"]["state"]
    with pytest.raises(ConfigError, match="apt.real_from_teacher = 0.25 reads the teacher's samples from a pair "
                                          "store: it needs coupling.name=paired"):
        build_trainer(_cfg(ckpts, "apt.real_from_teacher=0.25"))


# --------------------------------------------------------------------------- bad input


def test_generator_that_is_not_a_one_step_model_is_refused(ckpts):
    with pytest.raises(ConfigError, match=r"trained with objective 'cfm', not a one-step model"):
        build_trainer(_cfg(ckpts, f"train.init={ckpts['teacher']}"))
    with pytest.raises(ConfigError, match="set train.init to its checkpoint"):
        build_trainer(_cfg(ckpts, "train.init=random"))


def test_generator_of_another_data_shape_is_refused(ckpts):
    path = _edited(ckpts, "gen", "gen_digits", data={"target": "digits"})
    with pytest.raises(ConfigError, match=r"train.init .* data of shape \(1, 8, 8\); this run's data have shape \(2,\)"):
        build_trainer(_cfg(ckpts, f"train.init={path}"))


def test_discriminator_of_another_architecture_is_refused(ckpts):
    path = _edited(ckpts, "teacher", "teacher_unet", model={"name": "unet"})
    with pytest.raises(ConfigError, match="is a unet network, the generator a mlp"):
        build_trainer(_cfg(ckpts, f"apt.discriminator_init={path}"))
    with pytest.raises(ConfigError, match="needs apt.discriminator_init"):
        build_trainer(_cfg(ckpts, "apt.discriminator_init=null"))


@pytest.mark.parametrize("key,value", [("r1_lambda", "-1"), ("r1_lambda", ".nan"), ("r1_lambda", ".inf"),
                                       ("r2_lambda", "-1"), ("r2_lambda", ".nan"),
                                       ("r1_sigma", "-0.01"), ("r1_sigma", "0"), ("r1_sigma", ".inf"),
                                       ("r1_sigma", ".nan")])
def test_negative_or_non_finite_lambda_or_sigma_is_refused(key, value):
    with pytest.raises(ConfigError, match=rf"^apt\.{key} = .*: must be a finite number"):
        apply_overrides(make_tiny_cfg(), [f"apt.{key}={value}"])


def test_noise_inputs_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"^apt\.noise_inputs: expected bool, got str 'yes please'$"):
        apply_overrides(make_tiny_cfg(), ["apt.noise_inputs=yes please"])


def test_gradient_clipping_is_refused(ckpts):
    cfg = apply_overrides(_cfg(ckpts), ["train.grad_clip=1.0"])
    with pytest.raises(ConfigError, match="set train.grad_clip=0"):
        build_trainer(cfg)


def _diverging(player: str, at: int):
    class Diverging(AdversarialPostTraining):
        calls = 0

        def loss(self, nets, batch, p="student"):
            out = super().loss(nets, batch, p)
            if p == player:
                Diverging.calls += 1
                if Diverging.calls == at:
                    return LossOutput(out.loss * float("nan"), out.per_sample, out.t, out.extra)
            return out

    return Diverging


@pytest.mark.parametrize("player", ["discriminator", "student"])
@pytest.mark.parametrize("fast", ["off", "on"])
def test_diverging_run_stops_naming_the_player_and_step_and_keeps_the_last_good_checkpoint(ckpts, tmp_path,
                                                                                         monkeypatch, player, fast):
    monkeypatch.setitem(OBJECTIVES, "apt", _diverging(player, 7))
    run = tmp_path / "d"
    with pytest.raises(NonFiniteLossError, match=rf"of player {player} at step 7; last good checkpoint kept at") as e:
        train(_cfg(ckpts, f"train.fast={fast}"), str(run), progress=False)
    assert e.value.player == player and e.value.step == 7
    assert load_checkpoint(str(run / "checkpoints" / "last.pt"))["step"] == 5


def test_images_train_a_unet_generator_against_a_unet_discriminator_scored_by_fd(tmp_path):
    img = ["data.target=digits", "model.name=unet", "model.preset=tiny", "train.batch_size=16", "train.fast=off"]
    teacher = train(make_tiny_cfg(*img, "train.steps=3"), str(tmp_path / "t"), progress=False).checkpoint
    gen = train(make_tiny_cfg(*img, "train.objective=ct", "train.steps=2", f"train.init={teacher}"),
                str(tmp_path / "g"), progress=False).checkpoint
    res = train(make_tiny_cfg(*img, "data.split=fit", "train.objective=apt", f"train.init={gen}",
                              f"apt.discriminator_init={teacher}", "train.grad_clip=0", "train.steps=4",
                              "train.log_every=2", "apt.eval_every=2", "apt.eval_n=64", "apt.r1=exact"),
                str(tmp_path / "a"), progress=False)
    rows = read_metrics(str(tmp_path / "a" / "metrics.jsonl"))
    curve = [(r["step"], r["apt/val_fd"]) for r in rows if "apt/val_fd" in r]
    assert [s for s, _ in curve] == [0, 2, 4] and all(math.isfinite(v) for _, v in curve)
    assert all(math.isfinite(v) for v in res.losses) and any(r.get("apt/r1", 0) > 0 for r in rows)
    sel = load_checkpoint(str(tmp_path / "a" / "checkpoints" / "best.pt"))["selection"]
    assert sel["metric"] == "fd" and sel["score"] == min(v for _, v in curve)
    # each validation probes the discriminator on training, held-out and generated images
    probes = [r for r in rows if "apt/d_heldout" in r]
    assert [r["step"] for r in probes] == [0, 2, 4]
    assert all(math.isfinite(r[f"apt/{k}"]) for r in probes for k in ("d_fit", "d_heldout", "d_gen"))
    assert probes[0]["apt/d_fit"] != probes[-1]["apt/d_fit"]  # the discriminator trained in between


class _PixelMean(torch.nn.Module):
    """A discriminator stand-in: the mean pixel times 1 + t (so the probe's fixed times show)."""

    def forward(self, x, t):
        return x.flatten(1).mean(1) * (1 + t)


@pytest.mark.parametrize("noise_inputs", [False, True])
def test_discriminator_probe_scores_training_held_out_and_generated_images_without_touching_the_stream(
        tmp_path, noise_inputs):
    img = ["data.target=digits", "data.split=fit", "model.name=unet", "model.preset=tiny", "train.fast=off"]
    teacher = train(make_tiny_cfg(*img, "train.steps=1"), str(tmp_path / "t"), progress=False).checkpoint
    gen = train(make_tiny_cfg(*img, "train.objective=ct", "train.steps=1", f"train.init={teacher}"),
                str(tmp_path / "g"), progress=False).checkpoint
    cfg = make_tiny_cfg(*img, "train.objective=apt", f"train.init={gen}", f"apt.discriminator_init={teacher}",
                        "train.grad_clip=0", f"apt.noise_inputs={noise_inputs}")
    trainer = build_trainer(cfg)
    obj = trainer.objective
    obj._disc = _PixelMean()
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731  (a generator that returns its noise)
    state = trainer.generator.get_state()
    first = obj.probe_discriminator(zero)
    assert torch.equal(trainer.generator.get_state(), state)  # the run's stream is untouched
    assert set(first) == {"apt/d_fit", "apt/d_heldout", "apt/d_gen"}
    assert obj.probe_discriminator(zero) == first  # fixed sets, times and noise
    t, sets = obj._probe["t"], obj._probe["sets"]
    val, _ = build_task(cfg.data, split="val").target.tensors()
    fit, _ = build_task(cfg.data, split="fit").target.tensors()
    assert len(val) == len(sets["d_heldout"]) == len(sets["d_fit"]) == len(sets["d_gen"]) == 200
    # the held-out set is the whole val split (200 images); the fit set is 200 distinct training images
    assert torch.equal(sets["d_heldout"].flatten(1).sort(0).values, val.flatten(1).sort(0).values)
    rows = {tuple(r.tolist()) for r in fit.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in sets["d_fit"].flatten(1))
    assert len({tuple(r.tolist()) for r in sets["d_fit"].flatten(1)}) == 200
    for key in ("d_fit", "d_heldout", "d_gen"):
        x = sets[key]
        if noise_inputs:
            tt = t.view(-1, 1, 1, 1)
            x = tt * x + (1 - tt) * obj._probe["noise"][key]
        want = float((x.flatten(1).mean(1) * (1 + t)).mean())
        assert first[f"apt/{key}"] == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert first["apt/d_fit"] != first["apt/d_heldout"]
    # a run on toy data or on the whole training split has no probe
    obj._probe = None
    obj.cfg.data.split = "train"
    assert obj.probe_discriminator(zero) == {}


def test_augmentation_translates_with_black_fill_and_cuts_out_a_half_side_square():
    x = torch.arange(2 * 64, dtype=torch.float64).reshape(2, 1, 8, 8).requires_grad_(True)
    shift = torch.tensor([[1, -1], [0, 0]])
    out = augment(x, {"shift": shift})
    want = torch.full((8, 8), -1.0, dtype=torch.float64)
    want[1:, :7] = x[0, 0, :7, 1:]  # row y reads y - 1, column c reads c + 1
    assert torch.equal(out[0, 0], want) and torch.equal(out[1], x[1])
    corner = torch.tensor([[6, -2], [1, 3]])  # a 4 x 4 square, clipped at the border in the first row
    cut = augment(x, {"corner": corner})
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    mask[0, 6:, :2], mask[1, 1:5, 3:7] = False, False
    assert torch.equal(cut[:, 0], torch.where(mask, x[:, 0], torch.zeros((), dtype=torch.float64)))
    (g,) = torch.autograd.grad(augment(x, {"shift": shift, "corner": corner}).sum(), x)  # differentiable
    assert g[1, 0].sum() == 64 - 16 and set(g.unique().tolist()) == {0.0, 1.0}
    draws = [augment_params(("translation", "cutout"), (4096, 1, 8, 8), torch.Generator().manual_seed(0), "cpu")
             for _ in range(2)]
    assert torch.equal(draws[0]["shift"], draws[1]["shift"])  # from the stream it is given
    assert set(draws[0]["shift"].unique().tolist()) == {-1, 0, 1}
    assert draws[0]["corner"].min() == -2 and draws[0]["corner"].max() == 5
    big = augment_params(("translation",), (8, 3, 32, 32), torch.Generator().manual_seed(0), "cpu")["shift"]
    assert big.abs().max() <= 4 and set(big.flatten().tolist()) - set(range(-4, 5)) == set()


def test_augmented_discriminator_sees_the_transformed_real_and_generated_images(tmp_path):
    img = ["data.target=digits", "model.name=unet", "model.preset=tiny", "train.batch_size=8", "train.fast=off"]
    teacher = train(make_tiny_cfg(*img, "train.steps=2"), str(tmp_path / "t"), progress=False).checkpoint
    gen = train(make_tiny_cfg(*img, "train.objective=ct", "train.steps=1", f"train.init={teacher}"),
                str(tmp_path / "g"), progress=False).checkpoint
    cfg = make_tiny_cfg(*img, "train.objective=apt", f"train.init={gen}", f"apt.discriminator_init={teacher}",
                        "train.grad_clip=0", "train.steps=2", "apt.eval_every=0", "apt.augment=translation,cutout",
                        "apt.r1=exact")
    trainer = build_trainer(cfg)
    obj, disc, student = trainer.objective, trainer.nets_raw["discriminator"], trainer.model
    batch = obj.draw(torch.Generator().manual_seed(0))
    assert set(batch.extra) == {"eps", "shift_real", "corner_real", "shift_fake", "corner_fake"}
    with torch.no_grad():
        fake = one_step(student, batch.x0)
    real_in = augment(batch.x1, {"shift": batch.extra["shift_real"], "corner": batch.extra["corner_real"]})
    fake_in = augment(fake, {"shift": batch.extra["shift_fake"], "corner": batch.extra["corner_fake"]})
    out_d = obj.loss(trainer.nets, batch, "discriminator")
    with torch.no_grad():
        d_real, d_fake = disc(real_in, batch.t), disc(fake_in, batch.t)
    assert out_d.extra["apt/d_real"].item() == pytest.approx(d_real.mean().item(), rel=1e-5, abs=1e-6)
    assert out_d.extra["apt/d_fake"].item() == pytest.approx(d_fake.mean().item(), rel=1e-5, abs=1e-6)
    x = real_in.clone().requires_grad_(True)  # R1 at the augmented real images
    (g,) = torch.autograd.grad(disc(x, batch.t).sum(), x)
    assert out_d.extra["apt/r1"].item() == pytest.approx(100 * 1e-4 * g.pow(2).flatten(1).sum(1).mean().item(),
                                                         rel=1e-4)
    res = train(cfg, str(tmp_path / "a"), progress=False)  # both players train through it
    assert all(math.isfinite(v) for v in res.losses)


@pytest.mark.parametrize("value", ["flip", "translation,translation", "none,cutout", ""])
def test_unknown_or_repeated_augmentation_is_refused(value):
    with pytest.raises(ConfigError, match=r"^apt\.augment = .*: must be 'none' or a comma-separated list of "
                                          r"translation, cutout \(each at most once\)$"):
        apply_overrides(make_tiny_cfg(), [f"apt.augment={value}"])


def test_augmentation_of_vector_data_is_refused(ckpts):
    with pytest.raises(ConfigError, match=r"^apt\.augment = translation: augmentations transform images "
                                          r"\[C, H, W\]; this run's data have shape \(2,\); set apt\.augment=none$"):
        build_trainer(_cfg(ckpts, "apt.augment=translation"))


def _ddp_results(rank: int, out_dir: str) -> dict:
    import json
    import os

    import flowmatch.distill  # noqa: F401 - a spawned process registers apt afresh
    import flowmatch.evaluation  # noqa: F401,F811

    with open(os.path.join(out_dir, "ckpts.json")) as f:
        ckpts = json.load(f)
    cfg = _cfg(ckpts, "apt.eval_every=5", "apt.eval_n=32", *ckpts.get("extra", []))
    whole = train(cfg, os.path.join(out_dir, "whole"), progress=False)
    train(apply_overrides(cfg, ["train.steps=10"]), os.path.join(out_dir, "half"), progress=False)
    rest = train(cfg, os.path.join(out_dir, "half"), progress=False, resume=True)
    return {"whole": whole.losses, "rest": rest.losses, "world": whole.world_size}


@pytest.mark.parametrize("extra", [("apt.r1=approx",), ("apt.dmd_weight=1", "apt.fake_steps=2"),
                                   ("apt.lecam_weight=0.5",)])
def test_two_rank_gloo_ddp_trains_both_players_and_resumes_exactly(ckpts, tmp_path, extra):
    """Two ranks: the discriminator (three forwards an update) and the generator, or with DMD the fake flow
    too (its forward under no_grad in the generator's loss), each wrapped for DDP; with LeCam the anchors
    average the ranks' logits, so every rank holds the same."""
    import json

    from test_ddp import _spawn

    (tmp_path / "ckpts.json").write_text(json.dumps({**{k: str(v) for k, v in ckpts.items()}, "extra": list(extra)}))
    ranks = _spawn(str(tmp_path), results=_ddp_results)
    for r in ranks:
        assert r["world"] == 2 and r["whole"][10:] == r["rest"] and r["whole"] == ranks[0]["whole"]
    ckpt = load_checkpoint(str(tmp_path / "whole" / "checkpoints" / "last.pt"))
    roles = {"discriminator"} | ({"fake_score"} if "apt.dmd_weight=1" in extra else set())
    assert ckpt["world_size"] == 2 and set(ckpt["nets"]) == roles
    assert load_checkpoint(str(tmp_path / "whole" / "checkpoints" / "best.pt"))["selection"]["metric"] == "w2"
    if "apt.lecam_weight=0.5" in extra:  # the ranks draw batches of their own, and hold the same anchors
        mine, theirs = (r["objective"]["lecam"] for r in ckpt["ranks"])
        assert mine["n"] == theirs["n"] == 20 and torch.equal(mine["acc"], theirs["acc"])


# --------------------------------------------------------------------------- experiments/toy/apt_ablations.py

_ABLATIONS = os.path.join(os.path.dirname(__file__), "..", "experiments", "toy", "apt_ablations.py")


def _script(path: str):
    """The experiment script at ``path`` as a module (its folder importable while it loads: a script may
    import a sibling's helpers)."""
    folder = os.path.dirname(path)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(folder)
    return mod


def _ablations_module():
    return _script(_ABLATIONS)


def test_ablation_flags_name_the_failure_modes():
    flags = _ablations_module().flags
    chance = 2 * math.log(2)
    assert flags([{"apt/d_loss": 1.2, "apt/g_loss": 0.9}, {"apt/d_loss": 1.1, "apt/g_loss": 1.0}]) == []
    assert flags([{"apt/d_loss": 1.0}, {"apt/d_loss": 0.05, "apt/g_loss": 12.0}]) == ["D wins", "G explodes"]
    assert flags([{"apt/d_loss": 1.0, "apt/g_loss": float("nan")}]) == ["non-finite"]
    # at chance over the second half only
    assert flags([{"apt/d_loss": 1.0}, {"apt/d_loss": chance + 0.002}, {"apt/d_loss": chance - 0.003}]) == \
        ["D at chance"]
    assert flags([{"apt/d_loss": chance}, {"apt/d_loss": 1.2}]) == []
    # with the logits, the gap between real and generated decides: equal logits away from 0 are at
    # chance although the loss is above 2 ln 2; a gap of a tenth of a logit is a signal
    same = {"apt/d_loss": 2 * math.log1p(math.exp(0.3)) - 0.3, "apt/d_real": 0.3, "apt/d_fake": 0.29}
    assert abs(same["apt/d_loss"] - chance) > 0.01
    assert flags([{"apt/d_loss": 1.0, "apt/d_real": 2.0, "apt/d_fake": -1.0}, same, same]) == ["D at chance"]
    apart = dict(same, **{"apt/d_fake": 0.2})
    assert flags([same, apart, apart]) == []


def test_ablation_script_scores_each_variants_best_checkpoint_against_the_start(ckpts, tmp_path):
    chain = tmp_path / "chain"
    chain.mkdir()
    os.symlink(os.path.dirname(os.path.dirname(ckpts["teacher"])), chain / "1-RF")
    os.symlink(os.path.dirname(os.path.dirname(ckpts["gen"])), chain / "2-RF+distill")
    out = tmp_path / "abl"
    subprocess.run([sys.executable, _ABLATIONS, str(chain), "--steps", "4", "--batch", "32", "--batch2", "64",
                    "--only", "base", "--only", "random D", "--only", "batch 64", "--draws", "2", "--n", "64",
                    "--set", "apt.eval_every=2", "--set", "apt.eval_n=64", "--set", "apt.lr_g=1e-3",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    res = json.loads((out / "apt_ablations.json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["base", "random D", "batch 64", "start"]
    assert list(res["scores"]) == ["start", "base", "random D", "batch 64", "floor"]
    for name in ("base", "random D", "batch 64"):
        diffs = [b - s for b, s in zip(res["scores"][name], res["scores"]["start"])]
        assert rows[name]["best-start"] == pytest.approx(sum(diffs) / 2)
        assert rows[name]["se"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)
        assert rows[name]["best_step"] in (0, 2, 4)
        sel = load_checkpoint(str(out / name.replace(" ", "_") / "checkpoints" / "best.pt"))
        assert sel["config"]["train"]["batch_size"] == (64 if name == "batch 64" else 32)
        assert sel["config"]["apt"]["discriminator_init"] == (
            "random" if name == "random D" else str(chain / "1-RF" / "checkpoints" / "last.pt"))
    assert "| base |" in (out / "apt_ablations.md").read_text()


# --------------------------------------------------------------------------- experiments/toy/two_sample.py

_TWO_SAMPLE = os.path.join(os.path.dirname(__file__), "..", "experiments", "toy", "two_sample.py")


def _two_sample_module():
    return _script(_TWO_SAMPLE)  # it imports paired_w2's entry parser


def test_the_two_sample_classifier_tells_apart_what_differs_and_only_that():
    mod = _two_sample_module()
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2000, 2, generator=g) for _ in range(3))
    same = mod.classifier_test(a, b, steps=150, seed=1)
    apart = mod.classifier_test(c + torch.tensor([1.5, 0.0]), b, steps=150, seed=1)
    assert same["accuracy_se"] == pytest.approx(math.sqrt(0.25 / 1000))
    assert abs(same["accuracy"] - 0.5) < 4 * same["accuracy_se"]  # the same law: at chance
    assert apart["accuracy"] > 0.7 and apart["logloss_minus_ln2"] < -0.1  # the Bayes accuracy is 0.77


def test_far_fractions_count_the_points_beyond_each_radius():
    from scipy.spatial import cKDTree

    tree = cKDTree([[0.0, 0.0], [10.0, 0.0]])
    x = torch.tensor([[0.05, 0.0], [0.0, 0.15], [10.0, 0.25], [5.0, 0.0]])  # nearest: 0.05, 0.15, 0.25, 5
    assert _two_sample_module().far_fractions(x, tree, [0.1, 0.2, 1.0]) == {"far > 0.1": 0.75, "far > 0.2": 0.5,
                                                                            "far > 1.0": 0.25}


def test_two_sample_script_scores_the_data_and_each_model(ckpts, tmp_path):
    chain = tmp_path / "chain"
    chain.mkdir()
    os.symlink(os.path.dirname(os.path.dirname(ckpts["teacher"])), chain / "1-RF")
    out = tmp_path / "ts.json"
    subprocess.run([sys.executable, _TWO_SAMPLE, str(chain), "--model", "1-RF:euler:2", "--model",
                    f"{ckpts['gen']}:euler:1", "--n", "64", "--steps", "3", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["data", "1-RF:euler:2", f"{ckpts['gen']}:euler:1"]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["accuracy_se"] == pytest.approx(math.sqrt(0.25 / 32))
        assert 1 >= r["far > 0.1"] >= r["far > 0.2"] >= r["far > 0.3"] >= 0


# --------------------------------------------------------------------------- experiments/toy/selection_scatter.py

_SCATTER = os.path.join(os.path.dirname(__file__), "..", "experiments", "toy", "selection_scatter.py")


def test_selection_scatter_scores_each_mode_on_its_draws(ckpts, tmp_path):
    """Each mode's scores are the W2 of the model's one step from that mode's source points against that
    mode's reference (recomputed here for the second model's first draw); the base differs from itself by 0."""
    out = tmp_path / "scatter.json"
    subprocess.run([sys.executable, _SCATTER, str(tmp_path), ckpts["gen"], ckpts["teacher"], "--draws", "2",
                    "--n", "64", "--seed", "7", "--out", str(out)], check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    model = load_model(ckpts["teacher"])
    task = build_task(model.config.data)
    g = torch.Generator().manual_seed(7)
    x0, ref = task.source.sample(64, generator=g), task.target.reference(64, generator=g)
    xq, refq = task.source.quasi(64, seed=7), task.target.quasi(64, seed=8)
    with torch.no_grad():
        want = {"iid": w2(one_step(model.model.eval(), x0), ref), "quasi source": w2(one_step(model.model, xq), ref),
                "quasi": w2(one_step(model.model, xq), refq)}
    for mode, value in want.items():
        assert res["scores"][mode][1][0] == pytest.approx(value, rel=1e-6)
        base, other = res["summary"][mode]
        assert base["diff_mean"] == 0 and base["diff_sd"] == 0
        diffs = [a - b for a, b in zip(res["scores"][mode][1], res["scores"][mode][0])]
        assert other["diff_mean"] == pytest.approx(sum(diffs) / 2) and other["diff_se"] == pytest.approx(
            abs(diffs[0] - diffs[1]) / 2)


# --------------------------------------------------------------------------- experiments/images/apt_front.py

_FRONT = os.path.join(os.path.dirname(__file__), "..", "experiments", "images", "apt_front.py")


def _front_module():
    return _script(_FRONT)


def _apt_run(path, rows) -> str:
    """A run directory whose metrics.jsonl holds a training row and ``rows`` of (step, fd, copies)."""
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 10, "train/loss": 1.0}) + "\n")
        for step, fd, copies in rows:
            f.write(json.dumps({"step": step, "apt/val_fd": fd, "apt/val_copies": copies, "apt/val_kid": 0.0}) + "\n")
    return str(path)


def test_apt_front_takes_the_lowest_fd_under_each_ceiling_per_run_and_over_all(tmp_path):
    """Per run the lowest FD among validations with copies at most each ceiling (the start, step 0, left
    out), the FD-best whatever its copies, and over all runs the best of those; a run directory without
    logged copies is refused naming it; the CLI writes the same as JSON, the teacher's copies a ceiling."""
    mod = _front_module()
    a = _apt_run(tmp_path / "a", [(0, 1.4, 0.02), (50, 1.1, 0.035), (100, 0.95, 0.046), (150, 0.90, 0.055)])
    b = _apt_run(tmp_path / "b", [(0, 0.5, 0.01), (50, 1.0, 0.040), (100, 0.97, 0.049), (150, 0.97, 0.044)])
    runs = {"a": mod.read_trajectory(a), "b": mod.read_trajectory(b)}
    assert [r["step"] for r in runs["a"]] == [50, 100, 150]  # the start (a low FD here) is not a checkpoint
    res = mod.front(runs, [0.045, 0.05])
    ra, rb = res["runs"]["a"], res["runs"]["b"]
    assert (ra["0.045"]["step"], ra["0.05"]["step"], ra["any"]["step"]) == (50, 100, 150)
    assert (rb["0.045"]["step"], rb["0.05"]["step"], rb["any"]["step"]) == (150, 100, 100)  # equal FDs: the earlier
    assert res["overall"]["0.045"] == {"run": "b", "step": 150, "fd": 0.97, "copies": 0.044}
    assert res["overall"]["0.05"]["run"] == "a" and res["overall"]["any"]["fd"] == 0.90
    assert mod.front(runs, [0.03])["overall"]["0.03"] is None
    table = mod.table(res, [0.045, 0.05], {"fd": 0.98, "copies": 0.041})
    assert "| a | 1.100 / 0.035 (50) | 0.950 / 0.046 (100) | 0.900 / 0.055 (150) |" in table
    assert "teacher: FD 0.980, copies 0.041" in table

    no_copies = tmp_path / "old"
    os.makedirs(no_copies)
    (no_copies / "metrics.jsonl").write_text(json.dumps({"step": 50, "apt/val_fd": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"old: no validation with apt/val_fd and apt/val_copies"):
        mod.read_trajectory(str(no_copies))

    out = tmp_path / "front.json"
    p = subprocess.run([sys.executable, _FRONT, a, b, "--teacher-score", "0.98,0.041", "--out", str(out)],
                       check=True, capture_output=True, text=True, timeout=120)
    got = json.loads(out.read_text())
    assert got["ceilings"] == [0.041, 0.045, 0.05] and got["teacher"] == {"fd": 0.98, "copies": 0.041}
    assert got["overall"]["0.041"] == {"run": "b", "step": 50, "fd": 1.0, "copies": 0.040}
    assert "| **all runs** |" in p.stdout
    bad = subprocess.run([sys.executable, _FRONT, a, str(no_copies)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "old: no validation with apt/val_fd" in bad.stderr


def test_apt_front_scores_a_model_on_the_apt_validation_draws():
    """The teacher's point: its samples from each APT validation draw's source points (seeds VALIDATION_SEED
    + 1000 i) scored by the validation scorer of that seed, averaged; a zero velocity field returns its
    source points, so the point is the scorer's on those points."""
    from flowmatch.distill.adversarial import VALIDATION_SEED
    from flowmatch.evaluation import validation_scorer
    from flowmatch.utils import make_generator

    class Still(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    cfg = make_tiny_cfg("data.target=digits", "data.split=fit", "model.name=unet", "model.preset=tiny",
                        "apt.eval_n=40", "apt.eval_draws=2")
    got = _front_module().validation_point(Still(), cfg)
    source = build_task(cfg.data).source
    want = []
    for i in range(2):
        x0 = source.sample(40, generator=make_generator(VALIDATION_SEED + 1000 * i), device="cpu")
        want.append(validation_scorer(cfg, 40, seed=VALIDATION_SEED + 1000 * i)(x0))
    assert got["fd"] == pytest.approx(sum(w["fd"] for w in want) / 2, rel=1e-6)
    assert got["copies"] == pytest.approx(sum(w["copies"] for w in want) / 2)


# --------------------------------------------------------------------------- experiments/images/seed_spread.py

_SPREAD = os.path.join(os.path.dirname(__file__), "..", "experiments", "images", "seed_spread.py")


def test_seed_spread_averages_each_seeds_paired_difference_and_its_error_over_the_seeds(tmp_path):
    """Three seeds on two draws: per seed the mean over draws of (seed - teacher), then their mean, their
    standard error over the seeds and the count below the teacher; entries named either way; bad names refused."""
    scores = {"teacher dopri5": {"fd": [1.0, 2.0], "fd_test": [3.0, 3.0]},
              "a/best.pt euler 1": {"fd": [1.5, 2.5], "fd_test": [2.0, 3.0]},   # +0.5, -0.5
              "b/best.pt euler 1": {"fd": [0.5, 1.5], "fd_test": [3.0, 4.0]},   # -0.5, +0.5
              "c/best.pt euler 1": {"fd": [1.3, 2.3], "fd_test": [3.0, 2.0]}}   # +0.3, -0.5
    src = tmp_path / "paired.json"
    src.write_text(json.dumps({"scores": scores}))
    out = tmp_path / "spread.json"
    p = subprocess.run([sys.executable, _SPREAD, str(src), "--group", "APT=a/best.pt:euler:1,b/best.pt euler 1,"
                        "c/best.pt:euler:1", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    fd = json.loads(out.read_text())["groups"]["APT"]["scores"]["fd"]
    assert fd["per_seed"] == pytest.approx([0.5, -0.5, 0.3]) and fd["diff"] == pytest.approx(0.1)
    assert fd["diff_se"] == pytest.approx(math.sqrt(((0.4 ** 2) + (0.6 ** 2) + (0.2 ** 2)) / 2) / math.sqrt(3))
    assert fd["below"] == 1 and fd["seeds"] == 3
    test = json.loads(out.read_text())["groups"]["APT"]["scores"]["fd_test"]
    assert test["per_seed"] == pytest.approx([-0.5, 0.5, -0.5]) and test["below"] == 2
    assert "| APT | fd | 3 | +0.100 |" in p.stdout
    bad = subprocess.run([sys.executable, _SPREAD, str(src), "--group", "APT=d/best.pt:euler:1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "entry 'd/best.pt:euler:1' is not among the JSON's entries" in bad.stderr


def test_seed_spread_against_another_entry(tmp_path):
    """``--against ENTRY``: the differences from that entry (either spelling) instead of the teacher, named in
    the table and the JSON; an unknown entry refused."""
    scores = {"teacher dopri5": {"fd": [1.0, 2.0]},
              "student euler 1": {"fd": [2.0, 2.0]},
              "a/best.pt euler 1": {"fd": [1.5, 2.5]},   # -0.5, +0.5 from the student: 0
              "b/best.pt euler 1": {"fd": [0.5, 1.5]}}   # -1.5, -0.5: -1
    src = tmp_path / "paired.json"
    src.write_text(json.dumps({"scores": scores}))
    out = tmp_path / "spread.json"
    p = subprocess.run([sys.executable, _SPREAD, str(src), "--against", "student:euler:1", "--group",
                        "APT=a/best.pt:euler:1,b/best.pt:euler:1", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(out.read_text())
    assert got["against"] == "student euler 1"
    fd = got["groups"]["APT"]["scores"]["fd"]
    assert fd["per_seed"] == pytest.approx([0.0, -1.0]) and fd["diff"] == pytest.approx(-0.5) and fd["below"] == 1
    assert "mean − student euler 1" in p.stdout
    bad = subprocess.run([sys.executable, _SPREAD, str(src), "--against", "x:euler:1", "--group", "APT=a/best.pt:euler:1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "entry 'x:euler:1' is not among the JSON's entries" in bad.stderr


def test_seed_spread_reads_several_jsons_of_the_same_draws_and_compares_two_groups(tmp_path):
    """Two JSONs of the same draws read as one (the teacher in both, scoring alike); ``--compare A,B``: the
    difference of the groups' means over their seeds, its error over both groups' seeds; files of other draws,
    a teacher scoring differently and an unknown group refused."""
    teacher = {"fd": [1.0, 2.0]}
    old = {"seed": 10_000, "n": 1000, "draws": 2,
           "scores": {"teacher dopri5": teacher, "a euler 1": {"fd": [1.5, 2.5]},     # +0.5
                      "b euler 1": {"fd": [1.1, 2.3]}}}                              # +0.2
    new = {"seed": 10_000, "n": 1000, "draws": 2,
           "scores": {"teacher dopri5": teacher, "c euler 1": {"fd": [0.9, 1.9]},     # -0.1
                      "d euler 1": {"fd": [1.3, 1.9]}}}                              # +0.1
    for name, got in (("old", old), ("new", new)):
        (tmp_path / f"{name}.json").write_text(json.dumps(got))
    out = tmp_path / "spread.json"
    args = [sys.executable, _SPREAD, str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--group",
            "old=a:euler:1,b:euler:1", "--group", "new=c:euler:1,d:euler:1"]
    p = subprocess.run(args + ["--compare", "new,old", "--out", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(out.read_text())
    assert got["groups"]["new"]["scores"]["fd"]["per_seed"] == pytest.approx([-0.1, 0.1])
    c = got["comparisons"]["new - old"]["fd"]
    assert c["diff"] == pytest.approx(0.0 - 0.35) and c["seeds"] == [2, 2]
    assert c["diff_se"] == pytest.approx(math.sqrt(0.02 / 2 + 0.045 / 2))  # sample variances 0.02 and 0.045
    assert "| new − old | fd | 2 and 2 | -0.350 |" in p.stdout
    bad = subprocess.run(args + ["--compare", "new,other"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--compare 'new,other': expected A,B, two of the groups" in bad.stderr
    # a file scored with more flags: its entries' extra scores join, the scores both files hold must agree
    more = {**new, "scores": {"teacher dopri5": {**teacher, "copies": [0.1, 0.1]}, "e euler 1": {"fd": [1.0, 2.0],
                                                                                              "copies": [0.2, 0.1]}}}
    (tmp_path / "more.json").write_text(json.dumps(more))
    p = subprocess.run([sys.executable, _SPREAD, str(tmp_path / "old.json"), str(tmp_path / "more.json"), "--group",
                        "e=e:euler:1", "--group", "a=a:euler:1", "--out", str(out)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(out.read_text())["groups"]
    assert set(got["e"]["scores"]) == {"fd"} and got["e"]["scores"]["fd"]["per_seed"] == pytest.approx([0.0])
    p = subprocess.run([sys.executable, _SPREAD, str(tmp_path / "more.json"), "--group", "e=e:euler:1", "--out",
                        str(out)], capture_output=True, text=True, timeout=120)
    assert json.loads(out.read_text())["groups"]["e"]["scores"]["copies"]["per_seed"] == pytest.approx([0.05])
    (tmp_path / "other.json").write_text(json.dumps({**new, "draws": 3}))
    bad = subprocess.run([sys.executable, _SPREAD, str(tmp_path / "old.json"), str(tmp_path / "other.json"),
                          "--group", "x=a:euler:1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "other.json was scored on other draws than" in bad.stderr
    (tmp_path / "other.json").write_text(json.dumps({**new, "scores": {"teacher dopri5": {"fd": [1.0, 2.1]}}}))
    bad = subprocess.run([sys.executable, _SPREAD, str(tmp_path / "old.json"), str(tmp_path / "other.json"),
                          "--group", "x=a:euler:1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "entry 'teacher dopri5' scores differently in" in bad.stderr
