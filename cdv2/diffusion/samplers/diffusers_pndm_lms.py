"""diffusers' PNDMScheduler and LMSDiscreteScheduler as init/step functions (the app's
`diffuser_pndm` / `diffuser_lms` with configs/scheduler_cfgs/{pndm,lms}.yaml: scaled_linear,
leading spacing, steps_offset 1, v_prediction; PNDM keeps diffusers' defaults skip_prk_steps False
and set_alpha_to_one False; LMS order 4, optionally Karras sigmas).

Same contract as `cdv2.diffusion.diffusers_samplers` (host-side float64 coefficient tables stored
float32, indexed by the traced call index). PNDM's Runge-Kutta warm-up makes 12 calls for the first
3 steps, so one run is steps + 9 U-Net calls: its `num_steps` is that call count (the loop length).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cdv2.config import ScheduleConfig
from cdv2.diffusion import schedule as sch
from cdv2.diffusion.diffusers_samplers import Sampler, SamplerState, _f32

_GL_X = np.array([-np.sqrt(0.6), 0.0, np.sqrt(0.6)])
_GL_W = np.array([5 / 9, 8 / 9, 5 / 9])


def pndm_timesteps(n: int, T: int = 1000, offset: int = 1):
    """(call timesteps, alpha timestep, prev timestep) of diffusers' PNDM with PRK warm-up."""
    ratio = T // n
    base = (np.arange(n) * ratio).round().astype(np.int64) + offset  # ascending
    prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, ratio // 2]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1].copy()
    plms = base[:-3][::-1].copy()
    calls = np.concatenate([prk, plms]).astype(np.int64)
    t_alpha, t_prev = [], []
    for k, t in enumerate(calls):
        if k < len(prk):
            t_prev.append(t - (0 if k % 2 else ratio // 2))
            t_alpha.append(prk[k // 4 * 4])
        else:
            t_prev.append(t - ratio)
            t_alpha.append(t)
    return calls, np.array(t_alpha), np.array(t_prev), len(prk)


def pndm(num_steps: int, cfg: ScheduleConfig = ScheduleConfig(), steps_offset: int = 1) -> Sampler:
    if num_steps < 4:
        raise ValueError(f"diffuser_pndm needs at least 4 steps (its Runge-Kutta warm-up), got {num_steps}")
    ac = sch.diffusers_alphas_cumprod(cfg).astype(np.float64)
    calls, t_alpha, t_prev, n_prk = pndm_timesteps(num_steps, cfg.timesteps, steps_offset)
    a = ac[t_alpha]
    a_prev = np.where(t_prev >= 0, ac[np.maximum(t_prev, 0)], ac[0])  # set_alpha_to_one False
    denom = a * np.sqrt(1 - a_prev) + np.sqrt(a * (1 - a) * a_prev)
    k = np.arange(len(calls))
    prk = k < n_prk
    stage = np.where(prk, k % 4, 4)  # 4 = PLMS
    tab = {name: jnp.asarray(_f32(v)) for name, v in dict(
        c_sample=np.sqrt(a_prev / a), c_eps=(a_prev - a) / denom, sa=np.sqrt(a), sb=np.sqrt(1 - a)).items()}
    stage_tab = jnp.asarray(stage.astype(np.int32))

    def step(state: SamplerState, v, i) -> SamplerState:
        v = v.astype(jnp.float32)
        cur, acc, e1, e2, e3 = state.hist
        st = stage_tab[i]
        cur = jnp.where(st == 0, state.x, cur)
        plms_mo = (55 * v - 59 * e1 + 37 * e2 - 9 * e3) / 24
        mo = jnp.where(st == 3, acc + v / 6, jnp.where(st == 4, plms_mo, v))
        acc = jnp.where(st == 0, acc + v / 6, jnp.where((st == 1) | (st == 2), acc + v / 3,
                                                        jnp.where(st == 3, 0.0, acc)))
        sample = jnp.where(st == 4, state.x, cur)
        eps = tab["sa"][i] * mo + tab["sb"][i] * sample
        x = tab["c_sample"][i] * sample - tab["c_eps"][i] * eps
        push = (st == 0) | (st == 4)  # ets.append(model_output)
        e1, e2, e3 = (jnp.where(push, v, e1), jnp.where(push, e1, e2), jnp.where(push, e2, e3))
        return SamplerState(x=x, prev_x0=state.prev_x0, hist=(cur, acc, e1, e2, e3))

    def init_hist(x):
        z = jnp.zeros_like(x)
        return (x, z, z, z, z)

    sigmas = _f32(np.sqrt((1 - ac[calls]) / ac[calls]))
    return Sampler("pndm", len(calls), calls.astype(np.int32), sigmas, 1.0,
                   lambda state, x, i: x, step, init_hist)


def lms_coefficients_np(sigmas: np.ndarray, order: int = 4) -> np.ndarray:
    """(N, order) LMS weights (column j: derivative of j steps ago) by exact Gauss-Legendre."""
    s = np.asarray(sigmas, np.float64)
    n = len(s) - 1
    out = np.zeros((n, order))
    for i in range(n):
        cur = min(i + 1, order)
        a, b = s[i], s[i + 1]
        taus = (a + b) / 2 + (b - a) / 2 * _GL_X
        for j in range(cur):
            prod = np.ones_like(taus)
            for m in range(cur):
                if m != j:
                    prod *= (taus - s[i - m]) / (s[i - j] - s[i - m])
            out[i, j] = (b - a) / 2 * np.sum(_GL_W * prod)
    return out


def lms(num_steps: int, karras: bool = False, cfg: ScheduleConfig = ScheduleConfig(),
        steps_offset: int = 1) -> Sampler:
    train = sch.sigmas_from_alphas_cumprod(sch.diffusers_alphas_cumprod(cfg))  # float32
    ts = sch.leading_timesteps(num_steps, cfg.timesteps, steps_offset).astype(np.float64)
    sig = train[ts.astype(np.int64)].astype(np.float64)
    if karras:
        sig = sch.karras_sigmas(float(sig[-1]), float(sig[0]), num_steps)
        ts = np.array([sch.sigma_to_t(x, np.log(train)) for x in sig], np.float64)
    sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
    s = sigmas.astype(np.float64)
    coef = lms_coefficients_np(sigmas, 4)
    tab = {k: jnp.asarray(_f32(v)) for k, v in dict(
        c_in=1.0 / np.sqrt(s[:-1] ** 2 + 1), c_out=-s[:-1] / np.sqrt(s[:-1] ** 2 + 1),
        c_skip=1.0 / (s[:-1] ** 2 + 1), inv_sigma=1.0 / s[:-1], coef=coef).items()}
    init_noise_sigma = float(np.float32(np.sqrt(np.float64(sigmas.max()) ** 2 + 1.0)))

    def step(state: SamplerState, v, i) -> SamplerState:
        x = state.x
        x0 = v.astype(jnp.float32) * tab["c_out"][i] + x * tab["c_skip"][i]
        d = (x - x0) * tab["inv_sigma"][i]
        ds = (d,) + tuple(state.hist[:-1])
        c = tab["coef"][i]
        acc = c[0] * ds[0]
        for j in range(1, 4):
            acc = acc + c[j] * ds[j]
        return SamplerState(x=x + acc, prev_x0=state.prev_x0, hist=ds)

    def init_hist(x):
        return tuple(jnp.zeros_like(x) for _ in range(4))

    return Sampler("lms", num_steps, _f32(ts), sigmas, init_noise_sigma,
                   lambda state, x, i: x * tab["c_in"][i], step, init_hist)
