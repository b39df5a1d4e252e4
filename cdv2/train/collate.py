"""Per-batch training collate of the authors' QuartLoader (spec §6.5, original:
data/dataloader.py `CustomCollateFn.training_preprocess`, data/preprocessing.py).

For one batch: one aspect bucket (ch, cw) drawn uniformly from the crop list; per sample:
* color, sketch and sketch mask: resize the shorter side to L ~ U{max(ch, cw) .. max_load - 1}
  (Pillow bicubic, as torchvision's resize on PIL images) and crop the same (top, left, ch, cw);
* sketch only: border blanking (c ~ U{0..center_crop_max}; blank c rows top+bottom, or c columns
  left+right, or c rows and c2 ~ U{0..center_crop_max2} columns, or nothing), blanks are white;
* reference: the full color image squashed to reference_size² (bicubic); its mask the same, then
  `mask_expansion` (block max-pool, broadcast back, trailing remainder rows/cols 0);
* normalisation: image/reference x/127.5 - 1, sketch inverted 1 - x/127.5 (lines +1 on -1),
  masks x/255.

Deliberate difference: the authors draw L and (top, left) once per batch and draw top/left only
within [0, L - c] even when the long side is longer (tall/wide images never crop their far end);
here L and the crop are drawn per sample over the whole resized image. The bucket stays per batch.

Small configs: `CollateConfig.for_resolution(r, multiple)` scales every size by s = r / 768:
bucket sides are rounded to a multiple of `multiple` (64 keeps the latent divisible by the
UNet's 8x downsampling; 768 and 64 give the authors' list exactly), max_load = round(1024 s),
reference_size = round(1024 s) to a multiple of 8, the blanking maxima round(200 s) and
round(100 s), and the mask-expansion kernel round((60, 40) * reference_size / 1024).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image

# (h, w); squares are 40% of the list, as in the v2 training config.
AUTHORS_BUCKETS = ((768, 768),) * 4 + (
    (704, 832), (832, 704), (896, 640), (640, 896), (960, 576), (576, 960))


@dataclasses.dataclass(frozen=True)
class CollateConfig:
    buckets: tuple[tuple[int, int], ...] = AUTHORS_BUCKETS
    max_load: int = 1024                 # L < max_load (numpy-style exclusive bound, as the authors)
    reference_size: int = 1024
    center_crop_max: int = 200
    center_crop_max2: int = 100
    mask_expansion_size: tuple[int, int] | None = (60, 40)   # None: no expansion

    @classmethod
    def for_resolution(cls, resolution: int = 768, multiple: int = 64) -> "CollateConfig":
        s = resolution / 768

        def snap(x: float, m: int) -> int:
            return max(m, int(round(x * s / m)) * m)

        ref = snap(1024, 8)
        return cls(
            buckets=tuple((snap(h, multiple), snap(w, multiple)) for h, w in AUTHORS_BUCKETS),
            max_load=int(round(1024 * s)),
            reference_size=ref,
            center_crop_max=int(round(200 * s)),
            center_crop_max2=int(round(100 * s)),
            mask_expansion_size=(max(1, round(60 * ref / 1024)), max(1, round(40 * ref / 1024))),
        )


def mask_expansion(mask: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """Max over each (grid_h, grid_w) block, broadcast back over the block; rows/cols past the last
    whole block are 0 (torch max_pool2d floor mode + conv_transpose2d with ones, output_padding)."""
    h, w = mask.shape[:2]
    nh, nw = h // grid_h, w // grid_w
    out = np.zeros_like(mask)
    if nh and nw:
        blocks = mask[: nh * grid_h, : nw * grid_w].reshape(nh, grid_h, nw, grid_w, *mask.shape[2:])
        pooled = blocks.max(axis=(1, 3))
        out[: nh * grid_h, : nw * grid_w] = np.repeat(np.repeat(pooled, grid_h, 0), grid_w, 1)
    return out


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """torchvision `resize(img, [size])`: shorter side -> size, longer side int(size*long/short)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return img.resize((new_w, new_h), Image.BICUBIC)


def blank_sketch_border(sketch: np.ndarray, rng: np.random.Generator, cmax: int, cmax2: int):
    """The authors' `center_crop_max` outpainting aid, in place on a uint8 HWC sketch (255 = white).
    Returns (option, c, c2) for inspection."""
    h, w = sketch.shape[:2]
    c = int(rng.integers(0, cmax + 1))
    option = int(rng.integers(4))
    c2 = int(rng.integers(0, cmax2 + 1)) if option == 2 else 0
    rows = c if option in (0, 2) else 0
    cols = c if option == 1 else c2
    rows, cols = min(rows, h // 2), min(cols, w // 2)
    if rows:
        sketch[:rows], sketch[h - rows:] = 255, 255
    if cols:
        sketch[:, :cols], sketch[:, w - cols:] = 255, 255
    return option, c, c2


def preprocess_sample(sample: dict, bucket: tuple[int, int], rng: np.random.Generator,
                      cfg: CollateConfig) -> dict:
    """One decoded sample (uint8 `color` HxWx3, `sketch` HxWx3, `mask` HxW) -> float32 arrays."""
    ch, cw = bucket
    lo = max(ch, cw)
    load = int(rng.integers(lo, cfg.max_load)) if cfg.max_load > lo else lo
    color, sketch, mask = (Image.fromarray(sample[k]) for k in ("color", "sketch", "mask"))
    h, w = sample["color"].shape[:2]

    crops = []
    for img in (color, sketch, mask):
        crops.append(np.asarray(resize_shorter_side(img, load)))
    rh, rw = crops[0].shape[:2]
    top, left = int(rng.integers(0, rh - ch + 1)), int(rng.integers(0, rw - cw + 1))
    gt, sk, sm = (a[top:top + ch, left:left + cw] for a in crops)
    sk = np.array(sk)                                     # writable copy for the blanking
    blank_sketch_border(sk, rng, cfg.center_crop_max, cfg.center_crop_max2)

    r = cfg.reference_size
    ref = np.asarray(color.resize((r, r), Image.BICUBIC))
    rmask = np.asarray(mask.resize((r, r), Image.BICUBIC), np.float32)[..., None] / 255.0
    if cfg.mask_expansion_size is not None:
        rmask = mask_expansion(rmask, *cfg.mask_expansion_size)
    return {
        "image": gt.astype(np.float32) / 127.5 - 1.0,
        "sketch": 1.0 - sk.astype(np.float32) / 127.5,
        "reference": ref.astype(np.float32) / 127.5 - 1.0,
        "smask": sm.astype(np.float32)[..., None] / 255.0,
        "rmask": rmask,
        "size": np.array([h, w], np.float32),
    }


def collate_batch(samples: Sequence[dict], batch_rng: np.random.Generator,
                  sample_rngs: Sequence[np.random.Generator], cfg: CollateConfig) -> dict:
    """Stack preprocessed samples of one bucket (drawn from `batch_rng`) into NHWC float32 arrays."""
    bucket = cfg.buckets[int(batch_rng.integers(len(cfg.buckets)))]
    items = [preprocess_sample(s, bucket, r, cfg) for s, r in zip(samples, sample_rngs)]
    return {k: np.stack([it[k] for it in items]) for k in items[0]}
