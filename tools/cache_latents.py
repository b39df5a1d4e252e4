"""Cache the frozen VAE posterior moments and CLIP tokens of a prepared dataset, so training reads
them instead of running the VAE encoder and CLIP every step (format and crop rules:
cdv2/train/latent_cache.py). Resumable; a cache of other weights/settings is never overwritten.

    python tools/cache_latents.py DATA --out CACHE [--config stage1] [--set data.resolution=768]
        [--weights WEIGHTS] [--clip OPEN_CLIP_FILE] [--variants 1] [--batch-size 8]
        [--dtype float32|float16] [--inputs latent_moments clip_tokens] [--compute-dtype float32]

then train with `--set data.cached=CACHE`. WEIGHTS defaults to the config's `init_from`, else its
`init:` (SD2.1 VAE + open_clip CLIP); they must be the weights the run starts from (the run
compares their fingerprint and refuses a mismatch).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="prepared dataset (color/, sketch/, mask/)")
    ap.add_argument("--out", required=True, help="cache directory (new, or a cache to resume)")
    ap.add_argument("--config", default="stage1", help="training config (its model, data.resolution, data.multiple)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="training config override")
    ap.add_argument("--weights", help="cdv2 weights dir or the authors' checkpoint (default: the config's init_from)")
    ap.add_argument("--clip", help="open_clip visual checkpoint, when --weights lacks the CLIP tower")
    ap.add_argument("--variants", type=int, default=1, help="fixed crops per record and bucket")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fixed crops")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage dtype")
    ap.add_argument("--inputs", nargs="+", choices=("latent_moments", "clip_tokens"),
                    default=["latent_moments", "clip_tokens"])
    ap.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    from cdv2.cli.train import parse_overrides
    from cdv2.config import load_model_config
    from cdv2.train.collate import CollateConfig
    from cdv2.train.config import load_train_config
    from cdv2.train.latent_cache import StaleCacheError
    from cdv2.train.latent_cache_build import build_latent_cache
    from cdv2.weights.pretrained import load_pretrained

    try:
        cfg = load_train_config(args.config, parse_overrides(args.set))
        weights = args.weights or cfg.init_from
        init = getattr(cfg, "init", None)
        if weights:
            params, model_cfg = load_pretrained(weights, clip=args.clip, config=load_model_config(cfg.model))
        elif init is not None and init.given:   # the run starts from SD2.1 + open_clip (`init:`)
            import jax

            from cdv2.weights.sd21_init import init_from_sd21

            model_cfg = load_model_config(cfg.model)
            params = init_from_sd21(model_cfg, jax.random.PRNGKey(cfg.seed), sd21=init.sd21, diffusers=init.diffusers,
                                    open_clip=init.open_clip, ema=init.ema)
            weights = f"init: sd21={init.sd21} diffusers={init.diffusers} open_clip={init.open_clip}"
        else:
            raise ValueError("no weights: pass --weights (the config has neither init_from nor init); the cache "
                             "must be made from the VAE and CLIP the training run starts from")
        if "clip" not in params:
            raise ValueError(f"{weights} has no CLIP image tower: pass --clip OPEN_CLIP_FILE")
        stats = build_latent_cache(
            args.data, args.out, params, model_cfg, CollateConfig.for_resolution(cfg.data.resolution, cfg.data.multiple),
            variants=args.variants, seed=args.seed, batch_size=args.batch_size, dtype=args.dtype, inputs=args.inputs,
            compute_dtype=jnp.bfloat16 if args.compute_dtype == "bfloat16" else jnp.float32,
            weights_label=str(weights), progress=not args.no_progress)
    except (OSError, ValueError, StaleCacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"cached {stats['encoded']} records ({stats['skipped_done']} already cached, {stats['redone']} redone "
          f"because their image changed, {len(stats['failed'])} unreadable) in {args.out}")
    for name, err in stats["failed"][:10]:
        print(f"  skipped {name}: {err}")
    print(f"train with: --set data.cached={args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
