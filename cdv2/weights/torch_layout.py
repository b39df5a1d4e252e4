"""The one rule that maps torch state-dict keys and layouts to cdv2's Flax param paths.

cdv2 names its Flax submodules after the torch modules, joining a numeric path segment to the
segment before it with "_": torch `input_blocks.1.0.in_layers.2.weight` is Flax
`input_blocks_1_0/in_layers_2/kernel`. Leaves: a 1-D `weight` (GroupNorm/LayerNorm) is `scale`,
any other `weight` is `kernel`; `bias` stays. Layouts: Linear `[out, in]` -> `[in, out]`,
Conv2d `[out, in, kh, kw]` -> `[kh, kw, in, out]`. Both directions are exact (transposes only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from cdv2.weights.tree import flatten, unflatten

_DIGIT_RUN = re.compile(r"((?:_\d+)+)(?=\.|$)")
# the SD VAE's mid block is the one torch name that natively ends in "_<digit>"
_VAE_MID = re.compile(r"(^|\.)mid\.(block|attn)\.([12])(?=\.)")


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """`a.b.0.c.weight` -> ('a', 'b_0', 'c', leaf); leaf decided by `flax_leaf`."""
    out: list[str] = []
    for seg in key.split("."):
        if seg.isdigit() and out:
            out[-1] = f"{out[-1]}_{seg}"
        else:
            out.append(seg)
    return tuple(out)


def flax_leaf(torch_leaf: str, ndim: int) -> str:
    if torch_leaf == "weight":
        return "scale" if ndim == 1 else "kernel"
    return torch_leaf


def torch_leaf(flax_leaf_name: str) -> str:
    return "weight" if flax_leaf_name in ("scale", "kernel") else flax_leaf_name


def path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of `torch_key_to_path` (with the leaf renamed back to torch's)."""
    segs = list(path[:-1]) + [torch_leaf(path[-1])]
    key = ".".join(segs)
    key = _DIGIT_RUN.sub(lambda m: m.group(1).replace("_", "."), key)
    return _VAE_MID.sub(r"\1mid.\2_\3", key)


def torch_to_flax_array(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return np.ascontiguousarray(arr.T)
    if arr.ndim == 4:
        return np.ascontiguousarray(arr.transpose(2, 3, 1, 0))
    return arr


def flax_to_torch_array(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        return np.ascontiguousarray(arr.T)
    if arr.ndim == 4:
        return np.ascontiguousarray(arr.transpose(3, 2, 0, 1))
    return arr


def torch_shape_to_flax(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 2:
        return (shape[1], shape[0])
    if len(shape) == 4:
        return (shape[2], shape[3], shape[1], shape[0])
    return tuple(shape)


def flax_shape_to_torch(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Inverse of `torch_shape_to_flax`."""
    if len(shape) == 2:
        return (shape[1], shape[0])
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


@dataclass(frozen=True)
class KeyMap:
    """One source's declarative key map: this module's rule plus that source's exceptions.

    raw:     {torch key: Flax path} of nn.Parameters used as-is (no rename, no transpose);
    renames: (torch suffix, suffix the rule understands), e.g. MultiheadAttention's fused
             `attn.in_proj_weight` -> `attn.in_proj.weight`;
    native:  segments that natively end in "_<digits>" (open_clip's `ln_1`), kept by the inverse.
    Keys here are relative to the source's prefix."""

    raw: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    renames: tuple[tuple[str, str], ...] = ()
    native: Optional[str] = None  # regex matched against a whole segment

    def to_path(self, key: str, ndim: int) -> tuple[str, ...]:
        if key in self.raw:
            return tuple(self.raw[key])
        for torch_suffix, rule_suffix in self.renames:
            if key.endswith(torch_suffix):
                key = key[: -len(torch_suffix)] + rule_suffix
                break
        path = torch_key_to_path(key)
        return path[:-1] + (flax_leaf(path[-1], ndim),)

    def is_raw(self, path: tuple[str, ...]) -> bool:
        return tuple(path) in self._raw_paths

    @property
    def _raw_paths(self) -> dict:
        return {tuple(p): k for k, p in self.raw.items()}

    def to_key(self, path: tuple[str, ...]) -> str:
        path = tuple(path)
        if path in self._raw_paths:
            return self._raw_paths[path]
        if self.native is None:
            key = path_to_torch_key(path)
        else:
            keep = re.compile(self.native)
            segs = [s if keep.fullmatch(s) else _DIGIT_RUN.sub(lambda m: m.group(1).replace("_", "."), s)
                    for s in path[:-1]]
            key = ".".join(segs + [torch_leaf(path[-1])])
        for torch_suffix, rule_suffix in self.renames:
            if key.endswith(rule_suffix):
                return key[: -len(rule_suffix)] + torch_suffix
        return key

    def to_flax(self, key: str, arr: np.ndarray) -> np.ndarray:
        return arr if key in self.raw else torch_to_flax_array(arr)

    def to_torch(self, path: tuple[str, ...], arr: np.ndarray) -> np.ndarray:
        return arr if self.is_raw(path) else flax_to_torch_array(arr)

    def torch_shape(self, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape) if self.is_raw(path) else flax_shape_to_torch(tuple(shape))

    def flax_shape(self, key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape) if key in self.raw else torch_shape_to_flax(tuple(shape))


LAYOUT = KeyMap()  # the plain rule (U-Net, encoders, VAE)


def state_dict_to_params(state: dict, prefix: str = "") -> dict:
    """Torch state dict (numpy arrays) -> nested Flax params dict, for keys under `prefix`
    (which is stripped, e.g. "first_stage_model.")."""
    flat = {}
    for key, arr in state.items():
        if key.startswith(prefix):
            arr = np.asarray(arr)
            flat[LAYOUT.to_path(key[len(prefix):], arr.ndim)] = LAYOUT.to_flax(key, arr)
    return unflatten(flat, sep=None)


def params_to_state_dict(params: dict, prefix: str = "") -> dict:
    """Inverse of `state_dict_to_params`."""
    return {prefix + LAYOUT.to_key(p): LAYOUT.to_torch(p, np.asarray(v)) for p, v in flatten(params, sep=None).items()}
