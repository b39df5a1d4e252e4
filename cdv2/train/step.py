"""The train state and the jitted, sharded train step.

* Gradients are taken only w.r.t. the stage's trainable leaves: the params are split into
  trainable / frozen flat dicts and only the trainable dict is differentiated, so no cotangent is
  ever formed for a frozen weight (activations still backpropagate through frozen modules where a
  trainable one lies upstream, e.g. the frozen U-Net in stage 3).
* Frozen leaves are passed through untouched (bitwise, and aliased to the donated input buffers);
  the optimizer's frozen branch (`set_to_zero`) receives zeros that XLA removes.
* Precision: params stay fp32 (master weights); with compute_dtype bfloat16 the components are
  built with dtype=bf16, so every layer casts its fp32 weights to bf16 at use (flax's promote_dtype;
  norms, softmax, the time embedding and the loss stay fp32 by the module conventions).
* FSDP (fsdp axis > 1): only the fsdp-sharded leaves are gathered, and in the compute dtype
  (`cdv2.train.fsdp`: with bf16 compute a sharded weight matrix/kernel is cast to bf16 on its shard
  and its bf16 bits are all-gathered, half the bytes); its gradient is reduce-scattered back in
  fp32. Small replicated leaves (biases, norms) are left as they are.
  (Leaving the gather entirely to XLA's propagation lets the weight shardings leak into the
  activations: "involuntary full rematerialization" and a slower, larger program.) With fsdp = 1
  nothing is cast early, so the numerics equal the unsharded step.
* Memory: `remat` is a per-block policy inside the U-Net (`cdv2.modules.unet.remat_block` on every
  ResBlock, SpatialTransformer and warp block); the encoders are checkpointed whole.
* Preemption: a batch may carry `STOP_KEY` (one flag per sample, from each process's SIGTERM
  state); the step returns its maximum over the global batch as `metrics["stop"]`, so every process
  reads the same decision (an all-reduce that rides on the step, no extra host synchronisation).
* Randomness: see cdv2.train.objective. The run key `state.rng` never changes; each draw is
  `fold_in` of (optimizer step, sample index or micro-batch index).
* Stage 3's background path: a per-(micro-)step coin selects one of two complete value-and-grad
  computations under `lax.cond` (each branch keeps its own residuals, so memory is the larger
  branch, not the sum), rather than per-sample masks, which cannot express "no split attention,
  no LoRA" for some samples only.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from cdv2.config import ModelConfig
from cdv2.model import Components, build
from cdv2.diffusion.schedule import ldm_alphas_cumprod
from cdv2.train.config import TrainConfig
from cdv2.train.fsdp import fsdp_gather
from cdv2.train.mesh import TrainShardings
from cdv2.train.objective import sample_rngs, training_loss
from cdv2.train.stages import lr_schedule, merge_params, split_trainable
from cdv2.weights.dtypes import compute_dtype

STOP_KEY = "_stop"


@struct.dataclass
class TrainState:
    params: Any          # fp32 master weights, all groups
    opt_state: Any       # state for the trainable leaves only
    step: jax.Array      # int32: train_step calls so far (micro-batches)
    rng: jax.Array       # (2,) uint32: the run's key


def build_components(cfg: TrainConfig, model_cfg: ModelConfig) -> Components:
    """The model's modules in the configured compute dtype (params are fp32 regardless), the U-Net
    with the configured per-block remat policy."""
    impl = cfg.attention_impl
    if impl == "auto" and jax.default_backend() == "tpu":
        # Pallas flash attention, shard_mapped by make_train_step: at 768² XLA's materialised 9,216²
        # scores take v5p's stage-1 step from 14.9 to 39.3 GiB per device (BENCHMARKS.md) and would
        # not fit a 32 GB v6e chip at 2 per device
        impl = "pallas"
    comps = build(model_cfg, dtype=compute_dtype(cfg.compute_dtype), attention_impl=impl)
    return dataclasses.replace(comps, unet=comps.unet.clone(remat=cfg.remat))


def create_train_state(params, optimizer: optax.GradientTransformation, seed: int,
                       shardings: Optional[TrainShardings] = None) -> TrainState:
    """Fresh state; with `shardings`, params are placed and the optimizer state is created sharded."""
    def make(p):
        return TrainState(p, optimizer.init(p), jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed))

    if shardings is None:
        return jax.jit(make)(params)
    params = jax.device_put(params, shardings.state.params)
    return jax.jit(make, out_shardings=shardings.state)(params)


def train_state_shapes(params, optimizer: optax.GradientTransformation) -> TrainState:
    """`jax.eval_shape` of the state (input to `cdv2.train.mesh.train_shardings`)."""
    return jax.eval_shape(lambda p: create_train_state(p, optimizer, 0), params)


def _zeros_like_flat(flat: dict) -> dict:
    return {k: jnp.zeros(v.shape, v.dtype) for k, v in flat.items()}


def make_train_step(cfg: TrainConfig, components: Components, optimizer: optax.GradientTransformation,
                    mesh_shardings: Optional[TrainShardings] = None, *, alphas_cumprod=None,
                    compiler_options: Optional[dict] = None):
    """`train_step(state, batch) -> (state, metrics)`, jitted, state donated. metrics: loss (of this
    micro-batch), grad_norm (global norm of its trainable gradient, before clipping), lr (at this
    optimizer step), bg_path (1 when the stage-2 background path ran). With grad_accum_steps k the
    optimizer updates on every k-th call (mean of the k micro-batch gradients); `batch` is one
    micro-batch of `batch_size` samples. `compiler_options` go to `jax.jit` (tests: fast compiles).
    With `mesh_shardings`, fsdp-sharded params are cast to the compute dtype on their shard and
    all-gathered (gradients reduce-scattered back); without, the step runs on the default device.
    A batch with `STOP_KEY` adds metrics["stop"] (its max: the collective preemption decision)."""
    k = cfg.optim.grad_accum_steps
    stage = cfg.stage
    schedule = lr_schedule(cfg.optim)
    alphas = ldm_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    gather = None if mesh_shardings is None else fsdp_gather(mesh_shardings, compute_dtype(cfg.compute_dtype))

    def step_fn(state: TrainState, batch: dict):
        batch = dict(batch)
        stop = batch.pop(STOP_KEY, None)
        opt_step = state.step // k
        micro = state.step % k
        step_key = jax.random.fold_in(state.rng, opt_step)
        b = next(iter(batch.values())).shape[0]
        batch_key = jax.random.fold_in(jax.random.fold_in(step_key, 1), micro)
        rngs = sample_rngs(jax.random.fold_in(step_key, 0), (micro * b).astype(jnp.uint32), b, batch_key)
        ucg = cfg.ucg_rate
        if stage == 1 and cfg.noisy_steps > 0:
            ucg = jnp.where(opt_step < cfg.noisy_steps, cfg.ucg_rate_noisy, cfg.ucg_rate)

        train_p, frozen_p = split_trainable(state.params, stage)

        def loss_of(tp, bg_path: bool):
            params = merge_params(tp, frozen_p)
            if gather is not None:
                params = gather(params)
            return training_loss(params, batch, rngs, comps=components, cfg=cfg, bg_path=bg_path,
                                 ucg_rate=ucg, alphas_cumprod=alphas)

        grad_of = lambda bg: jax.value_and_grad(partial(loss_of, bg_path=bg))
        if stage == 3 and 0.0 < cfg.bg_path_p < 1.0:
            bg_path = jax.random.uniform(jax.random.fold_in(batch_key, 7)) < cfg.bg_path_p
            loss, grads = jax.lax.cond(bg_path, grad_of(True), grad_of(False), train_p)
        else:
            bg_path = stage == 2 or (stage == 3 and cfg.bg_path_p >= 1.0)
            loss, grads = grad_of(bg_path)(train_p)

        full_grads = merge_params(grads, _zeros_like_flat(frozen_p))
        updates, opt_state = optimizer.update(full_grads, state.opt_state, state.params)
        flat_updates, _ = split_trainable(updates, stage)
        new_train = {n: (p + flat_updates[n]).astype(p.dtype) for n, p in train_p.items()}
        new_state = state.replace(params=merge_params(new_train, frozen_p), opt_state=opt_state,
                                  step=state.step + 1)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(opt_step),
                   "bg_path": jnp.asarray(bg_path, jnp.float32)}
        if stop is not None:
            metrics["stop"] = jnp.max(stop.astype(jnp.float32))
        return new_state, metrics

    if mesh_shardings is None:
        return jax.jit(step_fn, donate_argnums=(0,), compiler_options=compiler_options)
    mesh = mesh_shardings.mesh

    def step_on_mesh(state: TrainState, batch: dict):
        # traced with the mesh as the ambient (abstract) mesh: kernels XLA cannot partition (the
        # Pallas flash attention) shard_map themselves over it instead of running on the whole
        # global batch on every device
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step_fn(state, batch)

    replicated = NamedSharding(mesh, P())
    return jax.jit(step_on_mesh, in_shardings=(mesh_shardings.state, mesh_shardings.batch),
                   out_shardings=(mesh_shardings.state, replicated), donate_argnums=(0,),
                   compiler_options=compiler_options)
