"""OpenCLIP ViT image tower (ViT-H/14 at full size) and its exact preprocessing (ARCHITECTURE §3.9.1).

v2 uses the tower as `FrozenOpenCLIPImageEmbedder(output="full")`: `ln_post` and `@ proj` on all
257 tokens, then the CLS token is dropped, giving (B, 256, output_dim) local tokens.

Flax param tree (torch names from open_clip's `visual.*`; see `cdv2/weights/open_clip.py`):
    conv1/kernel                                [p, p, 3, width]   (no bias)
    class_embedding                             [width]            (torch layout, used as-is)
    positional_embedding                        [1 + grid^2, width] (torch layout)
    ln_pre/{scale,bias}
    transformer/resblocks_{i}/ln_1/{scale,bias}
    transformer/resblocks_{i}/attn/in_proj/{kernel [w, 3w], bias [3w]}   fused q|k|v, torch order
    transformer/resblocks_{i}/attn/out_proj/{kernel,bias}
    transformer/resblocks_{i}/ln_2/{scale,bias}
    transformer/resblocks_{i}/mlp/c_fc/{kernel,bias}
    transformer/resblocks_{i}/mlp/c_proj/{kernel,bias}
    ln_post/{scale,bias}
    proj                                        [width, output_dim] (torch layout: x @ proj)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdv2.config import CLIPVisionConfig
from cdv2.modules.attention import multihead_attention
from cdv2.modules.resize import resize_bicubic_antialias

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LN_EPS = 1e-5

Dtype = Any


def preprocess_for_clip(x: jnp.ndarray, image_size: int = 224) -> jnp.ndarray:
    """NHWC image in [-1, 1] (any size) -> the tower's normalised input: a squash to
    image_size^2 (bicubic, align_corners=True, antialias=True), (x+1)/2, CLIP mean/std, no clamp."""
    x = resize_bicubic_antialias(x.astype(jnp.float32), (image_size, image_size), align_corners=True)
    x = (x + 1.0) / 2.0
    mean = jnp.asarray(CLIP_MEAN, jnp.float32)
    std = jnp.asarray(CLIP_STD, jnp.float32)
    return (x - mean) / std


def _layer_norm(x: jnp.ndarray, name: str, param_dtype: Dtype) -> jnp.ndarray:
    """LayerNorm in fp32 whatever the compute dtype; the result is cast back to x's dtype."""
    y = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False, name=name)(
        x.astype(jnp.float32))
    return y.astype(x.dtype)


class SelfAttention(nn.Module):
    """torch nn.MultiheadAttention (self-attention, batch-first here): fused in_proj, out_proj;
    `causal` = open_clip's text-tower attn_mask."""

    width: int
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, n, _ = x.shape
        qkv = nn.Dense(3 * self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="in_proj")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # each (b, n, heads * head_dim), heads major
        o = multihead_attention(q, k, v, self.heads, causal=self.causal)  # scale 1/sqrt(head_dim), fp32 softmax
        return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")(o)


class MLP(nn.Module):
    width: int
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="c_fc")(x)
        x = jax.nn.gelu(x, approximate=False)  # ViT-H uses exact GELU (not QuickGELU)
        return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); no layer scale."""

    width: int
    heads: int
    mlp_width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    causal: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + SelfAttention(self.width, self.heads, causal=self.causal, name="attn", **kw)(
            _layer_norm(x, "ln_1", self.param_dtype))
        x = x + MLP(self.width, self.mlp_width, name="mlp", **kw)(_layer_norm(x, "ln_2", self.param_dtype))
        return x


class Transformer(nn.Module):
    width: int
    layers: int
    heads: int
    mlp_width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for i in range(self.layers):
            x = ResidualAttentionBlock(self.width, self.heads, self.mlp_width, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=f"resblocks_{i}")(x)
        return x


class VisionTransformer(nn.Module):
    """open_clip `VisionTransformer`; input: NHWC pixels already through `preprocess_for_clip`;
    output: the (B, grid^2, output_dim) local tokens (ln_post + proj on every token, CLS dropped)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jnp.ndarray, full: bool = False) -> jnp.ndarray:
        cfg = self.config
        width, p = cfg.width, cfg.patch_size
        grid = cfg.image_size // p
        x = nn.Conv(width, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv1")(pixels.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, grid * grid, width)  # row-major patch order, as torch's flatten(2)
        init = nn.initializers.normal(width ** -0.5)
        cls = self.param("class_embedding", init, (width,), self.param_dtype)
        pos = self.param("positional_embedding", init, (grid * grid + 1, width), self.param_dtype)
        cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, width))
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)
        x = _layer_norm(x, "ln_pre", self.param_dtype)
        x = Transformer(width, cfg.layers, cfg.heads, int(width * cfg.mlp_ratio), dtype=self.dtype,
                        param_dtype=self.param_dtype, name="transformer")(x)
        x = _layer_norm(x, "ln_post", self.param_dtype)
        proj = self.param("proj", init, (width, cfg.output_dim), self.param_dtype)
        x = x @ proj.astype(self.dtype)
        return x if full else x[:, 1:]  # full: CLS first (text manipulation needs it)


def encode_reference(params, image: jnp.ndarray, config: CLIPVisionConfig, dtype: Dtype = jnp.float32) -> jnp.ndarray:
    """NHWC reference image in [-1, 1] -> (B, 256, output_dim) CLIP local tokens (v2's context).

    `config` is required: the head count cannot be read off the param shapes."""
    pixels = preprocess_for_clip(image, config.image_size)
    return VisionTransformer(config, dtype=dtype).apply({"params": params}, pixels)
