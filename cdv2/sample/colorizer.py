"""The public inference API: `Colorizer.from_pretrained(path).colorize(sketch, reference, ...)`.

Every control of the authors' app is a keyword of `colorize` (table in docs/DIFFERENCES.md and
`cdv2.app.controls`). Host side: images are loaded, validated, masked and resized to fixed shapes
once; device side: one jitted `prepare` (CLIP, VAE, sketch/background/style encoders), one jitted
denoising loop, one jitted decode. Changing guidance scales, strengths, thresholds, the guidance
window, the seed or the reference/background image size never recompiles.

Attention injection (`attention_injection=True`, the fidelities and start step traced) and text
manipulation (the app's prompt fields; the CLIP text tower comes from the weights or, lazily, from
the open_clip file given as `clip`) are keywords of `colorize` too. Masks and the "extract" sketch
preprocessor use the app's networks when `from_pretrained(..., preprocessors=DIR)` has them
(`cdv2 convert --preprocessor`); without their weights the masks are the documented estimates of
`cdv2.sample.masks`, with one warning per network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cdv2.conditioning import size_ratios
from cdv2.config import ModelConfig
from cdv2.diffusion.samplers import BROWNIAN_SAMPLERS, resolve_name
from cdv2.sample import masks as mask_ops
from cdv2.sample import preprocess as pre
from cdv2.sample.conditions import Inputs, Modes, resolve_modes
from cdv2.sample.injection import injection_image
from cdv2.sample.line_extract import DEFAULT_EXTRACTOR
from cdv2.sample.manipulation import DEFAULT_THRESHOLDS, Manipulation, app_manipulations, is_active
from cdv2.sample.pipeline import Pipeline
from cdv2.sample.preprocessors import Preprocessors
from cdv2.sample.settings import pipeline_settings
from cdv2.sample.seeds import injection_key, resolve_seed, seed_keys
from cdv2.weights.dtypes import compute_dtype, compute_dtype_name

MaskFn = Callable[[np.ndarray], np.ndarray]  # uint8 (h, w, 3) -> (h, w) float mask in [0, 1]
REFERENCE_MASK_METHODS = ("rmbg-v2", "isnet", "estimate")  # the app's extractors + cdv2's estimate


@dataclass
class Prepared:
    """Model-ready inputs of one colorization (kept for inspection)."""

    inputs: Inputs
    box: tuple[int, int, int, int]
    size: tuple[int, int]
    modes: Modes = Modes()


def _noise(key, shape):
    return jax.random.normal(key, shape, jnp.float32)


_noise_jit = jax.jit(_noise, static_argnums=1)


def _mask_method(value) -> Optional[str]:
    """The extractor named by a `reference_mask` string ("rmbg-v2", "ISNet", "estimate"), else None
    (an image, a path, or None)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in REFERENCE_MASK_METHODS:
            return v
    return None


