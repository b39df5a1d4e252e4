"""The app's diffusers samplers (diffuser_ddim / dpm / pndm / lms, its scheduler_cfgs: scaled_linear,
leading, steps_offset 1, v_prediction) through the uniform driver, against diffusers' torch
schedulers on the analytic model of test_solvers.py: U-Net input and timestep of every call and the
final latent, max|ours - ref| / max|ref|."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.diffusion.samplers import make_sampler, sample

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CFG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
           timestep_spacing="leading", prediction_type="v_prediction")
TOL = 1e-5


def app_scheduler(kind, karras):
    """refnet/sampling/denoiser.py DiffuserDenoiser: the yaml config, use_karras_sigmas where accepted."""
    if kind == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, **CFG)
    if kind == "dpm":
        return diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=karras, **CFG)
    if kind == "pndm":
        return diffusers.PNDMScheduler(**CFG)
    return diffusers.LMSDiscreteScheduler(use_karras_sigmas=karras, **CFG)


def toy_np(x, t):
    return (0.3 * np.tanh(x.astype(np.float64)) + 1e-3 * float(t) * x).astype(np.float32)


def toy_jnp(x, t):
    return 0.3 * jnp.tanh(x) + 1e-3 * t * x


def run_reference(sched, n, noise):
    sched.set_timesteps(n)
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    xs, ts = [], []
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        xs.append(x_in.numpy().copy())
        ts.append(float(t))
        x = sched.step(torch.from_numpy(toy_np(x_in.numpy(), t)), t, x, return_dict=False)[0]
    return np.stack(xs), np.array(ts), x.numpy()


@pytest.mark.parametrize("n", [5, 8, 20])
@pytest.mark.parametrize("kind,schedule", [("ddim", "Automatic"), ("dpm", "Automatic"), ("dpm", "Karras"),
                                           ("pndm", "Automatic"), ("lms", "Automatic"), ("lms", "Karras")])
def test_app_diffusers_sampler(kind, schedule, n):
    noise = np.random.default_rng(n).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref_x, ref_t, ref_out = run_reference(app_scheduler(kind, schedule == "Karras"), n, noise)
    smp = make_sampler(f"diffuser_{kind}", n, schedule)
    out, (x_in, t_in) = jax.jit(lambda x: sample(smp, toy_jnp, x, record_calls=True))(jnp.asarray(noise))
    assert smp.num_calls == len(ref_t)
    np.testing.assert_allclose(np.asarray(t_in), ref_t, rtol=1e-6, atol=1e-6)
    err = max(np.abs(np.asarray(x_in[k]) - ref_x[k]).max() / np.abs(ref_x[k]).max() for k in range(len(ref_t)))
    final = np.abs(np.asarray(out) - ref_out).max() / np.abs(ref_out).max()
    print(f"diffuser_{kind} {schedule} N={n} calls={smp.num_calls}: call err {err:.1e} final {final:.1e}")
    assert err <= TOL and final <= TOL
    assert np.abs(ref_out - noise).max() > 0.1


def test_pndm_call_count_and_small_steps():
    assert make_sampler("diffuser_pndm", 20).num_calls == 29  # 12 Runge-Kutta calls for the first 3 steps
    with pytest.raises(ValueError, match="at least 4 steps"):
        make_sampler("diffuser_pndm", 3)


def test_other_schedules_ignored_like_the_app():
    """The app only turns use_karras_sigmas on for "Karras"; other schedules leave diffusers as is."""
    a, b = make_sampler("diffuser_dpm", 8, "Exponential"), make_sampler("diffuser_dpm", 8)
    np.testing.assert_array_equal(a.sigmas, b.sigmas)
    assert make_sampler("diffuser_ddim", 8, "Karras").schedule == "leading"
