"""The attention implementations are one function: our XLA core, its query-chunked form and
jax.nn.dot_product_attention agree; the per-backend choice follows its documented rule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.model import resolve_attention
from cdv2.modules import attention as A


def _qkv(b=2, n=96, m=40, c=64, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (3 * jax.random.normal(ks[0], (b, n, c)), jax.random.normal(ks[1], (b, m, c)),
            jax.random.normal(ks[2], (b, m, c)))


def _reference(q, k, v, heads):
    """Plain numpy float64 softmax attention with torch's (h d) head split."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, n, c = q.shape
    d = c // heads
    split = lambda a: a.reshape(b, a.shape[1], heads, d).transpose(0, 2, 1, 3)
    s = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(d)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, n, c)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("impl", [None, "xla", "chunked", "library"])
def test_implementations_equal_the_softmax_formula(impl, heads):
    q, k, v = _qkv()
    out = A.multihead_attention(q, k, v, heads, impl)
    ref = _reference(q, k, v, heads)
    assert np.abs(np.asarray(out) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_chunking_really_splits_and_stays_exact():
    q, k, v = _qkv(n=96)
    # 2 batch * 4 heads * 96 queries * 40 keys * 4 bytes = 122,880 bytes of scores > 2 blocks of
    # 10,240 bytes, so it splits: one head at a time (16 channels), blocks of at least 64 queries'
    # worth (40 keys * 4 bytes each): 48, the largest divisor of 96 <= 64
    jaxpr = str(jax.make_jaxpr(lambda *a: A.chunked_xla_attention(*a, heads=4, block_bytes=64 * 160))(q, k, v))
    assert "while" in jaxpr or "scan" in jaxpr
    assert "f32[48,16]" in jaxpr and "f32[48,40]" in jaxpr  # a block: one head's 48 queries x 40 keys
    out = A.chunked_xla_attention(q, k, v, 4, block_bytes=64 * 160)
    ref = _reference(q, k, v, 4)
    assert np.abs(np.asarray(out) - ref).max() <= 1e-5 * np.abs(ref).max()
    # small score matrices are not split
    assert "while" not in str(jax.make_jaxpr(lambda *a: A.chunked_xla_attention(*a, heads=4))(q, k, v))


def test_bf16_inputs_keep_fp32_softmax():
    q, k, v = _qkv()
    out = A.xla_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), 4)
    assert out.dtype == jnp.bfloat16
    ref = _reference(q, k, v, 4)
    assert np.linalg.norm(np.asarray(out, np.float64) - ref) / np.linalg.norm(ref) < 2e-2


def test_unknown_implementation_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        A.multihead_attention(q, k, v, 4, "flash")


def test_auto_choice_per_backend():
    assert resolve_attention("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert resolve_attention("auto", jnp.float32, "gpu") is None     # cuDNN has no fp32 flash kernel
    assert resolve_attention("auto", jnp.float32, "cpu") == "chunked"
    assert resolve_attention("auto", jnp.bfloat16, "tpu") is None
    assert resolve_attention("library", jnp.float32, "cpu") == "library"  # explicit choices pass through
