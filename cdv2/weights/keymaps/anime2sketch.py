"""Anime2Sketch UnetGenerator (`lineart`, `netG.pth`) <-> Flax variables.

The Flax blocks nest like torch's (`model/model_1/model_3/model_1/kernel` is
`model.model.1.model.3.model.1.weight`), so the layout rule maps every key; ConvTranspose weights
[in, out, kh, kw] take the same transpose ([kh, kw, out, in]). No norm parameters (affine=False)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from cdv2.modules.preprocess_nets.anime2sketch import UnetGenerator
from cdv2.weights.keymaps import line_common


def _probe(config: Mapping) -> tuple[int, int, int, int]:
    side = 2 ** config.get("num_downs", 8)
    return (1, side, side, config.get("in_channels", 3))


def torch_keys(config: Mapping) -> dict[str, tuple[tuple[int, ...], str]]:
    return line_common.torch_keys(UnetGenerator(**config), _probe(config))


def convert(state: Mapping[str, np.ndarray], config: Mapping) -> dict:
    return line_common.convert(state, UnetGenerator(**config), _probe(config))


def infer_config(state: Mapping[str, np.ndarray]) -> dict:
    first = line_common.shape_of(state, "model.model.0.weight", "lineart")
    last = line_common.shape_of(state, "model.model.3.weight", "lineart")
    n_convs = sum(1 for k, v in state.items() if k.endswith(".weight") and np.ndim(v) == 4)
    return {"ngf": first[0], "in_channels": first[1], "out_channels": last[1], "num_downs": n_convs // 2}
