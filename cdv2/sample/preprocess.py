"""Host-side image input/output for inference (ARCHITECTURE.md §4.1, §4.5; NOTES.md (d) 4).

Everything here runs once per image with numpy + Pillow, never inside the jitted sampling loop.
Model arrays are float32 NHWC with batch 1, in [-1, 1]. Sketches are in *model polarity*:
lines ~ +1 on a -1 background (the authors' "invert" preprocessor applied to a black-on-white
drawing); the padding around the fitted sketch is -1 as well.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
Box = tuple[int, int, int, int]  # (top, left, height, width) of the content inside the canvas

MIN_SKETCH_SIDE = 64  # below this a sketch has too few pixels for even one 8x8 latent per 64 px


# --- loading --------------------------------------------------------------------------------------

def open_image(src: ImageInput, *, what: str) -> Image.Image:
    """Open a path as a PIL image (fully decoded, EXIF orientation applied); PIL images pass through.

    Missing path -> FileNotFoundError; a file PIL cannot decode (not an image, truncated,
    corrupt) -> ValueError. Both name `what` ("sketch", "reference", ...) and the path.
    Multi-frame files (GIF, APNG, TIFF) use their first frame.
    """
    if isinstance(src, Image.Image):
        return src
    if not isinstance(src, (str, os.PathLike)):
        raise TypeError(f"{what}: expected a path, a PIL image or a numpy array, got {type(src).__name__}")
    path = Path(src)
    if not path.is_file():
        reason = "is a directory, not an image file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} file {str(path)!r} {reason}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncated/corrupt data fails here, not later
            # Viewers (and the authors' Gradio UI) show photos rotated by their EXIF tag. This
            # returns a decoded copy (of the first frame), so the file can be closed.
            return ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{what} file {str(path)!r} is not a readable image ({e})") from e


def _array_to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    """Integer/float/bool pixel values -> uint8 (see `load_image` for the rules)."""
    if a.size == 0:
        raise ValueError(f"{what} is an empty array {a.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 -> 255 exactly
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"{what}: integer pixels must lie in 0..255 (8-bit) or 0..65535 (16-bit); "
                             f"got {lo}..{hi}")
        if hi <= 255:  # fits 8 bits: read as 8-bit (a 16-bit image this dark is not plausible)
            return a.astype(np.uint8)
        return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if not np.isfinite(a).all() or lo < 0.0 or hi > 1.0:
            raise ValueError(f"{what}: float pixels must be finite and in [0, 1]; got {lo:.4g}..{hi:.4g} "
                             "(for model arrays in [-1, 1] pass (x + 1) / 2)")
        return np.round(a.astype(np.float64) * 255.0).astype(np.uint8)
    raise TypeError(f"{what}: unsupported array dtype {a.dtype}")


def _split_array(a: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (2, 3, 4)):
        raise ValueError(f"{what}: expected an HxW, HxWx1, HxWx2 (gray+alpha), HxWx3 or HxWx4 array, got {a.shape}")
    a = _array_to_uint8(a, what)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1), None
    if a.shape[-1] == 2:
        return np.repeat(a[..., :1], 3, axis=-1), a[..., 1].copy()
    if a.shape[-1] == 4:
        return np.ascontiguousarray(a[..., :3]), a[..., 3].copy()
    return a, None


def _pil_to_rgb_alpha(img: Image.Image, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):  # single-channel high-depth gray
        arr = np.array(img)
        if mode != "F":  # 16-bit semantics for 'I;16*' and 'I' alike (PNG/TIFF gray)
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
                raise ValueError(f"{what}: 32-bit integer image with values {int(arr.min())}..{int(arr.max())}; "
                                 "only 0..65535 (16-bit) is supported")
            arr = arr.astype(np.uint16)
        return _split_array(arr, what)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) \
            or (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = np.array(img.convert("RGBA"))
        return np.ascontiguousarray(rgba[..., :3]), rgba[..., 3].copy()
    return np.array(img.convert("RGB")), None


def load_image(src: ImageInput, *, what: str,
               matte: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a path, PIL image or array as (rgb uint8 HxWx3, alpha uint8 HxW or None).

    Coercions (all to 8-bit RGB; the alpha channel, where the input has one, is returned
    separately because the reference mask can come from it):
      * 'RGB': as is.  '1' (bilevel), 'L' (gray): the gray value in all three channels.
      * 'LA', 'La', 'PA', 'RGBA', 'RGBa', and 'P'/'L'/'RGB' with a transparency entry:
        colour from the RGBA conversion, alpha returned. The colour under transparent pixels is
        kept as stored (as the authors' UI does when it drops alpha) unless `matte` is given, in
        which case the image is composited over that colour (alpha-weighted, rounded).
      * 'P' (palette) without transparency: looked up through its palette.
      * 'I;16', 'I;16B', 'I;16L' (16-bit gray PNG/TIFF): value / 257 rounded, so 65535 -> 255.
        'I' (32-bit int) with values in 0..65535 is treated as 16-bit; other ranges -> ValueError.
        Note: Pillow itself reduces 16-bit *RGB* PNGs to 8 bits when opening them.
      * 'F' (float gray): must lie in [0, 1]; x 255 rounded.
      * 'CMYK', 'YCbCr', 'LAB', 'HSV', ...: Pillow's `convert("RGB")` (no ICC colour management).
    Arrays: uint8 as is; bool -> 0/255; uint16 / 257; other integer types: read as 8-bit when
    all values fit 0..255, as 16-bit (/ 257) up to 65535, else ValueError; floats must be in
    [0, 1]. Shapes HxW, HxWx1 (gray), HxWx2 (gray+alpha), HxWx3, HxWx4 (RGBA), optionally with a
    leading batch of 1.
    Paths: see `open_image` (FileNotFoundError / ValueError naming `what` and the path).
    """
    if isinstance(src, np.ndarray):
        rgb, alpha = _split_array(src, what)
    else:
        rgb, alpha = _pil_to_rgb_alpha(open_image(src, what=what), what)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"{what} has zero size {rgb.shape[:2]}")
    if matte is not None and alpha is not None:
        a = alpha[..., None].astype(np.float64) / 255.0
        rgb = np.round(rgb * a + np.asarray(matte, np.float64) * (1.0 - a)).astype(np.uint8)
    return np.ascontiguousarray(rgb), alpha


