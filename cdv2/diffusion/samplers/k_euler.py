"""k-diffusion Euler-family samplers as call machines: Euler, Euler a, Heun, DPM2, DPM2 a.

Same float32 formulas as `k_diffusion.sampling.sample_*` (s_churn = 0 as the app leaves it: the
churn noise that Heun/DPM2/Euler draw is multiplied by a zero gamma, so none is drawn here). Heun
and DPM2 evaluate the model twice per step except on the last step (to sigma 0): 2N-1 calls; DPM2
and DPM2 a use the app's discard-next-to-last-sigma schedule (built by the registry).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cdv2.diffusion.samplers.driver import Sampler, ancestral_step, call_table


def _lerp_half_log(a, b):
    """exp(torch.lerp(log a, log b, 0.5)): torch takes `end - (end - start) * 0.5` at weight 0.5."""
    la, lb = jnp.log(a), jnp.log(b)
    return jnp.exp(lb - (lb - la) * 0.5)


def make_k_sampler(name, sigmas, log_sigmas, *, stages, draws, plan_fn, init_fn, point_fn, update_fn, steps,
                   schedule, init_scale=None, label="", machine_steps=None) -> Sampler:
    """Assemble a k-diffusion Sampler from its per-call machine (tables added to the plan).
    machine_steps: number of solver steps when it differs from the schedule's (DPM fast)."""
    n = len(sigmas) - 1 if machine_steps is None else machine_steps
    step_of, stage_of, draw_of = call_table(n, stages, draws)
    last = n - 1

    def plan(sig, eta, s_noise):
        p = plan_fn(sig, eta, s_noise)
        p.update(sig=sig, eta=jnp.float32(eta), s_noise=jnp.float32(s_noise), step=jnp.asarray(step_of),
                 stage=jnp.asarray(stage_of), last=jnp.int32(last))
        return p

    return Sampler(name=name, family="k", steps=steps, schedule=schedule, sigmas=np.asarray(sigmas, np.float32),
                   num_calls=len(step_of), draw_of_call=draw_of, plan=plan, init=init_fn, point=point_fn,
                   update=update_fn, init_scale=init_scale or (lambda p: p["sig"][0]),
                   log_sigmas=np.asarray(log_sigmas, np.float32), label=label)


def _x_init(x, plan):
    return {"x": x, "x2": x, "d": jnp.zeros_like(x)}


def _point_two_stage(state, k, plan):
    """Stage 0 at (x, sigma_i); stage 1 at (x2, sigma of the second evaluation, kept in plan['s2'])."""
    i, st = plan["step"][k], plan["stage"][k]
    return (jnp.where(st == 0, state["x"], state["x2"]), jnp.where(st == 0, plan["sig"][i], plan["s2"][i]))


def _point_one_stage(state, k, plan):
    return state["x"], plan["sig"][plan["step"][k]]


def _no_plan(sig, eta, s_noise):
    return {}


def euler(sigmas, log_sigmas, steps, schedule, label="Euler"):
    def update(state, xp, den, k, p, z, keyed):
        i = p["step"][k]
        s, s_next = p["sig"][i], p["sig"][i + 1]
        d = (xp - den) / s
        return {**state, "x": state["x"] + d * (s_next - s)}

    return make_k_sampler("euler", sigmas, log_sigmas, stages=lambda i: 1, draws=lambda i, s: False,
                          plan_fn=_no_plan, init_fn=_x_init, point_fn=_point_one_stage, update_fn=update,
                          steps=steps, schedule=schedule, label=label)


def euler_ancestral(sigmas, log_sigmas, steps, schedule, label="Euler a"):
    n = len(sigmas) - 1

    def update(state, xp, den, k, p, z, keyed):
        i = p["step"][k]
        s, s_next = p["sig"][i], p["sig"][i + 1]
        down, up = ancestral_step(s, s_next, p["eta"])
        d = (xp - den) / s
        x = state["x"] + d * (down - s)
        x = jnp.where(s_next > 0, x + z * p["s_noise"] * up, x)
        return {**state, "x": x}

    return make_k_sampler("euler_a", sigmas, log_sigmas, stages=lambda i: 1, draws=lambda i, s: i < n - 1,
                          plan_fn=_no_plan, init_fn=_x_init, point_fn=_point_one_stage, update_fn=update,
                          steps=steps, schedule=schedule, label=label)


