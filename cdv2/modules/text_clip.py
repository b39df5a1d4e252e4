"""OpenCLIP text tower (ViT-H/14's at full size) as the authors' `FrozenOpenCLIPEmbedder` uses it
(ARCHITECTURE §3.9.2; only text manipulation needs it).

tokens (B, 77) -> token_embedding + positional_embedding -> the first `layers - clip_skip`
resblocks with a causal mask (clip_skip=1: 23 of 24 at full size) -> ln_final -> the EOT token's
row (argmax of the token ids: EOT 49407 is the largest id) -> @ text_projection -> L2-normalised,
(B, 1, output_dim). The skipped resblocks still own parameters (the checkpoint has them), created
at init only, so conversion is lossless and `clip_skip` can change without new weights.

Flax param tree (torch names from open_clip's text model; see `cdv2/weights/open_clip_text.py`):
    token_embedding/embedding                   [vocab, width]   (torch layout, used as-is)
    positional_embedding                        [context, width] (torch layout)
    transformer/resblocks_{i}/...               as the image tower (cdv2/modules/clip.py)
    ln_final/{scale,bias}
    text_projection                             [width, output_dim] (x @ text_projection)
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cdv2.config import CLIPTextConfig
from cdv2.modules.clip import ResidualAttentionBlock, _layer_norm

Dtype = Any


class TextTransformerStack(nn.Module):
    """`transformer.resblocks.*`: runs the first `layers - clip_skip`; the rest exist only at init."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        run = cfg.layers - cfg.clip_skip
        for i in range(cfg.layers):
            block = ResidualAttentionBlock(cfg.width, cfg.heads, int(cfg.width * cfg.mlp_ratio), self.dtype,
                                           self.param_dtype, causal=True, name=f"resblocks_{i}")
            if i < run:
                x = block(x)
            elif self.is_initializing():
                block(x)  # create the skipped block's params; its output is unused
        return x


class TextTransformer(nn.Module):
    """tokens (B, context) int -> (B, 1, output_dim) L2-normalised EOT features (`pooled=True`,
    the authors' `encode_text`), or (B, context, output_dim) projected tokens (`pooled=False`)."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, pooled: bool = True) -> jnp.ndarray:
        cfg = self.config
        if not 0 <= cfg.clip_skip < cfg.layers:
            raise ValueError(f"clip_skip={cfg.clip_skip} must be in [0, {cfg.layers})")
        if tokens.ndim != 2 or tokens.shape[1] != cfg.context_length:
            raise ValueError(f"tokens must be (B, {cfg.context_length}), got {tokens.shape}")
        x = nn.Embed(cfg.vocab_size, cfg.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(0.02), name="token_embedding")(tokens)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                         (cfg.context_length, cfg.width), self.param_dtype)
        x = x + pos.astype(self.dtype)
        x = TextTransformerStack(cfg, self.dtype, self.param_dtype, name="transformer")(x)
        x = _layer_norm(x, "ln_final", self.param_dtype)
        proj = self.param("text_projection", nn.initializers.normal(cfg.width ** -0.5),
                          (cfg.width, cfg.output_dim), self.param_dtype)
        if not pooled:
            return x @ proj.astype(self.dtype)
        eot = jnp.argmax(tokens, axis=-1)
        x = jnp.take_along_axis(x, eot[:, None, None], axis=1)  # (B, 1, width)
        x = (x @ proj.astype(self.dtype)).astype(jnp.float32)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def encode_text_tokens(params, tokens, config: CLIPTextConfig, dtype: Dtype = jnp.float32) -> jnp.ndarray:
    """(B, context) token ids -> (B, 1, output_dim) unit text features (the authors' `encode_text`)."""
    return TextTransformer(config, dtype=dtype).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
