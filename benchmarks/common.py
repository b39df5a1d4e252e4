"""Shared benchmark helpers: backend defaults, timing, device description, memory, MFU, reports.

Timing rule: compile time is measured apart (`jit(f).lower(...)` then `.compile()`), then the
compiled function runs `warmup` times untimed and `repeats` times timed, each with
`block_until_ready`; the median is the headline number, min/max give the spread.

Peak FLOP/s table (dense, no sparsity) used for MFU; override with --peak-tflops:
  H100 / H200 (SXM)  bf16 790e12  the project's anchor ("an H100 does about 790 TFLOP/s bf16"),
                                  i.e. ~80% of the 989e12 datasheet figure; fp32 (TF32 dots) 395e12
  A100               bf16 312e12, fp32 (TF32) 156e12
  TPU v4 275e12, v5e 197e12, v5p 459e12, v6e 918e12 (bf16; fp32 taken as the same MXU rate / 2)
  CPU                cores x clock x FLOP/cycle: 64 fp32 FLOP/cycle/core with AVX-512 (2 FMA units
                     x 16 lanes x 2), 32 with AVX2; bf16 taken as fp32 (no AMX path assumed). Nominal.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from benchmarks.flops import Mode
from cdv2.config import ModelConfig, UNetConfig
from cdv2.model import param_shapes
from cdv2.modules.unet import HINT_AFTER_INPUT_BLOCKS, input_layout, output_layout

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"

# substring of device_kind (lower case) -> (bf16 peak, fp32 peak) FLOP/s
PEAK_FLOPS = {
    "h100": (790e12, 395e12),
    "h200": (790e12, 395e12),
    "a100": (312e12, 156e12),
    "tpu v4": (275e12, 137e12),
    "tpu v5 lite": (197e12, 98e12),
    "tpu v5e": (197e12, 98e12),
    "tpu v5p": (459e12, 229e12),
    "tpu v5": (459e12, 229e12),
    "tpu v6": (918e12, 459e12),
}


# -- backend defaults -------------------------------------------------------------------------
def add_common_args(ap: argparse.ArgumentParser, repeats: int = 5) -> None:
    ap.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                    help="compute dtype (auto: bf16 on GPU/TPU, fp32 on CPU)")
    ap.add_argument("--attention", choices=("auto", "xla", "chunked", "cudnn", "library"), default="auto",
                    help="attention implementation (cdv2.model.resolve_attention; auto: cudnn on GPU in bf16, "
                         "chunked XLA on CPU, XLA elsewhere)")
    ap.add_argument("--repeats", type=int, default=repeats, help="timed runs (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the MFU peak (TFLOP/s)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--append-md", action="store_true", help=f"append a results block to {BENCHMARKS_MD.name}")
    ap.add_argument("--note", default="", help="free text stored with the results")


def resolve_dtype_attention(args) -> tuple[Any, Optional[str]]:
    backend = jax.default_backend()
    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = jnp.float32 if backend == "cpu" else jnp.bfloat16
    from cdv2.model import resolve_attention

    impl = resolve_attention(args.attention, dtype, backend)
    return dtype, None if impl == "xla" else impl


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


# -- timing -----------------------------------------------------------------------------------
def time_jitted(fn: Callable, *args, repeats: int = 5, warmup: int = 1, static_argnames=()) -> dict:
    """Compile `jax.jit(fn)` for `args` (timed apart), then time `repeats` warm runs."""
    t0 = time.perf_counter()
    lowered = jax.jit(fn, static_argnames=static_argnames).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        s = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - s)
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, **summarize(times), "compiled": compiled}


def summarize(times: list[float]) -> dict:
    return {"times_s": [round(t, 6) for t in times], "median_s": statistics.median(times),
            "min_s": min(times), "max_s": max(times)}


# -- device, memory, MFU ------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_ghz() -> float:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1]) / 1000
    except (OSError, ValueError):
        pass
    return 2.0


def device_info() -> dict:
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": d.device_kind, "num_devices": jax.device_count(),
            "cpu": cpu_model(), "cpu_cores": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)), "jax": jax.__version__,
            "python": platform.python_version()}


def device_line(info: dict) -> str:
    if info["backend"] == "cpu":
        pinned = f", pinned to {info['cpu_affinity']}" if info["cpu_affinity"] != info["cpu_cores"] else ""
        return f"CPU: {info['cpu']}, {info['cpu_cores']} cores{pinned} (jax {info['jax']})"
    return f"{info['device_kind']} x{info['num_devices']} ({info['backend']}), host {info['cpu']} (jax {info['jax']})"


def peak_flops(dtype, override_tflops: Optional[float] = None) -> Optional[float]:
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind.lower()
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    if jax.default_backend() == "cpu":
        per_cycle = 64 if "avx512f" in _cpu_flags() else 32
        return len(os.sched_getaffinity(0)) * _cpu_ghz() * 1e9 * per_cycle
    for key, (p16, p32) in PEAK_FLOPS.items():
        if key in kind:
            return p16 if bf16 else p32
    return None


def mfu(flops: float, seconds: float, peak: Optional[float]) -> Optional[float]:
    return None if not peak else flops / seconds / peak


def peak_memory_bytes() -> dict:
    """Peak device memory when the backend reports it, else the process's peak RSS."""
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return {"kind": "device peak_bytes_in_use", "bytes": int(stats["peak_bytes_in_use"])}
    return {"kind": "process peak RSS", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# -- U-Net inputs -------------------------------------------------------------------------------
def _sizes(cfg: UNetConfig, latent_hw):
    h, w = latent_hw
    out = []
    for blk in input_layout(cfg):
        if blk.kind == "down":
            h, w = (h + 1) // 2, (w + 1) // 2
        out.append((h, w))
    return out


def unet_params(model_cfg: ModelConfig, dtype=jnp.float32, *, shapes_only: bool = False, key=None):
    """The U-Net param tree (`cdv2.model.param_shapes`) in `dtype`: shapes, or random values made
    directly on the default device by `random_params`."""
    shapes = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype),
                                    param_shapes(model_cfg, ("unet",))["unet"])
    return shapes if shapes_only else random_params(shapes, jax.random.PRNGKey(1) if key is None else key)


