"""Every norm of the model uses two-pass variance: inputs whose mean is 10, 100 or 1000 times their
spread (style-modulation shifts and large-activation channels of real weights) are normalised to
fp32 accuracy against a float64 numpy reference; the fast E[x^2]-E[x]^2 form (flax's default) is
measured alongside to show what it would lose. bf16 compute keeps fp32 statistics."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.modules.layers import group_norm
from cdv2.modules.transformer import layer_norm

RATIOS = (10, 100, 1000)


def _reference(x, axes, eps):
    x = x.astype(np.float64)
    m = x.mean(axis=axes, keepdims=True)
    v = ((x - m) ** 2).mean(axis=axes, keepdims=True)
    return (x - m) / np.sqrt(v + eps)


def _inputs(ratio, shape, seed=0):
    rng = np.random.RandomState(seed)
    return (ratio + rng.randn(*shape)).astype(np.float32)  # mean/std = ratio


def _gn_reference(x, groups=32, eps=1e-5):
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    return _reference(g, (1, 2, 4), eps).reshape(x.shape)


def _apply(module, x):
    return np.asarray(module.apply(module.init(__import__("jax").random.PRNGKey(0), x), x), np.float64)


@pytest.mark.parametrize("ratio", RATIOS)
def test_group_norm_two_pass(ratio):
    x = _inputs(ratio, (2, 8, 8, 64))
    ref = _gn_reference(x)
    ours = _apply(group_norm("gn", 1e-5, jnp.float32, jnp.float32), x)
    fast = _apply(nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=True), x)
    err, err_fast = np.abs(ours - ref).max(), np.abs(fast - ref).max()
    print(f"GroupNorm mean/std {ratio}: two-pass {err:.2e}, fast {err_fast:.2e}")
    assert err < 1e-4 * max(1.0, ratio / 100)  # fp32 input rounding of x itself: ~ratio * 6e-8
    if ratio >= 100:
        assert err_fast > 10 * err  # the test can tell the two forms apart


@pytest.mark.parametrize("ratio", RATIOS)
def test_layer_norm_two_pass(ratio):
    x = _inputs(ratio, (2, 16, 320))
    ref = _reference(x, (-1,), 1e-5)
    ours = _apply(layer_norm("ln", jnp.float32, jnp.float32), x)
    fast = _apply(nn.LayerNorm(epsilon=1e-5, use_fast_variance=True), x)
    err, err_fast = np.abs(ours - ref).max(), np.abs(fast - ref).max()
    print(f"LayerNorm mean/std {ratio}: two-pass {err:.2e}, fast {err_fast:.2e}")
    assert err < 1e-4 * max(1.0, ratio / 100)
    if ratio >= 100:
        assert err_fast > 10 * err


def test_bf16_compute_keeps_fp32_statistics():
    x = _inputs(100, (2, 8, 8, 64))
    ref = _gn_reference(x)
    out = _apply(group_norm("gn", 1e-5, jnp.bfloat16, jnp.float32), jnp.asarray(x))
    # bf16 output rounding only (~4e-3 relative); fast or bf16 statistics would be off by O(1)
    assert np.abs(out - ref).max() < 3e-2
