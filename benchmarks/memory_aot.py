"""Stage-1 training memory per device from ahead-of-time compilation (nothing is materialised).

    python -m benchmarks.memory_aot                      # v2 at 768 px (96x96 latent), 8 fake CPU devices
    python -m benchmarks.memory_aot --size 512           # a reduced latent when the full size compiles too slowly

The full v2 U-Net + sketch encoder as `param_shapes` (fp32 master weights), AdamW state shapes from
`jax.eval_shape(optax.adamw(...).init, trainable)`, all sharded FSDP-style over a (1 data x 8 fsdp)
mesh (each leaf's largest dimension divisible by 8 is split, the rest replicated); one jitted
forward + backward + AdamW update for a global batch of 8 (1 per device) with `ShapeDtypeStruct`
inputs, lowered and compiled; `compiled.memory_analysis()` gives the per-device sizes.

Stage 1 (paper §4.1): the U-Net minus its LoRA / warp / style modules, and the sketch encoder, train;
the U-Net's extra modules are passed along frozen (no gradients, no optimizer state). The loss is a
self-contained v-prediction MSE (offset noise left out: it does not change memory). The weights
are all-gathered in the compute dtype for the forward (mixed-precision FSDP); gradients come back
sharded like the params. No rematerialisation. Caveat: this is XLA:CPU's buffer assignment, with the XLA attention path that
materialises every attention matrix (9216 x 9216 per head at the 96x96 level) and keeps them for the
backward pass; a GPU build with cuDNN flash attention stores none of them, so read the result as
an upper bound for the GPU.
"""
from __future__ import annotations

import os

# must precede the first `import jax` (here or in anything imported below)
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.unet_step import parse_overrides  # noqa: E402
from cdv2.config import load_model_config  # noqa: E402
from cdv2.model import param_shapes  # noqa: E402
from cdv2.modules.encoders import SketchEncoder  # noqa: E402
from cdv2.modules.unet import UNet  # noqa: E402

GIB = 2 ** 30
# U-Net modules that stage 1 does not train (they are stage 2 / 3 additions)
STAGE1_FROZEN = re.compile(r"(^warp_modules_\d+$|^style_modules_\d+_\d+$|^lora_(down|up)_(fg|bg)$)")


def split_stage1(unet_params):
    """-> (trainable U-Net tree, frozen U-Net tree), both nested dicts with the same layout."""
    def walk(tree, frozen_branch):
        train, frozen = {}, {}
        for k, v in tree.items():
            is_frozen = frozen_branch or bool(STAGE1_FROZEN.match(k))
            if isinstance(v, dict):
                t, f = walk(v, is_frozen)
                if t:
                    train[k] = t
                if f:
                    frozen[k] = f
            elif is_frozen:
                frozen[k] = v
            else:
                train[k] = v
        return train, frozen

    return walk(unet_params, False)


