"""k-diffusion LMS and DPM fast as call machines; DPM adaptive is refused (see `dpm_adaptive`).

LMS: k-diffusion integrates each Lagrange basis polynomial with scipy's `quad` on the host; the basis
has degree <= 3, so 3-point Gauss-Legendre is exact, and here it runs in JAX on the traced sigmas.
DPM fast: DPM-Solver with orders [3, ..., 3, 2, 1] (or [3, ..., nfe % 3]) on m = nfe // 3 + 1
uniform steps in t = -log sigma between the schedule's smallest non-zero and largest sigma; nfe =
the step count. The app passes eta = 1, which makes it ancestral (one draw per step).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cdv2.diffusion.samplers.driver import Sampler, ancestral_step
from cdv2.diffusion.samplers.k_euler import _point_one_stage, make_k_sampler
from cdv2.diffusion.samplers.k_schedules import torch_linspace_jnp

_GL_X = np.array([-np.sqrt(0.6), 0.0, np.sqrt(0.6)])
_GL_W = np.array([5 / 9, 8 / 9, 5 / 9])


def lms_coefficients(sig, order: int = 4):
    """(N, order) coefficients: column j weighs the derivative of j steps ago (0 = current)."""
    n = sig.shape[0] - 1
    rows = []
    for i in range(n):
        cur = min(i + 1, order)
        a, b = sig[i], sig[i + 1]
        taus = (a + b) / 2 + (b - a) / 2 * jnp.asarray(_GL_X, jnp.float32)
        row = []
        for j in range(order):
            if j >= cur:
                row.append(jnp.float32(0))
                continue
            prod = jnp.ones_like(taus)
            for m in range(cur):
                if m != j:
                    prod = prod * (taus - sig[i - m]) / (sig[i - j] - sig[i - m])
            row.append((b - a) / 2 * jnp.sum(jnp.asarray(_GL_W, jnp.float32) * prod))
        rows.append(jnp.stack(row))
    return jnp.stack(rows)


def lms(sigmas, log_sigmas, steps, schedule, label="LMS", order=4):
    def plan_fn(sig, eta, s_noise):
        return {"coef": lms_coefficients(sig, order)}

    def init_fn(x, plan):
        return {"x": x, "ds": jnp.zeros((order,) + x.shape, x.dtype)}

    def update(state, xp, den, k, p, z, keyed):
        i = p["step"][k]
        d = (xp - den) / p["sig"][i]
        ds = jnp.concatenate([d[None], state["ds"][:-1]], axis=0)  # most recent first
        c = p["coef"][i]
        acc = c[0] * ds[0]
        for j in range(1, order):
            acc = acc + c[j] * ds[j]
        return {"x": state["x"] + acc, "ds": ds}

    return make_k_sampler("lms", sigmas, log_sigmas, stages=lambda i: 1, draws=lambda i, s: False,
                          plan_fn=plan_fn, init_fn=init_fn, point_fn=_point_one_stage, update_fn=update,
                          steps=steps, schedule=schedule, label=label)


def dpm_fast_orders(nfe: int) -> list[int]:
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


def dpm_fast(sigmas, log_sigmas, steps, schedule, label="DPM fast") -> Sampler:
    """`sample_dpm_fast(model, x, sigma_min, sigma_max, n=steps, eta)` with sigma_min/max taken from
    the schedule like the app (min over the non-zero sigmas, max)."""
    orders = dpm_fast_orders(steps)
    m = len(orders)
    # r1 / r2 per stage for order 2 (1/2) and order 3 (1/3, 2/3)
    r1 = np.array([1 / 2 if o == 2 else 1 / 3 for o in orders], np.float32)

    def plan_fn(sig, eta, s_noise):
        s_max = jnp.max(sig)
        s_min = jnp.min(jnp.where(sig > 0, sig, jnp.inf))
        t_end = -jnp.log(s_min)
        ts = torch_linspace_jnp(-jnp.log(s_max), t_end, m + 1)
        t, t_next = ts[:-1], ts[1:]
        sd, _ = ancestral_step(jnp.exp(-t), jnp.exp(-t_next), eta)
        t_next_ = jnp.where(eta == 0, t_next, jnp.minimum(t_end, -jnp.log(sd)))
        su = jnp.where(eta == 0, 0.0, jnp.sqrt(jnp.exp(-t_next) ** 2 - jnp.exp(-t_next_) ** 2))
        h = t_next_ - t
        rr1 = jnp.asarray(r1)
        s1, s2 = t + rr1 * h, t + (2 / 3) * h
        return {"t": t, "tn": t_next_, "h": h, "su": su, "r1": rr1, "s1": s1, "s2": s2,
                "order": jnp.asarray(orders, jnp.int32), "init_sigma": s_max}

    def init_fn(x, plan):
        z = jnp.zeros_like(x)
        return {"x": x, "u": x, "eps": z, "eps1": z}

    def point(state, k, p):
        i, st = p["step"][k], p["stage"][k]
        t_pt = jnp.where(st == 0, p["t"][i], jnp.where(st == 1, p["s1"][i], p["s2"][i]))
        return jnp.where(st == 0, state["x"], state["u"]), jnp.exp(-t_pt)

    def update(state, xp, den, k, p, z, keyed):
        i, st = p["step"][k], p["stage"][k]
        o, h, r1_ = p["order"][i], p["h"][i], p["r1"][i]
        sg = lambda t: jnp.exp(-t)  # noqa: E731
        t = p["t"][i]
        s_pt = sg(jnp.where(st == 0, t, jnp.where(st == 1, p["s1"][i], p["s2"][i])))
        eps_cur = (xp - den) / s_pt
        x = state["x"]
        eps = jnp.where(st == 0, eps_cur, state["eps"])
        sn = sg(p["tn"][i])
        # finishing updates (used when this stage is the step's last)
        x1 = x - sn * jnp.expm1(h) * eps
        x2 = x - sn * jnp.expm1(h) * eps - sn / (2 * r1_) * jnp.expm1(h) * (eps_cur - eps)
        r2 = 2 / 3
        x3 = x - sn * jnp.expm1(h) * eps - sn / r2 * (jnp.expm1(h) / h - 1) * (eps_cur - eps)
        # intermediate points
        u1 = x - sg(p["s1"][i]) * jnp.expm1(r1_ * h) * eps
        s2 = sg(p["s2"][i])
        u2 = x - s2 * jnp.expm1(r2 * h) * eps - s2 * (r2 / r1_) * (jnp.expm1(r2 * h) / (r2 * h) - 1) * (eps_cur - eps)
        finished = st == o - 1
        x_fin = jnp.where(o == 1, x1, jnp.where(o == 2, x2, x3)) + p["su"][i] * p["s_noise"] * z
        u_next = jnp.where(st == 0, u1, u2)
        return {"x": jnp.where(finished, x_fin, x), "u": jnp.where(finished, state["u"], u_next), "eps": eps,
                "eps1": jnp.where(st == 1, eps_cur, state["eps1"])}

    smp = make_k_sampler("dpm_fast", sigmas, log_sigmas, stages=lambda i: orders[i],
                         draws=lambda i, s: s == orders[i] - 1, plan_fn=plan_fn, init_fn=init_fn, point_fn=point,
                         update_fn=update, steps=steps, schedule=schedule,
                         init_scale=lambda p: p["sig"][0], label=label, machine_steps=m)
    assert smp.num_calls == steps, (smp.num_calls, steps)
    return smp


def dpm_adaptive(*args, **kwargs):
    raise NotImplementedError(
        "DPM adaptive is not implemented: its number of U-Net calls is decided at run time by a PID "
        "step-size controller (accept/reject on an error norm, step sizes kept as float64 Python numbers), "
        "so it cannot be one fixed-length jitted loop and a lax.while_loop version would not replay the "
        "reference's accept/reject decisions bit-for-bit; use DPM fast or DPM++ 2M / 3M SDE instead")