# --- resizing --------------------------------------------------------------------------------------

def resize_float(x: np.ndarray, size: tuple[int, int], resample=Image.BICUBIC) -> np.ndarray:
    """Resize an HxWxC float array to `size` = (h, w) channel by channel in Pillow's float mode.

    Pillow's BICUBIC is Keys a = -0.5 with an antialiasing support that widens by the scale
    when downsampling, taps at (i + 0.5) * scale, weights normalised: the same filter as torch's
    `F.interpolate(bicubic, antialias=True)` (torch copied it from Pillow). Pillow accumulates in
    double precision and torch in float32, so results agree to ~2e-5 on [-1, 1] data. Float mode
    keeps values unclipped and unquantised, as the authors' resize of a float tensor does.
    """
    h, w = size
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c], np.float32)).resize((w, h), resample))
             for c in range(x.shape[-1])]
    return np.stack(chans, axis=-1).astype(np.float32)


def _apply_matrices(x: np.ndarray, mh: np.ndarray, mw: np.ndarray) -> np.ndarray:
    """(B, h, w, C) -> (B, H, W, C) with separable 1-D matrices, accumulated in float64 (torch:
    float32, so results agree to float32 rounding), returned float32."""
    y = np.einsum("pw,bhwc->bhpc", mw.astype(np.float64), np.asarray(x, np.float64))
    return np.einsum("oh,bhpc->bopc", mh.astype(np.float64), y).astype(np.float32)


