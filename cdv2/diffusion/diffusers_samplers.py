"""Diffusers-equivalent samplers as pure init/step functions for a jitted fixed-length loop.

Every per-step scalar (sigmas, solver coefficients) is computed on the host in float64 from the
same float32 schedule diffusers uses, stored as float32 tables, and indexed with the traced step
index, so a whole sampling loop is one `jax.jit` with only the step count static:

    sampler = make_sampler("dpmpp_2m", 8)
    ts = jnp.asarray(sampler.timesteps)
    def body(i, state):
        x_in = sampler.scale_model_input(state, state.x, i)
        v = unet(x_in, ts[i])                      # raw v-prediction (after CFG)
        return sampler.step(state, v, i)
    state = jax.lax.fori_loop(0, sampler.num_steps, body, sampler.init(noise * sampler.init_noise_sigma))

The updates are diffusers' formulas with the scalar factors folded on the host; the state is float32
(diffusers also upcasts the sample to float32).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from cdv2.config import ScheduleConfig
from cdv2.diffusion import schedule as sch

SAMPLER_ALIASES = {"diffuser_dpm": "dpmpp_2m", "dpm": "dpmpp_2m", "diffuser_ddim": "ddim",
                   "diffuser_pndm": "pndm", "diffuser_lms": "lms"}


class SamplerState(NamedTuple):
    x: jnp.ndarray        # current latent x_t (float32)
    prev_x0: jnp.ndarray  # DPM++ 2M: the previous step's x0 prediction (zeros for the others)
    hist: tuple = ()      # PNDM / LMS history buffers (see samplers/diffusers_pndm_lms.py)


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: usable as a jit static arg
class Sampler:
    name: str
    num_steps: int
    timesteps: np.ndarray        # (N,) int32: the integer timestep given to the U-Net at step i
    sigmas: np.ndarray           # (N+1,) float32 noise levels sqrt((1-a)/a) at each step, then the end
    init_noise_sigma: float      # x_T = randn * init_noise_sigma
    scale_model_input: Callable  # (state, x, i) -> U-Net input
    step: Callable               # (state, v, i) -> next state
    init_hist: Optional[Callable] = None  # x -> history tuple (PNDM, LMS)

    @property
    def num_calls(self) -> int:  # U-Net calls of one run (PNDM: steps + 9 Runge-Kutta calls)
        return len(self.timesteps)

    def init(self, x_T) -> SamplerState:
        x = jnp.asarray(x_T, jnp.float32)
        hist = self.init_hist(x) if self.init_hist is not None else ()
        return SamplerState(x=x, prev_x0=jnp.zeros_like(x), hist=hist)


def _f32(a) -> np.ndarray:
    return np.asarray(a, np.float64).astype(np.float32)


def _identity_input(state, x, i):
    return x


def _dpmpp_2m(num_steps: int, karras: bool, cfg: ScheduleConfig, steps_offset: int) -> Sampler:
    """DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, "midpoint",
    lower_order_final=True, final_sigmas_type="zero", v_prediction, leading spacing or Karras)."""
    train_sigmas = sch.sigmas_from_alphas_cumprod(sch.diffusers_alphas_cumprod(cfg))
    if karras:
        timesteps, sig = sch.dpm_karras_schedule(train_sigmas, num_steps)
    else:
        timesteps = sch.dpm_leading_timesteps(num_steps, cfg.timesteps, steps_offset)
        sig = train_sigmas[timesteps]
    sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)  # final_sigmas_type="zero"

    s = sigmas.astype(np.float64)
    alpha = 1.0 / np.sqrt(s ** 2 + 1.0)   # VP alpha_t, sigma_t from the VE sigma
    sigma_t = s * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma_t)  # +inf at the final sigma 0
    h = lam[1:] - lam[:-1]
    expm = np.exp(-h) - 1.0                  # -1 on the last step (h = inf)
    ratio = sigma_t[1:] / sigma_t[:-1]       # 0 on the last step
    d0 = -alpha[1:] * expm                   # coefficient of D0 (= x0)
    # second order: D1 = (x0 - prev)/r0 with r0 = h_{i-1}/h_i, weighted 0.5*d0. diffusers uses first
    # order on step 0 (no history) and on the last step (final sigma 0 / lower_order_final).
    d1 = np.zeros(num_steps)
    for i in range(1, num_steps - 1):
        d1[i] = 0.5 * d0[i] / (h[i - 1] / h[i])
    tab = {k: jnp.asarray(_f32(v)) for k, v in dict(
        alpha=alpha[:-1], sigma_t=sigma_t[:-1], ratio=ratio, d0=d0, d1=d1).items()}

    def step(state: SamplerState, v, i) -> SamplerState:
        x = state.x
        x0 = tab["alpha"][i] * x - tab["sigma_t"][i] * v.astype(jnp.float32)
        x_next = tab["ratio"][i] * x + tab["d0"][i] * x0 + tab["d1"][i] * (x0 - state.prev_x0)
        return SamplerState(x=x_next, prev_x0=x0)

    return Sampler("dpmpp_2m", num_steps, timesteps.astype(np.int32), sigmas, 1.0, _identity_input, step)


def _euler(num_steps: int, cfg: ScheduleConfig, steps_offset: int) -> Sampler:
    """EulerDiscreteScheduler (v_prediction, leading, s_churn 0, final sigma 0)."""
    train_sigmas = sch.sigmas_from_alphas_cumprod(sch.diffusers_alphas_cumprod(cfg))
    timesteps = sch.leading_timesteps(num_steps, cfg.timesteps, steps_offset)
    sigmas = np.concatenate([train_sigmas[timesteps], [0.0]]).astype(np.float32)
    s = sigmas.astype(np.float64)
    c_in = 1.0 / np.sqrt(s[:-1] ** 2 + 1.0)            # scale_model_input: x / sqrt(sigma^2+1)
    c_out = -s[:-1] / np.sqrt(s[:-1] ** 2 + 1.0)       # x0 = c_out v + c_skip x
    c_skip = 1.0 / (s[:-1] ** 2 + 1.0)
    dt_over_sigma = (s[1:] - s[:-1]) / s[:-1]          # x' = x + (x - x0)/sigma * dt
    tab = {k: jnp.asarray(_f32(v)) for k, v in dict(
        c_in=c_in, c_out=c_out, c_skip=c_skip, dt_over_sigma=dt_over_sigma).items()}
    # diffusers "leading": sqrt(max_sigma^2 + 1) (linspace/trailing would use max_sigma itself)
    init_noise_sigma = float(np.float32(np.sqrt(np.float64(sigmas.max()) ** 2 + 1.0)))

    def scale_model_input(state, x, i):
        return x * tab["c_in"][i]

    def step(state: SamplerState, v, i) -> SamplerState:
        x = state.x
        x0 = tab["c_out"][i] * v.astype(jnp.float32) + tab["c_skip"][i] * x
        return SamplerState(x=x + (x - x0) * tab["dt_over_sigma"][i], prev_x0=state.prev_x0)

    return Sampler("euler", num_steps, timesteps.astype(np.int32), sigmas, init_noise_sigma,
                   scale_model_input, step)


def _ddim(num_steps: int, cfg: ScheduleConfig, steps_offset: int, set_alpha_to_one: bool) -> Sampler:
    """DDIMScheduler (eta 0, clip_sample False, v_prediction, leading)."""
    ac = sch.diffusers_alphas_cumprod(cfg)
    timesteps = sch.leading_timesteps(num_steps, cfg.timesteps, steps_offset)
    prev = timesteps - cfg.timesteps // num_steps
    final = np.float32(1.0) if set_alpha_to_one else ac[0]
    a = ac[timesteps].astype(np.float64)
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float64)
    tab = {k: jnp.asarray(_f32(v)) for k, v in dict(
        sa=np.sqrt(a), sb=np.sqrt(1.0 - a), sa_prev=np.sqrt(a_prev), sb_prev=np.sqrt(1.0 - a_prev)).items()}
    sigmas = _f32(np.sqrt((1.0 - np.append(a, a_prev[-1])) / np.append(a, a_prev[-1])))

    def step(state: SamplerState, v, i) -> SamplerState:
        x, v = state.x, v.astype(jnp.float32)
        x0 = tab["sa"][i] * x - tab["sb"][i] * v
        eps = tab["sa"][i] * v + tab["sb"][i] * x
        return SamplerState(x=tab["sa_prev"][i] * x0 + tab["sb_prev"][i] * eps, prev_x0=state.prev_x0)

    return Sampler("ddim", num_steps, timesteps.astype(np.int32), sigmas, 1.0, _identity_input, step)


def make_sampler(name: str, num_steps: int, karras: bool = False,
                 schedule_cfg: ScheduleConfig = ScheduleConfig(), *,
                 steps_offset: int = 1, set_alpha_to_one: bool = True) -> Sampler:
    """A diffusers-equivalent sampler: "dpmpp_2m" (= the authors' "diffuser_dpm", optionally with
    Karras sigmas), "euler", "ddim" (= "diffuser_ddim"), "pndm" (= "diffuser_pndm", with the
    Runge-Kutta warm-up: steps + 9 calls) or "lms" (= "diffuser_lms", optionally Karras). The authors' scheduler configs leave
    DDIM's set_alpha_to_one at diffusers' default True; pass False for the other convention."""
    name = SAMPLER_ALIASES.get(name, name)
    if schedule_cfg.parameterization != "v":
        raise NotImplementedError(f"only v-prediction is implemented, got {schedule_cfg.parameterization!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if karras and name not in ("dpmpp_2m", "lms"):
        raise NotImplementedError(f"Karras sigmas are only implemented for dpmpp_2m and lms, not {name!r}")
    if name == "dpmpp_2m":
        return _dpmpp_2m(num_steps, karras, schedule_cfg, steps_offset)
    if name == "euler":
        return _euler(num_steps, schedule_cfg, steps_offset)
    if name == "ddim":
        return _ddim(num_steps, schedule_cfg, steps_offset, set_alpha_to_one)
    if name in ("pndm", "lms"):
        from cdv2.diffusion.samplers import diffusers_pndm_lms as extra  # imports this module

        return extra.pndm(num_steps, schedule_cfg, steps_offset) if name == "pndm" else \
            extra.lms(num_steps, karras, schedule_cfg, steps_offset)
    raise ValueError(f"unknown sampler {name!r}; known: dpmpp_2m, euler, ddim, pndm, lms "
                     f"(aliases {sorted(SAMPLER_ALIASES)})")
