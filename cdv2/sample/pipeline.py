"""The jitted inference core: conditions once, then the whole denoising loop as one `jax.jit`.

    pipe = Pipeline(config)                      # modules only; params are passed in
    conds, _ = pipe.prepare(params, inputs, strengths, mode="full", branches=..., num_images=1)
    latent = pipe.denoise(params["unet"], conds, noise, guidance, sampler=("diffuser_dpm", 20, "Automatic"))
    images = pipe.decode(params["vae"], latent)

Static (compiles once per value, then cached): image size, step count, sampler and schedule, the
mode flags, which guidance branches exist, num_images. Traced (never recompiles): guidance scales,
reference/fg/bg/merge scales, thresholds, the guidance window, the noise (seed), all conditions.
Reference and background images of ANY size are resized on the host to fixed shapes
(`conditions.to_model_inputs`), so a new image size never recompiles `prepare` either.
"""
from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

from cdv2.config import ModelConfig
from cdv2.model import build
from cdv2.diffusion import guidance as cfg_guidance
from cdv2.sample.conditions import (MODE_SHORTHANDS, VAE_NOISE_SLOTS, Inputs, ModelInputs, Modes, Strengths,
                                    UNetConditions, prepare_conditions, resolve_modes, to_model_inputs)
from cdv2.sample.scales import reference_scales as default_reference_scales

MODES = {name: (m.style, m.background) for name, m in MODE_SHORTHANDS.items()}  # shorthand -> (style, bg)


@struct.dataclass
class Guidance:
    """Per-step numbers of the denoiser (all traced). The guidance window: the reference context
    is used only where start <= tr <= end and not no_start <= tr <= no_end, tr = 1 - t/(T-1)
    (the authors' intended `apply_model`; at the defaults it is always on)."""

    reference_guidance: jnp.ndarray = 4.0
    sketch_guidance: jnp.ndarray = 1.0
    sketch_mask_threshold: jnp.ndarray = 0.05   # ts_s
    reference_scales: jnp.ndarray = struct.field(default_factory=default_reference_scales)
    fg_scale: jnp.ndarray = 1.0
    bg_scale: jnp.ndarray = 1.0
    merge_scale: jnp.ndarray = 0.0
    guidance_start: jnp.ndarray = 0.0
    guidance_end: jnp.ndarray = 1.0
    no_guidance_start: jnp.ndarray = -0.05
    no_guidance_end: jnp.ndarray = -0.05


def mode_flags(mode: str) -> tuple[bool, bool]:
    """(style, background) of a shorthand mode name (kept for callers of the first API)."""
    m = resolve_modes(mode)
    return m.style, m.background


def guidance_active(t, g: Guidance, num_timesteps: int = 1000):
    """True where the reference context is used at model timestep t (float, fractional for
    k-diffusion). Outside, the context is zero for every branch (the authors' one zero token:
    attention over all-zero keys/values without biases gives the same zero output)."""
    tr = 1.0 - jnp.asarray(t, jnp.float32) / (num_timesteps - 1)
    inside = (tr >= g.guidance_start) & (tr <= g.guidance_end)
    excluded = (tr >= g.no_guidance_start) & (tr <= g.no_guidance_end)
    return inside & ~excluded


def _sampler_spec(sampler) -> tuple[str, int, str]:
    """(name, steps, schedule) from the tuple form; a bool schedule is the first API's `karras`."""
    name, steps, schedule = (tuple(sampler) + ("Automatic",))[:3]
    if isinstance(schedule, bool):
        schedule = "Karras" if schedule else "Automatic"
    return str(name), int(steps), str(schedule)


