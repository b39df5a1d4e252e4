"""Convert the authors' checkpoint (+ open_clip's CLIP file, unless the checkpoint holds the CLIP
towers itself) into a cdv2 weights directory. Reads .safetensors and torch .ckpt/.pth/.pt/.bin
files without torch.

    cdv2 convert --checkpoint v2-full.safetensors --clip open_clip_pytorch_model.bin --out weights/v2
    cdv2 convert --checkpoint single_file_with_clip.safetensors --config tiny_v2 --out weights/tiny

The app's mask and line networks (see cdv2/weights/preprocessors_dir.py) go to their own directory:

    cdv2 convert --preprocessor isnet-sketch sketch-segment.safetensors --out weights/preprocessors
    cdv2 convert --preprocessors-from colorizeDiffusion/preprocessor/weights --out weights/preprocessors
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

PROG = "cdv2 convert"


def expected_param_shapes(cfg, groups):
    """The model's param shapes for `groups` (no memory allocated), or None when the model code
    cannot build them (then only the key table is checked)."""
    try:
        from cdv2.weights.pretrained import model_param_shapes
        return model_param_shapes(cfg, tuple(groups))
    except ImportError as e:
        warnings.warn(f"cdv2.model cannot build the param shapes ({e}); shapes are not validated")
        return None


def build_parser() -> argparse.ArgumentParser:
    from cdv2.weights.v2_checkpoint import KNOWN_EXTRA_PREFIXES

    ap = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", metavar="FILE",
                    help="the authors' checkpoint (.safetensors, .ckpt, .pth, .pt or .bin)")
    ap.add_argument("--clip", metavar="FILE",
                    help="open_clip ViT-H-14 image-tower weights (open_clip_pytorch_model.bin or "
                         ".safetensors); not needed when --checkpoint holds cond_stage_model.visual.*")
    ap.add_argument("--config", default="v2", metavar="NAME",
                    help="model config: a name in cdv2/configs (v2, tiny, tiny_v2, ...) or a .yaml "
                         "path (default: v2)")
    ap.add_argument("--out", required=True, metavar="DIR", help="cdv2 weights directory to create")
    ap.add_argument("--dtype", default="float32",
                    help="dtype the weights are stored in: float32 (default), bfloat16, float16, or "
                         "'source' to keep each tensor's dtype from the checkpoint")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the weight files in a non-empty --out (other files are kept)")
    ap.add_argument("--allow-unexpected", action="append", metavar="PREFIX",
                    help="skip unknown keys under PREFIX with a warning; repeatable (default: "
                         f"{' '.join(KNOWN_EXTRA_PREFIXES)})")
    ap.add_argument("--strict", action="store_true", help="fail on every unknown key")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--preprocessor", nargs=2, action="append", metavar=("NAME", "FILE"),
                    help="convert one of the app's preprocessor networks (repeatable): NAME in isnet, "
                         "isnet-sketch, rmbg-v2, lineart_keras, lineart, lineart_denoise, lineart_sk")
    ap.add_argument("--preprocessors-from", metavar="FOLDER",
                    help="convert every known network file in the app's preprocessor/weights FOLDER")
    return ap


def _convert_preprocessors(args) -> int:
    """--preprocessor / --preprocessors-from: one line per network, one line per error."""
    from cdv2.weights import preprocessors_dir as ppd
    from cdv2.weights.dtypes import resolve_dtype

    dtype = None if args.dtype == "source" else resolve_dtype(args.dtype)
    try:
        jobs = [(ppd.spec(n).name, Path(f)) for n, f in args.preprocessor or []]
        if args.preprocessors_from:
            found = ppd.find_app_weights(args.preprocessors_from, required=True)
            jobs += [j for j in found.items() if j[0] not in dict(jobs)]
        for name, file in jobs:
            sub = ppd.convert_preprocessor(name, file, args.out, dtype=dtype, overwrite=args.overwrite)
            print(f"{name}: {file} -> {sub} ({ppd.read_num_params(sub):,} params)")
    except (OSError, ValueError, TypeError) as e:  # bad input: say what, on one line, no traceback
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1
    return 0


def _check_out(out: Path, overwrite: bool) -> None:
    """Fail before the (long) conversion when the result could not be written."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; pass --overwrite to replace its "
                              f"weight files (other files are kept)")


def _convert(args):
    from cdv2.config import load_model_config
    from cdv2.weights.dtypes import cast_floating, resolve_dtype
    from cdv2.weights.mismatch import CheckpointMismatchError
    from cdv2.weights.open_clip import load_open_clip_params
    from cdv2.weights.pretrained import config_hint, suggest_config
    from cdv2.weights.tree import map_leaves
    from cdv2.weights.v2_checkpoint import GROUPS, KNOWN_EXTRA_PREFIXES, convert_v2_checkpoint
    from cdv2.weights.weights_dir import save_weights_dir

    progress = not args.no_progress
    allow = () if args.strict else tuple(args.allow_unexpected or KNOWN_EXTRA_PREFIXES)
    dtype = None if args.dtype == "source" else resolve_dtype(args.dtype)
    if args.clip and not Path(args.clip).is_file():
        raise FileNotFoundError(f"--clip {args.clip}: file not found")
    cfg = load_model_config(args.config)
    expected = expected_param_shapes(cfg, [g for _, g in GROUPS])
    try:
        params, source_dtypes = convert_v2_checkpoint(args.checkpoint, expected, progress=progress,
                                                      allow_unexpected_prefixes=allow, schedule=cfg.schedule,
                                                      dtype=dtype, text_config=cfg.clip_text)
    except CheckpointMismatchError as e:
        fit = suggest_config(args.checkpoint, exclude=cfg.name)
        raise (e.with_hint(config_hint(fit)) if fit else e) from None
    sources = [str(args.checkpoint)]
    if args.clip:
        params["clip"] = map_leaves(lambda a: cast_floating(a, dtype), load_open_clip_params(args.clip, cfg.clip))
        sources.append(str(args.clip))
    elif "clip" not in params:
        print("note: no CLIP image tower in --checkpoint and no --clip: colorizing with this weights "
              "directory will need --clip FILE", file=sys.stderr)
    out = save_weights_dir(args.out, params, cfg, source_dtypes, source=" + ".join(sources),
                           overwrite=args.overwrite, progress=progress)
    return cfg, params, source_dtypes, expected, out


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.preprocessor or args.preprocessors_from:
        if args.checkpoint or args.clip:
            ap.error("--preprocessor/--preprocessors-from convert to their own --out; run --checkpoint separately")
        return _convert_preprocessors(args)
    if not args.checkpoint:
        ap.error("--checkpoint is required (or --preprocessor NAME FILE / --preprocessors-from FOLDER)")
    t0 = time.perf_counter()
    try:
        _check_out(Path(args.out), args.overwrite)
        cfg, params, source_dtypes, expected, out = _convert(args)
    except (OSError, ValueError, TypeError) as e:  # bad input: say what, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    dtypes = sorted(set(source_dtypes.values()))
    print(f"converted {len(source_dtypes)} tensors from {args.checkpoint} (source dtypes: "
          f"{', '.join(dtypes)}; stored as {args.dtype}; groups: {', '.join(params)}; config "
          f"'{cfg.name}'; shapes {'validated' if expected is not None else 'NOT validated'})")
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
