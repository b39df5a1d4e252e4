"""k-diffusion DPM-Solver++ samplers as call machines: 2M, 2S a, SDE, 2M SDE (midpoint / heun), 3M SDE.

Same float32 formulas as `k_diffusion.sampling.sample_dpmpp_*` (t = -log sigma, sigma(t) = exp(-t)).
The SDE samplers draw from a Brownian tree in the reference (`BrownianTreeNoiseSampler`, torchsde):
its values cannot be reproduced without torchsde's tree, so a reference run is replayed by injecting
its returned draws (driver `noise=`). The JAX default draws N(0, 1) per call from the key, which is
the exact distribution of the tree's normalised increments for 2M/3M SDE (disjoint intervals are
independent). DPM++ SDE asks the tree for two NESTED intervals per step, [sigma_s, sigma_t] and
[sigma_next, sigma_t]: the keyed default reproduces their correlation sqrt(d1 / (d1 + d2)) by
building the second draw from the first and a fresh one. What the default does not reproduce is the
tree's coherence ACROSS step counts (the same seed giving related noise at 20 and 30 steps).
"""
from __future__ import annotations

import jax.numpy as jnp

from cdv2.diffusion.samplers.driver import ancestral_step
from cdv2.diffusion.samplers.k_euler import _no_plan, _point_one_stage, _point_two_stage, make_k_sampler


def _t(sigma):
    return -jnp.log(sigma)


def _sig(t):
    return jnp.exp(-t)


def _x_hist_init(x, plan):
    z = jnp.zeros_like(x)
    return {"x": x, "x2": x, "d1": z, "d2": z, "n1": z}