def squash_to(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Host twin of `cdv2.modules.resize.resize_bicubic` (torch bicubic, A = -0.75, align_corners
    False, no antialias; the authors' `warp_resize`) for (B, h, w, C) arrays: same weight matrices,
    applied in numpy so a new input size compiles nothing."""
    from cdv2.modules.resize import bicubic_matrix

    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return np.asarray(x, np.float32)  # torch's bicubic at scale 1 is the identity
    return _apply_matrices(x, bicubic_matrix(h, size[0]), bicubic_matrix(w, size[1]))


def squash_for_clip(x: np.ndarray, image_size: int = 224) -> np.ndarray:
    """Host twin of CLIP's squash (`cdv2.modules.clip.preprocess_for_clip` before normalisation):
    torch bicubic with antialias, align_corners=True, to image_size^2, for (B, h, w, C) arrays."""
    from cdv2.modules.resize import _bicubic_aa_matrix  # the torch-float32-exact weights

    h, w = x.shape[1:3]
    return _apply_matrices(x, _bicubic_aa_matrix(h, image_size, True), _bicubic_aa_matrix(w, image_size, True))


# --- sketch ----------------------------------------------------------------------------------------

def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114  # ITU-R 601, as PIL "L"


def detect_sketch_polarity(rgb: np.ndarray) -> str:
    """"black_on_white" or "white_on_black" for an 8-bit drawing, decided by its background.

    A line drawing is mostly background, and the background reaches the image border. So: take
    the median luma of the outermost ring of pixels (2% of the size, at least 1 px). If it is
    clearly bright (>= 192) or dark (< 64) that decides; if it is mid-grey (a framed or tinted
    border) use the median luma of the whole image instead. Bright (>= 128) -> black on white.
    """
    y = luma(rgb.astype(np.float64))
    h, w = y.shape
    bh, bw = max(1, round(0.02 * h)), max(1, round(0.02 * w))
    ring = np.ones((h, w), bool)
    ring[bh:h - bh, bw:w - bw] = False
    med = float(np.median(y[ring]))
    if 64.0 <= med < 192.0:
        med = float(np.median(y))
    return "black_on_white" if med >= 128.0 else "white_on_black"


def fit_and_pad(x: np.ndarray, target_hw: tuple[int, int], pad_value: float = -1.0) -> tuple[np.ndarray, Box]:
    """The authors' aspect-preserving fit: r = min(H/h, W/w), resize to (int(h r), int(w r)) with
    antialiased bicubic (`resize_float`), centre-pad to (H, W) with `pad_value`.
    Returns ((H, W, C) array, (top, left, height, width) of the content)."""
    h, w = x.shape[:2]
    th, tw = target_hw
    r = min(th / h, tw / w)
    nh, nw = int(h * r), int(w * r)
    if nh < 1 or nw < 1:
        raise ValueError(f"image of {h}x{w} px cannot be fitted into {th}x{tw}: it would be {nh}x{nw} px")
    if (nh, nw) != (h, w):
        x = resize_float(x, (nh, nw))
    top, left = (th - nh) // 2, (tw - nw) // 2
    out = np.full((th, tw, x.shape[-1]), pad_value, np.float32)
    out[top:top + nh, left:left + nw] = x
    return out, (top, left, nh, nw)


def prepare_sketch(img: ImageInput, target_hw: tuple[int, int],
                   polarity: str = "auto") -> tuple[np.ndarray, Box]:
    """Sketch -> model input (1, H, W, 3) in model polarity (lines ~ +1, background -1), and its box.

    polarity:
      * "black_on_white": the authors' default "invert" preprocessor, x = -(2 v/255 - 1).
      * "white_on_black": the authors' "none" (already inverted input), x = 2 v/255 - 1.
      * "auto": `detect_sketch_polarity` (border / median brightness) picks one of the two.
    A transparent sketch (lines on an empty alpha) is first composited over white for
    "black_on_white"/"auto" and over black for "white_on_black", so transparency reads as
    background. Then `fit_and_pad` to `target_hw` with -1 padding (ARCHITECTURE.md §4.1).
    The returned box (top, left, height, width) lets `crop_to_box` cut the output back.
    """
    if polarity not in ("auto", "black_on_white", "white_on_black"):
        raise ValueError(f"sketch polarity must be 'auto', 'black_on_white' or 'white_on_black', got {polarity!r}")
    matte = (0, 0, 0) if polarity == "white_on_black" else (255, 255, 255)
    rgb, _ = load_image(img, what="sketch", matte=matte)
    if polarity == "auto":
        polarity = detect_sketch_polarity(rgb)
    v = rgb.astype(np.float32) * (2.0 / 255.0) - 1.0  # to_tensor + Normalize(0.5, 0.5)
    if polarity == "black_on_white":
        v = -v
    x, box = fit_and_pad(v, target_hw, pad_value=-1.0)
    return x[None], box


def empty_sketch(target_hw: tuple[int, int]) -> np.ndarray:
    """The authors' stand-in when no sketch is given: -ones (1, H, W, 3)."""
    return np.full((1, *target_hw, 3), -1.0, np.float32)


def choose_generation_size(sketch_hw: tuple[int, int], target_long_side: int = 768, multiple: int = 64,
                           min_side: int = 256, min_input_side: int = MIN_SKETCH_SIDE) -> tuple[int, int]:
    """(H, W) to generate at for a sketch of `sketch_hw`: both multiples of `multiple` (64: the
    8x VAE and the U-Net's three 2x downsamplings are then exact), the long side =
    `target_long_side` rounded to a multiple, the short side the multiple nearest to the sketch's
    aspect, but never below `min_side` (rounded up to a multiple). Unless that floor applies, the
    aspect error is at most half a multiple on the short side: |S - s*L/l| <= multiple/2.
    The sketch is then fitted and padded into (H, W) by `prepare_sketch`.
    Sketches smaller than `min_input_side` px on a side -> ValueError.
    """
    h, w = (int(v) for v in sketch_hw)
    if min(h, w) < min_input_side:
        raise ValueError(f"sketch is {h}x{w} px (height x width); at least {min_input_side} px per side is needed")
    if multiple <= 0 or multiple % 8:
        raise ValueError(f"multiple must be a positive multiple of 8 (the VAE factor), got {multiple}")
    long_side = max(multiple, int(round(target_long_side / multiple)) * multiple)
    floor = min(long_side, max(multiple, -(-min_side // multiple) * multiple))
    short = max(floor, min(long_side, int(round(long_side * min(h, w) / max(h, w) / multiple)) * multiple))
    return (long_side, short) if h >= w else (short, long_side)


# --- reference / background ------------------------------------------------------------------------

def prepare_reference(img: ImageInput, *, what: str = "reference", pad_scale: float = 1.0,
                      matte: tuple[int, int, int] | None = (255, 255, 255)
                      ) -> tuple[np.ndarray, tuple[int, int]]:
    """Reference -> ((1, h, w, 3) in [-1, 1] at its own resolution, (h, w) for the size embedding).

    `to_tensor` + Normalize(0.5, 0.5): x = 2 v/255 - 1. With `pad_scale` > 1 the width is first
    padded to int(w * pad_scale) with white, centred (the UI's "Reference padding scale").
    Transparent pixels are composited over `matte` (white by default: the authors' UI instead drops
    alpha and shows whatever colour is stored there, often black; pass matte=None for that).
    """
    rgb, _ = load_image(img, what=what, matte=matte)
    if pad_scale > 1.0:
        h, w = rgb.shape[:2]
        nw = int(w * pad_scale)
        canvas = np.full((h, nw, 3), 255, np.uint8)
        left = (nw - w) // 2
        canvas[:, left:left + w] = rgb
        rgb = canvas
    x = rgb.astype(np.float32) * (2.0 / 255.0) - 1.0
    return x[None], (int(x.shape[0]), int(x.shape[1]))


def prepare_background(img: ImageInput, *, pad_scale: float = 1.0,
                       matte: tuple[int, int, int] | None = (255, 255, 255)
                       ) -> tuple[np.ndarray, tuple[int, int]]:
    """Background image: exactly as `prepare_reference`."""
    return prepare_reference(img, what="background", pad_scale=pad_scale, matte=matte)


# --- output ----------------------------------------------------------------------------------------

def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8: clip, then round((x + 1) * 127.5). (The authors truncate instead of
    rounding, which makes their images up to one level darker.)"""
    x = np.asarray(x, np.float32)
    return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def to_pil(x: np.ndarray) -> list[Image.Image]:
    """(B, H, W, 3) or (B, H, W, 1) in [-1, 1] -> list of B PIL images ('RGB' or 'L')."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"to_pil expects NHWC with 1 or 3 channels, got {x.shape}")
    u = to_uint8(x)
    return [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in u]


def crop_to_box(x, box: Box):
    """Cut the content box (top, left, height, width) out of an NHWC array, a PIL image or a list
    of PIL images, returning the same kind."""
    top, left, h, w = (int(v) for v in box)
    if isinstance(x, Image.Image):
        return x.crop((left, top, left + w, top + h))
    if isinstance(x, (list, tuple)):
        return [crop_to_box(im, box) for im in x]
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"crop_to_box expects an NHWC array, a PIL image or a list of them, got shape {x.shape}")
    if top < 0 or left < 0 or top + h > x.shape[1] or left + w > x.shape[2]:
        raise ValueError(f"box {box} does not fit in an image of {x.shape[1]}x{x.shape[2]}")
    return x[:, top:top + h, left:left + w]


__all__ = [
    "Box", "ImageInput", "MIN_SKETCH_SIDE", "open_image", "load_image", "resize_float", "squash_to", "squash_for_clip",
    "detect_sketch_polarity",
    "fit_and_pad", "prepare_sketch", "empty_sketch", "choose_generation_size", "prepare_reference",
    "prepare_background", "to_uint8", "to_pil", "crop_to_box",
]
