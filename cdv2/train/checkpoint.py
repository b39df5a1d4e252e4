"""Training checkpoints with orbax: async saves every K steps and on preemption, keep the last N,
restore params + optimizer state + step + RNG (the train-state pytree) and the data position.

The data position is per process: each host reads its own shard, so each writes its own iterator
state (grain's orbax handler: `data/process_{i}-of-{n}.json`) and restores only its own, checking
that the shard it was saved from is the shard this process reads.

Trainable-only: with `trainable` (a predicate on param paths, the stage's split) only the trained
params are stored, next to the optimizer state (which holds nothing for frozen leaves), step, RNG
and data position. The frozen params (VAE, CLIP, the stage's frozen U-Net parts) are referenced by
a record saved with every checkpoint (item `frozen`: where they came from, e.g. the `init_from`
weights dir, and a content fingerprint); a resume reloads them from that source
(`load_frozen_source`) and refuses a source that is gone or whose content changed.

SIGTERM only raises a local flag (`stop_requested`); the decision to save and stop is collective
(see `cdv2.train.step.make_train_step`: the flag rides in the batch and the step all-reduces it),
so every process saves at the same step. A process deciding alone would leave the others waiting in
the step's collectives, or in the checkpoint's barrier, forever."""
from __future__ import annotations

import hashlib
import json
import math
import signal
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import grain
import orbax.checkpoint as ocp

from cdv2.train.stages import path_str

# orbax splits the writing of a replicated array across the processes holding replicas, each one
# slicing out its part with a small compiled program per array shape and slice (hundreds for a
# U-Net, compiled again by every restarted process: minutes on CPU hosts); below this size an
# array is written whole by one replica instead
REPLICA_PARALLEL_MIN_BYTES = 4 << 20
FROZEN_ITEM = "frozen"          # the checkpoint item holding the frozen-source record
RECORD_FORMAT = "cdv2-trainable-only/1"


class _IteratorState:
    """What grain's orbax handler saves and restores: `get_state() -> bytes`, `set_state(bytes)`.
    Restoring checks that the state was saved by the process reading the same shard."""

    def __init__(self, it):
        self.it = it

    def get_state(self) -> bytes:
        return json.dumps(self.it.get_state()).encode()

    def set_state(self, raw: bytes) -> None:
        state = json.loads(raw)
        saved = (state["config"].get("shard_index"), state["config"].get("shard_count"))
        here = (jax.process_index(), jax.process_count())
        if saved != here:
            raise ValueError(f"data-iterator state of shard {saved[0]}/{saved[1]} cannot be restored on "
                             f"process {here[0]} of {here[1]}: each process restores its own shard")
        self.it.set_state(state)

    def start_prefetch(self) -> None:  # called by grain's handler after set_state
        pass


