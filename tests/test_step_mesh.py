"""The sharded train step traces with its mesh as the ambient mesh, so a kernel XLA cannot partition
(the Pallas TPU flash attention, a custom call) is shard_mapped over the devices, each attending its
own samples, instead of being run on the whole global batch on every device. Runs in a subprocess
with 4 fake CPU devices (the device count is fixed before jax starts); only traced, never run."""
from __future__ import annotations

import json

from conftest import run_with_fake_devices


def _worker() -> dict:
    import jax
    import jax.numpy as jnp

    from benchmarks.aot import batch_shapes
    from cdv2.config import load_model_config
    from cdv2.model import param_shapes
    from cdv2.train.config import load_train_config
    from cdv2.train.mesh import make_mesh, train_shardings
    from cdv2.train.stages import make_optimizer
    from cdv2.train.step import build_components, make_train_step, train_state_shapes

    n = len(jax.devices())
    model_cfg = load_model_config("tiny")
    cfg = load_train_config("stage1", {"model": "tiny", "batch_size": n, "compute_dtype": "bfloat16",
                                       "inpaint_p": 0.0, "mesh.fsdp": 2, "attention_impl": "pallas"})
    mesh = make_mesh(cfg.mesh)
    opt = make_optimizer(cfg.optim, cfg.stage)
    shapes = train_state_shapes(param_shapes(model_cfg), opt)
    sh = train_shardings(mesh, shapes, cfg.sharding_rules, cfg.min_shard_size)
    state = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes, sh.state)
    # 128 px: a 16x16 latent, 256 tokens at the top level (the kernel needs multiples of 128)
    batch = {k: jax.ShapeDtypeStruct(v, jnp.float32, sharding=sh.batch)
             for k, v in batch_shapes(cfg, model_cfg, n, 128, 16, "cached").items()}
    out = {}
    for name, shardings in (("sharded", sh), ("one_device", None)):
        step = make_train_step(cfg, build_components(cfg, model_cfg), opt, shardings)
        if shardings is None:
            st = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), state)
            bt = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        else:
            st, bt = state, batch
        text = str(jax.make_jaxpr(step)(st, bt))
        out[name] = {"pallas_calls": text.count("pallas_call"), "shard_maps": text.count("shard_map")}
    return out


def test_pallas_attention_is_shard_mapped_over_the_train_mesh():
    r = run_with_fake_devices(__file__, 4, timeout=600)
    assert r["sharded"]["pallas_calls"] > 0, r
    # every flash-attention call sits in a shard_map (forward and backward)
    assert r["sharded"]["shard_maps"] >= r["sharded"]["pallas_calls"], r
    assert r["one_device"]["pallas_calls"] > 0 and r["one_device"]["shard_maps"] == 0, r


if __name__ == "__main__":
    print(json.dumps(_worker()))
