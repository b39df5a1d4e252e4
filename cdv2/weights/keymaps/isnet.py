"""ISNetDIS (`isnetis.safetensors`, `sketch-segment.safetensors`) <-> Flax variables.

Keys follow the torch module names one to one (see `common.py`); the app strips any 'module.'
(DataParallel) prefix before loading, and so do we."""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cdv2.modules.preprocess_nets.isnet import ISNetConfig, ISNetDIS
from cdv2.weights.keymaps.common import state_to_variables, strip_prefix, torch_key_shapes


def expected_variables(config: ISNetConfig, size: int = 64):
    """ShapeDtypeStructs of the network's variables (never materialised)."""
    model = ISNetDIS(config)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))


def torch_keys(config: ISNetConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """torch key -> (shape, dtype) of the checkpoint this network loads."""
    return torch_key_shapes(expected_variables(config))


def convert(state: Mapping[str, np.ndarray], config: ISNetConfig) -> dict:
    """Torch state dict (numpy) -> {'params', 'batch_stats'}; raises WeightKeysError on mismatch."""
    return state_to_variables(strip_prefix(state, "module."), expected_variables(config))


def infer_config(state: Mapping[str, np.ndarray]) -> ISNetConfig:
    """The width is conv_in's output channels (64 in the released files)."""
    state = strip_prefix(state, "module.")
    w = np.shape(state["conv_in.weight"])
    return ISNetConfig(width=int(w[0]), out_ch=int(np.shape(state["side1.weight"])[0]))
