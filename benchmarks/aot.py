"""Deviceless ahead-of-time compilation for real accelerator topologies: per-device memory, XLA
FLOPs and compile time of the SHIPPED training step and sampling loop, with no accelerator present.

    # a venv with the TPU and CUDA compilers (the main env is left alone; see BENCHMARKS.md):
    python -m venv /work/venv-aot && /work/venv-aot/bin/pip install "jax[tpu]==0.10.2" \
        jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 flax optax orbax-checkpoint grain ... \
        && /work/venv-aot/bin/pip install --no-deps -e .
    /work/venv-aot/bin/python -m benchmarks.aot --topology v5p:2x2x1 --stage 1 --per-device-batch 2 --remat full
    /work/venv-aot/bin/python -m benchmarks.aot --topology h100x8 --attention cudnn --remat none full
    /work/venv-aot/bin/python -m benchmarks.aot --topology v5p:2x2x1 --sample --images 1 4 8 --modes vanilla full

Training rows: `cdv2.train.step.make_train_step` for the stage's train config (v2 model, 768 px,
bf16 compute, fp32 master weights + AdamW state), params and optimizer state as `jax.eval_shape`
structs carrying the shardings `cdv2.train.mesh.train_shardings` gives the (data x fsdp) mesh over
the topology's devices, a cached-input batch (latent + CLIP tokens + sketch) of per-device-batch x
devices samples. Sampling rows: `Pipeline.denoise` (dpmpp_2m, 20 steps, CFG branches of the
default guidance) on ONE device of the topology, conditions from `jax.eval_shape` of `prepare`.
Nothing is ever materialised. Memory is `compiled.memory_analysis()` of the per-device program
(argument, output, alias, temp, generated code); FLOPs are `cost_analysis()` of that per-device
program. Topologies: TPU via libtpu's `get_topology_desc`; "h100x8" via the CUDA plugin with an
H100 80GB `target_config` (XLA:GPU's autotuning is off without a device, so the fused kernels may
differ from a real compile; memory should be close).
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Optional

GIB = 2 ** 30

# NVIDIA H100 80GB HBM3 (SXM) as XLA:GPU's device description (the `target_config` text proto)
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# name -> (platform, topology string, device memory GiB used for the "fits" column)
TOPOLOGIES = {
    "v5p:2x2x1": ("tpu", "v5p:2x2x1", 95.0),     # v5p-8: 4 chips x 95 GiB HBM
    "v6e:2x2": ("tpu", "v6e:2x2", 32.0),         # v6e-4: 4 chips x 32 GiB
    "v6e:2x4": ("tpu", "v6e:2x4", 32.0),         # v6e-8
    "v5e:2x2": ("tpu", "v5e:2x2", 16.0),
    "h100x8": ("cuda", "1x1x8", 80.0),           # 8x H100 80GB (one host)
}
# the H100 80GB has 79.1 GiB usable of its 80 GB (85.0e9 bytes); v5p's 95 GiB is HBM2e 95 GiB


def prepare_environment(platform: str) -> None:
    """Before the first backend use: keep the host backend on CPU (no accelerator is present) and
    let the CUDA plugin load without CUDA libraries."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the CUDA plugin, when installed, loads
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no TPU is used: several compiling processes may coexist
    if platform == "cuda":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")


