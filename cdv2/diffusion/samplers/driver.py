"""One loop driver for every sampler: a fixed number of U-Net calls in one `lax.fori_loop`.

Every sampler is written as a machine over its model CALLS (not its steps): call k evaluates the
model once at the point `sampler.point(state, k, plan)` and `sampler.update` folds the result into
the state. Two-stage samplers (Heun, DPM2, DPM++ 2S a / SDE, DPM fast) therefore have ONE U-Net call
site in the compiled loop, whatever their number of evaluations per step. The call structure
(which step and stage each call is, which random draw it uses) is static for a step count; the
noise levels are a traced array, so the schedule, its parameters, eta/s_noise, the guidance scales
and the seed never recompile.

    s = make_sampler("DPM++ 2M SDE", steps=20, schedule="Karras")
    x0 = sample(s, model_fn, x_T, key)          # model_fn(x_in, t) -> v (U-Net + CFG)

k-diffusion samplers see `model_fn` through `CompVisVDenoiser` (U-Net input x * c_in at
t = sigma_to_t(sigma); denoised = v * c_out + x * c_skip); diffusers samplers get the scaled input
and integer timestep and consume v directly. Random draws: draw j is N(0, 1) from
fold_in(key, j), or `noise[j]` when a reference run's draws are injected (same order as the
reference: one per call that adds noise).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cdv2.diffusion.samplers import k_schedules as ks


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: usable as a jit static argument
class Sampler:
    name: str                  # canonical registry name
    family: str                # "k" (continuous sigma, denoised) or "diffusers" (integer t, v)
    steps: int                 # the user's step count
    schedule: str              # resolved schedule name
    sigmas: np.ndarray         # k: default (N+1,) float32 schedule (a traced input); diffusers: info
    num_calls: int             # U-Net evaluations of one run
    draw_of_call: np.ndarray   # (num_calls,) int32: random draw used by call k, -1 for none
    plan: Callable             # (sigmas jnp, eta, s_noise) -> pytree of per-step coefficients
    init: Callable             # (x_T * scale, plan) -> state
    point: Callable            # (state, k, plan) -> (x, sigma) for "k", (x_in, t) for "diffusers"
    update: Callable           # (state, x_point, out, k, plan, noise, keyed) -> state
    init_scale: Callable       # plan -> x_T multiplier (sigma_max, or diffusers' init_noise_sigma)
    log_sigmas: Optional[np.ndarray] = None   # k: the 1000 training log-sigmas (sigma -> t)
    eta: float = 1.0           # defaults of the app (eta_ancestral 1, s_noise 1)
    s_noise: float = 1.0
    label: str = ""

    @property
    def num_draws(self) -> int:
        return int(self.draw_of_call.max()) + 1 if self.draw_of_call.size else 0

    @property
    def calls_per_step(self) -> float:
        return self.num_calls / self.steps


def _draw(sampler: Sampler, k, shape, key, noise, batch_shared: bool):
    if sampler.num_draws == 0:
        return None
    j = jnp.maximum(jnp.asarray(sampler.draw_of_call)[k], 0)
    if noise is not None:
        return jnp.asarray(noise, jnp.float32)[j]
    if key is None:
        raise ValueError(f"sampler {sampler.name!r} is stochastic: pass a jax.random key or injected noise")
    row_shape = (1,) + tuple(shape[1:]) if batch_shared else tuple(shape)
    z = jax.random.normal(jax.random.fold_in(key, j), row_shape, jnp.float32)
    return jnp.broadcast_to(z, shape)


def sample(sampler: Sampler, model_fn: Callable, x_T, key=None, noise=None, *, sigmas=None, eta=None,
           s_noise=None, batch_shared_noise: bool = False, record_calls: bool = False,
           pass_call_index: bool = False) -> Any:
    """Run `sampler` from the standard-normal `x_T`; traceable (call it inside your jit).

    model_fn(x_in, t) -> v: the raw v-prediction after guidance for the U-Net input x_in at the
      scalar float32 timestep t (fractional for k-diffusion samplers).
    key: jax.random key of the sampler's own draws; noise: (sampler.num_draws, *x_T.shape) injected
      draws instead (exact replay of a reference run).
    sigmas: (N+1,) noise levels overriding the sampler's schedule (traced; same length).
    batch_shared_noise: every batch row gets the same draws (the app's "deterministic batch seed"
      for its Brownian-tree samplers).
    record_calls: also return (x_in (num_calls, *shape), t (num_calls,)) of every U-Net call.
    pass_call_index: call model_fn(x_in, t, k) with the traced call index k (replay, progress).
    """
    x_T = jnp.asarray(x_T, jnp.float32)
    if noise is not None and tuple(noise.shape) != (sampler.num_draws,) + tuple(x_T.shape):
        raise ValueError(f"injected noise must have shape {(sampler.num_draws,) + tuple(x_T.shape)}, "
                         f"got {tuple(noise.shape)}")
    sig = jnp.asarray(sampler.sigmas if sigmas is None else sigmas, jnp.float32)
    if sig.shape != sampler.sigmas.shape:
        raise ValueError(f"sigmas must have shape {sampler.sigmas.shape} for this step count, got {sig.shape}")
    plan = sampler.plan(sig, sampler.eta if eta is None else eta, sampler.s_noise if s_noise is None else s_noise)
    state = sampler.init(x_T * sampler.init_scale(plan), plan)
    keyed = noise is None

    def call(x_in, t, k):
        v = model_fn(x_in, t, k) if pass_call_index else model_fn(x_in, t)
        return v.astype(jnp.float32)

    def body(k, carry):
        state, rec = carry
        xp, s = sampler.point(state, k, plan)
        if sampler.family == "k":
            c_skip, c_out, c_in = ks.scalings(s)
            x_in, t = xp * c_in, ks.sigma_to_t(s, sampler.log_sigmas)
            out = call(x_in, t, k) * c_out + xp * c_skip
        else:
            x_in, t = xp, s
            out = call(x_in, t, k)
        z = _draw(sampler, k, x_T.shape, key, noise, batch_shared_noise)
        state = sampler.update(state, xp, out, k, plan, z, keyed)
        if rec is not None:
            rec = (rec[0].at[k].set(x_in), rec[1].at[k].set(jnp.asarray(t, jnp.float32)))
        return state, rec

    rec = None
    if record_calls:
        rec = (jnp.zeros((sampler.num_calls,) + x_T.shape, jnp.float32), jnp.zeros((sampler.num_calls,), jnp.float32))
    state, rec = jax.lax.fori_loop(0, sampler.num_calls, body, (state, rec))
    return (state["x"], rec) if record_calls else state["x"]


# --- helpers shared by the sampler files -------------------------------------------------------

def call_table(num_steps: int, stages_of_step: Callable[[int], int], draws_of_stage: Callable[[int, int], bool]):
    """Static per-call tables: step index, stage index, draw index (-1 = none)."""
    step_of, stage_of, draw_of = [], [], []
    j = 0
    for i in range(num_steps):
        for st in range(stages_of_step(i)):
            step_of.append(i)
            stage_of.append(st)
            if draws_of_stage(i, st):
                draw_of.append(j)
                j += 1
            else:
                draw_of.append(-1)
    return np.asarray(step_of, np.int32), np.asarray(stage_of, np.int32), np.asarray(draw_of, np.int32)


def ancestral_step(sigma_from, sigma_to, eta):
    """k-diffusion `get_ancestral_step` (traced; eta 0 gives (sigma_to, 0) as its early return)."""
    up = jnp.minimum(sigma_to, eta * jnp.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    up = jnp.where(eta == 0, 0.0, up)
    down = jnp.where(eta == 0, sigma_to, jnp.sqrt(sigma_to ** 2 - up ** 2))
    return down, up
