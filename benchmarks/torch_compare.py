"""Same-run CPU comparison: our U-Net (vanilla SD path) vs an INDEPENDENT torch U-Net of the same
shape, diffusers' `UNet2DConditionModel` in the SD2.1 layout.

    python -m benchmarks.torch_compare                          # model_channels 64, 32x32 latent, batch 2
    python -m benchmarks.torch_compare --channels 128 --latent 48 --repeats 7
    python -m benchmarks.torch_compare --grid --grid-channels 64 128 320 --grid-latents 32 48 64 96 \
        --repeats 3 --rounds 1 --append-md      # the grid table (vanilla vs torch; full: jax only)

Both sides: fp32, all cores (torch.set_num_threads(os.cpu_count()); XLA's CPU thread pool uses
all cores by default), warm. Timing (default `--isolate`): each side runs in its own child
process, alternating torch, jax, torch, jax ... for `--rounds` rounds of `--repeats` warm runs, so
load from other processes hits both alike and neither framework's idle thread pool (OpenMP's and
Eigen's spin-waiting workers) steals cores from the other, which biased the old in-process
interleaving by up to 2.5x against whichever side ran second (`--no-isolate` keeps that mode).
torch runs under `torch.inference_mode()`; jax runs the whole U-Net as one jitted function.

Same function, checked shape-wise: the v2 config with `warp_module=False, style_modulation=False,
lora_rank=0` (the plain SD2.1 U-Net) must have exactly diffusers' parameter count, the same
output shape, and torch's own FLOP counter (torch.utils.flop_counter) must agree with our analytic
count (benchmarks/flops.py). diffusers' `attention_head_dim` list is really the number of heads
per block (a known naming quirk), so it gets C_i / num_head_channels.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks.flops import VANILLA, unet_flops
from cdv2.config import load_model_config
from cdv2.modules.unet import UNet


def _child_times(side: str, argv) -> list:
    """Run this script as a timing child for one side; -> its warm step times (s)."""
    cmd = [sys.executable, "-m", "benchmarks.torch_compare", *(sys.argv[1:] if argv is None else argv), "--child", side]
    cmd = [a for a in cmd if a != "--append-md"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plain_sd_config(channels: int, context_dim: int = 1024):
    return load_model_config("v2", {"unet.model_channels": channels, "unet.context_dim": context_dim,
                                    "unet.warp_module": False, "unet.style_modulation": False,
                                    "unet.lora_rank": 0})


def diffusers_unet(cfg, latent: int):
    """diffusers' SD2.1 U-Net at our config's sizes (use_linear_projection False: 1x1-conv proj)."""
    from diffusers import UNet2DConditionModel

    chans = tuple(cfg.model_channels * m for m in cfg.channel_mult)
    return UNet2DConditionModel(
        sample_size=latent, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=chans, layers_per_block=cfg.num_res_blocks,
        attention_head_dim=[c // cfg.num_head_channels for c in chans],  # = heads (diffusers quirk)
        cross_attention_dim=cfg.context_dim, use_linear_projection=False, flip_sin_to_cos=True, freq_shift=0,
        norm_num_groups=32, norm_eps=1e-5, act_fn="silu", upcast_attention=False,
    ).eval()


def torch_flops(model, x, t, ctx) -> int:
    """torch's own FLOP count of the diffusers forward. Its counter has no formula for the CPU flash
    SDPA kernel, so the count runs with diffusers' classic (bmm + softmax) attention processor."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    saved = model.attn_processors
    model.set_attn_processor(AttnProcessor())
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x, t, encoder_hidden_states=ctx)
    finally:
        model.set_attn_processor(saved)
    return int(counter.get_total_flops())


