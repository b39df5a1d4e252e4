"""Training checkpoints with orbax: async saves every K steps and on preemption, keep the last N,
restore params + optimizer state + step + RNG (the train-state pytree) and the data position.

The data position is per process: each host reads its own shard, so each writes its own iterator
state (grain's orbax handler: `data/process_{i}-of-{n}.json`) and restores only its own, checking
that the shard it was saved from is the shard this process reads.

SIGTERM only raises a local flag (`stop_requested`); the decision to save and stop is collective
(see `cdv2.train.step.make_train_step`: the flag rides in the batch and the step all-reduces it),
so every process saves at the same step. A process deciding alone would leave the others waiting in
the step's collectives, or in the checkpoint's barrier, forever."""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import grain
import orbax.checkpoint as ocp

from cdv2.train.stages import path_str


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
    def __init__(self, directory, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
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
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_nonempty(state)),
            data=grain.checkpoint.CheckpointSave(_IteratorState(iterator))), force=force)

    def restore(self, abstract_state: Any, iterator, step: Optional[int] = None):
        """-> state of `step` (default: the latest), and `iterator` (built for this process's shard)
        moved to the saved position. `abstract_state`: a pytree of jax.ShapeDtypeStruct with the
        target shardings (e.g. from jax.eval_shape + shardings)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_nonempty(abstract_state)),
            data=grain.checkpoint.CheckpointRestore(_IteratorState(iterator))))
        return _refill(abstract_state, out["state"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a live state, for restoring into the same layout."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)


def _nonempty(tree: Any) -> dict:
    """Flat {path: leaf} without zero-size leaves, which orbax cannot store (e.g. a 64-channel-head
    warp module narrower than 64 channels in tiny configs has (C, 0) kernels)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): x for p, x in leaves if math.prod(x.shape) > 0}


def _refill(abstract: Any, flat: dict) -> Any:
    """Rebuild the pytree of `abstract` from restored non-empty leaves (+ zeros for the empty ones)."""
    def leaf(p, x):
        got = flat.get(path_str(p))
        if got is not None:
            return got
        return jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding) if x.sharding else jnp.zeros(x.shape, x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)
