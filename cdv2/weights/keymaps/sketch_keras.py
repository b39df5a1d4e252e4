"""SketchKeras (`lineart_keras`, `model.pth`) <-> Flax variables.

torch `downblock_2.5.weight` <-> params `downblock_2_5/kernel` (the layout rule; the module names
`downblock_<n>`/`upblock_<n>` natively end in "_<digit>", declared `NATIVE` for the inverse);
BatchNorm `running_mean/var` <-> batch_stats `mean/var`, `num_batches_tracked` dropped."""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from cdv2.modules.preprocess_nets.sketch_keras import SketchKeras
from cdv2.weights.keymaps import line_common

NATIVE = re.compile(r"(down|up)block_\d+")
PROBE = (1, 32, 32, 1)


def torch_keys(config: Mapping) -> dict[str, tuple[tuple[int, ...], str]]:
    return line_common.torch_keys(SketchKeras(**config), PROBE[:3] + (config.get("in_channels", 1),), NATIVE)


def convert(state: Mapping[str, np.ndarray], config: Mapping) -> dict:
    return line_common.convert(state, SketchKeras(**config), PROBE[:3] + (config.get("in_channels", 1),), NATIVE)


def infer_config(state: Mapping[str, np.ndarray]) -> dict:
    first = line_common.shape_of(state, "downblock_1.1.weight", "lineart_keras")
    last = line_common.shape_of(state, "last_conv.weight", "lineart_keras")
    return {"width": first[0], "in_channels": first[1], "out_channels": last[0]}