def full_mode_times(args) -> list:
    """Warm step times (s) of cdv2's full mode (v2 at this width: split attention over 2x tokens,
    fg/bg LoRA, warp modules, style modulation), one process."""
    from benchmarks.flops import FULL

    cfg = load_model_config("v2", {"unet.model_channels": args.channels, "unet.context_dim": args.context_dim})
    from cdv2.model import resolve_attention

    unet = UNet(cfg.unet, resolve_attention(args.jax_attention, jnp.float32))
    params = common.unet_params(cfg)
    call_args, static = common.unet_args(cfg.unet, (args.latent, args.latent), args.batch, 2 * args.tokens, FULL)
    compiled = jax.jit(lambda p, *a: common.call_unet(unet, p, *a, **static)).lower(params, *call_args).compile()
    jax.block_until_ready(compiled(params, *call_args))
    times = []
    for _ in range(args.repeats):
        s = time.perf_counter()
        jax.block_until_ready(compiled(params, *call_args))
        times.append(time.perf_counter() - s)
    return times


def side_times(args) -> list:
    """Warm step times (s) of one side (args.child), built alone in this process: neither the other
    framework's model (3.5 GB each at mc 320) nor its thread pool is around while timing."""
    b, L, n = args.batch, args.latent, args.tokens
    cfg = plain_sd_config(args.channels, args.context_dim)
    if args.child == "torch":
        import torch

        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        model = diffusers_unet(cfg.unet, L)
        x, t = torch.randn(b, cfg.unet.in_channels, L, L), torch.full((b,), 500.0)
        c = torch.randn(b, n, cfg.unet.context_dim)

        def fn():
            with torch.inference_mode():
                return model(x, t, encoder_hidden_states=c).sample
    else:
        from cdv2.model import resolve_attention

        unet = UNet(cfg.unet, resolve_attention(args.jax_attention, jnp.float32))
        params = common.unet_params(cfg)
        x = jax.random.normal(jax.random.PRNGKey(0), (b, L, L, cfg.unet.in_channels))
        t, c = jnp.full((b,), 500.0), jax.random.normal(jax.random.PRNGKey(1), (b, n, cfg.unet.context_dim))
        compiled = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c)).lower(params, x, t, c).compile()

        def fn():
            return jax.block_until_ready(compiled(params, x, t, c))
    fn()
    times = []
    for _ in range(args.repeats):
        s = time.perf_counter()
        fn()
        times.append(time.perf_counter() - s)
    return times


