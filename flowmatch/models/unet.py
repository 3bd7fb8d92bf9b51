"""UNet velocity field ``v(x, t, cond=None)`` for images ``x`` ``[B, C, H, H]`` -> ``[B, C, H, H]``.

The layout follows the UNet of the DDPM paper (Ho et al. 2020) as refined by Dhariwal & Nichol 2021
("Diffusion Models Beat GANs on Image Synthesis"): residual blocks with GroupNorm and SiLU, the time
(and class) embedding entering every residual block as a scale-shift of its second normalisation,
multi-head self-attention at chosen feature-map sizes, stride-2 convolutions to go down and
nearest-neighbour upsampling followed by a 3x3 convolution to come up. Only the architecture is
reused; the model here predicts a velocity (``t = 0`` noise, ``t = 1`` data), not noise.

Shapes, for ``L = len(channel_mult)`` levels and ``c = base_channels``::

    x [B, C, S, S] --conv3x3--> [B, c, S, S]
    down level i (size S / 2^i):  num_res_blocks x (ResBlock -> c * channel_mult[i], [Attention])
                                  then a stride-2 conv, except at the last level
    middle (size S / 2^(L-1)):    ResBlock, [Attention], ResBlock
    up level i (reverse order):   (num_res_blocks + 1) x (concat skip, ResBlock, [Attention])
                                  then nearest x2 + conv3x3, except at level 0
    GroupNorm -> SiLU -> conv3x3 (zero-initialised) --> [B, C, S, S]

``[Attention]`` is present at the feature-map sizes listed in ``attention_resolutions``; the middle
block has attention whenever any attention is requested (as in both papers), so
``attention_resolutions=()`` is a purely convolutional network. ``S`` must be divisible by
``2^(L-1)`` so every level has an integer size (28 -> 14 -> 7 for MNIST with three levels).

Embedding: sinusoids of ``time_scale * t`` (``t`` in [0, 1], so the frequencies match a
1000-step diffusion model) -> Linear(c, 4c) -> SiLU -> Linear(4c, 4c); a class-conditional model adds
a learned class embedding with ``num_classes + 1`` rows, the last (index ``num_classes``) being the
"null" label used for unconditional predictions and classifier-free guidance (Ho & Salimans 2022).

The output convolution starts at zero, so the untrained field is ``v = 0`` (a stable start).
With ``step_input`` the step ``h`` of an any-step model goes through the same embedding and a
zero-initialised ``Linear(4c, 4c)`` (``step_proj``) and is added to the time embedding.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from flowmatch.models.embeddings import SinusoidalEmbedding, with_step, zero_linear
from flowmatch.utils import as_time, lookup

__all__ = ["UNetVelocity", "UNET_PRESETS", "unet_kwargs", "ClassifierFreeGuidance"]

# Presets: keyword arguments of UNetVelocity (in_channels, image_size and num_classes are the data's).
# Parameter counts measured with this code, unconditional (a class embedding adds
# (num_classes + 1) * 4 * base_channels), 1-channel images except cifar (3 channels):
#   tiny    (8x8 and up)   43,921     a smoke-test model: trains on a CPU in seconds
#   digits  (8x8)           1.08 M
#   small   (28x28)         0.98 M
#   mnist   (28x28)         3.91 M
#   cifar   (32x32)        38.3 M     the DDPM CIFAR-10 layout (35.7 M there); the scale-shift embedding
#                                     projections of Dhariwal & Nichol add the difference
UNET_PRESETS: dict[str, dict] = {
    "tiny": dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                 dropout=0.0, num_heads=4),
    "digits": dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(4,),
                   dropout=0.0, num_heads=4),
    "small": dict(base_channels=24, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(7,),
                  dropout=0.0, num_heads=4),
    "mnist": dict(base_channels=48, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(7,),
                  dropout=0.1, num_heads=4),
    "cifar": dict(base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
                  dropout=0.1, num_heads=4),
}


def unet_kwargs(preset: str, **overrides) -> dict:
    """The keyword arguments of preset ``preset`` (see ``UNET_PRESETS``), with every override that is
    not ``None`` replacing the preset's value. Unknown preset -> an error listing the valid names."""
    kw = dict(lookup(UNET_PRESETS, preset, "unet preset"))
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return kw


