"""Thin-plate-spline (TPS) deformation of a reference image (the paper's §5 protocol: the reference
of a PSNR / MS-SSIM / CLIP-similarity pair is its ground truth deformed by a TPS warp).

A grid of `grid` x `grid` control points (normalised [-1, 1] coordinates) is displaced by uniform
noise of +-`strength`; the TPS that maps the displaced points back to the originals gives, for each
output pixel, where to sample the input (backward mapping, bilinear, border clamped). Corner and
edge points move too, so the whole image bends, not only its inside.
"""
from __future__ import annotations

import numpy as np


def _u(r2: np.ndarray) -> np.ndarray:
    """TPS kernel U = r^2 log r^2 (0 at r = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r2 > 0, r2 * np.log(np.maximum(r2, 1e-30)), 0.0)


def tps_fit(src: np.ndarray, dst: np.ndarray, reg: float = 0.0) -> np.ndarray:
    """Coefficients (n + 3, 2) of the TPS f with f(src_i) = dst_i (src, dst (n, 2))."""
    n = len(src)
    k = _u(((src[:, None] - src[None]) ** 2).sum(-1)) + reg * np.eye(n)
    p = np.concatenate([np.ones((n, 1)), src], 1)
    a = np.zeros((n + 3, n + 3))
    a[:n, :n], a[:n, n:], a[n:, :n] = k, p, p.T
    b = np.zeros((n + 3, 2))
    b[:n] = dst
    return np.linalg.solve(a, b)


def tps_apply(coef: np.ndarray, ctrl: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Evaluate the TPS fitted on control points `ctrl` at `pts` (m, 2) -> (m, 2)."""
    u = _u(((pts[:, None] - ctrl[None]) ** 2).sum(-1))
    return u @ coef[:len(ctrl)] + coef[len(ctrl)] + pts @ coef[len(ctrl) + 1:]


def bilinear_sample(img: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """img (H, W, C) float, xy (H', W', 2) pixel coordinates (x, y) -> (H', W', C), border clamped."""
    h, w = img.shape[:2]
    x = np.clip(xy[..., 0], 0, w - 1)
    y = np.clip(xy[..., 1], 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bot * fy


def tps_warp(img, rng: np.random.Generator, *, grid: int = 4, strength: float = 0.15) -> np.ndarray:
    """Randomly TPS-deform `img` (H, W, C) uint8 or float; returns the same dtype and shape."""
    a = np.asarray(img)
    h, w = a.shape[:2]
    g = np.linspace(-1, 1, grid)
    ctrl = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    moved = ctrl + rng.uniform(-strength, strength, ctrl.shape)
    coef = tps_fit(moved, ctrl)            # output position -> input position
    ys, xs = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    src = tps_apply(coef, moved, np.stack([xs.ravel(), ys.ravel()], -1)).reshape(h, w, 2)
    pix = np.stack([(src[..., 0] + 1) * (w - 1) / 2, (src[..., 1] + 1) * (h - 1) / 2], -1)
    out = bilinear_sample(a.astype(np.float64).reshape(h, w, -1), pix).reshape(a.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8) if a.dtype == np.uint8 else out.astype(a.dtype)
