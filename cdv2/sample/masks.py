"""Sketch and reference masks for the background/fg-enhance modes (ARCHITECTURE.md §4.1, §4.3).

The authors segment with networks that are not available here: ISNet fine-tuned on sketches for
the sketch mask `smask`, and BiRefNet (rmbg-v2) for the reference mask `rmask`. This module
offers (a) user-given masks (`load_mask`, `place_mask_in_box`) and (b) documented, network-free
approximations (`estimate_sketch_mask`, `estimate_reference_mask`). `latent_mask` is the
authors' exact downscale of a pixel mask to latent resolution. Host side numpy + Pillow; masks
are float32 NHWC (1, H, W, 1) in [0, 1].
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from cdv2.sample.preprocess import Box, ImageInput, luma, open_image, resize_float

REFERENCE_DILATE_PX = 5  # the authors' rmask dilation: max_pool2d(kernel 11, stride 1, padding 5)


# --- morphology helpers ----------------------------------------------------------------------------

def max_filter(x: np.ndarray, radius: int) -> np.ndarray:
    """Square (2r+1)^2 max filter of a 2-D array; outside the image counts as -inf. This equals
    torch `F.max_pool2d(x, 2r+1, stride=1, padding=r)` (the authors' mask dilation)."""
    if radius <= 0:
        return x
    k = 2 * radius + 1
    src_dtype = x.dtype
    y = x.astype(np.float32) if x.dtype == bool else x
    fill = -np.inf if np.issubdtype(y.dtype, np.floating) else np.iinfo(y.dtype).min
    y = sliding_window_view(np.pad(y, ((radius, radius), (0, 0)), constant_values=fill), k, axis=0).max(-1)
    y = sliding_window_view(np.pad(y, ((0, 0), (radius, radius)), constant_values=fill), k, axis=1).max(-1)
    return y.astype(src_dtype)


def _spread_along_rows(free: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """Every horizontal run of `free` pixels containing a reached pixel becomes reached."""
    start = free.copy()
    start[:, 1:] &= ~free[:, :-1]
    run_id = np.cumsum(start.ravel()).reshape(free.shape)[free]  # runs never cross row ends
    hit = np.bincount(run_id, weights=reach[free], minlength=int(run_id.max(initial=0)) + 1) > 0
    out = np.zeros_like(reach)
    out[free] = hit[run_id]
    return out


def reachable_from_border(free: np.ndarray) -> np.ndarray:
    """Pixels of `free` (2-D bool) 4-connected through `free` to the image border: a flood fill
    from every border pixel. Alternating whole-run row and column sweeps converge in about as many
    sweeps as the fill path has turns, each sweep a few vectorised passes (no per-pixel Python)."""
    seed = np.zeros_like(free)
    seed[0, :], seed[-1, :], seed[:, 0], seed[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    reach = seed
    while True:
        new = _spread_along_rows(free, reach)
        new = _spread_along_rows(free.T, new.T).T
        if np.array_equal(new, reach):
            return reach
        reach = new


def _as_nhwc1(m: np.ndarray) -> np.ndarray:
    return np.asarray(m, np.float32)[None, :, :, None]


# --- user-given masks ------------------------------------------------------------------------------

def _unit_float(a: np.ndarray, what: str) -> np.ndarray:
    """Pixel values -> float64 in [0, 1]: bool 0/1, uint8 /255, uint16 /65535, other integers /255
    if they fit 8 bits else /65535 (up to 65535), floats must already be in [0, 1]."""
    if a.size == 0:
        raise ValueError(f"{what} is empty {a.shape}")
    if a.dtype == bool:
        return a.astype(np.float64)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"{what}: integer mask values must lie in 0..255 or 0..65535, got {lo}..{hi}")
        full = 255.0 if (a.dtype == np.uint8 or (a.dtype != np.uint16 and hi <= 255)) else 65535.0
        return a.astype(np.float64) / full
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"{what}: float mask values must be finite and in [0, 1], "
                             f"got {float(np.nanmin(a)):.4g}..{float(np.nanmax(a)):.4g}")
        return a.astype(np.float64)
    raise TypeError(f"{what}: unsupported mask dtype {a.dtype}")


def _gray_from_channels(a: np.ndarray) -> np.ndarray:
    """HxWxC in [0,1] -> HxW: C=1 gray; C=3 luma; C=2/4 (with alpha): the alpha if the colour is
    uniform over the whole image (a pure alpha mask), else the colour's luma."""
    c = a.shape[-1]
    color = a[..., : (1 if c <= 2 else 3)]
    gray = color[..., 0] if color.shape[-1] == 1 else luma(color)
    if c in (2, 4) and np.ptp(color) == 0:
        return a[..., -1]
    return gray


def _mask_pixels(src: ImageInput, what: str) -> np.ndarray:
    if isinstance(src, np.ndarray):
        a = np.asarray(src)
        if a.ndim == 4 and a.shape[0] == 1:
            a = a[0]
        if a.ndim == 2:
            a = a[..., None]
        if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(f"{what}: expected an HxW or HxWxC (C in 1..4) array, got {src.shape}")
        return _gray_from_channels(_unit_float(a, what))
    img = open_image(src, what=what)
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.array(img)
        if mode != "F":
            if int(arr.min()) < 0 or int(arr.max()) > 65535:
                raise ValueError(f"{what}: 32-bit integer mask with values {int(arr.min())}..{int(arr.max())}; "
                                 "only 0..65535 is supported")
            arr = arr.astype(np.uint16)
        return _unit_float(arr, what)
    if mode in ("1", "L"):
        return np.array(img.convert("L")).astype(np.float64) / 255.0
    if mode in ("LA", "La"):
        return _gray_from_channels(np.array(img.convert("LA")).astype(np.float64) / 255.0)
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        return _gray_from_channels(np.array(img.convert("RGBA")).astype(np.float64) / 255.0)
    return _gray_from_channels(np.array(img.convert("RGB")).astype(np.float64) / 255.0)


def _same_aspect(hw: tuple[int, int], target: tuple[int, int]) -> bool:
    """Equal aspect up to rounding: scaling one size onto the other's width (height) lands within
    one pixel of its height (width)."""
    (h, w), (th, tw) = hw, target
    return abs(h * tw / w - th) <= 1.0 and abs(w * th / h - tw) <= 1.0


def load_mask(src: ImageInput, expected_hw: tuple[int, int], *, what: str,
              against: str | None = None) -> np.ndarray:
    """A user-given mask, used as is: -> (1, H, W, 1) float32 in [0, 1] at `expected_hw`.

    Gray values: 'L'/'1' / 255; 16-bit ('I;16', 'I' in 0..65535) / 65535; 'F' must be in [0, 1];
    'RGB', 'P', 'CMYK', ...: luma (0.299 R + 0.587 G + 0.114 B); 'RGBA'/'LA'/'PA'/'P' with
    transparency: the alpha if the colour is uniform over the image (a pure alpha mask), else the
    colour's luma. Arrays follow the same rules by channel count (bool 0/1, uint8 /255,
    uint16 /65535, floats in [0, 1]).
    A mask of another size is resized (Pillow bilinear in float mode, antialiased when shrinking,
    then clipped to [0, 1]) only if its aspect ratio matches up to a pixel of rounding; otherwise
    ValueError "<what> is hxw but the <against> is HxW" (sizes as height x width).
    `against` names the image the mask belongs to (default: `what` without " mask").
    """
    m = _mask_pixels(src, what)
    h, w = m.shape
    eh, ew = (int(v) for v in expected_hw)
    if (h, w) != (eh, ew):
        if not _same_aspect((h, w), (eh, ew)):
            name = against or (what[: -len(" mask")] if what.endswith(" mask") else "image")
            raise ValueError(f"{what} is {h}x{w} but the {name} is {eh}x{ew} (height x width): "
                             "the mask must have the image's size or at least its aspect ratio")
        m = resize_float(m[..., None].astype(np.float32), (eh, ew), Image.BILINEAR)[..., 0]
    return _as_nhwc1(np.clip(m, 0.0, 1.0))


def place_mask_in_box(mask: np.ndarray, box: Box, canvas_hw: tuple[int, int]) -> np.ndarray:
    """Put a mask of the original sketch into the fitted-and-padded canvas of `prepare_sketch`:
    resize (bilinear) to the box's size, pad with 0 (background) to `canvas_hw`."""
    top, left, bh, bw = (int(v) for v in box)
    m = np.asarray(mask, np.float32).reshape(mask.shape[-3], mask.shape[-2])
    if m.shape != (bh, bw):
        m = np.clip(resize_float(m[..., None], (bh, bw), Image.BILINEAR)[..., 0], 0.0, 1.0)
    out = np.zeros(canvas_hw, np.float32)
    out[top:top + bh, left:left + bw] = m
    return _as_nhwc1(out)


# --- approximations of the authors' segmentation networks ------------------------------------------

def estimate_sketch_mask(sketch: np.ndarray, dilate_px: int, *, line_threshold: float = 0.0,
                         gap_px: int = 0) -> np.ndarray:
    """Approximate ISNet-sketch: the region enclosed by the outermost strokes, in {0, 1}.

    `sketch` is in model polarity (lines ~ +1 on -1, e.g. from `prepare_sketch`), (1, H, W, C).
    1. Lines = channel mean > `line_threshold`.
    2. With `gap_px` > 0, lines are first thickened by `gap_px` so gaps up to 2*gap_px px wide in
       an outline are closed; the thickening is taken back off the outer edge afterwards.
    3. Background = non-line pixels 4-connected to the image border (flood fill); everything else
       (the lines and whatever they enclose) is foreground.
    4. Dilate by a (2*dilate_px+1)^2 max filter. The authors do not dilate the sketch mask, but
       their soft ISNet output thresholded at ts_s = 0.05 reaches a little past the strokes.
    Returns (1, H, W, 1) float32. A sketch that is mostly "lines" is refused (ValueError): it is
    almost certainly in the wrong polarity (black on white).
    """
    x = np.asarray(sketch, np.float32)
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"sketch: expected batch 1, got {x.shape}")
        x = x[0]
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3:
        raise ValueError(f"sketch: expected (1, H, W, C), got {np.shape(sketch)}")
    lines = x.mean(-1) > line_threshold
    if lines.mean() > 0.5:
        raise ValueError(f"sketch: {lines.mean():.0%} of pixels are above the line threshold; it looks like "
                         "a black-on-white image. Pass the model-polarity sketch (lines +1 on -1) from prepare_sketch")
    barrier = max_filter(lines, gap_px) if gap_px > 0 else lines
    fg = ~reachable_from_border(~barrier)
    if gap_px > 0:
        fg = ~max_filter(~fg, gap_px) | lines  # erode the thickening back off the outer edge
    return _as_nhwc1(max_filter(fg, dilate_px))


