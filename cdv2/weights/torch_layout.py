"""The one rule that maps torch state-dict keys and layouts to cdv2's Flax param paths.

cdv2 names its Flax submodules after the torch modules, joining a numeric path segment to the
segment before it with "_": torch `input_blocks.1.0.in_layers.2.weight` is Flax
`input_blocks_1_0/in_layers_2/kernel`. Leaves: a 1-D `weight` (GroupNorm/LayerNorm) is `scale`,
any other `weight` is `kernel`; `bias` stays. Layouts: Linear `[out, in]` -> `[in, out]`,
Conv2d `[out, in, kh, kw]` -> `[kh, kw, in, out]`. Both directions are exact (transposes only).
"""
from __future__ import annotations

import re

import numpy as np

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


def state_dict_to_params(state: dict, prefix: str = "") -> dict:
    """Torch state dict (numpy arrays) -> nested Flax params dict, for keys under `prefix`
    (which is stripped, e.g. "first_stage_model.")."""
    params: dict = {}
    for key, arr in state.items():
        if not key.startswith(prefix):
            continue
        arr = np.asarray(arr)
        path = torch_key_to_path(key[len(prefix):])
        path = path[:-1] + (flax_leaf(path[-1], arr.ndim),)
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = torch_to_flax_array(arr)
    return params


def params_to_state_dict(params: dict, prefix: str = "") -> dict:
    """Inverse of `state_dict_to_params`."""
    out = {}

    def walk(node, path):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, path + (k,))
            else:
                out[prefix + path_to_torch_key(path + (k,))] = flax_to_torch_array(np.asarray(v))

    walk(params, ())
    return out
