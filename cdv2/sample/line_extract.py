"""The app's line extractors and sketch preprocessors (`backend/functool.py`, `preprocessor/*.py`).

`LineExtractor(name, variables)` runs one of the four networks (jitted, batched NHWC, one compile
per input size, fp32 or bf16 compute) and its app wrapper `proceed` (the exact input conversion and
output post-processing). `preprocess_sketch` is the app's sketch preprocessing: "none", "invert"
(the UI default), "invert-webui" (lineart_standard, no network) or "extract" (a line extractor on the
sketch resized to 512x512), then the aspect-preserving antialiased-bicubic fit and -1 padding.
Outputs use the sketch convention: lines ~ +1 on a -1 background, float32 NHWC.
"""
from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from PIL import Image

from cdv2.config import CONFIG_DIR
from cdv2.modules.resize import resize_bicubic_antialias
from cdv2.sample.gaussian_blur import gaussian_blur
from cdv2.sample.preprocess import Box, ImageInput, load_image

# app name -> (module with the Flax class, class name, key-map module, released file name)
EXTRACTORS = {
    "lineart_keras": ("sketch_keras", "SketchKeras", "model.pth"),
    "lineart": ("anime2sketch", "UnetGenerator", "netG.pth"),
    "lineart_denoise": ("manga_lines", "ResSkip", "erika.pth"),
    "lineart_sk": ("lineart_sk", "LineartGenerator", "sk_model.pth"),
}
DEFAULT_EXTRACTOR = "lineart_keras"
SKETCH_METHODS = ("none", "invert", "invert-webui", "extract")
EXTRACT_SIZE = 512          # the app resizes the sketch to 512x512 (aspect not kept) before extracting
KERAS_THRESHOLD = 0.1       # SketchKeras postprocess threshold used by `proceed`


def _check_name(name: str) -> None:
    if name not in EXTRACTORS:
        raise ValueError(f"unknown line extractor {name!r}; choose one of {sorted(EXTRACTORS)}")


def load_extractor_config(name: str, **overrides) -> dict:
    """The real-size config of a line extractor (configs/preprocessors/<name>.yaml) with overrides."""
    _check_name(name)
    cfg = yaml.safe_load((Path(CONFIG_DIR) / "preprocessors" / f"{name}.yaml").read_text()) or {}
    cfg.update(overrides)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def build_network(name: str, config: Mapping | None = None, dtype=jnp.float32):
    """The Flax module of extractor `name` (real size unless `config` says otherwise)."""
    _check_name(name)
    mod, cls, _ = EXTRACTORS[name]
    cfg = load_extractor_config(name) if config is None else {k: tuple(v) if isinstance(v, list) else v
                                                               for k, v in config.items()}
    return getattr(importlib.import_module(f"cdv2.modules.preprocess_nets.{mod}"), cls)(**cfg, dtype=dtype)


def keymap(name: str):
    """The key-map module (`torch_keys`, `convert`, `infer_config`) of extractor `name`."""
    _check_name(name)
    return importlib.import_module(f"cdv2.weights.keymaps.{EXTRACTORS[name][0]}")


@functools.partial(jax.jit, static_argnums=0)
def _run(module, variables, x):
    return module.apply(variables, x).astype(jnp.float32)


# --- the app's tensor conventions (exact float32 arithmetic of ToTensor / Normalize) --------------

def to_tensor(rgb: np.ndarray) -> np.ndarray:
    """`to_tensor(pil)`: ToTensor (uint8 / 255) then Normalize(0.5, 0.5); (1, H, W, C) float32."""
    x = np.asarray(rgb).astype(np.float32) / np.float32(255)
    return ((x - np.float32(0.5)) / np.float32(0.5))[None]


def keras_input(rgb: np.ndarray) -> np.ndarray:
    """SketchKeras' high-pass: (img - blur(img, 3)) / 127.5 / global max; each colour channel
    becomes a batch item with one channel -> (3, H, W, 1)."""
    hp = (rgb.astype(np.int64) - gaussian_blur(rgb, 3.0).astype(np.int64)).astype(np.float32) / np.float32(127.5)
    peak = hp.max()
    if peak > 0:  # a flat image has no high-pass; the app would divide by 0 (NaN)
        hp /= peak
    return np.ascontiguousarray(hp.transpose(2, 0, 1)[..., None])


def keras_postprocess(pred: np.ndarray, thresh: float = KERAS_THRESHOLD) -> np.ndarray:
    """`postprocess(pred, thresh)`: max over the channel batch, zero below thresh, (v - 0.5) * 2."""
    p = np.asarray(pred, np.float32).max(axis=0)                 # (H, W, 1)
    p = np.where(p < np.float32(thresh), np.float32(0), p)
    return ((p - np.float32(0.5)) * np.float32(2))[None]


def lineart_standard(rgb: np.ndarray) -> np.ndarray:
    """The app's "invert-webui": white lines from a difference of Gaussians, as to_tensor (1, H, W, 3)."""
    x = np.asarray(rgb).astype(np.float32)
    g = gaussian_blur(x, 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong))) if strong.size else 16.0
    intensity *= 127
    gray = intensity.clip(0, 255).astype(np.uint8)
    return to_tensor(np.repeat(gray[..., None], 3, axis=2))


