"""`python -m cdv2.train --config stage1 --data DATA --workdir RUN [--set optim.lr=2e-5 ...]`

Trains one stage (configs/train/stage{1,2,3}.yaml) on a dataset in the authors' layout
(`color/`, `sketch/`, `mask/` folders of zip shards) or plain image folders; resumes from the
latest checkpoint in RUN/checkpoints when there is one. On a cluster the same command runs on
every host (jax.distributed is initialised from the environment; each host reads its own shard).
"""
from __future__ import annotations

import argparse
import sys

import yaml


def parse_overrides(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cdv2.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="stage1", help="configs/train/NAME.yaml or a path")
    ap.add_argument("--data", required=True, help="dataset root (color/, sketch/, mask/)")
    ap.add_argument("--workdir", required=True, help="checkpoints, TensorBoard logs and samples go here")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. optim.lr=2e-5")
    ap.add_argument("--resolution", type=int, default=768, help="training resolution (scales the crop buckets)")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--workers", type=int, default=0, help="grain worker processes")
    args = ap.parse_args(argv)
    from cdv2.train.config import load_train_config
    from cdv2.train.loop import RunOptions, train

    try:
        cfg = load_train_config(args.config, parse_overrides(args.set))
        result = train(cfg, RunOptions(data_root=args.data, workdir=args.workdir, resolution=args.resolution,
                                       max_steps=args.max_steps, worker_count=args.workers))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.steps:
        print(f"trained steps {result.steps[0]}..{result.steps[-1]}"
              f"{' (resumed)' if result.resumed_from is not None else ''}; last loss {result.losses[-1]:.4f}; "
              f"{result.images_per_s:.1f} images/s; checkpoints in {args.workdir}/checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
