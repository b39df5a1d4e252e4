"""Small ops shared by the mask networks: torch-exact bilinear resizes, ceil-mode pooling, BN.

Resizes are host-built 1-D interpolation matrices applied as two matmuls (shapes are static),
like `cdv2/modules/resize.py`; `jax.image.resize` follows other edge rules than torch.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


Dtype = Any


@functools.lru_cache(maxsize=256)
def bilinear_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """(out, in) matrix equal to torch `F.interpolate(mode="bilinear")` along one axis."""
    i = np.arange(out_size, dtype=np.float64)
    if align_corners:
        src = i * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    else:  # torch clamps negative source positions to 0 for linear modes
        src = np.maximum((i + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    lam = src - lo
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), lo), 1.0 - lam)
    np.add.at(m, (np.arange(out_size), hi), lam)
    return m


@functools.lru_cache(maxsize=64)
def bicubic_matrix_f32(in_size: int, out_size: int, scale_factor: float | None = None) -> np.ndarray:
    """(out, in) matrix of torch bicubic (A=-0.75, align_corners=False, no antialias) with torch's
    float32 index/weight arithmetic (UpSampleKernel.cpp). With `scale_factor` (F.interpolate called
    with scale_factor, recompute_scale_factor=None) the source step is 1/scale_factor, not in/out."""
    f = np.float32
    ratio = f(1.0 / scale_factor) if scale_factor else f(in_size) / f(out_size)
    src = ratio * (np.arange(out_size).astype(f) + f(0.5)) - f(0.5)
    base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - base.astype(f), f(0), f(1)).astype(f)
    a = f(-0.75)

    def near(x):
        return ((a + f(2)) * x - (a + f(3))) * x * x + f(1)

    def far(x):
        return ((a * x - f(5) * a) * x + f(8) * a) * x - f(4) * a

    w = np.stack([far(t + f(1)), near(t), near(f(1) - t), far(f(2) - t)], -1).astype(f)
    m = np.zeros((out_size, in_size), np.float64)
    for k in range(4):
        idx = np.clip(base - 1 + k, 0, in_size - 1)  # border taps are clamped
        np.add.at(m, (np.arange(out_size), idx), w[:, k].astype(np.float64))
    return m


def resize_bicubic_f32(x: jnp.ndarray, size: tuple[int, int], scale_factor: float | None = None) -> jnp.ndarray:
    """NHWC torch bicubic (no antialias), by size or by a common scale_factor."""
    h, w = x.shape[1:3]
    mh, mw = bicubic_matrix_f32(h, size[0], scale_factor), bicubic_matrix_f32(w, size[1], scale_factor)
    return apply_separable(x, mh, mw)


@functools.lru_cache(maxsize=64)
def bilinear_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
    """torch `interpolate(mode="bilinear", antialias=True, align_corners=False)` weights (float32
    arithmetic as in UpSampleKernel.cpp): triangle filter of support `scale` when downsampling,
    taps centred at scale*(i+0.5), renormalised to sum 1 (this is torchvision's tensor resize)."""
    f, d = np.float32, np.float64
    scale = f(in_size) / f(out_size)
    support = f(1.0 * d(scale)) if scale >= 1 else f(1.0)
    invscale = f(1.0 / d(scale)) if scale >= 1 else f(1.0)
    max_taps = int(np.ceil(support)) * 2 + 1
    m = np.zeros((out_size, in_size), f)
    for i in range(out_size):
        center = f(d(scale) * (i + 0.5))
        xmin = max(int(d(center - support) + 0.5), 0)
        xmax = min(int(d(center + support) + 0.5), in_size)
        taps = min(max(xmax - xmin, 0), max_taps)
        j = np.arange(xmin, xmin + taps)
        t = np.abs(((d(j.astype(f) - center) + 0.5) * d(invscale)).astype(f))
        w = np.where(t < 1, f(1) - t, f(0)).astype(f)
        total = f(0)
        for v in w:
            total = f(total + v)
        if total != 0:
            w = (w / total).astype(f)
        m[i, xmin:xmin + taps] = w
    return m


def apply_separable(x: jnp.ndarray, mh: np.ndarray, mw: np.ndarray) -> jnp.ndarray:
    """y[n,o,p,c] = sum_hw mh[o,h] mw[p,w] x[n,h,w,c], at full fp32 precision."""
    dt = x.dtype
    y = jnp.einsum("pw,nhwc->nhpc", jnp.asarray(mw, jnp.float32), x.astype(jnp.float32), precision="highest")
    y = jnp.einsum("oh,nhpc->nopc", jnp.asarray(mh, jnp.float32), y, precision="highest")
    return y.astype(dt)


def resize_bilinear(x: jnp.ndarray, size: tuple[int, int], align_corners: bool) -> jnp.ndarray:
    """NHWC bilinear resize equal to torch's (no antialias); same size is the identity."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    return apply_separable(x, bilinear_matrix(h, size[0], align_corners), bilinear_matrix(w, size[1], align_corners))


def resize_bilinear_antialias(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """NHWC equivalent of torchvision `resize(tensor, size)` (bilinear, antialias=True)."""
    h, w = x.shape[1:3]
    return apply_separable(x, bilinear_aa_matrix(h, size[0]), bilinear_aa_matrix(w, size[1]))


def max_pool_ceil(x: jnp.ndarray) -> jnp.ndarray:
    """torch MaxPool2d(2, stride=2, ceil_mode=True): odd sizes keep a last 1-wide window."""
    h, w = x.shape[1:3]
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, (2, 2), strides=(2, 2))


def max_pool_same(x: jnp.ndarray, kernel: int) -> jnp.ndarray:
    """torch max_pool2d(kernel, stride=1, padding=kernel//2) (odd kernel; padding is -inf)."""
    p = kernel // 2
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, (kernel, kernel), strides=(1, 1))


def conv(features: int, kernel: int, name: str, dtype: Dtype, *, padding: int | None = None,
         dilation: int = 1, stride: int = 1, bias: bool = True) -> nn.Conv:
    """torch Conv2d with symmetric zero padding (default kernel//2 * dilation)."""
    p = (kernel // 2) * dilation if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   kernel_dilation=(dilation, dilation), use_bias=bias, name=name, dtype=dtype)


def batch_norm(name: str, dtype: Dtype, eps: float = 1e-5) -> nn.BatchNorm:
    """Eval-mode torch BatchNorm2d: running statistics live in the `batch_stats` collection."""
    return nn.BatchNorm(use_running_average=True, epsilon=eps, name=name, dtype=dtype)
