"""Training checkpoints with orbax: async saves every K steps and on SIGTERM, keep the last N,
restore params + optimizer state + step + RNG (the train-state pytree) and the data position."""
from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from cdv2.train.stages import path_str


class Checkpointer:
    def __init__(self, directory, *, every: int, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        self._preempted = False
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True))

    # -- SIGTERM: finish the current step, save, stop -------------------------------------------
    def install_sigterm_handler(self) -> None:
        def handler(signum, frame):
            self._preempted = True

        signal.signal(signal.SIGTERM, handler)

    @property
    def preempted(self) -> bool:
        return self._preempted

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self._preempted or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Async: returns at once; the arrays are copied before the next step may donate them."""
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_nonempty(state)),
                                                               data=ocp.args.JsonSave(data_state)), force=force)

    def restore(self, abstract_state: Any, step: Optional[int] = None):
        """-> (state, data_state) of `step` (default: the latest). `abstract_state`: a pytree of
        jax.ShapeDtypeStruct with the target shardings (e.g. from jax.eval_shape + shardings)."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_nonempty(abstract_state)), data=ocp.args.JsonRestore()))
        return _refill(abstract_state, out["state"]), out["data"]

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
