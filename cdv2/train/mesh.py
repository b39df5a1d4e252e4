"""Device mesh ("data", "fsdp"), parameter / optimizer-state / batch shardings from config rules,
and multi-process start-up. Sharding lives here, never in the modules.

Multi-process: `maybe_initialize_distributed()` calls `jax.distributed.initialize()` when the
environment describes a multi-process job, i.e. when any of these is set:
  JAX_COORDINATOR_ADDRESS                  (explicit; JAX_NUM_PROCESSES / JAX_PROCESS_ID are passed on)
  SLURM_JOB_ID with SLURM_NTASKS > 1       (srun; jax reads the rest of the SLURM_* variables)
  OMPI_COMM_WORLD_SIZE > 1                 (mpirun, Open MPI)
  TPU_WORKER_HOSTNAMES listing > 1 host    (multi-host Cloud TPU slice)
and CDV2_NO_DISTRIBUTED is not "1". Otherwise it is a single process and nothing happens.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cdv2.train.config import MeshConfig, ShardingRule
from cdv2.train.stages import path_str

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")   # the batch dim is split over every device


def _multi_process_env(env=os.environ) -> Optional[str]:
    if env.get("CDV2_NO_DISTRIBUTED") == "1":
        return None
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "multi-host TPU"
    return None


def maybe_initialize_distributed() -> Optional[str]:
    """Start jax's distributed runtime when the environment says this is a multi-process job
    (see the module docstring). Returns the detected environment, or None (single process)."""
    kind = _multi_process_env()
    if kind is None:
        return None
    kwargs = {}
    if kind == "JAX_COORDINATOR_ADDRESS":
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
        if "JAX_NUM_PROCESSES" in os.environ:
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in os.environ:
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return kind


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int]:
    fsdp = cfg.fsdp
    if fsdp < 1 or device_count % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the device count {device_count}")
    data = device_count // fsdp if cfg.data == -1 else cfg.data
    if data * fsdp != device_count:
        raise ValueError(f"mesh data x fsdp = {data} x {fsdp} = {data * fsdp} devices, but jax sees "
                         f"{device_count} (jax.device_count()); set mesh.data=-1 to use all of them")
    return data, fsdp


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence] = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all of jax.devices())."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), AXES)


def _axis_size(mesh: Mesh, entry) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(mesh.shape[n] for n in names)


def auto_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """The default rule: the largest dim divisible by the fsdp size goes along "fsdp" (the later dim
    on ties: output features); leaves below `min_size` elements or with no such dim are replicated."""
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    best = None
    for i, n in enumerate(shape):
        if n % fsdp_size == 0 and (best is None or n >= shape[best]):
            best = i
    if best is None:
        return P()
    return P(*[("fsdp" if i == best else None) for i in range(len(shape))])


def leaf_spec(path: str, shape: Sequence[int], rules: Sequence[ShardingRule], mesh: Mesh,
              min_size: int) -> P:
    for rule in rules:
        if not re.search(rule.pattern, path):
            continue
        if rule.spec == "auto":
            return auto_spec(shape, mesh.shape["fsdp"], min_size)
        if rule.spec == "replicated":
            return P()
        spec = tuple(rule.spec)
        if len(spec) != len(shape):
            raise ValueError(f"sharding rule {rule.pattern!r}: spec {spec} has {len(spec)} entries but "
                             f"{path} has shape {tuple(shape)}")
        for n, entry in zip(shape, spec):
            if n % _axis_size(mesh, entry):
                raise ValueError(f"sharding rule {rule.pattern!r}: dim {n} of {path} {tuple(shape)} is not "
                                 f"divisible by mesh axes {entry} (size {_axis_size(mesh, entry)})")
        return P(*spec)
    return P()


def param_specs(params, rules: Sequence[ShardingRule], mesh: Mesh, min_size: int):
    """PartitionSpec pytree over `params` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: leaf_spec(path_str(kp), x.shape, rules, mesh, min_size), params)


def _dict_path(key_path) -> list[str]:
    return [str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey)]


def opt_state_specs(opt_state, params, p_specs):
    """Optimizer-state leaves shaped like a param (Adam moments, accumulators) take that param's
    spec, found by the longest suffix of dict keys of the state leaf's path that names a param;
    everything else (counts, scalars) is replicated."""
    by_path = {}
    jax.tree_util.tree_map_with_path(
        lambda kp, x, s: by_path.__setitem__("/".join(_dict_path(kp)), (tuple(x.shape), s)), params, p_specs,
        is_leaf=lambda x: isinstance(x, P))

    def spec(kp, x):
        keys = _dict_path(kp)
        for i in range(len(keys)):
            hit = by_path.get("/".join(keys[i:]))
            if hit is not None and hit[0] == tuple(x.shape):
                return hit[1]
        return P()

    return jax.tree_util.tree_map_with_path(spec, opt_state)


@dataclass(frozen=True)
class TrainShardings:
    """What `make_train_step` needs: the TrainState sharding pytree and the batch sharding."""

    mesh: Mesh
    state: Any
    batch: NamedSharding


def train_shardings(mesh: Mesh, state_shapes, rules: Sequence[ShardingRule], min_size: int) -> TrainShardings:
    """Shardings for a TrainState (arrays or `jax.eval_shape` structs): params by the rules, the
    optimizer state like its params, step and rng replicated."""
    p_specs = param_specs(state_shapes.params, rules, mesh, min_size)
    o_specs = opt_state_specs(state_shapes.opt_state, state_shapes.params, p_specs)
    named = lambda specs: jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    state = state_shapes.replace(params=named(p_specs), opt_state=named(o_specs),
                                 step=NamedSharding(mesh, P()), rng=NamedSharding(mesh, P()))
    return TrainShardings(mesh, state, batch_sharding(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch dim over ("data", "fsdp"); the other dims replicated (a prefix spec fits any rank)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host numpy batch -> global jax arrays. Each process passes ITS OWN part of the global batch
    (the data pipeline shards by process), so this works unchanged with several processes."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
