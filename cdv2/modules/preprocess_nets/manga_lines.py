"""Manga line extractor `res_skip()` ("erika", the app's `lineart_denoise`) in Flax.

A residual encoder-decoder on one 0..255 grey channel. Every conv is pre-activated:
BatchNorm(eps=1e-3) -> LeakyReLU(0.2) -> conv (zero padding k//2); encoder levels end with a
stride-2 block, decoder levels start with a block that upsamples (nearest) after its first conv and
on its 1x1 shortcut; encoder features are added back (`res1..4`). Output `clamp(y, 0, 255)/127.5-1`.
Real widths 24, 48, 96, 192, 384 and head 16; input H, W multiples of 16.
Flax names are the torch paths under the layout rule (`block0/model_0/conv1/model_2`).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cdv2.modules.preprocess_nets.line_ops import batch_norm, conv, leaky_relu, upsample_nearest2

EPS = 1e-3


class BnReluConv(nn.Module):
    """`_bn_relu_conv` (upsample=False) and `_u_bn_relu_conv` (upsample=True)."""
    features: int
    kernel: int = 3
    stride: int = 1
    upsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = leaky_relu(batch_norm(x, "model_0", EPS))
        h = conv(self.features, self.kernel, "model_2", self.dtype, stride=self.stride, padding=self.kernel // 2)(h)
        return upsample_nearest2(h) if self.upsample else h


class Shortcut(nn.Module):
    """`_shortcut` / `_u_shortcut` with a projection: 1x1 conv (then nearest x2 if upsample), added to y."""
    features: int
    stride: int = 1
    upsample: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        p = conv(self.features, 1, "model_0", self.dtype, stride=self.stride)(x)
        return (upsample_nearest2(p) if self.upsample else p) + y


class BasicBlock(nn.Module):
    """`basic_block` (up=False) or `_u_basic_block` (up=True: the first conv upsamples)."""
    features: int
    stride: int = 1
    up: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        y = BnReluConv(self.features, 3, self.stride, upsample=self.up, dtype=d, name="conv1")(x)
        y = BnReluConv(self.features, 3, dtype=d, name="residual")(y)
        project = x.shape[-1] != self.features or (self.stride != 1 and not self.up)
        if project:
            return Shortcut(self.features, self.stride, upsample=self.up, dtype=d, name="shortcut")(x, y)
        return x + y


class ResidualStage(nn.Module):
    """`_residual_block` (down: the last repetition has stride 2 unless first) or
    `_upsampling_residual_block` (up: the first repetition upsamples)."""
    features: int
    repetitions: int
    first: bool = False
    up: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.repetitions):
            stride = 2 if (not self.up and not self.first and i == self.repetitions - 1) else 1
            x = BasicBlock(self.features, stride, up=self.up and i == 0, dtype=self.dtype, name=f"model_{i}")(x)
        return x


class ResSkip(nn.Module):
    widths: Sequence[int] = (24, 48, 96, 192, 384)    # real; the fixture uses these / 4
    repetitions: Sequence[int] = (2, 3, 5, 7, 12)
    up_repetitions: Sequence[int] = (7, 5, 3, 2)
    head_width: int = 16
    head_repetitions: int = 2
    out_channels: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, w = x.shape[1:3]
        n = len(self.widths) - 1
        if h % 2 ** n or w % 2 ** n:
            raise ValueError(f"res_skip needs H and W divisible by {2 ** n}, got {h}x{w}")
        d = self.dtype
        x = x.astype(d)
        feats = []
        for i, (c, r) in enumerate(zip(self.widths, self.repetitions)):
            x = ResidualStage(c, r, first=i == 0, dtype=d, name=f"block{i}")(x)
            feats.append(x)
        for j, r in enumerate(self.up_repetitions):
            c = self.widths[n - 1 - j]
            x = ResidualStage(c, r, up=True, dtype=d, name=f"block{n + 1 + j}")(x)
            x = feats[n - 1 - j] + x  # res{j+1}: same widths, no projection
        x = ResidualStage(self.head_width, self.head_repetitions, first=True, dtype=d,
                          name=f"block{n + 1 + len(self.up_repetitions)}")(x)
        y = BnReluConv(self.out_channels, 1, dtype=d, name="conv15")(x)
        return jnp.clip(y.astype(jnp.float32), 0, 255) / 127.5 - 1.0
