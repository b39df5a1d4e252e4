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
    ap.add_argument("--workdir", required=True,
                    help="checkpoints, TensorBoard logs, samples and a copy of the configs go here")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="config override, type-checked, e.g. optim.lr=2e-5, data.resolution=512, data.workers=0")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (total, incl. resumed)")
    args = ap.parse_args(argv)
    from cdv2.train.config import load_train_config
    from cdv2.train.loop import RunOptions, check_run, train

    try:
        # everything a user can get wrong is checked before any model is built or compiled
        cfg = load_train_config(args.config, parse_overrides(args.set))
        opts = RunOptions(data_root=args.data, workdir=args.workdir, max_steps=args.max_steps)
        n = check_run(cfg, opts)
        print(f"{n} training records in {args.data}; global batch {cfg.batch_size} x "
              f"{cfg.optim.grad_accum_steps} accumulation step(s) per update")
        result = train(cfg, opts)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.steps:
        print(f"trained steps {result.steps[0]}..{result.steps[-1]}"
              f"{' (resumed)' if result.resumed_from is not None else ''}"
              f"{' (stopped by SIGTERM/time budget; resume with the same command)' if result.stopped else ''}; "
              f"last loss {result.losses[-1]:.4f}; {result.images_per_s:.1f} images/s; "
              f"checkpoints in {args.workdir}/checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
