"""Steps of the built-in demo model's recipe (tools/train_demo_model.sh runs them in order):

    python tools/train_demo_model.py data OUT/data [--images 4096] [--size 64]
        the synthetic training set (cdv2.train.synthetic)
    python tools/train_demo_model.py init OUT/data OUT/weights_init [--vae-steps 1500]
        random demo-config weights with the VAE fitted to the data (the diffusion training keeps
        the VAE frozen, as the authors keep SD's; a tiny model has no pretrained one)
    python tools/train_demo_model.py export RUN/checkpoints OUT/weights_stageN [--dtype float16]
        a training run's latest checkpoint -> weights directory (init_from of the next stage)
"""
from __future__ import annotations

import argparse
import sys
import time


def _log(msg: str) -> None:
    print(f"[train_demo_model] {msg}", flush=True)


def cmd_data(args) -> None:
    from cdv2.train.synthetic import make_synthetic_dataset

    names = make_synthetic_dataset(args.out, num_images=args.images, size=(args.size, args.size),
                                   num_shards=args.shards, seed=args.seed)
    _log(f"wrote {len(names)} triples under {args.out}")


def cmd_init(args) -> None:
    import jax
    import numpy as np

    from cdv2.config import load_model_config
    from cdv2.model import build, init_params
    from cdv2.train.autoencoder import fit_vae, random_crops
    from cdv2.train.data import make_train_iterator

    cfg = load_model_config(args.config)
    params = jax.tree_util.tree_map(np.asarray, init_params(cfg, jax.random.PRNGKey(args.seed)))
    # Start the posterior nearly deterministic (logvar -10): from logvar 0 the decoder first learns
    # to ignore latents drowned in unit noise and outputs the mean colour for hundreds of steps.
    qc = params["vae"]["quant_conv"]
    qc["kernel"] = np.array(qc["kernel"])
    qc["bias"] = np.array(qc["bias"])
    qc["kernel"][..., cfg.vae.embed_dim:] = 0.0
    qc["bias"][cfg.vae.embed_dim:] = -10.0
    if args.vae_from:  # continue fitting a previous run's VAE
        from cdv2.weights.weights_dir import load_weights_dir

        params["vae"] = load_weights_dir(args.vae_from)[0]["vae"]
    it = make_train_iterator(args.data, batch_size=args.batch, seed=args.seed, resolution=args.size, multiple=64)
    t0 = time.perf_counter()

    def on_step(i, rec):
        if i % 50 == 0 or i == args.vae_steps - 1:
            _log(f"vae step {i}/{args.vae_steps}: recon {rec:.4f} ({time.perf_counter() - t0:.0f} s)")

    params["vae"] = fit_vae(build(cfg).vae, params["vae"], random_crops(it, args.crop, args.seed),
                            args.vae_steps, lr=args.lr, seed=args.seed, on_step=on_step)
    # LDM's scale_by_std: the model config's vae.scale_factor should make the latents unit-variance
    from cdv2.modules.vae import AutoencoderKL

    encode = jax.jit(lambda p, x: build(cfg).vae.apply({"params": p}, x, method=AutoencoderKL.encode)[0])
    std = float(np.std(np.concatenate([np.asarray(encode(params["vae"], next(it)["image"])) for _ in range(8)])))
    _log(f"latent std {std:.3f} over 8 batches: vae.scale_factor should be about {1 / std:.3f} "
         f"(the config has {cfg.vae.scale_factor})")
    it.close()
    params = jax.tree_util.tree_map(np.asarray, params)
    from flax import traverse_util

    np.savez(str(args.out).rstrip("/") + "_vae.npz", **traverse_util.flatten_dict(params["vae"], sep="/"))
    from cdv2.weights.weights_dir import save_weights_dir

    save_weights_dir(args.out, params, cfg, source=f"random init (seed {args.seed}) + VAE fitted to {args.data}",
                     overwrite=True)
    _log(f"wrote {args.out}")


def cmd_export(args) -> None:
    from cdv2.config import load_model_config
    from cdv2.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoints, load_model_config(args.config), args.out, dtype=args.dtype,
                            overwrite=True)
    _log(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("data")
    p.add_argument("out")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("init")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--config", default="demo")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=64, help="VAE fitting crop (64 = whole images: the 32-channel VAE normalises each channel per image (GroupNorm 32), so a flat crop cannot carry its colour)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--vae-from", default=None, help="continue from this weights directory's VAE")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("export")
    p.add_argument("checkpoints")
    p.add_argument("out")
    p.add_argument("--config", default="demo")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = ap.parse_args(argv)
    {"data": cmd_data, "init": cmd_init, "export": cmd_export}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
