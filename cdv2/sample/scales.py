"""Per-layer reference strength (the UI's "reference strength" and cross-attention group scales).

The 16 cross-attention layers in depth-first order (ARCHITECTURE.md §3.2 table):
    0-1 input_blocks 1/2 (high), 2-3 input 4/5 (middle), 4-5 input 7/8 (low), 6 middle block,
    7-9 output 3/4/5 (low), 10-12 output 6/7/8 (middle), 13-15 output 9/10/11 (high).

Deliberate differences from the authors' UI (documented in docs/DIFFERENCES.md), unless
`authors_layer_mapping=True` reproduces their applied values exactly:
* their group mapping never touches layers 6 and 13-15, so "reference strength" had no effect
  there; here `strength` multiplies every layer (identical at the default strength 1);
* their "accurate" per-layer mode (`set_cas_scales`: `args[5:]`) shifts every slider by one (layer i
  got slider i+1, layer 15 kept 1) and ignores the strength; here `per_layer[i]` is layer i, times
  `strength`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

NUM_SD21_ATTENTION_LAYERS = 16
ENCODER_LAYERS = (0, 1, 2, 3, 4, 5)
MIDDLE_RES_LAYERS = (2, 3, 10, 11, 12)   # "Color crossattn scale"
LOW_RES_LAYERS = (4, 5, 7, 8, 9)         # "Semantics crossattn scale"


def reference_scales(strength: float = 1.0, *, encoder_scale: float = 1.0, middle_scale: float = 1.0,
                     low_scale: float = 1.0, per_layer: Optional[Sequence[float]] = None,
                     authors_layer_mapping: bool = False) -> np.ndarray:
    """(16,) float32 multipliers of each cross-attention output (before to_out).

    Group scales apply in the authors' order (encoder, then middle overrides, then low overrides);
    `per_layer`, when given, replaces the group scales entirely (16 values, the UI's "accurate
    crossattn control" sliders 0..15). `authors_layer_mapping`: the values the authors' app really
    applies (groups: layers 6 and 13-15 stay 1; per-layer: layer i = slider i+1, layer 15 = 1, no
    strength)."""
    if per_layer is not None:
        sliders = np.asarray(per_layer, np.float64)
        if sliders.shape != (NUM_SD21_ATTENTION_LAYERS,):
            raise ValueError(f"per_layer needs {NUM_SD21_ATTENTION_LAYERS} values, got shape {sliders.shape}")
        if authors_layer_mapping:
            return np.concatenate([sliders[1:], [1.0]]).astype(np.float32)
        return (sliders * strength).astype(np.float32)
    groups = ((ENCODER_LAYERS, encoder_scale), (MIDDLE_RES_LAYERS, middle_scale), (LOW_RES_LAYERS, low_scale))
    if authors_layer_mapping:  # python floats enc*strength etc., as their scale dict holds them
        scales = np.ones(NUM_SD21_ATTENTION_LAYERS)
        for layers, v in groups:
            scales[list(layers)] = v * strength
        return scales.astype(np.float32)
    scales = np.ones(NUM_SD21_ATTENTION_LAYERS)
    for layers, v in groups:
        scales[list(layers)] = v
    return (scales * strength).astype(np.float32)