def dpmpp_2m(sigmas, log_sigmas, steps, schedule, label="DPM++ 2M"):
    def update(state, xp, den, k, p, z, keyed):
        i = p["step"][k]
        sig = p["sig"]
        t, t_next = _t(sig[i]), _t(sig[i + 1])
        h = t_next - t
        h_last = t - _t(sig[jnp.maximum(i - 1, 0)])
        r = h_last / h
        second = (i > 0) & (i < p["last"])
        den_d = jnp.where(second, (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * state["d1"], den)
        x = (_sig(t_next) / _sig(t)) * state["x"] - jnp.expm1(-h) * den_d
        return {**state, "x": x, "d1": den}

    return make_k_sampler("dpmpp_2m", sigmas, log_sigmas, stages=lambda i: 1, draws=lambda i, s: False,
                          plan_fn=_no_plan, init_fn=_x_hist_init, point_fn=_point_one_stage, update_fn=update,
                          steps=steps, schedule=schedule, label=label)


def dpmpp_2s_ancestral(sigmas, log_sigmas, steps, schedule, label="DPM++ 2S a"):
    n = len(sigmas) - 1

    def plan_fn(sig, eta, s_noise):
        down, up = ancestral_step(sig[:-1], sig[1:], eta)
        t = _t(sig[:-1])
        t_next = _t(jnp.where(down > 0, down, sig[:-1]))
        h = t_next - t
        s = t + 0.5 * h
        return {"down": down, "up": up, "t": t, "t_next": t_next, "h": h, "s2": _sig(s)}

    def update(state, xp, den, k, p, z, keyed):
        i, st = p["step"][k], p["stage"][k]
        sig_i = p["sig"][i]
        t, t_next, h = p["t"][i], p["t_next"][i], p["h"][i]
        x_euler = state["x"] + ((xp - den) / sig_i) * (p["down"][i] - sig_i)            # last step
        x_mid = (p["s2"][i] / _sig(t)) * state["x"] - jnp.expm1(-h * 0.5) * den          # stage 0
        x_new = (_sig(t_next) / _sig(t)) * state["x"] - jnp.expm1(-h) * den              # stage 1
        x_new = x_new + z * p["s_noise"] * p["up"][i]
        is_last = i == p["last"]
        return {**state, "x": jnp.where(st == 1, x_new, jnp.where(is_last, x_euler, state["x"])),
                "x2": jnp.where((st == 0) & ~is_last, x_mid, state["x2"])}

    return make_k_sampler("dpmpp_2s_a", sigmas, log_sigmas, stages=lambda i: 1 if i == n - 1 else 2,
                          draws=lambda i, s: s == 1, plan_fn=plan_fn, init_fn=_x_hist_init,
                          point_fn=_point_two_stage, update_fn=update, steps=steps, schedule=schedule, label=label)


def dpmpp_sde(sigmas, log_sigmas, steps, schedule, label="DPM++ SDE", r=0.5):
    n = len(sigmas) - 1
    fac = 1 / (2 * r)

    def plan_fn(sig, eta, s_noise):
        s_i, s_n = sig[:-1], jnp.where(sig[1:] > 0, sig[1:], sig[:-1])  # keep logs finite on the last step
        t, t_next = _t(s_i), _t(s_n)
        h = t_next - t
        s = t + h * r
        sd1, su1 = ancestral_step(_sig(t), _sig(s), eta)
        sd2, su2 = ancestral_step(_sig(t), _sig(t_next), eta)
        # Brownian increments in sigma: the second interval contains the first
        d1 = jnp.abs(_sig(t) - _sig(s))
        d2 = jnp.abs(_sig(s) - _sig(t_next))
        return {"t": t, "s_": _t(sd1), "su1": su1, "t_next_": _t(sd2), "su2": su2, "s2": _sig(s),
                "w1": jnp.sqrt(d1 / (d1 + d2)), "w2": jnp.sqrt(d2 / (d1 + d2))}

    def update(state, xp, den, k, p, z, keyed):
        i, st = p["step"][k], p["stage"][k]
        sig_i, sig_n = p["sig"][i], p["sig"][i + 1]
        t, s_, tn_ = p["t"][i], p["s_"][i], p["t_next_"][i]
        is_last = i == p["last"]
        x_euler = state["x"] + ((xp - den) / sig_i) * (sig_n - sig_i)
        # stage 0: step to s with noise 1
        x_mid = (_sig(s_) / _sig(t)) * state["x"] - jnp.expm1(t - s_) * den
        x_mid = x_mid + z * p["s_noise"] * p["su1"][i]
        # stage 1: step to t_next with noise 2 (keyed: correlated with noise 1 like the tree's increments)
        z2 = p["w1"][i] * state["n1"] + p["w2"][i] * z if keyed else z
        den_d = (1 - fac) * state["d1"] + fac * den
        x_new = (_sig(tn_) / _sig(t)) * state["x"] - jnp.expm1(t - tn_) * den_d
        x_new = x_new + z2 * p["s_noise"] * p["su2"][i]
        st0 = (st == 0) & ~is_last
        return {**state, "x": jnp.where(st == 1, x_new, jnp.where(is_last, x_euler, state["x"])),
                "x2": jnp.where(st0, x_mid, state["x2"]), "d1": jnp.where(st0, den, state["d1"]),
                "n1": jnp.where(st0, z, state["n1"])}

    return make_k_sampler("dpmpp_sde", sigmas, log_sigmas, stages=lambda i: 1 if i == n - 1 else 2,
                          draws=lambda i, s: i < n - 1, plan_fn=plan_fn, init_fn=_x_hist_init,
                          point_fn=_point_two_stage, update_fn=update, steps=steps, schedule=schedule, label=label)


def dpmpp_2m_sde(sigmas, log_sigmas, steps, schedule, label="DPM++ 2M SDE", solver_type="midpoint"):
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    n = len(sigmas) - 1

    def plan_fn(sig, eta, s_noise):
        s_n = jnp.where(sig[1:] > 0, sig[1:], sig[:-1])
        h = _t(s_n) - _t(sig[:-1])
        return {"h": h}

    def update(state, xp, den, k, p, z, keyed):
        i = p["step"][k]
        sig_i, sig_n = p["sig"][i], p["sig"][i + 1]
        h = p["h"][i]
        eta_h = p["eta"] * h
        x = sig_n / sig_i * jnp.exp(-eta_h) * state["x"] + (-jnp.expm1(-h - eta_h)) * den
        inv_r = 1 / (p["h"][jnp.maximum(i - 1, 0)] / h)
        if solver_type == "heun":
            corr = ((-jnp.expm1(-h - eta_h)) / (-h - eta_h) + 1) * inv_r * (den - state["d1"])
        else:
            corr = 0.5 * (-jnp.expm1(-h - eta_h)) * inv_r * (den - state["d1"])
        x = jnp.where(i > 0, x + corr, x)
        x = x + z * sig_n * jnp.sqrt(-jnp.expm1(-2 * eta_h)) * p["s_noise"]
        return {**state, "x": jnp.where(i == p["last"], den, x), "d1": den}

    name = "dpmpp_2m_sde" if solver_type == "midpoint" else "dpmpp_2m_sde_heun"
    return make_k_sampler(name, sigmas, log_sigmas, stages=lambda i: 1, draws=lambda i, s: i < n - 1,
                          plan_fn=plan_fn, init_fn=_x_hist_init, point_fn=_point_one_stage, update_fn=update,
                          steps=steps, schedule=schedule, label=label)


def dpmpp_3m_sde(sigmas, log_sigmas, steps, schedule, label="DPM++ 3M SDE"):
    n = len(sigmas) - 1

    def plan_fn(sig, eta, s_noise):
        s_n = jnp.where(sig[1:] > 0, sig[1:], sig[:-1])
        return {"h": _t(s_n) - _t(sig[:-1])}

    def update(state, xp, den, k, p, z, keyed):
        i = p["step"][k]
        sig_n = p["sig"][i + 1]
        h = p["h"][i]
        h_1, h_2 = p["h"][jnp.maximum(i - 1, 0)], p["h"][jnp.maximum(i - 2, 0)]
        h_eta = h * (p["eta"] + 1)
        x = jnp.exp(-h_eta) * state["x"] + (-jnp.expm1(-h_eta)) * den
        phi_2 = jnp.expm1(-h_eta) / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (den - state["d1"]) / r0
        d1_1 = (state["d1"] - state["d2"]) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x3 = x + phi_2 * d1 - phi_3 * d2
        x2 = x + phi_2 * d1_0
        x = jnp.where(i >= 2, x3, jnp.where(i == 1, x2, x))
        x = x + z * sig_n * jnp.sqrt(-jnp.expm1(-2 * h * p["eta"])) * p["s_noise"]
        return {**state, "x": jnp.where(i == p["last"], den, x), "d1": den, "d2": state["d1"]}

    return make_k_sampler("dpmpp_3m_sde", sigmas, log_sigmas, stages=lambda i: 1, draws=lambda i, s: i < n - 1,
                          plan_fn=plan_fn, init_fn=_x_hist_init, point_fn=_point_one_stage, update_fn=update,
                          steps=steps, schedule=schedule, label=label)
