"""`cdv2 demo`: the whole system end to end without any downloaded weights.

1. writes a small synthetic dataset (shapes and colours) in the authors' zip layout;
2. fits the tiny config's VAE to it (a demo-only step: there is no pretrained tiny VAE);
3. trains stage 1 of the tiny model for a time budget on CPU (resumable: run it again to continue);
4. colorizes held-out sketches after their references with the jitted sampler;
5. writes `samples.png` (sketch | reference | output | ground truth rows) and `loss.png`.
The model is tiny and trained for minutes: expect the sketch's shapes in roughly the right places,
mostly grey; taking colours from the reference needs much longer training (run it again, or with a
larger --train-seconds: it resumes where it stopped).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def demo_parser(prog: str = "cdv2 demo") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="cdv2-demo", help="output folder (data, checkpoints, PNGs)")
    ap.add_argument("--train-seconds", type=float, default=180.0, help="time budget of the U-Net training")
    ap.add_argument("--vae-steps", type=int, default=200, help="VAE fitting steps (on 64-pixel crops)")
    ap.add_argument("--images", type=int, default=96, help="synthetic training images")
    ap.add_argument("--size", type=int, default=128, help="image side (pixels, multiple of 64)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="sampling steps")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None) -> int:
    args = demo_parser().parse_args(argv)
    try:
        run_demo(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_demo(args):
    """Build data, fit the VAE, train, colorize held-out sketches; -> the trained tiny Colorizer.
    Everything lives under `args.out`; a second run reuses the data and VAE and resumes training."""
    if args.size % 64:
        raise ValueError(f"--size must be a multiple of 64, got {args.size}")
    from cdv2.config import load_model_config
    from cdv2.model import build, init_params
    from cdv2.train.autoencoder import fit_vae, random_crops
    from cdv2.train.config import load_train_config
    from cdv2.train.data import make_train_iterator
    from cdv2.train.feedback import image_grid, loss_curve
    from cdv2.train.loop import RunOptions, train
    from cdv2.train.synthetic import make_synthetic_dataset, make_triple

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, state_file = out / "data", out / "demo_state.json"
    t_start = time.perf_counter()
    if not (data / "sketch").is_dir():
        make_synthetic_dataset(data, num_images=args.images, size=(args.size, args.size), seed=args.seed)
        _log(f"wrote {args.images} synthetic (color, sketch, mask) triples to {data}")
    model_cfg = load_model_config("tiny")
    params = jax.tree_util.tree_map(np.asarray, init_params(model_cfg, jax.random.PRNGKey(args.seed)))

    vae_file = out / "vae.npz"
    if vae_file.is_file():  # a previous demo run fitted it already
        saved = dict(np.load(vae_file))
        params["vae"] = traverse_util.unflatten_dict(saved, sep="/")
    else:
        _log(f"fitting the tiny VAE ({args.vae_steps} steps)...")
        it = make_train_iterator(data, batch_size=args.batch, seed=args.seed, resolution=args.size)
        params["vae"] = fit_vae(build(model_cfg).vae, params["vae"], random_crops(it, 64, args.seed),
                                args.vae_steps, lr=3e-3, seed=args.seed,
                                on_step=lambda i, rec: (i % 50 == 0) and _log(f"  vae step {i}: recon {rec:.4f}"))
        it.close()
        params["vae"] = jax.tree_util.tree_map(np.asarray, params["vae"])
        np.savez(vae_file, **traverse_util.flatten_dict(params["vae"], sep="/"))

    cfg = load_train_config("stage1", {"model": "tiny", "batch_size": args.batch, "compute_dtype": "float32",
                                       "optim.lr": 5e-4, "optim.warmup_steps": 20, "optim.grad_clip_norm": 1.0,
                                       # minutes, not days: see the reference in 9 of 10 samples
                                       "ucg_rate": 0.1, "inpaint_p": 0.0, "checkpoint_every": 100, "log_every": 10,
                                       "seed": args.seed})
    _log(f"training stage 1 of the tiny model for ~{args.train_seconds:.0f} s (CPU)...")
    result = train(cfg, RunOptions(data_root=str(data), workdir=str(out / "run"), resolution=args.size,
                                   time_budget_s=args.train_seconds), params=params)
    history = json.loads(state_file.read_text()) if state_file.is_file() else {"steps": [], "losses": []}
    history["steps"] += result.steps
    history["losses"] += result.losses
    state_file.write_text(json.dumps(history))
    if history["steps"]:
        loss_curve(history["steps"], history["losses"], out / "loss.png")
        _log(f"trained to step {history['steps'][-1]} ({result.images_per_s:.1f} images/s); loss curve: {out / 'loss.png'}")

    from cdv2.sample.colorizer import Colorizer

    trained = jax.tree_util.tree_map(np.asarray, jax.device_get(result.state.params))
    col = Colorizer(trained, model_cfg)
    rows = []
    for i in range(4):
        color, sketch, _ = make_triple(np.random.default_rng([args.seed + 1000, i]), args.size, args.size)
        img = col.colorize(sketch, color, mode="vanilla", steps=args.steps, size=(args.size, args.size),
                           reference_guidance=2.0, seed=i)[0]
        rows.append([_to_unit(sketch), _to_unit(color), _to_unit(img), _to_unit(color)])
    image_grid(rows, cell=args.size).save(out / "samples.png")
    _log(f"held-out colorizations (sketch | reference | output | ground truth): {out / 'samples.png'}")
    _log(f"done in {time.perf_counter() - t_start:.0f} s")
    return col


def _to_unit(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), np.float32) / 127.5 - 1.0


if __name__ == "__main__":
    sys.exit(main())
