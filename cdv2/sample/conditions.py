"""Conditions, computed ONCE per image (never per step): CLIP tokens, sketch hints, the VAE latents
and the background/style encoders, assembled into the U-Net's guidance-branch batch.

Follows the authors' `prepare_conditions` (ARCHITECTURE.md §4.2-4.4) with the shared builder
`cdv2.conditioning` (training uses the same functions). Two input forms:
* `Inputs`: host arrays at their own resolutions (reference and background of any size);
* `ModelInputs`: what the jitted `prepare` sees, with FIXED shapes per generation size: the
  reference/background are resized on the host (`to_model_inputs`, torch-equal resizes) to the
  CLIP input size and to the generation size, so a new reference size never recompiles.
VAE posterior: the mean, or the authors' sample with explicit noise per latent (`vae_noise`
{"reference": (1,h,w,4), "background": (1,h,w,4), "injection": (1,h,w,4)}; "background" is the
background image or the masked reference, whichever the modes encode; "injection" the attention
injection image, drawn after the others as in the authors' `generate`).
Attention injection (the app's checkbox): the injection latent r and the write pass's sketch hints
are prepared here (`InjectionConditions`); the per-call write/read is `cdv2.modules.injection`.
Text manipulation: `ModelInputs.reference_tokens` replaces the reference's CLIP tokens
(`Pipeline.manipulated_tokens`); everything that uses them (context, style and bg encoders) follows.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import struct

from cdv2 import conditioning as cb
from cdv2.model import Components
from cdv2.diffusion.guidance import COND, UNCOND_REF, UNCOND_SKETCH

VAE_NOISE_SLOTS = ("reference", "background", "injection")


@dataclasses.dataclass(frozen=True)
class Modes:
    """The app's independent checkboxes (static: each combination compiles once).
    style: "Style enhance"; background: "BG enhance (mask guided)"; foreground: "FG enhance (mask
    guided)" (split attention over [e | e] with the sketch mask, no LoRA, no skip injection);
    injection: "Attention injection" (reference-only: a write pass on the noised reference latent
    before every U-Net call, its self-attention tokens read by the real pass)."""

    style: bool = False
    background: bool = False
    foreground: bool = False
    injection: bool = False

    @property
    def split(self) -> bool:
        """Mask-guided split cross-attention (fg or bg enhance)."""
        return self.background or self.foreground

    @property
    def lora(self) -> bool:
        """The fg/bg LoRAs: the authors switch them on in BG enhance only."""
        return self.background


MODE_SHORTHANDS = {"vanilla": Modes(), "style": Modes(style=True), "background": Modes(background=True),
                   "full": Modes(style=True, background=True), "foreground": Modes(foreground=True)}


def resolve_modes(mode=None, *, style=None, background=None, foreground=None, injection=None) -> Modes:
    """A shorthand name (or a `Modes`) with optional per-flag overrides -> `Modes`."""
    if isinstance(mode, Modes):
        base = mode
    elif mode is None:
        base = Modes()
    elif mode in MODE_SHORTHANDS:
        base = MODE_SHORTHANDS[mode]
    else:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODE_SHORTHANDS)} or pass Modes(...)")
    over = {k: bool(v) for k, v in dict(style=style, background=background, foreground=foreground,
                                         injection=injection).items() if v is not None}
    return dataclasses.replace(base, **over)


@struct.dataclass
class Inputs:
    """Host arrays (NHWC, batch 1). sketch: (1,H,W,3) lines +1 on -1; reference/background: (1,h,w,3)
    in [-1,1] at their own resolution; *_ratios: (1,2) size-embedding ratios (None: from the image
    size, `conditioning.size_ratios`); reference_mask: (1,h,w,1) in [0,1] at the reference's
    resolution; sketch_mask: (1,H/8,W/8,1) latent-resolution sketch mask; injection_image:
    (1,H,W,3) in [-1,1], the reference resized to the generation size (attention injection,
    `cdv2.sample.injection.injection_image`)."""

    sketch: jnp.ndarray
    reference: jnp.ndarray
    reference_ratios: Optional[jnp.ndarray] = None
    reference_mask: Optional[jnp.ndarray] = None
    sketch_mask: Optional[jnp.ndarray] = None
    background: Optional[jnp.ndarray] = None
    background_ratios: Optional[jnp.ndarray] = None
    injection_image: Optional[jnp.ndarray] = None


@struct.dataclass
class ModelInputs:
    """Fixed-shape inputs of the jitted `prepare`: *_clip (1,S,S,3) antialiased squash to the CLIP
    input size, *_vae (1,H,W,3) `warp_resize` to the generation size (both [-1,1], un-normalised);
    masked_*: the reference with its character whitened (BG enhance without a background image);
    injection_image (1,H,W,3): attention injection's image; reference_tokens (1,256,C): CLIP tokens
    that replace the reference's (text manipulation), None = computed from reference_clip."""

    sketch: jnp.ndarray
    reference_clip: jnp.ndarray
    reference_vae: jnp.ndarray
    reference_ratios: jnp.ndarray
    sketch_mask: Optional[jnp.ndarray] = None
    background_clip: Optional[jnp.ndarray] = None
    background_vae: Optional[jnp.ndarray] = None
    background_ratios: Optional[jnp.ndarray] = None
    masked_clip: Optional[jnp.ndarray] = None
    masked_vae: Optional[jnp.ndarray] = None
    injection_image: Optional[jnp.ndarray] = None
    reference_tokens: Optional[jnp.ndarray] = None


