"""The ONE conditioning builder shared by inference (`cdv2.sample.conditions`) and training
(`cdv2.train.objective`): CLIP tokens, VAE latents (posterior mean or sample), size ratios and
embedding, sketch hints, the background and style encoders, the split-attention context and the
latent sketch mask (ARCHITECTURE.md §3.9, §4.2-4.3, §6.2).

Everything here is a pure function of (components, params, arrays), so training cannot re-derive
differently what inference does. Host-side (numpy) helpers that must equal their in-graph
counterparts live here too (`size_ratios` works on numpy and JAX arrays alike).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cdv2.model import Components
from cdv2.modules.clip import CLIP_MEAN, CLIP_STD, preprocess_for_clip
from cdv2.modules.encoders import size_embedding
from cdv2.modules.resize import resize_bicubic
from cdv2.modules.vae import AutoencoderKL


# --- size embedding -------------------------------------------------------------------------------

def size_ratios(source_hw, target_hw):
    """The authors' `get_size_embedding` ratios (rh, rw) of a source (reference or background) of
    pixel size `source_hw` for a generation of `target_hw` = (H, W). A source smaller than the
    target in either side gets their "bias": its height grown by max(H, W), aspect kept.

    `source_hw`: a pair (-> numpy (2,) float32) or a (B, 2) array (numpy or JAX -> (B, 2))."""
    xp = jnp if isinstance(source_hw, jax.Array) else np
    s = xp.asarray(source_hw, xp.float32 if xp is jnp else np.float64)  # host: float64 like their python floats
    oh, ow = s[..., 0], s[..., 1]
    h, w = target_hw
    small = (oh < h) | (ow < w)
    ih = xp.where(small, oh + max(h, w), oh)
    iw = xp.where(small, ow / oh * ih, ow)
    return xp.stack([ih / h, iw / w], axis=-1).astype(xp.float32)


def size_condition(comps: Components, ratios):
    """y = [emb(rh) | emb(rw)] for the bg/style encoders' label embedding, from (B, 2) ratios."""
    return size_embedding(ratios, comps.bg_encoder.config.adm_in_channels // 2)


# --- frozen encoders ------------------------------------------------------------------------------

def normalize_for_clip(squashed):
    """A [-1, 1] image already squashed to the CLIP input size -> the tower's normalised input."""
    x = (squashed.astype(jnp.float32) + 1.0) / 2.0
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def clip_tokens(comps: Components, params, image, *, squashed: bool = False):
    """CLIP local tokens (B, 256, C) of an image in [-1, 1] (no gradient ever flows into CLIP).
    `squashed`: the image is already the torch-equal antialiased squash to the CLIP input size
    (done on the host by `cdv2.sample.preprocess.squash_for_clip`), so only normalisation runs."""
    x = normalize_for_clip(image) if squashed else preprocess_for_clip(image, comps.clip.config.image_size)
    tok = comps.clip.apply({"params": params["clip"]}, x)
    return jax.lax.stop_gradient(tok.astype(jnp.float32))


def posterior_noise(keys, shape_tail):
    """Per-sample N(0, 1) draws (B, *shape_tail) from per-sample keys (B, 2)."""
    return jax.vmap(lambda k: jax.random.normal(k, shape_tail, jnp.float32))(keys)


def vae_latent(comps: Components, params, image, noise=None, *, keys=None):
    """Scaled diffusion latent of `image` (B, H, W, 3) at the generation's pixel size: the posterior
    mean, or the authors' posterior SAMPLE mean + exp(logvar/2) * noise when `noise` (B, h, w, 4) or
    per-sample `keys` (B, 2) are given (`DiagonalGaussianDistribution.sample`)."""
    mean, logvar = comps.vae.apply({"params": params["vae"]}, image, method=AutoencoderKL.encode)
    if noise is None and keys is not None:
        noise = posterior_noise(keys, mean.shape[1:])
    z = mean if noise is None else mean + jnp.exp(0.5 * logvar) * noise.astype(mean.dtype)
    return jax.lax.stop_gradient(z * comps.vae.config.scale_factor)


def squash(image, size_hw):
    """The authors' `warp_resize`: torch bicubic (no antialias) to the generation's pixel size."""
    return resize_bicubic(image, tuple(size_hw))


def masked_background_reference(reference, reference_mask, threshold):
    """r_bg = where(rmask < ts_r, reference, white): the reference with its character whitened."""
    return jnp.where(reference_mask < threshold, reference, 1.0)


# --- trainable condition encoders -----------------------------------------------------------------

def sketch_hints(comps: Components, params, sketch, control_scale=1.0, *, with_blank: bool = True, apply=None):
    """Sketch hints x control_scale. with_blank: the authors' batched call on [sketch, -1 sketch]
    giving (control, uc_control) (the blank-sketch CFG branch); else just the hints of `sketch`.
    `apply(params, x)` overrides the module call (training wraps it in remat)."""
    apply = apply or (lambda p, x: comps.sketch_encoder.apply({"params": p}, x))
    if not with_blank:
        return [h * control_scale for h in apply(params["sketch_encoder"], sketch)]
    hints = apply(params["sketch_encoder"], jnp.concatenate([sketch, -jnp.ones_like(sketch)], axis=0))
    hints = [h * control_scale for h in hints]
    b = sketch.shape[0]
    return [h[:b] for h in hints], [h[b:] for h in hints]


def background_features(comps: Components, params, z_bg, y, context, mask_scale=1.0, *, apply=None):
    """hs_bg: the bg encoder's 12 token maps (indexed by output block) x mask_scale ("background
    factor")."""
    apply = apply or (lambda p, *a: comps.bg_encoder.apply({"params": p}, *a))
    return [h * mask_scale for h in apply(params["bg_encoder"], z_bg, y, context)]


def style_vectors(comps: Components, params, z, y, context, *, apply=None):
    """The style encoder's 12 modulation vectors (B, 2C_i)."""
    apply = apply or (lambda p, *a: comps.style_encoder.apply({"params": p}, *a))
    return apply(params["style_encoder"], z, y, context)


def merged_style_vectors(comps: Components, params, z_ref, y_ref, e_ref, z_bg, y_bg, e_bg, merge_scale):
    """Reference and background through the style encoder as one batch of 2, then mixed
    (1 - m) ref + m bg (the authors' style enhance with a background image)."""
    both = style_vectors(comps, params, jnp.concatenate([z_ref, z_bg]), jnp.concatenate([y_ref, y_bg]),
                         jnp.concatenate([e_ref, e_bg]))
    n = z_ref.shape[0]
    return [(1 - merge_scale) * v[:n] + merge_scale * v[n:] for v in both]


# --- split attention ------------------------------------------------------------------------------

def split_context(e, e_bg=None):
    """The split cross-attention context [e | e_bg] (512 tokens); [e | e] without a background."""
    return jnp.concatenate([e, e if e_bg is None else e_bg], axis=1)


def latent_sketch_mask(mask, image_hw):
    """A pixel-resolution sketch mask (B, H, W, 1) -> latent resolution (B, H/8, W/8, 1), the
    authors' `scaled_resize(smask, 0.125)` (torch bicubic, no antialias, no clamp)."""
    return resize_bicubic(mask.astype(jnp.float32), (image_hw[0] // 8, image_hw[1] // 8))


__all__ = [
    "size_ratios", "size_condition", "normalize_for_clip", "clip_tokens", "posterior_noise", "vae_latent",
    "squash", "masked_background_reference", "sketch_hints", "background_features", "style_vectors",
    "merged_style_vectors", "split_context", "latent_sketch_mask",
]
