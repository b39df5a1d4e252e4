"""The public inference API: `Colorizer.from_pretrained(path).colorize(sketch, reference, ...)`.

Host side: images are loaded, validated and turned into model arrays once; device side: one jitted
`prepare` (CLIP, VAE, sketch/background/style encoders), one jitted denoising loop, one jitted
decode. Changing guidance scales, strengths, thresholds or the seed never recompiles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cdv2.config import ModelConfig
from cdv2.modules.encoders import size_ratios
from cdv2.sample import masks as mask_ops
from cdv2.sample import preprocess as pre
from cdv2.sample.conditions import Inputs, Strengths
from cdv2.diffusion.guidance import branches_for
from cdv2.sample.pipeline import Guidance, Pipeline, mode_flags
from cdv2.sample.scales import reference_scales

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


@dataclass
class Prepared:
    """Model-ready inputs of one colorization (kept for inspection)."""

    inputs: Inputs
    box: tuple[int, int, int, int]
    size: tuple[int, int]


def _noise(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


_noise_jit = jax.jit(_noise, static_argnums=1)


class Colorizer:
    def __init__(self, params, config: ModelConfig, dtype: str = "float32", attention_impl: Optional[str] = "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.config = config
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.pipeline = Pipeline(config, dtype=DTYPES[dtype], attention_impl=attention_impl)

    @classmethod
    def from_pretrained(cls, path, clip: Optional[str] = None, *, config=None, dtype: str = "float32",
                        attention_impl: Optional[str] = "auto") -> "Colorizer":
        """`path`: a cdv2 weights directory, or the authors' v2 checkpoint (then `clip` names an
        open_clip ViT-H-14 file); see `cdv2.weights.pretrained.HOW_TO_GET_WEIGHTS`."""
        from cdv2.weights.pretrained import load_pretrained

        params, cfg = load_pretrained(path, clip=clip, config=config)
        return cls(params, cfg, dtype=dtype, attention_impl=attention_impl)

    # ------------------------------------------------------------------------------------------
    def prepare_inputs(self, sketch, reference, *, mode: str, background=None, sketch_mask=None,
                       reference_mask=None, size: Optional[tuple[int, int]] = None, long_side: int = 768,
                       sketch_polarity: str = "auto", sketch_mask_dilation: Optional[int] = None) -> Prepared:
        """Load and validate images and masks; returns model arrays (host numpy inside `Inputs`)."""
        _, background_enhance = mode_flags(mode)
        sk_rgb, _ = pre.load_image(sketch, what="sketch")
        if size is None:
            size = pre.choose_generation_size(sk_rgb.shape[:2], target_long_side=long_side)
        elif size[0] % 64 or size[1] % 64 or min(size) < 64:
            raise ValueError(f"size {size} (height, width) must be multiples of 64, at least 64")
        H, W = size
        sk, box = pre.prepare_sketch(sk_rgb, (H, W), polarity=sketch_polarity)
        ref, ref_hw = pre.prepare_reference(reference)
        bg = bg_ratios = None
        if background is not None:
            bg, bg_hw = pre.prepare_background(background)
            bg_ratios = size_ratios(bg_hw, (H, W))[None]
        smask = rmask = None
        if background_enhance:
            if sketch_mask is not None:
                m = mask_ops.load_mask(sketch_mask, sk_rgb.shape[:2], what="sketch mask", against="the sketch")
                full = mask_ops.place_mask_in_box(m, box, (H, W))
            else:  # approximation of the authors' sketch-segmentation network (documented in masks.py)
                dil = sketch_mask_dilation if sketch_mask_dilation is not None else max(1, round(max(H, W) / 96))
                full = mask_ops.estimate_sketch_mask(sk, dil)
            smask = mask_ops.latent_mask(full, (H // 8, W // 8))
            if background is None:
                if reference_mask is not None:
                    rmask = mask_ops.load_mask(reference_mask, ref_hw, what="reference mask", against="the reference")
                else:  # alpha channel, or an estimated plain background (approximates rmbg)
                    rgb, alpha = pre.load_image(reference, what="reference")
                    rmask = mask_ops.estimate_reference_mask(rgb, alpha)
        inputs = Inputs(sketch=sk, reference=ref, reference_ratios=size_ratios(ref_hw, (H, W))[None],
                        reference_mask=rmask, sketch_mask=smask, background=bg, background_ratios=bg_ratios)
        return Prepared(inputs, box, (H, W))

    def colorize(self, sketch, reference, *, mode: str = "full", background=None, sketch_mask=None,
                 reference_mask=None, steps: int = 20, sampler: str = "dpmpp_2m", karras: bool = False,
                 reference_guidance: float = 4.0, sketch_guidance: float = 1.0, reference_strength: float = 1.0,
                 per_layer_scales: Optional[Sequence[float]] = None, fg_strength: float = 1.0,
                 bg_strength: float = 1.0, merge_scale: float = 0.0, sketch_strength: float = 1.0,
                 background_factor: float = 1.0, sketch_mask_threshold: float = 0.05,
                 reference_mask_threshold: float = 0.5, seed: int = 0, num_images: int = 1,
                 size: Optional[tuple[int, int]] = None, long_side: int = 768, crop: bool = True,
                 sketch_polarity: str = "auto", progress: bool = False) -> list[Image.Image]:
        """Colorize `sketch` (path, PIL image or array; black lines on white or the reverse) after
        `reference`. mode: "vanilla" | "style" | "background" | "full". A `background` image
        replaces the reference's background (background modes). Masks are used as given, or
        estimated (see cdv2.sample.masks). Returns `num_images` PIL images."""
        if steps < 1 or num_images < 1:
            raise ValueError("steps and num_images must be >= 1")
        prep = self.prepare_inputs(sketch, reference, mode=mode, background=background, sketch_mask=sketch_mask,
                                   reference_mask=reference_mask, size=size, long_side=long_side,
                                   sketch_polarity=sketch_polarity)
        branches = branches_for(reference_guidance, sketch_guidance)
        strengths = Strengths(control_scale=sketch_strength, mask_scale=background_factor, merge_scale=merge_scale,
                              reference_mask_threshold=reference_mask_threshold)
        conds, _ = self.pipeline.prepare(self.params, prep.inputs, strengths, mode=mode, branches=branches,
                                         num_images=num_images)
        H, W = prep.size
        noise = _noise_jit(jnp.uint32(seed), (num_images, H // 8, W // 8, self.config.unet.in_channels))
        guidance = Guidance(reference_guidance=reference_guidance, sketch_guidance=sketch_guidance,
                            sketch_mask_threshold=sketch_mask_threshold,
                            reference_scales=reference_scales(reference_strength, per_layer=per_layer_scales),
                            fg_scale=fg_strength, bg_scale=bg_strength, merge_scale=merge_scale)
        latent = self.pipeline.denoise(self.params["unet"], conds, noise, guidance, sampler=(sampler, steps, karras),
                                       branches=branches, progress=progress)
        images = pre.to_pil(np.asarray(self.pipeline.decode(self.params["vae"], latent)))
        return [pre.crop_to_box(im, prep.box) for im in images] if crop else images
