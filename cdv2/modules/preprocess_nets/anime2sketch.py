"""Anime2Sketch `UnetGenerator(3, 1, num_downs=8, ngf=64, InstanceNorm2d(affine=False))` in Flax
(the app's `lineart` extractor, weights `netG.pth`).

pix2pix U-Net built from nested skip blocks, outermost first. Outermost: conv 4x4/2 -> inner block
-> ReLU -> convT 4x4/2 -> tanh, then clamp to [-1, 1]. Middle: LeakyReLU(0.2) -> conv -> IN -> inner
block -> ReLU -> convT -> IN, input concatenated before the output. Innermost: the same without the
inner IN. Convs have biases (the norm has no affine). Input H, W must be multiples of 2**num_downs.
Flax nests like torch: `model/model_1/model_3/.../model_1` is torch `model.model.1.model.3...model.1`
(each block's Sequential index: down conv 0 (outermost) or 1, inner block 1 or 3, up conv 3 or 5).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cdv2.modules.preprocess_nets.line_ops import ConvTranspose, conv, instance_norm, leaky_relu


class UnetSkipBlock(nn.Module):
    level: int               # 0 = outermost
    num_downs: int
    ngf: int
    in_channels: int         # image channels (outermost input)
    out_channels: int        # image channels (outermost output)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        lvl, d = self.level, self.dtype
        inner = min(self.ngf * 2 ** lvl, self.ngf * 8)
        outer = self.out_channels if lvl == 0 else min(self.ngf * 2 ** (lvl - 1), self.ngf * 8)
        outermost, innermost = lvl == 0, lvl == self.num_downs - 1
        h = x if outermost else leaky_relu(x)
        h = conv(inner, 4, "model_0" if outermost else "model_1", d, stride=2, padding=1)(h)
        if not innermost:
            if not outermost:
                h = instance_norm(h)
            h = UnetSkipBlock(lvl + 1, self.num_downs, self.ngf, self.in_channels, self.out_channels, d,
                              name="model_1" if outermost else "model_3")(h)
        up = "model_3" if (outermost or innermost) else "model_5"
        h = ConvTranspose(outer, 4, 2, 1, dtype=d, name=up)(nn.relu(h))
        if outermost:
            return jnp.clip(jnp.tanh(h.astype(jnp.float32)), -1, 1)
        return jnp.concatenate([x, instance_norm(h)], axis=-1)


class UnetGenerator(nn.Module):
    in_channels: int = 3
    out_channels: int = 1
    num_downs: int = 8
    ngf: int = 64            # real 64; the fixture 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        m = 2 ** self.num_downs
        if x.shape[1] % m or x.shape[2] % m:
            raise ValueError(f"UnetGenerator with {self.num_downs} downsamplings needs H and W divisible "
                             f"by {m}, got {x.shape[1]}x{x.shape[2]}")
        return UnetSkipBlock(0, self.num_downs, self.ngf, self.in_channels, self.out_channels, self.dtype,
                             name="model")(x.astype(self.dtype))
