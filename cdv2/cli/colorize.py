"""`cdv2 colorize`: one sketch + one reference -> PNG(s); with no arguments, the built-in demo."""
from __future__ import annotations

import sys
from pathlib import Path


def _float_list(n: int):
    def parse(text: str) -> list[float]:
        values = [float(v) for v in text.replace(",", " ").split()]
        if len(values) != n:
            raise ValueError(f"expected {n} numbers, got {len(values)}")
        return values
    parse.__name__ = f"{n} numbers"
    return parse


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def add_parser(sub):
    p = sub.add_parser("colorize", help="colorize a sketch after a reference image",
                       description="Colorize a sketch after a reference image with the authors' weights "
                       "(every control of the authors' app; defaults as there unless said).")
    io = p.add_argument_group("weights, images and output")
    io.add_argument("--weights", help="cdv2 weights directory, or the authors' checkpoint file")
    io.add_argument("--clip", help="open_clip ViT-H-14 file, when the checkpoint has no CLIP inside")
    io.add_argument("--config", default=None, help="model config for an authors' file (default v2)")
    io.add_argument("--preprocessors", help="converted mask/line networks (cdv2 convert --preprocessor); "
                    "without them masks are estimated (see docs/DIFFERENCES.md)")
    io.add_argument("--sketch", help="the line drawing to colorize")
    io.add_argument("--reference", help="the colour reference image")
    io.add_argument("--background", help="replace the background with this image (background modes)")
    io.add_argument("--sketch-mask", help="character mask of the sketch (white = character); from the "
                    "sketch-mask network or estimated if absent")
    io.add_argument("--reference-mask", help="character mask of the reference image; else --mask-extractor")
    io.add_argument("--background-mask", help="character mask of the background image (with --remove-fg)")
    io.add_argument("--out", help="output PNG (with --num-images > 1: NAME_0.png, NAME_1.png, ...)")
    io.add_argument("--overwrite", action="store_true", help="replace existing output files")
    io.add_argument("--demo-out", default="cdv2-demo", help="folder of the built-in demo (run when no weights "
                    "and no inputs are given)")
    io.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                    help="compute dtype (bfloat16: faster on GPU/TPU, weights loaded in bf16, softmax and "
                    "norms stay fp32; auto: bf16 on GPU/TPU, fp32 on CPU)")
    io.add_argument("--no-compile-cache", action="store_true",
                    help="do not use the persistent XLA compilation cache (~/.cache/cdv2/xla)")

    m = p.add_argument_group("modes")
    m.add_argument("--mode", default="full", choices=["vanilla", "style", "background", "foreground", "full"],
                   help="shorthand for the mode flags: style = style enhance, background = BG enhance, "
                   "foreground = FG enhance, full = style + BG (default here; the app starts with none)")
    m.add_argument("--style-enhance", action="store_true", default=None, help="style modulation (app: Style enhance)")
    m.add_argument("--bg-enhance", action="store_true", default=None, help="app: BG enhance (mask guided)")
    m.add_argument("--fg-enhance", action="store_true", default=None, help="app: FG enhance (mask guided)")
    m.add_argument("--injection", action="store_true", default=None, help="app: Attention injection")
    m.add_argument("--injection-fidelity", type=float, default=0.5, help="injection fidelity (reference), 0-1")
    m.add_argument("--injection-sketch-fidelity", type=float, default=0.0, help="injection fidelity (sketch), 0-2")
    m.add_argument("--injection-start-step", type=float, default=0.0, help="injection start step, 0-1")

    g = p.add_argument_group("guidance and strengths")
    g.add_argument("--reference-guidance", type=float, default=4.0,
                   help="classifier-free guidance scale of the reference, 1-15 (1 = off)")
    g.add_argument("--sketch-guidance", type=float, default=1.0,
                   help="classifier-free guidance scale of the sketch, 1-5 (1 = off)")
    g.add_argument("--reference-strength", type=float, default=1.0, help="scale of every reference cross-attention")
    g.add_argument("--fg-strength", type=float, default=1.0, help="foreground (character) attention strength")
    g.add_argument("--bg-strength", type=float, default=1.0, help="background attention strength")
    g.add_argument("--sketch-strength", type=float, default=1.0, help="scale of the sketch-encoder hints, 0-3")
    g.add_argument("--background-factor", type=float, default=1.0, help="scale of the background-encoder features")
    g.add_argument("--merge-scale", type=float, default=0.0,
                   help="how much of the background's style/attention is mixed into the foreground")
    g.add_argument("--encoder-scale", type=float, default=1.0, help="app: Encoder crossattn scale")
    g.add_argument("--middle-scale", type=float, default=1.0, help="app: Color crossattn scale")
    g.add_argument("--low-scale", type=float, default=1.0, help="app: Semantics crossattn scale")
    g.add_argument("--per-layer-scales", type=_float_list(16), help="16 per-layer cross-attention scales "
                   "(the app's accurate control), e.g. '1 1 1 1 1 1 1 0.5 0.5 ...'")
    g.add_argument("--authors-layer-mapping", action="store_true",
                   help="apply the scales exactly as the authors' app does (its off-by-one included)")
    g.add_argument("--guidance-start", type=float, default=0.0, help="guidance start step, 0-1")
    g.add_argument("--guidance-end", type=float, default=1.0, help="guidance end step, 0-1")
    g.add_argument("--no-guidance-start", type=float, default=-0.05, help="no-guidance window start, -0.05-1")
    g.add_argument("--no-guidance-end", type=float, default=-0.05, help="no-guidance window end, -0.05-1")
    g.add_argument("--sketch-mask-threshold", type=float, default=0.05,
                   help="sketch-mask values above this count as character (split attention)")
    g.add_argument("--reference-mask-threshold", type=float, default=0.5,
                   help="reference-mask values below this count as background")
    g.add_argument("--reference-padding-scale", type=float, default=1.0, help="pad the reference, 1-2")

    t = p.add_argument_group("text manipulation (needs the CLIP text tower)")
    t.add_argument("--prompt", default="", help="manipulations, one per line, in the authors' syntax")
    t.add_argument("--target-prompt", default="", help="target prompt")
    t.add_argument("--anchor-prompt", default="", help="anchor prompt")
    t.add_argument("--control-prompt", default="", help="control prompt")
    t.add_argument("--target-scale", type=float, default=0.0, help="target scale, 0-15 (0 = off)")
    t.add_argument("--thresholds", type=_float_list(4), default=(0.5, 0.55, 0.65, 0.95),
                   help="the four manipulation thresholds")
    t.add_argument("--enhance-manipulation", action="store_true", help="app: Enhance manipulation")

    r = p.add_argument_group("sampling and preprocessing")
    r.add_argument("--steps", type=int, default=20, help="denoising steps, 1-100")
    r.add_argument("--sampler", default="diffuser_dpm", help="the app's sampler names: diffuser_dpm (default), "
                   "diffuser_ddim, diffuser_pndm, diffuser_lms, 'Euler', 'Euler a', 'Heun', 'DPM2', 'DPM2 a', "
                   "'LMS', 'DPM fast', 'DPM++ 2S a', 'DPM++ SDE', 'DPM++ 2M', 'DPM++ 2M SDE', "
                   "'DPM++ 2M SDE Heun', 'DPM++ 3M SDE'")
    r.add_argument("--schedule", default="Automatic", help="Automatic, Uniform, Karras, Exponential, "
                   "Polyexponential or 'SGM Uniform'")
    r.add_argument("--karras", action="store_true", help="same as --schedule Karras")
    r.add_argument("--seed", type=int, default=0, help="random seed (-1 = random)")
    r.add_argument("--num-images", type=int, default=1, help="images per sketch (batch), 1-8")
    r.add_argument("--deterministic-batch-seed", action="store_true", help="same sampler noise for every image")
    r.add_argument("--posterior", default="sample", choices=["sample", "mean"],
                   help="VAE posterior of the reference/background latents (the authors sample)")
    r.add_argument("--size", type=_size, help="generation size HxW in pixels, multiples of 64 (else from "
                   "--long-side and the sketch's aspect)")
    r.add_argument("--long-side", type=int, default=768, help="generation size of the longer side (pixels)")
    r.add_argument("--sketch-preprocessor", default=None, choices=["none", "extract", "invert", "invert-webui"],
                   help="none/invert: the sketch's polarity as given; extract: run a line extractor "
                   "(default: polarity detected)")
    r.add_argument("--line-extractor", default="lineart_keras",
                   choices=["lineart_keras", "lineart", "lineart_denoise", "lineart_sk"], help="for extract")
    r.add_argument("--mask-extractor", default="rmbg-v2", choices=["rmbg-v2", "isnet", "estimate"],
                   help="reference-mask network when no --reference-mask is given")
    r.add_argument("--polarity", default="auto", choices=["auto", "black_on_white", "white_on_black"],
                   help="line polarity of the sketch (auto: detected)")
    r.add_argument("--no-crop", action="store_true", help="keep the padding around the sketch (the result is "
                   "cropped back to the sketch's box by default; the app's 'Crop result' starts off)")
    r.add_argument("--remove-fg", action="store_true", help="app: Remove foreground in background input")
    r.add_argument("--rmbg", action="store_true", help="app: Remove background in result")
    return p