class Pipeline:
    """Holds the Flax modules and the jitted functions; params are always arguments."""

    def __init__(self, config: ModelConfig, dtype=jnp.float32, attention_impl: Optional[str] = "auto"):
        self.config = config
        self.components = build(config, dtype=dtype, attention_impl=attention_impl)
        self.trace_counts = {"prepare": 0, "denoise": 0, "decode": 0}  # bumped at trace time only
        self._prepare = jax.jit(self._prepare_impl, static_argnames=("modes", "branches", "num_images"))
        self._denoise = jax.jit(self._denoise_impl, static_argnames=(
            "sampler", "branches", "use_lora", "progress", "batch_shared_noise"))
        self._decode = jax.jit(self._decode_impl)

    # -- conditions ---------------------------------------------------------------------------
    def _prepare_impl(self, params, inputs: ModelInputs, strengths: Strengths, vae_noise, vae_rng, *, modes,
                      branches, num_images):
        self.trace_counts["prepare"] += 1
        if vae_noise is None and vae_rng is not None:  # one draw per latent slot, from the key
            lat = (1, inputs.sketch.shape[1] // 8, inputs.sketch.shape[2] // 8, self.config.vae.embed_dim)
            vae_noise = {k: jax.random.normal(jax.random.fold_in(vae_rng, i), lat, jnp.float32)
                         for i, k in enumerate(VAE_NOISE_SLOTS)}
        strengths = strengths.replace(reference_mask_threshold=0.0)  # applied on the host already
        return prepare_conditions(self.components, params, inputs, strengths, modes=modes, branches=branches,
                                  num_images=num_images, vae_noise=vae_noise)

    def model_inputs(self, inputs: Union[Inputs, ModelInputs], modes: Modes,
                     reference_mask_threshold: float = 0.5) -> ModelInputs:
        """Host-side resize of reference/background to the fixed shapes `prepare` compiles for."""
        if isinstance(inputs, ModelInputs):
            return inputs
        return to_model_inputs(inputs, self.config.clip.image_size, modes, reference_mask_threshold)

    def prepare(self, params, inputs: Union[Inputs, ModelInputs], strengths: Strengths = Strengths(), *,
                mode: Union[str, Modes] = "vanilla", branches: tuple[str, ...], num_images: int = 1,
                posterior: str = "mean", vae_noise: Optional[dict] = None, vae_rng=None):
        """Conditions of one generation. posterior: "mean" (VAE posterior mean) or "sample" (the
        authors' draw: explicit `vae_noise` {"reference"|"background": (1,h,w,4)} or `vae_rng`)."""
        modes = resolve_modes(mode)
        if posterior not in ("mean", "sample"):
            raise ValueError(f"posterior must be 'mean' or 'sample', got {posterior!r}")
        if posterior == "mean":
            vae_noise = vae_rng = None
        elif vae_noise is None and vae_rng is None:
            raise ValueError("posterior='sample' needs vae_noise or vae_rng")
        elif vae_noise is not None:
            unknown = set(vae_noise) - set(VAE_NOISE_SLOTS)
            if unknown:
                raise ValueError(f"vae_noise keys must be among {VAE_NOISE_SLOTS}, got {sorted(unknown)}")
            vae_rng = None
        mi = self.model_inputs(inputs, modes, float(strengths.reference_mask_threshold))
        return self._prepare(params, mi, strengths, vae_noise, vae_rng, modes=modes, branches=tuple(branches),
                             num_images=num_images)

    # -- the denoising loop -------------------------------------------------------------------
    def unet_call(self, unet_params, conds: UNetConditions, g: Guidance, x_all, t, use_lora: bool = True):
        """One raw U-Net call on the branch-stacked batch x_all (R, h, w, 4) at scalar timestep t,
        with the guidance window applied to the context: (R, h, w, 4) v-predictions."""
        use_lora = use_lora and conds.use_lora and conds.mask is not None
        tt = jnp.full((x_all.shape[0],), t, jnp.float32)
        context = jnp.where(guidance_active(t, g, self.config.schedule.timesteps), conds.context, 0.0)
        return self.components.unet.apply(
            {"params": unet_params}, x_all, tt, context, control=conds.control, mask=conds.mask,
            threshold=g.sketch_mask_threshold, hs_bg=conds.hs_bg, style=conds.style, use_lora=use_lora,
            reference_scales=g.reference_scales, fg_scale=g.fg_scale, bg_scale=g.bg_scale,
            merge_scale=g.merge_scale)

    def model_fn(self, unet_params, conds: UNetConditions, g: Guidance, branches, use_lora: bool = True):
        """(x_in (B,h,w,4), t scalar) -> guided v: the U-Net on every branch, the guidance window, CFG."""
        nb = len(branches)

        def fn(x_in, t):
            out = self.unet_call(unet_params, conds, g, jnp.concatenate([x_in] * nb, axis=0), t, use_lora)
            return cfg_guidance.combine(out, branches, g.reference_guidance, g.sketch_guidance)

        return fn

    def _denoise_impl(self, unet_params, conds: UNetConditions, noise, g: Guidance, key, sampler_noise, *,
                      sampler, branches, use_lora, progress, batch_shared_noise):
        from cdv2.diffusion.samplers import make_sampler, sample

        self.trace_counts["denoise"] += 1
        name, steps, schedule = sampler
        s = make_sampler(name, steps, schedule, schedule_cfg=self.config.schedule)  # host tables, trace time
        fn = self.model_fn(unet_params, conds, g, branches, use_lora)

        def with_progress(x_in, t):  # a host callback per U-Net call (off for benchmarks and serving)
            jax.debug.callback(_report_step, s.num_calls, ordered=True)
            return fn(x_in, t)

        return sample(s, with_progress if progress else fn, noise, key, sampler_noise,
                      batch_shared_noise=batch_shared_noise)

    def denoise(self, unet_params, conds: UNetConditions, noise, guidance: Guidance, *, sampler,
                branches: tuple[str, ...], use_lora: bool = True, progress: bool = False, key=None,
                sampler_noise=None, batch_shared_noise: bool = False):
        """noise: (num_images, h, w, 4) standard normal x_T. sampler: (name, steps[, schedule]) with the
        app's names ("diffuser_dpm", "DPM++ 2M SDE", ...; "dpmpp_2m" etc. too) and schedules
        ("Automatic", "Karras", ...; a bool = the first API's karras flag). key / sampler_noise: the
        draws of stochastic samplers (`cdv2.diffusion.samplers.sample`); batch_shared_noise: the app's
        "deterministic batch seed" (every row the same draws). use_lora: allow the fg/bg LoRAs (the
        authors' BG enhance)."""
        out = self._denoise(unet_params, conds, noise, guidance, key, sampler_noise, sampler=_sampler_spec(sampler),
                            branches=tuple(branches), use_lora=use_lora, progress=progress,
                            batch_shared_noise=batch_shared_noise)
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


def _report_step(total):
    from tqdm import tqdm

    bar = _PROGRESS.get("bar")
    if bar is None or bar.n >= bar.total:
        if bar is not None:
            bar.close()
        bar = _PROGRESS["bar"] = tqdm(total=int(total), desc="denoising", unit="call")
    bar.update(1)


def _close_progress():
    bar = _PROGRESS.pop("bar", None)
    if bar is not None:
        bar.close()
