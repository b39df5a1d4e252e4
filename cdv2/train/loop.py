"""The training loop: data -> sharded jitted step -> metrics, checkpoints, sample grids; resumable.

Resume restores the trained params, optimizer state, step and RNG (straight into their sharded
abstract form) and each process's data-iterator position, so a run killed and restarted continues
with the identical batches and losses. Checkpoints hold only what the stage trains: the frozen params
are reloaded from the source recorded with each checkpoint (the `init_from` weights dir, the SD2.1
init, the random init's seed, or in-memory params passed again), checked by a content fingerprint.

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
from cdv2.train.checkpoint import Checkpointer, frozen_record, load_frozen_source
from cdv2.train.config import TrainConfig
from cdv2.train.distributed import CompileThenSync
from cdv2.train.data import QuartetSource, TrainIterator, describe_batch, make_train_iterator
from cdv2.train.latent_cache import check_cache_weights, describe as describe_cache, plan as cache_plan
from cdv2.train.feedback import MetricsWriter
from cdv2.train.mesh import make_mesh, maybe_initialize_distributed, shard_batch, train_shardings
from cdv2.train.stages import is_trainable, make_optimizer, split_trainable
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
    inputs = cached_inputs(cfg)  # none usable: the plain (randomly cropped) pipeline
    return make_train_iterator(root, batch_size=cfg.batch_size // jax.process_count(), seed=cfg.seed,
                               resolution=cfg.data.resolution, multiple=cfg.data.multiple, worker_count=workers,
                               shard_index=jax.process_index(), shard_count=jax.process_count(),
                               cache=cfg.data.cached if inputs else None, cache_inputs=inputs or None)


def cached_inputs(cfg: TrainConfig):
    """The latent-cache inputs this config can use (None without `data.cached`)."""
    return cache_plan(cfg.data.cached, cfg.stage, cfg.p_white_bg, cfg.inpaint_p)[0] if cfg.data.cached else None


def initial_params(cfg: TrainConfig, model_cfg: ModelConfig, seed: int):
    """`init_from` (a cdv2 weights dir, e.g. a previous stage's export, or the authors' file with its
    CLIP), else `init` (SD2.1 + open_clip, `cdv2.weights.sd21_init`), else a random init (tiny
    configs, tests)."""
    if cfg.init_from:
        from cdv2.weights.pretrained import load_pretrained

        params, _ = load_pretrained(cfg.init_from, config=model_cfg)
        return params
    if cfg.init.given:  # SD2.1 U-Net/VAE + open_clip CLIP, new modules as the authors start them
        from cdv2.weights.sd21_init import init_from_sd21

        return init_from_sd21(model_cfg, jax.random.PRNGKey(seed), sd21=cfg.init.sd21, diffusers=cfg.init.diffusers,
                              open_clip=cfg.init.open_clip, ema=cfg.init.ema)
    return jax.tree_util.tree_map(np.asarray, init_params(model_cfg, jax.random.PRNGKey(seed)))



def write_run_configs(workdir: Path, cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """WORKDIR/config/{train,model}.yaml: the configs the run was started with (kept on resume)."""
    out = Path(workdir) / "config"
    out.mkdir(parents=True, exist_ok=True)
    for name, c in (("train", cfg), ("model", model_cfg)):
        path = out / f"{name}.yaml"
        if not path.exists():
            path.write_text(yaml.safe_dump(plain_data(c.to_dict()), sort_keys=False))


def frozen_source(cfg: TrainConfig, params_given: bool) -> dict:
    """Where the frozen params come from (recorded with every checkpoint, reloaded on resume)."""
    if params_given:
        return {"kind": "given"}
    if cfg.init_from:
        return {"kind": "init_from", "path": str(Path(cfg.init_from).absolute())}
    if cfg.init.given:
        return {"kind": "init", "seed": cfg.seed, "ema": cfg.init.ema,
                **{k: str(Path(v).absolute()) for k, v in (("sd21", cfg.init.sd21), ("diffusers", cfg.init.diffusers),
                                                            ("open_clip", cfg.init.open_clip)) if v}}
    return {"kind": "random", "seed": cfg.seed}


def _start_state(cfg, model_cfg, optimizer, mesh, ckpt, it, params):
    """-> (state, shardings, resumed_from). Resume restores the trained leaves, optimizer state,
    step and RNG into the abstract sharded state, and the frozen params from their recorded source
    (content-checked); a fresh start records that source in `ckpt`."""
    resumed_from = ckpt.latest_step()
    if resumed_from is not None:
        record = ckpt.saved_frozen_record(resumed_from)
        frozen = None if record is None else load_frozen_source(record, model_cfg, params=params,
                                                                init_from=cfg.init_from)
        shapes = param_shapes(model_cfg) if params is None else jax.eval_shape(lambda p: p, params)
        del params
        state_shapes = train_state_shapes(shapes, optimizer)
        sh = train_shardings(mesh, state_shapes, cfg.sharding_rules, cfg.min_shard_size)
        abstract = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), state_shapes, sh.state)
        if record is None:  # an older checkpoint of the whole state: keep saving whole states
            ckpt.trainable = None
        else:
            ckpt.frozen_record = record
            targets = split_trainable(sh.state.params, cfg.stage)[1]
            frozen = {k: jax.device_put(v, targets[k]) for k, v in frozen.items()}
        return ckpt.restore(abstract, it, frozen=frozen), sh, resumed_from
    source = frozen_source(cfg, params is not None)
    if params is None:
        params = initial_params(cfg, model_cfg, cfg.seed)
    ckpt.frozen_record = frozen_record(source, cfg.stage, split_trainable(params, cfg.stage)[1])
    sh = train_shardings(mesh, train_state_shapes(params, optimizer), cfg.sharding_rules, cfg.min_shard_size)
    return create_train_state(params, optimizer, cfg.seed, sh), sh, None


def _describe_run(cfg: TrainConfig, mesh) -> str:
    """The start-of-run lines: the global batch, and what the latent cache provides."""
    line = describe_batch(cfg.batch_size, cfg.optim.grad_accum_steps, mesh.size)
    if not cfg.data.cached:
        return line
    return line + "\n" + describe_cache(cfg.data.cached, *cache_plan(cfg.data.cached, cfg.stage, cfg.p_white_bg,
                                                                       cfg.inpaint_p))


def _open_run(cfg: TrainConfig, opts: RunOptions, model_cfg: ModelConfig, optimizer, mesh, workdir: Path, params):
    """-> (checkpointer, data iterator, state, shardings, resumed_from); closes what it opened if
    starting fails (e.g. the frozen params' source is missing or changed, a stale latent cache)."""
    ckpt = Checkpointer(workdir / "checkpoints", every=cfg.checkpoint_every, keep=opts.keep_checkpoints,
                        trainable=lambda path: is_trainable(path, cfg.stage))  # frozen params: by reference
    ckpt.install_sigterm_handler()
    it = data_iterator(cfg, opts.data_root)
    try:
        state, shardings, resumed_from = _start_state(cfg, model_cfg, optimizer, mesh, ckpt, it, params)
        if cached_inputs(cfg):  # refuse a cache made from other frozen VAE / CLIP weights
            check_cache_weights(cfg.data.cached, state.params)
    except BaseException:
        ckpt.close()
        it.close()
        raise
    return ckpt, it, state, shardings, resumed_from


def _default_sampler(model_cfg: ModelConfig, workdir: Path):
    """Sample grids under WORKDIR/samples (single-process runs only), else None."""
    if jax.process_count() > 1:
        print("note: sample grids are single-process only; skipped (sample_every ignored)")
        return None
    from cdv2.train.sampling import TrainingSampler

    return TrainingSampler(model_cfg, workdir / "samples")


def _log_metrics(writer: MetricsWriter, bar, step: int, metrics, images_per_s: float) -> None:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    m["images_per_s"] = images_per_s
    writer.scalars(step, {f"train/{k}": v for k, v in m.items() if k != "stop"})
    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.1e}", gnorm=f"{m['grad_norm']:.3f}",
                    img_s=f"{m['images_per_s']:.1f}")


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
    if is_main:
        print(_describe_run(cfg, mesh))
    ckpt, it, state, shardings, resumed_from = _open_run(cfg, opts, model_cfg, optimizer, mesh, workdir, params)
    del params
    step_fn = CompileThenSync(make_train_step(cfg, build_components(cfg, model_cfg), optimizer, shardings,
                                              compiler_options=opts.compiler_options))
    writer = MetricsWriter(workdir / "tensorboard", enabled=is_main)
    sampler = None
    if on_sample is None and cfg.sample_every and is_main:
        sampler = on_sample = _default_sampler(model_cfg, workdir)
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
                _log_metrics(writer, bar, step, metrics, seen / max(time.perf_counter() - t_first, 1e-9))
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
