"""`cdv2 demo --train`: the training half of the system end to end on CPU, without downloads.

1. writes a synthetic dataset (cdv2.train.synthetic) in the authors' zip layout;
2. takes the frozen VAE (and the CLIP) of the built-in model, or with --fit-vae fits the demo
   config's VAE to the data (there is no pretrained tiny VAE);
3. trains stage 1 of a fresh demo-config model for --train-steps optimizer steps (the budget counts
   steps, so the first step's compilation does not eat it; resumable: run it again to continue);
4. colorizes held-out sketches after references in another layout and writes `samples.png`
   (the built-in demo's grid) and `loss.png`.
A few hundred steps show the sketch's shapes; taking colours from the reference takes thousands
(the built-in model: tools/train_demo_model.sh).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from cdv2.demo import DEMO_WEIGHTS, _log, enable_compilation_cache, heartbeat


def _frozen_parts(args, data: Path, out: Path, model_cfg):
    """Fresh params with a usable VAE: the built-in model's (VAE + CLIP), or one fitted here."""
    from cdv2.model import build, init_params

    params = jax.tree_util.tree_map(np.asarray, init_params(model_cfg, jax.random.PRNGKey(args.seed)))
    if not args.fit_vae:
        from cdv2.weights.weights_dir import load_weights_dir

        shipped, shipped_cfg = load_weights_dir(DEMO_WEIGHTS)
        for part in ("vae", "clip"):  # same shapes could still mean another model (e.g. GroupNorm groups)
            if getattr(shipped_cfg, part) != getattr(model_cfg, part):
                raise ValueError(f"the built-in model's {part} config ({getattr(shipped_cfg, part)}) is not "
                                 f"configs/demo.yaml's ({getattr(model_cfg, part)}): use --fit-vae N")
        params["vae"], params["clip"] = shipped["vae"], shipped["clip"]
        _log(f"VAE and CLIP: the built-in model's ({DEMO_WEIGHTS})")
        return params
    vae_file = out / "vae.npz"
    if vae_file.is_file():  # a previous run fitted it already
        params["vae"] = traverse_util.unflatten_dict(dict(np.load(vae_file)), sep="/")
        return params
    from cdv2.train.autoencoder import fit_vae, random_crops
    from cdv2.train.data import make_train_iterator

    _log(f"fitting the VAE ({args.fit_vae} steps)...")
    it = make_train_iterator(data, batch_size=args.batch, seed=args.seed, resolution=args.size)
    t0 = time.perf_counter()

    def on_step(i, rec):
        if time.perf_counter() - on_step.last > 5 or i == args.fit_vae - 1:
            on_step.last = time.perf_counter()
            _log(f"  vae step {i + 1}/{args.fit_vae}: recon {rec:.4f} ({on_step.last - t0:.0f} s)")

    on_step.last = t0
    params["vae"] = fit_vae(build(model_cfg).vae, params["vae"], random_crops(it, min(32, args.size), args.seed),
                            args.fit_vae, lr=2e-3, seed=args.seed, on_step=on_step)
    it.close()
    params["vae"] = jax.tree_util.tree_map(np.asarray, params["vae"])
    np.savez(vae_file, **traverse_util.flatten_dict(params["vae"], sep="/"))
    return params


def run_train_demo(args):
    """Build data, get a VAE, train stage 1, colorize held-out sketches; -> the trained Colorizer."""
    if args.size % 64:
        raise ValueError(f"--size must be a multiple of 64, got {args.size}")
    if args.train_steps < 1:
        raise ValueError(f"--train-steps must be >= 1, got {args.train_steps}")
    enable_compilation_cache()
    from cdv2.config import load_model_config
    from cdv2.sample.colorizer import Colorizer
    from cdv2.train.config import load_train_config
    from cdv2.train.feedback import loss_curve
    from cdv2.train.loop import RunOptions, train
    from cdv2.train.synthetic import held_out_pairs, make_synthetic_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, state_file = out / "data", out / "demo_state.json"
    t_start = time.perf_counter()
    if not (data / "sketch").is_dir():
        make_synthetic_dataset(data, num_images=args.images, size=(args.size, args.size), seed=args.seed)
        _log(f"wrote {args.images} synthetic (color, sketch, mask) triples to {data}")
    model_cfg = load_model_config("demo")
    params = _frozen_parts(args, data, out, model_cfg)
    history = json.loads(state_file.read_text()) if state_file.is_file() else {"steps": [], "losses": []}
    done = history["steps"][-1] if history["steps"] else 0
    # sample_every=1 + on_sample: a hook that tells the heartbeat the first step (compilation) is over
    cfg = load_train_config("demo_stage1", {"batch_size": args.batch, "checkpoint_every": 100, "seed": args.seed,
                                            "data.resolution": args.size, "sample_every": 1})
    _log(f"training stage 1 for {args.train_steps} steps ({done} done before); the first step compiles "
         "(minutes on a busy CPU; a progress bar follows)...")
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} if args.fast_compile else None
    with heartbeat("compiling the training step") as hb:
        result = train(cfg, RunOptions(data_root=str(data), workdir=str(out / "run"), max_steps=done + args.train_steps,
                                       compiler_options=fast), params=params,
                       on_sample=lambda step, state: hb.stop())
    history["steps"] += result.steps
    history["losses"] += result.losses
    state_file.write_text(json.dumps(history))
    if history["steps"]:
        loss_curve(history["steps"], history["losses"], out / "loss.png")
        _log(f"trained to step {history['steps'][-1]} ({result.images_per_s:.1f} images/s); "
             f"loss curve: {out / 'loss.png'}")

    from cdv2.demo import colorize_pairs, demo_grid

    col = Colorizer(jax.tree_util.tree_map(np.asarray, jax.device_get(result.state.params)), model_cfg)
    pairs = held_out_pairs(4, args.size, seed=args.seed)
    with heartbeat("colorizing 4 held-out sketches (the first compiles the sampler)"):
        outs = colorize_pairs(col, pairs, [p.reference for p in pairs], steps=args.steps, seed=args.seed)
    rows = [[np.asarray(p.sketch), np.asarray(p.reference), o, np.asarray(p.target)] for p, o in zip(pairs, outs)]
    demo_grid(rows).save(out / "samples.png")
    _log(f"held-out colorizations (sketch | reference | output | ground truth): {out / 'samples.png'}")
    _log(f"done in {time.perf_counter() - t_start:.0f} s")
    return col
