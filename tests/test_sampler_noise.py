"""The keyed (JAX) noise of the stochastic samplers: deterministic per key, shared across rows on
request, and with the statistics of k-diffusion's draws. k-diffusion's BrownianTreeNoiseSampler
returns (W(s1) - W(s0)) / sqrt|s1 - s0|: standard normal per interval, independent for disjoint
intervals (2M / 3M SDE), correlated sqrt(d1 / (d1 + d2)) for DPM++ SDE's nested pair of intervals.
The draws are read back through a linear toy model (v = 0) by recording what the loop adds."""
import jax
import jax.numpy as jnp
import numpy as np

from cdv2.diffusion.samplers import make_sampler, sample
from cdv2.diffusion.samplers.driver import _draw


def _draws(smp, key, shape, batch_shared=False):
    return np.stack([np.asarray(_draw(smp, k, shape, key, None, batch_shared)) for k in range(smp.num_calls)
                     if smp.draw_of_call[k] >= 0])


def test_keyed_noise_is_deterministic_and_per_key():
    smp = make_sampler("Euler a", 6)
    f = jax.jit(lambda x, key: sample(smp, lambda x_in, t: 0.1 * x_in, x, key))
    x = jnp.zeros((2, 4, 8, 8)) + 0.5
    a, b, c = f(x, jax.random.PRNGKey(0)), f(x, jax.random.PRNGKey(0)), f(x, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3
    assert np.abs(np.asarray(a[0]) - np.asarray(a[1])).max() > 1e-3  # rows differ by default


def test_batch_shared_noise_makes_rows_identical():
    """The app's "deterministic batch seed" (one Brownian tree per row, same seed): identical rows."""
    smp = make_sampler("DPM++ 2M SDE", 6)
    x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(3), (1, 4, 8, 8)), (2, 4, 8, 8))
    out = jax.jit(lambda x, k: sample(smp, lambda x_in, t: 0.1 * x_in, x, k, batch_shared_noise=True))(
        x, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(out[1]))


def test_injected_noise_shape_is_checked():
    smp = make_sampler("DPM++ 2M SDE", 6)
    try:
        sample(smp, lambda x, t: x, jnp.zeros((1, 4, 8, 8)), None, jnp.zeros((3, 1, 4, 8, 8)))
    except ValueError as e:
        assert "injected noise must have shape" in str(e)
    else:
        raise AssertionError("no error")


def test_sde_draws_are_iid_standard_normal():
    smp = make_sampler("DPM++ 2M SDE", 8)
    z = _draws(smp, jax.random.PRNGKey(0), (4, 4, 32, 32)).reshape(smp.num_draws, -1)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    c = np.corrcoef(z)
    assert np.abs(c - np.eye(len(c))).max() < 0.03


def test_dpmpp_sde_pair_has_the_brownian_correlation():
    """DPM++ SDE: the stage-1 draw (interval [sigma_next, sigma_t]) contains the stage-0 one
    ([sigma_s, sigma_t]); check the correlation of the effective (correlated) pair per step."""
    smp = make_sampler("DPM++ SDE", 5)
    shape = (8, 4, 32, 32)
    key = jax.random.PRNGKey(1)
    raw = _draws(smp, key, shape)  # raw N(0,1) per call; the sampler correlates them in its update
    plan = smp.plan(jnp.asarray(smp.sigmas), 1.0, 1.0)
    for i in range(smp.steps - 1):
        z1, fresh = raw[2 * i].ravel(), raw[2 * i + 1].ravel()
        w1, w2 = float(plan["w1"][i]), float(plan["w2"][i])
        z2 = w1 * z1 + w2 * fresh
        expected = w1
        assert abs(np.corrcoef(z1, z2)[0, 1] - expected) < 0.02, (i, expected)
        assert abs(z2.std() - 1) < 0.02
        # the expected value from the sigmas themselves (Brownian motion in sigma)
        s, s_next = float(smp.sigmas[i]), float(smp.sigmas[i + 1])
        s_mid = float(np.exp(-(-np.log(s) + 0.5 * (np.log(s) - np.log(s_next)))))
        assert abs(expected - np.sqrt((s - s_mid) / (s - s_next))) < 1e-5


def test_brownian_tree_reference_statistics():
    """k-diffusion's own BrownianTreeNoiseSampler (torchsde) has the statistics assumed above."""
    import pytest

    torch = pytest.importorskip("torch")
    import k_diffusion_ref as kref

    sampling, _ = kref.load()
    x = torch.zeros(16, 4, 16, 16)
    tree = sampling.BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=0)
    a, b, c = 14.6, 5.0, 2.0
    z1, z2 = tree(a, b).numpy().ravel(), tree(a, c).numpy().ravel()
    z3 = tree(c, 1.0).numpy().ravel()
    assert abs(z1.std() - 1) < 0.03 and abs(z2.std() - 1) < 0.03
    assert abs(np.corrcoef(z1, z2)[0, 1] - np.sqrt((a - b) / (a - c))) < 0.03
    assert abs(np.corrcoef(z2, z3)[0, 1]) < 0.03


def test_dpmpp_sde_keyed_run_equals_replay_of_correlated_pairs():
    """The keyed run really uses the correlated pair: replaying [z1, w1 z1 + w2 z'] injected gives it."""
    smp = make_sampler("DPM++ SDE", 5)
    shape = (1, 4, 8, 8)
    key = jax.random.PRNGKey(2)
    raw = _draws(smp, key, shape)
    plan = smp.plan(jnp.asarray(smp.sigmas), 1.0, 1.0)
    inj = raw.copy()
    for i in range(smp.steps - 1):
        inj[2 * i + 1] = float(plan["w1"][i]) * raw[2 * i] + float(plan["w2"][i]) * raw[2 * i + 1]
    model = lambda x_in, t: 0.3 * jnp.tanh(x_in)  # noqa: E731
    x = jax.random.normal(jax.random.PRNGKey(5), shape)
    keyed = sample(smp, model, x, key)
    replay = sample(smp, model, x, None, jnp.asarray(inj))
    np.testing.assert_allclose(np.asarray(keyed), np.asarray(replay), rtol=1e-5, atol=1e-6)
    plain = sample(smp, model, x, None, jnp.asarray(raw))  # uncorrelated draws give another result
    assert np.abs(np.asarray(plain) - np.asarray(keyed)).max() > 1e-3
