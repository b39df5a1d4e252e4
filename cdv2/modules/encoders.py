"""Condition encoders: the sketch encoder (MultiEncoder), the background and style encoders
(UNetEncoder variants) and the size embedding."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cdv2.config import SketchEncoderConfig, UNetConfig
from cdv2.modules.layers import conv, time_embed, timestep_embedding, tokens
from cdv2.modules.unet import input_layout, output_layout, run_input_blocks

Dtype = Any
# MultiEncoder stem: (out channels, stride) of the 8 convs at Sequential indices 0, 2, ..., 14;
# the last one outputs model_channels.
_SKETCH_STEM = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2), (None, 1))


class SketchEncoder(nn.Module):
    """`control_encoder` (MultiEncoder): sketch (B, H, W, 3), lines +1 on -1 -> 5 zero-conv hints at
    H/8, H/16, H/32, H/64, H/64 with channels mc * [1, 1, 2, 4, 4]."""

    config: SketchEncoderConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sketch):
        cfg, d, pd = self.config, self.dtype, self.param_dtype
        h = sketch.astype(d)
        for k, (ch, stride) in enumerate(_SKETCH_STEM):
            h = conv(ch or cfg.model_channels, 3, f"model_{2 * k}", d, pd, stride=stride)(h)
            if k != len(_SKETCH_STEM) - 1:
                h = nn.silu(h)
        hints = [conv(cfg.model_channels, 1, "zero_layer_0", d, pd)(h)]
        last = len(cfg.ch_mults) - 1
        for i, mult in enumerate(cfg.ch_mults):
            ch = cfg.model_channels * mult
            h = conv(ch, 3, f"output_blocks_{i}_1", d, pd, stride=1 if i == last else 2)(nn.silu(h))
            h = conv(ch, 3, f"output_blocks_{i}_3", d, pd)(nn.silu(h))
            hints.append(conv(ch, 1, f"zero_blocks_{i}_0", d, pd)(h))
        return hints


class UNetEncoder(nn.Module):
    """The U-Net encoder half with `t = 0` plus a size embedding through `label_emb`, returning one
    feature per input block, REVERSED so entry i matches output block i.

    style_modulation=False (bg_encoder): 1x1 zero convs, returned as tokens (B, HW, C).
    style_modulation=True (style_encoder): global average pool + zero Linear, returned as (B, 2C_i)."""

    config: UNetConfig
    attention_impl: Any = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y, context, t=None):
        cfg, d, pd = self.config, self.dtype, self.param_dtype
        t = jnp.zeros((x.shape[0],), jnp.float32) if t is None else t
        emb = time_embed(t, cfg.model_channels, pd)
        ted = cfg.time_embed_dim
        lab = nn.Dense(ted, name="label_emb_0_0", param_dtype=pd)(y.astype(jnp.float32))
        emb = emb + nn.Dense(ted, name="label_emb_0_2", param_dtype=pd)(nn.silu(lab))
        hs = run_input_blocks(cfg, x.astype(d), emb, context.astype(d), attention_impl=self.attention_impl,
                              dtype=d, param_dtype=pd)
        outs = []
        # input block j feeds output block n-1-j (the list is returned reversed)
        decoder_widths = [b.channels for b in output_layout(cfg)][::-1]
        for blk, h, dec_width in zip(input_layout(cfg), hs, decoder_widths):
            name = f"zero_layers_{blk.index}"
            if cfg.style_modulation:
                # a scale and a shift for the matching decoder block, so twice ITS width (which differs
                # from this block's after a Downsample; with SD's channel_mult the released shapes
                # equal min(8 mc, 4 C) there, a rule that does not hold for other channel_mults)
                width = 2 * dec_width
                pooled = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
                outs.append(nn.Dense(width, name=name, param_dtype=pd)(pooled))
            else:
                outs.append(tokens(conv(blk.channels, 1, name, d, pd)(h)))
        return outs[::-1]


def size_embedding(ratios, dim: int = 256) -> jnp.ndarray:
    """y = [emb(rh) | emb(rw)] (B, 2*dim) from ratios (B, 2) = (height ratio, width ratio)."""
    ratios = jnp.asarray(ratios, jnp.float32)
    return jnp.concatenate([timestep_embedding(ratios[:, 0], dim), timestep_embedding(ratios[:, 1], dim)], axis=-1)
