"""Training memory per device of the SHIPPED train step (`cdv2.train.step.make_train_step`), from
ahead-of-time compilation: nothing is materialised, every input is a sharded ShapeDtypeStruct.

    python -m benchmarks.memory_aot                                   # v2 stage 1 at 768 px, 8 fake CPU devices, fsdp 8
    python -m benchmarks.memory_aot --config tiny --size 64 --remat none full dots_saveable
    python -m benchmarks.memory_aot --config tiny --size 64 --devices 1 --fsdp 1 --remat none full

For each remat policy: the train config `configs/train/stageN.yaml` with the given overrides, the
abstract TrainState (`jax.eval_shape` of the params + optimizer state, with the shardings that
`cdv2.train.mesh.train_shardings` gives a (data x fsdp) mesh), and a cached-input batch (latent +
CLIP tokens + sketch; stage 1) of `per-device-batch x devices` samples; `make_train_step(...)
.lower(state, batch).compile().memory_analysis()` gives the per-device sizes. Caveat: XLA:CPU's
buffer assignment with the XLA attention path (materialised score matrices); read the result as an
upper bound for a GPU with flash attention. For real TPU/GPU topologies (compiled deviceless) see
`benchmarks/aot.py`, which shares `compile_train_step` and `memory_row` with this file.
"""
from __future__ import annotations

import os
import sys

# must precede the first `import jax` (here or in anything imported below)
_n = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--devices"), "8")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_n}").strip()

import argparse  # noqa: E402


from benchmarks.aot import GIB, compile_train_step, memory_row  # noqa: E402,F401 (shared with the topology AOT)


def main(argv=None):
    from benchmarks import common
    from cdv2.config import load_model_config
    from cdv2.train.config import load_train_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="v2", help="model config")
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--size", type=int, default=768, help="training image size (latent = size / 8)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--per-device-batch", type=int, default=1)
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices")
    ap.add_argument("--fsdp", type=int, default=None, help="mesh.fsdp (default: all devices)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--remat", nargs="+", default=["none"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train config overrides")
    ap.add_argument("--device-gib", type=float, default=80.0)
    ap.add_argument("--append-md", action="store_true")
    args = ap.parse_args(argv)
    from cdv2.cli.train import parse_overrides

    model_cfg = load_model_config(args.config)
    rows = []
    for policy in args.remat:
        over = {"model": args.config, "batch_size": args.per_device_batch * args.devices, "compute_dtype": args.dtype,
                "remat": policy, "inpaint_p": 0.0, "mesh.fsdp": args.fsdp or args.devices, "attention_impl": "xla",
                **parse_overrides(args.set)}
        cfg = load_train_config(f"stage{args.stage}", over)
        compiled, secs = compile_train_step(cfg, model_cfg, size=args.size, per_device_batch=args.per_device_batch,
                                            tokens=args.tokens)
        r = memory_row(compiled)
        rows.append([policy] + [round(r[k] / GIB, 4) for k in ("argument", "output", "alias", "temp", "total")]
                    + [round(secs, 1)])
        print(f"remat {policy:34s} " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in r.items())
              + f" | compile {secs:.1f} s", flush=True)
    if args.append_md:
        common.append_markdown(
            "Training memory per device (AOT, make_train_step)",
            ["remat", "argument GiB", "output GiB", "alias GiB", "temp GiB", "total GiB", "compile s"], rows,
            f"{args.config} stage {args.stage} at {args.size}px, {args.per_device_batch}/device on {args.devices} "
            f"fake CPU devices (fsdp {args.fsdp or args.devices}), {args.dtype}, cached latents/tokens, "
            f"XLA attention; XLA:CPU buffer assignment")


if __name__ == "__main__":
    main()
