"""The training loop: data -> sharded jitted step -> metrics, checkpoints, sample grids; resumable.

Resume restores params, optimizer state, step and RNG (the TrainState) and the data iterator's
position, so a run killed and restarted continues with the identical batches and losses.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from tqdm import tqdm

from cdv2.config import ModelConfig, load_model_config
from cdv2.model import init_params
from cdv2.train.checkpoint import Checkpointer
from cdv2.train.config import TrainConfig
from cdv2.train.data import iterator_state, make_train_iterator, restore_iterator
from cdv2.train.feedback import MetricsWriter
from cdv2.train.mesh import make_mesh, maybe_initialize_distributed, shard_batch, train_shardings
from cdv2.train.stages import make_optimizer
from cdv2.train.step import build_components, create_train_state, make_train_step, train_state_shapes


@dataclasses.dataclass
class RunOptions:
    """Where and how long to run (kept apart from the TrainConfig, which is the recipe)."""

    data_root: str
    workdir: str
    resolution: int = 768          # collate buckets scaled from the authors' 768 list
    multiple: int = 64
    max_steps: Optional[int] = None
    time_budget_s: Optional[float] = None
    keep_checkpoints: int = 3
    worker_count: int = 0
    progress: bool = True
    compiler_options: Optional[dict] = None  # passed to jax.jit (tests: fast, unoptimised compiles)


@dataclasses.dataclass
class RunResult:
    steps: list
    losses: list
    state: object
    resumed_from: Optional[int]
    images_per_s: float


def initial_params(cfg: TrainConfig, model_cfg: ModelConfig, seed: int):
    """`init_from` (a cdv2 weights dir, e.g. a previous stage's export, or the authors' file with its
    CLIP) or a random init (tiny configs, tests)."""
    if cfg.init_from:
        from cdv2.weights.pretrained import load_pretrained

        params, _ = load_pretrained(cfg.init_from, config=model_cfg)
        return params
    return jax.tree_util.tree_map(np.asarray, init_params(model_cfg, jax.random.PRNGKey(seed)))


def train(cfg: TrainConfig, opts: RunOptions, *, params=None,
          on_sample: Optional[Callable[[int, object], None]] = None) -> RunResult:
    """Run (or resume) training. `params`: starting weights (else `initial_params`). `on_sample`
    (step, state) runs every `cfg.sample_every` steps; by default a `TrainingSampler` writes
    sample grids to WORKDIR/samples."""
    maybe_initialize_distributed()
    model_cfg = load_model_config(cfg.model)
    workdir = Path(opts.workdir)
    is_main = jax.process_index() == 0
    comps = build_components(cfg, model_cfg)
    optimizer = make_optimizer(cfg.optim, cfg.stage)
    mesh = make_mesh(cfg.mesh)
    if params is None:
        params = initial_params(cfg, model_cfg, cfg.seed)
    shardings = train_shardings(mesh, train_state_shapes(params, optimizer), cfg.sharding_rules, cfg.min_shard_size)
    state = create_train_state(params, optimizer, cfg.seed, shardings)
    del params
    step_fn = make_train_step(cfg, comps, optimizer, shardings, compiler_options=opts.compiler_options)

    per_host = cfg.batch_size // jax.process_count()
    ckpt = Checkpointer(workdir / "checkpoints", every=cfg.checkpoint_every, keep=opts.keep_checkpoints)
    ckpt.install_sigterm_handler()
    resumed_from = ckpt.latest_step()
    if resumed_from is not None:
        from cdv2.train.checkpoint import abstract_like

        state, data_state = ckpt.restore(abstract_like(state))
        it = restore_iterator(data_state, root=opts.data_root)
    else:
        it = make_train_iterator(opts.data_root, batch_size=per_host, seed=cfg.seed, resolution=opts.resolution,
                                 multiple=opts.multiple, worker_count=opts.worker_count,
                                 shard_index=jax.process_index(), shard_count=jax.process_count())
    writer = MetricsWriter(workdir / "tensorboard", enabled=is_main)
    sampler = None
    if on_sample is None and cfg.sample_every and is_main:
        if jax.process_count() > 1:
            print("note: sample grids are single-process only; skipped (sample_every ignored)")
        else:
            from cdv2.train.sampling import TrainingSampler

            sampler = on_sample = TrainingSampler(model_cfg, workdir / "samples")
    total = opts.max_steps or cfg.total_steps
    start = int(jax.device_get(state.step))
    bar = tqdm(total=total, initial=start, desc=f"stage {cfg.stage}", unit="step",
               disable=not (opts.progress and is_main))
    steps, losses = [], []
    t0, t_first, seen = time.perf_counter(), time.perf_counter(), 0
    pending = None  # the last step's loss, still on the device
    try:
        while total is None or int(start + len(steps)) < total:
            batch = next(it)
            if sampler is not None:
                sampler.take(batch)
            sharded = shard_batch({k: v for k, v in batch.items()}, shardings.batch)
            state, metrics = step_fn(state, sharded)
            step = start + len(steps) + 1
            # losses are read one step late: the host waits for the previous step, never for the one
            # just dispatched, so data loading and dispatch overlap with device compute
            if pending is not None:
                losses.append(float(pending))
            pending = metrics["loss"]
            if len(steps) == 0:  # throughput excludes the first step's compilation
                losses.append(float(pending))
                pending = None
                t_first = time.perf_counter()
            else:
                seen += cfg.batch_size
            steps.append(step)
            if cfg.log_every and step % cfg.log_every == 0 or step == 1:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                m["images_per_s"] = seen / max(time.perf_counter() - t_first, 1e-9)
                writer.scalars(step, {f"train/{k}": v for k, v in m.items()})
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.1e}", gnorm=f"{m['grad_norm']:.3f}",
                                img_s=f"{m['images_per_s']:.1f}")
            bar.update(1)
            if ckpt.should_save(step):
                ckpt.save(step, state, iterator_state(it))
            if on_sample is not None and cfg.sample_every and step % cfg.sample_every == 0:
                on_sample(step, state)
            if ckpt.preempted:
                break
            if opts.time_budget_s is not None and time.perf_counter() - t0 > opts.time_budget_s:
                break
        if pending is not None:
            losses.append(float(pending))
        last = start + len(steps)
        if last > start and last != ckpt.latest_step():
            ckpt.save(last, state, iterator_state(it), force=True)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
        it.close()
    elapsed = time.perf_counter() - t_first
    return RunResult(steps, losses, state, resumed_from, seen / elapsed if seen else 0.0)
