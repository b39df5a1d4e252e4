"""Sampling: the noise schedule (host-side numpy) and diffusers-equivalent samplers (pure JAX steps)."""
from cdv2.sample.schedule import (
    diffusers_alphas_cumprod,
    get_v,
    ldm_alphas_cumprod,
    ldm_schedule_buffers,
    q_sample,
    sigmas_from_alphas_cumprod,
    v_to_eps,
    v_to_x0,
)
from cdv2.sample.solvers import Sampler, SamplerState, make_sampler

__all__ = [
    "Sampler", "SamplerState", "make_sampler",
    "diffusers_alphas_cumprod", "ldm_alphas_cumprod", "ldm_schedule_buffers", "sigmas_from_alphas_cumprod",
    "v_to_x0", "v_to_eps", "get_v", "q_sample",
]
