"""Deviceless AOT (benchmarks/aot.py): the shipped train step compiles for a real TPU topology on a
CPU-only machine, and its per-device argument memory is the sharded state + batch; the Pallas TPU
flash-attention implementation equals the XLA one (run in Pallas' TPU interpreter on CPU).

The TPU compile needs libtpu, which the main environment does not carry (with libtpu installed, every
`import jax` would look for a TPU); it runs in a venv layered on the main one, as `.ci/run` does
(install ~4 s from a warm pip cache, the slow test ~75 s on 2 cores):

    python -m venv --system-site-packages /tmp/vtpu && /tmp/vtpu/bin/pip install "jax[tpu]==0.10.2"
    CDV2_REQUIRE_TPU_COMPILER=1 /tmp/vtpu/bin/python -m pytest -q tests/test_aot.py -m slow

Without libtpu the compile test skips naming that command; under CDV2_REQUIRE_TPU_COMPILER=1 (CI)
it fails instead.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.modules import attention as A

INSTALL = 'pip install "jax[tpu]==%s" in a venv layered on this one (see tests/test_aot.py)' % jax.__version__


def _tpu_devices(monkeypatch, name="v5p:2x2x1"):
    from jax.experimental import topologies

    # the host backend stays CPU; libtpu may already be loaded by another compiling process
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - no libtpu in this environment
        msg = f"no TPU compiler (libtpu) here ({type(e).__name__}: {str(e)[:120]}): {INSTALL}"
        if os.environ.get("CDV2_REQUIRE_TPU_COMPILER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def _qkv(b, n, m, c, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (2 * jax.random.normal(ks[0], (b, n, c)), jax.random.normal(ks[1], (b, m, c)),
            jax.random.normal(ks[2], (b, m, c)))


def test_pallas_flash_attention_equals_xla_forward_and_backward():
    from jax.experimental.pallas import tpu as pltpu

    q, k, v = _qkv(1, 128, 256, 128)    # 2 heads of 64 (the U-Net's head width)
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(A.multihead_attention(q, k, v, 2, impl)))  # noqa: E731
    with pltpu.force_tpu_interpret_mode():
        out = A.multihead_attention(q, k, v, 2, "pallas")
        grads = jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v)
    ref = A.xla_attention(q, k, v, 2)
    ref_grads = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    assert float(jnp.abs(out - ref).max()) <= 1e-5 * float(jnp.abs(ref).max())
    for g, r in zip(grads, ref_grads):
        assert float(jnp.abs(g - r).max()) <= 1e-4 * float(jnp.abs(r).max())


def test_pallas_attention_falls_back_for_lengths_off_the_128_tile():
    q, k, v = _qkv(1, 144, 64, 64)      # the 12x12 level: not a multiple of 128 -> xla_attention
    jaxpr = str(jax.make_jaxpr(lambda *a: A.multihead_attention(*a, 2, "pallas"))(q, k, v))
    assert "pallas_call" not in jaxpr
    np.testing.assert_allclose(A.multihead_attention(q, k, v, 2, "pallas"), A.xla_attention(q, k, v, 2),
                               rtol=0, atol=0)


def _shard_bytes(s) -> int:
    return math.prod(s.sharding.shard_shape(s.shape)) * jnp.dtype(s.dtype).itemsize


@pytest.mark.slow
def test_tiny_train_step_compiles_for_a_tpu_topology_without_devices(monkeypatch):
    devices = _tpu_devices(monkeypatch)
    from benchmarks.aot import compile_train_step, flops_of, memory_row
    from cdv2.config import load_model_config
    from cdv2.train.config import load_train_config

    # the tiny model with cross-attention at one level only: the same program structure, faster compile
    model_cfg = load_model_config("tiny", {"unet.attention_resolutions": [4]})
    n = len(devices)
    cfg = load_train_config("stage1", {"model": "tiny", "batch_size": n, "compute_dtype": "bfloat16",
                                       "remat": "full", "inpaint_p": 0.0, "mesh.fsdp": n, "attention_impl": "xla"})
    compiled, secs = compile_train_step(cfg, model_cfg, devices=devices, size=64, per_device_batch=1, tokens=16)
    assert devices[0].platform == "tpu" and secs > 0
    mem = memory_row(compiled)
    # the per-device argument buffers are exactly the shards of the state and batch we passed
    from cdv2.model import param_shapes
    from cdv2.train.mesh import make_mesh, train_shardings
    from cdv2.train.stages import make_optimizer
    from cdv2.train.step import train_state_shapes

    opt = make_optimizer(cfg.optim, cfg.stage)
    shapes = train_state_shapes(param_shapes(model_cfg), opt)
    sh = train_shardings(make_mesh(cfg.mesh, devices), shapes, cfg.sharding_rules, cfg.min_shard_size)
    state = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes, sh.state)
    expected = sum(_shard_bytes(s) for s in jax.tree.leaves(state))
    expected += sum(4 * math.prod(shape) for shape in [(1, 64, 64, 3), (1, 8, 8, 4), (1, 16, 64)])
    # TPU layouts tile the two minor dims to (8, 128): narrow tiny-model leaves are padded, never shrunk
    assert expected <= mem["argument"] <= 4 * expected, (mem["argument"], expected)
    assert mem["alias"] >= 0.99 * (expected - 4 * (64 * 64 * 3 + 8 * 8 * 4 + 16 * 64))  # the donated state
    assert mem["temp"] > 0
    assert (flops_of(compiled) or 0) > 0


def test_aot_image_batch_is_what_the_data_pipeline_collates():
    """benchmarks/aot.py compiles stages 2/3 on collated images (a cached latent cannot carry their
    background bleaching): its abstract batch must be the real collate output, key for key."""
    from benchmarks.aot import batch_shapes
    from cdv2.config import load_model_config
    from cdv2.train.collate import CollateConfig, collate_batch
    from cdv2.train.config import load_train_config

    size, b = 128, 2
    cc = CollateConfig.for_resolution(size)
    cc = CollateConfig(buckets=((size, size),), max_load=cc.max_load, reference_size=cc.reference_size,
                       center_crop_max=cc.center_crop_max, center_crop_max2=cc.center_crop_max2,
                       mask_expansion_size=cc.mask_expansion_size)
    rng = np.random.default_rng(0)
    samples = [{"color": rng.integers(0, 256, (160, 150, 3), np.uint8), "sketch": rng.integers(0, 256, (160, 150, 3), np.uint8),
                "mask": rng.integers(0, 256, (160, 150), np.uint8)} for _ in range(b)]
    real = collate_batch(samples, np.random.default_rng(1), [np.random.default_rng(i) for i in range(b)], cc)
    model_cfg = load_model_config("tiny")
    for stage, want in ((1, "cached"), (2, "images"), (3, "images")):
        shapes = batch_shapes(load_train_config(f"stage{stage}", {"model": "tiny"}), model_cfg, b, size)
        assert ("latent" in shapes) == (want == "cached")
    shapes = batch_shapes(load_train_config("stage2", {"model": "tiny"}), model_cfg, b, size)
    assert shapes == {k: v.shape for k, v in real.items()}
    with pytest.raises(ValueError, match="inputs must be"):
        batch_shapes(load_train_config("stage2", {"model": "tiny"}), model_cfg, b, size, inputs="nope")
