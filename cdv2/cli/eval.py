"""`python -m cdv2.eval`: the paper's §5 metrics (cdv2.eval.protocol) for cdv2 models and baselines.

    python -m cdv2.eval                                   # built-in demo model vs baselines, 200 synthetic
    python -m cdv2.eval --weights stage1=RUN/weights_stage1 --weights builtin --baselines untrained,flat \
        --inception pt_inception-2015-12-05-6726825d.pth --num 500 --out eval-out
    python -m cdv2.eval --weights weights/v2 --data VALSET --size 768 --modes vanilla,full --inception ...

Data: held-out synthetic scenes (default) or --data ROOT with color/ and sketch/ images of the same
names. Baselines: `untrained` (the first model's architecture, VAE and CLIP with a fresh U-Net and
sketch encoder), `flat` (every pixel the reference's mean colour, the sketch's lines drawn on top).
FID needs --inception (pytorch-fid's weights file; nothing is downloaded). The models' images are
generated --batch-size at a time in one jitted call split over all local devices (cdv2.sample.batch).
Writes OUT/results.json, OUT/results.md and OUT/results.png.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m cdv2.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", action="append", metavar="[NAME=]DIR",
                    help="a cdv2 weights directory (repeatable; 'builtin' = the built-in demo model; default builtin)")
    ap.add_argument("--baselines", default="untrained,flat", help="comma list of untrained, flat (or '')")
    ap.add_argument("--modes", default="vanilla", help="comma list of vanilla, style, background, full")
    ap.add_argument("--data", default=None, help="ROOT with color/ and sketch/ (default: synthetic scenes)")
    ap.add_argument("--num", type=int, default=200, help="samples")
    ap.add_argument("--size", type=int, default=64, help="image side (pixels, multiple of 64)")
    ap.add_argument("--inception", default=None, help="pytorch-fid's pt_inception-2015-12-05 weights (for FID)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reference-guidance", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="images per device call, a multiple of the local device count (default 8 rounded up to one)")
    ap.add_argument("--out", default="eval-out")
    return ap


def colorizer_fn(col, steps: int, guidance: float, batch_size=None):
    """A chunk generator: the images of a chunk in batches through `cdv2.sample.batch` (all local
    devices, `batch_size` images per call)."""
    from cdv2.sample.batch import BatchColorizer, Request
    from cdv2.sample.preprocess import to_uint8

    batch = BatchColorizer(col, batch_size=batch_size)

    def fn(sketches, references, *, mode, seeds, reference_masks):
        # a known reference mask (synthetic data) instead of the estimate, in the modes that use one
        reqs = [Request(s, r, seed=sd, reference_mask=None if m is None or mode == "vanilla" else Image.fromarray(m))
                for s, r, sd, m in zip(sketches, references, seeds, reference_masks)]
        return to_uint8(batch.colorize(reqs, mode=mode, steps=steps, size=sketches[0].shape[:2],
                                       reference_guidance=guidance, sketch_polarity="black_on_white"))
    fn.batch_size = batch.batch_size
    return fn


def flat_fill(sketch, reference, *, mode, seed, reference_mask=None):
    """Baseline: the reference's mean colour everywhere, the sketch's (dark) lines kept."""
    mean = np.asarray(reference, np.float64).reshape(-1, 3).mean(0)
    lines = np.asarray(sketch).mean(-1, keepdims=True) < 128
    return np.where(lines, np.asarray(sketch), np.round(mean)).astype(np.uint8)


def untrained_colorizer(params, cfg, seed: int = 0):
    import jax

    from cdv2.model import init_params
    from cdv2.sample.colorizer import Colorizer

    fresh = jax.tree_util.tree_map(np.asarray, init_params(cfg, jax.random.PRNGKey(seed + 1)))
    fresh["vae"], fresh["clip"] = params["vae"], params["clip"]
    return Colorizer(fresh, cfg)


def clip_embedder(params, cfg):
    """Image embeddings (CLS after ln_post + proj) of cdv2's CLIP ViT, images uint8 NHWC."""
    import jax
    import jax.numpy as jnp

    from cdv2.modules.clip import VisionTransformer, preprocess_for_clip

    net = VisionTransformer(cfg.clip)
    fn = jax.jit(lambda p, x: net.apply({"params": p}, preprocess_for_clip(x, cfg.clip.image_size), full=True)[:, 0])
    p = jax.tree_util.tree_map(jnp.asarray, params["clip"])
    return lambda imgs: np.concatenate([np.asarray(fn(p, np.asarray(imgs[i:i + 32], np.float32) / 127.5 - 1.0))
                                        for i in range(0, len(imgs), 32)])


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    from cdv2.demo import DEMO_WEIGHTS, enable_compilation_cache
    from cdv2.eval import protocol
    from cdv2.eval.report import markdown_table, write_report
    from cdv2.sample.colorizer import Colorizer
    from cdv2.weights.pretrained import load_pretrained

    if args.size % 64:
        raise ValueError(f"--size must be a multiple of 64, got {args.size}")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in ("vanilla", "style", "background", "full")]
    if bad:
        raise ValueError(f"unknown modes {bad}")
    baselines = [b for b in args.baselines.split(",") if b]
    if set(baselines) - {"untrained", "flat"}:
        raise ValueError(f"unknown baselines {sorted(set(baselines) - {'untrained', 'flat'})}")
    enable_compilation_cache()
    inception = None
    if args.inception:
        from cdv2.eval.fid import InceptionFeatures, load_inception_params

        inception = InceptionFeatures(load_inception_params(args.inception))
    else:
        print("note: no --inception weights given: FID is skipped", flush=True)
    items = (protocol.folder_items(args.data, args.num, args.size, args.seed) if args.data
             else protocol.synthetic_items(args.num, args.size, args.seed))
    models = []
    for spec in args.weights or ["builtin"]:
        name, _, path = spec.rpartition("=")
        path = str(DEMO_WEIGHTS) if path == "builtin" else path
        params, cfg = load_pretrained(path)
        models.append((name or ("builtin" if path == str(DEMO_WEIGHTS) else path), params, cfg))
    clip_embed = clip_embedder(models[0][1], models[0][2])
    gens = [(name, colorizer_fn(Colorizer(p, c), args.steps, args.reference_guidance, args.batch_size))
            for name, p, c in models]
    if "untrained" in baselines:
        col = untrained_colorizer(models[0][1], models[0][2], args.seed)
        gens.append(("untrained", colorizer_fn(col, args.steps, args.reference_guidance, args.batch_size)))
    if "flat" in baselines:
        gens.append(("flat mean colour", protocol.one_at_a_time(flat_fill)))
    # chunks of whole batches: only the last batch of a mode is padded
    results = {name: protocol.evaluate(fn, items, modes=modes if name != "flat mean colour" else ["vanilla"],
                                       seed=args.seed, inception=inception, clip_embed=clip_embed, name=name,
                                       chunk=4 * getattr(fn, "batch_size", 8))
               for name, fn in gens}
    files = write_report(results, args.out, meta={k: v for k, v in vars(args).items()})
    print(markdown_table(results))
    print(f"wrote {files['json']}, {files['markdown']}, {files['chart']}")
    return 0