def merge(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out


def fsdp_spec(shape, n: int) -> P:
    """Split the largest dimension divisible by n over "fsdp"; replicate leaves with none."""
    dims = [i for i, d in enumerate(shape) if d % n == 0 and d >= n]
    if not dims:
        return P()
    best = max(dims, key=lambda i: shape[i])
    return P(*[("fsdp" if i == best else None) for i in range(len(shape))])


def alphas_cumprod(schedule):
    betas = np.linspace(schedule.linear_start ** 0.5, schedule.linear_end ** 0.5, schedule.timesteps) ** 2
    return jnp.asarray(np.cumprod(1.0 - betas), jnp.float32)


def make_step(model_cfg, dtype, attention_impl, lr: float, gather=None):
    """`gather(tree)`: what FSDP does before the forward (all-gather the weights, here in the compute
    dtype); without it the SPMD partitioner propagates the weight shardings into the activations."""
    unet = UNet(model_cfg.unet, attention_impl, dtype)
    sketch_encoder = SketchEncoder(model_cfg.sketch_encoder, dtype)
    acp = alphas_cumprod(model_cfg.schedule)
    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)  # torch AdamW defaults, lr 1e-5
    gather = gather or (lambda tree: tree)

    def loss_fn(trainable, frozen, batch):
        trainable, frozen = gather(trainable), gather(frozen)
        unet_params = merge(trainable["unet"], frozen["unet"])
        hints = sketch_encoder.apply({"params": trainable["sketch_encoder"]}, batch["sketch"])
        a = jnp.sqrt(acp[batch["t"]])[:, None, None, None]
        s = jnp.sqrt(1.0 - acp[batch["t"]])[:, None, None, None]
        x_t = a * batch["x0"] + s * batch["noise"]
        v = a * batch["noise"] - s * batch["x0"]
        out = unet.apply({"params": unet_params}, x_t, batch["t"].astype(jnp.float32), batch["context"], control=hints)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - v))

    def step(trainable, frozen, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step, opt


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="v2")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--size", type=int, default=768, help="training image size (latent = size / 8)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--per-device-batch", type=int, default=1)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="compute dtype (params stay fp32)")
    ap.add_argument("--attention", choices=("xla", "cudnn"), default="xla",
                    help="cudnn only lowers for a GPU; on the fake CPU devices use xla")
    ap.add_argument("--device-gib", type=float, default=80.0, help="the budget to compare against (H100: 80 GB)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--append-md", action="store_true")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)

    n_dev = jax.device_count()
    mesh = Mesh(np.array(jax.devices()).reshape(1, n_dev), ("data", "fsdp"))
    model_cfg = load_model_config(args.config, parse_overrides(args.set))
    dtype = {"bf16": jnp.bfloat16, "fp32": jnp.float32}[args.dtype]
    impl = None if args.attention == "xla" else "cudnn"

    shapes = param_shapes(model_cfg, ("unet", "sketch_encoder"))
    unet_train, unet_frozen = split_stage1(shapes["unet"])
    trainable = {"unet": unet_train, "sketch_encoder": shapes["sketch_encoder"]}
    frozen = {"unet": unet_frozen}
    replicated = NamedSharding(mesh, P())

    def gather(tree):  # FSDP: all-gather each weight (in the compute dtype) for the forward/backward
        return jax.tree_util.tree_map(lambda p: jax.lax.with_sharding_constraint(p.astype(dtype), replicated), tree)

    step, opt = make_step(model_cfg, dtype, impl, 1e-5, gather)
    opt_state = jax.eval_shape(opt.init, trainable)

    def sharded(tree):
        return jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, fsdp_spec(s.shape, n_dev))),
            tree)

    B, lat = args.per_device_batch * n_dev, args.size // 8
    batch_sharding = lambda nd: NamedSharding(mesh, P(("data", "fsdp"), *([None] * (nd - 1))))  # noqa: E731
    batch_shapes = {"x0": ((B, lat, lat, 4), jnp.float32), "noise": ((B, lat, lat, 4), jnp.float32),
                    "sketch": ((B, args.size, args.size, 3), jnp.float32),
                    "context": ((B, args.tokens, model_cfg.unet.context_dim), jnp.float32), "t": ((B,), jnp.int32)}
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(len(s))) for k, (s, d) in batch_shapes.items()}
    tr_s, fr_s, opt_s = sharded(trainable), sharded(frozen), sharded(opt_state)
    shardings = lambda tree: jax.tree_util.tree_map(lambda s: s.sharding, tree)  # noqa: E731

    counts = {"trainable": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(trainable)),
              "frozen": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(frozen))}
    print(common.device_line(common.device_info()), f"| {n_dev} devices, mesh {dict(mesh.shape)}")
    print(f"{args.config} stage 1 at {args.size}px (latent {lat}x{lat}), global batch {B} "
          f"({args.per_device_batch}/device), {args.tokens} tokens, compute {args.dtype}, attention {args.attention}")
    print(f"params: trainable {counts['trainable'] / 1e6:.1f} M, frozen {counts['frozen'] / 1e6:.1f} M; "
          f"unsharded fp32 params {tree_bytes(trainable) / GIB:.2f} + {tree_bytes(frozen) / GIB:.2f} GiB, "
          f"AdamW state {tree_bytes(opt_state) / GIB:.2f} GiB", flush=True)

    jitted = jax.jit(step, in_shardings=(shardings(tr_s), shardings(fr_s), shardings(opt_s), shardings(batch)),
                     out_shardings=(shardings(tr_s), shardings(opt_s), NamedSharding(mesh, P())),
                     donate_argnums=(0, 2))
    t0 = time.perf_counter()
    lowered = jitted.lower(tr_s, fr_s, opt_s, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    sizes = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp", "generated_code")}
    total = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    fits = total <= args.device_gib * 1e9
    print(f"lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s")
    print("per device: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sizes.items()))
    print(f"per-device total (argument + output - alias + temp) = {total / GIB:.2f} GiB = {total / 1e9:.1f} GB: "
          f"{'fits' if fits else 'does NOT fit'} in {args.device_gib:g} GB")
    payload = {"benchmark": "memory_aot", "command": common.command_line(), "device": common.device_info(),
               "config": args.config, "overrides": args.set, "size": args.size, "latent": lat, "global_batch": B,
               "per_device_batch": args.per_device_batch, "tokens": args.tokens, "dtype": args.dtype,
               "attention": args.attention, "param_counts": counts, "lower_s": t1 - t0, "compile_s": t2 - t1,
               "per_device_bytes": sizes, "per_device_total_bytes": total, "fits": fits, "budget_gb": args.device_gib,
               "note": args.note}
    if args.json:
        common.write_json(args.json, payload)
    if args.append_md:
        cols = ["px (latent)", "batch/device", "compute", "argument GiB", "output GiB", "alias GiB", "temp GiB",
                "total GiB", f"fits {args.device_gib:g} GB", "compile s"]
        row = [f"{args.size} ({lat})", args.per_device_batch, args.dtype, sizes["argument"] / GIB,
               sizes["output"] / GIB, sizes["alias"] / GIB, sizes["temp"] / GIB, total / GIB,
               "yes" if fits else "no", t2 - t1]
        notes = (f"stage 1 ({args.config}: U-Net minus LoRA/warp/style + sketch encoder trained, "
                 f"{counts['trainable'] / 1e6:.0f} M params; {counts['frozen'] / 1e6:.0f} M frozen), AdamW fp32 state, "
                 f"FSDP over {n_dev} fake CPU devices (largest divisible dim split), {args.tokens} tokens, "
                 f"attention {args.attention}, no remat; XLA:CPU buffer assignment (upper bound for a GPU with "
                 f"flash attention). {args.note}").strip()
        common.append_markdown("Stage-1 training memory (AOT)", cols, [row], notes)


if __name__ == "__main__":
    main()
