"""Shared plumbing of the line-extractor key maps: build a net from a config dict, list its
variables with `jax.eval_shape` (never materialised), convert a torch state dict through
`common.py` (one `WeightKeysError` listing missing/unexpected/mis-shaped keys)."""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cdv2.weights.keymaps.common import WeightKeysError, state_to_variables, torch_key_shapes


def expected_variables(model, probe_shape: tuple[int, int, int, int]):
    """ShapeDtypeStructs of `model`'s variables for a probe input of `probe_shape` (NHWC)."""
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(probe_shape, jnp.float32))


def torch_keys(model, probe_shape, native: re.Pattern | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """torch key -> (shape, dtype) of the checkpoint `model` loads."""
    return torch_key_shapes(expected_variables(model, probe_shape), native)


def convert(state: Mapping[str, np.ndarray], model, probe_shape, native: re.Pattern | None = None) -> dict:
    """Torch state dict (numpy) -> {'params', 'batch_stats'?} float32 numpy trees."""
    state = {k: np.asarray(v) for k, v in state.items()}
    return state_to_variables(state, expected_variables(model, probe_shape), native=native)


def count_indices(state: Mapping[str, Any], prefix: str) -> int:
    """How many distinct `<prefix><int>.` module indices the state dict holds."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pat.match(k))})


def shape_of(state: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    if key not in state:
        raise WeightKeysError(f"{what}: weight file lacks {key!r}; is it the right network's file?")
    return tuple(np.shape(state[key]))