def topology_devices(name: str) -> list:
    """The devices of a named topology (TOPOLOGIES), compile targets only: nothing runs on them."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; one of {sorted(TOPOLOGIES)}")
    platform, topo, _ = TOPOLOGIES[name]
    prepare_environment(platform)
    from jax.experimental import topologies

    try:
        if platform == "tpu":
            desc = topologies.get_topology_desc(topology_name=topo, platform="tpu")
        else:
            desc = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET_CONFIG, topology=topo)
    except Exception as e:  # noqa: BLE001 - name the missing compiler
        need = '"jax[tpu]==<jax version>"' if platform == "tpu" else "jax-cuda12-plugin jax-cuda12-pjrt (= jax version)"
        raise RuntimeError(f"cannot describe topology {name!r} ({type(e).__name__}: {str(e)[:200]}); "
                           f"it needs the compiler plugin: pip install {need}") from e
    if platform == "cuda":
        _assume_target_cudnn()
    return list(desc.devices)


def _assume_target_cudnn(version: int = 90700) -> None:
    """jax's cuDNN attention asks the LOCAL cuDNN library for its version while tracing; with no
    CUDA libraries here, answer with the target's (dnn_version_info 9.7 of H100_TARGET_CONFIG).
    The compile itself needs no library: XLA emits the cuDNN custom call for the target."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    try:
        fa.check_cudnn_version()
    except RuntimeError:
        fa.check_cudnn_version = lambda: version


# -- training step ------------------------------------------------------------------------------
def batch_shapes(cfg, model_cfg, b: int, size: int, tokens: int = 256, inputs: str = "auto") -> dict:
    """The training batch's shapes. inputs "cached": sketch + cached latent + CLIP tokens
    (tools/cache_latents.py; stage 1's fast path); "images": what the data pipeline collates
    (image, sketch, reference and its mask at reference_size = 1024 x size/768, sketch mask, size),
    the VAE and CLIP run inside the step; "auto": cached for stage 1, images for stages 2/3 (a
    cached latent cannot carry their background bleaching)."""
    from cdv2.train.collate import CollateConfig

    if inputs == "auto":
        inputs = "cached" if cfg.stage == 1 or cfg.p_white_bg == 0 else "images"
    if inputs == "cached":
        lat = size // 8
        return {"sketch": (b, size, size, 3), "latent": (b, lat, lat, model_cfg.unet.in_channels),
                "clip_tokens": (b, tokens, model_cfg.unet.context_dim)}
    if inputs != "images":
        raise ValueError(f"inputs must be auto, cached or images, got {inputs!r}")
    r = CollateConfig.for_resolution(size).reference_size
    return {"image": (b, size, size, 3), "sketch": (b, size, size, 3), "reference": (b, r, r, 3),
            "smask": (b, size, size, 1), "rmask": (b, r, r, 1), "size": (b, 2)}


def compile_train_step(cfg, model_cfg, *, devices=None, size: int, per_device_batch: int, tokens: int = 256,
                       compiler_options=None, inputs: str = "auto"):
    """-> (compiled, seconds) of the shipped stage train step (`make_train_step`) for abstract inputs
    sharded over a mesh of `devices` (default: jax.devices(); a topology's devices compile deviceless).
    inputs: see `batch_shapes`."""
    import jax
    import jax.numpy as jnp

    from cdv2.model import param_shapes
    from cdv2.train.mesh import make_mesh, train_shardings
    from cdv2.train.stages import make_optimizer
    from cdv2.train.step import build_components, make_train_step, train_state_shapes

    devices = jax.devices() if devices is None else list(devices)
    mesh = make_mesh(cfg.mesh, devices)
    opt = make_optimizer(cfg.optim, cfg.stage)
    shapes = train_state_shapes(param_shapes(model_cfg), opt)
    sh = train_shardings(mesh, shapes, cfg.sharding_rules, cfg.min_shard_size)
    state = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes, sh.state)
    batch = {k: jax.ShapeDtypeStruct(v, jnp.float32, sharding=sh.batch) for k, v in batch_shapes(
        cfg, model_cfg, per_device_batch * len(devices), size, tokens, inputs).items()}
    multi = len(devices) > 1
    step = make_train_step(cfg, build_components(cfg, model_cfg), opt, sh if multi else None,
                           compiler_options=compiler_options)
    if not multi:
        state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), state)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()   # the step sets its mesh itself (Pallas shard_map)
    return compiled, time.perf_counter() - t0


