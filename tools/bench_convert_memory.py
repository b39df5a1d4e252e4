"""Benchmark: peak RAM and time of converting a FULL-SIZE v2 checkpoint (not a test).

Writes a random checkpoint with the released file's 1,884 keys, shapes and dtypes (fp32, VAE
fp16, the 12 schedule buffers: 6.82 GB) to a temporary directory, then in fresh subprocesses runs
(1) convert_v2_checkpoint alone and (2) convert + save_weights_dir (what tools/convert_torch.py
does), reporting each child's peak RSS (os.wait4 ru_maxrss) and wall time; deletes everything.

    python tools/bench_convert_memory.py [--tmp DIR] [--shapes auto|keys|model] [--dtype float32|bfloat16]

`--dtype bfloat16` measures a bf16 load (each tensor cast while streaming: no fp32 copy).

Note: the file was just written, so it is read from the page cache (a cold disk adds read time,
not memory: reads do not count in RSS because the reader uses plain reads, not mmap).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
KEYS = REPO.parent / "shared" / "spec" / "v2_expected_keys.txt"
GROUP_NAMES = ("unet", "sketch_encoder", "bg_encoder", "style_encoder", "vae")


def read_key_list(path) -> dict[str, tuple[int, ...]]:
    rows = (line.split(maxsplit=1) for line in open(path) if line.strip())
    return {k: tuple(json.loads(s)) for k, s in rows}


def write_random_checkpoint(path: Path, shapes: dict) -> int:
    from cdv2.weights.readers import write_safetensors
    from cdv2.weights.v2_checkpoint import SCHEDULE_BUFFERS, schedule_buffers

    pool = np.random.default_rng(0).standard_normal(1 << 23, dtype=np.float32) * 0.02  # 32 MB
    sched = schedule_buffers()

    def make(key, shape, dtype):
        if key in SCHEDULE_BUFFERS:
            return sched[key]
        n = int(np.prod(shape))
        start = zlib.crc32(key.encode()) % (pool.size // 2)  # a different slice per key, tiled when larger
        data = pool[start:start + n] if n <= pool.size - start else np.resize(pool[start:], n)
        return data.astype(dtype).reshape(shape)

    entries = []
    for key, shape in shapes.items():
        dtype = np.dtype(np.float16 if key.startswith("first_stage_model.") else np.float32)
        entries.append((key, dtype, shape, lambda k=key, s=shape, d=dtype: make(k, s, d)))
    write_safetensors(path, entries, progress=True)
    return path.stat().st_size


def expected_shapes(mode: str, key_file: Path):
    if mode in ("auto", "model"):
        try:
            from cdv2.config import load_model_config
            from cdv2.model import param_shapes
            return param_shapes(load_model_config("v2"), groups=GROUP_NAMES), "cdv2.model.param_shapes"
        except ImportError as e:
            if mode == "model":
                raise
            print(f"[child] cdv2.model unavailable ({e}); expected shapes from the key list", flush=True)
    from cdv2.weights.torch_layout import torch_shape_to_flax
    from cdv2.weights.tree import unflatten
    from cdv2.weights.v2_checkpoint import torch_key_to_param_path

    flat = {}
    for key, shape in read_key_list(key_file).items():
        path = torch_key_to_param_path(key, len(shape))
        if path is not None:
            flat[path] = torch_shape_to_flax(shape)
    return unflatten(flat, sep=None), str(key_file)


def child(task: str, ckpt: str, out: str, shapes_mode: str, key_file: str, dtype: str) -> None:
    from cdv2.config import load_model_config
    from cdv2.weights.dtypes import resolve_dtype
    from cdv2.weights.tree import flatten
    from cdv2.weights.v2_checkpoint import convert_v2_checkpoint
    from cdv2.weights.weights_dir import save_weights_dir

    expected, where = expected_shapes(shapes_mode, Path(key_file))
    t0 = time.perf_counter()
    params, source_dtypes = convert_v2_checkpoint(ckpt, expected, progress=False, dtype=resolve_dtype(dtype))
    t1 = time.perf_counter()
    n = sum(int(np.prod(v.shape)) for v in flatten(params).values())
    print(f"[child] converted {len(source_dtypes)} tensors, {n:,} params (shapes from {where}) "
          f"in {t1 - t0:.1f} s", flush=True)
    if task == "convert_save":
        save_weights_dir(out, params, load_model_config("v2"), source_dtypes, source=ckpt)
        print(f"[child] saved weights dir in {time.perf_counter() - t1:.1f} s", flush=True)


def run_child(task: str, ckpt: Path, out: Path, args) -> tuple[float, float]:
    """-> (peak RSS in GB, wall seconds) of one fresh interpreter doing `task`."""
    cmd = [sys.executable, __file__, "--child", task, "--ckpt", str(ckpt), "--out", str(out),
           "--shapes", args.shapes, "--keys", str(args.keys), "--dtype", args.dtype]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child '{task}' failed with exit code {proc.returncode}")
    return usage.ru_maxrss * 1024 / 1e9, wall  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tmp", help="directory for the temporary files (default: system temp)")
    ap.add_argument("--keys", default=str(KEYS), help="v2_expected_keys.txt")
    ap.add_argument("--shapes", choices=["auto", "keys", "model"], default="auto",
                    help="expected shapes from cdv2.model.param_shapes or the key list")
    ap.add_argument("--dtype", default="float32", help="dtype the params are loaded in (float32, bfloat16)")
    ap.add_argument("--child", choices=["convert", "convert_save"], help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.ckpt, args.out, args.shapes, args.keys, args.dtype)

    shapes = read_key_list(args.keys)
    work = Path(tempfile.mkdtemp(prefix="cdv2_bench_", dir=args.tmp))
    try:
        ckpt = work / "v2-full-random.safetensors"
        t0 = time.perf_counter()
        size = write_random_checkpoint(ckpt, shapes)
        print(f"wrote {ckpt} ({len(shapes)} keys, {size / 1e9:.3f} GB) in {time.perf_counter() - t0:.1f} s")
        results = {}
        for task in ("convert", "convert_save"):
            rss, wall = run_child(task, ckpt, work / "weights", args)
            results[task] = (rss, wall)
            print(f"{task:13s} peak RSS {rss:6.2f} GB = {rss * 1e9 / size:.2f}x the checkpoint; "
                  f"wall {wall:6.1f} s (incl. interpreter start)")
        out_size = sum(p.stat().st_size for p in (work / "weights").iterdir())
        print(f"weights dir: {out_size / 1e9:.3f} GB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"deleted {work}")


if __name__ == "__main__":
    main()
