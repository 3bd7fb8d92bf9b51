"""LoRA adapters (flowmatch.distill.adapters): targets, the disabled adapter as the base, training only
the adapter with exact resume, the adapter file (contents, provenance, refusals), composition with
weights, merging into a full checkpoint, and the CLI."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from flowmatch.cli import main
from flowmatch.config import ModelConfig, apply_overrides
from flowmatch.distill import adapters as A
from flowmatch.errors import ConfigError
from flowmatch.io import file_sha256
from flowmatch.models import build_model
from flowmatch.pipelines import sample_from_checkpoint, train_from_config
from flowmatch.training import build_trainer, last_checkpoint, load_checkpoint, load_model, train
from conftest import make_tiny_cfg
from test_training import _Interrupt

LORA = ("lora.rank=2", "lora.alpha=4")


def _probe(dim: int = 2, b: int = 16):
    g = torch.Generator().manual_seed(7)
    return torch.randn(b, dim, generator=g), torch.rand(b, generator=g)


def _perturb(model: nn.Module, seed: int = 1) -> None:
    """Give every LoRA tensor a non-zero value (a fresh adapter has B = 0 and changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name="unet", preset="tiny", attention_resolutions=[4]), (1, 8, 8))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A trained tiny MLP checkpoint: the base of the adapters."""
    res = train(make_tiny_cfg(), str(tmp_path_factory.mktemp("base") / "run"), progress=False)
    return res.checkpoint


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> str:
    res = train(make_tiny_cfg("train.seed=1"), str(tmp_path_factory.mktemp("other") / "run"), progress=False)
    return res.checkpoint


@pytest.fixture(scope="module")
def lora_runs(base, tmp_path_factory) -> dict:
    """Two LoRA runs on ``base`` (train_from_config, so each writes checkpoints/adapter.pt)."""
    out = {}
    for name, extra in (("accel", ()), ("style", ("train.seed=3", "data.target=moons"))):
        cfg = make_tiny_cfg(*LORA, f"train.init={base}", "eval.n=32", *extra)
        s = train_from_config(cfg, str(tmp_path_factory.mktemp(name) / "run"), progress=False)
        out[name] = s.checkpoint
    return out


# --------------------------------------------------------------------------- targets, disabled = base


def test_default_targets_per_model_type():
    mlp = build_model(ModelConfig(name="mlp", hidden=16, depth=2), (2,))
    assert A.default_targets(mlp) == ["net.0", "net.2", "net.4"]  # every Linear
    unet = _tiny_unet()
    names = A.default_targets(unet)
    convs = [n for n, m in unet.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)]
    assert set(names) == set(convs) | set(linears)
    assert any(n.endswith(".qkv") for n in names) and any(n.endswith("attn.proj") for n in names)
    assert {"time_embed.1", "time_embed.3"} <= set(names) and "input_conv" in names
    assert not any("class_embed" in n or "norm" in n for n in names)
    # a target names a module or a contiguous part of its dotted name; all its Linear / Conv2d layers
    assert A.resolve_targets(unet, ["time_embed"]) == ["time_embed.1", "time_embed.3"]
    assert all(n.endswith(("qkv", "proj")) for n in A.resolve_targets(unet, ["qkv", "proj"]))
    with pytest.raises(ConfigError, match=r"^lora.targets: 'nope' names no Linear or Conv2d layer") as e:
        A.resolve_targets(unet, ["nope"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_disabled_adapter_is_the_base_bit_for_bit(kind):
    if kind == "mlp":
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="mlp", hidden=16, depth=2), (2,))
        x, t = _probe()
    else:
        model = _tiny_unet()
        x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.rand(3)
    model.eval()
    with torch.no_grad():
        before = model(x, t)
    A.add_lora(model, 2, 4.0)
    assert A.has_adapter(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    _perturb(model)
    teacher = A.adapter_disabled(model)
    assert list(teacher.parameters()) == [] and teacher.state_dict() == {}
    model.train()
    with torch.no_grad():
        off = teacher(x, t)
        model.eval()
        on = model(x, t)
    assert torch.equal(off, before)
    assert not torch.allclose(on, before)
    # the switch and the flags are as they were after the call
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad():
        assert torch.equal(model(x, t), on)


# --------------------------------------------------------------------------- training an adapter


def test_lora_run_trains_only_the_adapter(base):
    cfg = make_tiny_cfg(*LORA, f"train.init={base}", "train.fused=off")
    tr = build_trainer(cfg)
    model = tr.model
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert [id(p) for p in tr.players[0].params] == [id(p) for p in lora]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    lora0 = [p.detach().clone() for p in lora]
    tr.run(5)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, q) for p, q in zip(lora, lora0))
    # the EMA averages the adapter; the frozen base is its own average
    for n, p in tr.ema.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    # the base's weights are those of the base checkpoint's EMA
    plain = load_model(base).model
    with torch.no_grad():
        x, t = _probe()
        assert torch.equal(A.adapter_disabled(model)(x, t), plain(x, t))
    assert A.trainable_parameters(model) < 0.5 * sum(p.numel() for p in plain.parameters())


def test_an_objective_takes_the_disabled_adapter_as_its_teacher(base):
    """The frozen-teacher role of an objective over the student's own weights: no second copy in the
    checkpoint, the base's output, and the adapter learns towards a target made from it."""
    from flowmatch.training.objectives import CFM
    from flowmatch.types import LossOutput

    class FromTeacher(CFM):
        name = "cfm"  # resumable as the run's own objective

        def build_nets(self):
            return {"teacher": A.adapter_disabled(self.comp.model)}

        def loss(self, nets, batch, player="student"):
            with torch.no_grad():
                target = 1.5 * nets["teacher"](batch.xt, batch.t)
            per = (nets.student(batch.xt, batch.t) - target).pow(2).mean(dim=1)
            return LossOutput(per.mean(), per, batch.t)

    tr = build_trainer(make_tiny_cfg(*LORA, f"train.init={base}", "train.fused=off"), objective=FromTeacher)
    tr.run(6)
    losses = tr.read_losses()
    assert losses[-1] < losses[0]
    state = tr.state_dict()
    assert "nets" not in state  # a frozen teacher is not training state
    x, t = _probe()
    with torch.no_grad():
        assert torch.equal(tr.nets["teacher"](x, t), load_model(base).model(x, t))
    assert tr.model.training  # the teacher's call leaves the student's mode as it was


