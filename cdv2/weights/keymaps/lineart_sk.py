"""LineartDetector generator (`lineart_sk`, `sk_model.pth`) <-> Flax variables.

The checkpoint holds the `Generator`'s keys without a `model.` prefix (`model0.1.weight`); Flax
names follow the layout rule (`model2_0/conv_block_5/kernel`). No norm parameters (InstanceNorm)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from cdv2.modules.preprocess_nets.lineart_sk import LineartGenerator
from cdv2.weights.keymaps import line_common
from cdv2.weights.keymaps.common import WeightKeysError

PROBE = (1, 8, 8, 3)


def torch_keys(config: Mapping) -> dict[str, tuple[tuple[int, ...], str]]:
    return line_common.torch_keys(LineartGenerator(**config), PROBE)


def convert(state: Mapping[str, np.ndarray], config: Mapping) -> dict:
    return line_common.convert(state, LineartGenerator(**config), PROBE)


def infer_config(state: Mapping[str, np.ndarray]) -> dict:
    first = line_common.shape_of(state, "model0.1.weight", "lineart_sk")
    if first[1] != 3:
        raise WeightKeysError(f"lineart_sk: model0.1.weight expects {first[1]} input channels, the app feeds RGB (3)")
    last = line_common.shape_of(state, "model4.1.weight", "lineart_sk")
    return {"width": first[0], "n_residual_blocks": line_common.count_indices(state, "model2."), "out_channels": last[0]}
