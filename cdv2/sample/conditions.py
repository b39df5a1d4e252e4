"""Conditions, computed ONCE per image (never per step): CLIP tokens, sketch hints, the VAE latents
and the background/style encoders, assembled into the U-Net's guidance-branch batch.

Follows the authors' `prepare_conditions` (ARCHITECTURE.md §4.2-4.4). Deliberate difference: the
reference/background VAE latents use the posterior MEAN unless a `vae_rng` is given (the authors
draw a posterior sample, which makes conditioning slightly random; the oracle also uses the mean).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from cdv2.model import Components
from cdv2.modules.clip import preprocess_for_clip
from cdv2.modules.encoders import size_embedding
from cdv2.modules.resize import resize_bicubic
from cdv2.modules.vae import AutoencoderKL, encode_to_latent
from cdv2.diffusion.guidance import COND, UNCOND_REF, UNCOND_SKETCH


@struct.dataclass
class Inputs:
    """Model-ready arrays (NHWC, batch 1). sketch: (1,H,W,3) lines +1 on -1; reference: (1,h,w,3)
    in [-1,1]; *_ratios: (1,2) size-embedding ratios; reference_mask: (1,h,w,1) in [0,1] at the
    reference's resolution; sketch_mask: (1,H/8,W/8,1) latent-resolution sketch mask."""

    sketch: jnp.ndarray
    reference: jnp.ndarray
    reference_ratios: jnp.ndarray
    reference_mask: Optional[jnp.ndarray] = None
    sketch_mask: Optional[jnp.ndarray] = None
    background: Optional[jnp.ndarray] = None
    background_ratios: Optional[jnp.ndarray] = None


@struct.dataclass
class UNetConditions:
    """Everything the U-Net receives besides x and t, stacked branch-major along the batch."""

    context: jnp.ndarray
    control: tuple
    mask: Optional[jnp.ndarray] = None
    hs_bg: Optional[tuple] = None
    style: Optional[tuple] = None


@struct.dataclass
class Strengths:
    """Per-generation numbers used while preparing conditions (all traced)."""

    control_scale: jnp.ndarray = 1.0       # "sketch strength": hints x this
    mask_scale: jnp.ndarray = 1.0          # "background factor": bg-encoder features x this
    merge_scale: jnp.ndarray = 0.0         # style vectors (and split attention) mix of bg into fg
    reference_mask_threshold: jnp.ndarray = 0.5  # ts_r: reference pixels with mask < ts_r are background


def _clip_tokens(comps: Components, params, image):
    return comps.clip.apply({"params": params["clip"]}, preprocess_for_clip(image, comps.clip.config.image_size))


def _vae_latent(comps: Components, params, image, size_hw, rng):
    """Squash `image` to the generation's pixel size (the authors' warp_resize: torch bicubic), encode."""
    image = resize_bicubic(image, size_hw)
    mean, logvar = comps.vae.apply({"params": params["vae"]}, image, method=AutoencoderKL.encode)
    return encode_to_latent(mean, logvar, rng, comps.vae.config.scale_factor)


def prepare_conditions(comps: Components, params, inputs: Inputs, strengths: Strengths, *, style: bool,
                       background: bool, branches: tuple[str, ...], num_images: int = 1,
                       vae_rng: Optional[jax.Array] = None) -> tuple[UNetConditions, dict]:
    """Returns the branch-stacked U-Net conditions and a dict of intermediate tensors (CLIP tokens,
    encoder inputs/outputs) for inspection and tests."""
    H, W = inputs.sketch.shape[1:3]
    rng_ref, rng_bg = (None, None) if vae_rng is None else tuple(jax.random.split(vae_rng))
    e = _clip_tokens(comps, params, inputs.reference)
    y_ref = size_embedding(inputs.reference_ratios, comps.bg_encoder.config.adm_in_channels // 2)
    blank = -jnp.ones_like(inputs.sketch)
    hints = comps.sketch_encoder.apply({"params": params["sketch_encoder"]},
                                       jnp.concatenate([inputs.sketch, blank], axis=0))
    hints = [h * strengths.control_scale for h in hints]
    control, uc_control = [h[:1] for h in hints], [h[1:] for h in hints]
    debug = {"clip_tokens": e, "control": control}

    e_bg = z_bg = y_bg = None
    if inputs.background is not None:
        z_bg = _vae_latent(comps, params, inputs.background, (H, W), rng_bg)
        e_bg = _clip_tokens(comps, params, inputs.background)
        y_bg = size_embedding(inputs.background_ratios, comps.bg_encoder.config.adm_in_channels // 2)

    style_vecs = None
    if style:
        z_ref = _vae_latent(comps, params, inputs.reference, (H, W), rng_ref)
        if z_bg is None:
            style_vecs = comps.style_encoder.apply({"params": params["style_encoder"]}, z_ref, y_ref, e)
        else:  # reference and background through the style encoder together, then mixed
            both = comps.style_encoder.apply({"params": params["style_encoder"]}, jnp.concatenate([z_ref, z_bg]),
                                             jnp.concatenate([y_ref, y_bg]), jnp.concatenate([e, e_bg]))
            m = strengths.merge_scale
            style_vecs = [(1 - m) * v[:1] + m * v[1:] for v in both]
        debug.update(style_in=z_ref, style_out=style_vecs)

    hs_bg, mask = None, None
    if background:
        if inputs.sketch_mask is None:
            raise ValueError("background enhancement needs a sketch mask")
        if z_bg is None:
            if inputs.reference_mask is None:
                raise ValueError("background enhancement needs a reference mask or a background image")
            # the reference with its character whitened out
            r_bg = jnp.where(inputs.reference_mask < strengths.reference_mask_threshold, inputs.reference, 1.0)
            z_bg = _vae_latent(comps, params, r_bg, (H, W), rng_bg)
            e_bg = _clip_tokens(comps, params, r_bg)
            y_bg, enc_context = y_ref, e
        else:
            # authors' quirk (NOTES (c) 8): with style enhance on as well, the context falls back to e
            enc_context = e if style else e_bg
        hs_bg = comps.bg_encoder.apply({"params": params["bg_encoder"]}, z_bg, y_bg, enc_context)
        hs_bg = [h * strengths.mask_scale for h in hs_bg]
        mask = inputs.sketch_mask
        debug.update(bg_in=z_bg, bg_context=enc_context, bg_out=hs_bg)

    context = jnp.concatenate([e, e_bg if e_bg is not None else e], axis=1) if background else e
    rows = {COND: (context, control), UNCOND_REF: (jnp.zeros_like(context), control),
            UNCOND_SKETCH: (context, uc_control)}

    def stack(per_branch):
        return jnp.concatenate([jnp.repeat(a, num_images, axis=0) for a in per_branch], axis=0)

    n = len(branches) * num_images
    conds = UNetConditions(
        context=stack([rows[b][0] for b in branches]),
        control=tuple(stack([rows[b][1][i] for b in branches]) for i in range(len(control))),
        mask=None if mask is None else jnp.repeat(mask, n, axis=0),
        hs_bg=None if hs_bg is None else tuple(jnp.repeat(h, n, axis=0) for h in hs_bg),
        style=None if style_vecs is None else tuple(jnp.repeat(s, n, axis=0) for s in style_vecs),
    )
    return conds, debug
