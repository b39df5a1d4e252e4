"""The training loop: data -> sharded jitted step -> metrics, checkpoints, sample grids; resumable.

Resume restores params, optimizer state, step and RNG (the TrainState, straight into its sharded
abstract form: no initial weights are built or loaded first) and each process's data-iterator
position, so a run killed and restarted continues with the identical batches and losses.

Multi-process: every decision that makes processes act differently is collective. Checkpoint
cadence is a function of the step; stopping (SIGTERM, the time budget) is each process's flag
all-reduced inside the train step (`STOP_KEY`), read one step late like the loss, so all processes
stop, and save, after the same step.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
import yaml
from tqdm import tqdm

from cdv2.config import ModelConfig, load_model_config, plain_data
from cdv2.model import init_params, param_shapes
from cdv2.train.checkpoint import Checkpointer
from cdv2.train.config import TrainConfig
from cdv2.train.data import QuartetSource, TrainIterator, make_train_iterator
from cdv2.train.feedback import MetricsWriter
from cdv2.train.mesh import make_mesh, maybe_initialize_distributed, shard_batch, train_shardings
from cdv2.train.stages import make_optimizer
from cdv2.train.step import STOP_KEY, build_components, create_train_state, make_train_step, train_state_shapes


@dataclasses.dataclass
class RunOptions:
    """Where and how long to run (the recipe, data pipeline included, is the TrainConfig)."""

    data_root: str
    workdir: str
    max_steps: Optional[int] = None
    time_budget_s: Optional[float] = None
    keep_checkpoints: int = 3
    progress: bool = True
    compiler_options: Optional[dict] = None  # passed to jax.jit (tests: fast, unoptimised compiles)


@dataclasses.dataclass
class RunResult:
    steps: list
    losses: list
    state: object
    resumed_from: Optional[int]
    images_per_s: float
    batch_hw: list = dataclasses.field(default_factory=list)   # (H, W) of each step's batch
    stopped: bool = False                                       # by SIGTERM / the time budget


def check_run(cfg: TrainConfig, opts: RunOptions, process_count: Optional[int] = None) -> int:
    """Fail fast, before anything is built: the data folder lists images, the workdir is writable,
    and every process's shard holds at least one batch. -> the number of records."""
    root = Path(opts.data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such folder")
    n = len(QuartetSource(root))
    workdir = Path(opts.workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"--workdir {workdir} is not writable: {e}") from None
    procs = process_count or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if cfg.batch_size % procs:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {procs} processes")
    if n // procs < cfg.batch_size // procs:
        raise ValueError(f"batch_size {cfg.batch_size} needs {cfg.batch_size // procs} records per process, but "
                         f"{root} has {n} records ({n // procs} per process for {procs} processes)")
    return n


def data_iterator(cfg: TrainConfig, root) -> TrainIterator:
    """This process's shard of the global batch stream (`cfg.data`; workers None = the CPU count)."""
    workers = cfg.data.workers if cfg.data.workers is not None else (os.cpu_count() or 1)
    return make_train_iterator(root, batch_size=cfg.batch_size // jax.process_count(), seed=cfg.seed,
                               resolution=cfg.data.resolution, multiple=cfg.data.multiple, worker_count=workers,
                               shard_index=jax.process_index(), shard_count=jax.process_count())


def initial_params(cfg: TrainConfig, model_cfg: ModelConfig, seed: int):
    """`init_from` (a cdv2 weights dir, e.g. a previous stage's export, or the authors' file with its
    CLIP) or a random init (tiny configs, tests)."""
    if cfg.init_from:
        from cdv2.weights.pretrained import load_pretrained

        params, _ = load_pretrained(cfg.init_from, config=model_cfg)
        return params
    return jax.tree_util.tree_map(np.asarray, init_params(model_cfg, jax.random.PRNGKey(seed)))



def write_run_configs(workdir: Path, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """WORKDIR/config/{train,model}.yaml: the configs the run was started with (kept on resume)."""
    out = Path(workdir) / "config"
    out.mkdir(parents=True, exist_ok=True)
    for name, c in (("train", cfg), ("model", model_cfg)):
        path = out / f"{name}.yaml"
        if not path.exists():
            path.write_text(yaml.safe_dump(plain_data(c.to_dict()), sort_keys=False))


def _start_state(cfg, model_cfg, optimizer, mesh, ckpt, it, params):
    """-> (state, shardings, resumed_from). Resume restores into the abstract sharded state."""
    resumed_from = ckpt.latest_step()
    if resumed_from is not None:
        shapes = param_shapes(model_cfg) if params is None else jax.eval_shape(lambda p: p, params)
        state_shapes = train_state_shapes(shapes, optimizer)
        sh = train_shardings(mesh, state_shapes, cfg.sharding_rules, cfg.min_shard_size)
        abstract = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), state_shapes, sh.state)
        return ckpt.restore(abstract, it), sh, resumed_from
    if params is None:
        params = initial_params(cfg, model_cfg, cfg.seed)
    sh = train_shardings(mesh, train_state_shapes(params, optimizer), cfg.sharding_rules, cfg.min_shard_size)
    return create_train_state(params, optimizer, cfg.seed, sh), sh, None


