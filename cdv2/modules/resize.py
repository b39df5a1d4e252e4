"""Resizes that equal torch's `F.interpolate(mode="bicubic")` (A = -0.75, no antialias).

`jax.image.resize` uses Keys a = -0.5 and antialiases when downsampling, so masks thresholded at
0.05 would differ from the authors'. These build the exact 1-D interpolation matrices on the host
(shapes are static) and apply them as two small matmuls, which XLA fuses and differentiates.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

_A = -0.75  # torch's bicubic coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of taps at offsets -1, 0, 1, 2 for fractional position t (torch's formulas)."""
    def near(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=256)
def bicubic_matrix(in_size: int, out_size: int, align_corners: bool = False) -> np.ndarray:
    """(out_size, in_size) float64 matrix M with y = M @ x equal to torch bicubic along one axis."""
    i = np.arange(out_size, dtype=np.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        src = i * scale
    else:
        scale = in_size / out_size
        src = (i + 0.5) * scale - 0.5  # torch does not clamp this for cubic
    base = np.floor(src)
    w = _cubic_weights(src - base)
    m = np.zeros((out_size, in_size), np.float64)
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)  # border taps are clamped
        np.add.at(m, (np.arange(out_size), idx), w[:, k])
    return m


def resize_bicubic(x: jnp.ndarray, size: tuple[int, int], align_corners: bool = False) -> jnp.ndarray:
    """Resize an NHWC array to `size` = (H, W) exactly like torch bicubic without antialias."""
    h, w = x.shape[1], x.shape[2]
    out_h, out_w = size
    if (h, w) == (out_h, out_w) and not align_corners:
        return x  # torch's bicubic at scale 1 is the identity
    mh = jnp.asarray(bicubic_matrix(h, out_h, align_corners), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(w, out_w, align_corners), jnp.float32)
    y = jnp.einsum("oh,nhwc->nowc", mh, x.astype(jnp.float32))
    y = jnp.einsum("pw,nowc->nopc", mw, y)
    return y.astype(x.dtype)


# --- antialiased bicubic: torch `F.interpolate(mode="bicubic", antialias=True)` ---------------
# torch's antialiased path (aten/src/ATen/native/cpu/UpSampleKernel.cpp,
# `_compute_indices_min_size_weights_aa` + `HelperInterpCubic::aa_filter`) is PIL-style: Keys cubic
# with a = -0.5 (not -0.75), support 2*scale when downsampling, taps centred at scale*(i+0.5) for
# align_corners True and False alike, weights renormalised to sum 1 (no border clamping). For
# float32 inputs torch computes these weights in float32 with mixed float/double promotions; the
# positions of large outputs (center ~ 200) lose ~1e-5 that way, so we reproduce that arithmetic.


def _aa_cubic_f32(x: np.ndarray) -> np.ndarray:
    """`HelperInterpCubic::aa_filter<float>`: Keys cubic, a = -0.5, evaluated in float32."""
    f = np.float32
    a = f(-0.5)
    x = np.abs(x).astype(f)
    near = ((a + f(2)) * x - (a + f(3))) * x * x + f(1)
    far = ((a * x - f(5) * a) * x + f(8) * a) * x - f(4) * a
    return np.where(x < 1, near, np.where(x < 2, far, f(0))).astype(f)


@functools.lru_cache(maxsize=64)
def _bicubic_aa_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
    """(out_size, in_size) float32 matrix equal to torch's float32 antialiased bicubic weights."""
    f, d = np.float32, np.float64
    if align_corners:  # area_pixel_compute_scale<float>
        scale = f(in_size - 1) / f(out_size - 1) if out_size > 1 else f(0)
    else:
        scale = f(in_size) / f(out_size)
    support = f(2.0 * d(scale)) if scale >= 1 else f(2.0)   # interp_size/2 * scale
    invscale = f(1.0 / d(scale)) if scale >= 1 else f(1.0)
    max_taps = int(np.ceil(support)) * 2 + 1
    m = np.zeros((out_size, in_size), f)
    for i in range(out_size):
        center = f(d(scale) * (i + 0.5))
        xmin = max(int(d(center - support) + 0.5), 0)      # C++ truncation toward zero
        xmax = min(int(d(center + support) + 0.5), in_size)
        taps = min(max(xmax - xmin, 0), max_taps)
        j = np.arange(xmin, xmin + taps)
        w = _aa_cubic_f32(((d(j.astype(f) - center) + 0.5) * d(invscale)).astype(f))
        total = f(0)
        for v in w:  # sequential float32 sum, as torch does
            total = f(total + v)
        if total != 0:
            w = (w / total).astype(f)
        m[i, xmin:xmin + taps] = w
    return m


def resize_bicubic_antialias(x: jnp.ndarray, size: tuple[int, int], align_corners: bool = False) -> jnp.ndarray:
    """Resize an NHWC array to `size` = (H, W) like torch bicubic with antialias=True (float input).

    Up- and downsampling both use the antialiased weights (torch's antialias path upsamples with
    the a = -0.5 cubic too). The matmuls run at full fp32 precision (no TF32/bf16 passes)."""
    h, w = x.shape[1], x.shape[2]
    out_h, out_w = size
    mh = jnp.asarray(_bicubic_aa_matrix(h, out_h, bool(align_corners)))
    mw = jnp.asarray(_bicubic_aa_matrix(w, out_w, bool(align_corners)))
    y = jnp.einsum("pw,nhwc->nhpc", mw, x.astype(jnp.float32), precision="highest")  # torch: W first
    y = jnp.einsum("oh,nhpc->nopc", mh, y, precision="highest")
    return y.astype(x.dtype)
