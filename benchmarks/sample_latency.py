"""Whole-image latency through `Pipeline`: prepare (CLIP, VAE encode, sketch/bg/style encoders) +
denoise (N sampler steps, one jit) + decode (VAE), per mode.

    python -m benchmarks.sample_latency                                  # GPU/TPU: v2, 768 px, 20 steps
    python -m benchmarks.sample_latency --config tiny --size 128 --steps 20   # CPU

The first call of each stage includes its compilation; "compile" below is that first call minus
the warm median (the pipeline's jitted functions compile on first use). Warm numbers are medians of
`--repeats` runs, each stage blocked on. Random params (benchmarks.common.random_params), synthetic
inputs: a random sketch and reference at the generation size, a sketch mask and a reference mask.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.unet_step import parse_overrides
from cdv2.config import load_model_config
from cdv2.model import param_shapes
from cdv2.sample.conditions import Inputs, Strengths
from cdv2.diffusion.guidance import branches_for
from cdv2.sample.pipeline import MODES, Guidance, Pipeline


def synthetic_inputs(size: int, key) -> Inputs:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    sketch = jnp.where(jax.random.uniform(k1, (1, size, size, 1)) < 0.05, 1.0, -1.0) * jnp.ones((1, 1, 1, 3))
    reference = jax.random.uniform(k2, (1, size, size, 3), minval=-1, maxval=1)
    rmask = (jax.random.uniform(k3, (1, size, size, 1)) > 0.5).astype(jnp.float32)
    smask = jax.random.uniform(k4, (1, size // 8, size // 8, 1))
    return Inputs(sketch=sketch, reference=reference, reference_ratios=jnp.ones((1, 2)), reference_mask=rmask,
                  sketch_mask=smask)


def bench_mode(pipe, params, inputs, mode, steps, images, rg, sg, repeats):
    branches = branches_for(rg, sg)
    guide = Guidance(reference_guidance=rg, sketch_guidance=sg)
    size = inputs.sketch.shape[1]
    noise = jax.random.normal(jax.random.PRNGKey(3), (images, size // 8, size // 8, 4))
    sampler = ("dpmpp_2m", steps, False)

    def stages():
        t0 = time.perf_counter()
        conds, _ = pipe.prepare(params, inputs, Strengths(), mode=mode, branches=branches, num_images=images)
        jax.block_until_ready(conds)
        t1 = time.perf_counter()
        latent = jax.block_until_ready(pipe.denoise(params["unet"], conds, noise, guide, sampler=sampler,
                                                    branches=branches))
        t2 = time.perf_counter()
        jax.block_until_ready(pipe.decode(params["vae"], latent))
        t3 = time.perf_counter()
        return {"prepare": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2, "total": t3 - t0}

    first = stages()
    traces = dict(pipe.trace_counts)
    warm = [stages() for _ in range(repeats)]
    assert pipe.trace_counts == traces, "a warm run recompiled"
    out = {"mode": mode, "steps": steps, "images": images, "branches": list(branches), "first_call_s": first}
    for k in first:
        s = common.summarize([w[k] for w in warm])
        out[k] = s
        out[f"{k}_compile_s"] = max(first[k] - s["median_s"], 0.0)
    out["ms_per_step"] = 1e3 * out["denoise"]["median_s"] / steps
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="v2")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--size", type=int, default=768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=1, help="num_images per generation")
    ap.add_argument("--modes", nargs="+", default=["vanilla", "full"], choices=list(MODES))
    ap.add_argument("--reference-guidance", type=float, default=5.0)
    ap.add_argument("--sketch-guidance", type=float, default=1.0)
    common.add_common_args(ap, repeats=3)
    args = ap.parse_args(argv)

    model_cfg = load_model_config(args.config, parse_overrides(args.set))
    dtype, impl = common.resolve_dtype_attention(args)
    info = common.device_info()
    print(common.device_line(info), f"| dtype {common.dtype_name(dtype)}, attention {impl or 'xla'}")
    shapes = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), param_shapes(model_cfg))
    params = common.random_params(shapes, jax.random.PRNGKey(1))
    pipe = Pipeline(model_cfg, dtype=dtype, attention_impl=impl)
    inputs = synthetic_inputs(args.size, jax.random.PRNGKey(2))
    rows = []
    for mode in args.modes:
        r = bench_mode(pipe, params, inputs, mode, args.steps, args.images, args.reference_guidance,
                       args.sketch_guidance, args.repeats)
        rows.append(r)
        print(f"{mode:10s} {args.size}px {args.steps} steps x{args.images}: total {r['total']['median_s']:.3f} s "
              f"(min {r['total']['min_s']:.3f}, max {r['total']['max_s']:.3f}) = prepare "
              f"{r['prepare']['median_s']:.3f} + denoise {r['denoise']['median_s']:.3f} ({r['ms_per_step']:.1f} ms/step)"
              f" + decode {r['decode']['median_s']:.3f}; compile ~{r['total_compile_s']:.1f} s", flush=True)
    mem = common.finish("sample_latency", args, info, rows, config=args.config, overrides=args.set, size=args.size,
                        dtype=common.dtype_name(dtype), attention=impl or "xla")
    if args.append_md:
        cols = ["mode", "px", "steps", "images", "branches", "total s (median)", "min–max s", "prepare s",
                "denoise s", "ms/step", "decode s", "compile s (first − warm)"]
        table = [[r["mode"], args.size, r["steps"], r["images"], len(r["branches"]), r["total"]["median_s"],
                  f"{r['total']['min_s']:.3g}–{r['total']['max_s']:.3g}", r["prepare"]["median_s"],
                  r["denoise"]["median_s"], r["ms_per_step"], r["decode"]["median_s"], r["total_compile_s"]]
                 for r in rows]
        notes = (f"config {args.config} {' '.join(args.set)}, {common.dtype_name(dtype)}, attention {impl or 'xla'}, "
                 f"dpmpp_2m, guidance {args.reference_guidance}/{args.sketch_guidance}, median of {args.repeats} "
                 f"warm runs; peak memory ({mem['kind']}) {mem['bytes'] / 2**30:.2f} GiB. {args.note}").strip()
        common.append_markdown(f"Sample latency: {args.config}", cols, table, notes, info)


if __name__ == "__main__":
    main()
