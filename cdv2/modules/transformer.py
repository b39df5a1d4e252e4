"""Transformer blocks: the U-Net's SpatialTransformer and the background-injection block."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cdv2.modules.attention import Attention, SplitSpec
from cdv2.modules.injection import BlockBank, injected_self_attention
from cdv2.modules.layers import conv, gelu_exact, group_norm, tokens
from cdv2.modules.resize import resize_bicubic

Dtype = Any


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, name=name, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False)


class _GEGLUProj(nn.Module):
    """ff.net.0 (diffusers-style GEGLU): proj Linear(C, 8C) -> [value | gate] -> value * GELU(gate)."""

    inner: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(2 * self.inner, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * gelu_exact(gate)


class GEGLUFeedForward(nn.Module):
    """ff.net.0 (GEGLU, 4C wide) -> ff.net.2 Linear(4C, C)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _GEGLUProj(4 * self.dim, self.dtype, self.param_dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    lora_rank: int = 0
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, reference_scale=1.0, split: Optional[SplitSpec] = None,
                 bank: Optional[BlockBank] = None, write_bank: bool = False):
        """bank: read an attention-injection bank entry (cdv2/modules/injection.py); write_bank:
        return (x, norm1(x)), the entry a later read pass consumes."""
        d, pd = self.dtype, self.param_dtype
        attn = dict(dim=self.dim, heads=self.heads, attention_impl=self.attention_impl, dtype=d, param_dtype=pd)
        xn = layer_norm("norm1", d, pd)(x)
        attn1 = Attention(name="attn1", **attn)
        x = (attn1(xn) if bank is None else injected_self_attention(attn1, xn, bank)) + x
        x = Attention(name="attn2", lora_rank=self.lora_rank, **attn)(
            layer_norm("norm2", d, pd)(x), context, reference_scale, split) + x
        x = GEGLUFeedForward(self.dim, d, pd, name="ff")(layer_norm("norm3", d, pd)(x)) + x
        return (x, xn) if write_bank else x


class SpatialTransformer(nn.Module):
    """GN(eps 1e-6) -> 1x1-conv proj_in -> tokens -> transformer blocks -> 1x1-conv proj_out -> + x.

    `split_mask` is the latent-resolution sketch mask (B, H/8, W/8, 1); it is resized here to this
    layer's grid with torch bicubic, as the authors' per-layer `scale_factor` resize does."""

    channels: int
    heads: int
    depth: int = 1
    lora_rank: int = 0
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x, context, reference_scale=1.0, split: Optional[SplitSpec] = None,
                 bank: Optional[Sequence[BlockBank]] = None, write_bank: bool = False):
        """bank: one BlockBank per transformer block (attention-injection read); write_bank:
        return (out, tuple of the blocks' bank entries)."""
        d, pd = self.dtype, self.param_dtype
        b, h, w, c = x.shape
        x_in = x
        x = group_norm("norm", 1e-6, d, pd, self.norm_groups)(x)
        x = conv(c, 1, "proj_in", d, pd)(x)
        x = tokens(x)
        if split is not None and split.mask.shape[1:3] != (h, w):
            split = _with_mask(split, resize_bicubic(split.mask.astype(jnp.float32), (h, w)))
        written = []
        for i in range(self.depth):
            x = BasicTransformerBlock(c, self.heads, self.lora_rank, self.attention_impl, d, pd,
                                      name=f"transformer_blocks_{i}")(
                x, context, reference_scale, split, None if bank is None else bank[i], write_bank)
            if write_bank:
                x, entry = x
                written.append(entry)
        x = x.reshape(b, h, w, c)
        x = conv(c, 1, "proj_out", d, pd)(x)
        out = x + x_in.astype(x.dtype)
        return (out, tuple(written)) if write_bank else out


def _with_mask(split: SplitSpec, mask) -> SplitSpec:
    return SplitSpec(mask, split.threshold, split.strict, split.fg_scale, split.bg_scale,
                     split.merge_scale, split.use_lora)


class SelfTransformerBlock(nn.Module):
    """Background injection (`warp_modules[i]`, paper Eq. 2): skip tokens attend to the
    background-encoder tokens (context NOT normalised), then a SiLU FFN (ff.0 / ff.2).
    `head_dim` is fixed (the authors' default 64; `UNetConfig.warp_head_dim`): heads = dim // head_dim."""

    dim: int
    head_dim: int = 64
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, skip, bg_tokens):
        d, pd = self.dtype, self.param_dtype
        b, h, w, c = skip.shape
        t = tokens(skip)
        t = Attention(self.dim, self.dim // self.head_dim, self.head_dim, attention_impl=self.attention_impl, dtype=d, param_dtype=pd,
                      name="attn")(layer_norm("norm1", d, pd)(t), bg_tokens.astype(t.dtype)) + t
        f = nn.Dense(4 * self.dim, dtype=d, param_dtype=pd, name="ff_0")(layer_norm("norm2", d, pd)(t))
        t = nn.Dense(self.dim, dtype=d, param_dtype=pd, name="ff_2")(nn.silu(f)) + t
        return t.reshape(b, h, w, c)
