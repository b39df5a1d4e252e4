"""The app's mask networks with its exact wrappers: ISNet / ISNet-sketch and rmbg-v2 (BiRefNet).

All images are NHWC float arrays in [-1, 1] (the app's `to_tensor` convention); masks come back as
(B, H, W, 1) in [0, 1]. The `threshold` the app passes is unused inside both wrappers (it only
selects pixels afterwards), so it is not a parameter here. Each network runs through one jitted
function cached per input shape, so the pre/post-processing variants (dilate or not) share one
compile of the network at the working size (1024 x 1024 in the app).

`ISNetDIS.proceed` (preprocessor/anime_segment.py) and `rmbg_proceed` (preprocessor/__init__.py)
are followed step by step; see ../shared/oracle/preprocessors/FIXTURES.md "Calling convention".
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cdv2.modules.preprocess_nets.birefnet import BiRefNet, BiRefNetConfig
from cdv2.modules.preprocess_nets.isnet import ISNetConfig, ISNetDIS
from cdv2.modules.preprocess_nets.ops import max_pool_same, resize_bicubic_f32, resize_bilinear_antialias

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- the networks, jitted and batched ------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def isnet_mask(variables, image: jnp.ndarray, config: ISNetConfig = ISNetConfig(), dtype: Any = jnp.float32):
    """ISNetDIS forward: (B, H, W, 3) network input -> sigmoid mask (B, H, W, 1), fp32."""
    return ISNetDIS(config, dtype=dtype).apply(variables, image)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def birefnet_logits(variables, image: jnp.ndarray, config: BiRefNetConfig = BiRefNetConfig(), dtype: Any = jnp.float32):
    """BiRefNet forward: ImageNet-normalised (B, H, W, 3), H, W multiples of 32 -> (m4, m3, m2, p1)
    logits, fp32; the app uses sigmoid(p1)."""
    return BiRefNet(config, dtype=dtype).apply(variables, image)


def _check_image(x, name: str):
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected an NHWC image batch (B, H, W, 3), got shape {tuple(x.shape)}")


def _finish(mask, th: int, tw: int, dilate: bool, dilate_kernel: int):
    """bicubic to (th, tw), clamp(0, 1), optional 11x11 max-pool dilation (ISNet.proceed's tail)."""
    mask = jnp.clip(resize_bicubic_f32(mask, (th, tw)), 0.0, 1.0)
    return max_pool_same(mask, dilate_kernel) if dilate else mask


# --- ISNetDIS.proceed -------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("s",))
def _isnet_crop_canvas(x, s: int):
    """Resize by s/max(h, w) (bicubic with that scale_factor), paste centred on a -1 canvas, then
    invert (1 - (c+1)/2: white -> 0, padding -> 1)."""
    b, h, w, c = x.shape
    scale = s / max(h, w)
    nh, nw = int(h * scale), int(w * scale)
    x = resize_bicubic_f32(x.astype(jnp.float32), (nh, nw), scale_factor=scale)
    ph, pw = (s - nh) // 2, (s - nw) // 2
    canvas = jnp.full((b, s, s, c), -1.0, jnp.float32).at[:, ph:ph + nh, pw:pw + nw].set(x)
    return 1.0 - (canvas + 1.0) / 2.0


@functools.partial(jax.jit, static_argnames=("s",))
def _stretch(x, s: int):
    return resize_bicubic_f32(x, (s, s))


@functools.partial(jax.jit, static_argnames=("box", "th", "tw", "dilate", "dilate_kernel"))
def _isnet_post(mask, box, th, tw, dilate, dilate_kernel):
    ph, pw, nh, nw = box
    return _finish(mask[:, ph:ph + nh, pw:pw + nw], th, tw, dilate, dilate_kernel)


def isnet_proceed(variables, x, config: ISNetConfig = ISNetConfig(), th: int | None = None, tw: int | None = None,
                  s: int = 1024, dilate: bool = False, crop: bool = True, dilate_kernel: int = 11,
                  dtype: Any = jnp.float32) -> jnp.ndarray:
    """`ISNetDIS.proceed(x, th, tw, s, dilate, crop)`; x (B, H, W, 3) in [-1, 1] -> (B, th, tw, 1).

    crop=True (reference/result masks): letterbox onto an s x s canvas, inverted, mask cropped back.
    crop=False (the sketch mask): bicubic-stretch to s x s, fed as is (not inverted)."""
    x = jnp.asarray(x, jnp.float32)
    _check_image(x, "isnet_proceed")
    b, h, w, _ = x.shape
    th, tw = th or h, tw or w
    if crop:
        scale = s / max(h, w)
        nh, nw = int(h * scale), int(w * scale)
        mask = isnet_mask(variables, _isnet_crop_canvas(x, s), config, dtype)
        box = ((s - nh) // 2, (s - nw) // 2, nh, nw)
    else:
        mask = isnet_mask(variables, _stretch(x, s), config, dtype)
        box = (0, 0, s, s)
    return _isnet_post(mask, box, th, tw, dilate, dilate_kernel)


# --- rmbg_proceed (RMBG-2.0) ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("size",))
def _rmbg_pre(x, size: int):
    x = resize_bilinear_antialias((x.astype(jnp.float32) + 1.0) / 2.0, (size, size))  # torchvision resize
    return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


@functools.partial(jax.jit, static_argnames=("h", "w", "th", "tw", "dilate", "dilate_kernel"))
def _rmbg_post(logits, h, w, th, tw, dilate, dilate_kernel):
    x = resize_bilinear_antialias(jax.nn.sigmoid(logits), (h, w))
    if th and tw:  # torchvision pad([a, b]) pads W by a and H by b: the app passes a=(th-h)//2
        a, bb = (th - h) // 2, (tw - w) // 2
        x = jnp.pad(x, ((0, 0), (bb, bb), (a, a), (0, 0)))
    if dilate:
        x = max_pool_same(x, dilate_kernel)
    return jnp.clip(x, 0.0, 1.0)


def rmbg_proceed(variables, x, config: BiRefNetConfig = BiRefNetConfig(), th: int | None = None,
                 tw: int | None = None, dilate: bool = False, size: int = 1024, dilate_kernel: int = 11,
                 dtype: Any = jnp.float32) -> jnp.ndarray:
    """`rmbg_proceed(x, th, tw, dilate)`; x (B, H, W, 3) in [-1, 1] -> (B, H, W, 1) mask.

    The app's file at the fixture commit dilates with an 11x11 max-pool (a later commit uses 21)."""
    x = jnp.asarray(x, jnp.float32)
    _check_image(x, "rmbg_proceed")
    h, w = x.shape[1:3]
    logits = birefnet_logits(variables, _rmbg_pre(x, size), config, dtype)[-1]
    return _rmbg_post(logits, h, w, th, tw, dilate, dilate_kernel)


# --- loading ---------------------------------------------------------------------------------------------
def load_state(path: str | Path) -> dict[str, np.ndarray]:
    """A safetensors file as numpy, floats as fp32 (int buffers unchanged)."""
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in load_file(str(path)).items()}


@dataclasses.dataclass(frozen=True)
class MaskNet:
    """A loaded mask network with the app's `proceed` (kind: "isnet" or "rmbg")."""

    kind: str
    variables: Any
    config: Any
    dtype: Any = jnp.float32

    def proceed(self, x, th=None, tw=None, dilate=False, **kwargs):
        fn = isnet_proceed if self.kind == "isnet" else rmbg_proceed
        return fn(self.variables, x, self.config, th=th, tw=tw, dilate=dilate, dtype=self.dtype, **kwargs)


def load_isnet(path: str | Path, dtype: Any = jnp.float32) -> MaskNet:
    """`isnetis.safetensors` / `sketch-segment.safetensors` (widths read from the file)."""
    from cdv2.weights.keymaps import isnet as km

    state = load_state(path)
    config = km.infer_config(state)
    return MaskNet("isnet", km.convert(state, config), config, dtype)


def load_rmbg(path: str | Path, dtype: Any = jnp.float32) -> MaskNet:
    """RMBG-2.0 `model.safetensors` (BiRefNet + Swin; widths read from the file)."""
    from cdv2.weights.keymaps import birefnet as km

    state = load_state(path)
    config = km.infer_config(state)
    return MaskNet("rmbg", km.convert(state, config), config, dtype)
