"""Noise schedule, timestep selection and v-prediction helpers against the authors' buffers and
diffusers' schedulers (the versions the authors used, 0.31, compute these the same way as 0.42)."""
import numpy as np
import pytest
from safetensors.numpy import load_file

from cdv2.diffusion import parameterization as par
from cdv2.diffusion import schedule as sch
from cdv2.diffusion.diffusers_samplers import make_sampler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
# diffusers 0.42 + numpy 2 warn about __array__(copy=...) inside set_timesteps
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

COMMON = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
              timestep_spacing="leading", prediction_type="v_prediction")


def dpm_scheduler(karras=False):
    return diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=karras, **COMMON)


def test_ldm_buffers_equal_authors_checkpoint(oracle_dir):
    """All 12 schedule buffers stored in the authors' checkpoint, bit for bit."""
    sd = load_file(str(oracle_dir / "tiny_v2.safetensors"))
    ours = sch.ldm_schedule_buffers()
    assert len(ours) == 12
    for k, v in ours.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_ldm_constants():
    ac = sch.ldm_alphas_cumprod()
    assert ac.dtype == np.float32
    assert abs(ac[0] - 0.99915) < 1e-6 and abs(ac[999] - 0.0046601) < 1e-6
    # sigma range as the spec quotes it: float64 sqrt(1/a - 1) (the sqrt_recipm1 buffer)
    s = sch.ldm_schedule_buffers()["sqrt_recipm1_alphas_cumprod"]
    assert abs(s[0] - 0.0291672) < 1e-6 and abs(s[-1] / 14.614641 - 1) < 1e-6
    # from the float32 alphas_cumprod (what k-diffusion's wrapper does) the low end is 0.0291675
    s32 = sch.sigmas_from_alphas_cumprod(ac)
    assert abs(s32[0] - 0.0291675) < 1e-6 and abs(s32[-1] / 14.614641 - 1) < 1e-6


def test_diffusers_alphas_cumprod_bitwise():
    ref = dpm_scheduler().alphas_cumprod.numpy()
    ours = sch.diffusers_alphas_cumprod()
    np.testing.assert_array_equal(ours, ref)
    for cls in (diffusers.EulerDiscreteScheduler, diffusers.DDIMScheduler):
        np.testing.assert_array_equal(ours, cls(**COMMON).alphas_cumprod.numpy())
    # it differs from the authors' float64-computed buffer by a few float32 ulps only
    assert np.abs(ours / sch.ldm_alphas_cumprod() - 1).max() < 2e-6


def test_torch_linspace_f32_bitwise():
    for n in (2, 3, 7, 10, 999, 1000, 1001):
        np.testing.assert_array_equal(sch.torch_linspace_f32(0.1, 3.7, n),
                                      torch.linspace(0.1, 3.7, n, dtype=torch.float32).numpy())


def test_leading_timesteps_literal():
    assert sch.dpm_leading_timesteps(8).tolist() == [889, 778, 667, 556, 445, 334, 223, 112]
    assert sch.dpm_leading_timesteps(20).tolist() == list(range(941, 47, -47))
    assert sch.leading_timesteps(8).tolist() == list(range(876, 0, -125))
    assert sch.leading_timesteps(20).tolist() == list(range(951, 0, -50))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 14, 15, 20, 25, 50, 100])
def test_timesteps_and_sigmas_match_diffusers(n):
    for karras in (False, True):
        ref = dpm_scheduler(karras)
        ref.set_timesteps(n)
        smp = make_sampler("dpmpp_2m", n, karras=karras)
        np.testing.assert_array_equal(smp.timesteps, ref.timesteps.numpy(), err_msg=f"karras={karras}")
        # sigmas: equal up to torch's non-correctly-rounded float32 sqrt (1 ulp)
        np.testing.assert_allclose(smp.sigmas, ref.sigmas.numpy(), rtol=2.5e-7, atol=0)
        assert smp.sigmas[-1] == 0.0
    for name, cls in (("euler", diffusers.EulerDiscreteScheduler), ("ddim", diffusers.DDIMScheduler)):
        ref = cls(**COMMON)
        ref.set_timesteps(n)
        smp = make_sampler(name, n)
        np.testing.assert_array_equal(smp.timesteps, ref.timesteps.numpy().astype(np.int64), err_msg=name)
        if name == "euler":
            np.testing.assert_allclose(smp.sigmas, ref.sigmas.numpy(), rtol=2.5e-7, atol=0)
            assert abs(smp.init_noise_sigma / float(ref.init_noise_sigma) - 1) < 2.5e-7


def test_oracle_first_timestep(fixtures):
    """The oracle runs used diffuser_dpm with 8 steps: their first U-Net call had t = 889."""
    smp = make_sampler("diffuser_dpm", 8)
    for mode in ("vanilla", "style", "background", "full", "full_dualcfg"):
        t = fixtures[f"{mode}/t"]
        assert np.all(t == smp.timesteps[0]), (mode, t)
    assert smp.init_noise_sigma == 1.0


def test_v_conversions_roundtrip_and_diffusers():
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 2, 4, 8, 8))
    ac = sch.diffusers_alphas_cumprod().astype(np.float64)
    t = np.array([3, 700])
    a = ac[t][:, None, None, None]
    x_t = par.q_sample(x0, eps, a)
    v = par.get_v(x0, eps, a)
    np.testing.assert_allclose(par.v_to_x0(x_t, v, a), x0, atol=1e-12)
    np.testing.assert_allclose(par.v_to_eps(x_t, v, a), eps, atol=1e-12)
    ref = diffusers.DDIMScheduler(**COMMON)
    ref.alphas_cumprod = torch.from_numpy(ac)  # float64 so the comparison is tight
    tx0, teps, tt = torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)
    np.testing.assert_allclose(ref.get_velocity(tx0, teps, tt).numpy(), v, atol=1e-12)
    np.testing.assert_allclose(ref.add_noise(tx0, teps, tt).numpy(), x_t, atol=1e-12)
