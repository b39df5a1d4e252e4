"""BiRefNet with a Swin backbone, RMBG-2.0's configuration (the app's "rmbg-v2"), NHWC, eval.

RMBG-2.0 config: mul_scl_ipt='cat' (the backbone also runs on the half-size image and the features
are concatenated), cxt_num=3, squeeze_block='BasicDecBlk_x1', dec_blk='BasicDecBlk' with
dec_att='ASPPDeformable', lat_blk='BasicLatBlk', dec_ipt with split patches, ms_supervision and
out_ref (gradient attention; its `gdt_convs_pred_*` heads are training-only and kept for the keys),
BatchNorm everywhere (batch_size > 1). All resizes are bilinear align_corners=True. H and W must be
multiples of 32. Widths are config values so the reduced oracle fixture runs the same code.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import yaml

from cdv2.modules.preprocess_nets.deform_conv import DeformableConv2d
from cdv2.modules.preprocess_nets.ops import batch_norm, conv, resize_bilinear
from cdv2.modules.preprocess_nets.swin import SwinConfig, SwinTransformer

Dtype = Any


@dataclasses.dataclass(frozen=True)
class BiRefNetConfig:
    swin: SwinConfig = SwinConfig()
    dec_inter: int = 64      # BasicDecBlk inter channels ('fixed')
    aspp_inter: int = 256    # ASPPDeformable branch width
    ipt_inter: int = 64      # SimpleConvs (decoder image-patch input) inter channels
    gdt_channels: int = 16   # out_ref gradient-attention width (_N)
    aspp_kernels: tuple[int, ...] = (1, 3, 7)

    @property
    def channels(self) -> tuple[int, ...]:
        """lateral_channels_in_collection: backbone widths, deepest first, doubled by 'cat'."""
        return tuple(2 * c for c in reversed(self.swin.num_features))

    @classmethod
    def from_dict(cls, d: dict) -> "BiRefNetConfig":
        d = dict(d)
        swin = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("swin", {}).items()}
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(swin=SwinConfig(**swin), **d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "BiRefNetConfig":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})


def resize_ac(x: jnp.ndarray, size) -> jnp.ndarray:
    return resize_bilinear(x, tuple(size), align_corners=True)


def image_to_patches(x: jnp.ndarray, ref_hw) -> jnp.ndarray:
    """RMBG-2.0's `b c (hg h) (wg w) -> b (wg hg c) h w`, NHWC: channel (wg·HG + hg)·C + c."""
    b, hh, ww, c = x.shape
    h, w = ref_hw
    hg, wg = hh // h, ww // w
    x = x.reshape(b, hg, h, wg, w, c).transpose(0, 2, 4, 3, 1, 5)
    return x.reshape(b, h, w, wg * hg * c)


