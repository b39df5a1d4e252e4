"""Samplers against diffusers' torch schedulers, driven by the same analytic "model".

The model is v = 0.3*tanh(x_in) + 1e-3*t*x_in (smooth, nonlinear, timestep-dependent), evaluated by
each side on its own trajectory: numpy/torch for diffusers, jnp inside one jax.jit + lax.fori_loop
for ours. Every intermediate latent is compared (max |ours - ref| / max |ref| per step)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.diffusion.diffusers_samplers import SamplerState, make_sampler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 + numpy 2 warn about __array__(copy=...) inside set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

COMMON = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
              timestep_spacing="leading", prediction_type="v_prediction")
TOL = 1e-5  # max-abs error relative to the latent's max-abs, at every step


def model_np(x, t):
    x = x.astype(np.float64)
    return (0.3 * np.tanh(x) + 1e-3 * float(t) * x).astype(np.float32)


def model_jnp(x, t):
    return 0.3 * jnp.tanh(x) + 1e-3 * t.astype(jnp.float32) * x


def diffusers_scheduler(name, karras, set_alpha_to_one=True):
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
            final_sigmas_type="zero", use_karras_sigmas=karras, **COMMON)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**COMMON)
    return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=set_alpha_to_one, **COMMON)


def run_diffusers(sched, n, noise):
    """The authors' DiffuserDenoiser loop (refnet/sampling/denoiser.py) with the analytic model."""
    sched.set_timesteps(n)
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    traj = [x.numpy().copy()]
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        v = torch.from_numpy(model_np(x_in.numpy(), t))
        x = sched.step(v, t, x, return_dict=False)[0]
        traj.append(x.numpy().copy())
    return sched.timesteps.numpy(), np.stack(traj)


def run_ours(smp, noise):
    """The whole loop in one jit; the trajectory buffer is carried through fori_loop."""
    ts = jnp.asarray(smp.timesteps)

    @jax.jit
    def sample(noise):
        state = smp.init(noise * smp.init_noise_sigma)
        traj = jnp.zeros((smp.num_steps + 1,) + noise.shape, jnp.float32).at[0].set(state.x)

        def body(i, carry):
            state, traj = carry
            x_in = smp.scale_model_input(state, state.x, i)
            state = smp.step(state, model_jnp(x_in, ts[i]), i)
            return state, traj.at[i + 1].set(state.x)

        return jax.lax.fori_loop(0, smp.num_steps, body, (state, traj))[1]

    return np.asarray(sample(jnp.asarray(noise)))


CASES = [("dpmpp_2m", False, True), ("dpmpp_2m", True, True), ("euler", False, True),
         ("ddim", False, True), ("ddim", False, False)]


@pytest.mark.parametrize("n", [8, 20])
@pytest.mark.parametrize("name,karras,alpha_one", CASES)
def test_trajectory_matches_diffusers(name, karras, alpha_one, n):
    noise = np.random.default_rng(n).standard_normal((1, 4, 16, 16)).astype(np.float32)
    ref_ts, ref = run_diffusers(diffusers_scheduler(name, karras, alpha_one), n, noise)
    smp = make_sampler(name, n, karras=karras, set_alpha_to_one=alpha_one)
    np.testing.assert_array_equal(smp.timesteps, ref_ts.astype(np.int64))
    ours = run_ours(smp, noise)
    err = np.abs(ours - ref).max(axis=(1, 2, 3, 4)) / np.abs(ref).max(axis=(1, 2, 3, 4))
    print(f"{name} karras={karras} set_alpha_to_one={alpha_one} N={n}: max step error {err.max():.2e}")
    assert err.max() <= TOL, err
    # the test can fail: the solver really moves x, and the last step lands near x0, not the noise
    assert np.abs(ref[-1] - ref[0]).max() > 0.1


def test_dpm_uses_second_order():
    """Dropping the D1 history term (feeding prev_x0 = x0) must change the result far beyond TOL."""
    noise = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    _, ref = run_diffusers(diffusers_scheduler("dpmpp_2m", False), 8, noise)
    smp = make_sampler("dpmpp_2m", 8)

    def step_first_order(state, v, i):
        x0 = smp.step(state, v, i).prev_x0
        return smp.step(SamplerState(state.x, x0), v, i)

    ours = run_ours(dataclasses.replace(smp, step=step_first_order), noise)
    assert np.abs(ours[-1] - ref[-1]).max() / np.abs(ref[-1]).max() > 100 * TOL
