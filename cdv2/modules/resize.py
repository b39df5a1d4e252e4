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