def test_lora_needs_a_base():
    with pytest.raises(ConfigError, match=r"^lora.rank = 2 trains an adapter on a base model: set train.init"):
        build_trainer(make_tiny_cfg(*LORA))


def test_lora_run_resumes_exactly(base, tmp_path):
    cfg = make_tiny_cfg(*LORA, f"train.init={base}")
    a = train(cfg, str(tmp_path / "a"), progress=False)
    run_b = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_b, progress=False, on_step=_Interrupt(13))
    assert load_checkpoint(last_checkpoint(run_b))["step"] == 10
    b = train(cfg, run_b, resume=True, progress=False)
    assert b.start_step == 10 and b.losses == a.losses[10:]
    ca, cb = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
    for part in ("model",):
        for k, v in ca[part].items():
            assert torch.equal(v, cb[part][k]), k
    for k, v in ca["ema"]["model"].items():
        assert torch.equal(v, cb["ema"]["model"][k]), k
    assert cb["init_sha256"] == ca["init_sha256"] == file_sha256(base)
    ta, tb = A.adapter_from_checkpoint(a.checkpoint)["tensors"], A.adapter_from_checkpoint(b.checkpoint)["tensors"]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_load_model_refuses_a_lora_runs_checkpoint(lora_runs):
    with pytest.raises(Exception, match=r"is a LoRA run's checkpoint \(lora.rank = 2\)"):
        load_model(lora_runs["accel"])


# --------------------------------------------------------------------------- the adapter file


