"""Manga line extractor res_skip (`lineart_denoise`, `erika.pth`) <-> Flax variables.

Flax nests like torch (`block0/model_0/conv1/model_2/kernel` is `block0.model.0.conv1.model.2.weight`),
so the layout rule maps every key; BatchNorm `running_mean/var` <-> batch_stats `mean/var`,
`num_batches_tracked` dropped (re-listed for the key list)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from cdv2.modules.preprocess_nets.manga_lines import ResSkip
from cdv2.weights.keymaps import line_common
from cdv2.weights.keymaps.common import WeightKeysError

PROBE = (1, 16, 16, 1)


def torch_keys(config: Mapping) -> dict[str, tuple[tuple[int, ...], str]]:
    return line_common.torch_keys(ResSkip(**config), PROBE)


def convert(state: Mapping[str, np.ndarray], config: Mapping) -> dict:
    return line_common.convert(state, ResSkip(**config), PROBE)


def infer_config(state: Mapping[str, np.ndarray]) -> dict:
    n_blocks = line_common.count_indices(state, "block")
    if n_blocks < 4 or n_blocks % 2:
        raise WeightKeysError(f"lineart_denoise: expected an even number of blocks (>= 4), found {n_blocks}")
    n = (n_blocks - 2) // 2   # number of down/up levels

    def width(i):
        return line_common.shape_of(state, f"block{i}.model.0.conv1.model.2.weight", "lineart_denoise")[0]
    return {"widths": tuple(width(i) for i in range(n + 1)),
            "repetitions": tuple(line_common.count_indices(state, f"block{i}.model.") for i in range(n + 1)),
            "up_repetitions": tuple(line_common.count_indices(state, f"block{i}.model.") for i in range(n + 1, 2 * n + 1)),
            "head_width": width(2 * n + 1),
            "head_repetitions": line_common.count_indices(state, f"block{2 * n + 1}.model."),
            "out_channels": line_common.shape_of(state, "conv15.model.2.weight", "lineart_denoise")[0]}

