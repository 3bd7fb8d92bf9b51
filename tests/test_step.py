"""The step, the plan and the trainer (flowmatch.training.step, .plan, .trainer): the plain loop (every
loss read before its update) and the fast one (losses read at log steps) give the same numbers (eager
exactly, compiled to float rounding), no host read inside a fast step, NaN handling without a per-step
check, exact kill-and-resume across plans, the trainer API and the plan's values.

Why plain and fast may be compared bit for bit, on any host: they run the same update body; only the
reads differ. Why that body (multi-tensor ``foreach`` AdamW, clipping and EMA) equals the per-tensor
one the plain loop ran before, bit for bit (``test_foreach_update_equals_the_per_tensor_one``): on
the CPU torch's ``_foreach_*`` ops run the per-tensor kernel on each tensor in turn (ATen's slow
path), and torch's foreach AdamW does the per-tensor AdamW's arithmetic in the same order (lerp, mul
+ addcmul, sqrt / div / add eps, addcdiv), so each element goes through the same kernels, with the
same vector width and the same split into vector body and tail, whatever that width is. The fused
MLP step and the compiled step are other kernels: those are compared within a stated tolerance."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import flowmatch.training.loop as loop_mod

from conftest import FUSED_RTOL, make_tiny_cfg, nan_objective, replay_objective
from flowmatch.config import CHANNELS_LAST_MODES, COMPILE_MODES, FAST_MODES, PRECISIONS, TrainConfig, apply_overrides, from_dict
from flowmatch.couplings import Coupling, CouplingSample, IndependentCoupling
from flowmatch.data.images import ImageDataset
from flowmatch.data.toy import Gaussian
from flowmatch.errors import ConfigError, NonFiniteLossError
from flowmatch.models import EMA
from flowmatch.paths import get_path
from flowmatch.reflow import generate_pairs
from flowmatch.timesteps import get_time_sampler
from flowmatch.training import (CFM, OBJECTIVES, Components, Trainer, build_components, build_trainer, cfm_loss,
                                last_checkpoint, load_checkpoint, read_metrics, resolve_plan, train)
from flowmatch.training.plan import resolve_precision
from flowmatch.training.trainer import load_optimizer_state
from flowmatch.types import LossOutput
from flowmatch.utils import make_generator
from test_training import _Interrupt  # the same kill-at-step callback as the plain loop's resume tests

pytestmark = pytest.mark.crosspath  # most tests here compare the fast step with the plain loop


@pytest.fixture(scope="module")
def pair_store(tmp_path_factory, make_cfg):
    """A small reflow pair store (gaussian -> 8gaussians, the tiny config's data)."""
    root = tmp_path_factory.mktemp("pairs")
    teacher = train(make_cfg("train.steps=10"), str(root / "teacher"), progress=False)
    generate_pairs(teacher.checkpoint, str(root / "p"), 64, shard_size=32, solver="euler", nfe=2, progress=False)
    return str(root / "p")


def _extra(kind: str, pair_store: str) -> tuple:
    paired_mix = ("coupling.name=paired", f"coupling.pairs={pair_store}", "coupling.mix=0.25", "coupling.real=ot",
                  "train.init=random")
    return {"independent": ("coupling.name=independent",),
            "ot-exact": ("coupling.name=ot", "coupling.method=exact"),
            "sigma-logit": ("path.sigma=0.1", "time.name=logit_normal"),
            "paired-mix": paired_mix,
            "accum2-paired-mix": paired_mix[:-2] + ("coupling.real=independent", "train.init=random",
                                                    "train.grad_accum=2"),
            "accum3-sigma": ("path.sigma=0.1", "train.grad_accum=3")}[kind]


def _assert_same_state(a: dict, b: dict) -> None:
    for key in ("model",):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    for k, v in a["ema"]["model"].items():
        assert torch.equal(v, b["ema"]["model"][k]), ("ema", k)


# --------------------------------------------------------------------------- same numbers


@pytest.mark.parametrize("kind", ["independent", "ot-exact", "sigma-logit", "paired-mix", "accum2-paired-mix",
                                  "accum3-sigma"])
def test_fast_step_equals_plain_loop_exactly_on_cpu(make_cfg, tmp_path, pair_store, kind):
    base = ("train.steps=30", "train.log_every=5", "train.ckpt_every=10", "train.weight_decay=0.01",
            "train.grad_clip=0.5", *_extra(kind, pair_store))
    plain = train(make_cfg(*base, "train.fast=off"), str(tmp_path / "plain"), progress=False)
    # the autograd fast step (the fused MLP step agrees to rounding only: tests/test_fused_mlp.py)
    fast = train(make_cfg(*base, "train.fast=on", "train.compile=off", "train.fused=off"), str(tmp_path / "fast"),
                 progress=False)
    assert len(fast.losses) == 30 and all(isinstance(v, float) for v in fast.losses)
    assert fast.losses == plain.losses
    ca, cb = load_checkpoint(plain.checkpoint), load_checkpoint(fast.checkpoint)
    _assert_same_state(ca, cb)
    # both ran the multi-tensor optimiser: the plans differ only in when the losses are read
    assert ca["optimizer"]["param_groups"][0]["foreach"] is cb["optimizer"]["param_groups"][0]["foreach"] is True
    rows_a = read_metrics(os.path.join(plain.run_dir, "metrics.jsonl"))
    rows_b = read_metrics(os.path.join(fast.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows_b] == [5, 10, 15, 20, 25, 30]
    for ra, rb in zip(rows_a, rows_b):
        assert set(ra) == set(rb)
        for key in ra:
            if key != "train/steps_per_sec":
                assert ra[key] == rb[key], key


def test_foreach_update_equals_the_per_tensor_one():
    """Clipping and AdamW over a list of tensors (foreach) against the per-tensor ones: bit for bit (the
    module docstring says why), so the one update body reproduces the plain loop's former numbers."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(3, 37), torch.nn.SiLU(), torch.nn.Linear(37, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-2, weight_decay=0.01, foreach=f) for n, f in zip(nets, (False, True))]
    for step in range(12):
        x = torch.randn(64, 3, generator=make_generator(step))
        for n, opt, f in zip(nets, opts, (False, True)):
            opt.zero_grad()
            n(x).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(n.parameters(), 0.05, foreach=f)
            opt.step()
    for a, b in zip(*(n.parameters() for n in nets)):
        assert torch.equal(a, b)


def test_ema_foreach_update_equals_the_loop():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.SiLU(), torch.nn.Linear(8, 3))
    a, b = EMA(model, 0.9), EMA(model, 0.9)
    for _ in range(15):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        a.update(model)
        b.update(model, foreach=True)
    assert a.num_updates == b.num_updates == 15
    for pa, pb, p in zip(a.model.parameters(), b.model.parameters(), model.parameters()):
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, p)  # it is an average, not a copy


class _HostReads(TorchDispatchMode):
    """Records reads of a tensor's value to the host (``.item()``, ``float()``, ``bool()``), except of
    the given tensors (AdamW's step counters, which live on the CPU without ``fused``)."""

    def __init__(self, allowed):
        super().__init__()
        self.allowed = allowed
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].data_ptr() not in self.allowed:
            self.reads += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_fast_step_reads_nothing_back_from_the_device(make_cfg, fast):
    tr = build_trainer(make_cfg("coupling.name=ot", "coupling.method=sinkhorn", "coupling.num_iters=5"),
                       fast=fast, compile="off")
    tr.step()  # creates the optimiser state
    steps = {st["step"].data_ptr() for st in tr.optimizer.state.values()}
    with _HostReads(steps) as rec:
        tr.run(3)
    assert rec.reads == (0 if fast else 3)  # the plain loop reads its loss once per step
    assert len(tr.sync()) == 4 and tr.global_step == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CPU host reads are checked above")
def test_fast_step_does_not_synchronise_on_cuda(make_cfg):
    tr = build_trainer(make_cfg("train.device=cuda", "coupling.name=ot", "coupling.method=sinkhorn"), fast=True,
                       compile="off")
    tr.run(2)
    tr.sync()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tr.run(3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(tr.sync()) == 3


def test_compiled_fast_step_matches_plain(make_cfg, tmp_path, pair_store):
    """torch.compile (inductor, CPU) of the loss with two terms (pairs + real data): the same draws,
    losses equal to float rounding. Compiling takes ~20 s on an idle 2-core CPU with a cold cache."""
    base = ("train.steps=10", "train.log_every=5", "train.ckpt_every=10", *_extra("paired-mix", pair_store))
    plain = train(make_cfg(*base, "train.fast=off"), str(tmp_path / "plain"), progress=False)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    comp = train(make_cfg(*base, "train.fast=auto", "train.compile=default"), str(tmp_path / "comp"), progress=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # it was compiled
    assert comp.losses == pytest.approx(plain.losses, rel=1e-4)
    ca, cb = load_checkpoint(plain.checkpoint), load_checkpoint(comp.checkpoint)
    for k, v in ca["ema"]["model"].items():
        torch.testing.assert_close(cb["ema"]["model"][k], v, rtol=1e-4, atol=1e-5)
    rows_a = read_metrics(os.path.join(plain.run_dir, "metrics.jsonl"))
    rows_b = read_metrics(os.path.join(comp.run_dir, "metrics.jsonl"))
    for i in range(10):
        key = f"train/loss_t{i}"
        assert (key in rows_a[-1]) == (key in rows_b[-1])
        if key in rows_a[-1]:
            assert rows_b[-1][key] == pytest.approx(rows_a[-1][key], rel=1e-4)


# --------------------------------------------------------------------------- non-finite losses


def _nan_at(monkeypatch, call: int) -> None:
    monkeypatch.setitem(OBJECTIVES, "cfm", nan_objective(call))


def test_fast_nan_loss_raises_by_the_next_checkpoint_and_never_saves_it(make_cfg, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 7)
    run = str(tmp_path / "run")
    # log_every=50: the NaN of step 7 is found when step 10 is about to be checkpointed
    with pytest.raises(NonFiniteLossError) as e:
        train(make_cfg("train.steps=20", "train.ckpt_every=5", "train.log_every=50", "train.fast=on"), run,
              progress=False)
    assert e.value.step == 7 and "step 7" in str(e.value)
    assert e.value.checkpoint == last_checkpoint(run)
    ckpt = load_checkpoint(last_checkpoint(run))
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(v).all() for v in ckpt["ema"]["model"].values())


def test_fast_nan_before_first_checkpoint_says_none_was_written(make_cfg, tmp_path, monkeypatch):
    _nan_at(monkeypatch, 2)
    with pytest.raises(NonFiniteLossError) as e:
        train(make_cfg("train.fast=on"), str(tmp_path / "run"), progress=False)
    assert e.value.step == 2 and e.value.checkpoint is None
    assert not os.path.exists(last_checkpoint(str(tmp_path / "run")))


def test_trainer_reports_nan_at_sync_with_its_step(make_cfg):
    tr = build_trainer(make_cfg(), fast=True, compile="off", objective=nan_objective(3, float("inf")))
    tr.run(5)  # nothing is read inside the steps
    with pytest.raises(NonFiniteLossError) as e:
        tr.sync()
    assert e.value.step == 3 and e.value.checkpoint is None


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("first,then", [("on", "on"), ("off", "on"), ("on", "off")],
                         ids=["fast-fast", "plain-then-fast", "fast-then-plain"])
def test_fast_kill_and_resume_equals_unbroken_run(make_cfg, tmp_path, first, then):
    # the autograd fast step; the fused MLP step's resume: tests/test_fused_mlp.py
    base = ("train.steps=20", "train.ckpt_every=5", "train.log_every=4", "coupling.name=ot", "train.fused=off")
    a = train(make_cfg(*base, "train.fast=on"), str(tmp_path / "a"), progress=False)

    run_b = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*base, f"train.fast={first}"), run_b, progress=False, on_step=_Interrupt(13))
    assert load_checkpoint(last_checkpoint(run_b))["step"] == 10
    b = train(make_cfg(*base, f"train.fast={then}"), run_b, resume=True, progress=False)
    assert b.start_step == 10 and b.config.train.fast == then
    assert b.losses == a.losses[10:]
    ca, cb = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
    assert cb["step"] == 20
    _assert_same_state(ca, cb)
    # a run keeps its own optimiser implementation, whatever the checkpoint's (one written by the
    # former per-tensor plain loop says foreach=None)
    assert cb["optimizer"]["param_groups"][0]["foreach"] is True
    old = copy.deepcopy(ca["optimizer"])
    old["param_groups"][0]["foreach"] = None
    tr = build_trainer(make_cfg(*base))
    load_optimizer_state(tr.optimizer, old)
    assert tr.optimizer.param_groups[0]["foreach"] is True
    rows_a = read_metrics(os.path.join(a.run_dir, "metrics.jsonl"))
    rows_b = read_metrics(os.path.join(run_b, "metrics.jsonl"))
    assert [r["step"] for r in rows_b] == [4, 8, 12, 16, 20]
    for ra, rb in zip(rows_a, rows_b):
        if ra["step"] != 12:  # the resumed run logs step 12 for its steps 11..12 only
            assert ra["train/loss"] == rb["train/loss"] and ra["train/grad_norm"] == rb["train/grad_norm"]
            assert all(ra.get(f"train/loss_t{i}") == rb.get(f"train/loss_t{i}") for i in range(10))


# --------------------------------------------------------------------------- trainer API


def test_build_trainer_writes_nothing_and_counts_steps(make_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("train.fast=off")
    tr = build_trainer(cfg, fast=True)
    assert tr.plan.fast and tr.plan.compile is None  # fast on the CPU: not compiled unless asked
    out = tr.step()
    assert out.value is None and out.loss.ndim == 0 and out.lr == pytest.approx(cfg.train.lr / 2)
    tr.run(4)
    losses = tr.sync()
    assert tr.global_step == 5 and len(losses) == 5 and tr.sync() == []
    sums, counts = tr.take_bins()
    assert counts.sum().item() == 5 * cfg.train.batch_size and torch.isfinite(sums).all()
    state = tr.state_dict()
    assert state["step"] == 5 and {"model", "ema", "optimizer", "scheduler", "objective", "rng"} <= set(state)
    assert state["objective"]["name"] == "cfm" and "coupling" in state["objective"]["state"]
    assert os.listdir(tmp_path) == []
    # the same seed and config: a plain trainer makes the same steps. ``tr`` is the fused MLP step
    # (other kernels: equal to float rounding, FUSED_RTOL); the autograd fast step runs the plain
    # loop's kernels (module docstring) and gives the same floats
    assert tr.fused_mlp
    plain = build_trainer(cfg)
    plain.run(5)
    assert not plain.fast and plain.sync() == pytest.approx(losses, rel=FUSED_RTOL)
    autograd = build_trainer(cfg, fast=True, fused=False)
    autograd.run(5)
    assert autograd.fast and not autograd.fused_mlp
    plain = build_trainer(cfg)
    plain.run(5)
    assert autograd.sync() == plain.sync()


def test_trainer_state_round_trip_continues_exactly(make_cfg):
    cfg = make_cfg()
    a = build_trainer(cfg, fast=True)
    a.run(6)
    ref = a.sync()
    b = build_trainer(cfg, fast=True)
    b.run(3)
    first = b.sync()
    c = build_trainer(cfg, fast=True)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    c.run(3)
    assert c.global_step == 6 and first + c.sync() == ref


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("fast,compile,device,expected", [
    ("auto", "auto", "cpu", (False, None)),
    ("auto", "auto", "cuda", (True, "default")),
    ("on", "auto", "cpu", (True, None)),
    ("on", "on", "cpu", (True, "default")),
    ("auto", "reduce-overhead", "cpu", (True, "reduce-overhead")),
    ("on", "off", "cuda", (True, None)),
    ("off", "auto", "cuda", (False, None)),
    (True, False, "cuda", (True, None)),
])
def test_plan_fast_and_compile(fast, compile, device, expected):
    plan = resolve_plan(make_tiny_cfg(f"train.fast={fast}", f"train.compile={compile}"), device=device)
    assert (plan.fast, plan.compile) == expected
    assert dict(plan.reasons)["fast"].startswith("train.fast=") and plan.describe().count("\n") == 7


@pytest.mark.parametrize("key,value,valid", [("fast", "fastest", FAST_MODES), ("compile", "turbo", COMPILE_MODES)])
def test_bad_speed_value_lists_the_valid_ones(make_cfg, tmp_path, key, value, valid):
    with pytest.raises(ConfigError) as e:
        train(make_cfg(f"train.{key}={value}"), str(tmp_path / "run"), progress=False)
    msg = str(e.value)
    assert f"train.{key}" in msg and repr(value) in msg
    assert all(v in msg for v in valid)
    assert not os.path.exists(tmp_path / "run")  # refused before the run directory was touched
    with pytest.raises(ConfigError):
        build_trainer(make_cfg(f"train.{key}={value}"))


def test_compile_without_the_fast_step_is_refused():
    with pytest.raises(ConfigError, match="train.fast=off"):
        resolve_plan(make_tiny_cfg("train.fast=off", "train.compile=default"))


def test_yaml_on_off_are_read_as_the_documented_strings():
    cfg = apply_overrides(from_dict({}), ["train.fast=on", "train.compile=off"])
    assert cfg.train.fast == "on" and cfg.train.compile == "off"  # YAML 1.1 reads them as booleans
    assert TrainConfig(fast=False).fast == "off"
    assert TrainConfig().fast == "auto" and TrainConfig().compile == "auto"
    with pytest.raises(ConfigError, match="train.fast"):
        from_dict({"train": {"fast": 1}})
    assert "train.fast" in loop_mod.RESUMABLE_KEYS and "train.compile" in loop_mod.RESUMABLE_KEYS


# --------------------------------------------------------------------------- class labels

class _Probe(nn.Module):
    """A small convolutional velocity ``v(x, t, cond)`` for ``[B, C, H, W]`` images that records the
    labels and the memory layout of every input it is given. ``conditional``: it has ``num_classes``
    and ``null_class`` (== num_classes) and a label embedding with the null row, like the UNet."""

    def __init__(self, channels: int = 3, num_classes: int = 10, conditional: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        if conditional:
            self.num_classes, self.null_class = num_classes, num_classes
            self.embed = nn.Embedding(num_classes + 1, channels)
        self.conds: list = []
        self.channels_last_inputs: list = []

    def forward(self, x, t, cond=None):
        self.conds.append(None if cond is None else cond.clone())
        self.channels_last_inputs.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        h = self.conv(x) + t[:, None, None, None]
        if cond is not None:
            h = h + self.embed(cond)[:, :, None, None]
        return h


def _images(model: nn.Module, *, labeled: bool = True, channels: int = 3, n: int = 64) -> Components:
    """Components for gaussian -> a small random labeled (or unlabeled) image set ``[n, C, 8, 8]``."""
    g = make_generator(5)
    pixels = torch.randint(0, 256, (n, channels, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g) if labeled else None
    source, target = Gaussian(shape=(channels, 8, 8)), ImageDataset(pixels, labels, num_classes=10)
    return Components(torch.device("cpu"), source, target, get_path("linear"), IndependentCoupling(source, target),
                      get_time_sampler("uniform"), model)


def test_class_labels_reach_the_model_with_dropout_from_the_step_generator(make_cfg):
    p, b = 0.3, 256
    cfg = make_cfg("model.class_cond=true", f"train.class_dropout={p}", f"train.batch_size={b}")
    comp = _images(_Probe())
    tr = Trainer(cfg, comp)
    tr.run(4)
    conds = comp.model.conds
    assert len(conds) == 4 and all(c is not None and c.shape == (b,) and c.dtype == torch.long for c in conds)
    # the first step's labels, replayed by hand: batch, times, then one uniform draw per label
    g = make_generator(cfg.train.seed)
    y = IndependentCoupling(comp.source, comp.target).sample(b, generator=g).y
    comp.time_sampler.sample(b, generator=g)
    want = torch.where(torch.rand(b, generator=g) < p, torch.full_like(y, 10), y)
    assert torch.equal(conds[0], want)
    # the dropout rate over 1024 labels: 0.3 +- 0.014 (one standard deviation)
    rate = (torch.cat(conds) == 10).double().mean().item()
    assert abs(rate - p) < 0.06, rate
    assert torch.cat(conds).max() <= 10 and (torch.cat(conds) < 10).any()


@pytest.mark.parametrize("p,null_share", [(0.0, 0.0), (1.0, 1.0)])
def test_class_dropout_extremes(make_cfg, p, null_share):
    comp = _images(_Probe())
    Trainer(make_cfg("model.class_cond=true", f"train.class_dropout={p}"), comp).run(2)
    assert all((c == 10).double().mean().item() == null_share for c in comp.model.conds)


def test_unconditional_model_gets_no_labels_and_draws_as_before(make_cfg):
    comp = _images(_Probe(conditional=False))
    Trainer(make_cfg(), comp).run(2)
    assert comp.model.conds == [None, None]
    # the toy step's first loss, by hand: coupling batch, times, path noise from the seeded generator
    cfg = make_cfg("path.sigma=0.1")
    tr = build_trainer(cfg, fast=False)
    ref = build_components(cfg)
    g = make_generator(cfg.train.seed)
    d = ref.coupling.sample(cfg.train.batch_size, generator=g)
    t = ref.time_sampler.sample(cfg.train.batch_size, generator=g)
    want = cfm_loss(ref.model, ref.path, d.x0, d.x1, t, generator=g).loss.item()
    assert tr.step().value == want


class _Unlabeled(Coupling):
    """A coupling whose labels are unknown until drawn (the base class's has_labels says None), and
    that draws none."""

    name = "wrapped"

    def __init__(self, inner):
        self.inner = inner

    def sample(self, batch_size, *, generator=None):
        d = self.inner.sample(batch_size, generator=generator)
        return CouplingSample(d.x0, d.x1)


def test_class_cond_without_labels_is_a_config_error(make_cfg, tmp_path):
    cfg = make_cfg("model.class_cond=true")
    with pytest.raises(ConfigError, match="class labels"):  # an unlabeled image set: at construction
        Trainer(cfg, _images(_Probe(), labeled=False))
    toy = build_components(make_cfg())
    toy.model = _Probe(channels=2)
    with pytest.raises(ConfigError, match="class labels"):  # toy data has no labels
        Trainer(cfg, toy)
    comp = _images(_Probe())
    comp.coupling = _Unlabeled(comp.coupling)
    tr = Trainer(cfg, comp)  # not known without drawing: the first step says so
    with pytest.raises(ConfigError, match="class labels"):
        tr.step()
    with pytest.raises(ConfigError, match="null_class"):
        Trainer(cfg, _images(_Probe(conditional=False)))
    with pytest.raises(ConfigError, match="class"):  # through the config: refused when the model is built
        train(cfg, str(tmp_path / "run"), progress=False)


@pytest.mark.parametrize("extra", [(), ("train.grad_accum=2", "train.channels_last=on")], ids=["plain", "accum-cl"])
def test_class_conditional_fast_step_equals_plain(make_cfg, extra):
    cfg = make_cfg("model.class_cond=true", "train.class_dropout=0.5", "train.batch_size=16", *extra)
    a, b = _images(_Probe()), _images(_Probe())
    b.model.load_state_dict(a.model.state_dict())
    plain, fast = Trainer(cfg, a, fast=False), Trainer(cfg, b, fast=True)
    plain.run(3)
    fast.run(3)
    assert plain.sync() == fast.sync()
    assert len(a.model.conds) == 3 * cfg.train.grad_accum
    assert all(torch.equal(x, y) for x, y in zip(a.model.conds, b.model.conds))
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("value,device,expected", [
    ("auto", "cpu", "fp32"), ("fp32", "cpu", "fp32"), ("bf16", "cpu", "bf16"), ("fp32", "cuda", "fp32"),
])
def test_resolve_precision(value, device, expected):
    assert resolve_precision(value, device) == expected


def test_resolve_precision_names_the_key_it_resolves():
    with pytest.raises(ConfigError, match=r"^reflow\.precision = 'fp16': must be one of auto, fp32, bf16$"):
        resolve_precision("fp16", "cpu", key="reflow.precision")
    assert resolve_precision("auto", "cuda", images=False, key="reflow.precision") == "fp32"


def test_auto_precision_is_bf16_on_cuda_when_supported():
    ok = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    assert resolve_precision("auto", "cuda") == ("bf16" if ok else "fp32")


def _toy_with_image_target(model: nn.Module) -> Components:
    """An unshaped source with an image target: the target says the task is an image one."""
    comp = _images(model)
    return replace(comp, source=Gaussian(comp.source.dim))


@pytest.mark.parametrize("build", ["toy", "images", "image_target"])
def test_plan_resolves_precision_auto_from_the_task(make_cfg, build):
    """``precision: auto`` and ``channels_last: auto`` resolved for a CUDA device from one "is this an
    image task" (the source's shape, else the target's): bf16 and channels_last for images only."""
    cfg = make_cfg("train.precision=auto", "train.channels_last=auto")
    comp = {"toy": lambda: build_components(cfg), "images": lambda: _images(_Probe(conditional=False)),
            "image_target": lambda: _toy_with_image_target(_Probe(conditional=False))}[build]()
    plan = resolve_plan(cfg, comp, device="cuda")  # resolved as for CUDA; nothing runs there
    assert (plan.precision, plan.channels_last) == (("bf16", True) if build != "toy" else ("fp32", False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_on_cuda_keeps_a_toy_run_in_fp32(make_cfg):
    cfg = make_cfg("train.device=cuda", "train.precision=auto")
    assert Trainer(cfg, build_components(cfg)).plan.precision == "fp32"


@pytest.mark.parametrize("value,device,expected", [
    ("auto", "cpu", False), ("auto", "cuda", True), ("on", "cpu", True), ("off", "cuda", False), (True, "cpu", True),
])
def test_plan_channels_last(value, device, expected):
    plan = resolve_plan(make_tiny_cfg(f"train.channels_last={value}"), device=device, images=True)
    assert plan.channels_last is expected
    assert resolve_plan(make_tiny_cfg(f"train.channels_last={value}"), device=device).channels_last is False


def test_resolve_plan_takes_every_step_key(make_cfg):
    cfg = make_cfg("train.fast=on", "train.precision=bf16", "train.channels_last=on", "train.grad_accum=4")
    plan = resolve_plan(cfg, images=True)
    assert (plan.fast, plan.compile, plan.precision, plan.channels_last, plan.grad_accum) == (True, None, "bf16", True, 4)
    plan = resolve_plan(make_cfg())  # the tiny config without components: the plain fp32 step
    assert (plan.fast, plan.compile, plan.fused, plan.precision, plan.channels_last) == (False, None, False, "fp32", False)


@pytest.mark.parametrize("key,value,valid", [
    ("precision", "fp16", PRECISIONS), ("channels_last", "sideways", CHANNELS_LAST_MODES),
    ("grad_accum", 0, ("integer >= 1",)), ("grad_accum", -2, ("integer >= 1",)),
    ("class_dropout", 1.5, ("[0, 1]",)), ("class_dropout", -0.1, ("[0, 1]",)),
])
def test_bad_step_value_is_refused_before_the_run_dir(make_cfg, tmp_path, key, value, valid):
    with pytest.raises(ConfigError) as e:
        train(make_cfg(f"train.{key}={value}"), str(tmp_path / "run"), progress=False)
    msg = str(e.value)
    assert f"train.{key}" in msg and all(v in msg for v in valid)
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(ConfigError):
        build_trainer(make_cfg(f"train.{key}={value}"))


def _dtypes_of(module: nn.Module, kind=nn.Linear) -> list:
    seen = []
    for m in module.modules():
        if isinstance(m, kind):
            m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_bf16_on_cpu_trains_close_to_fp32_with_fp32_state(make_cfg, fast):
    ref = build_trainer(make_cfg(), fast=fast, fused=False)  # the hooks see the module's forward
    tr = build_trainer(make_cfg("train.precision=bf16"), fast=fast)
    assert tr.plan.precision == "bf16" and ref.plan.precision == "fp32"
    seen32, seen16 = _dtypes_of(ref.model), _dtypes_of(tr.model)
    ref.run(5)
    tr.run(5)
    a, b = ref.sync(), tr.sync()
    assert all(math.isfinite(v) for v in b)
    assert b == pytest.approx(a, rel=0.05)  # bf16 keeps ~3 significant digits in the forward
    assert b != a  # and it did run in bf16
    assert set(seen16) == {torch.bfloat16} and set(seen32) == {torch.float32}
    # weights, gradients, optimiser moments and EMA stay fp32
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in tr.model.parameters())
    assert all(p.dtype == torch.float32 for p in tr.ema.model.parameters())
    assert all(v.dtype == torch.float32 for st in tr.optimizer.state.values() for k, v in st.items()
               if k in ("exp_avg", "exp_avg_sq"))
    if fast:  # the eager fast step is the plain step's arithmetic in bf16 too
        plain = build_trainer(make_cfg("train.precision=bf16"), fast=False)
        plain.run(5)
        assert plain.sync() == b


def test_class_conditional_unet_trains_in_bf16_channels_last_with_accumulation(make_cfg, tmp_path):
    """The real pieces together on the 8x8 digits: a class-conditional UNet, bf16 autocast on the CPU,
    channels_last, two micro-batches, the fast step; the checkpoint stays fp32."""
    cfg = make_cfg("data.target=digits", "model.name=unet", "model.preset=tiny", "model.class_cond=true",
                   "train.precision=bf16", "train.channels_last=on", "train.grad_accum=2", "train.fast=on",
                   "train.steps=2", "train.batch_size=8", "train.ckpt_every=2", "train.log_every=1")
    res = train(cfg, str(tmp_path / "run"), progress=False)
    assert len(res.losses) == 2 and all(math.isfinite(v) for v in res.losses)
    ckpt = load_checkpoint(res.checkpoint)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    assert all(v.dtype == torch.float32 for v in ckpt["ema"]["model"].values() if v.is_floating_point())
    assert res.model.num_classes == 10


def test_precision_and_layout_may_change_on_resume(make_cfg, tmp_path):
    run = str(tmp_path / "run")
    train(make_cfg("train.steps=4"), run, progress=False)
    res = train(make_cfg("train.steps=6", "train.precision=bf16", "train.channels_last=on"), run, resume=True,
                progress=False)
    assert res.start_step == 4 and res.config.train.precision == "bf16"
    assert load_checkpoint(res.checkpoint)["step"] == 6
    for key in ("train.precision", "train.channels_last"):
        assert key in loop_mod.RESUMABLE_KEYS
    assert "train.grad_accum" not in loop_mod.RESUMABLE_KEYS  # it changes the optimisation


# --------------------------------------------------------------------------- channels_last


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_channels_last_converts_the_model_once_and_every_input(make_cfg, fast):
    comp = _images(_Probe(conditional=False))
    tr = Trainer(make_cfg("train.channels_last=on"), comp, fast=fast)
    assert tr.plan.channels_last
    w = comp.model.conv.weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    tr.run(2)
    assert comp.model.channels_last_inputs == [True, True]
    off = _images(_Probe(conditional=False))
    Trainer(make_cfg("train.channels_last=off"), off, fast=fast).run(1)
    assert off.model.channels_last_inputs == [False] and off.model.conv.weight.is_contiguous()


def test_channels_last_leaves_flat_data_alone(make_cfg):
    tr = build_trainer(make_cfg("train.channels_last=on"))
    assert tr.plan.channels_last is False  # an MLP on [B, 2]: nothing to convert
    tr.run(1)


# --------------------------------------------------------------------------- gradient accumulation


def _fixed_batches(n: int, b: int, dim: int = 2, seed: int = 11):
    g = make_generator(seed)
    return [(torch.randn(b, dim, generator=g), 2 + torch.randn(b, dim, generator=g), torch.rand(b, generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_grad_accum_two_halves_equals_one_double_batch(make_cfg, fast):
    """grad_accum=2 at batch B and grad_accum=1 at batch 2B on the same data: the same gradient, loss
    and, after a full step (clipping, AdamW, EMA), the same weights."""
    halves = _fixed_batches(2, 16)
    whole = [tuple(torch.cat([h[i] for h in halves]) for i in range(3))]
    base = ("train.grad_clip=0.05", "train.weight_decay=0.01")  # a small clip: the clipped norm matters
    replay = replay_objective(halves)
    acc = build_trainer(make_cfg(*base, "train.grad_accum=2", "train.batch_size=16"), fast=fast, objective=replay)
    one = build_trainer(make_cfg(*base, "train.batch_size=32"), fast=fast, objective=replay_objective([whole[0]]))
    assert acc.plan.grad_accum == 2
    la, _ = acc.train_step.accumulate()
    lo, _ = one.train_step.accumulate()
    assert replay.calls == 2
    torch.testing.assert_close(la, lo)
    for pa, po in zip(acc.model.parameters(), one.model.parameters()):
        torch.testing.assert_close(pa.grad, po.grad, rtol=1e-5, atol=1e-7)
    # by hand: the gradient of the mean loss over both halves
    ref = build_components(make_cfg())
    cfm_loss(ref.model, ref.path, *whole[0]).loss.backward()
    for pa, pr in zip(acc.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(pa.grad, pr.grad, rtol=1e-5, atol=1e-7)
    out_a, out_o = acc.step(), one.step()
    torch.testing.assert_close(out_a.grad_norm, out_o.grad_norm)
    assert out_a.grad_norm > 0.05  # clipping was active
    for pa, po in zip(acc.model.parameters(), one.model.parameters()):
        torch.testing.assert_close(pa, po, rtol=1e-5, atol=1e-6)
    for pa, po in zip(acc.ema.model.parameters(), one.ema.model.parameters()):
        torch.testing.assert_close(pa, po, rtol=1e-5, atol=1e-6)
    assert acc.global_step == one.global_step == 1


def test_grad_accum_counts_optimiser_steps_and_every_micro_batch(make_cfg, tmp_path):
    res = train(make_cfg("train.steps=6", "train.grad_accum=3", "train.log_every=3", "train.ckpt_every=6"),
                str(tmp_path / "run"), progress=False)
    assert len(res.losses) == 6 and res.step == 6
    ckpt = load_checkpoint(res.checkpoint)
    assert all(int(st["step"]) == 6 for st in ckpt["optimizer"]["state"].values())
    tr = build_trainer(make_cfg("train.grad_accum=3"))
    tr.run(2)
    _, counts = tr.take_bins()
    assert counts.sum().item() == 2 * 3 * 32  # steps * micro-batches * batch_size
