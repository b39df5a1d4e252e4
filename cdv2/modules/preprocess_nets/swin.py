"""Swin Transformer v1 backbone as BiRefNet uses it (`models/backbones/swin_v1.py`), NHWC, eval.

Returns the four stage outputs after their `norm{i}` layers, (B, H/4·2^-i, W/4·2^-i, C·2^i).
Inputs of any size: the patch embedding pads to multiples of the patch size, each block pads to
multiples of the window (after norm1, so padded tokens are zeros) and patch merging pads odd sizes.
Shifted blocks use the standard cyclic-shift region mask, built for the padded size. Module names
follow torch (`patch_embed`, `layers_i/blocks_j/attn/qkv`, `norm{i}`), fp32 LayerNorm and softmax.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 4

    @property
    def num_features(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))


def _ln(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, name=name, dtype=jnp.float32, use_fast_variance=False)


@functools.lru_cache(maxsize=16)
def relative_position_index(ws: int) -> np.ndarray:
    """(ws², ws²) index into the (2ws-1)² bias table (the torch buffer of the same name)."""
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


@functools.lru_cache(maxsize=32)
def shift_regions(hp: int, wp: int, ws: int, shift: int) -> np.ndarray:
    """(nW, ws²) region id of every token of every shifted window; two tokens of a window may
    attend to each other iff their ids are equal (torch: mask 0 there, -inf elsewhere)."""
    img = np.zeros((hp, wp), np.int32)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[hs, wsl] = cnt
            cnt += 1
    return img.reshape(hp // ws, ws, wp // ws, ws).transpose(0, 2, 1, 3).reshape(-1, ws * ws)


def window_partition(x: jnp.ndarray, ws: int) -> jnp.ndarray:
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * (h // ws) * (w // ws), ws * ws, c)


def window_reverse(win: jnp.ndarray, ws: int, b: int, h: int, w: int) -> jnp.ndarray:
    c = win.shape[-1]
    x = win.reshape(b, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class WindowAttention(nn.Module):
    dim: int
    num_heads: int
    window_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, allowed=None):
        """x (B·nW, N, C); allowed: (nW, N, N) bool or None."""
        bw, n, c = x.shape
        ws, nh = self.window_size, self.num_heads
        table = self.param("relative_position_bias_table", nn.initializers.normal(0.02), ((2 * ws - 1) ** 2, nh))
        qkv = nn.Dense(3 * c, name="qkv", dtype=self.dtype)(x).reshape(bw, n, 3, nh, c // nh)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B·nW, nh, N, hd)
        q = q * (c // nh) ** -0.5
        attn = jnp.einsum("bhnd,bhmd->bhnm", q, k, preferred_element_type=jnp.float32)
        bias = jnp.asarray(table, jnp.float32)[relative_position_index(ws).reshape(-1)].reshape(n, n, nh)
        attn = attn + bias.transpose(2, 0, 1)[None]
        if allowed is not None:
            nw = allowed.shape[0]
            attn = attn.reshape(bw // nw, nw, nh, n, n)
            attn = jnp.where(allowed[None, :, None], attn, -jnp.inf).reshape(bw, nh, n, n)
        attn = jax.nn.softmax(attn, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhnm,bhmd->bnhd", attn, v.astype(self.dtype)).reshape(bw, n, c)
        return nn.Dense(c, name="proj", dtype=self.dtype)(out)


class SwinBlock(nn.Module):
    dim: int
    num_heads: int
    window_size: int
    shift: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x (B, H, W, C) -> same."""
        b, h, w, c = x.shape
        ws, s = self.window_size, self.shift
        y = _ln("norm1")(x).astype(self.dtype)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        y = jnp.pad(y, ((0, 0), (0, pad_b), (0, pad_r), (0, 0)))
        hp, wp = h + pad_b, w + pad_r
        allowed = None
        if s > 0:
            y = jnp.roll(y, (-s, -s), axis=(1, 2))
            ids = jnp.asarray(shift_regions(hp, wp, ws, s))  # small constant; the mask is built in-graph
            allowed = ids[:, None, :] == ids[:, :, None]
        y = WindowAttention(c, self.num_heads, ws, name="attn", dtype=self.dtype)(window_partition(y, ws), allowed)
        y = window_reverse(y, ws, b, hp, wp)
        if s > 0:
            y = jnp.roll(y, (s, s), axis=(1, 2))
        x = x + y[:, :h, :w].astype(x.dtype)
        z = _ln("norm2")(x).astype(self.dtype)
        z = Mlp(int(c * self.mlp_ratio), c, name="mlp", dtype=self.dtype)(z)
        return x + z.astype(x.dtype)


class Mlp(nn.Module):
    hidden: int
    out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.hidden, name="fc1", dtype=self.dtype)(x)
        x = jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(self.dtype)  # nn.GELU: exact
        return nn.Dense(self.out, name="fc2", dtype=self.dtype)(x)


class PatchMerging(nn.Module):
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, w = x.shape[1:3]
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        x = _ln("norm")(x).astype(self.dtype)
        return nn.Dense(2 * self.dim, use_bias=False, name="reduction", dtype=self.dtype)(x)


class BasicLayer(nn.Module):
    dim: int
    depth: int
    num_heads: int
    window_size: int
    downsample: bool
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        ws = self.window_size
        for i in range(self.depth):
            x = SwinBlock(self.dim, self.num_heads, ws, 0 if i % 2 == 0 else ws // 2, self.mlp_ratio,
                          name=f"blocks_{i}", dtype=self.dtype)(x)
        x_down = PatchMerging(self.dim, name="downsample", dtype=self.dtype)(x) if self.downsample else x
        return x, x_down


class SwinTransformer(nn.Module):
    config: SwinConfig = SwinConfig()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, d, p = self.config, self.dtype, self.config.patch_size
        h, w = x.shape[1:3]
        x = jnp.pad(x.astype(d), ((0, 0), (0, (-h) % p), (0, (-w) % p), (0, 0)))
        x = PatchEmbed(cfg.embed_dim, p, name="patch_embed", dtype=d)(x)
        outs = []
        n = len(cfg.depths)
        for i in range(n):
            x_out, x = BasicLayer(cfg.num_features[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size,
                                  i < n - 1, cfg.mlp_ratio, name=f"layers_{i}", dtype=d)(x)
            outs.append(_ln(f"norm{i}")(x_out))
        return tuple(outs)


class PatchEmbed(nn.Module):
    embed_dim: int
    patch_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="proj", dtype=self.dtype)(x)
        return _ln("norm")(x).astype(self.dtype)
