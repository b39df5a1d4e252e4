"""`cdv2 colorize`: one sketch + one reference -> PNG(s); with no arguments, the built-in demo."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("colorize", help="colorize a sketch after a reference image",
                       description="Colorize a sketch after a reference image with the authors' weights.")
    p.add_argument("--weights", help="cdv2 weights directory, or the authors' v2-full.safetensors (with --clip)")
    p.add_argument("--clip", help="open_clip ViT-H-14 weights, when --weights is the authors' file")
    p.add_argument("--config", default=None, help="model config for an authors' file (default v2)")
    p.add_argument("--sketch", help="the line drawing to colorize")
    p.add_argument("--reference", help="the colour reference image")
    p.add_argument("--background", help="replace the background with this image (background modes)")
    p.add_argument("--sketch-mask", help="character mask of the sketch (white = character); estimated if absent")
    p.add_argument("--reference-mask", help="character mask of the reference; from alpha or estimated if absent")
    p.add_argument("--mode", default="full", choices=["vanilla", "style", "background", "full"],
                   help="vanilla: reference only; style: + style modulation; background: + background "
                   "injection and split cross-attention; full: both (the app's default)")
    p.add_argument("--out", help="output PNG (with --num-images > 1: NAME_0.png, NAME_1.png, ...)")
    p.add_argument("--demo-out", default="cdv2-demo", help="folder of the built-in demo (run when no weights "
                   "and no inputs are given)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--sampler", default="dpmpp_2m", choices=["dpmpp_2m", "euler", "ddim"], help="sampler")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (dpmpp_2m)")
    p.add_argument("--reference-guidance", type=float, default=4.0,
                   help="classifier-free guidance scale of the reference (1 = off)")
    p.add_argument("--sketch-guidance", type=float, default=1.0,
                   help="classifier-free guidance scale of the sketch (1 = off)")
    p.add_argument("--reference-strength", type=float, default=1.0,
                   help="scale of the reference cross-attention in every layer")
    p.add_argument("--fg-strength", type=float, default=1.0, help="foreground (character) attention strength")
    p.add_argument("--bg-strength", type=float, default=1.0,
                   help="background strength: scales the background-encoder features")
    p.add_argument("--merge-scale", type=float, default=0.0,
                   help="how much of the background's style/attention is mixed into the foreground")
    p.add_argument("--sketch-strength", type=float, default=1.0, help="scale of the sketch-encoder hints")
    p.add_argument("--sketch-mask-threshold", type=float, default=0.05,
                   help="sketch-mask values above this count as character (split attention)")
    p.add_argument("--reference-mask-threshold", type=float, default=0.5,
                   help="reference-mask values below this count as background")
    p.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    p.add_argument("--num-images", type=int, default=1, help="images per sketch (batch)")
    p.add_argument("--long-side", type=int, default=768, help="generation size of the longer side (pixels)")
    p.add_argument("--polarity", default="auto", choices=["auto", "black_on_white", "white_on_black"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype (bfloat16: faster on GPU/TPU; softmax and norms stay fp32)")
    p.add_argument("--no-crop", action="store_true", help="keep the padding around the sketch")
    return p


def _output_paths(out: str, n: int, overwrite: bool) -> list[Path]:
    out = Path(out)
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(n)]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass --overwrite)")
    return paths


def _check_inputs_exist(args) -> None:
    for flag in ("weights", "clip", "sketch", "reference", "background", "sketch_mask", "reference_mask"):
        value = getattr(args, flag, None)
        if value and not Path(value).exists():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {value}: no such file or directory")


def run(args) -> int:
    from cdv2.weights.pretrained import HOW_TO_GET_WEIGHTS

    missing = [f"--{f}" for f in ("sketch", "reference", "out") if not getattr(args, f)]
    if not args.weights and len(missing) == 3:  # nothing given at all: the built-in demo
        print("no --weights given: running the built-in demo (a tiny model trained here on synthetic data).\n"
              "To colorize your own sketches with the authors' model:\n" + HOW_TO_GET_WEIGHTS + "\n", flush=True)
        from cdv2.demo import demo_parser, run_demo

        run_demo(demo_parser().parse_args(["--out", args.demo_out, "--seed", str(args.seed)]))
        return 0
    if not args.weights:
        print("error: no weights given (--weights).\n\n" + HOW_TO_GET_WEIGHTS
              + "\n\n`cdv2 colorize` with no arguments (or `cdv2 demo`) runs the built-in demo instead.",
              file=sys.stderr)
        return 2
    if missing:
        raise ValueError(f"colorizing needs {', '.join(missing)}")
    _check_inputs_exist(args)  # before the (slow) weight loading and compilation
    paths = _output_paths(args.out, args.num_images, args.overwrite)
    from cdv2.sample.colorizer import Colorizer

    col = Colorizer.from_pretrained(args.weights, clip=args.clip, config=args.config, dtype=args.dtype)
    images = col.colorize(
        args.sketch, args.reference, mode=args.mode, background=args.background, sketch_mask=args.sketch_mask,
        reference_mask=args.reference_mask, steps=args.steps, sampler=args.sampler, karras=args.karras,
        reference_guidance=args.reference_guidance, sketch_guidance=args.sketch_guidance,
        reference_strength=args.reference_strength, fg_strength=args.fg_strength, bg_strength=args.bg_strength,
        merge_scale=args.merge_scale, sketch_strength=args.sketch_strength,
        sketch_mask_threshold=args.sketch_mask_threshold, reference_mask_threshold=args.reference_mask_threshold,
        seed=args.seed, num_images=args.num_images, long_side=args.long_side, crop=not args.no_crop,
        sketch_polarity=args.polarity, progress=True)
    for img, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        print(f"wrote {path}")
    return 0
