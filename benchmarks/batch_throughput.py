"""Images per second of many distinct colorizations: one at a time (`Colorizer.colorize`, what
`python -m cdv2.eval` did before) vs batches through `cdv2.sample.batch.BatchColorizer` (vmapped
`Pipeline.generate_impl`, split over all local devices).

    python -m benchmarks.batch_throughput                                   # built-in model, 64 px, CPU
    python -m benchmarks.batch_throughput --weights DIR --size 768 --batch 1 8 16 --num 32   # GPU/TPU

Warm numbers: each configuration runs once to compile, then `--num` images are timed (ends blocked
on, images fetched to the host). Held-out synthetic scenes (cdv2.eval.protocol.synthetic_items).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np


def main(argv=None) -> None:
    from cdv2.demo import DEMO_WEIGHTS
    from cdv2.eval.protocol import synthetic_items
    from cdv2.sample.batch import BatchColorizer, Request
    from cdv2.sample.colorizer import Colorizer
    from cdv2.weights.pretrained import load_pretrained

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(DEMO_WEIGHTS))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mode", default="vanilla")
    ap.add_argument("--num", type=int, default=64, help="images timed per configuration")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16, 32])
    args = ap.parse_args(argv)

    params, cfg = load_pretrained(args.weights)
    col = Colorizer(params, cfg)
    items = synthetic_items(max(args.num, 2), args.size, seed=11)[:args.num]
    reqs = [Request(it.sketch, it.tps_reference, seed=i,
                    reference_mask=None if args.mode == "vanilla" else it.tps_reference_mask) for i, it in enumerate(items)]
    kw = dict(mode=args.mode, steps=args.steps, size=(args.size, args.size), sketch_polarity="black_on_white",
              reference_guidance=2.0)
    from PIL import Image

    def one_by_one(rs):
        for r in rs:
            m = None if r.reference_mask is None else Image.fromarray(r.reference_mask)
            col.colorize(r.sketch, r.reference, seed=r.seed, output="array", reference_mask=m, **kw)

    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; {args.num} images of {args.size}² "
          f"{args.mode}, {args.steps} steps")
    print("| path | images per call | images/s | s per image |")
    print("|---|---|---|---|")
    one_by_one(reqs[:1])
    t = time.perf_counter()
    one_by_one(reqs)
    dt = time.perf_counter() - t
    print(f"| Colorizer.colorize, one at a time | 1 | {args.num / dt:.2f} | {dt / args.num:.3f} |", flush=True)
    for b in args.batch:
        n = len(jax.local_devices())
        b = -(-b // n) * n
        batch = BatchColorizer(col, batch_size=b)
        batch.colorize(reqs[:1], **kw)  # compile
        t = time.perf_counter()
        out = batch.colorize(reqs, **kw)
        dt = time.perf_counter() - t
        assert np.isfinite(out).all()
        print(f"| BatchColorizer | {b} | {args.num / dt:.2f} | {dt / args.num:.3f} |", flush=True)


if __name__ == "__main__":
    main()
