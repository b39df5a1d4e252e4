"""`LineartDetector` (the app's `lineart_sk`, weights `sk_model.pth`): its `Generator(3, 1, 3)` in Flax.

CycleGAN-style ResNet generator on 0..255 RGB (no input normalisation): reflect-pad 3 + 7x7 conv,
two stride-2 convs, `n_residual_blocks` residual blocks (reflect-pad 1 + 3x3 conv, twice), two
ConvTranspose(3, s2, p1, op1), reflect-pad 3 + 7x7 conv, sigmoid. Every norm is
InstanceNorm2d(affine=False, eps=1e-5). Input H, W multiples of 4.
Flax names are the torch paths under the layout rule (`model2_0/conv_block_5`); the checkpoint has
no `model.` prefix (LineartDetector loads into its `.model`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cdv2.modules.preprocess_nets.line_ops import ConvTranspose, conv, instance_norm, reflect_pad


class ResidualBlock(nn.Module):
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = conv(self.features, 3, "conv_block_1", self.dtype)(reflect_pad(x, 1, 1, 1, 1))
        h = nn.relu(instance_norm(h))
        h = conv(self.features, 3, "conv_block_5", self.dtype)(reflect_pad(h, 1, 1, 1, 1))
        return x + instance_norm(h)


class LineartGenerator(nn.Module):
    width: int = 64
    n_residual_blocks: int = 3
    out_channels: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if x.shape[1] % 4 or x.shape[2] % 4:
            raise ValueError(f"the lineart_sk generator needs H and W divisible by 4, got {x.shape[1]}x{x.shape[2]}")
        d, c = self.dtype, self.width
        h = conv(c, 7, "model0_1", d)(reflect_pad(x.astype(d), 3, 3, 3, 3))
        h = nn.relu(instance_norm(h))
        for i, ch in ((0, 2 * c), (3, 4 * c)):
            h = nn.relu(instance_norm(conv(ch, 3, f"model1_{i}", d, stride=2, padding=1)(h)))
        for i in range(self.n_residual_blocks):
            h = ResidualBlock(4 * c, dtype=d, name=f"model2_{i}")(h)
        for i, ch in ((0, 2 * c), (3, c)):
            h = nn.relu(instance_norm(ConvTranspose(ch, 3, 2, 1, output_padding=1, dtype=d, name=f"model3_{i}")(h)))
        h = conv(self.out_channels, 7, "model4_1", d)(reflect_pad(h, 3, 3, 3, 3))
        return nn.sigmoid(h.astype(jnp.float32))