class Checkpointer:
    """`trainable(path) -> bool` (param paths without the "params/" prefix) makes checkpoints
    trainable-only; they then need `frozen_record` (see `frozen_record()`; may be set after
    construction, once the start state is known). Without `trainable` the whole state is saved."""

    def __init__(self, directory, *, every: int, keep: int = 3, async_save: bool = True,
                 trainable: Optional[Callable[[str], bool]] = None, frozen_record: Optional[dict] = None):
        if jax.process_count() > 1:
            _write_small_arrays_whole()
        self.directory = Path(directory).absolute()
        self.every = every
        self.trainable = trainable
        self.frozen_record = frozen_record
        self.stop_requested = False
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True))

    # -- SIGTERM: a local request; the loop stops when the collective decision says so -------------
    def install_sigterm_handler(self) -> None:
        def handler(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, handler)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        """The regular cadence; a function of the step only, hence the same on every process."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, iterator, *, force: bool = False) -> bool:
        """Async: returns at once; the arrays are copied before the next step may donate them.
        `iterator`: this process's `TrainIterator` (its state goes to this process's own file)."""
        if self.trainable is not None and self.frozen_record is None:
            raise ValueError("a trainable-only checkpoint needs the frozen params' record (Checkpointer.frozen_record)")
        items = dict(state=ocp.args.StandardSave(self._stored(state)),
                     data=grain.checkpoint.CheckpointSave(_IteratorState(iterator)))
        if self.frozen_record is not None:
            items[FROZEN_ITEM] = ocp.args.JsonSave(self.frozen_record)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def _stored(self, state: Any) -> dict:
        """The flat leaves a checkpoint holds: all, or all but the frozen params."""
        flat = _nonempty(state)
        if self.trainable is None:
            return flat
        return {k: v for k, v in flat.items() if not k.startswith("params/") or self.trainable(k[len("params/"):])}

    def saved_frozen_record(self, step: Optional[int] = None) -> Optional[dict]:
        """The frozen-source record of checkpoint `step` (default latest); None for a checkpoint
        that holds the whole state (no record)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return read_frozen_record(self.directory, step, self.manager)

    def restore(self, abstract_state: Any, iterator, step: Optional[int] = None, frozen: Optional[dict] = None):
        """-> state of `step` (default: the latest), and `iterator` (built for this process's shard)
        moved to the saved position. `abstract_state`: a pytree of jax.ShapeDtypeStruct with the
        target shardings (e.g. from jax.eval_shape + shardings). `frozen`: {param path: array}
        (placed with the target shardings) for the params a trainable-only checkpoint lacks; None
        for a checkpoint of the whole state (one without a frozen record)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        stored = self._stored(abstract_state) if frozen is not None else _nonempty(abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(stored),
            data=grain.checkpoint.CheckpointRestore(_IteratorState(iterator))))
        fill = {f"params/{k}": v for k, v in (frozen or {}).items()}
        return _refill(abstract_state, {**fill, **out["state"]}, f"checkpoint {self.directory}/{step}")

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _write_small_arrays_whole() -> None:
    """jax.Array handler: replica-parallel writes only for arrays of REPLICA_PARALLEL_MIN_BYTES+."""
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(current, "_min_slice_bytes_for_replica_parallel", None) == REPLICA_PARALLEL_MIN_BYTES:
        return
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
        array_metadata_store=getattr(current, "_array_metadata_store", None)), override=True)


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live state, for restoring into the same layout."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)


def _nonempty(tree: Any) -> dict:
    """Flat {path: leaf} without zero-size leaves, which orbax cannot store (e.g. a 64-channel-head
    warp module narrower than 64 channels in tiny configs has (C, 0) kernels)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): x for p, x in leaves if math.prod(x.shape) > 0}