@struct.dataclass
class InjectionConditions:
    """Attention injection's per-generation inputs: r (1,h,w,4) the scaled VAE latent of the
    injection image (posterior sample or mean); write_control: the write pass's 5 sketch hints
    (hints of the NEGATED injection image x "Injection fidelity (sketch)", repeated to every row)."""

    r: jnp.ndarray
    write_control: tuple


@struct.dataclass
class UNetConditions:
    """Everything the U-Net receives besides x and t, stacked branch-major along the batch.
    use_lora (static): the decoder's fg/bg LoRAs (BG enhance); injection: attention injection's
    inputs (None: off)."""

    context: jnp.ndarray
    control: tuple
    mask: Optional[jnp.ndarray] = None
    hs_bg: Optional[tuple] = None
    style: Optional[tuple] = None
    use_lora: bool = struct.field(pytree_node=False, default=False)
    injection: Optional[InjectionConditions] = None


@struct.dataclass
class Strengths:
    """Per-generation numbers used while preparing conditions. control_scale and mask_scale are
    traced; reference_mask_threshold is applied on the host (`to_model_inputs`)."""

    control_scale: jnp.ndarray = 1.0       # "Sketch strength": hints x this
    mask_scale: jnp.ndarray = 1.0          # "Background factor": bg-encoder features x this
    merge_scale: jnp.ndarray = 0.0         # "Merging scale": style vectors (and split attention) bg mix
    reference_mask_threshold: float = 0.5  # ts_r: reference pixels with mask < ts_r are background
    injection_sketch_fidelity: jnp.ndarray = 0.0  # "Injection fidelity (sketch)": write-pass hints x this


def to_model_inputs(inputs: Inputs, clip_size: int, modes: Modes, reference_mask_threshold: float = 0.5
                    ) -> ModelInputs:
    """Host side (numpy): resize reference/background once to the fixed shapes the jitted prepare
    sees, with the torch-equal resizes (`preprocess.squash_for_clip`, `preprocess.squash_to`)."""
    from cdv2.sample.preprocess import squash_for_clip, squash_to

    sk = np.asarray(inputs.sketch, np.float32)
    hw = sk.shape[1:3]
    ref = np.asarray(inputs.reference, np.float32)

    def ratios(given, img):
        return np.asarray(cb.size_ratios(img.shape[1:3], hw)[None] if given is None else given, np.float32)

    kw = dict(sketch=sk, reference_clip=squash_for_clip(ref, clip_size), reference_vae=squash_to(ref, hw),
              reference_ratios=ratios(inputs.reference_ratios, ref),
              sketch_mask=None if inputs.sketch_mask is None else np.asarray(inputs.sketch_mask, np.float32),
              injection_image=None if inputs.injection_image is None else np.asarray(inputs.injection_image,
                                                                                      np.float32))
    if inputs.background is not None:
        bg = np.asarray(inputs.background, np.float32)
        kw.update(background_clip=squash_for_clip(bg, clip_size), background_vae=squash_to(bg, hw),
                  background_ratios=ratios(inputs.background_ratios, bg))
    elif modes.background and inputs.reference_mask is not None:
        r_bg = np.where(np.asarray(inputs.reference_mask) < float(reference_mask_threshold), ref, 1.0)
        kw.update(masked_clip=squash_for_clip(r_bg, clip_size), masked_vae=squash_to(r_bg, hw))
    return ModelInputs(**kw)


