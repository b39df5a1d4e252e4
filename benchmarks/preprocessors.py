"""Forward latency of the app's preprocessor networks at real size (issue 11: CPU time per network).

Each network is built from its released config (cdv2/configs/preprocessors/*.yaml), its variables
are shaped with `jax.eval_shape` and filled with random values (`common.random_params`; BatchNorm
running variance 1), and the jitted forward is timed at the app's input size:

    isnet / isnet-sketch  1 x 1024 x 1024 x 3   (ISNetDIS.proceed's canvas; the two share the net)
    rmbg-v2               1 x 1024 x 1024 x 3   (rmbg_proceed resizes to 1024)
    lineart_keras         3 x 512 x 512 x 1     (the "extract" sketch is 512 x 512; one batch item per colour)
    lineart               1 x 512 x 512 x 3
    lineart_denoise       1 x 512 x 512 x 1
    lineart_sk            1 x 512 x 512 x 3

Only the network is timed (not the host-side resizes). Quick check at a small size:

    python -m benchmarks.preprocessors --size 64 --networks isnet lineart_sk --repeats 1
    python -m benchmarks.preprocessors --append-md            # all networks at the app's sizes
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from benchmarks.common import (add_common_args, append_markdown, device_info, device_line, finish, random_params,
                               time_jitted)

NETWORKS = ("isnet", "rmbg-v2", "lineart_keras", "lineart", "lineart_denoise", "lineart_sk")
APP_SIZE = {"isnet": 1024, "rmbg-v2": 1024}  # line extractors: 512 (the "extract" resize)
LINEART_MULTIPLE = 256                       # anime2sketch's 8-level U-Net needs multiples of 2**8


def build(name: str, dtype):
    """(Flax module, input shape (B, H, W, C) at the app's size) of a real-size network."""
    from cdv2.weights import preprocessors_dir as ppd

    s = ppd.spec(name)
    cfg = ppd.real_config(s)
    if s.kind == "isnet":
        from cdv2.modules.preprocess_nets.isnet import ISNetDIS
        return ISNetDIS(cfg, dtype=dtype), (1, 1024, 1024, 3)
    if s.kind == "birefnet":
        from cdv2.modules.preprocess_nets.birefnet import BiRefNet
        return BiRefNet(cfg, dtype=dtype), (1, 1024, 1024, 3)
    from cdv2.sample.line_extract import build_network
    module = build_network(name, cfg, dtype)
    channels = cfg.get("in_channels", 1 if name == "lineart_denoise" else 3)
    return module, (3 if name == "lineart_keras" else 1, 512, 512, channels)


def random_variables(module, shape, key):
    """Random variables for `module` at input `shape`, shaped by eval_shape (never init'ed)."""
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, jnp.float32))
    out = {"params": random_params(shapes["params"], key)}
    if "batch_stats" in shapes:  # eval-mode BN: mean 0, var 1 keep activations finite
        out["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda p, s: jnp.full(s.shape, 1.0 if str(getattr(p[-1], "key", "")) == "var" else 0.0, s.dtype),
            shapes["batch_stats"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    ap.add_argument("--size", type=int, default=None,
                    help="square input side instead of the app's (a quick check); lineart rounds up to 256")
    add_common_args(ap, repeats=3)
    args = ap.parse_args(argv)
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}.get(args.dtype) or (
        jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    info = device_info()
    print(device_line(info))
    rows = []
    for name in args.networks:
        module, shape = build(name, dtype)
        if args.size:
            side = -(-args.size // LINEART_MULTIPLE) * LINEART_MULTIPLE if name == "lineart" else args.size
            shape = (shape[0], side, side, shape[3])
        variables = random_variables(module, shape, jax.random.PRNGKey(1))
        n = sum(int(x.size) for x in jax.tree_util.tree_leaves(variables["params"]))
        x = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.float32)
        r = time_jitted(lambda v, x: module.apply(v, x), variables, x, repeats=args.repeats, warmup=args.warmup)
        out = r.pop("compiled")(variables, x)
        finite = all(bool(jnp.isfinite(o).all()) for o in jax.tree_util.tree_leaves(out))
        print(f"{name:16s} {n:>12,} params  input {shape}  {1e3 * r['median_s']:9.1f} ms median "
              f"(min {1e3 * r['min_s']:.1f}, compile {r['compile_s']:.1f} s){'' if finite else '  NON-FINITE'}")
        rows.append([name, f"{n:,}", "x".join(map(str, shape)), round(1e3 * r["median_s"], 1),
                     round(1e3 * r["min_s"], 1), round(r["compile_s"], 1)])
        del variables
    finish("preprocessors", args, info, rows, dtype=jnp.dtype(dtype).name)
    if args.append_md:
        append_markdown(f"Preprocessor networks, forward latency ({jnp.dtype(dtype).name})",
                        ["network", "params", "input (BxHxWxC)", "median ms", "min ms", "compile s"], rows,
                        notes=args.note or "random real-size weights; network forward only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
