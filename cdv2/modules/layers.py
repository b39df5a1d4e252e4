"""Building blocks shared by the U-Net, its encoders and the sketch encoder (SD2.1 / LDM)."""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
PAD1 = ((1, 1), (1, 1))  # torch's symmetric padding=1 (never "SAME": stride-2 SAME pads asymmetrically)


def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
    """Sinusoidal embedding [cos | sin] (cos first, as in the authors' LDM code); t may be fractional."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
    return emb


def conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype, stride: int = 1,
         padding=None) -> nn.Conv:
    """torch-style conv: symmetric padding kernel // 2 unless `padding` is given explicitly."""
    pad = ((kernel // 2, kernel // 2),) * 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, name=name,
                   dtype=dtype, param_dtype=param_dtype)


def group_norm(name: str, eps: float, dtype: Dtype, param_dtype: Dtype, groups: int = 32) -> nn.GroupNorm:
    # flax computes the statistics in at least fp32 whatever `dtype` is
    # two-pass variance (E[(x-m)^2]): the fast E[x^2]-m^2 loses digits when |mean| >> std
    return nn.GroupNorm(num_groups=groups, epsilon=eps, name=name, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False)


class ResBlock(nn.Module):
    """LDM ResBlock (no scale-shift norm, dropout 0): keys in_layers/emb_layers/out_layers/skip."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x, emb):
        d, pd, g = self.dtype, self.param_dtype, self.norm_groups
        h = nn.silu(group_norm("in_layers_0", 1e-5, d, pd, g)(x))
        h = conv(self.out_channels, 3, "in_layers_2", d, pd)(h)
        e = nn.Dense(self.out_channels, name="emb_layers_1", dtype=d, param_dtype=pd)(nn.silu(emb))
        h = h + e[:, None, None, :].astype(h.dtype)
        h = nn.silu(group_norm("out_layers_0", 1e-5, d, pd, g)(h))
        h = conv(self.out_channels, 3, "out_layers_3", d, pd)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "skip_connection", d, pd)(x)
        return x.astype(h.dtype) + h


class Downsample(nn.Module):
    """conv 3x3 stride 2. U-Net: padding 1, conv named `op`; the LDM VAE (`vae_style`): pad
    right/bottom by one, no conv padding, conv named `conv`. channels None = keep the width."""

    channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    vae_style: bool = False

    @nn.compact
    def __call__(self, x):
        ch = self.channels or x.shape[-1]
        if self.vae_style:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            return conv(ch, 3, "conv", self.dtype, self.param_dtype, stride=2, padding="VALID")(x)
        return conv(ch, 3, "op", self.dtype, self.param_dtype, stride=2)(x)


def subpixel_upsample_default() -> bool:
    """Whether `Upsample` runs as 4 sub-pixel 2x2 convs: on CPU (2.25x fewer conv FLOPs there,
    where they are the cost); elsewhere the plain repeat + 3x3 conv stays (GPU/TPU unchanged)."""
    return jax.default_backend() == "cpu"


# nearest-x2 then a 3x3 tap at offset u (-1, 0, 1) reads low-res offset floor((a + u) / 2) for
# output phase a: phase 0 sums taps {0} at -1 and {1, 2} at 0; phase 1 taps {0, 1} at 0, {2} at +1
_PHASE_TAPS = {0: (((0,), (1, 2)), (1, 0)), 1: (((0, 1), (2,)), (0, 1))}


def subpixel_upsample_conv(x, kernel, bias):
    """conv3x3(pad 1)(nearest_x2(x)) as one 2x2 conv per output phase on the low-res input, then
    interleaved: mathematically identical (the taps that read the same low-res pixel are summed
    first, in the kernel's dtype, so fp32 rounding differs at the 1e-7 level), 2.25x fewer FLOPs
    and no 4x upsampled copy. x (B, H, W, Cin), kernel (3, 3, Cin, Cout) HWIO, bias (Cout,)."""
    def fold(k, taps, axis):  # the 3 taps along `axis` -> the 2 low-res taps of one phase
        return jnp.stack([sum(jnp.take(k, t, axis=axis) for t in group) for group in taps], axis=axis)

    rows = []
    for a in (0, 1):
        row_taps, row_pad = _PHASE_TAPS[a]
        ka = fold(kernel, row_taps, 0)
        cols = []
        for b in (0, 1):
            col_taps, col_pad = _PHASE_TAPS[b]
            k = fold(ka, col_taps, 1).astype(x.dtype)
            cols.append(jax.lax.conv_general_dilated(x, k, (1, 1), (row_pad, col_pad),
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        rows.append(jnp.stack(cols, axis=3))  # (B, H, W, 2, C)
    y = jnp.stack(rows, axis=2)  # (B, H, 2, W, 2, C)
    b_, h, _, w, _, c = y.shape
    return y.reshape(b_, 2 * h, 2 * w, c) + bias


class _ConvParams(nn.Module):
    """kernel + bias exactly as `nn.Conv` declares them (same names, shapes, initialisers)."""

    features: int
    kernel_size: tuple[int, int]
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, in_features: int):
        kernel = self.param("kernel", nn.linear.default_kernel_init, (*self.kernel_size, in_features, self.features),
                            self.param_dtype)
        return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)


class Upsample(nn.Module):
    """Nearest x2 then conv 3x3 (padding 1), named `conv`. channels None = keep the width.
    `subpixel` (None: `subpixel_upsample_default()`, i.e. on CPU) computes the same thing as
    `subpixel_upsample_conv`."""

    channels: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    subpixel: Optional[bool] = None

    @nn.compact
    def __call__(self, x):
        ch = self.channels or x.shape[-1]
        subpixel = subpixel_upsample_default() if self.subpixel is None else self.subpixel
        if not subpixel:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
            return conv(ch, 3, "conv", self.dtype, self.param_dtype)(x)
        kernel, bias = _ConvParams(ch, (3, 3), self.param_dtype, name="conv")(x.shape[-1])
        return subpixel_upsample_conv(x.astype(self.dtype), kernel, bias.astype(self.dtype))


def time_embed(t, model_channels: int, param_dtype: Dtype) -> jnp.ndarray:
    """time_embed.0 -> SiLU -> time_embed.2, kept in fp32 (precision policy). Call inside a compact
    method: the Dense layers attach to the calling module as `time_embed_0` / `time_embed_2`."""
    ted = model_channels * 4
    h = timestep_embedding(t, model_channels)
    h = nn.Dense(ted, name="time_embed_0", param_dtype=param_dtype, dtype=jnp.float32)(h)
    return nn.Dense(ted, name="time_embed_2", param_dtype=param_dtype, dtype=jnp.float32)(nn.silu(h))


def tokens(x: jnp.ndarray) -> jnp.ndarray:
    """(B, H, W, C) -> (B, HW, C) in row-major order (= torch's flatten of NCHW then transpose)."""
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)
