"""Proof of the objective seam: two objectives written here, outside the package (one network; two
players with their own optimisers), trained by the package's loop with EMA, checkpoints, exact
resume and two-process gloo DDP. Registering one is all it takes."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from conftest import make_tiny_cfg
from flowmatch.training import OBJECTIVES, Batch, Objective, last_checkpoint, load_checkpoint, train
from flowmatch.types import LossOutput
from test_ddp import _spawn
from test_training import _Interrupt


class Analytic(Objective):
    """Regression onto the known field ``u(x, t) = (1 - 2t) x`` at ``x ~ N(0, I)``, ``t ~ U[0, 1]``."""

    name = "analytic"

    def draw(self, generator):
        b = self.cfg.train.batch_size
        x = torch.randn(b, 2, generator=generator, device=self.device)
        t = torch.rand(b, generator=generator, device=self.device)
        return Batch(t=t, xt=x, ut=(1 - 2 * t)[:, None] * x)

    def loss(self, nets, batch, player="student"):
        per = (nets.student(batch.xt, batch.t) - batch.ut).pow(2).mean(1)
        return LossOutput(per.mean(), per, batch.t)


class Pair(Analytic):
    """Two players: a ``critic`` fits the student's residual, then the student fits the field less
    the critic's (frozen) correction. Each player draws its own batch and has its own AdamW."""

    name = "pair"
    players = ("critic", "student")

    def build_nets(self):
        return {"critic": copy.deepcopy(self.comp.model)}

    def loss(self, nets, batch, player="student"):
        x, t, u = batch.xt, batch.t, batch.ut
        if player == "critic":
            per = (nets.critic(x, t) - (u - nets.student(x, t).detach())).pow(2).mean(1)
        else:
            per = (nets.student(x, t) + nets.critic(x, t).detach() - u).pow(2).mean(1)
        return LossOutput(per.mean(), per, t)


def _cfg(name: str, steps: int = 20):
    return make_tiny_cfg(f"train.objective={name}", f"train.steps={steps}", "train.fast=off")


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "analytic", Analytic)
    monkeypatch.setitem(OBJECTIVES, "pair", Pair)


@pytest.mark.parametrize("name", ["analytic", "pair"])
def test_trains_with_ema_checkpoint_and_exact_resume(tmp_path, name):
    a = train(_cfg(name), str(tmp_path / "a"), progress=False)
    assert sum(a.losses[-5:]) < 0.8 * sum(a.losses[:5])  # it learns the field (0.6 measured)
    ckpt = load_checkpoint(a.checkpoint)
    assert ckpt["objective"]["name"] == name and ckpt["step"] == 20
    assert not torch.equal(ckpt["ema"]["model"]["net.0.weight"], ckpt["model"]["net.0.weight"])
    assert ("critic" in ckpt.get("nets", {})) == (name == "pair") == ("critic" in ckpt.get("players", {}))
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(name), str(tmp_path / "b"), progress=False, on_step=_Interrupt(13))
    b = train(_cfg(name), str(tmp_path / "b"), progress=False, resume=True)
    assert b.start_step == 10 and a.losses[10:] == b.losses  # bit for bit: the same kernels in the same order
    for k, v in load_checkpoint(b.checkpoint)["ema"]["model"].items():
        assert torch.equal(v, ckpt["ema"]["model"][k])


def test_resume_under_another_objective_is_refused(tmp_path):
    train(_cfg("analytic", 5), str(tmp_path / "r"), progress=False)
    with pytest.raises(Exception, match="objective 'analytic'.*'pair'"):
        train(_cfg("pair", 10), str(tmp_path / "r"), progress=False, resume=True)


def _ddp_results(rank: int, out_dir: str) -> dict:
    OBJECTIVES["pair"] = Pair  # a spawned process imports this module afresh
    whole = train(_cfg("pair"), os.path.join(out_dir, "whole"), progress=False)
    train(_cfg("pair", 10), os.path.join(out_dir, "half"), progress=False)
    rest = train(_cfg("pair"), os.path.join(out_dir, "half"), progress=False, resume=True)
    return {"whole": whole.losses, "rest": rest.losses, "world": whole.world_size}


def test_two_rank_gloo_ddp_trains_and_resumes_exactly(tmp_path):
    ranks = _spawn(str(tmp_path), results=_ddp_results)
    for r in ranks:
        assert r["world"] == 2 and r["whole"][10:] == r["rest"] and r["whole"] == ranks[0]["whole"]
    assert load_checkpoint(last_checkpoint(str(tmp_path / "whole")))["world_size"] == 2
