"""k-diffusion noise levels with `CompVisVDenoiser` semantics: sigma tables, sigma<->t, scalings.

The discrete schedule is the authors' model buffer `alphas_cumprod` (computed in float64, stored
float32) turned into 1,000 float32 sigmas sqrt((1-a)/a) and their logs, as k-diffusion's
`DiscreteSchedule` does. Host-side functions (numpy, float32 like torch) build the sigma schedules
the app offers; the JAX functions (`sigma_to_t`, `scalings`) run inside the jitted loop, so the
schedule is a traced array and changing it (or its parameters) never recompiles.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from cdv2.config import ScheduleConfig
from cdv2.diffusion import schedule as sch

# app label -> canonical name (refnet/sampling/scheduler.py); "automatic" = the sampler's default
SCHEDULES = {"Automatic": "automatic", "Uniform": "uniform", "Karras": "karras", "Exponential": "exponential",
             "Polyexponential": "polyexponential", "SGM Uniform": "sgm_uniform"}
_SCHEDULE_ALIASES = {**{v: v for v in SCHEDULES.values()}, **{k.lower(): v for k, v in SCHEDULES.items()},
                     "sgmuniform": "sgm_uniform", "none": "none"}
DEFAULT_RHO = {"karras": 7.0, "polyexponential": 1.0}


def canonical_schedule(name: str) -> str:
    key = SCHEDULES.get(name, name).lower()
    if key not in _SCHEDULE_ALIASES:
        raise ValueError(f"unknown noise schedule {name!r}; known: {list(SCHEDULES)}")
    return _SCHEDULE_ALIASES[key]


def training_sigmas(cfg: ScheduleConfig = ScheduleConfig()) -> np.ndarray:
    """(1000,) float32 ascending sigmas of the authors' float32 alphas_cumprod buffer."""
    return sch.sigmas_from_alphas_cumprod(sch.ldm_alphas_cumprod(cfg))


# --- host-side (numpy float32, torch-like) -----------------------------------------------------

def t_to_sigma_np(t, log_sigmas: np.ndarray) -> np.ndarray:
    """`DiscreteSchedule.t_to_sigma`: log-sigma linear interpolation at fractional t (float32)."""
    t = np.asarray(t, np.float32)
    low, high = np.floor(t).astype(np.int64), np.ceil(t).astype(np.int64)
    w = (t - np.trunc(t)).astype(np.float32)
    ls = (np.float32(1) - w) * log_sigmas[low] + w * log_sigmas[high]
    return np.exp(ls.astype(np.float32)).astype(np.float32)


def sigma_to_t_np(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """`DiscreteSchedule.sigma_to_t` (quantize False), float32."""
    ls = np.log(np.asarray(sigma, np.float32)).astype(np.float32)
    low = np.clip(np.searchsorted(log_sigmas, ls, side="right") - 1, 0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - ls) / (lo - hi), 0, 1).astype(np.float32)
    return ((np.float32(1) - w) * low + w * (low + 1)).astype(np.float32)


def _append_zero(s) -> np.ndarray:
    return np.concatenate([np.asarray(s, np.float32), np.zeros(1, np.float32)])


def _f32_pow(a, p) -> np.ndarray:
    return np.power(np.asarray(a, np.float32), np.float32(p)).astype(np.float32)


def sigma_schedule(schedule: str, n: int, train_sigmas: np.ndarray, *, sigma_min: float | None = None,
                   sigma_max: float | None = None, rho: float | None = None) -> np.ndarray:
    """(n+1,) float32 sigmas, high to low, final 0: the app's schedulers (refnet/sampling/scheduler.py
    and k_diffusion.sampling.get_sigmas_*). "none" = `model_wrap.get_sigmas(n)` (what Automatic means
    for a sampler without its own default), identical to "uniform"."""
    name = canonical_schedule(schedule)
    if name == "automatic":
        raise ValueError("resolve 'Automatic' to the sampler's default schedule first")
    if n < 1:
        raise ValueError(f"the schedule needs at least 1 step, got {n}")
    log_sigmas = np.log(train_sigmas).astype(np.float32)
    smin = np.float32(train_sigmas[0] if sigma_min is None else sigma_min)
    smax = np.float32(train_sigmas[-1] if sigma_max is None else sigma_max)
    rho = DEFAULT_RHO.get(name, 1.0) if rho is None else rho
    if not 0 < smin < smax:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {smin}, {smax}")
    if name in ("none", "uniform"):
        t = sch.torch_linspace_f32(len(train_sigmas) - 1, 0, n)
        return _append_zero(t_to_sigma_np(t, log_sigmas))
    if name == "karras":
        ramp = sch.torch_linspace_f32(0, 1, n)
        lo, hi = _f32_pow(smin, 1 / rho), _f32_pow(smax, 1 / rho)
        return _append_zero(_f32_pow(hi + ramp * (lo - hi), rho))
    if name == "exponential":
        return _append_zero(np.exp(sch.torch_linspace_f32(math.log(smax), math.log(smin), n)).astype(np.float32))
    if name == "polyexponential":
        ramp = _f32_pow(sch.torch_linspace_f32(1, 0, n), rho)
        lmax, lmin = math.log(smax), math.log(smin)
        return _append_zero(np.exp(ramp * np.float32(lmax - lmin) + np.float32(lmin)).astype(np.float32))
    # sgm_uniform: n t's evenly from t(sigma_max) to t(sigma_min), the endpoint dropped, then 0
    start, end = sigma_to_t_np(smax, log_sigmas), sigma_to_t_np(smin, log_sigmas)
    ts = sch.torch_linspace_f32(float(start), float(end), n + 1)[:-1]
    return _append_zero(t_to_sigma_np(ts, log_sigmas))


# --- in the jitted loop (JAX) ------------------------------------------------------------------

def sigma_to_t(sigma, log_sigmas):
    """Fractional training timestep of a (traced) sigma: log-sigma interpolation, clamped to [0, 999]."""
    log_sigmas = jnp.asarray(log_sigmas, jnp.float32)
    ls = jnp.log(sigma)
    low = jnp.clip(jnp.searchsorted(log_sigmas, ls, side="right") - 1, 0, log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = jnp.clip((lo - ls) / (lo - hi), 0, 1)
    return (1 - w) * low.astype(jnp.float32) + w * (low + 1).astype(jnp.float32)


def scalings(sigma):
    """CompVisVDenoiser (sigma_data 1): c_skip, c_out, c_in."""
    s2 = sigma ** 2 + 1.0
    return 1.0 / s2, -sigma / jnp.sqrt(s2), 1.0 / jnp.sqrt(s2)


def torch_linspace_jnp(start, end, steps: int):
    """torch.linspace(start, end, steps) in float32 with traced endpoints (same two-sided formula as
    `schedule.torch_linspace_f32`)."""
    start, end = jnp.float32(start), jnp.float32(end)
    if steps == 1:
        return start[None]
    step = (end - start) / (steps - 1)
    i = jnp.arange(steps, dtype=jnp.float32)
    return jnp.where(jnp.arange(steps) < steps // 2, start + step * i, end - step * (steps - 1 - i))