def _refill(abstract: Any, flat: dict, where: str = "checkpoint") -> Any:
    """Rebuild the pytree of `abstract` from restored non-empty leaves (+ zeros for the empty ones)."""
    def leaf(p, x):
        got = flat.get(path_str(p))
        if got is not None:
            return got
        if math.prod(x.shape) > 0:
            raise ValueError(f"{where}: no value for {path_str(p)} (neither stored nor a frozen param)")
        return jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding) if x.sharding else jnp.zeros(x.shape, x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


# --- the frozen params' source: recorded at the start, reloaded and verified on resume / export ---

def frozen_fingerprint(frozen: dict) -> dict:
    """Content fingerprint of {param path: host array}: a blake2b over the sorted paths, dtypes,
    shapes and bytes (~1 GB/s on one core), with the leaf count and total size for the message."""
    h = hashlib.blake2b(digest_size=16)
    nbytes = 0
    for k in sorted(frozen):
        a = np.ascontiguousarray(np.asarray(frozen[k]))
        h.update(f"{k}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.reshape(-1).view(np.uint8).data if a.size else b"")
        nbytes += a.nbytes
    return {"blake2b": h.hexdigest(), "leaves": len(frozen), "bytes": int(nbytes)}


def frozen_record(source: dict, stage: int, frozen: dict) -> dict:
    """What a trainable-only checkpoint stores about the params it leaves out. `source`:
    {"kind": "init_from", "path": weights dir or file} | {"kind": "init", sd21/diffusers/open_clip/ema,
    "seed"} (SD2.1 + open_clip) | {"kind": "random", "seed"} | {"kind": "given"} (in-memory params:
    a resume must pass the same params again)."""
    return {"format": RECORD_FORMAT, "stage": int(stage), "source": dict(source),
            "fingerprint": frozen_fingerprint(frozen)}


def read_frozen_record(checkpoint_dir, step: int, manager: Optional[ocp.CheckpointManager] = None) -> Optional[dict]:
    """The record saved with checkpoint `step` in `checkpoint_dir` (read with `manager` if given);
    None when it has none (a checkpoint of the whole state)."""
    path = Path(checkpoint_dir).absolute() / str(step) / FROZEN_ITEM
    if not path.exists():
        return None
    args = ocp.args.Composite(**{FROZEN_ITEM: ocp.args.JsonRestore()})
    if manager is not None:
        record = manager.restore(step, args=args)[FROZEN_ITEM]
    else:
        with ocp.CheckpointManager(Path(checkpoint_dir).absolute()) as own:
            record = own.restore(step, args=args)[FROZEN_ITEM]
    if record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path}: unknown frozen-source record format {record.get('format')!r}")
    return record


def describe_source(source: dict) -> str:
    kind = source.get("kind")
    if kind == "init_from":
        return f"the weights {source['path']} (init_from)"
    if kind == "init":
        files = ", ".join(f"{k}={source[k]}" for k in ("sd21", "diffusers", "open_clip") if source.get(k))
        return f"the SD2.1/open_clip init ({files}; seed {source.get('seed')})"
    if kind == "random":
        return f"a random init (seed {source.get('seed')})"
    return "params passed in memory to train()"


def load_frozen_source(record: dict, model_cfg, *, params=None, init_from: Optional[str] = None) -> dict:
    """-> {param path: host array} of the frozen params `record` describes, checked against its
    fingerprint. `params`: in-memory params to take them from instead (required when the run
    started from in-memory params); `init_from`: a weights dir to try when the recorded one is gone
    (moved); either is accepted only if its content matches. Raises FileNotFoundError for a missing
    source, ValueError for changed content."""
    from cdv2.train.stages import split_trainable

    stage, source = record["stage"], record["source"]
    where = describe_source(source)
    if params is None:
        params = _source_params(source, model_cfg, init_from)
    frozen = {k: np.asarray(v) for k, v in split_trainable(params, stage)[1].items()}
    got, want = frozen_fingerprint(frozen), record["fingerprint"]
    if got != want:
        raise ValueError(
            f"the frozen params (stage {stage}: everything not trained) do not match the ones this run started "
            f"from, {where}: fingerprint {got} != recorded {want}. Resume/export with the original frozen "
            "weights (the run's config/train.yaml names them), or start a new run.")
    return frozen


def _source_params(source: dict, model_cfg, init_from: Optional[str]) -> dict:
    kind = source.get("kind")
    if kind == "given":
        raise ValueError("this run started from params passed in memory (train(..., params=...)); its checkpoints "
                         "hold only the trained params, so pass the same params again to resume or export "
                         "(export_checkpoint(..., frozen_from=weights dir or params))")
    if kind == "init_from":
        candidates = [source["path"]] + ([str(init_from)] if init_from else [])
        path = next((c for c in candidates if Path(c).exists()), None)
        if path is None:
            raise FileNotFoundError(
                f"the frozen params of this run come from {source['path']} (init_from), which is missing; "
                "restore it there, or pass its new location (init_from=...) to resume/export")
        from cdv2.weights.pretrained import load_pretrained

        return load_pretrained(path, config=model_cfg)[0]
    if kind == "init":
        for k in ("sd21", "diffusers", "open_clip"):
            if source.get(k) and not Path(source[k]).exists():
                raise FileNotFoundError(f"the frozen params of this run come from {source[k]} ({k}), which is missing")
        from cdv2.weights.sd21_init import init_from_sd21

        return init_from_sd21(model_cfg, jax.random.PRNGKey(source["seed"]), sd21=source.get("sd21"),
                              diffusers=source.get("diffusers"), open_clip=source.get("open_clip"),
                              ema=bool(source.get("ema")))
    if kind == "random":
        from cdv2.model import init_params

        return jax.tree_util.tree_map(np.asarray, init_params(model_cfg, jax.random.PRNGKey(source["seed"])))
    raise ValueError(f"unknown frozen-param source {source!r}")
