"""One training step per stage: images/s, model FLOPs and MFU, compile time, peak memory.

    python -m benchmarks.train_step                                  # GPU/TPU: v2, 768 px, stages 1 2 3
    python -m benchmarks.train_step --config tiny --size 128 --batch 4  # CPU

The step is `cdv2.train.step.make_train_step` itself (the objective, the stage's trainable set,
AdamW, fp32 master weights, the configured compute dtype and remat) on ONE device, so images/s is
per device. Inputs are random arrays shaped like the data pipeline's batches; `--cached` feeds
stage 1 cached latents and CLIP tokens (no VAE / CLIP forward in the step, as a cluster run with
precomputed latents does). Stage 3 is timed with its background path on (`bg_path_p=1`: the
costlier of its two per-step branches).

Model FLOPs = 3 x the analytic U-Net forward of the stage's mode (forward + backward); the sketch,
background and style encoders, the VAE and CLIP are not counted, so MFU is a lower bound. XLA's own
count of the whole compiled step is reported beside it where the backend gives one.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.flops import VANILLA, Mode, unet_flops
from benchmarks.unet_step import parse_overrides
from cdv2.config import load_model_config
from cdv2.model import param_shapes
from cdv2.train.config import load_train_config
from cdv2.train.stages import make_optimizer
from cdv2.train.step import build_components, create_train_state, make_train_step

STAGE_MODES = {1: VANILLA, 2: Mode(split=True, warp=True, lora=True),
               3: Mode(split=True, warp=True, style=True, lora=True)}


def random_batch(model_cfg, b: int, size: int, cached: bool, seed: int = 0) -> dict:
    """A data-pipeline-shaped batch: images in [-1, 1], binary masks, original sizes; with `cached`,
    the scaled latent and CLIP tokens instead of image and reference."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, np.float32)
    mask = lambda: f32(rng.uniform(size=(b, size, size, 1)) < 0.5)
    out = {"sketch": f32(np.where(rng.uniform(size=(b, size, size, 3)) < 0.1, 1.0, -1.0)),
           "smask": mask(), "rmask": mask(), "size": f32(rng.integers(size // 2, 2 * size, (b, 2)))}
    if cached:
        lat = model_cfg.unet.in_channels
        clip = model_cfg.clip
        out["latent"] = f32(rng.normal(size=(b, size // 8, size // 8, lat)))
        out["clip_tokens"] = f32(rng.normal(size=(b, (clip.image_size // clip.patch_size) ** 2, clip.output_dim)))
    else:
        out["image"] = f32(rng.uniform(-1, 1, (b, size, size, 3)))
        out["reference"] = f32(rng.uniform(-1, 1, (b, size, size, 3)))
    return out


def bench_stage(stage, model_cfg, params, args, dtype_name):
    overrides = {"model": args.config, "batch_size": args.batch, "compute_dtype": dtype_name,
                 "remat": args.remat}
    cached = args.cached and stage == 1
    if stage == 3:
        overrides["bg_path_p"] = 1.0
    tcfg = load_train_config(f"stage{stage}", overrides)
    comps = build_components(tcfg, model_cfg)
    opt = make_optimizer(tcfg.optim, stage)
    state = create_train_state(params, opt, tcfg.seed)
    batch = {k: jnp.asarray(v) for k, v in random_batch(model_cfg, args.batch, args.size, cached).items()}
    step = make_train_step(tcfg, comps, opt)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0)) if cost else 0.0
    for _ in range(args.warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(args.repeats):
        s = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready((state.params, m["loss"]))
        times.append(time.perf_counter() - s)
    r = common.summarize(times)
    lat = (args.size // 8, args.size // 8)
    tokens = (model_cfg.clip.image_size // model_cfg.clip.patch_size) ** 2
    mode = STAGE_MODES[stage]
    flops = 3 * unet_flops(model_cfg.unet, lat, args.batch, tokens * (2 if mode.split else 1), mode)["total"]
    med = r["median_s"]
    peak = common.peak_flops(jnp.dtype(dtype_name), args.peak_tflops)
    del state
    return {"stage": stage, "size": args.size, "batch": args.batch, "cached": cached, "remat": args.remat,
            "compile_s": compile_s, "ms_step": 1e3 * med, "ms_min": 1e3 * r["min_s"], "ms_max": 1e3 * r["max_s"],
            "images_per_s": args.batch / med, "model_tflop_step": flops / 1e12, "xla_tflop_step": xla_flops / 1e12,
            "tflops": flops / med / 1e12, "mfu": common.mfu(flops, med, peak), "loss": float(m["loss"]),
            "times_s": r["times_s"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="v2")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="model config overrides")
    ap.add_argument("--size", type=int, default=768, help="training crop in pixels (latent = size / 8)")
    ap.add_argument("--batch", type=int, default=1, help="images per step (one device)")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=(1, 2, 3))
    ap.add_argument("--cached", action="store_true", help="stage 1 with cached latents + CLIP tokens")
    ap.add_argument("--remat", default="none", help="remat policy (cdv2.train.objective._remat)")
    common.add_common_args(ap, repeats=3)
    args = ap.parse_args(argv)
    if args.size % 64:
        ap.error(f"--size must be a multiple of 64, got {args.size}")

    model_cfg = load_model_config(args.config, parse_overrides(args.set))
    dtype, _ = common.resolve_dtype_attention(args)
    dtype_name = common.dtype_name(dtype)
    info = common.device_info()
    print(common.device_line(info), f"| compute {dtype_name}, fp32 master weights")
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), param_shapes(model_cfg))
    params = common.random_params(shapes, jax.random.PRNGKey(0))
    rows = []
    for stage in args.stages:
        row = bench_stage(stage, model_cfg, params, args, dtype_name)
        rows.append(row)
        print(f"stage {stage} {args.size}px x{args.batch}{' cached' if row['cached'] else ''}: "
              f"{row['ms_step']:.0f} ms/step (min {row['ms_min']:.0f}, max {row['ms_max']:.0f}), "
              f"{row['images_per_s']:.2f} images/s, model {row['model_tflop_step']:.4f} TFLOP/step, "
              f"MFU {common.percent(row['mfu'])}, compile {row['compile_s']:.1f} s", flush=True)
    mem = common.finish("train_step", args, info, rows, config=args.config, overrides=args.set, dtype=dtype_name)
    if args.append_md:
        cols = ["stage", "px", "batch", "cached", "ms/step (median)", "min–max ms", "images/s",
                "model TFLOP/step", "XLA TFLOP/step", "MFU", "compile s"]
        table = [[r["stage"], r["size"], r["batch"], "yes" if r["cached"] else "no", r["ms_step"],
                  f"{r['ms_min']:.0f}–{r['ms_max']:.0f}", r["images_per_s"], r["model_tflop_step"],
                  r["xla_tflop_step"] or None, common.percent(r["mfu"]),
                  r["compile_s"]] for r in rows]
        notes = (f"config {args.config} {' '.join(args.set)}, compute {dtype_name}, fp32 master weights + AdamW, "
                 f"remat {args.remat}, one device, median of {args.repeats}; model FLOPs = 3 x analytic U-Net "
                 f"forward (encoders/VAE/CLIP not counted); peak memory ({mem['kind']}) "
                 f"{mem['bytes'] / 2**30:.2f} GiB. {args.note}").strip()
        common.append_markdown(f"Training step: {args.config}", cols, table, notes, info)


if __name__ == "__main__":
    main()
