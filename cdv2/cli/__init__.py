"""Thin command-line entry points: `cdv2 colorize | convert | export | demo | train | app | eval`
(`python -m cdv2.train` is `cdv2 train`). Each subcommand lives in its own module here and only
calls public APIs; heavy imports (jax) happen after argument parsing."""
from __future__ import annotations

import argparse
import importlib
import sys

from cdv2.cli import colorize


# subcommand -> (module whose main(argv) runs it, help); imported only when chosen
SUBCOMMANDS = {
    "convert": ("cdv2.cli.convert", "authors' torch checkpoint / preprocessor networks -> cdv2 weights directory"),
    "export": ("cdv2.cli.export", "cdv2 weights directory -> authors' safetensors"),
    "demo": ("cdv2.cli.demo", "the built-in model on held-out synthetic sketches (--train: train it here)"),
    "train": ("cdv2.cli.train", "train a stage (python -m cdv2.train)"),
    "app": ("cdv2.cli.app", "the colorization UI in a browser (needs the `app` extra)"),
    "eval": ("cdv2.cli.eval", "the paper's evaluation: PSNR, MS-SSIM, CLIP similarity, FID (python -m cdv2.eval)"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cdv2", description="ColorizeDiffusion v2 in JAX/Flax")
    sub = ap.add_subparsers(dest="command", required=True)
    colorize.add_parser(sub)
    for name, (_, help_) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.command in SUBCOMMANDS:
        return importlib.import_module(SUBCOMMANDS[args.command][0]).main(rest)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return colorize.run(args)
    except (OSError, ValueError, LookupError, NotImplementedError) as e:  # user error: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
