"""The jitted inference core: conditions once, then the whole denoising loop as one `jax.jit`.

    pipe = Pipeline(config)                      # modules only; params are passed in
    conds, _ = pipe.prepare(params, inputs, strengths, mode="full", branches=..., num_images=1)
    latent = pipe.denoise(params["unet"], conds, noise, guidance, sampler=("dpmpp_2m", 20, False))
    images = pipe.decode(params["vae"], latent)

Static (compiles once per value, then cached): image size, step count, sampler, mode, which guidance
branches exist, num_images. Traced (never recompiles): guidance scales, reference/fg/bg/merge
scales, thresholds, the noise (seed), and all conditions.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from cdv2.config import ModelConfig
from cdv2.model import build
from cdv2.diffusion import guidance as cfg_guidance
from cdv2.sample.conditions import Inputs, Strengths, UNetConditions, prepare_conditions
from cdv2.sample.scales import reference_scales as default_reference_scales
from cdv2.diffusion.diffusers_samplers import make_sampler

MODES = {"vanilla": (False, False), "style": (True, False), "background": (False, True), "full": (True, True)}


@struct.dataclass
class Guidance:
    """Per-step numbers of the denoiser (all traced)."""

    reference_guidance: jnp.ndarray = 5.0
    sketch_guidance: jnp.ndarray = 1.0
    sketch_mask_threshold: jnp.ndarray = 0.05   # ts_s
    reference_scales: jnp.ndarray = struct.field(default_factory=default_reference_scales)
    fg_scale: jnp.ndarray = 1.0
    bg_scale: jnp.ndarray = 1.0
    merge_scale: jnp.ndarray = 0.0


def mode_flags(mode: str) -> tuple[bool, bool]:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
    return MODES[mode]


class Pipeline:
    """Holds the Flax modules and the jitted functions; params are always arguments."""

    def __init__(self, config: ModelConfig, dtype=jnp.float32, attention_impl: Optional[str] = "auto"):
        self.config = config
        self.components = build(config, dtype=dtype, attention_impl=attention_impl)
        self.trace_counts = {"prepare": 0, "denoise": 0, "decode": 0}  # bumped at trace time only
        self._prepare = jax.jit(self._prepare_impl, static_argnames=("mode", "branches", "num_images"))
        self._denoise = jax.jit(self._denoise_impl, static_argnames=("sampler", "branches", "use_lora", "progress"))
        self._decode = jax.jit(self._decode_impl)

    # -- conditions ---------------------------------------------------------------------------
    def _prepare_impl(self, params, inputs: Inputs, strengths: Strengths, vae_rng, *, mode, branches, num_images):
        self.trace_counts["prepare"] += 1
        style, background = mode_flags(mode)
        return prepare_conditions(self.components, params, inputs, strengths, style=style, background=background,
                                  branches=branches, num_images=num_images, vae_rng=vae_rng)

    def prepare(self, params, inputs: Inputs, strengths: Strengths = Strengths(), *, mode: str,
                branches: tuple[str, ...], num_images: int = 1, vae_rng=None):
        mode_flags(mode)
        return self._prepare(params, inputs, strengths, vae_rng, mode=mode, branches=branches, num_images=num_images)

    # -- the denoising loop -------------------------------------------------------------------
    def _denoise_impl(self, unet_params, conds: UNetConditions, noise, g: Guidance, *, sampler, branches, use_lora,
                      progress):
        self.trace_counts["denoise"] += 1
        s = make_sampler(*sampler, self.config.schedule)  # host-side tables; built at trace time only
        timesteps = jnp.asarray(s.timesteps)
        nb = len(branches)
        use_lora = use_lora and conds.mask is not None

        def body(i, state):
            x_in = s.scale_model_input(state, state.x, i)
            x_all = jnp.concatenate([x_in] * nb, axis=0)
            t = jnp.full((x_all.shape[0],), timesteps[i], jnp.float32)
            out = self.components.unet.apply(
                {"params": unet_params}, x_all, t, conds.context, control=conds.control, mask=conds.mask,
                threshold=g.sketch_mask_threshold, hs_bg=conds.hs_bg, style=conds.style, use_lora=use_lora,
                reference_scales=g.reference_scales, fg_scale=g.fg_scale, bg_scale=g.bg_scale,
                merge_scale=g.merge_scale)
            v = cfg_guidance.combine(out, branches, g.reference_guidance, g.sketch_guidance)
            if progress:  # a host callback per step (off for benchmarks and serving)
                jax.debug.callback(_report_step, i, s.num_steps, ordered=True)
            return s.step(state, v, i)

        state = s.init(noise * s.init_noise_sigma)
        return jax.lax.fori_loop(0, s.num_steps, body, state).x

    def denoise(self, unet_params, conds: UNetConditions, noise, guidance: Guidance, *,
                sampler: tuple[str, int, bool], branches: tuple[str, ...], use_lora: bool = True,
                progress: bool = False):
        """noise: (num_images, h, w, 4) standard normal. sampler: (name, steps, karras).
        use_lora: the fg/bg LoRAs in background modes (the authors' intended behaviour)."""
        out = self._denoise(unet_params, conds, noise, guidance, sampler=tuple(sampler), branches=tuple(branches),
                            use_lora=use_lora, progress=progress)
        if progress:
            jax.block_until_ready(out)
            _close_progress()
        return out

    # -- decoding -----------------------------------------------------------------------------
    def _decode_impl(self, vae_params, latent):
        self.trace_counts["decode"] += 1
        from cdv2.modules.vae import latent_to_image

        return latent_to_image(self.components.vae, vae_params, latent)

    def decode(self, vae_params, latent):
        return self._decode(vae_params, latent)


_PROGRESS: dict = {}


def _report_step(i, total):
    from tqdm import tqdm

    bar = _PROGRESS.get("bar")
    if bar is None or int(i) == 0:
        if bar is not None:
            bar.close()
        bar = _PROGRESS["bar"] = tqdm(total=int(total), desc="denoising", unit="step")
    bar.update(1)


def _close_progress():
    bar = _PROGRESS.pop("bar", None)
    if bar is not None:
        bar.close()
