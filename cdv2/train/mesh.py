"""Device mesh ("data", "fsdp"), parameter / optimizer-state / batch shardings from config rules.
Sharding lives here, never in the modules. Multi-process start-up: `cdv2.train.distributed`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cdv2.train.config import MeshConfig, ShardingRule
from cdv2.train.distributed import _multi_process_env, maybe_initialize_distributed  # noqa: F401 (re-export)
from cdv2.train.stages import path_str
from cdv2.weights.tree import flatten

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")   # the batch dim is split over every device


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, int]:
    """(data, fsdp) of the whole mesh: ICI x DCN per axis."""
    dcn = cfg.dcn_data * cfg.dcn_fsdp
    if cfg.dcn_data < 1 or cfg.dcn_fsdp < 1 or device_count % dcn:
        raise ValueError(f"mesh.dcn_data x mesh.dcn_fsdp = {dcn} must divide the device count {device_count}")
    ici_count = device_count // dcn
    fsdp = cfg.fsdp
    if fsdp < 1 or ici_count % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the device count {ici_count}"
                         f"{' per slice' if dcn > 1 else ''}")
    data = ici_count // fsdp if cfg.data == -1 else cfg.data
    if data * fsdp != ici_count:
        raise ValueError(f"mesh data x fsdp = {data} x {fsdp} = {data * fsdp} devices, but jax sees "
                         f"{ici_count} (jax.device_count(){' / slices' if dcn > 1 else ''}); set mesh.data=-1 "
                         f"to use all of them")
    return data * cfg.dcn_data, fsdp * cfg.dcn_fsdp


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence] = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: all of jax.devices()): `jax.make_mesh`
    (device order chosen for the interconnect), or with `dcn_*` > 1 a hybrid mesh whose DCN factors
    run across slices (TPU) or processes (elsewhere), so that only those collectives cross the
    slow network."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    auto = (AxisType.Auto,) * len(AXES)
    if cfg.dcn_data * cfg.dcn_fsdp > 1:
        ici = (shape[0] // cfg.dcn_data, shape[1] // cfg.dcn_fsdp)
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, (cfg.dcn_data, cfg.dcn_fsdp), devices, process_is_granule=not hasattr(devices[0], "slice_index"))
        return Mesh(grid, AXES, axis_types=auto)
    return jax.make_mesh(shape, AXES, auto, devices=devices)


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
    specs = flatten(p_specs)
    by_path = {k: (tuple(x.shape), specs[k]) for k, x in flatten(params).items()}

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
