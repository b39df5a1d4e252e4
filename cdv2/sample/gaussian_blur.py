"""`cv2.GaussianBlur(img, (0, 0), sigma)` in numpy, for the app's sketch preprocessors (no OpenCV).

uint8 images (SketchKeras' high-pass, sigma 3): OpenCV's bit-exact fixed-point path. The kernel
size is round(2*3*sigma + 1) | 1; the kernel is OpenCV's `getGaussianKernelBitExact` (double
precision, taps exp(-x^2 / (2 sigma^2)) normalised to sum 1) turned into 8-bit fixed point by
error diffusion (`getGaussianKernelFixedPoint_ED`, the centre tap takes the remainder so the sum is
exactly 256). Rows then columns are integer sums (exact), rounded once: (acc + 2**15) >> 16.
float32 images (the "invert-webui" lineart_standard, sigma 6): kernel size round(2*4*sigma+1) | 1,
float32 taps, computed here in float64 and rounded to float32 (OpenCV accumulates in float32:
differences are float32 rounding, ~1e-7 relative). Borders: BORDER_REFLECT_101 in both.
"""
from __future__ import annotations

import functools

import numpy as np


def _kernel_bitexact(n: int, sigma: float) -> np.ndarray:
    """OpenCV's `getGaussianKernelBitExact` for sigma > 0 (float64, symmetric, odd n)."""
    half = (n - 1) // 2
    scale2x = -0.125 / (sigma * sigma)          # offsets are doubled below: x = 2 * (i - half)
    vals = [np.exp(float((1 - n + 2 * i) ** 2) * scale2x) for i in range(half)]
    total = 0.0
    for v in vals:
        total += v
    total = total * 2.0 + 1.0
    mul = 1.0 / total
    side = [v * mul for v in vals]
    return np.array(side + [mul] + side[::-1], np.float64)


@functools.lru_cache(maxsize=16)
def fixed_point_kernel(n: int, sigma: float, bits: int = 8) -> tuple[int, ...]:
    """`getGaussianKernelFixedPoint_ED`: integer taps (1/2**bits units) summing to 2**bits."""
    k = _kernel_bitexact(n, sigma)
    one = 1 << bits
    err, taps = 0.0, []
    for i in range(n // 2):
        adj = k[i] * one + err
        v = int(np.rint(adj))                   # cvRound: nearest, ties to even
        err = adj - v
        taps.append(v)
    centre = one - 2 * sum(taps)
    return tuple(taps + [centre] + taps[::-1])


def _ksize(sigma: float, per_side: int) -> int:
    return int(np.rint(sigma * per_side * 2 + 1)) | 1


def _separable(x: np.ndarray, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """Correlate rows with kx then columns with ky on an HxWxC array, BORDER_REFLECT_101."""
    rx, ry = len(kx) // 2, len(ky) // 2
    h, w = x.shape[:2]
    if min(h, w) <= max(rx, ry):
        raise ValueError(f"image of {h}x{w} px is too small for a {len(kx)}-tap Gaussian blur")
    p = np.pad(x, ((0, 0), (rx, rx), (0, 0)), mode="reflect")       # numpy "reflect" = REFLECT_101
    rows = sum(kx[j] * p[:, j:j + w] for j in range(len(kx)))
    p = np.pad(rows, ((ry, ry), (0, 0), (0, 0)), mode="reflect")
    return sum(ky[j] * p[j:j + h] for j in range(len(ky)))


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """`cv2.GaussianBlur(img, (0, 0), sigma)` for an HxWxC uint8 or float32 array."""
    img = np.asarray(img)
    x = img if img.ndim == 3 else img[..., None]
    if img.dtype == np.uint8:
        k = np.array(fixed_point_kernel(_ksize(sigma, 3), float(sigma)), np.int64)
        acc = _separable(x.astype(np.int64), k, k)
        out = np.clip((acc + (1 << 15)) >> 16, 0, 255).astype(np.uint8)
    elif img.dtype == np.float32:
        k = _kernel_bitexact(_ksize(sigma, 4), float(sigma)).astype(np.float32).astype(np.float64)
        out = _separable(x.astype(np.float64), k, k).astype(np.float32)
    else:
        raise TypeError(f"gaussian_blur supports uint8 and float32 images, got {img.dtype}")
    return out if img.ndim == 3 else out[..., 0]