def test_adapter_file_holds_the_adapter_alone_with_provenance(base, lora_runs):
    path = os.path.join(os.path.dirname(lora_runs["accel"]), "adapter.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == A.ADAPTER_FORMAT and raw["version"] == A.ADAPTER_VERSION
    assert raw["base"]["sha256"] == file_sha256(base)
    assert raw["objective"] == "cfm" and raw["rank"] == 2 and raw["alpha"] == 4.0
    assert raw["targets"] == ["net.0", "net.2", "net.4"] and raw["config"]["lora"]["rank"] == 2
    keys = set(raw["tensors"])
    assert keys == {f"{m}.lora_{ab}.weight" for m in raw["targets"] for ab in "AB"}
    base_params = sum(v.numel() for v in load_checkpoint(base)["model"].values())
    n = sum(v.numel() for v in raw["tensors"].values())
    assert n == 2 * (10 + 16) + 2 * (16 + 16) + 2 * (16 + 2) and n < base_params / 3  # rank * (in + out) per layer
    # the EMA adapter of the run's checkpoint, and the file is much smaller than a checkpoint
    ema = load_checkpoint(lora_runs["accel"])["ema"]["model"]
    assert torch.equal(raw["tensors"]["net.2.lora_B.weight"], ema["net.2.lora_B.default.weight"])
    assert os.path.getsize(path) < os.path.getsize(base) / 3


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_adapter_refusals(base, other_base, lora_runs, tmp_path):
    adapter = os.path.join(os.path.dirname(lora_runs["accel"]), "adapter.pt")
    with pytest.raises(A.AdapterError) as e:  # a full checkpoint
        A.load_adapter(base)
    assert "is a full flowmatch checkpoint, not an adapter" in _one_line(e)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(open(adapter, "rb").read()[:300])
    with pytest.raises(A.AdapterError) as e:
        A.load_adapter(str(trunc))
    assert "is not a readable adapter" in _one_line(e)
    evil = tmp_path / "evil.pt"
    torch.save({"format": A.ADAPTER_FORMAT, "x": pickle.PickleError()}, str(evil))
    with pytest.raises(A.AdapterError) as e:
        A.load_adapter(str(evil))
    assert "holds a pickle that needs code to load" in _one_line(e)
    with pytest.raises(A.AdapterError) as e:  # another base: both hashes
        A.load_adapter(adapter, base=other_base)
    msg = _one_line(e)
    assert file_sha256(base)[:16] in msg and file_sha256(other_base)[:16] in msg
    with pytest.raises(A.AdapterError):
        sample_from_checkpoint(other_base, str(tmp_path / "s.pt"), n=8, adapters=[adapter], progress=False)
    assert A.load_adapter(adapter, base=base)["rank"] == 2


@pytest.mark.parametrize("text, spec", [("a.pt", A.AdapterSpec("a.pt", 1.0)), ("a.pt:0.8", A.AdapterSpec("a.pt", 0.8)),
                                        ("d/a.pt:-1", A.AdapterSpec("d/a.pt", -1.0))])
def test_parse_adapter_spec(text, spec):
    assert A.parse_adapter_spec(text) == spec


@pytest.mark.parametrize("text", ["a.pt:abc", "a.pt:nan", "a.pt:", "a.pt:1e999"])
def test_adapter_weight_that_is_not_a_number(text):
    with pytest.raises(ConfigError) as e:
        A.parse_adapter_spec(text)
    assert _one_line(e).startswith(f"--adapter {text}: the weight")
    with pytest.raises(ConfigError, match=r"^--adapter :1: no adapter file before the ':'"):
        A.parse_adapter_spec(":1")


# --------------------------------------------------------------------------- composition and merging


def _field(base: str, specs) -> nn.Module:
    model = load_model(base).model
    return A.apply_adapters(model, specs, base=base) if specs else model


def test_composition_and_merge(base, lora_runs, tmp_path):
    acc = os.path.join(os.path.dirname(lora_runs["accel"]), "adapter.pt")
    sty = os.path.join(os.path.dirname(lora_runs["style"]), "adapter.pt")
    x, t = _probe()
    with torch.no_grad():
        plain = _field(base, [])(x, t)
        zero = _field(base, [A.AdapterSpec(acc, 0.0)])(x, t)
        one = _field(base, [A.AdapterSpec(acc, 1.0)])(x, t)
        sty_only = _field(base, [A.AdapterSpec(sty, 0.8)])(x, t)
        both = _field(base, [A.AdapterSpec(acc, 1.0), A.AdapterSpec(sty, 0.8)])(x, t)
    assert torch.equal(zero, plain)  # weight 0 is the base bit for bit
    assert not torch.allclose(one, plain, atol=1e-4)
    # the two adapters compose: the result differs from each alone
    assert not torch.allclose(both, one, atol=1e-4) and not torch.allclose(both, sty_only, atol=1e-4)
    merged = str(tmp_path / "merged.pt")
    assert A.merge_adapters(base, [A.AdapterSpec(acc, 1.0)], merged) == merged
    lm = load_model(merged)
    with torch.no_grad():
        # weight 1: the merged checkpoint's model, to float rounding (W x + B (A x) s against (W + s B A) x)
        torch.testing.assert_close(lm.model(x, t), one, rtol=1e-5, atol=1e-5)
        A.merge_adapters(base, [A.AdapterSpec(acc, 1.0), A.AdapterSpec(sty, 0.8)], merged)
        torch.testing.assert_close(load_model(merged).model(x, t), both, rtol=1e-5, atol=1e-5)
    ck = load_checkpoint(merged)
    assert ck["merged"]["base_sha256"] == file_sha256(base)
    assert [a["weight"] for a in ck["merged"]["adapters"]] == [1.0, 0.8]
    assert not any(".lora_" in k or "base_layer" in k for k in ck["model"])


def test_cli_sample_with_adapters_and_merge(base, lora_runs, tmp_path, capsys):
    acc = os.path.join(os.path.dirname(lora_runs["accel"]), "adapter.pt")
    sty = os.path.join(os.path.dirname(lora_runs["style"]), "adapter.pt")
    out = str(tmp_path / "s.pt")
    assert main(["sample", base, "--adapter", f"{acc}:1.0", "--adapter", f"{sty}:0.8", "--solver", "euler",
                 "--nfe", "2", "--n", "64", "--out", out, "--no-progress"]) == 0
    rec = torch.load(out, weights_only=True)
    assert rec["nfe"] == 2 and [a["weight"] for a in rec["adapters"]] == [1.0, 0.8]
    assert main(["sample", base, "--solver", "euler", "--nfe", "2", "--n", "64", "--out", str(tmp_path / "p.pt"),
                 "--no-progress"]) == 0
    assert not torch.allclose(rec["samples"], torch.load(str(tmp_path / "p.pt"), weights_only=True)["samples"])
    capsys.readouterr()
    assert main(["sample", base, "--adapter", f"{acc}:x1", "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--adapter {acc}:x1: the weight 'x1'" in err
    merged = str(tmp_path / "m.pt")
    assert main(["adapter", "merge", base, "--adapter", acc, "--out", merged]) == 0
    assert load_model(merged).step == load_checkpoint(base)["step"]
    assert main(["adapter", "merge", base, "--adapter", base, "--out", merged]) == 2
    assert "is a full flowmatch checkpoint, not an adapter" in capsys.readouterr().err
    extracted = str(tmp_path / "e.pt")
    assert main(["adapter", "extract", lora_runs["style"], "--out", extracted]) == 0
    assert torch.equal(A.load_adapter(extracted)["tensors"]["net.0.lora_A.weight"],
                       A.load_adapter(sty)["tensors"]["net.0.lora_A.weight"])


def test_lora_on_the_unet_trains_only_the_adapter(tmp_path):
    """An image run: the UNet's default targets (attention too), channels_last on, the plain step."""
    over = ["name=digits_tiny", "data.source=gaussian", "data.target=digits", "model.name=unet", "model.preset=tiny",
            "model.attention_resolutions=[4]",
            "train.steps=4", "train.batch_size=8", "train.ckpt_every=4", "train.log_every=2", "train.device=cpu",
            "tracking.mode=disabled"]
    cfg = apply_overrides(make_tiny_cfg(), over)
    base = train(cfg, str(tmp_path / "base"), progress=False).checkpoint
    tr = build_trainer(apply_overrides(cfg, [*LORA, f"train.init={base}"]), channels_last="on")
    frozen = {n: p.detach().clone() for n, p in tr.model.named_parameters() if not p.requires_grad}
    assert frozen and all(".lora_" not in n for n in frozen)
    assert {id(p) for p in tr.players[0].params} == {id(p) for n, p in tr.model.named_parameters() if ".lora_" in n}
    tr.run(2)
    assert all(torch.isfinite(torch.tensor(tr.read_losses())))
    assert all(torch.equal(p, frozen[n]) for n, p in tr.model.named_parameters() if n in frozen)
    assert any(".qkv.lora_A." in n for n in tr.state_dict()["model"])
