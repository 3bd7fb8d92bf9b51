"""UNet velocity field, presets and classifier-free guidance."""

from __future__ import annotations

import pytest
import torch

import flowmatch.models.unet as unet_module
from flowmatch.errors import UnknownNameError
from flowmatch.models.unet import UNET_PRESETS, ClassifierFreeGuidance, UNetVelocity, unet_kwargs

# (channels, image size, batch) each preset is exercised at
PRESET_SHAPES = {"tiny": (1, 8, 2), "digits": (1, 8, 2), "small": (1, 28, 2), "mnist": (1, 28, 2), "cifar": (3, 32, 1)}


@pytest.fixture(autouse=True)
def one_thread():
    # small convolutions run far faster on one thread than on several contended ones
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def perturbed(model: UNetVelocity, seed: int = 0) -> UNetVelocity:
    """The model with a random (non-zero) output conv, so its output depends on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.out_conv.weight.copy_(0.1 * torch.randn(model.out_conv.weight.shape, generator=g))
    return model.eval()


def conditional(seed: int = 0, num_classes: int = 3) -> UNetVelocity:
    torch.manual_seed(seed)
    return perturbed(UNetVelocity(1, 8, num_classes=num_classes, **unet_kwargs("tiny")), seed)


def inputs(b: int = 4, c: int = 1, s: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, s, s, generator=g), torch.rand(b, generator=g)


def test_presets_cover_the_table():
    assert set(PRESET_SHAPES) == set(UNET_PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESET_SHAPES))
def test_every_preset_keeps_the_shape(preset):
    c, s, b = PRESET_SHAPES[preset]
    torch.manual_seed(0)
    model = perturbed(UNetVelocity(c, s, **unet_kwargs(preset)))
    x, t = inputs(b, c, s)
    with torch.no_grad():
        v = model(x, t)
    assert v.shape == x.shape and v.dtype == x.dtype
    assert torch.isfinite(v).all()


def test_param_counts_of_presets():
    counts = {name: n_params(UNetVelocity(c, s, **unet_kwargs(name))) for name, (c, s, _) in PRESET_SHAPES.items()}
    assert counts["tiny"] < 100_000
    assert 500_000 < counts["digits"] < 1_200_000
    assert 700_000 < counts["small"] < 1_400_000
    assert 3_000_000 < counts["mnist"] < 6_000_000
    assert 33_000_000 < counts["cifar"] < 40_000_000


def test_class_embedding_has_a_null_row():
    model = UNetVelocity(1, 8, num_classes=10, **unet_kwargs("tiny"))
    assert model.num_classes == 10 and model.null_class == 10
    assert model.class_embed.num_embeddings == 11
    uncond = UNetVelocity(1, 8, **unet_kwargs("tiny"))
    assert uncond.num_classes is None and uncond.null_class is None
    assert n_params(model) - n_params(uncond) == 11 * 4 * 8


def test_zero_output_at_init():
    torch.manual_seed(0)
    model = UNetVelocity(1, 28, num_classes=10, **unet_kwargs("small"))
    x, t = inputs(2, 1, 28)
    v = model(x, t, torch.tensor([3, 10]))
    assert torch.equal(v, torch.zeros_like(x))


def test_after_one_step_output_depends_on_t_and_cond():
    torch.manual_seed(0)
    model = UNetVelocity(1, 8, num_classes=3, **unet_kwargs("tiny"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t = inputs(4)
    y = torch.tensor([0, 1, 2, 3])
    (model(x, t, y) - torch.randn_like(x)).square().mean().backward()
    opt.step()
    with torch.no_grad():
        base = model(x, t, y)
        assert base.abs().max() > 0
        assert (model(x, 1.0 - t, y) - base).abs().max() > 1e-4
        assert (model(x, t, torch.tensor([1, 2, 0, 0])) - base).abs().max() > 1e-4


def test_cond_none_is_the_null_label_and_cond_ignored_when_unconditional():
    model = conditional()
    x, t = inputs(4)
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t, torch.full((4,), model.null_class)))
        assert not torch.allclose(model(x, t), model(x, t, torch.zeros(4, dtype=torch.long)))
    torch.manual_seed(0)
    uncond = perturbed(UNetVelocity(1, 8, **unet_kwargs("tiny")))
    with torch.no_grad():
        assert torch.equal(uncond(x, t), uncond(x, t, torch.tensor([0, 1, 2, 0])))


def test_cfg_scales_zero_one_and_formula():
    model = conditional()
    x, t = inputs(4)
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        v_cond = model(x, t, y)
        v_null = model(x, t, torch.full((4,), model.null_class))
        assert not torch.allclose(v_cond, v_null)
        torch.testing.assert_close(ClassifierFreeGuidance(model, y, 1.0)(x, t), v_cond)
        torch.testing.assert_close(ClassifierFreeGuidance(model, y, 0.0)(x, t), v_null)
        for w in (0.5, 2.0, 4.0):
            expected = v_null + w * (v_cond - v_null)
            torch.testing.assert_close(ClassifierFreeGuidance(model, y, w)(x, t), expected, rtol=1e-5, atol=1e-6)


def test_cfg_uses_one_batched_forward_and_broadcasts_an_int_label():
    model = conditional()
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    x, t = inputs(4)
    with torch.no_grad():
        v = ClassifierFreeGuidance(model, 2, 3.0)(x, t)
        expected = ClassifierFreeGuidance(model, torch.full((4,), 2), 3.0)(x, t)
        scalar_t = ClassifierFreeGuidance(model, 2, 3.0)(x, torch.tensor(0.5))
        per_row_t = ClassifierFreeGuidance(model, 2, 3.0)(x, torch.full((4,), 0.5))
    assert calls == [8, 8, 8, 8]
    torch.testing.assert_close(v, expected)
    torch.testing.assert_close(scalar_t, per_row_t)


def test_cfg_needs_a_conditional_model():
    with pytest.raises(ValueError, match="class-conditional"):
        ClassifierFreeGuidance(UNetVelocity(1, 8, **unet_kwargs("tiny")), 0, 2.0)


def test_image_size_not_divisible_by_the_levels():
    with pytest.raises(ValueError) as e:
        UNetVelocity(1, 28, base_channels=8, channel_mult=(1, 2, 2, 2))
    msg = str(e.value)
    assert "image_size=28" in msg and "channel_mult=[1, 2, 2, 2]" in msg and "multiple of 8" in msg
    UNetVelocity(1, 28, base_channels=8, channel_mult=(1, 2, 2))  # 28 -> 14 -> 7 is fine


def test_attention_resolution_must_be_a_feature_map_size():
    with pytest.raises(ValueError, match=r"\[28, 14, 7\]"):
        UNetVelocity(1, 28, base_channels=8, channel_mult=(1, 2, 2), attention_resolutions=(8,))
    with pytest.raises(ValueError, match="num_heads=3"):
        UNetVelocity(1, 8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,), num_heads=3)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 1, 16, 16), (2, 1, 8, 4), (2, 64)])
def test_wrong_image_shape_is_a_clear_error(shape):
    model = UNetVelocity(1, 8, **unet_kwargs("tiny"))
    with pytest.raises(ValueError) as e:
        model(torch.zeros(shape), torch.zeros(2))
    msg = str(e.value)
    assert "[B, 1, 8, 8]" in msg and str(list(shape)) in msg and "wrong size or channel count" in msg


@pytest.mark.parametrize("t", [torch.tensor(0.5), torch.zeros(3), torch.zeros(2, 1)])
def test_t_must_be_one_per_row(t):
    model = UNetVelocity(1, 8, **unet_kwargs("tiny"))
    with pytest.raises(ValueError, match=r"t must have shape \[B\]=\[2\]"):
        model(torch.zeros(2, 1, 8, 8), t)


def test_cond_of_the_wrong_shape_is_an_error():
    model = conditional()
    with pytest.raises(ValueError, match="cond must be class labels"):
        model(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.crosspath  # another memory layout: other conv kernels, within rtol
def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = perturbed(UNetVelocity(3, 8, num_classes=3, **unet_kwargs("digits")))
    x, t = inputs(2, 3, 8)
    y = torch.tensor([0, 2])
    with torch.no_grad():
        ref = model(x, t, y)
        got = model(x.to(memory_format=torch.channels_last), t, y)
        model.to(memory_format=torch.channels_last)
        both = model(x.to(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.crosspath
def test_bf16_autocast_on_cpu_is_close_to_fp32():
    torch.manual_seed(0)
    model = perturbed(UNetVelocity(1, 8, num_classes=3, **unet_kwargs("digits")))
    x, t = inputs(2)
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, torch.tensor([0, 1]))
            low_null = model(x, t)
    assert low.dtype == torch.float32  # the output has x's dtype
    assert torch.isfinite(low).all()
    err = (low_null - ref).norm() / ref.norm()
    assert err < 0.05, err


def test_tiny_preset_fits_a_fixed_batch():
    # rectified-flow regression on a fixed batch: the loss starts at E|x1 - x0|^2 = 2 (zero field)
    torch.manual_seed(0)
    model = UNetVelocity(1, 8, **unet_kwargs("tiny"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 8, 8, generator=g)
    t = torch.linspace(0.05, 0.95, 16)
    xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
    losses = []
    for _ in range(60):
        loss = (model(xt, t) - (x1 - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.0
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_unet_kwargs_overrides():
    kw = unet_kwargs("small", base_channels=16, channel_mult=[1, 2], dropout=None, attention_resolutions=[])
    assert kw["base_channels"] == 16 and kw["channel_mult"] == [1, 2] and kw["attention_resolutions"] == []
    assert kw["dropout"] == UNET_PRESETS["small"]["dropout"]
    assert kw["num_res_blocks"] == UNET_PRESETS["small"]["num_res_blocks"]
    kw["num_heads"] = 99
    assert UNET_PRESETS["small"]["num_heads"] != 99  # a copy
    UNetVelocity(1, 8, **unet_kwargs("cifar", base_channels=8, channel_mult=[1, 2], attention_resolutions=[4]))
    with pytest.raises(UnknownNameError) as e:
        unet_kwargs("huge")
    assert "'huge'" in str(e.value) and all(name in str(e.value) for name in UNET_PRESETS)


def test_all_names_import():
    for name in unet_module.__all__:
        assert hasattr(unet_module, name), name
