"""SketchKeras (the app's default line extractor `lineart_keras`), torch `SketchKeras()` in Flax.

A 5-level U-Net on one grey channel: reflect-padded convs, BatchNorm(eps=1e-3) and ReLU; the up
path doubles with torch bicubic (A=-0.75), reflect-pads (1, 2, 1, 2) for a 4x4 conv and concatenates
the encoder features. Real width 32 (channels 32..512); input H, W multiples of 32.
Flax names are the torch module paths with numeric segments joined by "_" (`downblock_2_5`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cdv2.modules.preprocess_nets.line_ops import batch_norm, conv, reflect_pad, upsample_bicubic2

EPS = 1e-3


class SketchKeras(nn.Module):
    width: int = 32          # first-level channels (real 32; the fixture 16)
    in_channels: int = 1
    out_channels: int = 1
    dtype: Any = jnp.float32

    def _block(self, x, name: str, i: int, features: int, kernel: int, stride: int, pad=(1, 1, 1, 1)):
        """ReflectionPad(pad) at index i-1, Conv at i, BN at i+1, ReLU."""
        x = reflect_pad(x, *pad)
        x = conv(features, kernel, f"{name}_{i}", self.dtype, stride=stride)(x)
        return nn.relu(batch_norm(x, f"{name}_{i + 1}", EPS))

    @nn.compact
    def __call__(self, x):
        h, w = x.shape[1:3]
        if h % 32 or w % 32:
            raise ValueError(f"SketchKeras needs H and W divisible by 32, got {h}x{w}")
        c = self.width
        x = x.astype(self.dtype)
        d1 = self._block(x, "downblock_1", 1, c, 3, 1)
        feats = [d1]
        for n, ch in ((2, 2 * c), (3, 4 * c), (4, 8 * c)):
            y = self._block(feats[-1], f"downblock_{n}", 1, ch, 4, 2)
            feats.append(self._block(y, f"downblock_{n}", 5, ch, 3, 1))
        d5 = self._block(feats[-1], "downblock_5", 1, 16 * c, 4, 2)
        d6 = self._block(d5, "downblock_6", 1, 16 * c, 3, 1)
        u = jnp.concatenate([d5, d6], axis=-1)
        for n, (mid, out) in enumerate(((16 * c, 8 * c), (8 * c, 4 * c), (4 * c, 2 * c), (2 * c, c)), start=1):
            y = upsample_bicubic2(u)
            y = self._block(y, f"upblock_{n}", 2, mid, 4, 1, pad=(1, 2, 1, 2))
            y = self._block(y, f"upblock_{n}", 6, out, 3, 1)
            u = jnp.concatenate([feats[4 - n], y], axis=-1)
        return conv(self.out_channels, 3, "last_conv", self.dtype)(reflect_pad(u, 1, 1, 1, 1))