class Colorizer:
    def __init__(self, params, config: ModelConfig, dtype: str = "float32", attention_impl: Optional[str] = "auto",
                 mask_extractor: Optional[MaskFn] = None, preprocessors: Optional[Preprocessors] = None,
                 text_tower_file: Optional[str] = None):
        """mask_extractor: a reference-mask function used when `reference_mask` is None (overrides
        the default extractor). preprocessors: the app's mask/line networks (`Preprocessors.load`);
        None = none, masks estimated. text_tower_file: a file holding the CLIP text tower (the
        open_clip ViT-H-14 file), read on the first text manipulation when params lack `clip_text`."""
        dtype = compute_dtype_name(dtype)
        self.config = config
        params = dict(params)
        text = params.pop("clip_text", None)  # kept apart: the jitted prepare never sees the text tower
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self._text_params = None if text is None else jax.tree_util.tree_map(jnp.asarray, text)
        self._text_tower_file = text_tower_file
        self._encode_text = None
        self.pipeline = Pipeline(config, dtype=compute_dtype(dtype), attention_impl=attention_impl)
        self.mask_extractor = mask_extractor
        self.preprocessors = preprocessors if preprocessors is not None else Preprocessors.empty()
        self.last_seed: Optional[int] = None  # the seed of the last `colorize` (the app's "Reuse Seed")

    @classmethod
    def from_pretrained(cls, path, clip: Optional[str] = None, *, config=None, dtype: str = "float32",
                        attention_impl: Optional[str] = "auto", preprocessors=None) -> "Colorizer":
        """`path`: a cdv2 weights directory, or the authors' v2 checkpoint (then `clip` names an
        open_clip ViT-H-14 file unless the checkpoint holds CLIP); see
        `cdv2.weights.pretrained.HOW_TO_GET_WEIGHTS`. preprocessors: a directory written by
        `cdv2 convert --preprocessor` (or a `Preprocessors`): ISNet-sketch, rmbg-v2 / ISNet and the
        line extractors. The CLIP text tower (text manipulation) is read from the weights, else
        from `clip` when first needed."""
        from cdv2.weights.pretrained import load_pretrained

        dtype = compute_dtype_name(dtype)
        params, cfg = load_pretrained(path, clip=clip, config=config, dtype=dtype)  # bf16 compute: bf16 weights, once
        if preprocessors is not None and not isinstance(preprocessors, Preprocessors):
            preprocessors = Preprocessors.load(preprocessors)
        return cls(params, cfg, dtype=dtype, attention_impl=attention_impl, preprocessors=preprocessors,
                   text_tower_file=clip)

    def text_encoder(self):
        """texts -> (n, 1, C) unit CLIP text features (the authors' `encode_text`), built once."""
        if self._encode_text is None:
            from cdv2.sample.manipulation import load_text_tower, make_text_encoder

            if self._text_params is None and self._text_tower_file is not None:
                try:
                    self._text_params = jax.tree_util.tree_map(
                        jnp.asarray, load_text_tower(self._text_tower_file, self.config.clip_text))
                except ValueError as e:
                    raise ValueError(f"text manipulation needs the CLIP text tower, which {self._text_tower_file} "
                                     f"does not hold correctly:\n{e}") from None
            if self._text_params is None:
                raise ValueError("text manipulation needs the CLIP text tower: these weights have none (the "
                                 "authors' colorization checkpoint does not carry it). Load with "
                                 "Colorizer.from_pretrained(path, clip=<open_clip ViT-H-14 file>) or "
                                 "convert a checkpoint that holds cond_stage_model.transformer.*")
            self._encode_text = make_text_encoder(self._text_params, self.config.clip_text)
        return self._encode_text

    # ------------------------------------------------------------------------------------------
    def _reference_mask(self, rgb: np.ndarray, alpha, *, dilate: bool = True, method: Optional[str] = None,
                        image=None) -> np.ndarray:
        """(1, h, w, 1) character mask of an image (uint8 rgb; `image`: the same as [-1, 1] floats,
        fed to the network as is, e.g. a result). method: "rmbg-v2" | "isnet" (the app's networks,
        from `self.preprocessors`; without their weights the estimate, said once) | "estimate" |
        None (the `mask_extractor` function if set, else "rmbg-v2")."""
        if method is None and self.mask_extractor is not None:
            m = np.clip(np.asarray(self.mask_extractor(rgb), np.float32), 0.0, 1.0).reshape(rgb.shape[:2])
            if dilate:
                m = mask_ops.max_filter(m, mask_ops.REFERENCE_DILATE_PX)
            return m[None, :, :, None]
        method = method or "rmbg-v2"
        if method != "estimate":
            if self.preprocessors.has(method):
                x = rgb if image is None else image
                net = self.preprocessors.reference_mask if dilate else self.preprocessors.remove_background
                return np.asarray(net(x, method), np.float32)
            self.preprocessors.warn_missing(method, "the estimate cdv2.sample.masks.estimate_reference_mask")
        return mask_ops.estimate_reference_mask(rgb, alpha, dilate=dilate)

    def _uses_network(self, method: Optional[str]) -> bool:
        if method is None and self.mask_extractor is not None:
            return False
        method = method or "rmbg-v2"
        return method != "estimate" and self.preprocessors.has(method)

    def _user_or_estimated_mask(self, given, img, pad_scale, what, against):
        """A user's mask (padded like the image: the padding is background), or the extractor's
        (`given` None or a method name, see `_reference_mask`) on the padded image."""
        rgb, alpha = pre.load_image(img, what=against)
        method = _mask_method(given)
        if given is None or method is not None:
            if alpha is not None and self._uses_network(method):  # the network sees the image as the model does
                rgb = pre.load_image(img, what=against, matte=(255, 255, 255))[0]
            if pad_scale > 1.0:  # on the padded image, as the authors' extractor sees it
                rgb = pre.load_image(_pad_rgb(rgb, pad_scale), what=against)[0]
                alpha = None if alpha is None else _pad_rgb(alpha[..., None].repeat(3, -1), pad_scale, 255)[..., 0]
            return self._reference_mask(rgb, alpha, method=method)
        m = mask_ops.load_mask(given, rgb.shape[:2], what=what, against=against)
        if pad_scale > 1.0:
            m = _pad_rgb(m[0].repeat(3, -1), pad_scale, 0, np.float32)[None, ..., :1]
        return m

    def prepare_inputs(self, sketch, reference, *, mode=None, background=None, sketch_mask=None,
                       reference_mask=None, background_mask=None, size: Optional[tuple[int, int]] = None,
                       long_side: int = 768, sketch_polarity: str = "auto", sketch_mask_dilation: Optional[int] = None,
                       reference_padding_scale: float = 1.0, remove_foreground_in_background: bool = False,
                       reference_mask_threshold: float = 0.5, sketch_preprocessor: Optional[str] = None,
                       line_extractor: str = DEFAULT_EXTRACTOR, **flags) -> Prepared:
        """Load and validate images and masks; returns model arrays (host numpy inside `Inputs`).
        mode / flags (style_enhance, background_enhance, foreground_enhance, attention_injection) and
        the other keywords: see `colorize`."""
        modes = requested_modes(mode, flags)
        if not 1.0 <= reference_padding_scale <= 2.0:
            raise ValueError(f"reference_padding_scale must be in [1, 2] (the app's range), got {reference_padding_scale}")
        sk_rgb, _ = pre.load_image(sketch, what="sketch")
        if size is None:
            size = pre.choose_generation_size(sk_rgb.shape[:2], target_long_side=long_side)
        elif size[0] % 64 or size[1] % 64 or min(size) < 64:
            raise ValueError(f"size {size} (height, width) must be multiples of 64, at least 64")
        H, W = size
        if sketch_preprocessor is None:  # cdv2's default: "invert" or "none" by the detected polarity
            sk, box = pre.prepare_sketch(sk_rgb, (H, W), polarity=sketch_polarity)
        else:  # the app's preprocessors ("extract" runs the line network)
            rgb_white = pre.load_image(sketch, what="sketch", matte=(255, 255, 255))[0]
            sk, box, _ = self.preprocessors.preprocess_sketch(rgb_white, (H, W), sketch_preprocessor, line_extractor)
        ref, ref_hw = pre.prepare_reference(reference, pad_scale=reference_padding_scale)
        bg = bg_ratios = None
        if background is not None:
            bg, bg_hw = pre.prepare_background(background, pad_scale=reference_padding_scale)
            bg_ratios = size_ratios(bg_hw, (H, W))[None]
        smask = rmask = None
        if modes.split:
            if sketch_mask is not None:
                m = mask_ops.load_mask(sketch_mask, sk_rgb.shape[:2], what="sketch mask", against="the sketch")
                full = mask_ops.place_mask_in_box(m, box, (H, W))
            elif self.preprocessors.has("isnet-sketch"):  # the app: ISNet-sketch on white_sketch = -sketch
                full = np.asarray(self.preprocessors.sketch_mask(-np.asarray(sk, np.float32), H, W), np.float32)
            else:  # approximation of the authors' sketch-segmentation network (documented in masks.py)
                self.preprocessors.warn_missing("isnet-sketch", "the estimate cdv2.sample.masks.estimate_sketch_mask")
                dil = sketch_mask_dilation if sketch_mask_dilation is not None else max(1, round(max(H, W) / 96))
                full = mask_ops.estimate_sketch_mask(sk, dil)
            smask = mask_ops.latent_mask(full, (H // 8, W // 8))
            if bg is not None and remove_foreground_in_background:  # whiten the background's characters
                bg_given = background_mask if background_mask is not None else _mask_method(reference_mask)
                bgmask = self._user_or_estimated_mask(bg_given, background, reference_padding_scale,
                                                      "background mask", "background")
                bg = np.where(bgmask < reference_mask_threshold, bg, 1.0).astype(np.float32)
                rmask = bgmask
            elif bg is None and modes.background:
                rmask = self._user_or_estimated_mask(reference_mask, reference, reference_padding_scale,
                                                     "reference mask", "reference")
        inj = None
        if modes.injection:  # the app: the unpadded reference, PIL bicubic to the generation size
            inj = injection_image(pre.load_image(reference, what="reference", matte=(255, 255, 255))[0], H, W)
        inputs = Inputs(sketch=sk, reference=ref, reference_ratios=size_ratios(ref_hw, (H, W))[None],
                        reference_mask=rmask, sketch_mask=smask, background=bg, background_ratios=bg_ratios,
                        injection_image=inj)
        return Prepared(inputs, box, (H, W), modes)

    def colorize(self, sketch, reference, *, mode=None, style_enhance: Optional[bool] = None,
                 background_enhance: Optional[bool] = None, foreground_enhance: Optional[bool] = None,
                 attention_injection: Optional[bool] = None, background=None, sketch_mask=None,
                 reference_mask=None, background_mask=None, steps: int = 20, sampler: str = "diffuser_dpm",
                 schedule: str = "Automatic", karras: Optional[bool] = None, reference_guidance: float = 4.0,
                 sketch_guidance: float = 1.0, reference_strength: float = 1.0, encoder_scale: float = 1.0,
                 middle_scale: float = 1.0, low_scale: float = 1.0, per_layer_scales: Optional[Sequence[float]] = None,
                 authors_layer_mapping: bool = False, fg_strength: float = 1.0, bg_strength: float = 1.0,
                 merge_scale: float = 0.0, sketch_strength: float = 1.0, background_factor: float = 1.0,
                 sketch_mask_threshold: float = 0.05, reference_mask_threshold: float = 0.5,
                 reference_padding_scale: float = 1.0, guidance_start_step: float = 0.0,
                 guidance_end_step: float = 1.0, no_guidance_start_step: float = -0.05,
                 no_guidance_end_step: float = -0.05, crop: bool = False,
                 remove_foreground_in_background: bool = False, remove_background_in_result: bool = False,
                 injection_fidelity: float = 0.5, injection_sketch_fidelity: float = 0.0,
                 injection_start_step: float = 0.0, prompt: Optional[str] = "", target_prompt: Optional[str] = "",
                 anchor_prompt: Optional[str] = "", control_prompt: Optional[str] = "", target_scale: float = 0.0,
                 thresholds: Sequence[float] = DEFAULT_THRESHOLDS, enhance_manipulation: bool = False,
                 manipulations: Sequence[Manipulation] = (), sketch_preprocessor: Optional[str] = None,
                 line_extractor: str = DEFAULT_EXTRACTOR, seed: int = -1, num_images: int = 1,
                 deterministic_batch_seed: bool = False, posterior: str = "sample", initial_noise=None,
                 vae_noise: Optional[dict] = None, sampler_noise=None, injection_noise=None,
                 size: Optional[tuple[int, int]] = None, long_side: int = 768, sketch_polarity: str = "auto",
                 progress: bool = False, output: str = "pil"):
        """Colorize `sketch` (path, PIL image or array; black lines on white or the reverse) after
        `reference`. Defaults are the authors' app's. Returns `num_images` PIL images; the seed used
        is kept in `self.last_seed`.

        Modes: `mode` = "vanilla" | "style" | "background" | "full" | "foreground" (shorthands) and/or
        the app's checkboxes style_enhance, background_enhance, foreground_enhance, attention_injection
        (override `mode`). A `background` image replaces the reference's background.
        Masks: sketch_mask / reference_mask / background_mask images are used as given; otherwise the
        sketch mask is ISNet-sketch's and the reference mask the extractor `reference_mask` names
        ("rmbg-v2" (the app's default, also for None), "isnet", or "estimate"), when
        `self.preprocessors` holds their weights, else the estimates of cdv2.sample.masks (one
        warning per network).
        Sketch: sketch_preprocessor None (cdv2: "invert" or "none" by `sketch_polarity`) or the app's
        "none" | "invert" (the app's default) | "invert-webui" | "extract" (with `line_extractor`:
        "lineart_keras" (default), "lineart", "lineart_denoise", "lineart_sk"; needs its weights).
        Scales: reference_strength with encoder/middle/low_scale ("Encoder/Color/Semantics
        crossattn scale") or per_layer_scales (the "accurate" sliders); authors_layer_mapping=True
        applies exactly the authors' per-layer values (see cdv2.sample.scales).
        Guidance window: the reference is used only for 1 - t/999 in [guidance_start_step,
        guidance_end_step] and outside [no_guidance_start_step, no_guidance_end_step] (in the
        authors' v2 these sliders have no effect; identical at the defaults).
        Attention injection: injection_fidelity ("Injection fidelity (reference)"),
        injection_sketch_fidelity ("Injection fidelity (sketch)"), injection_start_step ("Injection
        start step"); see cdv2.modules.injection.
        Text manipulation (the app's fields): prompt ("Final prompt", one manipulation per line in
        the authors' syntax), target_prompt / anchor_prompt / control_prompt / target_scale /
        thresholds (ts0..ts3) / enhance_manipulation (the direct fields, used when the target is
        non-empty), manipulations (explicit `Manipulation`s, appended); applied when any scale > 0
        (the authors' parser bugs fixed: cdv2.sample.manipulation).
        Reproducibility: seed -1 = random; initial_noise (num_images, h, w, 4) replaces the seed's
        x_T; posterior "sample" (the authors', noise from the seed or `vae_noise` {"reference",
        "background", "injection": (1, h, w, 4)}) or "mean"; sampler_noise: injected draws of
        stochastic samplers; injection_noise (num_calls, 1, h, w, 4): injected q_sample draws of
        attention injection, one per U-Net call (cdv2.sample.injection.noise_per_call);
        deterministic_batch_seed: the app's option: every batch row gets the same draws of the
        Brownian-tree samplers (DPM++ SDE family); other samplers are unaffected, as in the app.
        output: "pil" (list of images, 8-bit) or "array" ((num_images, H, W, 3) float32, unclamped)."""
        _check_request(steps, num_images, output, reference_mask)
        modes = requested_modes(mode, dict(style_enhance=style_enhance, background_enhance=background_enhance,
                                  foreground_enhance=foreground_enhance, attention_injection=attention_injection))
        manips = app_manipulations(prompt, target_prompt, anchor_prompt, control_prompt, target_scale, thresholds,
                                   enhance_manipulation, manipulations)
        if karras is not None:  # the first API's flag
            schedule = "Karras" if karras else schedule
        prep = self.prepare_inputs(sketch, reference, mode=modes, background=background, sketch_mask=sketch_mask,
                                   reference_mask=reference_mask, background_mask=background_mask, size=size,
                                   long_side=long_side, sketch_polarity=sketch_polarity,
                                   reference_padding_scale=reference_padding_scale,
                                   remove_foreground_in_background=remove_foreground_in_background,
                                   reference_mask_threshold=reference_mask_threshold,
                                   sketch_preprocessor=sketch_preprocessor, line_extractor=line_extractor)
        seed = resolve_seed(seed)
        self.last_seed = seed
        k_noise, k_vae, k_sampler = seed_keys(seed)
        strengths, guidance, branches = pipeline_settings(
            reference_guidance=reference_guidance, sketch_guidance=sketch_guidance,
            reference_strength=reference_strength, encoder_scale=encoder_scale, middle_scale=middle_scale,
            low_scale=low_scale, per_layer_scales=per_layer_scales, authors_layer_mapping=authors_layer_mapping,
            fg_strength=fg_strength, bg_strength=bg_strength, merge_scale=merge_scale,
            sketch_strength=sketch_strength, background_factor=background_factor,
            sketch_mask_threshold=sketch_mask_threshold, reference_mask_threshold=reference_mask_threshold,
            guidance_start_step=guidance_start_step, guidance_end_step=guidance_end_step,
            no_guidance_start_step=no_guidance_start_step, no_guidance_end_step=no_guidance_end_step,
            injection_fidelity=injection_fidelity, injection_sketch_fidelity=injection_sketch_fidelity,
            injection_start_step=injection_start_step)
        mi = self.pipeline.model_inputs(prep.inputs, modes, reference_mask_threshold)
        tokens = None
        if is_active(manips):
            tokens = self.pipeline.manipulated_tokens(self.params, mi, manips, self.text_encoder())
        conds, _ = self.pipeline.prepare(self.params, mi, strengths, mode=modes, branches=branches,
                                         num_images=num_images, posterior=posterior, vae_noise=vae_noise,
                                         vae_rng=k_vae if vae_noise is None else None, reference_tokens=tokens)
        noise = self._initial_noise(k_noise, prep.size, num_images, initial_noise)
        inj_key = injection_key(seed) if modes.injection and injection_noise is None else None
        # the app's "deterministic batch seed" seeds its Brownian trees alike; other samplers' draws differ per row
        shared = bool(deterministic_batch_seed) and resolve_name(sampler) in BROWNIAN_SAMPLERS
        latent = self.pipeline.denoise(self.params["unet"], conds, noise, guidance, sampler=(sampler, steps, schedule),
                                       branches=branches, progress=progress, key=k_sampler,
                                       sampler_noise=sampler_noise, batch_shared_noise=shared,
                                       injection_key=inj_key,
                                       injection_noise=injection_noise if modes.injection else None)
        x = np.asarray(self.pipeline.decode(self.params["vae"], latent))
        if remove_background_in_result:
            method = _mask_method(reference_mask)
            x = np.stack([self.remove_background(im, reference_mask_threshold, method=method) for im in x])
        return _deliver(x, prep.box if crop else None, output)

    def _initial_noise(self, key, size: tuple[int, int], num_images: int, given=None):
        """x_T: the seed's draw, or `given` (checked against the latent shape)."""
        H, W = size
        shape = (num_images, H // 8, W // 8, self.config.unet.in_channels)
        noise = _noise_jit(key, shape) if given is None else jnp.asarray(given, jnp.float32)
        if noise.shape != shape:
            raise ValueError(f"initial_noise must have shape {shape} (num_images, H/8, W/8, 4), got {noise.shape}")
        return noise

    def remove_background(self, image: np.ndarray, threshold: float = 0.5, method: Optional[str] = None) -> np.ndarray:
        """The app's "Remove background in result": whiten (H, W, 3) [-1, 1] pixels whose character
        mask (no dilation; extractor `method` as in `colorize`'s reference_mask) is below `threshold`."""
        image = np.asarray(image, np.float32)
        m = self._reference_mask(pre.to_uint8(image), None, dilate=False, method=method, image=image[None])[0]
        return np.where(m >= threshold, image, 1.0).astype(np.float32)


def _check_request(steps: int, num_images: int, output: str, reference_mask) -> None:
    """Refuse bad arguments of `colorize` before any work."""
    if steps < 1 or num_images < 1:
        raise ValueError("steps and num_images must be >= 1")
    if output not in ("pil", "array"):
        raise ValueError(f"output must be 'pil' or 'array', got {output!r}")
    if isinstance(reference_mask, str) and _mask_method(reference_mask) is None and not _looks_like_path(
            reference_mask):
        raise ValueError(f"reference_mask must be an image, an existing file or one of "
                         f"{REFERENCE_MASK_METHODS}, got {reference_mask!r}")


def _deliver(x: np.ndarray, box, output: str):
    """(n, H, W, 3) [-1, 1] -> float arrays or PIL images, cropped to `box` (the sketch's area) if given."""
    if output == "array":
        return x if box is None else pre.crop_to_box(x, box)
    images = pre.to_pil(x)
    return images if box is None else [pre.crop_to_box(im, box) for im in images]


def requested_modes(mode, flags: dict) -> Modes:
    """`Modes` of a `mode` shorthand and the app's checkboxes (set ones override the shorthand)."""
    names = {"style_enhance": "style", "background_enhance": "background", "foreground_enhance": "foreground",
             "attention_injection": "injection"}
    unknown = set(flags) - set(names)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
    return resolve_modes(mode, **{names[k]: v for k, v in flags.items()})


def _looks_like_path(value: str) -> bool:
    import os

    return os.path.exists(value)


def _pad_rgb(a: np.ndarray, pad_scale: float, fill=255, dtype=np.uint8) -> np.ndarray:
    """The authors' `pad_image_with_margin`: width to int(w * pad_scale), content centred."""
    h, w = a.shape[:2]
    nw = int(w * pad_scale)
    out = np.full((h, nw) + a.shape[2:], fill, dtype)
    left = (nw - w) // 2
    out[:, left:left + w] = a
    return out