def prepare_conditions(comps: Components, params, mi: ModelInputs, strengths: Strengths, *, modes: Modes,
                       branches: tuple[str, ...], num_images: int = 1,
                       vae_noise: Optional[dict] = None) -> tuple[UNetConditions, dict]:
    """Returns the branch-stacked U-Net conditions and a dict of intermediate tensors (CLIP tokens,
    encoder inputs/outputs) for inspection and tests."""
    vae_noise = vae_noise or {}
    if mi.reference_tokens is not None:  # text manipulation: the manipulated tokens replace e everywhere
        e = jnp.asarray(mi.reference_tokens, jnp.float32)
    else:
        e = cb.clip_tokens(comps, params, mi.reference_clip, squashed=True)
    y_ref = cb.size_condition(comps, mi.reference_ratios)
    control, uc_control = cb.sketch_hints(comps, params, mi.sketch, strengths.control_scale)
    debug = {"clip_tokens": e, "control": control, "y_reference": y_ref}
    has_bg_image = mi.background_vae is not None
    e_bg = z_bg = y_bg = style_vecs = hs_bg = None
    if modes.style:
        z_ref = cb.vae_latent(comps, params, mi.reference_vae, vae_noise.get("reference"))
        if has_bg_image:  # reference and background through the style encoder together, then mixed
            z_bg, e_bg, y_bg = _background_image_parts(comps, params, mi, vae_noise)
            style_vecs = cb.merged_style_vectors(comps, params, z_ref, y_ref, e, z_bg, y_bg, e_bg,
                                                 strengths.merge_scale)
        else:
            style_vecs = cb.style_vectors(comps, params, z_ref, y_ref, e)
        debug.update(z_reference=z_ref, style_out=style_vecs)

    if modes.background:
        z_bg, e_bg, y_bg, enc_context = _background_inputs(comps, params, mi, e, y_ref, vae_noise, z_bg, e_bg, y_bg)
        hs_bg = cb.background_features(comps, params, z_bg, y_bg, enc_context, strengths.mask_scale)
        debug.update(z_background=z_bg, y_background=y_bg, bg_context=enc_context, bg_out=hs_bg)

    mask = None
    context = e
    if modes.split:
        if mi.sketch_mask is None:
            raise ValueError("fg/bg enhancement (split attention) needs a sketch mask")
        context = cb.split_context(e, e_bg)  # FG alone: [e | e] (or [e | e_bg] after style + background)
        mask = mi.sketch_mask
    if e_bg is not None:
        debug["clip_background"] = e_bg

    n = len(branches) * num_images
    injection = None
    if modes.injection:  # after the conditions' VAE draws, as the authors' generate
        injection = _injection_conditions(comps, params, mi, strengths, vae_noise, n)
        debug.update(injection_latent=injection.r)
    rows = {COND: (context, control), UNCOND_REF: (jnp.zeros_like(context), control),
            UNCOND_SKETCH: (context, uc_control)}

    def stack(per_branch):
        return jnp.concatenate([jnp.repeat(a, num_images, axis=0) for a in per_branch], axis=0)

    def repeat(xs):
        return None if xs is None else tuple(jnp.repeat(x, n, axis=0) for x in xs)

    conds = UNetConditions(
        context=stack([rows[b][0] for b in branches]),
        control=tuple(stack([rows[b][1][i] for b in branches]) for i in range(len(control))),
        mask=None if mask is None else jnp.repeat(mask, n, axis=0),
        hs_bg=repeat(hs_bg), style=repeat(style_vecs), use_lora=modes.lora, injection=injection)
    return conds, debug


def _injection_conditions(comps: Components, params, mi: ModelInputs, strengths: Strengths, vae_noise: dict,
                          n: int) -> InjectionConditions:
    """Attention injection's inputs: the reference latent r and the sketch hints of the bank-writing
    pass (the reference image's negative at the sketch fidelity), repeated over the n rows."""
    if mi.injection_image is None:
        raise ValueError("attention injection needs the injection image (Inputs.injection_image)")
    r = cb.vae_latent(comps, params, mi.injection_image, vae_noise.get("injection"))
    hints = cb.sketch_hints(comps, params, -mi.injection_image, strengths.injection_sketch_fidelity,
                            with_blank=False)
    return InjectionConditions(r=r, write_control=tuple(jnp.repeat(h, n, axis=0) for h in hints))


def _background_image_parts(comps: Components, params, mi: ModelInputs, vae_noise: dict):
    """The user's background image: its VAE latent, CLIP tokens and size condition."""
    z = cb.vae_latent(comps, params, mi.background_vae, vae_noise.get("background"))
    return z, cb.clip_tokens(comps, params, mi.background_clip, squashed=True), \
        cb.size_condition(comps, mi.background_ratios)


def _background_inputs(comps: Components, params, mi: ModelInputs, e, y_ref, vae_noise: dict, z_bg, e_bg, y_bg):
    """(z_bg, e_bg, y_bg, context) of the background encoder: the background image's (already
    computed by the style branch when z_bg is given), else the masked reference's."""
    if mi.sketch_mask is None:
        raise ValueError("background enhancement needs a sketch mask")
    if z_bg is not None:
        return z_bg, e_bg, y_bg, e  # authors' quirk (NOTES (c) 8): style + background image -> context e
    if mi.background_vae is not None:
        z_bg, e_bg, y_bg = _background_image_parts(comps, params, mi, vae_noise)
        return z_bg, e_bg, y_bg, e_bg
    if mi.masked_vae is None:
        raise ValueError("background enhancement needs a reference mask or a background image")
    z_bg = cb.vae_latent(comps, params, mi.masked_vae, vae_noise.get("background"))
    return z_bg, cb.clip_tokens(comps, params, mi.masked_clip, squashed=True), y_ref, e
