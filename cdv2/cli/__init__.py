"""Thin command-line entry points: `cdv2 colorize | convert | export | demo | train | app | eval`
(`python -m cdv2.train` is `cdv2 train`). Each subcommand lives in its own module here and only
calls public APIs; heavy imports (jax) happen after argument parsing."""
from __future__ import annotations

import argparse
import sys

from cdv2.cli import colorize


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cdv2", description="ColorizeDiffusion v2 in JAX/Flax")
    sub = ap.add_subparsers(dest="command", required=True)
    colorize.add_parser(sub)
    for name, help_ in (("convert", "authors' torch checkpoint (+ open_clip) -> cdv2 weights directory"),
                        ("export", "cdv2 weights directory -> authors' safetensors"),
                        ("demo", "no weights needed: train a tiny model on synthetic data, colorize with it"),
                        ("train", "train a stage (python -m cdv2.train)"),
                        ("app", "the colorization UI in a browser (needs the `app` extra)"),
                        ("eval", "the paper's evaluation: PSNR, MS-SSIM, CLIP similarity, FID (python -m cdv2.eval)")):
        sub.add_parser(name, help=help_, add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.command == "convert":
        from cdv2.cli.convert import main as convert_main

        return convert_main(rest)
    if args.command == "export":
        from cdv2.cli.export import main as export_main

        return export_main(rest)
    if args.command == "demo":
        from cdv2.demo import main as demo_main

        return demo_main(rest)
    if args.command == "eval":
        from cdv2.cli.eval import main as eval_main

        return eval_main(rest)
    if args.command == "app":
        from cdv2.cli.app import main as app_main

        return app_main(rest)
    if args.command == "train":
        from cdv2.cli.train import main as train_main

        return train_main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return colorize.run(args)
    except (OSError, ValueError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
