"""The jitted inference core: conditions once, then the whole denoising loop as one `jax.jit`.

    pipe = Pipeline(config)                      # modules only; params are passed in
    conds, _ = pipe.prepare(params, inputs, strengths, mode="full", branches=..., num_images=1)
    latent = pipe.denoise(params["unet"], conds, noise, guidance, sampler=("diffuser_dpm", 20, "Automatic"))
    images = pipe.decode(params["vae"], latent)

Static (compiles once per value, then cached): image size, step count, sampler and schedule, the
mode flags, which guidance branches exist, num_images. Traced (never recompiles): guidance scales,
reference/fg/bg/merge scales, thresholds, the guidance window, the injection fidelities and start
step, the noise (seed), all conditions (incl. text-manipulated reference tokens).

Attention injection (`Modes(injection=True)`): every U-Net call becomes the authors' hooked call
(`cdv2.modules.injection.reference_injection_call`): while 1 - t/999 >= injection_start_step, a
write pass on q_sample(r, t) (one fresh (1,h,w,4) normal per call: fold_in(injection_key, call), or
`injection_noise[call]`) and the read pass; before it, the plain call. Heun/DPM2-style samplers call
it twice per step, each with its own write pass.
Text manipulation: `manipulated_tokens` gives the reference's CLIP tokens after the authors'
`local_manipulate`; `prepare(..., reference_tokens=...)` uses them instead of the reference's.
Reference and background images of ANY size are resized on the host to fixed shapes
(`conditions.to_model_inputs`), so a new image size never recompiles `prepare` either.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

from cdv2.config import ModelConfig
from cdv2.model import build
from cdv2.diffusion import guidance as cfg_guidance
from cdv2.diffusion.schedule import ldm_schedule_buffers
from cdv2.modules.injection import reference_injection_call
from cdv2.sample.conditions import (MODE_SHORTHANDS, VAE_NOISE_SLOTS, Inputs, ModelInputs, Modes, Strengths,
                                    UNetConditions, prepare_conditions, resolve_modes, to_model_inputs)
from cdv2.sample.injection import plain_rows as injection_plain_rows
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
    injection_fidelity: jnp.ndarray = 0.5      # "Injection fidelity (reference)"
    injection_start_step: jnp.ndarray = 0.0    # "Injection start step": write passes once 1 - t/999 >= this


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
        self._full_tokens = jax.jit(self._full_tokens_impl)
        buf = ldm_schedule_buffers(config.schedule)  # float32 buffers of the checkpoint (q_sample)
        self._q_sample_tables = tuple(jnp.asarray(buf[k], jnp.float32) for k in (
            "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"))

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
                posterior: str = "mean", vae_noise: Optional[dict] = None, vae_rng=None, reference_tokens=None):
        """Conditions of one generation. posterior: "mean" (VAE posterior mean) or "sample" (the
        authors' draw: explicit `vae_noise` {"reference"|"background"|"injection": (1,h,w,4)} or
        `vae_rng`). reference_tokens: (1, 256, C) CLIP tokens replacing the reference's (text
        manipulation, `manipulated_tokens`)."""
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
        if reference_tokens is not None:
            mi = mi.replace(reference_tokens=jnp.asarray(reference_tokens, jnp.float32))
        return self._prepare(params, mi, strengths, vae_noise, vae_rng, modes=modes, branches=tuple(branches),
                             num_images=num_images)

    # -- text manipulation ----------------------------------------------------------------------
    def _full_tokens_impl(self, clip_params, reference_clip):
        from cdv2.conditioning import normalize_for_clip

        return self.components.clip.apply({"params": clip_params}, normalize_for_clip(reference_clip), full=True
                                          ).astype(jnp.float32)

    def manipulated_tokens(self, params, inputs: Union[Inputs, ModelInputs], manipulations, encode_text,
                           mode: Union[str, Modes] = "vanilla"):
        """The reference's (1, 256, C) CLIP tokens after the authors' `local_manipulate`: the full
        tokens (CLS first) of the same squashed reference `prepare` encodes, shifted by every
        manipulation in order (`cdv2.sample.manipulation.manipulate_tokens`), CLS dropped.
        encode_text: texts -> (n, 1, C) unit features (`manipulation.make_text_encoder`)."""
        from cdv2.sample.manipulation import manipulate_tokens

        mi = self.model_inputs(inputs, resolve_modes(mode))
        full = self._full_tokens(params["clip"], jnp.asarray(mi.reference_clip))
        return manipulate_tokens(full, list(manipulations), encode_text)[:, 1:]

    # -- the denoising loop -------------------------------------------------------------------
    def unet_call(self, unet_params, conds: UNetConditions, g: Guidance, x_all, t, use_lora: bool = True,
                  q_noise=None, plain_rows: tuple = ()):
        """One raw U-Net call on the branch-stacked batch x_all (R, h, w, 4) at scalar timestep t,
        with the guidance window applied to the context: (R, h, w, 4) v-predictions. With attention
        injection (conds.injection), the authors' hooked call: q_noise (1, h, w, 4) is this call's
        q_sample draw, plain_rows the no-reference CFG rows (`injection.plain_rows`)."""
        use_lora = use_lora and conds.use_lora and conds.mask is not None
        tt = jnp.full((x_all.shape[0],), t, jnp.float32)
        context = jnp.where(guidance_active(t, g, self.config.schedule.timesteps), conds.context, 0.0)
        apply = functools.partial(self.components.unet.apply, {"params": unet_params}, use_lora=use_lora)
        kw = dict(context=context, control=conds.control, mask=conds.mask, threshold=g.sketch_mask_threshold,
                  hs_bg=conds.hs_bg, style=conds.style, reference_scales=g.reference_scales, fg_scale=g.fg_scale,
                  bg_scale=g.bg_scale, merge_scale=g.merge_scale)
        inj = conds.injection
        if inj is None:
            return apply(x_all, tt, **kw)
        if q_noise is None:
            raise ValueError("attention injection needs this call's q_sample noise (q_noise)")
        sac, s1m = self._q_sample_tables
        return reference_injection_call(
            apply, x_all, tt, r=inj.r, noise=q_noise, sqrt_alphas_cumprod=sac, sqrt_one_minus_alphas_cumprod=s1m,
            write_control=inj.write_control, fidelity=g.injection_fidelity, plain_rows=tuple(plain_rows),
            start_step=g.injection_start_step, num_timesteps=self.config.schedule.timesteps, **kw)

    def model_fn(self, unet_params, conds: UNetConditions, g: Guidance, branches, use_lora: bool = True,
                 injection_key=None, injection_noise=None):
        """(x_in (B,h,w,4), t scalar, call index k) -> guided v: the U-Net on every branch, the
        guidance window, attention injection (q_sample draw k: injection_noise[k] or
        N(0,1) from fold_in(injection_key, k)), CFG."""
        nb = len(branches)

        def fn(x_in, t, k):
            q_noise, rows = None, ()
            if conds.injection is not None:
                r = conds.injection.r
                if injection_noise is not None:
                    q_noise = jnp.asarray(injection_noise, jnp.float32)[k]
                elif injection_key is not None:
                    q_noise = jax.random.normal(jax.random.fold_in(injection_key, k), r.shape, jnp.float32)
                rows = injection_plain_rows(branches, x_in.shape[0])
            out = self.unet_call(unet_params, conds, g, jnp.concatenate([x_in] * nb, axis=0), t, use_lora,
                                 q_noise=q_noise, plain_rows=rows)
            return cfg_guidance.combine(out, branches, g.reference_guidance, g.sketch_guidance)

        return fn

    def _denoise_impl(self, unet_params, conds: UNetConditions, noise, g: Guidance, key, sampler_noise,
                      injection_key, injection_noise, *, sampler, branches, use_lora, progress, batch_shared_noise):
        from cdv2.diffusion.samplers import make_sampler, sample

        self.trace_counts["denoise"] += 1
        name, steps, schedule = sampler
        s = make_sampler(name, steps, schedule, schedule_cfg=self.config.schedule)  # host tables, trace time
        if conds.injection is not None:
            if injection_noise is None and injection_key is None:
                raise ValueError("attention injection needs injection_key or injection_noise")
            want = (s.num_calls,) + tuple(conds.injection.r.shape)
            if injection_noise is not None and tuple(injection_noise.shape) != want:
                raise ValueError(f"injection_noise must have shape {want} (one q_sample draw per U-Net call; "
                                 f"see cdv2.sample.injection.noise_per_call), got {tuple(injection_noise.shape)}")
        fn = self.model_fn(unet_params, conds, g, branches, use_lora, injection_key, injection_noise)

        def with_progress(x_in, t, k):  # a host callback per U-Net call (off for benchmarks and serving)
            jax.debug.callback(_report_step, s.num_calls, ordered=True)
            return fn(x_in, t, k)

        return sample(s, with_progress if progress else fn, noise, key, sampler_noise,
                      batch_shared_noise=batch_shared_noise, pass_call_index=True)

    def denoise(self, unet_params, conds: UNetConditions, noise, guidance: Guidance, *, sampler,
                branches: tuple[str, ...], use_lora: bool = True, progress: bool = False, key=None,
                sampler_noise=None, batch_shared_noise: bool = False, injection_key=None, injection_noise=None):
        """noise: (num_images, h, w, 4) standard normal x_T. sampler: (name, steps[, schedule]) with the
        app's names ("diffuser_dpm", "DPM++ 2M SDE", ...; "dpmpp_2m" etc. too) and schedules
        ("Automatic", "Karras", ...; a bool = the first API's karras flag). key / sampler_noise: the
        draws of stochastic samplers (`cdv2.diffusion.samplers.sample`); batch_shared_noise: the app's
        "deterministic batch seed" (every row the same draws). use_lora: allow the fg/bg LoRAs (the
        authors' BG enhance). Attention injection (conds.injection set): injection_key draws call k's
        q_sample noise from fold_in(injection_key, k); injection_noise (num_calls, 1, h, w, 4) gives
        them explicitly (entries of calls before the start step are unused)."""
        if injection_noise is not None:
            injection_noise = jnp.asarray(injection_noise, jnp.float32)
        out = self._denoise(unet_params, conds, noise, guidance, key, sampler_noise, injection_key, injection_noise,
                            sampler=_sampler_spec(sampler), branches=tuple(branches), use_lora=use_lora,
                            progress=progress, batch_shared_noise=batch_shared_noise)
        if progress:
            jax.block_until_ready(out)
            _close_progress()
        return out

    # -- one whole generation (traceable) --------------------------------------------------------
    def generate_impl(self, params, inputs: ModelInputs, strengths: Strengths, guidance: Guidance, keys, *,
                      modes: Modes, branches: tuple[str, ...], sampler, posterior: str = "sample"):
        """prepare -> denoise -> decode of ONE image as a pure traceable function, for `jax.vmap` over
        distinct inputs (`cdv2.sample.batch`). keys: (x_T, VAE posterior, sampler, injection) keys of
        the seed (`seeds.seed_keys` + `seeds.injection_key`), so each image equals `Colorizer.colorize`
        with that seed. -> (1, H, W, 3) in [-1, 1]."""
        k_noise, k_vae, k_sampler, k_injection = keys
        conds, _ = self._prepare_impl(params, inputs, strengths, None, k_vae if posterior == "sample" else None,
                                      modes=modes, branches=branches, num_images=1)
        h, w = inputs.sketch.shape[1] // 8, inputs.sketch.shape[2] // 8
        noise = jax.random.normal(k_noise, (1, h, w, self.config.unet.in_channels), jnp.float32)
        latent = self._denoise_impl(params["unet"], conds, noise, guidance, k_sampler, None,
                                    k_injection if modes.injection else None, None, sampler=_sampler_spec(sampler),
                                    branches=branches, use_lora=True, progress=False, batch_shared_noise=False)
        return self._decode_impl(params["vae"], latent)

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
