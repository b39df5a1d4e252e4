"""Per-image PSNR and MS-SSIM (pytorch-msssim's definition: 11-tap Gaussian window, sigma 1.5,
K = (0.01, 0.03), 5 scales with weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2x2 average
pooling with odd-size zero padding between scales, ReLU on the contrast terms). numpy float64,
images NHWC in [0, data_range].

MS-SSIM's 5 scales need a smaller side > 160 pixels (pytorch-msssim asserts it); `ms_ssim` raises
for smaller images, and `ms_ssim_any_size` first upsamples both images (bicubic, same factor) to
a smaller side of 176, which the evaluation uses on small (e.g. 64-pixel synthetic) images.
"""
from __future__ import annotations

import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def psnr(x, y, data_range: float = 255.0) -> np.ndarray:
    """(N,) PSNR in dB of each image pair (mean squared error over all pixels and channels)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mse = np.mean((x - y) ** 2, axis=tuple(range(1, x.ndim)))
    return 10.0 * np.log10(data_range ** 2 / np.maximum(mse, 1e-20))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    coords = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(coords ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter(x: np.ndarray, win: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering along H and W of NHWC (a dimension shorter than the window is
    left unfiltered, as pytorch-msssim does with a warning)."""
    for axis in (1, 2):
        if x.shape[axis] >= len(win):
            x = np.tensordot(np.lib.stride_tricks.sliding_window_view(x, len(win), axis=axis), win, axes=([-1], [0]))
    return x


def _ssim_and_cs(x, y, data_range, win, k=(0.01, 0.03)):
    c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
    mu1, mu2 = _filter(x, win), _filter(y, win)
    s11 = _filter(x * x, win) - mu1 ** 2
    s22 = _filter(y * y, win) - mu2 ** 2
    s12 = _filter(x * y, win) - mu1 * mu2
    cs_map = (2 * s12 + c2) / (s11 + s22 + c2)
    ssim_map = ((2 * mu1 * mu2 + c1) / (mu1 ** 2 + mu2 ** 2 + c1)) * cs_map
    return ssim_map.mean(axis=(1, 2)), cs_map.mean(axis=(1, 2))     # (N, C) each


def _avg_pool2(x: np.ndarray) -> np.ndarray:
    """torch avg_pool2d(kernel 2, padding = size % 2, count_include_pad=True) on NHWC."""
    ph, pw = x.shape[1] % 2, x.shape[2] % 2
    x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    h, w = (x.shape[1] // 2) * 2, (x.shape[2] // 2) * 2
    x = x[:, :h, :w]
    return 0.25 * (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2])


def ms_ssim(x, y, data_range: float = 255.0, win_size: int = 11, win_sigma: float = 1.5,
            weights=MS_SSIM_WEIGHTS) -> np.ndarray:
    """(N,) MS-SSIM of each image pair (channel mean)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ms_ssim needs two NHWC batches of one shape, got {x.shape} and {y.shape}")
    if min(x.shape[1:3]) <= (win_size - 1) * 2 ** 4:
        raise ValueError(f"ms_ssim needs a smaller side > {(win_size - 1) * 2 ** 4}, got {x.shape[1:3]} "
                         "(ms_ssim_any_size upsamples first)")
    win = gaussian_window(win_size, win_sigma)
    w = np.asarray(weights, np.float64)
    mcs = []
    for i in range(len(w)):
        ssim_pc, cs = _ssim_and_cs(x, y, data_range, win)
        if i < len(w) - 1:
            mcs.append(np.maximum(cs, 0.0))
            x, y = _avg_pool2(x), _avg_pool2(y)
    stack = np.stack(mcs + [np.maximum(ssim_pc, 0.0)], 0)           # (levels, N, C)
    return np.prod(stack ** w[:, None, None], axis=0).mean(axis=1)


def ms_ssim_any_size(x, y, data_range: float = 255.0, min_side: int = 176) -> np.ndarray:
    """`ms_ssim` after upsampling both batches (bicubic, one factor) so the smaller side >= min_side."""
    x, y = np.asarray(x), np.asarray(y)
    side = min(x.shape[1:3])
    if side < min_side:
        from PIL import Image

        f = min_side / side
        size = (int(round(x.shape[2] * f)), int(round(x.shape[1] * f)))

        def up(batch):
            return np.stack([np.stack([np.asarray(Image.fromarray(np.asarray(im[..., c], np.float32), "F")
                                                  .resize(size, Image.BICUBIC)) for c in range(im.shape[-1])], -1)
                             for im in batch])

        x, y = up(x), up(y)
    return ms_ssim(np.clip(x, 0, data_range), np.clip(y, 0, data_range), data_range)