def run_grid(args) -> list:
    """One comparison per (model_channels, latent) cell, each in its own child processes; a table."""
    import tempfile

    common_argv = ["--batch", str(args.batch), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
                   "--rounds", str(args.rounds), "--jax-attention", args.jax_attention,
                   "--context-dim", str(args.context_dim), "--threads", str(args.threads)]
    rows = []
    for ch in args.grid_channels:
        for lat in args.grid_latents:
            cell = ["--channels", str(ch), "--latent", str(lat), *common_argv]
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                subprocess.run([sys.executable, "-m", "benchmarks.torch_compare", *cell, "--json", tmp.name],
                               check=True, capture_output=True, text=True)
                r = json.loads(open(tmp.name).read())
            tv, jv = (1e3 * r["results"][k]["median_s"] for k in ("torch", "jax"))
            full = None
            if args.full:
                ft = []
                for _ in range(args.rounds):
                    ft += _child_times("jax-full", cell)
                full = 1e3 * common.summarize(ft)["median_s"]
            row = [ch, lat, tv, jv, tv / jv, full, None if full is None else full / jv, os.getloadavg()[0]]
            print("grid cell:", row, flush=True)
            rows.append(row)
    cols = ["mc", "latent", "torch vanilla ms", "cdv2 vanilla ms", "torch/jax", "cdv2 full ms", "full/vanilla",
            "load avg"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(common._fmt(v) for v in row))
    if args.json:
        common.write_json(args.json, {"benchmark": "torch_compare_grid", "command": common.command_line(),
                                      "device": common.device_info(), "columns": cols, "rows": rows, "note": args.note})
    if args.append_md:
        notes = (f"plain SD2.1 U-Net (vanilla) vs diffusers, batch {args.batch}, {args.tokens} tokens, fp32, "
                 f"medians of {args.rounds} alternating child processes x {args.repeats} warm runs per side; full = "
                 f"cdv2's v2 U-Net with split attention (2x tokens), LoRA, warp and style (no torch counterpart); "
                 f"jax attention {args.jax_attention}. {args.note}").strip()
        common.append_markdown("torch (diffusers) vs JAX U-Net grid, CPU", cols, rows, notes)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", type=int, default=64, help="model_channels (heads: 64-channel, as SD2.1)")
    ap.add_argument("--context-dim", type=int, default=1024)
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch threads (default: the CPUs this process may run on; XLA sizes its pool the same way)")
    ap.add_argument("--jax-attention", choices=("auto", "xla", "chunked", "library"), default="auto",
                    help="cdv2.model.resolve_attention (auto: chunked XLA attention on CPU)")
    ap.add_argument("--rounds", type=int, default=3, help="child processes per side (with --isolate)")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                    help="time each side in its own child processes (default) instead of interleaving in this one")
    ap.add_argument("--grid", action="store_true", help="run every --grid-channels x --grid-latents cell "
                    "(each a full comparison in its own processes) and write one table")
    ap.add_argument("--grid-channels", type=int, nargs="+", default=[64, 128, 320])
    ap.add_argument("--grid-latents", type=int, nargs="+", default=[32, 48, 64, 96])
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                    help="with --grid: also time cdv2's full mode (split attention + LoRA + warp + style; "
                         "diffusers cannot express it, so jax only)")
    ap.add_argument("--child", choices=("torch", "jax", "jax-full"), help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    ap.add_argument("--append-md", action="store_true")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    if args.grid:
        return run_grid(args)
    if args.child == "jax-full":
        print(json.dumps(full_mode_times(args)))
        return
    if args.child:  # a timing child builds only its own side (the parent checked both)
        print(json.dumps(side_times(args)))
        return

    import torch

    torch.set_num_threads(args.threads)
    from cdv2.model import resolve_attention

    args.jax_attention = resolve_attention(args.jax_attention, jnp.float32) or "xla"
    model_cfg = plain_sd_config(args.channels, args.context_dim)
    cfg = model_cfg.unet
    b, L, n = args.batch, args.latent, args.tokens

    # -- torch (diffusers) ---------------------------------------------------------------------
    torch.manual_seed(0)
    tmodel = diffusers_unet(cfg, L)
    x_t = torch.randn(b, cfg.in_channels, L, L)
    t_t = torch.full((b,), 500.0)
    c_t = torch.randn(b, n, cfg.context_dim)
    n_torch = sum(p.numel() for p in tmodel.parameters())

    # -- jax (ours) ----------------------------------------------------------------------------
    unet = UNet(cfg, args.jax_attention)
    params = common.unet_params(model_cfg)
    n_jax = sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
    x_j = jnp.asarray(x_t.numpy().transpose(0, 2, 3, 1))
    t_j, c_j = jnp.asarray(t_t.numpy()), jnp.asarray(c_t.numpy())
    fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, x_j, t_j, c_j).compile()
    compile_s = time.perf_counter() - t0

    def run_jax():
        return jax.block_until_ready(compiled(params, x_j, t_j, c_j))

    def run_torch():
        with torch.inference_mode():
            return tmodel(x_t, t_t, encoder_hidden_states=c_t).sample

    out_j, out_t = run_jax(), run_torch()
    assert out_j.shape == tuple(out_t.permute(0, 2, 3, 1).shape), (out_j.shape, out_t.shape)
    assert np.isfinite(np.asarray(out_j)).all() and torch.isfinite(out_t).all()

    f_ours = unet_flops(cfg, (L, L), b, n, VANILLA)["total"]
    f_torch = torch_flops(tmodel, x_t, t_t, c_t)
    times = {"torch": [], "jax": []}
    if args.isolate:
        del tmodel, params, compiled
        for _ in range(args.rounds):
            for name in ("torch", "jax"):
                times[name] += _child_times(name, argv)
    else:
        for _ in range(args.repeats):  # interleaved in this process; one more warm-up each first
            for name, fn in (("torch", run_torch), ("jax", run_jax)):
                s = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - s)
    res = {k: common.summarize(v) for k, v in times.items()}
    ratio = res["torch"]["median_s"] / res["jax"]["median_s"]
    ratio_min = res["torch"]["min_s"] / res["jax"]["min_s"]

    info = common.device_info()
    env = {k: os.environ.get(k, "") for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "XLA_FLAGS")}
    affinity = sorted(os.sched_getaffinity(0))
    print(common.device_line(info), f"| torch {torch.__version__}, {torch.get_num_threads()} threads | "
          f"CPU affinity {affinity} | env {env} | jax attention: {args.jax_attention}")
    print(f"U-Net mc={cfg.model_channels} ctx={cfg.context_dim}, latent {L}x{L}, batch {b}, {n} tokens, fp32")
    print(f"params: ours {n_jax:,} vs diffusers {n_torch:,} ({'equal' if n_jax == n_torch else 'DIFFERENT'})")
    print(f"FLOPs: analytic {f_ours / 1e9:.3f} GFLOP vs torch FlopCounterMode {f_torch / 1e9:.3f} GFLOP "
          f"(ratio {f_torch / f_ours:.4f})")
    print(f"jax compile {compile_s:.1f} s")
    for k in ("torch", "jax"):
        r = res[k]
        print(f"{k:5s}: median {1e3 * r['median_s']:.1f} ms (min {1e3 * r['min_s']:.1f}, max {1e3 * r['max_s']:.1f}), "
              f"{f_ours / r['median_s'] / 1e9:.1f} GFLOP/s")
    print(f"torch/jax step-time ratio: {ratio:.3f} (medians), {ratio_min:.3f} (minimums); "
          f"{'JAX faster' if ratio > 1 else 'torch faster'}")
    payload = {"benchmark": "torch_compare", "command": common.command_line(), "device": info,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "env": env, "cpu_affinity": affinity,
               "jax_attention": args.jax_attention,
               "channels": cfg.model_channels, "context_dim": cfg.context_dim, "latent": L, "batch": b, "tokens": n,
               "params_ours": n_jax, "params_diffusers": n_torch, "flops_analytic": f_ours, "flops_torch_counter": f_torch,
               "jax_compile_s": compile_s, "results": res, "ratio_torch_over_jax_median": ratio,
               "ratio_torch_over_jax_min": ratio_min, "note": args.note}
    if args.json:
        common.write_json(args.json, payload)
    if args.append_md:
        cols = ["impl", "median ms", "min–max ms", "GFLOP/s", "params", "GFLOP (analytic / torch counter)"]
        rows = [[label, 1e3 * res[k]["median_s"], f"{1e3 * res[k]['min_s']:.1f}–{1e3 * res[k]['max_s']:.1f}",
                 f_ours / res[k]["median_s"] / 1e9, f"{nn:,}", f"{g / 1e9:.3f}"]
                for k, label, nn, g in (("torch", "torch (diffusers)", n_torch, f_torch),
                                        ("jax", f"jax (cdv2, {args.jax_attention} attention)", n_jax, f_ours))]
        notes = (f"plain SD2.1 U-Net, model_channels {cfg.model_channels}, context_dim {cfg.context_dim}, latent "
                 f"{L}x{L}, batch {b}, {n} tokens, fp32, torch threads {torch.get_num_threads()}, CPU affinity "
                 f"{affinity}, env {env}, jax attention {args.jax_attention}; median of "
                 f"{len(times['jax'])} warm runs "
                 f"({f'{args.rounds} alternating child processes per side' if args.isolate else 'interleaved in one process'}); **torch/jax = {ratio:.2f}** (medians), {ratio_min:.2f} (minimums). {args.note}").strip()
        common.append_markdown("torch (diffusers) vs JAX U-Net, CPU", cols, rows, notes, info)


if __name__ == "__main__":
    main()
