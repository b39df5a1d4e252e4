"""IS-Net / DIS (`ISNetDIS`, SkyTNT anime-segmentation) in Flax, NHWC, eval mode.

Used twice by the app with the same architecture: "ISNet" (reference masks, `isnetis.safetensors`)
and "ISNet-sketch" (sketch masks, `sketch-segment.safetensors`). Module names follow the torch
modules so the key map is the shared layout rule. `width` scales every channel count (64 = real;
the oracle fixture uses 16, i.e. all widths / 4).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import yaml

from cdv2.modules.preprocess_nets.ops import batch_norm, conv, max_pool_ceil, resize_bilinear

Dtype = Any

# (kind, in, mid, out) at width 64, as in ISNetDIS.__init__ (inputs are inferred by Flax)
_ENCODER = {"stage1": (7, 32, 64), "stage2": (6, 32, 128), "stage3": (5, 64, 256),
            "stage4": (4, 128, 512), "stage5": ("4F", 256, 512), "stage6": ("4F", 256, 512)}
_DECODER = {"stage5d": ("4F", 256, 512), "stage4d": (4, 128, 256), "stage3d": (5, 64, 128),
            "stage2d": (6, 32, 64), "stage1d": (7, 16, 64)}
_SIDES = {"side1": "stage1d", "side2": "stage2d", "side3": "stage3d", "side4": "stage4d",
          "side5": "stage5d", "side6": "stage6"}


@dataclasses.dataclass(frozen=True)
class ISNetConfig:
    width: int = 64       # conv_in channels; all other widths scale with width / 64
    out_ch: int = 1

    def ch(self, c: int) -> int:
        return c * self.width // 64

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ISNetConfig":
        return cls(**(yaml.safe_load(Path(path).read_text()) or {}))


def upsample_like(src: jnp.ndarray, tar: jnp.ndarray) -> jnp.ndarray:
    """`_upsample_like`: bilinear, align_corners=False, to tar's spatial size."""
    return resize_bilinear(src, tar.shape[1:3], align_corners=False)


class REBNCONV(nn.Module):
    out_ch: int
    dirate: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = conv(self.out_ch, 3, "conv_s1", self.dtype, dilation=self.dirate)(x)
        return nn.relu(batch_norm("bn_s1", self.dtype)(x))


class RSU(nn.Module):
    """RSU-L (L = 4..7: L-2 ceil-mode pools, a dilation-2 bottom) or RSU-4F (dilations, no pools)."""

    kind: Any  # 4, 5, 6, 7 or "4F"
    mid_ch: int
    out_ch: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d, mid = self.dtype, self.mid_ch
        hxin = REBNCONV(self.out_ch, name="rebnconvin", dtype=d)(x)
        if self.kind == "4F":
            hx1 = REBNCONV(mid, 1, name="rebnconv1", dtype=d)(hxin)
            hx2 = REBNCONV(mid, 2, name="rebnconv2", dtype=d)(hx1)
            hx3 = REBNCONV(mid, 4, name="rebnconv3", dtype=d)(hx2)
            hx4 = REBNCONV(mid, 8, name="rebnconv4", dtype=d)(hx3)
            hx3d = REBNCONV(mid, 4, name="rebnconv3d", dtype=d)(jnp.concatenate([hx4, hx3], -1))
            hx2d = REBNCONV(mid, 2, name="rebnconv2d", dtype=d)(jnp.concatenate([hx3d, hx2], -1))
            hx1d = REBNCONV(self.out_ch, 1, name="rebnconv1d", dtype=d)(jnp.concatenate([hx2d, hx1], -1))
            return hx1d + hxin
        n = int(self.kind)
        feats = [REBNCONV(mid, name="rebnconv1", dtype=d)(hxin)]
        for i in range(2, n):  # encoder levels 2..n-1, each after a pool
            feats.append(REBNCONV(mid, name=f"rebnconv{i}", dtype=d)(max_pool_ceil(feats[-1])))
        hx = REBNCONV(mid, 2, name=f"rebnconv{n}", dtype=d)(feats[-1])
        for i in range(n - 1, 0, -1):  # decoder: rebnconv{n-1}d .. rebnconv1d
            out = self.out_ch if i == 1 else mid
            hx = REBNCONV(out, name=f"rebnconv{i}d", dtype=d)(jnp.concatenate([hx, feats[i - 1]], -1))
            if i > 1:
                hx = upsample_like(hx, feats[i - 2])
        return hx + hxin


class ISNetDIS(nn.Module):
    """x: (B, H, W, 3) -> sigmoid(d1): (B, H, W, out_ch), fp32."""

    config: ISNetConfig = ISNetConfig()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, d = self.config, self.dtype
        x = x.astype(d)
        hxin = conv(cfg.ch(64), 3, "conv_in", d, stride=2)(x)  # its pool_in result is unused
        feats, hx = {}, hxin
        for i, (name, (kind, mid, out)) in enumerate(_ENCODER.items()):
            hx = RSU(kind, cfg.ch(mid), cfg.ch(out), name=name, dtype=d)(hx)
            feats[name] = hx
            if i < len(_ENCODER) - 1:
                hx = max_pool_ceil(hx)
        skips = ["stage5", "stage4", "stage3", "stage2", "stage1"]
        hx = upsample_like(feats["stage6"], feats["stage5"])
        for (name, (kind, mid, out)), skip in zip(_DECODER.items(), skips):
            hx = RSU(kind, cfg.ch(mid), cfg.ch(out), name=name, dtype=d)(jnp.concatenate([hx, feats[skip]], -1))
            feats[name] = hx
            if name != "stage1d":
                hx = upsample_like(hx, feats[skips[skips.index(skip) + 1]])
        sides = {n: conv(cfg.out_ch, 3, n, d)(feats[src]) for n, src in _SIDES.items()}  # side2..6: keys only
        d1 = upsample_like(sides["side1"].astype(jnp.float32), x)
        return nn.sigmoid(d1)