def _output_paths(out: str, n: int, overwrite: bool) -> list[Path]:
    out = Path(out)
    paths = [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(n)]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass --overwrite)")
    return paths


def _check_inputs_exist(args) -> None:
    for flag in ("weights", "clip", "preprocessors", "sketch", "reference", "background", "sketch_mask",
                 "reference_mask", "background_mask"):
        value = getattr(args, flag, None)
        if value and not Path(value).exists():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {value}: no such file or directory")


def colorize_kwargs(args) -> dict:
    """`Colorizer.colorize` keywords of the parsed flags (the flags are named after them)."""
    return dict(
        mode=args.mode, style_enhance=args.style_enhance, background_enhance=args.bg_enhance,
        foreground_enhance=args.fg_enhance, attention_injection=args.injection, background=args.background,
        sketch_mask=args.sketch_mask, reference_mask=args.reference_mask or args.mask_extractor,
        background_mask=args.background_mask, steps=args.steps, sampler=args.sampler,
        schedule="Karras" if args.karras else args.schedule, reference_guidance=args.reference_guidance,
        sketch_guidance=args.sketch_guidance, reference_strength=args.reference_strength,
        encoder_scale=args.encoder_scale, middle_scale=args.middle_scale, low_scale=args.low_scale,
        per_layer_scales=args.per_layer_scales, authors_layer_mapping=args.authors_layer_mapping,
        fg_strength=args.fg_strength, bg_strength=args.bg_strength, merge_scale=args.merge_scale,
        sketch_strength=args.sketch_strength, background_factor=args.background_factor,
        sketch_mask_threshold=args.sketch_mask_threshold, reference_mask_threshold=args.reference_mask_threshold,
        reference_padding_scale=args.reference_padding_scale, guidance_start_step=args.guidance_start,
        guidance_end_step=args.guidance_end, no_guidance_start_step=args.no_guidance_start,
        no_guidance_end_step=args.no_guidance_end, crop=not args.no_crop,
        remove_foreground_in_background=args.remove_fg, remove_background_in_result=args.rmbg,
        injection_fidelity=args.injection_fidelity, injection_sketch_fidelity=args.injection_sketch_fidelity,
        injection_start_step=args.injection_start_step, prompt=args.prompt, target_prompt=args.target_prompt,
        anchor_prompt=args.anchor_prompt, control_prompt=args.control_prompt, target_scale=args.target_scale,
        thresholds=tuple(args.thresholds), enhance_manipulation=args.enhance_manipulation,
        sketch_preprocessor=args.sketch_preprocessor, line_extractor=args.line_extractor, seed=args.seed,
        num_images=args.num_images, deterministic_batch_seed=args.deterministic_batch_seed,
        posterior=args.posterior, size=args.size, long_side=args.long_side, sketch_polarity=args.polarity)


def run(args) -> int:
    from cdv2.weights.pretrained import HOW_TO_GET_WEIGHTS

    missing = [f"--{f}" for f in ("sketch", "reference", "out") if not getattr(args, f)]
    if not args.weights and len(missing) == 3:  # nothing given at all: the built-in demo
        print("no --weights given: running the built-in demo (a tiny model trained here on synthetic data).\n"
              "To colorize your own sketches with the authors' model:\n" + HOW_TO_GET_WEIGHTS + "\n", flush=True)
        from cdv2.cli.demo import build_parser
        from cdv2.demo import run_demo

        run_demo(build_parser().parse_args(["--out", args.demo_out, "--seed", str(args.seed)]))
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
    if not args.no_compile_cache:
        from cdv2.sample import compile_cache

        compile_cache.enable()
    from cdv2.sample.colorizer import Colorizer

    col = Colorizer.from_pretrained(args.weights, clip=args.clip, config=args.config, dtype=args.dtype,
                                    preprocessors=args.preprocessors)
    images = col.colorize(args.sketch, args.reference, progress=True, **colorize_kwargs(args))
    print(f"seed {col.last_seed}")
    for img, path in zip(images, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        print(f"wrote {path}")
    return 0
