"""The SD VAE (LDM `AutoencoderKL`: ldm/modules/diffusionmodules/model.py Encoder/Decoder).

Submodule names follow the LDM torch modules, so `state_dict_to_params(sd, "first_stage_model.")`
of the authors' keys is exactly this module's param tree (`encoder/down_0/block_1/conv1/kernel`,
`encoder/mid/attn_1/q/kernel`, `decoder/up_3/upsample/conv/kernel`, `quant_conv/kernel`, ...).
NHWC throughout; images in [-1, 1].

Usage:
    vae = AutoencoderKL(cfg.vae)
    mean, logvar = vae.apply({"params": p}, x, method=AutoencoderKL.encode)
    z = encode_to_latent(mean, logvar, rng, cfg.vae.scale_factor)   # rng None -> posterior mean
    x = latent_to_image(vae, p, z)
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from cdv2.config import VAEConfig
from cdv2.modules.attention import multihead_attention
from cdv2.modules.layers import Downsample, Upsample, conv as _conv, group_norm

Dtype = Any

GN_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _group_norm(x: jax.Array, name: str, dtype: Dtype, param_dtype: Dtype, groups: int) -> jax.Array:
    # the whole normalisation in fp32 whatever the compute dtype, then cast
    return group_norm(name, GN_EPS, jnp.float32, param_dtype, groups)(x.astype(jnp.float32)).astype(dtype)


class ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus x (1x1 `nin_shortcut` if widths differ)."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.swish(_group_norm(x, "norm1", groups=self.norm_groups, **kw))
        h = _conv(self.out_channels, 3, "conv1", **kw)(h)
        h = nn.swish(_group_norm(h, "norm2", groups=self.norm_groups, **kw))
        h = _conv(self.out_channels, 3, "conv2", **kw)(h)  # dropout is 0 in SD
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "nin_shortcut", **kw)(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W tokens with 1x1-conv q, k, v and proj_out."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hh, ww, c = x.shape
        h = _group_norm(x, "norm", groups=self.norm_groups, **kw)
        q, k, v = (_conv(c, 1, n, **kw)(h).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
        # one head: scale 1/sqrt(c), softmax over keys in fp32
        h = multihead_attention(q, k, v, 1).reshape(b, hh, ww, c)
        return x.astype(self.dtype) + _conv(c, 1, "proj_out", **kw)(h)


class MidBlock(nn.Module):
    """`mid`: block_1 -> attn_1 -> block_2 at constant width."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, norm_groups=self.norm_groups)
        c = x.shape[-1]
        x = ResnetBlock(c, name="block_1", **kw)(x)
        x = AttnBlock(name="attn_1", **kw)(x)
        return ResnetBlock(c, name="block_2", **kw)(x)


class Level(nn.Module):
    """One resolution level (`down_i` / `up_i`): `num_blocks` ResnetBlocks, then an optional resampler."""

    out_channels: int
    num_blocks: int
    resample: Optional[str] = None  # None | "down" | "up"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, name=f"block_{j}", norm_groups=self.norm_groups, **kw)(x)
        if self.resample == "down":
            x = Downsample(vae_style=True, name="downsample", **kw)(x)
        elif self.resample == "up":
            x = Upsample(name="upsample", **kw)(x)
        return x


class Encoder(nn.Module):
    """Image (B,H,W,in_channels) -> moments (B,H/f,W/f,2*z_channels), f = 2**(len(ch_mult)-1)."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.ch_mult)
        g = cfg.norm_groups
        h = _conv(cfg.ch, 3, "conv_in", **kw)(x.astype(self.dtype))
        for i, mult in enumerate(cfg.ch_mult):
            h = Level(cfg.ch * mult, cfg.num_res_blocks, "down" if i != n - 1 else None,
                      name=f"down_{i}", norm_groups=g, **kw)(h)
        h = MidBlock(name="mid", norm_groups=g, **kw)(h)
        h = nn.swish(_group_norm(h, "norm_out", groups=g, **kw))
        return _conv(2 * cfg.z_channels, 3, "conv_out", **kw)(h)  # double_z


class Decoder(nn.Module):
    """z (B,h,w,z_channels) -> image (B,h*f,w*f,out_ch). `up_i` is level i, applied from i=n-1 down."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        g = cfg.norm_groups
        h = _conv(cfg.ch * cfg.ch_mult[-1], 3, "conv_in", **kw)(z.astype(self.dtype))
        h = MidBlock(name="mid", norm_groups=g, **kw)(h)
        for i in reversed(range(len(cfg.ch_mult))):
            h = Level(cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, "up" if i != 0 else None,
                      name=f"up_{i}", norm_groups=g, **kw)(h)
        h = nn.swish(_group_norm(h, "norm_out", groups=g, **kw))
        return _conv(cfg.out_ch, 3, "conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """SD VAE. `__call__` (encode -> decode of the mean) exists to initialise every parameter."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        # setup() names submodules by attribute, so name=None here
        self.quant_conv = _conv(2 * cfg.embed_dim, 1, None, **kw)
        self.post_quant_conv = _conv(cfg.z_channels, 1, None, **kw)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B,H,W,3) in [-1,1] -> posterior (mean, logvar), each (B,H/f,W/f,embed_dim), fp32."""
        moments = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latent z (B,h,w,embed_dim) -> image (B,h*f,w*f,out_ch), unclamped."""
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)


def encode_to_latent(mean: jax.Array, logvar: jax.Array, rng: Optional[jax.Array],
                     scale_factor: float) -> jax.Array:
    """Diffusion latent: posterior sample `mean + exp(logvar/2) * N(0,1)` (the posterior mean when
    `rng` is None), times `scale_factor` (0.18215 for SD)."""
    z = mean
    if rng is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return z * scale_factor


def image_to_latent(vae: AutoencoderKL, params: Any, x: jax.Array, rng: Optional[jax.Array] = None,
                    scale_factor: Optional[float] = None) -> jax.Array:
    """Image (B,H,W,3) in [-1,1] -> scaled diffusion latent."""
    mean, logvar = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
    scale = vae.config.scale_factor if scale_factor is None else scale_factor
    return encode_to_latent(mean, logvar, rng, scale)


def latent_to_image(vae: AutoencoderKL, params: Any, z: jax.Array,
                    scale_factor: Optional[float] = None) -> jax.Array:
    """Scaled diffusion latent -> image (unclamped): decode(z / scale_factor)."""
    scale = vae.config.scale_factor if scale_factor is None else scale_factor
    return vae.apply({"params": params}, z / scale, method=AutoencoderKL.decode)
