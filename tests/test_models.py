"""Velocity models, time embeddings and EMA (closed-form recurrence written here)."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch
from torch import nn

from flowmatch.config import ModelConfig, apply_overrides, ExperimentConfig
from flowmatch.errors import ConfigError, UnknownNameError
from flowmatch.models import (
    ACTIVATIONS,
    EMA,
    MODELS,
    STEP_KEYS,
    TIME_EMBEDDINGS,
    FourierEmbedding,
    MLPVelocity,
    SinusoidalEmbedding,
    UNetVelocity,
    build_model,
    load_flow_weights,
)

DATA = pathlib.Path(__file__).resolve().parent / "data"


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def inputs(b=7, dim=2, seed=0, dtype=torch.float32):
    g = gen(seed)
    return torch.randn(b, dim, generator=g, dtype=dtype), torch.rand(b, generator=g, dtype=dtype)


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_sinusoidal_embedding_closed_form(dim):
    emb = SinusoidalEmbedding(dim)
    t = torch.tensor([0.0, 0.1, 0.5, 0.999, 1.0])
    out = emb(t)
    assert out.shape == (5, dim) and out.dtype == torch.float32
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    arg = 1000.0 * t.double()[:, None] * freqs[None, :]
    want = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    assert torch.allclose(out.double(), want, atol=2e-4)
    # at t = 0: cos part is 1, sin part is 0
    assert torch.equal(out[0, :half], torch.ones(half)) and torch.equal(out[0, half:], torch.zeros(half))


def test_sinusoidal_distinguishes_close_times_and_is_deterministic():
    emb = SinusoidalEmbedding(64)
    t = torch.tensor([0.500, 0.501])
    out = emb(t)
    assert (out[0] - out[1]).abs().max() > 1e-3
    assert torch.equal(SinusoidalEmbedding(64)(t), out)  # no randomness
    assert "freqs" not in emb.state_dict()  # recomputed, not checkpointed


def test_sinusoidal_keeps_float64():
    out = SinusoidalEmbedding(8)(torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.parametrize("dim,scale", [(8, 1.0), (32, 16.0)])
def test_fourier_embedding_closed_form_and_buffer(dim, scale):
    torch.manual_seed(0)
    emb = FourierEmbedding(dim, scale=scale)
    t = torch.linspace(0, 1, 9)
    out = emb(t)
    assert out.shape == (9, dim)
    w = emb.w
    assert w.shape == (dim // 2,)
    arg = 2 * math.pi * t[:, None].double() * w[None, :].double()
    want = torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)
    assert torch.allclose(out.double(), want, atol=1e-4)
    # w is a persistent buffer (restored from checkpoints), not a parameter
    assert "w" in emb.state_dict() and len(list(emb.parameters())) == 0
    # cos^2 + sin^2 = 1 pairwise
    assert torch.allclose(out[:, : dim // 2] ** 2 + out[:, dim // 2:] ** 2, torch.ones(9, dim // 2), atol=1e-5)


def test_fourier_scale_sets_frequency_spread():
    torch.manual_seed(1)
    w = FourierEmbedding(4096, scale=16.0).w
    assert w.std().item() == pytest.approx(16.0, rel=0.05)


def test_fourier_deterministic_under_seed_and_restored_by_state_dict():
    torch.manual_seed(3)
    a = FourierEmbedding(16)
    torch.manual_seed(3)
    b = FourierEmbedding(16)
    torch.manual_seed(4)
    c = FourierEmbedding(16)
    t = torch.rand(5, generator=gen(0))
    assert torch.equal(a(t), b(t)) and not torch.equal(a(t), c(t))
    c.load_state_dict(a.state_dict())
    assert torch.equal(c(t), a(t))


@pytest.mark.parametrize("cls", [SinusoidalEmbedding, FourierEmbedding])
def test_embedding_odd_dim_rejected(cls):
    with pytest.raises(ValueError):
        cls(7)


def test_time_embeddings_registry():
    assert TIME_EMBEDDINGS == {"sinusoidal": SinusoidalEmbedding, "fourier": FourierEmbedding}


# --------------------------------------------------------------------------- MLP


@pytest.mark.parametrize("time_embedding", ["sinusoidal", "fourier"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_output_shape_all_configs(time_embedding, activation):
    torch.manual_seed(0)
    model = MLPVelocity(dim=2, hidden=16, depth=2, activation=activation, time_embedding=time_embedding,
                        time_dim=8)
    x, t = inputs()
    v = model(x, t)
    assert v.shape == (7, 2) and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert isinstance(model.net[1], ACTIVATIONS[activation])


@pytest.mark.parametrize("dim,hidden,depth,time_dim", [(1, 4, 1, 2), (3, 32, 3, 16), (10, 8, 5, 4)])
def test_mlp_architecture_sizes(dim, hidden, depth, time_dim):
    model = MLPVelocity(dim=dim, hidden=hidden, depth=depth, time_dim=time_dim)
    linears = [m for m in model.net if isinstance(m, nn.Linear)]
    assert len(linears) == depth + 1
    assert linears[0].in_features == dim + time_dim
    assert all(lin.out_features == hidden for lin in linears[:-1])
    assert linears[-1].out_features == dim
    n_params = sum(p.numel() for p in model.parameters())
    want = (dim + time_dim + 1) * hidden + (depth - 1) * (hidden + 1) * hidden + (hidden + 1) * dim
    assert n_params == want
    x, t = inputs(b=4, dim=dim)
    assert model(x, t).shape == (4, dim)


def test_mlp_depends_on_x_and_t_and_backprops():
    torch.manual_seed(0)
    model = MLPVelocity(dim=2, hidden=32, depth=2, time_dim=16)
    x, t = inputs(b=5)
    v = model(x, t)
    assert not torch.allclose(v, model(x, 1 - t))
    assert not torch.allclose(v, model(x + 1, t))
    # rows are independent: a row's output does not depend on the other rows
    assert torch.allclose(model(x[:2], t[:2]), v[:2], atol=1e-6)
    v.pow(2).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_mlp_float64():
    model = MLPVelocity(dim=2, hidden=8, depth=1, time_dim=4).double()
    x, t = inputs(dtype=torch.float64)
    assert model(x, t).dtype == torch.float64


@pytest.mark.parametrize("bad_t", [torch.tensor(0.5), torch.zeros(7, 1), torch.zeros(6), torch.zeros(1, 7)])
def test_mlp_rejects_t_of_wrong_shape(bad_t):
    model = MLPVelocity(dim=2, hidden=8, depth=1, time_dim=4)
    x, _ = inputs()
    with pytest.raises(ValueError, match=r"\[B\]"):
        model(x, bad_t)


def test_mlp_bad_config():
    with pytest.raises(UnknownNameError) as e:
        MLPVelocity(activation="swish")
    for name in ACTIVATIONS:
        assert name in str(e.value)
    with pytest.raises(UnknownNameError) as e:
        MLPVelocity(time_embedding="learned")
    assert "sinusoidal" in str(e.value) and "fourier" in str(e.value)
    with pytest.raises(ValueError):
        MLPVelocity(depth=0)
    with pytest.raises(ValueError):
        MLPVelocity(hidden=0)


def test_mlp_accepts_cond_argument():
    model = MLPVelocity(dim=2, hidden=8, depth=1, time_dim=4)
    x, t = inputs()
    assert torch.equal(model(x, t, cond=None), model(x, t))


# --------------------------------------------------------------------------- build_model


def test_build_model_from_config():
    cfg = ModelConfig(hidden=24, depth=2, activation="gelu", time_embedding="fourier", time_dim=6,
                      fourier_scale=3.0)
    torch.manual_seed(0)
    model = build_model(cfg, 3)
    assert isinstance(model, MLPVelocity) and model.dim == 3
    linears = [m for m in model.net if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and linears[0].in_features == 3 + 6 and linears[0].out_features == 24
    assert isinstance(model.net[1], nn.GELU)
    assert isinstance(model.time_embed, FourierEmbedding) and model.time_embed.w.shape == (3,)
    # same seed, same config: identical weights (the model is rebuilt from config on load)
    torch.manual_seed(0)
    again = build_model(cfg, (3,))
    for (ka, a), (kb, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    x, t = inputs(b=4, dim=3)
    assert model(x, t).shape == (4, 3)


def test_build_model_defaults_and_unknown_name():
    model = build_model(ModelConfig(), 2)
    assert isinstance(model.time_embed, SinusoidalEmbedding)
    assert sum(isinstance(m, nn.Linear) for m in model.net) == ModelConfig().depth + 1
    assert set(MODELS) == {"mlp", "unet"}
    with pytest.raises(UnknownNameError, match="mlp, unet"):
        build_model(ModelConfig(name="transformer"), 2)


# --------------------------------------------------------------------------- the step input


def _tiny_unet(**kw):
    return UNetVelocity(1, 8, base_channels=4, channel_mult=(1,), num_res_blocks=1, **kw)


def _pair(kind: str, time_embedding: str = "sinusoidal"):
    """A plain model and a step-input one holding its weights (seeded alike)."""
    torch.manual_seed(0)
    if kind == "mlp":
        plain = MLPVelocity(dim=2, hidden=16, depth=2, time_dim=8, time_embedding=time_embedding)
        stepped = MLPVelocity(dim=2, hidden=16, depth=2, time_dim=8, time_embedding=time_embedding, step_input=True)
        x, t = inputs(b=5)
    else:
        plain, stepped = _tiny_unet(), _tiny_unet(step_input=True)
        nn.init.normal_(plain.out_conv.weight, std=0.1)  # a non-zero field
        x, t = torch.randn(5, 1, 8, 8, generator=gen(1)), torch.rand(5, generator=gen(2))
    load_flow_weights(stepped, plain.state_dict())
    return plain, stepped, x, t


@pytest.mark.parametrize("kind,emb", [("mlp", "sinusoidal"), ("mlp", "fourier"), ("unet", "sinusoidal")])
def test_a_step_input_model_starts_as_its_plain_model_for_every_step_and_then_depends_on_it(kind, emb):
    plain, stepped, x, t = _pair(kind, emb)
    assert set(stepped.state_dict()) - set(plain.state_dict()) == set(STEP_KEYS)
    assert not plain.state_dict().keys() & set(STEP_KEYS)  # the plain model's keys are unchanged
    with torch.no_grad():
        ref = plain(x, t)
        for h in (None, torch.zeros(5), torch.full((5,), 0.25), torch.rand(5, generator=gen(3))):
            assert torch.equal(stepped(x, t, h=h), ref)
        nn.init.normal_(stepped.step_proj.weight)
        a, b = stepped(x, t, h=torch.full((5,), 0.5)), stepped(x, t, h=torch.full((5,), 0.125))
        assert not torch.allclose(a, b)
        assert torch.equal(stepped(x, t), stepped(x, t, h=torch.zeros(5)))  # h = None is h = 0


def test_the_step_input_is_checked_and_refused_by_a_plain_model():
    plain, stepped, x, t = _pair("mlp")
    with pytest.raises(ValueError, match="no step input h"):
        plain(x, t, h=torch.zeros(5))
    with pytest.raises(ValueError, match=r"the step h must have shape \[B\]=\[5\]"):
        stepped(x, t, h=torch.zeros(4))
    u_plain, _, xi, ti = _pair("unet")
    with pytest.raises(ValueError, match="no step input h"):
        u_plain(xi, ti, h=torch.zeros(5))
    with pytest.raises(ConfigError, match="model.step_input: expected bool"):
        apply_overrides(ExperimentConfig(), ["model.step_input=2"])


def test_load_flow_weights_is_strict_but_for_the_step_projection():
    plain, stepped, _, _ = _pair("mlp")
    state = plain.state_dict()
    del state["net.0.bias"]
    with pytest.raises(RuntimeError, match="missing key 'net.0.bias'"):
        load_flow_weights(stepped, state)
    with pytest.raises(RuntimeError):  # a plain model takes no step projection
        load_flow_weights(plain, stepped.state_dict())
    full = {k: torch.ones_like(v) for k, v in stepped.state_dict().items()}
    load_flow_weights(stepped, full)  # a step-input model's own weights: all of them
    assert torch.equal(stepped.step_proj.weight, torch.ones_like(stepped.step_proj.weight))


@pytest.mark.parametrize("name", ["mlp", "unet"])
def test_checkpoints_written_before_the_step_input_load_unchanged(name):
    """``tests/data/plain_*_v1.pt`` were written by the code before ``model.step_input`` existed (2 training
    steps; the UNet's without its optimiser state, to keep the file small); ``plain_v1_outputs.pt`` holds
    that code's outputs on the inputs below. Another host may round differently: a stated tolerance."""
    from flowmatch.training import load_model

    loaded = load_model(str(DATA / f"plain_{name}_v1.pt"))
    assert loaded.config.model.step_input is False and getattr(loaded.model, "step_proj") is None
    if name == "mlp":
        x, t = torch.linspace(-1, 1, 8).reshape(4, 2), torch.tensor([0.0, 0.3, 0.7, 1.0])
    else:
        x, t = torch.linspace(-1, 1, 128).reshape(2, 1, 8, 8), torch.tensor([0.2, 0.9])
    with torch.no_grad():
        out = loaded.model(x, t)
    torch.testing.assert_close(out, torch.load(DATA / "plain_v1_outputs.pt")[name], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- EMA


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _set_params(module: nn.Module, values: torch.Tensor) -> None:
    i = 0
    with torch.no_grad():
        for p in module.parameters():
            n = p.numel()
            p.copy_(values[i:i + n].reshape(p.shape))
            i += n


@pytest.mark.parametrize("decay,updates", [(0.5, 20), (0.9, 12), (0.999, 5), (0.0, 3)])
def test_ema_follows_closed_form_recurrence(decay, updates):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    ema = EMA(model, decay=decay)
    shadow = _flat(model).clone()
    g = gen(1)
    for n in range(1, updates + 1):
        new = torch.randn(shadow.numel(), generator=g, dtype=torch.float64)
        _set_params(model, new)
        ema.update(model)
        d = min(decay, (1 + n) / (10 + n))  # warm-up
        shadow = d * shadow + (1 - d) * new
        assert torch.allclose(_flat(ema.model), shadow, atol=1e-12), n
    assert ema.num_updates == updates


def test_ema_warmup_then_constant_decay():
    # with decay 0.5 the warm-up factor (1 + n)/(10 + n) is below 0.5 until n = 8: check both regimes
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    shadow = 0.0
    for n in range(1, 13):
        ema.update(model)
        d = (1 + n) / (10 + n) if n < 8 else 0.5
        shadow = d * shadow + (1 - d) * 1.0
        assert ema.model.weight.item() == pytest.approx(shadow, abs=1e-14)


def test_ema_is_a_copy_and_frozen():
    torch.manual_seed(0)
    model = MLPVelocity(dim=2, hidden=8, depth=1, time_dim=4)
    ema = EMA(model, decay=0.9)
    before = _flat(ema.model).clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(_flat(ema.model), before)  # not shared
    assert all(not p.requires_grad for p in ema.model.parameters())
    assert not ema.model.training


def test_ema_copies_buffers():
    torch.manual_seed(0)
    model = MLPVelocity(dim=2, hidden=8, depth=1, time_embedding="fourier", time_dim=4)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.time_embed.w.mul_(2.0)
    ema.update(model)
    assert torch.equal(ema.model.time_embed.w, model.time_embed.w)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_ema_decay_validated(decay):
    with pytest.raises(ValueError):
        EMA(nn.Linear(2, 2), decay=decay)


def test_ema_state_dict_round_trip():
    torch.manual_seed(0)
    model = MLPVelocity(dim=2, hidden=8, depth=2, time_dim=4)
    ema = EMA(model, decay=0.95)
    g = gen(2)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        ema.update(model)
    state = ema.state_dict()
    assert state["decay"] == 0.95 and state["num_updates"] == 4

    torch.manual_seed(99)
    other_model = MLPVelocity(dim=2, hidden=8, depth=2, time_dim=4)
    restored = EMA(other_model, decay=0.5)
    assert not torch.equal(_flat(restored.model), _flat(ema.model))
    restored.load_state_dict(state)
    assert restored.decay == 0.95 and restored.num_updates == 4
    assert torch.equal(_flat(restored.model), _flat(ema.model))
    # both continue identically (same warm-up counter)
    ema.update(model)
    restored.update(model)
    assert torch.equal(_flat(restored.model), _flat(ema.model))
    x, t = inputs()
    assert torch.equal(restored.model(x, t), ema.model(x, t))


def test_ema_state_dict_survives_torch_save_weights_only(tmp_path):
    model = MLPVelocity(dim=2, hidden=8, depth=1, time_dim=4)
    ema = EMA(model, decay=0.9)
    ema.update(model)
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh = EMA(MLPVelocity(dim=2, hidden=8, depth=1, time_dim=4), decay=0.1)
    fresh.load_state_dict(state)
    assert fresh.num_updates == 1 and torch.equal(_flat(fresh.model), _flat(ema.model))