class ASPPModuleDeformable(nn.Module):
    planes: int
    kernel_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        x = DeformableConv2d(self.planes, k, k // 2, name="atrous_conv", dtype=self.dtype)(x)
        return nn.relu(batch_norm("bn", self.dtype)(x))


class ASPPDeformable(nn.Module):
    out_channels: int
    inter: int
    kernels: tuple[int, ...]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = self.dtype
        branches = [ASPPModuleDeformable(self.inter, 1, name="aspp1", dtype=d)(x)]
        branches += [ASPPModuleDeformable(self.inter, k, name=f"aspp_deforms_{i}", dtype=d)(x)
                     for i, k in enumerate(self.kernels)]
        g = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(d)  # AdaptiveAvgPool2d(1)
        g = nn.relu(batch_norm("global_avg_pool_2", d)(conv(self.inter, 1, "global_avg_pool_1", d, bias=False)(g)))
        branches.append(jnp.broadcast_to(g, branches[0].shape[:3] + g.shape[-1:]))  # 1x1 -> HxW, align_corners
        x = conv(self.out_channels, 1, "conv1", d, bias=False)(jnp.concatenate(branches, -1))
        return nn.relu(batch_norm("bn1", d)(x))  # dropout: eval no-op


class BasicDecBlk(nn.Module):
    out_channels: int
    config: BiRefNetConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, d = self.config, self.dtype
        x = nn.relu(batch_norm("bn_in", d)(conv(cfg.dec_inter, 3, "conv_in", d)(x)))
        x = ASPPDeformable(cfg.dec_inter, cfg.aspp_inter, cfg.aspp_kernels, name="dec_att", dtype=d)(x)
        return batch_norm("bn_out", d)(conv(self.out_channels, 3, "conv_out", d)(x))


class SimpleConvs(nn.Module):
    out_channels: int
    inter: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(self.out_channels, 3, "conv_out", self.dtype)(conv(self.inter, 3, "conv1", self.dtype)(x))


class Decoder(nn.Module):
    config: BiRefNetConfig
    dtype: Dtype = jnp.float32

    def _gdt_attention(self, p, level: int):
        """out_ref: p * sigmoid(attn(relu(bn(conv3x3(p))))); the pred head exists for the keys."""
        cfg, d = self.config, self.dtype
        g = conv(cfg.gdt_channels, 3, f"gdt_convs_{level}_0", d)(p)
        g = nn.relu(batch_norm(f"gdt_convs_{level}_1", d)(g))
        conv(1, 1, f"gdt_convs_pred_{level}_0", d)(g)  # training-only output (keys)
        attn = jax.nn.sigmoid(conv(1, 1, f"gdt_convs_attn_{level}_0", d)(g).astype(jnp.float32))
        return p * attn.astype(p.dtype)

    @nn.compact
    def __call__(self, x, x1, x2, x3, x4):
        """Returns (m4, m3, m2, p1): the multi-scale logits and the final full-size logits."""
        cfg, d = self.config, self.dtype
        ch = cfg.channels
        ipt_out = [c // 8 for c in ch]
        dec_out = [ch[1], ch[2], ch[3], ch[3] // 2]

        def ipt(name, out, ref):
            patches = image_to_patches(x, ref.shape[1:3])
            return SimpleConvs(out, cfg.ipt_inter, name=name, dtype=d)(resize_ac(patches, ref.shape[1:3]))

        ms = []
        p = jnp.concatenate([x4, ipt("ipt_blk5", ipt_out[0], x4)], -1)
        skips = [(x3, "ipt_blk4", ipt_out[0]), (x2, "ipt_blk3", ipt_out[1]), (x1, "ipt_blk2", ipt_out[2])]
        for level, (skip, ipt_name, ipt_ch) in zip((4, 3, 2), skips):
            p = BasicDecBlk(dec_out[4 - level], cfg, name=f"decoder_block{level}", dtype=d)(p)
            ms.append(conv(1, 1, f"conv_ms_spvn_{level}", d)(p).astype(jnp.float32))
            p = self._gdt_attention(p, level)
            lateral = LateralBlock(dec_out[4 - level], name=f"lateral_block{level}", dtype=d)(skip)
            p = resize_ac(p, skip.shape[1:3]) + lateral
            p = jnp.concatenate([p, ipt(ipt_name, ipt_ch, p)], -1)
        p = BasicDecBlk(dec_out[3], cfg, name="decoder_block1", dtype=d)(p)
        p = resize_ac(p, x.shape[1:3])
        p = jnp.concatenate([p, ipt("ipt_blk1", ipt_out[3], p)], -1)
        p1 = conv(1, 1, "conv_out1_0", d)(p).astype(jnp.float32)
        return (*ms, p1)


class LateralBlock(nn.Module):
    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(self.out_channels, 1, "conv", self.dtype)(x)


class BiRefNet(nn.Module):
    """x: (B, H, W, 3) ImageNet-normalised, H and W multiples of 32 -> (m4, m3, m2, p1) logits."""

    config: BiRefNetConfig = BiRefNetConfig()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, d = self.config, self.dtype
        b, h, w, _ = x.shape
        if h % 32 or w % 32:
            raise ValueError(f"BiRefNet needs H and W multiples of 32 (decoder patch split), got {(h, w)}")
        x = x.astype(d)
        bb = SwinTransformer(cfg.swin, name="bb", dtype=d)
        feats = bb(x)
        feats_half = bb(resize_ac(x, (h // 2, w // 2)))  # mul_scl_ipt='cat': same backbone, half input
        x1, x2, x3, x4 = (jnp.concatenate([f.astype(d), resize_ac(g, f.shape[1:3]).astype(d)], -1)
                          for f, g in zip(feats, feats_half))
        ctx = [resize_ac(f, x4.shape[1:3]) for f in (x1, x2, x3)]  # cxt_num = 3
        x4 = jnp.concatenate([*ctx, x4], -1)
        x4 = BasicDecBlk(cfg.channels[0], cfg, name="squeeze_module_0", dtype=d)(x4)
        return Decoder(cfg, name="decoder", dtype=d)(x, x1, x2, x3, x4)
