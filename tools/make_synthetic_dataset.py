"""Write a small synthetic training set in the authors' QuartLoader layout (or plain folders).

    python tools/make_synthetic_dataset.py OUT_DIR [--num-images 64] [--size 256 256]
        [--shards 2] [--seed 0] [--layout zip|folder] [--aspect-range 0.75 1.33]
"""
from __future__ import annotations

import argparse

from cdv2.train.synthetic import make_synthetic_dataset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="output folder (gets color/, sketch/, mask/)")
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    ap.add_argument("--shards", type=int, default=2, help="zip files per folder (zip layout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", choices=("zip", "folder"), default="zip")
    ap.add_argument("--aspect-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="draw each image's h/w ratio from [LO, HI] (area about H*W)")
    args = ap.parse_args(argv)
    names = make_synthetic_dataset(
        args.root, num_images=args.num_images, size=tuple(args.size), num_shards=args.shards,
        seed=args.seed, layout=args.layout,
        aspect_range=tuple(args.aspect_range) if args.aspect_range else None)
    print(f"wrote {len(names)} triples ({args.layout}) under {args.root}")


if __name__ == "__main__":
    main()