def _reference_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3, or a [-1, 1] float (1, h, w, 3) from prepare_reference -> float64 0..255."""
    a = np.asarray(rgb)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"reference: expected an HxWx3 uint8 or (1, h, w, 3) [-1, 1] array, got {np.shape(rgb)}")
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    if np.issubdtype(a.dtype, np.floating):
        return (np.clip(a.astype(np.float64), -1.0, 1.0) + 1.0) * 127.5
    raise TypeError(f"reference: unsupported dtype {a.dtype}")


def estimate_reference_mask(rgb: np.ndarray, alpha: np.ndarray | None = None, *, tolerance: float = 24.0,
                            dilate: bool = True) -> np.ndarray:
    """Approximate rmbg-v2: the character (1) vs background (0) of a reference, (1, h, w, 1).

    * If `alpha` (HxW uint8, from `load_image`) is non-trivial, i.e. has both see-through
      (< 128) and opaque (>= 128) pixels, the mask is alpha / 255.
    * Otherwise the background is assumed to be one plain colour: the per-channel median of the
      outermost pixel ring. Pixels within `tolerance` (max channel difference, 0..255 scale) of it
      and 4-connected to the border through such pixels are background, the rest foreground.
      If fewer than half the border pixels match that colour the background is not plain and the
      estimate would be meaningless: ValueError (supply a mask with `load_mask`, or an RGBA image).
    * Then, as the authors do, dilate with an 11x11 max filter (`dilate`) and clamp to [0, 1].
    """
    px = _reference_rgb(rgb)
    h, w = px.shape[:2]
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.shape != (h, w):
            raise ValueError(f"reference alpha is {alpha.shape} but the reference is {h}x{w}")
        # uint8 0..255 as load_image gives; a float alpha is taken to be in [0, 1]
        alpha = alpha.astype(np.float32) * (255.0 if np.issubdtype(alpha.dtype, np.floating) else 1.0)
    if alpha is not None and alpha.min() < 128 <= alpha.max():
        m = alpha / 255.0
    else:
        ring = np.ones((h, w), bool)
        ring[1:-1, 1:-1] = False
        bg_color = np.median(px[ring], axis=0)
        close = np.abs(px - bg_color).max(-1) <= tolerance
        share = close[ring].mean()
        if share < 0.5:
            raise ValueError(f"reference background is not a plain colour (only {share:.0%} of border pixels are "
                             f"within {tolerance:g} of their median colour {np.round(bg_color).astype(int).tolist()}); "
                             "supply a reference mask (load_mask) or an RGBA reference with transparency")
        m = (~reachable_from_border(close)).astype(np.float32)
    if dilate:
        m = max_filter(m, REFERENCE_DILATE_PX)
    return _as_nhwc1(np.clip(m, 0.0, 1.0))


# --- latent resolution -----------------------------------------------------------------------------

def latent_mask(mask_full: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """The authors' `scaled_resize(smask, 0.125)`: torch bicubic (A = -0.75, align_corners False, no
    antialias, no clamp) of a (1, H, W, 1) pixel mask to `latent_hw`. torch's scale_factor path
    equals the size path only when H, W are exact multiples of the latent size, so that is required."""
    from cdv2.modules.resize import resize_bicubic  # jax import only where it is needed

    m = np.asarray(mask_full, np.float32)
    if m.ndim != 4 or m.shape[-1] != 1:
        raise ValueError(f"latent_mask expects a (B, H, W, 1) mask, got {m.shape}")
    (H, W), (lh, lw) = m.shape[1:3], latent_hw
    if H % lh or W % lw or H // lh != W // lw:
        raise ValueError(f"mask of {H}x{W} is not an exact multiple of the latent size {lh}x{lw}")
    return np.asarray(resize_bicubic(m, (lh, lw)), np.float32)


__all__ = [
    "REFERENCE_DILATE_PX", "max_filter", "reachable_from_border", "load_mask", "place_mask_in_box",
    "estimate_sketch_mask", "estimate_reference_mask", "latent_mask",
]
