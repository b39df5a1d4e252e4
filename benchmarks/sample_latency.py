"""Whole-image latency through `Pipeline`: prepare (CLIP, VAE encode, sketch/bg/style encoders) +
denoise (N sampler steps, one jit) + decode (VAE), per mode.

    python -m benchmarks.sample_latency                                  # GPU/TPU: v2, 768 px, 20 steps
    python -m benchmarks.sample_latency --config tiny --size 128 --steps 20   # CPU
    python -m benchmarks.sample_latency --config tiny --size 128 --modes vanilla --samplers all   # every sampler

`--samplers` takes the app's names (`APP_SAMPLERS`, or `all`) and `--schedule` the app's noise
schedules; each (mode, sampler) pair is one row with its U-Net calls (Heun/DPM2/2S a/SDE evaluate the
model twice per step, PNDM once more at the start) and its own denoise compile time (every sampler is
its own jitted loop; changing seed, scales or schedule parameters does not recompile).

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
from cdv2.diffusion.samplers import APP_SAMPLERS, APP_SCHEDULES, make_sampler
from cdv2.sample.pipeline import MODES, Guidance, Pipeline


def synthetic_inputs(size: int, key) -> Inputs:
    k1, k2, k3, k4 = jax.random.split(key, 4)
    sketch = jnp.where(jax.random.uniform(k1, (1, size, size, 1)) < 0.05, 1.0, -1.0) * jnp.ones((1, 1, 1, 3))
    reference = jax.random.uniform(k2, (1, size, size, 3), minval=-1, maxval=1)
    rmask = (jax.random.uniform(k3, (1, size, size, 1)) > 0.5).astype(jnp.float32)
    smask = jax.random.uniform(k4, (1, size // 8, size // 8, 1))
    return Inputs(sketch=sketch, reference=reference, reference_ratios=jnp.ones((1, 2)), reference_mask=rmask,
                  sketch_mask=smask)


def bench_mode(pipe, params, inputs, mode, steps, images, rg, sg, repeats, sampler_name="dpmpp_2m",
               schedule="Automatic"):
    branches = branches_for(rg, sg)
    guide = Guidance(reference_guidance=rg, sketch_guidance=sg)
    size = inputs.sketch.shape[1]
    noise = jax.random.normal(jax.random.PRNGKey(3), (images, size // 8, size // 8, 4))
    sampler = (sampler_name, steps, schedule)
    calls = make_sampler(sampler_name, steps, schedule).num_calls

    def stages():
        t0 = time.perf_counter()
        conds, _ = pipe.prepare(params, inputs, Strengths(), mode=mode, branches=branches, num_images=images)
        jax.block_until_ready(conds)
        t1 = time.perf_counter()
        latent = jax.block_until_ready(pipe.denoise(params["unet"], conds, noise, guide, sampler=sampler,
                                                    branches=branches, key=jax.random.PRNGKey(4)))
        t2 = time.perf_counter()
        jax.block_until_ready(pipe.decode(params["vae"], latent))
        t3 = time.perf_counter()
        return {"prepare": t1 - t0, "denoise": t2 - t1, "decode": t3 - t2, "total": t3 - t0}

    first = stages()
    traces = dict(pipe.trace_counts)
    warm = [stages() for _ in range(repeats)]
    assert pipe.trace_counts == traces, "a warm run recompiled"
    out = {"mode": mode, "sampler": sampler_name, "schedule": schedule, "steps": steps, "unet_calls": calls,
           "images": images, "branches": list(branches), "first_call_s": first}
    for k in first:
        s = common.summarize([w[k] for w in warm])
        out[k] = s
        out[f"{k}_compile_s"] = max(first[k] - s["median_s"], 0.0)
    out["ms_per_step"] = 1e3 * out["denoise"]["median_s"] / steps
    out["ms_per_unet_call"] = 1e3 * out["denoise"]["median_s"] / calls
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
    ap.add_argument("--samplers", nargs="+", default=["dpmpp_2m"], metavar="NAME",
                    help=f"sampler names (the app's labels or 'all'): {', '.join(APP_SAMPLERS)}")
    ap.add_argument("--schedule", default="Automatic", choices=list(APP_SCHEDULES), help="noise schedule")
    common.add_common_args(ap, repeats=3)
    args = ap.parse_args(argv)
    samplers = list(APP_SAMPLERS) if args.samplers == ["all"] else args.samplers
    for name in list(samplers):
        try:  # unknown names fail here, before any compile
            make_sampler(name, args.steps, args.schedule)
        except NotImplementedError as e:
            if args.samplers != ["all"]:
                raise
            print(f"skipped {name}: {e}")
            samplers.remove(name)

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
        for name in samplers:
            r = bench_mode(pipe, params, inputs, mode, args.steps, args.images, args.reference_guidance,
                           args.sketch_guidance, args.repeats, name, args.schedule)
            rows.append(r)
            print(f"{mode:10s} {name:16s} {args.size}px {args.steps} steps ({r['unet_calls']} U-Net calls) "
                  f"x{args.images}: total {r['total']['median_s']:.3f} s (min {r['total']['min_s']:.3f}, max "
                  f"{r['total']['max_s']:.3f}) = prepare {r['prepare']['median_s']:.3f} + denoise "
                  f"{r['denoise']['median_s']:.3f} ({r['ms_per_unet_call']:.1f} ms/call) + decode "
                  f"{r['decode']['median_s']:.3f}; denoise compile ~{r['denoise_compile_s']:.1f} s", flush=True)
    mem = common.finish("sample_latency", args, info, rows, config=args.config, overrides=args.set, size=args.size,
                        dtype=common.dtype_name(dtype), attention=impl or "xla")
    if args.append_md:
        cols = ["mode", "sampler", "px", "steps", "U-Net calls", "images", "branches", "total s (median)",
                "min–max s", "prepare s", "denoise s", "ms/U-Net call", "decode s", "denoise compile s",
                "compile s (first − warm)"]
        table = [[r["mode"], r["sampler"], args.size, r["steps"], r["unet_calls"], r["images"], len(r["branches"]),
                  r["total"]["median_s"], f"{r['total']['min_s']:.3g}–{r['total']['max_s']:.3g}",
                  r["prepare"]["median_s"], r["denoise"]["median_s"], r["ms_per_unet_call"], r["decode"]["median_s"],
                  r["denoise_compile_s"], r["total_compile_s"]] for r in rows]
        notes = (f"config {args.config} {' '.join(args.set)}, {common.dtype_name(dtype)}, attention {impl or 'xla'}, "
                 f"schedule {args.schedule}, guidance {args.reference_guidance}/{args.sketch_guidance}, median of {args.repeats} "
                 f"warm runs; peak memory ({mem['kind']}) {mem['bytes'] / 2**30:.2f} GiB. {args.note}").strip()
        common.append_markdown(f"Sample latency: {args.config}", cols, table, notes, info)


if __name__ == "__main__":
    main()
