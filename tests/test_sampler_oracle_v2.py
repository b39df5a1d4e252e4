"""The sampler modes of ../shared/oracle/v2 replayed at the level of the recorded U-Net calls.

Each call of our loop is answered with the authors' recorded raw v outputs of that call
(`sample/model_out`, all CFG rows), combined with cdv2's guidance, and every recorded random draw
(Euler a's randn_like, the Brownian-tree outputs of DPM++ 2M/3M SDE) is injected. Compared: the
sigmas, the U-Net input x and t of every call, and the final latent `sample/z_final`; the sampler
runs exactly as the pipeline will run it, without the model."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.diffusion import guidance
from cdv2.diffusion.samplers import make_sampler, sample

TOL = 1e-5
MODES = ["vanilla", "bs2_dpm", "vanilla_kdpmpp2m", "k_euler_a", "k_euler_a_karras", "k_dpmpp2msde",
         "k_dpmpp2msde_karras", "k_dpmpp3msde", "k_dpmpp3msde_karras", "k_heun_exponential", "k_heun_karras",
         "k_dpmpp2m_exponential", "k_dpmpp2msde_full_bgimg", "bs2_det_dpmpp2msde", "bs2_nodet_dpmpp2msde",
         "bs2_det_euler_a_full"]


@pytest.fixture(scope="module")
def oracle(oracle_v2_dir):
    meta = json.loads((oracle_v2_dir / "tiny_v2_fixtures.json").read_text())
    npz = np.load(oracle_v2_dir / "tiny_v2_fixtures.npz")
    return meta, lambda name: npz[meta["aliases"].get(name, name)]


@pytest.mark.parametrize("mode", MODES)
def test_replay_oracle_sampler(oracle, mode):
    meta, arr = oracle
    m = meta["modes"][mode]
    bs, gs = m["bs"], m["gs"]
    branches = guidance.branches_for(gs[0], gs[1])
    assert len(branches) * bs == m["cfg_repeat"] * bs
    smp = make_sampler(m["sampler"], m["step"], m["scheduler"])
    p = f"mode/{mode}/"
    model_out = jnp.asarray(arr(p + "sample/model_out"))       # (calls, R, 4, h, w)
    x_T = arr("in/xT" if bs == 1 else "in/xT_bs2")
    assert smp.num_calls == model_out.shape[0], (smp.num_calls, model_out.shape)
    if smp.family == "k":
        np.testing.assert_allclose(smp.sigmas, arr(p + "sample/sigmas"), rtol=2e-6, atol=0)
    noise = None
    if smp.num_draws:
        name = "noise/brownian" if f"{p}noise/brownian" in meta["arrays"] else "noise/k_randn_like"
        noise = jnp.broadcast_to(jnp.asarray(arr(p + name)), (smp.num_draws,) + x_T.shape)

    def model_fn(x_in, t, k):  # the recorded answer of call k, guided like the pipeline does
        return guidance.combine(model_out[k], branches, gs[0], gs[1])

    run = jax.jit(lambda x, nz: sample(smp, model_fn, x, None, nz, record_calls=True, pass_call_index=True))
    out, (x_in, t_in) = run(jnp.asarray(x_T), noise)
    ref_x = arr(p + "sample/x_in")[:, :bs]
    ref_t = arr(p + "sample/t_in")[:, 0]
    call_err = max(np.abs(np.asarray(x_in[k]) - ref_x[k]).max() / np.abs(ref_x[k]).max()
                   for k in range(smp.num_calls))
    z = arr(p + "sample/z_final")
    final = np.abs(np.asarray(out) - z).max() / np.abs(z).max()
    print(f"{mode:26s} {m['sampler']:14s} {m['scheduler']:11s} calls={smp.num_calls:2d} "
          f"call err {call_err:.1e} t err {np.abs(np.asarray(t_in) - ref_t).max():.1e} final {final:.1e}")
    np.testing.assert_allclose(np.asarray(t_in), ref_t, rtol=0, atol=1e-3)
    assert call_err <= TOL and final <= TOL
