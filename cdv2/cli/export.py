"""Export a cdv2 weights directory back to the authors' safetensors format (their keys, torch
shapes, the 12 schedule buffers; dtypes as in the converted source, else fp32 with an fp16 VAE).
The CLIP towers are not part of the authors' released file and are left out.

    cdv2 export --weights weights/v2 --out v2-full.safetensors
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROG = "cdv2 export"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, metavar="DIR",
                    help="cdv2 weights directory (written by `cdv2 convert` or training's export)")
    ap.add_argument("--out", required=True, metavar="FILE", help="safetensors file to write")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ap.add_argument("--vae-fp32", action="store_true",
                    help="write the VAE in fp32 where the source dtype is unknown (released: fp16)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
        from cdv2.weights.v2_checkpoint import export_v2_checkpoint
        from cdv2.weights.weights_dir import load_weights_dir, read_manifest

        t0 = time.perf_counter()
        source_dtypes = read_manifest(args.weights).get("source_dtypes") or None
        params, cfg = load_weights_dir(args.weights, dtype=None)  # keep stored dtypes
        export_v2_checkpoint(params, out, source_dtypes=source_dtypes, vae_fp16=not args.vae_fp32,
                             schedule=cfg.schedule, progress=not args.no_progress)
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.weights} (config '{cfg.name}', dtypes "
          f"{'from the manifest' if source_dtypes else 'as released'}) to {out} "
          f"({out.stat().st_size / 1e9:.3f} GB) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
