"""A folder of colour images -> the training layout (color/, sketch/, mask/ folders) that
`cdv2.train` reads; resumable, with a progress bar (cdv2/train/prepare.py documents the methods).

    python tools/prepare_dataset.py IMAGES OUT [--preprocessors DIR] [--sketch auto|extract|classical]
        [--extractor lineart_keras] [--mask auto|network|estimate] [--mask-extractor rmbg-v2]
        [--masks DIR] [--max-side N] [--workers 4]
"""
from __future__ import annotations

import argparse
import sys

from cdv2.sample import line_extract
from cdv2.train.prepare import MASK_METHODS, SKETCH_METHODS, PrepareOptions, prepare_dataset, summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", help="folder of colour images (searched recursively; never written)")
    ap.add_argument("out", help="output folder (gets color/, sketch/, mask/, prepare_log.json)")
    ap.add_argument("--preprocessors", help="converted preprocessor networks (`cdv2 convert --preprocessor`)")
    ap.add_argument("--sketch", choices=SKETCH_METHODS, default="auto",
                    help="auto: the line extractor when --preprocessors has it, else the classical detector")
    ap.add_argument("--extractor", choices=sorted(line_extract.EXTRACTORS), default=line_extract.DEFAULT_EXTRACTOR)
    ap.add_argument("--extract-size", type=int, default=line_extract.EXTRACT_SIZE,
                    help="square size the extractor runs at (the app's 512)")
    ap.add_argument("--mask", choices=MASK_METHODS, default="auto",
                    help="auto: the mask network when --preprocessors has it, else the estimate")
    ap.add_argument("--mask-extractor", choices=("rmbg-v2", "isnet"), default="rmbg-v2")
    ap.add_argument("--masks", help="folder of your own masks (same relative names); these win")
    ap.add_argument("--max-side", type=int, help="downscale images whose longer side exceeds this")
    ap.add_argument("--workers", type=int, default=4, help="parallel threads")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        opts = PrepareOptions(sketch=args.sketch, extractor=args.extractor, extract_size=args.extract_size,
                              mask=args.mask, mask_extractor=args.mask_extractor, masks_dir=args.masks,
                              max_side=args.max_side, workers=args.workers)
        pre = None
        if args.preprocessors:
            from cdv2.sample.preprocessors import Preprocessors

            pre = Preprocessors.load(args.preprocessors)
        log = prepare_dataset(args.images, args.out, opts, preprocessors=pre, progress=not args.no_progress)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