# -- sampling loop ------------------------------------------------------------------------------
def compile_denoise(model_cfg, device, *, size: int, images: int, mode: str, steps: int, dtype, attention,
                    sampler: str = "dpmpp_2m", reference_guidance: float = 5.0, sketch_guidance: float = 1.0,
                    compiler_options=None):
    """-> (compiled, seconds) of `Pipeline.denoise`'s jitted loop on one `device`, for conditions
    from `jax.eval_shape` of the pipeline's own `prepare` (nothing materialised)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import SingleDeviceSharding

    from cdv2.diffusion.guidance import branches_for
    from cdv2.model import param_shapes
    from cdv2.sample.conditions import Inputs, Strengths, resolve_modes
    from cdv2.sample.pipeline import Guidance, Pipeline, _sampler_spec

    pipe = Pipeline(model_cfg, dtype=dtype, attention_impl=attention)
    modes = resolve_modes(mode)
    branches = branches_for(reference_guidance, sketch_guidance)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), param_shapes(model_cfg))
    z = np.zeros((1, size, size, 1), np.float32)
    inputs = Inputs(sketch=np.zeros((1, size, size, 3), np.float32), reference=np.zeros((1, size, size, 3), np.float32),
                    reference_ratios=np.ones((1, 2), np.float32), reference_mask=z + 1,
                    sketch_mask=np.zeros((1, size // 8, size // 8, 1), np.float32))
    mi = pipe.model_inputs(inputs, modes)
    prep = functools.partial(pipe._prepare_impl, modes=modes, branches=branches, num_images=images)
    conds, _ = jax.eval_shape(prep, params, mi, Strengths(), None, None)
    on = SingleDeviceSharding(device)
    to_abstract = lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=on)  # noqa: E731
    lat = size // 8
    args = jax.tree.map(to_abstract, (params["unet"], conds,
                                      jax.ShapeDtypeStruct((images, lat, lat, model_cfg.unet.in_channels), jnp.float32),
                                      Guidance(reference_guidance=jnp.float32(reference_guidance),
                                               sketch_guidance=jnp.float32(sketch_guidance)),
                                      jax.ShapeDtypeStruct((2,), jnp.uint32)))
    t0 = time.perf_counter()
    compiled = pipe._denoise.lower(*args, None, None, None, sampler=_sampler_spec((sampler, steps)),
                                   branches=tuple(branches), use_lora=True, progress=False,
                                   batch_shared_noise=False).compile(compiler_options=compiler_options)
    return compiled, time.perf_counter() - t0


# -- analysis -----------------------------------------------------------------------------------
def memory_row(compiled) -> dict:
    """Per-device bytes from `memory_analysis()`; total = argument + output - alias + temp."""
    m = compiled.memory_analysis()
    sizes = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    sizes["code"] = int(getattr(m, "generated_code_size_in_bytes", 0) or 0)
    sizes["total"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    return sizes


def flops_of(compiled) -> Optional[float]:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends have none
        return None
    ca = ca[0] if isinstance(ca, (list, tuple)) and ca else ca
    f = (ca or {}).get("flops")
    return None if f is None else float(f)


# -- command line ---------------------------------------------------------------------------------
def _train_rows(args, devices, model_cfg, device_gib):
    from cdv2.cli.train import parse_overrides
    from cdv2.train.config import load_train_config

    rows = []
    for stage in args.stage:
        for pdb in args.per_device_batch:
            for policy in args.remat:
                over = {"model": args.config, "batch_size": pdb * len(devices), "compute_dtype": args.dtype,
                        "remat": policy, "inpaint_p": 0.0, "mesh.fsdp": args.fsdp or len(devices),
                        "attention_impl": args.attention, **parse_overrides(args.set)}
                cfg = load_train_config(f"stage{stage}", over)
                label = f"{args.topology} stage {stage} batch {pdb}/dev remat {policy}"
                try:
                    compiled, secs = compile_train_step(cfg, model_cfg, devices=devices, size=args.size,
                                                        per_device_batch=pdb, tokens=args.tokens, inputs=args.inputs,
                                                        compiler_options=_compiler_options(args))
                except Exception as e:  # noqa: BLE001 - one failing cell must not lose the grid
                    print(f"{label}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
                    rows.append({"kind": "train", "topology": args.topology, "stage": stage, "per_device_batch": pdb,
                                 "remat": policy, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                rows.append(_row("train", args, compiled, secs, device_gib, stage=stage, per_device_batch=pdb,
                                 remat=policy))
                _print(label, rows[-1])
    return rows


def _sample_rows(args, devices, model_cfg, device_gib):
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    attention = None if args.attention == "xla" else args.attention
    rows = []
    for mode in args.modes:
        for images in args.images:
            label = f"{args.topology} denoise {mode} {images} image(s) {args.steps} steps"
            try:
                compiled, secs = compile_denoise(model_cfg, devices[0], size=args.size, images=images, mode=mode,
                                                 steps=args.steps, dtype=dtype, attention=attention,
                                                 compiler_options=_compiler_options(args))
            except Exception as e:  # noqa: BLE001
                print(f"{label}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
                rows.append({"kind": "sample", "topology": args.topology, "mode": mode, "images": images,
                             "error": f"{type(e).__name__}: {str(e)[:200]}"})
                continue
            rows.append(_row("sample", args, compiled, secs, device_gib, mode=mode, images=images, steps=args.steps))
            _print(label, rows[-1])
    return rows


def _compiler_options(args) -> Optional[dict]:
    """--compiler-option KEY=VALUE pairs (true/false -> bool) for XLA, or None."""
    out = {}
    for kv in args.compiler_option:
        key, sep, value = kv.partition("=")
        if not sep:
            raise ValueError(f"--compiler-option wants KEY=VALUE, got {kv!r}")
        out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out or None


def _row(kind, args, compiled, secs, device_gib, **fields) -> dict:
    mem = memory_row(compiled)
    flops = flops_of(compiled)
    return {"kind": kind, "topology": args.topology, **fields, "attention": args.attention,
            **{f"{k}_gib": mem[k] / GIB for k in mem}, "tflop_per_device": None if flops is None else flops / 1e12,
            "compile_s": secs, "device_gib": device_gib, "fits": mem["total"] / GIB <= device_gib}


def _print(label, r):
    tf = "n/a" if r["tflop_per_device"] is None else f"{r['tflop_per_device']:.1f}"
    print(f"{label}: argument {r['argument_gib']:.2f} + output {r['output_gib']:.2f} - alias {r['alias_gib']:.2f} "
          f"+ temp {r['temp_gib']:.2f} = {r['total_gib']:.2f} GiB/device (code {r['code_gib'] * 1024:.1f} MiB), "
          f"{tf} TFLOP/device, compile {r['compile_s']:.0f} s -> "
          f"{'fits' if r['fits'] else 'DOES NOT FIT'} {r['device_gib']:.0f} GiB", flush=True)


def main(argv=None):
    from cdv2.modules.unet import REMAT_POLICIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", default="v5p:2x2x1", choices=sorted(TOPOLOGIES))
    ap.add_argument("--config", default="v2", help="model config")
    ap.add_argument("--size", type=int, default=768, help="image size (latent = size / 8)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="compute dtype")
    ap.add_argument("--attention", default="xla",
                    help="attention implementation (cdv2.modules.attention.IMPLEMENTATIONS): xla, cudnn (GPU), "
                         "pallas (TPU flash attention), library")
    ap.add_argument("--stage", type=int, nargs="+", default=[1])
    ap.add_argument("--per-device-batch", type=int, nargs="+", default=[2])
    ap.add_argument("--remat", nargs="+", default=["full"], choices=list(REMAT_POLICIES))
    ap.add_argument("--tokens", type=int, default=256, help="cached CLIP tokens per sample")
    ap.add_argument("--inputs", default="auto", choices=("auto", "cached", "images"),
                    help="training batch: cached latents/tokens or collated images (auto: cached for stage 1)")
    ap.add_argument("--fsdp", type=int, default=None, help="mesh.fsdp (default: all devices)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train config overrides")
    ap.add_argument("--sample", action="store_true", help="compile the sampling loop instead of the train step")
    ap.add_argument("--images", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--modes", nargs="+", default=["vanilla", "full"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an XLA option for the compile, e.g. xla_gpu_enable_triton_gemm=false (repeatable)")
    ap.add_argument("--json", default=None, help="write the rows to this JSON file")
    ap.add_argument("--append-md", action="store_true", help="append a results block to BENCHMARKS.md")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)

    devices = topology_devices(args.topology)
    import jax

    from cdv2.config import load_model_config

    device_gib = TOPOLOGIES[args.topology][2]
    model_cfg = load_model_config(args.config)
    print(f"{args.topology}: {len(devices)} x {devices[0].device_kind} (compile only), jax {jax.__version__}, "
          f"{args.config} at {args.size} px, {args.dtype}, attention {args.attention}", flush=True)
    rows = (_sample_rows if args.sample else _train_rows)(args, devices, model_cfg, device_gib)
    _report(args, devices, rows)
    return rows


def _report(args, devices, rows):
    from benchmarks import common

    info = {"backend": f"deviceless {TOPOLOGIES[args.topology][0]}", "device_kind": devices[0].device_kind,
            "num_devices": len(devices), "cpu": common.cpu_model(), "cpu_cores": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)), "jax": __import__("jax").__version__}
    if args.json:
        common.write_json(args.json, {"benchmark": "aot", "command": common.command_line(), "device": info,
                                      "rows": rows, "note": args.note})
    if not args.append_md:
        return
    ok = [r for r in rows if "error" not in r]
    fails = [r for r in rows if "error" in r]
    mem_cols = ["argument GiB", "output GiB", "alias GiB", "temp GiB", "total GiB", "fits", "TFLOP/device",
                "compile s"]

    def mem(r):
        return [round(r["argument_gib"], 2), round(r["output_gib"], 2), round(r["alias_gib"], 2),
                round(r["temp_gib"], 2), round(r["total_gib"], 2), "yes" if r["fits"] else "**no**",
                None if r["tflop_per_device"] is None else round(r["tflop_per_device"], 1), round(r["compile_s"])]

    if args.sample:
        cols = ["topology", "mode", "images", "steps"] + mem_cols
        table = [[r["topology"], r["mode"], r["images"], r["steps"]] + mem(r) for r in ok]
        title = "Deviceless AOT: sampling loop per device (Pipeline.denoise)"
        what = f"Pipeline.denoise, dpmpp_2m {args.steps} steps, CFG branches of reference guidance 5, on one device"
    else:
        cols = ["topology", "stage", "batch/device", "remat"] + mem_cols
        table = [[r["topology"], r["stage"], r["per_device_batch"], r["remat"]] + mem(r) for r in ok]
        title = "Deviceless AOT: training step per device (make_train_step)"
        what = (f"make_train_step, {len(devices)}-device mesh fsdp {args.fsdp or len(devices)}, cached latents/"
                f"tokens, AdamW fp32 master weights")
    notes = (f"{args.config} at {args.size} px, {args.dtype} compute, attention {args.attention}; {what}; "
             f"compiled for {len(devices)} x {devices[0].device_kind} on this CPU machine (no device); "
             f"fits = total <= {TOPOLOGIES[args.topology][2]:.0f} GiB; TFLOP = XLA cost_analysis of the per-device "
             f"program")
    if args.compiler_option:
        notes += "; XLA options: " + ", ".join(args.compiler_option)
    if fails:
        notes += "; failed: " + "; ".join(f"{_cell(r)}: {r['error'][:120]}" for r in fails)
    if args.note:
        notes += f"; {args.note}"
    common.append_markdown(title, cols, table, notes, info=info)


def _cell(r) -> str:
    if r["kind"] == "train":
        return f"stage {r['stage']} b{r['per_device_batch']} {r['remat']}"
    return f"{r['mode']} x{r['images']}"


if __name__ == "__main__":
    main()
