"""The scaled-linear noise schedule and sigma/timestep selection.

Two float32 copies of alphas_cumprod exist and both matter:
* the authors' (`ldm_schedule_buffers`): betas in float64, cumprod in float64, stored float32 (the
  12 buffers in their checkpoint; k-diffusion sigmas and training use these);
* diffusers' (`diffusers_alphas_cumprod`): betas and 1-betas in float32, cumprod accumulated in
  float64 (torch's CPU cumprod) and stored float32. The diffusers-path samplers use this one.
They differ by up to ~1e-6 relative. Everything here is host-side numpy, static for a given step
count (the v-prediction algebra lives in `cdv2.diffusion.parameterization`).
"""
from __future__ import annotations

import numpy as np

from cdv2.config import ScheduleConfig


# --- training schedule -------------------------------------------------------------------------

def ldm_betas(cfg: ScheduleConfig = ScheduleConfig()) -> np.ndarray:
    """float64 betas = linspace(sqrt(start), sqrt(end), T)**2 (original: refnet/ldm/util.py)."""
    return np.linspace(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps, dtype=np.float64) ** 2


def ldm_schedule_buffers(cfg: ScheduleConfig = ScheduleConfig()) -> dict[str, np.ndarray]:
    """The 12 float32 schedule buffers the authors' DDPM registers (refnet/ldm/ddpm.py
    `register_schedule`, v_posterior 0, zero_snr False), computed in float64 as they do."""
    betas = ldm_betas(cfg)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    out = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }
    return {k: v.astype(np.float32) for k, v in out.items()}


def ldm_alphas_cumprod(cfg: ScheduleConfig = ScheduleConfig()) -> np.ndarray:
    return ldm_schedule_buffers(cfg)["alphas_cumprod"]


# --- diffusers' schedule -----------------------------------------------------------------------

def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU, bit for bit: a float32 step, the
    first half fma(step, i, start), the second half end - step*(steps-1-i) (also fused). The fused
    product-sum is exact in float64 here (float32 operands, i < 2**24), so one rounding suffices."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    first = np.float64(s) + step * i
    second = np.float64(e) - step * (steps - 1 - i)
    return np.where(np.arange(steps) < steps // 2, first, second).astype(np.float32)


def diffusers_alphas_cumprod(cfg: ScheduleConfig = ScheduleConfig()) -> np.ndarray:
    """alphas_cumprod as diffusers' schedulers build it for beta_schedule="scaled_linear": float32
    linspace, squared and subtracted from 1 in float32, then torch.cumprod (which on CPU
    accumulates float32 in double)."""
    root = torch_linspace_f32(cfg.linear_start ** 0.5, cfg.linear_end ** 0.5, cfg.timesteps)
    alphas = np.float32(1.0) - root * root
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """k-diffusion/diffusers noise levels sigma = sqrt((1-a)/a), in the input's precision
    (float32 in, float32 out, like torch)."""
    a = np.asarray(alphas_cumprod)
    one = a.dtype.type(1)
    return np.sqrt((one - a) / a)


# --- timestep selection (diffusers) ------------------------------------------------------------

def leading_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> np.ndarray:
    """DDIM/Euler "leading" spacing: ratio = T // N, timesteps (N-1..0)*ratio + offset."""
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + steps_offset


def dpm_leading_timesteps(num_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1) -> np.ndarray:
    """DPMSolverMultistep "leading" spacing: ratio = T // (N+1), timesteps N..1 times ratio + offset
    (lambda_min_clipped = -inf, so last_timestep = T)."""
    ratio = num_train_timesteps // (num_steps + 1)
    return (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + steps_offset


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas, float64, high to low (diffusers `_convert_to_karras`)."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma by linear interpolation in log-sigma
    (diffusers/k-diffusion `_sigma_to_t`; log_sigmas ascending with t)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def dpm_karras_schedule(sigmas_train: np.ndarray, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """DPMSolverMultistep with use_karras_sigmas: Karras sigmas between the smallest and largest
    training sigma, timesteps = round(sigma_to_t) (scaled_linear rounds). Returns (timesteps int64
    (N,), sigmas float64 (N,)) without the final sigma."""
    log_sigmas = np.log(sigmas_train)
    sig = karras_sigmas(float(sigmas_train[0]), float(sigmas_train[-1]), num_steps)
    ts = np.array([sigma_to_t(s, log_sigmas) for s in sig]).round().astype(np.int64)
    return ts, sig
