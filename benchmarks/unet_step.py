"""One guided U-Net step: the U-Net on the stacked guidance branches plus the CFG combine.

    python -m benchmarks.unet_step                                   # GPU/TPU: v2, 768 px, batch 1 2 3 4 8
    python -m benchmarks.unet_step --config tiny --size 128 --batch 1 2   # CPU

`--batch` counts images; the U-Net batch is images x branches (default 2 branches: cond and
no-reference, i.e. reference guidance > 1 and sketch guidance 1, the UI default). Modes:
  vanilla  plain cross-attention on 256 tokens, sketch hints
  full     split cross-attention over 512 tokens (fg | bg) with the fg/bg LoRAs, warp modules on
           the bg-encoder tokens, style modulation, sketch hints
Random params from `cdv2.model.init_params`, cast to the compute dtype on the device (use
`--config tiny` or `--set unet.model_channels=64` on CPU). FLOPs are the analytic count
(benchmarks/flops.py); TFLOP/s and MFU use the median step time.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.flops import FULL, VANILLA, unet_flops
from cdv2.config import load_model_config
from cdv2.modules.unet import UNet
from cdv2.diffusion import guidance

MODES = {"vanilla": (VANILLA, 1), "full": (FULL, 2)}  # mode -> (U-Net parts, context tokens x)


def parse_overrides(items):
    out = {}
    for item in items or []:
        key, value = item.split("=", 1)
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def bench_one(model_cfg, params, mode_name, size, images, branches, tokens, dtype, impl, args):
    mode, ctx_mult = MODES[mode_name]
    lat = (size // 8, size // 8)
    batch = images * len(branches)
    unet = UNet(model_cfg.unet, impl, dtype)
    call_args, static = common.unet_args(model_cfg.unet, lat, batch, tokens * ctx_mult, mode, hints=True)

    def step(p, x, t, context, extras):
        out = common.call_unet(unet, p, x, t, context, extras, **static)
        return guidance.combine(out, branches, 5.0, 2.0)

    r = common.time_jitted(step, params, *call_args, repeats=args.repeats, warmup=args.warmup)
    flops = unet_flops(model_cfg.unet, lat, batch, tokens * ctx_mult, mode)["total"]
    peak = common.peak_flops(dtype, args.peak_tflops)
    med = r["median_s"]
    row = {"mode": mode_name, "size": size, "latent": lat[0], "images": images, "unet_batch": batch,
           "compile_s": r["compile_s"], "ms_step": 1e3 * med, "ms_min": 1e3 * r["min_s"], "ms_max": 1e3 * r["max_s"],
           "image_steps_per_s": images / med, "images_per_s_20_steps": images / (20 * med),
           "tflop_step": flops / 1e12, "tflops": flops / med / 1e12, "mfu": common.mfu(flops, med, peak),
           "times_s": r["times_s"]}
    del call_args
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="v2")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (unet.model_channels=64)")
    ap.add_argument("--size", type=int, default=768, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 3, 4, 8], help="images per step")
    ap.add_argument("--modes", nargs="+", default=["vanilla", "full"], choices=list(MODES))
    ap.add_argument("--branches", type=int, default=2, choices=(1, 2, 3), help="guidance branches per image")
    ap.add_argument("--tokens", type=int, default=256, help="reference tokens (full mode: 2x)")
    common.add_common_args(ap)
    args = ap.parse_args(argv)

    model_cfg = load_model_config(args.config, parse_overrides(args.set))
    dtype, impl = common.resolve_dtype_attention(args)
    branches = (guidance.COND, guidance.UNCOND_REF, guidance.UNCOND_SKETCH)[: args.branches]
    info = common.device_info()
    print(common.device_line(info), f"| dtype {common.dtype_name(dtype)}, attention {impl or 'xla'}")
    params = common.unet_params(model_cfg, dtype)
    rows = []
    for mode_name in args.modes:
        for images in args.batch:
            row = bench_one(model_cfg, params, mode_name, args.size, images, branches, args.tokens, dtype, impl, args)
            rows.append(row)
            print(f"{mode_name:8s} {args.size}px x{images} (U-Net batch {row['unet_batch']}): "
                  f"{row['ms_step']:.1f} ms/step (min {row['ms_min']:.1f}, max {row['ms_max']:.1f}), "
                  f"{row['image_steps_per_s']:.2f} image-steps/s, {row['tflops']:.3f} TFLOP/s, MFU {common.percent(row['mfu'])}, "
                  f"compile {row['compile_s']:.1f} s", flush=True)
    mem = common.finish("unet_step", args, info, rows, config=args.config, overrides=args.set,
                        dtype=common.dtype_name(dtype), attention=impl or "xla", branches=list(branches))
    if args.append_md:
        cols = ["mode", "px", "images", "U-Net batch", "ms/step (median)", "min–max ms", "image-steps/s",
                "TFLOP/step", "TFLOP/s", "MFU", "compile s"]
        table = [[r["mode"], r["size"], r["images"], r["unet_batch"], r["ms_step"], f"{r['ms_min']:.1f}–{r['ms_max']:.1f}",
                  r["image_steps_per_s"], r["tflop_step"], r["tflops"],
                  common.percent(r["mfu"]), r["compile_s"]] for r in rows]
        notes = (f"config {args.config} {' '.join(args.set)}, {common.dtype_name(dtype)}, attention "
                 f"{impl or 'xla'}, {len(branches)} guidance branches, median of {args.repeats}; peak memory "
                 f"({mem['kind']}) {mem['bytes'] / 2**30:.2f} GiB. {args.note}").strip()
        common.append_markdown(f"U-Net step: {args.config}", cols, table, notes, info)


if __name__ == "__main__":
    main()