def unet_args(cfg: UNetConfig, latent_hw, batch: int, context_tokens: int, mode: Mode, *,
              hints: bool = False, shapes_only: bool = False, key=None):
    """(args, static kwargs) for `call_unet(unet, params, *args, **kwargs)` in `mode`.

    Every array is an argument (a `jax.ShapeDtypeStruct` with `shapes_only`), never a closed-over
    constant. args = (x, t, context, extras), extras holding the optional inputs of `mode`
    (control hints, mask + threshold, hs_bg, style); all fp32, as the pipeline passes them."""
    h, w = latent_hw
    f32 = jnp.float32
    spec = {"x": ((batch, h, w, cfg.in_channels), f32), "t": ((batch,), f32),
            "context": ((batch, context_tokens, cfg.context_dim), f32)}
    extras = {}
    sizes = _sizes(cfg, latent_hw)
    layout = input_layout(cfg)
    if hints:
        extras["control"] = tuple(((batch, *sizes[i], layout[i].channels), f32) for i in HINT_AFTER_INPUT_BLOCKS)
    if mode.split:
        extras["mask"] = ((batch, h, w, 1), f32)
        extras["threshold"] = ((), f32)
    if mode.warp:
        extras["hs_bg"] = tuple(((batch, sizes[11 - b.index][0] * sizes[11 - b.index][1], b.skip_channels), f32)
                                for b in output_layout(cfg))
    if mode.style:
        extras["style"] = tuple(((batch, 2 * b.channels), f32) for b in output_layout(cfg))
    spec["extras"] = extras
    is_leaf = lambda s: isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], tuple)  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(spec, is_leaf=is_leaf)
    if shapes_only:
        arrays = [jax.ShapeDtypeStruct(*s) for s in leaves]
    else:
        arrays = _random_inputs(jax.random.PRNGKey(0) if key is None else key,
                                tuple((s, jnp.dtype(d).name) for s, d in leaves))
    arrays = jax.tree_util.tree_unflatten(treedef, arrays)
    return (arrays["x"], arrays["t"], arrays["context"], arrays["extras"]), {"use_lora": bool(mode.lora and mode.split)}


