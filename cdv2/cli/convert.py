"""Convert the authors' torch checkpoint (+ open_clip's CLIP file) into a cdv2 weights directory.

    cdv2 convert --checkpoint v2-full.safetensors \
        [--clip open_clip_pytorch_model.bin] --config v2 --out weights/v2
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

from cdv2.config import load_model_config
from cdv2.weights.v2_checkpoint import GROUPS, convert_v2_checkpoint
from cdv2.weights.weights_dir import save_weights_dir

KNOWN_EXTRAS = ("cond_stage_model.", "model_ema.")


def expected_param_shapes(cfg, groups):
    """The model's param shapes for `groups` (no memory allocated), or None when the model code
    cannot build them (then only the key table is checked)."""
    try:
        from cdv2.model import param_shapes
        return param_shapes(cfg, groups=tuple(groups))
    except ImportError as e:
        warnings.warn(f"cdv2.model cannot build the param shapes ({e}); shapes are not validated")
        return None


def convert_clip(path, cfg):
    import numpy as np

    from cdv2.weights.open_clip import load_open_clip_params  # validates against cfg.clip

    params = load_open_clip_params(path, config=cfg.clip)
    return map_leaves(lambda a: np.asarray(a, np.float32), params)


def map_leaves(fn, tree):
    return {k: map_leaves(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the authors' .safetensors/.ckpt/.pth")
    ap.add_argument("--clip", help="open_clip ViT-H-14 weights (open_clip_pytorch_model.bin)")
    ap.add_argument("--config", default="v2", help="model config name (configs/NAME.yaml) or path")
    ap.add_argument("--out", required=True, help="cdv2 weights directory to create")
    ap.add_argument("--overwrite", action="store_true", help="replace the weight files in a non-empty --out")
    ap.add_argument("--allow-unexpected", action="append", metavar="PREFIX",
                    help=f"skip unknown keys under PREFIX with a warning (default: {' '.join(KNOWN_EXTRAS)})")
    ap.add_argument("--strict", action="store_true", help="fail on every unknown key")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    progress = not args.no_progress
    allow = () if args.strict else tuple(args.allow_unexpected or KNOWN_EXTRAS)
    try:
        t0 = time.perf_counter()
        cfg = load_model_config(args.config)
        expected = expected_param_shapes(cfg, [g for _, g in GROUPS])
        params, source_dtypes = convert_v2_checkpoint(args.checkpoint, expected, progress=progress,
                                                      allow_unexpected_prefixes=allow,
                                                      schedule=cfg.schedule)
        sources = [str(args.checkpoint)]
        if args.clip:
            params["clip"] = convert_clip(args.clip, cfg)
            sources.append(str(args.clip))
        out = save_weights_dir(args.out, params, cfg, source_dtypes, source=" + ".join(sources),
                               overwrite=args.overwrite, progress=progress)
    except (OSError, ValueError, TypeError) as e:  # bad input: say what, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    dtypes = sorted(set(source_dtypes.values()))
    print(f"converted {len(source_dtypes)} tensors from {args.checkpoint} (source dtypes: "
          f"{', '.join(dtypes)}; groups: {', '.join(params)}; config '{cfg.name}'; shapes "
          f"{'validated' if expected is not None else 'NOT validated'})")
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