def _groups(channels: int) -> int:
    # the largest of 32, 16, 8, 4, 2, 1 that divides the channel count
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels)


class ResBlock(nn.Module):
    """``x + F(x, emb)`` with ``F`` = GN -> SiLU -> conv3x3 -> GN * (1 + scale) + shift -> SiLU ->
    dropout -> conv3x3; ``(scale, shift)`` is a linear map of the embedding ``[B, emb_dim]``.
    A 1x1 conv maps the skip when the channel count changes."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = _norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.emb(emb), "b (two c) -> two b c 1 1", two=2)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions of a feature map ``[B, C, H, W]``,
    with a residual connection: ``x + proj(softmax(q k^T / sqrt(d)) v)``."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        qkv = rearrange(self.qkv(self.norm(x)), "b (three h d) x y -> three b h (x y) d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return x + self.proj(rearrange(out, "b h (x y) d -> b (h d) x y", y=size))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """A residual block followed by an optional attention block."""

    def __init__(self, res: ResBlock, attn: Optional[Attention]):
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.attn(self.res(x, emb))


class UNetVelocity(nn.Module):
    """UNet velocity field: ``x`` ``[B, in_channels, image_size, image_size]``, ``t`` ``[B]`` in [0, 1],
    ``cond`` ``[B]`` long labels in ``[0, num_classes]`` (``num_classes`` is the null label) or ``None``
    -> ``v`` of the shape and dtype of ``x``. See the module docstring for the layout.

    ``cond`` is ignored by an unconditional model (``num_classes=None``); for a class-conditional one,
    ``cond=None`` means the null label (the unconditional prediction).
    """

    def __init__(self, in_channels: int, image_size: int, *, base_channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (), dropout: float = 0.0, num_heads: int = 4,
                 num_classes: Optional[int] = None, time_scale: float = 1000.0, step_input: bool = False):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        for name, value in (("in_channels", in_channels), ("image_size", image_size),
                            ("num_res_blocks", num_res_blocks), ("num_heads", num_heads)):
            if int(value) < 1:
                raise ValueError(f"UNetVelocity: {name} must be >= 1, got {value}")
        if base_channels < 2 or base_channels % 2:
            raise ValueError(f"UNetVelocity: base_channels must be even and >= 2, got {base_channels}")
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"UNetVelocity: channel_mult must be a non-empty list of positive ints, "
                             f"got {list(channel_mult)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"UNetVelocity: dropout must be in [0, 1), got {dropout}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"UNetVelocity: num_classes must be >= 1 or None, got {num_classes}")
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"UNetVelocity: image_size={image_size} is not divisible by 2**(len(channel_mult)-1)={factor} "
                f"for channel_mult={list(channel_mult)}, so a feature map would get a fractional size; "
                f"use fewer levels (a shorter channel_mult) or an image_size that is a multiple of {factor}")
        sizes = [image_size // 2 ** i for i in range(len(channel_mult))]
        unknown = [r for r in attention_resolutions if r not in sizes]
        if unknown:
            raise ValueError(f"UNetVelocity: attention_resolutions {unknown} are not feature-map sizes of this "
                             f"network; for image_size={image_size} and channel_mult={list(channel_mult)} "
                             f"the sizes are {sizes}")
        for i, size in enumerate(sizes):
            ch = base_channels * channel_mult[i]
            if (size in attention_resolutions or (attention_resolutions and i == len(sizes) - 1)) and ch % num_heads:
                raise ValueError(f"UNetVelocity: num_heads={num_heads} does not divide the {ch} channels "
                                 f"of the attention at size {size}")

        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.num_classes: Optional[int] = None if num_classes is None else int(num_classes)
        self.null_class: Optional[int] = self.num_classes

        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(SinusoidalEmbedding(base_channels, scale=time_scale),
                                        nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(self.num_classes + 1, emb_dim) if self.num_classes is not None else None
        # the step h of an any-step model, through the same embedding; zero at the start
        self.step_proj = zero_linear(emb_dim, emb_dim) if step_input else None

        def level(c_in: int, c_out: int, attn: bool) -> _Level:
            return _Level(ResBlock(c_in, c_out, emb_dim, dropout), Attention(c_out, num_heads) if attn else None)

        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        ch = base_channels
        skips = [ch]
        self.down = nn.ModuleList()
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(level(ch, base_channels * mult, sizes[i] in attention_resolutions))
                ch = base_channels * mult
                skips.append(ch)
            if i < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)

        self.mid = nn.ModuleList([level(ch, ch, bool(attention_resolutions)), level(ch, ch, False)])

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(level(ch + skips.pop(), base_channels * mult, sizes[i] in attention_resolutions))
                ch = base_channels * mult
            if i > 0:
                self.up.append(Upsample(ch))

        self.out_norm = _norm(ch)
        self.out_conv = nn.Conv2d(ch, in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image's shape ``(C, H, W)``."""
        return (self.in_channels, self.image_size, self.image_size)

    def _check(self, x: torch.Tensor, t: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            expected = "[B, " + ", ".join(map(str, self.input_shape)) + "]"
            raise ValueError(f"UNetVelocity expects images of shape {expected} (channels, height, width fixed "
                             f"at construction), got {list(x.shape)}: the images have the wrong size or "
                             f"channel count for this model")
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [B]=[{x.shape[0]}], got {tuple(t.shape)}")

    @property
    def step_input(self) -> bool:
        """Whether the model takes the step ``h`` of an any-step model (``model.step_input``)."""
        return self.step_proj is not None

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None,
                h: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``v(x, t, cond, h)``: ``x`` ``[B, C, H, W]``, ``t`` ``[B]``, ``cond`` ``[B]`` long, an int or ``None``,
        ``h`` ``[B]`` the step of a ``step_input`` model (``None``: 0) -> ``[B, C, H, W]`` in ``x``'s dtype."""
        self._check(x, t)
        # sinusoids of 1000 t need fp32 even for bf16 inputs
        emb = with_step(self.time_embed(t.float()), self.time_embed, self.step_proj, t.float(), h)
        if self.class_embed is not None:
            if cond is None:
                cond = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
            elif isinstance(cond, int):
                cond = torch.full((x.shape[0],), cond, dtype=torch.long, device=x.device)
            elif cond.shape != (x.shape[0],):
                raise ValueError(f"cond must be class labels of shape [B]=[{x.shape[0]}], got {tuple(cond.shape)}")
            emb = emb + self.class_embed(cond)

        h = self.input_conv(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, _Level) else block(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, _Level):
                h = block(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = block(h)
        return self.out_conv(F.silu(self.out_norm(h))).to(x.dtype)


class ClassifierFreeGuidance:
    """The guided field ``v(x, t) = v(x, t, null) + scale * (v(x, t, cond) - v(x, t, null))``
    (Ho & Salimans 2022), a plain callable for the solvers.

    ``scale = 1`` is the conditional field, ``0`` the unconditional one (each then costs one forward of
    ``[B]``); any other scale evaluates both in one batched forward of ``[2B]``. ``cond`` is ``[B]``
    long labels, or an int used for every row; ``t`` is ``[B]`` or a scalar.
    """

    def __init__(self, model, cond, scale: float):
        if getattr(model, "null_class", None) is None:
            raise ValueError("classifier-free guidance needs a class-conditional model (num_classes set)")
        self.model, self.cond, self.scale = model, cond, float(scale)

    def _labels(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.cond, int):
            return torch.full((x.shape[0],), self.cond, dtype=torch.long, device=x.device)
        cond = torch.as_tensor(self.cond, device=x.device).long()
        if cond.shape != (x.shape[0],):
            raise ValueError(f"guidance labels must have shape [B]=[{x.shape[0]}], got {tuple(cond.shape)}")
        return cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = as_time(t, x)
        cond = self._labels(x)
        if self.scale == 1.0:
            return self.model(x, t, cond)
        null = torch.full_like(cond, self.model.null_class)
        if self.scale == 0.0:
            return self.model(x, t, null)
        v_cond, v_null = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null])).chunk(2)
        return v_null + self.scale * (v_cond - v_null)