def random_params(shapes, key):
    """Random values for a tree of `jax.ShapeDtypeStruct` (from `cdv2.model.param_shapes`), made on
    the default device in each leaf's dtype: norm scales 1, biases 0, kernels N(0, 1/fan_in).

    Not `init_params` itself: jitting the whole init (it runs the forward and ~1000 separate RNG
    draws) takes ~1 min to compile even for the tiny U-Net on CPU. Here one jit draws a single
    normal buffer and slices it into one array per distinct (shape, dtype, kind), shared by every
    leaf of that spec. Timings do not depend on the values as long as they stay finite."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    kinds = []
    for path, s in flat:
        name = str(getattr(path[-1], "key", path[-1]))
        kinds.append("one" if name == "scale" else "zero" if name == "bias" or len(s.shape) < 2 else "normal")
    specs = [(tuple(s.shape), jnp.dtype(s.dtype).name, kind) for (_, s), kind in zip(flat, kinds)]
    unique = tuple(dict.fromkeys(specs))  # leaves of one shape share one (immutable) array
    arrays = dict(zip(unique, _fill(key, unique)))
    return jax.tree_util.tree_unflatten(treedef, [arrays[s] for s in specs])


@partial(jax.jit, static_argnums=(1,))
def _fill(key, specs):
    total = sum(math.prod(shape) for shape, _, kind in specs if kind == "normal")
    buf = jax.random.normal(key, (max(total, 1),), jnp.float32)
    out, at = [], 0
    for shape, dtype, kind in specs:
        if kind == "normal":
            n = math.prod(shape)
            scale = 1.0 / math.sqrt(max(math.prod(shape[:-1]), 1))
            out.append((buf[at:at + n].reshape(shape) * scale).astype(dtype))
            at += n
        else:
            out.append(jnp.full(shape, 1.0 if kind == "one" else 0.0, dtype))
    return out


@partial(jax.jit, static_argnums=(1,))
def _random_inputs(key, specs):
    out = []
    for k, (shape, dtype) in zip(jax.random.split(key, len(specs)), specs):
        if len(shape) <= 1:  # timesteps in [0, 999], the mask threshold in [0, 1)
            out.append(jax.random.uniform(k, shape, dtype, 0, 999 if shape else 1))
        else:
            out.append(jax.random.normal(k, shape, dtype))
    return out


def call_unet(unet, params, x, t, context, extras, use_lora: bool = False):
    return unet.apply({"params": params}, x, t, context, use_lora=use_lora, **extras)


# -- reports ------------------------------------------------------------------------------------
def command_line() -> str:
    return shlex.join(["python", "-m", f"benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]])


def finish(benchmark: str, args, info: dict, rows: list, **fields) -> dict:
    """Print the peak memory and write the JSON payload (when --json); -> the memory record."""
    mem = peak_memory_bytes()
    print(f"peak memory ({mem['kind']}): {mem['bytes'] / 2**30:.2f} GiB")
    if args.json:
        write_json(args.json, {"benchmark": benchmark, "command": command_line(), "device": info, **fields,
                               "peak_memory": mem, "rows": rows, "note": args.note})
    return mem


def percent(fraction: Optional[float]) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"


def write_json(path: str, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def append_markdown(title: str, columns: list[str], rows: list[list], notes: str = "",
                    info: Optional[dict] = None, path: Path = BENCHMARKS_MD, date: Optional[str] = None) -> None:
    """Append a dated results block (device, exact command, a table, notes) to BENCHMARKS.md."""
    info = info or device_info()
    date = date or datetime.date.today().isoformat()
    lines = [f"\n### {title} ({date})\n", f"- device: {device_line(info)}", f"- command: `{command_line()}`"]
    if notes:
        lines.append(f"- notes: {notes}")
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    with open(path, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"appended a results block to {path}")


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)
