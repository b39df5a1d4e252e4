"""Every sampler and noise schedule of the authors' app behind one registry and one loop driver.

    from cdv2.diffusion.samplers import make_sampler, sample
    s = make_sampler("DPM++ 2M SDE", steps=20, schedule="Karras")   # static: name, steps, schedule
    x0 = sample(s, model_fn, x_T, key)                               # inside your jit

Names are the app's dropdown labels (`APP_SAMPLERS`, `APP_SCHEDULES`), their k-diffusion aliases
(`k_euler_a`, ...) or the canonical names below. diffusers samplers (`diffuser_*`) follow the app:
only "Karras" changes them (use_karras_sigmas, for diffuser_dpm and diffuser_lms); other schedules
are ignored as in the app. k-diffusion samplers resolve "Automatic" to their own default schedule
(refnet/sampling/sampler.py options) and DPM2 / DPM2 a / DPM++ 3M SDE drop the next-to-last sigma.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cdv2.config import ScheduleConfig
from cdv2.diffusion import diffusers_samplers as dfs
from cdv2.diffusion.samplers import k_dpmpp, k_euler, k_lms_fast
from cdv2.diffusion.samplers import k_schedules as ks
from cdv2.diffusion.samplers.driver import Sampler, sample

__all__ = ["make_sampler", "sample", "Sampler", "APP_SAMPLERS", "APP_SCHEDULES", "resolve_name", "K_SAMPLERS",
           "BROWNIAN_SAMPLERS", "k_sigmas"]

# canonical name: (app label, builder, default schedule ("none" = model_wrap.get_sigmas), discard)
K_SAMPLERS = {
    "k_dpmpp_2m": ("DPM++ 2M", k_dpmpp.dpmpp_2m, "karras", False),
    "k_dpmpp_sde": ("DPM++ SDE", k_dpmpp.dpmpp_sde, "karras", False),
    "k_dpmpp_2m_sde": ("DPM++ 2M SDE", k_dpmpp.dpmpp_2m_sde, "exponential", False),
    "k_dpmpp_2m_sde_heun": ("DPM++ 2M SDE Heun",
                            lambda *a, label: k_dpmpp.dpmpp_2m_sde(*a, label=label, solver_type="heun"),
                            "exponential", False),
    "k_dpmpp_2s_a": ("DPM++ 2S a", k_dpmpp.dpmpp_2s_ancestral, "karras", False),
    "k_dpmpp_3m_sde": ("DPM++ 3M SDE", k_dpmpp.dpmpp_3m_sde, "exponential", True),
    "k_euler_a": ("Euler a", k_euler.euler_ancestral, "none", False),
    "k_euler": ("Euler", k_euler.euler, "none", False),
    "k_lms": ("LMS", k_lms_fast.lms, "none", False),
    "k_heun": ("Heun", k_euler.heun, "none", False),
    "k_dpm_2": ("DPM2", k_euler.dpm2, "karras", True),
    "k_dpm_2_a": ("DPM2 a", k_euler.dpm2_ancestral, "karras", True),
    "k_dpm_fast": ("DPM fast", k_lms_fast.dpm_fast, "none", False),
    "k_dpm_ad": ("DPM adaptive", k_lms_fast.dpm_adaptive, "none", False),
}
DIFFUSERS_SAMPLERS = {"diffuser_ddim": "ddim", "diffuser_dpm": "dpmpp_2m", "diffuser_pndm": "pndm",
                      "diffuser_lms": "lms", "diffuser_euler": "euler"}  # diffuser_euler: cdv2 extra
_ALIASES = {"k_euler_ancestral": "k_euler_a"}
# samplers whose draws come from a Brownian tree in the app: only these honour its "deterministic
# batch seed" (same tree seed for every row -> pass batch_shared_noise=True to `sample`)
BROWNIAN_SAMPLERS = frozenset({"k_dpmpp_sde", "k_dpmpp_2m_sde", "k_dpmpp_2m_sde_heun", "k_dpmpp_3m_sde"})

APP_SAMPLERS = tuple(sorted(["diffuser_ddim", "diffuser_dpm", "diffuser_pndm", "diffuser_lms"]
                            + [v[0] for v in K_SAMPLERS.values()]))
APP_SCHEDULES = tuple(ks.SCHEDULES)


def resolve_name(name: str) -> str:
    """App label, alias or canonical name -> canonical name."""
    if name in K_SAMPLERS or name in DIFFUSERS_SAMPLERS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    for canon, (label, *_rest) in K_SAMPLERS.items():
        if name == label or name.lower() == label.lower():
            return canon
    if name in dfs.SAMPLER_ALIASES or name in ("dpmpp_2m", "ddim", "euler", "pndm", "lms"):
        inner = dfs.SAMPLER_ALIASES.get(name, name)
        return next(k for k, v in DIFFUSERS_SAMPLERS.items() if v == inner)
    raise ValueError(f"unknown sampler {name!r}; the app's samplers: {list(APP_SAMPLERS)}")


def k_sigmas(name: str, steps: int, schedule: str = "Automatic", *, schedule_cfg: ScheduleConfig = ScheduleConfig(),
             sigma_min=None, sigma_max=None, rho=None) -> tuple[np.ndarray, str]:
    """The app's sigmas for a k-diffusion sampler (KDiffusionSampler.get_sigmas): (N+1,) float32, and the
    resolved schedule name."""
    _label, _build, default, discard = K_SAMPLERS[resolve_name(name)]
    sched = ks.canonical_schedule(schedule)
    if sched == "automatic":
        sched = default
    sig = ks.sigma_schedule(sched, steps + (1 if discard else 0), ks.training_sigmas(schedule_cfg),
                            sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    if discard:
        sig = np.concatenate([sig[:-2], sig[-1:]])
    return sig, sched


def make_sampler(name: str, steps: int, schedule: str = "Automatic", *,
                 schedule_cfg: ScheduleConfig = ScheduleConfig(), sigma_min=None, sigma_max=None, rho=None,
                 eta: float = 1.0, s_noise: float = 1.0) -> Sampler:
    """A sampler for `sample`. Static: name, steps, schedule. sigma_min/max/rho only shape the default
    schedule (pass `sigmas=` to `sample` to change it without recompiling); eta / s_noise are the
    defaults that `sample(eta=, s_noise=)` can override (traced). The app uses eta 1, s_noise 1."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if schedule_cfg.parameterization != "v":
        raise NotImplementedError(f"only v-prediction is implemented, got {schedule_cfg.parameterization!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (the ancestral step structure assumes it), got {eta}")
    canon = resolve_name(name)
    if canon in DIFFUSERS_SAMPLERS:
        inner = DIFFUSERS_SAMPLERS[canon]
        karras = ks.canonical_schedule(schedule) == "karras" and inner in ("dpmpp_2m", "lms")
        return _from_diffusers(dfs.make_sampler(inner, steps, karras, schedule_cfg), canon, steps,
                               "karras" if karras else "leading")
    label, build, _default, _discard = K_SAMPLERS[canon]
    if canon == "k_dpm_ad":
        build()
    sig, sched = k_sigmas(canon, steps, schedule, schedule_cfg=schedule_cfg, sigma_min=sigma_min,
                          sigma_max=sigma_max, rho=rho)
    log_sigmas = np.log(ks.training_sigmas(schedule_cfg)).astype(np.float32)
    smp = build(sig, log_sigmas, steps, sched, label=label)
    return _replace(smp, name=canon, eta=float(eta), s_noise=float(s_noise))


def _replace(smp: Sampler, **kw) -> Sampler:
    import dataclasses

    return dataclasses.replace(smp, **kw)


def _from_diffusers(ds: "dfs.Sampler", canon: str, steps: int, schedule: str) -> Sampler:
    """The diffusers init/step sampler as a driver Sampler (numerics unchanged)."""
    ts = jnp.asarray(ds.timesteps)

    def plan(sig, eta, s_noise):
        return {}

    def init(x, plan):
        st = ds.init(x)
        return {"x": st.x, "st": st}

    def point(state, k, plan):
        st = state["st"]
        return ds.scale_model_input(st, st.x, k), ts[k].astype(jnp.float32)

    def update(state, xp, out, k, plan, z, keyed):
        st = ds.step(state["st"], out, k)
        return {"x": st.x, "st": st}

    return Sampler(name=canon, family="diffusers", steps=steps, schedule=schedule, sigmas=np.asarray(ds.sigmas),
                   num_calls=len(ds.timesteps), draw_of_call=np.zeros(0, np.int32), plan=plan, init=init,
                   point=point, update=update, init_scale=lambda p: ds.init_noise_sigma, label=canon)
