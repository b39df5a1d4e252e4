"""`cdv2 demo`: the built-in model on held-out synthetic sketches (cdv2/demo.py), or with `--train`
a model trained from scratch here (cdv2/demo_train.py). `cdv2 colorize` with no arguments runs it."""
from __future__ import annotations

import argparse
import sys

from cdv2.demo import DEMO_SIZE
from cdv2.demo import __doc__ as DEMO_DOC


def build_parser(prog: str = "cdv2 demo") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=DEMO_DOC,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="cdv2-demo", help="output folder (samples.png, colour_check.json)")
    ap.add_argument("--weights", default=None, help="weights directory (default: the built-in demo model)")
    ap.add_argument("--num", type=int, default=4, help="held-out sketches to colorize")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--reference-guidance", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", action="store_true",
                    help="train a model from scratch here instead (see `cdv2 demo --train --help`)")
    return ap


def build_train_parser(prog: str = "cdv2 demo --train") -> argparse.ArgumentParser:
    from cdv2.demo_train import __doc__ as train_doc

    ap = argparse.ArgumentParser(prog=prog, description=train_doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="cdv2-demo-train", help="output folder (data, checkpoints, PNGs)")
    ap.add_argument("--train-steps", type=int, default=300, help="training steps in this run (compilation excluded)")
    ap.add_argument("--fit-vae", type=int, default=0, metavar="STEPS",
                    help="fit the VAE for STEPS steps instead of taking the built-in model's")
    ap.add_argument("--images", type=int, default=512, help="synthetic training images")
    ap.add_argument("--size", type=int, default=DEMO_SIZE, help="image side (pixels, multiple of 64)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast-compile", action="store_true", help=argparse.SUPPRESS)  # tests: unoptimised XLA
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--train" in argv:
            argv.remove("--train")
            args = build_train_parser().parse_args(argv)
            from cdv2.demo_train import run_train_demo

            run_train_demo(args)
        else:
            from cdv2.demo import run_demo

            run_demo(build_parser().parse_args(argv))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