def heun(sigmas, log_sigmas, steps, schedule, label="Heun"):
    n = len(sigmas) - 1

    def plan_fn(sig, eta, s_noise):
        return {"s2": sig[1:]}

    def update(state, xp, den, k, p, z, keyed):
        i, st = p["step"][k], p["stage"][k]
        s, s_next = p["sig"][i], p["sig"][i + 1]
        dt = s_next - s
        d_cur = (xp - den) / jnp.where(st == 0, s, s_next)
        x0_euler = state["x"] + d_cur * dt                                     # stage 0: Euler / predictor
        x_heun = state["x"] + ((state["d"] + d_cur) / 2) * dt                  # stage 1: corrector
        final = (i == p["last"]) | (st == 1)
        return {"x": jnp.where(st == 1, x_heun, jnp.where(i == p["last"], x0_euler, state["x"])),
                "x2": jnp.where(final, state["x2"], x0_euler), "d": jnp.where(st == 0, d_cur, state["d"])}

    return make_k_sampler("heun", sigmas, log_sigmas, stages=lambda i: 1 if i == n - 1 else 2,
                          draws=lambda i, s: False, plan_fn=plan_fn, init_fn=_x_init, point_fn=_point_two_stage,
                          update_fn=update, steps=steps, schedule=schedule, label=label)


def _dpm2_common(name, sigmas, log_sigmas, steps, schedule, ancestral, label):
    n = len(sigmas) - 1

    def targets(p, i):
        s, s_next = p["sig"][i], p["sig"][i + 1]
        if ancestral:
            down, up = ancestral_step(s, s_next, p["eta"])
        else:
            down, up = s_next, jnp.float32(0)
        return s, down, up

    def plan_fn(sig, eta, s_noise):
        s, s_next = sig[:-1], sig[1:]
        down = ancestral_step(s, s_next, eta)[0] if ancestral else s_next
        safe = jnp.where(down > 0, down, s)  # the last step takes Euler; keep the log finite
        return {"s2": _lerp_half_log(s, safe)}

    def update(state, xp, den, k, p, z, keyed):
        i, st = p["step"][k], p["stage"][k]
        s, target, up = targets(p, i)
        s_mid = p["s2"][i]
        d_cur = (xp - den) / jnp.where(st == 0, s, s_mid)
        x_euler = state["x"] + d_cur * (target - s)          # last step (stage 0) / DPM-Solver-2 (stage 1)
        x_mid = state["x"] + d_cur * (s_mid - s)             # stage 0 of a two-stage step
        if ancestral:
            x_new = jnp.where(st == 1, x_euler + z * p["s_noise"] * up, x_euler)
        else:
            x_new = x_euler
        done = (st == 1) | (i == p["last"])
        return {"x": jnp.where(done, x_new, state["x"]), "x2": jnp.where(done, state["x2"], x_mid), "d": state["d"]}

    return make_k_sampler(name, sigmas, log_sigmas, stages=lambda i: 1 if i == n - 1 else 2,
                          draws=(lambda i, s: ancestral and s == 1), plan_fn=plan_fn, init_fn=_x_init,
                          point_fn=_point_two_stage, update_fn=update, steps=steps, schedule=schedule, label=label)


def dpm2(sigmas, log_sigmas, steps, schedule, label="DPM2"):
    return _dpm2_common("dpm2", sigmas, log_sigmas, steps, schedule, False, label)


def dpm2_ancestral(sigmas, log_sigmas, steps, schedule, label="DPM2 a"):
    return _dpm2_common("dpm2_a", sigmas, log_sigmas, steps, schedule, True, label)