def train(cfg: TrainConfig, opts: RunOptions, *, params=None,
          on_sample: Optional[Callable[[int, object], None]] = None) -> RunResult:
    """Run (or resume) training. `params`: starting weights (else `initial_params`). `on_sample`
    (step, state) runs every `cfg.sample_every` steps; by default a `TrainingSampler` writes
    sample grids to WORKDIR/samples."""
    check_run(cfg, opts)
    maybe_initialize_distributed()
    check_run(cfg, opts, jax.process_count())
    model_cfg = load_model_config(cfg.model)
    workdir = Path(opts.workdir)
    is_main = jax.process_index() == 0
    if is_main:
        write_run_configs(workdir, cfg, model_cfg)
    optimizer = make_optimizer(cfg.optim, cfg.stage)
    mesh = make_mesh(cfg.mesh)
    ckpt = Checkpointer(workdir / "checkpoints", every=cfg.checkpoint_every, keep=opts.keep_checkpoints)
    ckpt.install_sigterm_handler()
    it = data_iterator(cfg, opts.data_root)
    state, shardings, resumed_from = _start_state(cfg, model_cfg, optimizer, mesh, ckpt, it, params)
    del params
    step_fn = make_train_step(cfg, build_components(cfg, model_cfg), optimizer, shardings,
                              compiler_options=opts.compiler_options)
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
    out = RunResult([], [], None, resumed_from, 0.0)
    t0, t_first, seen = time.perf_counter(), time.perf_counter(), 0
    pending = None  # the last step's metrics, still on the device
    try:
        while total is None or start + len(out.steps) < total:
            batch = next(it)
            if sampler is not None:
                sampler.take(batch)
            out.batch_hw.append(tuple(int(d) for d in batch["sketch"].shape[1:3]))
            over_budget = opts.time_budget_s is not None and time.perf_counter() - t0 > opts.time_budget_s
            local_stop = ckpt.stop_requested or over_budget
            batch[STOP_KEY] = np.full((batch["sketch"].shape[0],), float(local_stop), np.float32)
            state, metrics = step_fn(state, shard_batch(batch, shardings.batch))
            step = start + len(out.steps) + 1
            out.steps.append(step)
            # metrics are read one step late: the host waits for the previous step, never for the
            # one just dispatched, so data loading and dispatch overlap with device compute
            stop = False
            if pending is not None:
                out.losses.append(float(pending["loss"]))
                stop = bool(pending["stop"] > 0)
            pending = metrics
            if len(out.steps) == 1:  # throughput excludes the first step's compilation
                out.losses.append(float(pending["loss"]))
                stop, pending = bool(pending["stop"] > 0), None
                t_first = time.perf_counter()
            else:
                seen += cfg.batch_size
            if cfg.log_every and step % cfg.log_every == 0 or step == 1:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                m["images_per_s"] = seen / max(time.perf_counter() - t_first, 1e-9)
                writer.scalars(step, {f"train/{k}": v for k, v in m.items() if k != "stop"})
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.1e}", gnorm=f"{m['grad_norm']:.3f}",
                                img_s=f"{m['images_per_s']:.1f}")
            bar.update(1)
            if ckpt.should_save(step):
                ckpt.save(step, state, it)
            if on_sample is not None and cfg.sample_every and step % cfg.sample_every == 0:
                on_sample(step, state)
            if stop:  # the collective decision (same value on every process)
                out.stopped = True
                break
        if pending is not None:
            out.losses.append(float(pending["loss"]))
        last = start + len(out.steps)
        if last > start and last != ckpt.latest_step():
            ckpt.save(last, state, it, force=True)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
        it.close()
    elapsed = time.perf_counter() - t_first
    out.state, out.images_per_s = state, (seen / elapsed if seen else 0.0)
    return out
