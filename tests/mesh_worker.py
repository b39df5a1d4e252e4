"""Subprocess for tests/test_mesh.py (needs 8 fake CPU devices, which must be set before jax is
imported): one stage-1 train step from the same state and batch on one device, on a data x fsdp
mesh of 8 x 1 and of 2 x 4; prints one JSON line with the differences and sharding facts.

Also the home of `make_batch`, the small synthetic training batch the train-step tests share.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

# tiny-test XLA options: ~2x faster CPU compiles, same numerics class (tests only)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
BIG_LEAF = "unet/output_blocks_0_0/in_layers_2/kernel"   # (3, 3, 256, 128) in the tiny U-Net
# the tiny model with cross-attention only at the lowest resolution (7 of 16 transformer blocks):
# same sharding questions, ~1.5x faster compiles (three compiles here, two of them SPMD)
MESH_MODEL_OVERRIDES = {"unet.attention_resolutions": [4]}


def random_params(model_cfg, seed: int = 0) -> dict:
    """Non-zero random fp32 params of every group (numpy; init_params is slow on CPU and zero-inits
    the zero convs / LoRA ups, which would hide paths)."""
    import jax

    from cdv2.model import param_shapes

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32), param_shapes(model_cfg))


def _blob_mask(rng: np.random.Generator, b: int, s: int) -> np.ndarray:
    """(B, s, s, 1) soft ellipses in [0, 1]: character-like masks with fg and bg regions; odd samples
    have their character off-centre, so even the coarsest (1x1) mask level has bg samples."""
    yy, xx = np.mgrid[0:s, 0:s] / s
    out = []
    for i in range(b):
        lo, hi = (0.35, 0.65) if i % 2 == 0 else (0.15, 0.25)
        cy, cx, ry, rx = rng.uniform(lo, hi, 2).tolist() + rng.uniform(0.12, 0.3, 2).tolist()
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        out.append(np.clip(1.5 - d, 0.0, 1.0))
    return np.stack(out)[..., None].astype(np.float32)


def make_batch(b: int, s: int = 64, seed: int = 0, latent_channels: int = 4, clip_tokens: int = 256,
               clip_dim: int = 64, cached: bool = False) -> dict:
    """Pipeline-like batch (image/sketch/reference in [-1, 1], masks in [0, 1], original sizes);
    `cached=True` gives the cached-input form (sketch + `latent` + `clip_tokens`) instead."""
    rng = np.random.default_rng(seed)
    smooth = lambda c: np.tanh(rng.normal(size=(b, s // 8, s // 8, c))).repeat(8, 1).repeat(8, 2)
    sketch = np.where(rng.uniform(size=(b, s, s, 1)) < 0.1, 1.0, -1.0).repeat(3, -1)
    if cached:
        return {"sketch": sketch.astype(np.float32),
                # low-frequency latents (2x2 blocks of 4x4): structure a small model can fit fast
                "latent": rng.normal(size=(b, 2, 2, latent_channels)).repeat(s // 16, 1).repeat(s // 16, 2)
                .astype(np.float32),
                "clip_tokens": rng.normal(size=(b, clip_tokens, clip_dim)).astype(np.float32)}
    image = smooth(3)
    return {"image": image.astype(np.float32), "sketch": sketch.astype(np.float32),
            "reference": np.clip(image + 0.1 * rng.normal(size=image.shape), -1, 1).astype(np.float32),
            "smask": _blob_mask(rng, b, s), "rmask": _blob_mask(rng, b, s),
            "size": rng.integers(40, 200, (b, 2)).astype(np.float32)}


def _run() -> dict:
    import jax

    from cdv2.config import load_model_config
    from cdv2.train.config import MeshConfig, ShardingRule, load_train_config
    from cdv2.train.mesh import make_mesh, shard_batch, train_shardings
    from cdv2.train.stages import make_optimizer
    from cdv2.train.step import build_components, create_train_state, make_train_step, train_state_shapes

    assert jax.device_count() == 8, jax.devices()
    mcfg = load_model_config("tiny", MESH_MODEL_OVERRIDES)
    params = random_params(mcfg)
    # eps = 1 keeps Adam's first update ~linear in the gradient (lr * g / (|g| + 1)), so parameter
    # differences reflect gradient differences instead of sign flips of near-zero gradients
    cfg = load_train_config("stage1", {"model": "tiny", "batch_size": 8, "compute_dtype": "float32",
                                       "inpaint_p": 0.0, "optim.lr": 0.1, "optim.eps": 1.0,
                                       "min_shard_size": 4096})
    batch = make_batch(8, cached=True)
    comps = build_components(cfg, mcfg)
    opt = make_optimizer(cfg.optim, cfg.stage)

    results, out = {}, {}
    for name, mesh_cfg in (("single", None), ("8x1", MeshConfig(8, 1)), ("2x4", MeshConfig(2, 4))):
        t0 = time.time()
        if mesh_cfg is None:
            step = make_train_step(cfg, comps, opt, compiler_options=FAST_COMPILE)
            state = create_train_state(params, opt, cfg.seed)
            b = batch
        else:
            mesh = make_mesh(mesh_cfg)
            sh = train_shardings(mesh, train_state_shapes(params, opt), (ShardingRule(".*", "auto"),),
                                 cfg.min_shard_size)
            step = make_train_step(cfg, comps, opt, sh, compiler_options=FAST_COMPILE)
            state = create_train_state(params, opt, cfg.seed, sh)
            b = shard_batch(batch, sh.batch)
            leaf = state.params
            for key in BIG_LEAF.split("/"):
                leaf = leaf[key]
            out[f"{name}/big_leaf_spec"] = str(leaf.sharding.spec)
            out[f"{name}/big_leaf_shard_shape"] = list(leaf.addressable_shards[0].data.shape)
        state, metrics = step(state, b)
        jax.block_until_ready(metrics)
        if mesh_cfg is not None:
            leaf = state.params
            for key in BIG_LEAF.split("/"):
                leaf = leaf[key]
            out[f"{name}/big_leaf_spec_after"] = str(leaf.sharding.spec)
            n_sharded = sum("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state.params))
            out[f"{name}/sharded_param_leaves"] = n_sharded
            mu = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) > 0]
            out[f"{name}/sharded_opt_leaves"] = sum("fsdp" in str(x.sharding.spec) for x in mu)
        out[f"{name}/seconds"] = round(time.time() - t0, 1)
        results[name] = (jax.tree.map(lambda x: np.array(x), state.params),
                         {k: float(v) for k, v in metrics.items()})

    ref_params, ref_metrics = results["single"]
    ref_flat = jax.tree.leaves(ref_params)
    init_flat = jax.tree.leaves(params)
    out["param_leaves"] = len(ref_flat)
    out["single/loss"] = ref_metrics["loss"]
    out["single/grad_norm"] = ref_metrics["grad_norm"]
    out["max_param_update"] = max(float(np.max(np.abs(a - np.asarray(p)), initial=0)) for a, p in zip(ref_flat, init_flat))
    for name in ("8x1", "2x4"):
        p, m = results[name]
        out[f"{name}/max_param_diff"] = max(float(np.max(np.abs(a - r), initial=0))
                                            for a, r in zip(jax.tree.leaves(p), ref_flat))
        out[f"{name}/loss_diff"] = abs(m["loss"] - ref_metrics["loss"])
        out[f"{name}/grad_norm_rel_diff"] = abs(m["grad_norm"] - ref_metrics["grad_norm"]) / ref_metrics["grad_norm"]
    return out


if __name__ == "__main__":
    if "jax" in sys.modules:
        raise RuntimeError("mesh_worker must set XLA_FLAGS before jax is imported")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    print(json.dumps(_run()))