def _rgb(image: ImageInput) -> np.ndarray:
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return image
    return load_image(image, what="sketch", matte=(255, 255, 255))[0]


class LineExtractor:
    """One of the app's line networks with converted weights `variables` ({'params', 'batch_stats'?})."""

    def __init__(self, name: str, variables: Mapping, config: Mapping | None = None, dtype=jnp.float32):
        self.name = name
        self.config = load_extractor_config(name) if config is None else dict(config)
        self.module = build_network(name, self.config, dtype)
        self.variables = jax.tree_util.tree_map(jnp.asarray, dict(variables))

    @classmethod
    def from_state_dict(cls, name: str, state: Mapping[str, np.ndarray], config: Mapping | None = None,
                        dtype=jnp.float32) -> "LineExtractor":
        """From a torch state dict in the released key format (widths inferred when no config)."""
        km = keymap(name)
        config = km.infer_config(state) if config is None else config
        return cls(name, km.convert(state, config), config, dtype)

    def net(self, x) -> jnp.ndarray:
        """The raw network on a batch (B, H, W, C) float32 -> (B, H, W, 1) float32 (jitted)."""
        return _run(self.module, self.variables, jnp.asarray(x, jnp.float32))

    def proceed(self, image: ImageInput) -> np.ndarray:
        """The app's `extractor.proceed(pil)`: (1, H, W, 3) float32, lines ~ +1 on -1."""
        rgb = _rgb(image)
        if self.name == "lineart_keras":
            return np.repeat(keras_postprocess(np.asarray(self.net(keras_input(rgb)))), 3, axis=-1)
        if self.name == "lineart":
            x = to_tensor(rgb)
        elif self.name == "lineart_denoise":   # ToTensor()(img)[:, 0] * 255: the red channel, 0..255
            x = (rgb[..., :1].astype(np.float32) / np.float32(255) * np.float32(255))[None]
        else:                                   # lineart_sk: pil_to_tensor().float(), no normalisation
            x = rgb.astype(np.float32)[None]
        return -np.repeat(np.asarray(self.net(x)), 3, axis=-1)


def fit_and_pad_tensor(s: np.ndarray, src_hw: tuple[int, int], resolution: tuple[int, int]) -> tuple[np.ndarray, Box]:
    """`pad_image(resize((int(h*r), int(w*r)))(s), th, tw)` with r = min(th/h, tw/w) from the
    ORIGINAL sketch size: torch bicubic with antialias on the tensor, centred on a -1 canvas."""
    h, w = src_hw
    th, tw = resolution
    r = min(th / h, tw / w)
    nh, nw = int(h * r), int(w * r)
    if nh < 1 or nw < 1:
        raise ValueError(f"a {h}x{w} sketch cannot be fitted into {th}x{tw}: it would be {nh}x{nw} px")
    if s.shape[1:3] != (nh, nw):                # torchvision returns the input at the same size
        s = np.asarray(resize_bicubic_antialias(jnp.asarray(s), (nh, nw)))
    top, left = (th - nh) // 2, (tw - nw) // 2
    out = np.full((s.shape[0], th, tw, s.shape[-1]), -1.0, np.float32)
    out[:, top:top + nh, left:left + nw] = s
    return out, (top, left, nh, nw)


def preprocess_sketch(image: ImageInput, resolution: tuple[int, int], method: str = "none",
                      extractor: LineExtractor | str | None = DEFAULT_EXTRACTOR, params: Mapping | None = None,
                      dtype: Any = jnp.float32) -> tuple[np.ndarray, Box, np.ndarray]:
    """The app's `preprocess_sketch(sketch, (th, tw), preprocess, extractor)`.

    Returns (sketch (1, th, tw, 3), box (top, left, height, width) of the content, white_sketch =
    -sketch). `extractor` (for "extract") is a `LineExtractor`, or an extractor name with its
    converted `params`."""
    if method not in SKETCH_METHODS:
        raise ValueError(f"sketch preprocessor must be one of {SKETCH_METHODS}, got {method!r}")
    rgb = _rgb(image)
    if method == "none":
        s = to_tensor(rgb)
    elif method == "invert":
        s = -to_tensor(rgb)
    elif method == "invert-webui":
        s = lineart_standard(rgb)
    else:
        if isinstance(extractor, str):
            if params is None:
                raise ValueError(f"sketch preprocessor 'extract' with {extractor!r} needs its converted params "
                                 f"(cdv2 convert --preprocessor {extractor} ...)")
            extractor = LineExtractor(extractor, params, dtype=dtype)
        if extractor is None:
            raise ValueError("sketch preprocessor 'extract' needs a line extractor")
        small = Image.fromarray(rgb).resize((EXTRACT_SIZE, EXTRACT_SIZE), Image.BICUBIC)  # PIL bicubic
        s = extractor.proceed(np.asarray(small))
    sketch, box = fit_and_pad_tensor(s, rgb.shape[:2], resolution)
    return sketch, box, -sketch
