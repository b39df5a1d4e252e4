"""Torch state dict <-> Flax variables for the preprocessor networks (BN, LN, Swin buffers).

The layout rule is `cdv2/weights/torch_layout.py` (numeric segments joined with "_", Linear/Conv
transposes, 1-D weight -> scale). Additions for these nets:
- BatchNorm running statistics go to the `batch_stats` collection (`running_mean` -> `mean`,
  `running_var` -> `var`); `num_batches_tracked` is dropped (unused in eval) and re-created when
  listing torch keys.
- Swin's `relative_position_bias_table` (2-D) is a raw parameter, not a Linear: no transpose.
  `relative_position_index` is deterministic: dropped, and listed back from the table's shape.
- Some torch module names natively end in "_<digit>" (`conv_ms_spvn_4`, `gdt_convs_4`): the
  caller passes them as `native` so the inverse keeps that "_<digit>".
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np
from flax import traverse_util

from cdv2.weights.torch_layout import flax_leaf, torch_key_to_path, torch_shape_to_flax, torch_to_flax_array

_BUFFERS = {"running_mean": "mean", "running_var": "var"}
_BUFFERS_INV = {v: k for k, v in _BUFFERS.items()}
OPTIONAL_LEAVES = ("num_batches_tracked", "relative_position_index")  # may be absent from a file
_RAW_PARAMS = ("relative_position_bias_table",)


class WeightKeysError(ValueError):
    """A weight file does not match the network: lists every missing/unexpected/mis-shaped key."""


def torch_entry_to_flax(key: str, shape: tuple[int, ...]):
    """(collection, flax path, flax shape, transform) for a torch key, or None if it is dropped."""
    path = torch_key_to_path(key)
    leaf = path[-1]
    if leaf in OPTIONAL_LEAVES:
        return None
    if leaf in _BUFFERS:
        return "batch_stats", path[:-1] + (_BUFFERS[leaf],), tuple(shape), np.asarray
    if leaf in _RAW_PARAMS:
        return "params", path, tuple(shape), np.asarray
    return "params", path[:-1] + (flax_leaf(leaf, len(shape)),), torch_shape_to_flax(tuple(shape)), torch_to_flax_array


def _segment_to_torch(seg: str, native: re.Pattern | None) -> str:
    """'layers_0' -> 'layers.0'; a native 'gdt_convs_4_0' -> 'gdt_convs_4.0'."""
    head = ""
    if native is not None and (m := native.match(seg)):
        head, seg = m.group(0), seg[m.end():]
    m = re.search(r"(?:_\d+)+$", seg)
    return head + (seg[:m.start()] + m.group(0).replace("_", ".") if m else seg)


def flax_entry_to_torch(collection: str, path: tuple[str, ...], shape: tuple[int, ...],
                        native: re.Pattern | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """torch key(s) -> (shape, dtype) for one Flax leaf (a BN `mean` also yields its counter)."""
    mods = ".".join(_segment_to_torch(s, native) for s in path[:-1])
    leaf = path[-1]
    if collection == "batch_stats":
        out = {f"{mods}.{_BUFFERS_INV[leaf]}": (tuple(shape), "float32")}
        if leaf == "mean":
            out[f"{mods}.num_batches_tracked"] = ((), "int64")
        return out
    if leaf in _RAW_PARAMS:
        side = int(round(math.sqrt(shape[0])))
        n = ((side + 1) // 2) ** 2
        return {f"{mods}.{leaf}": (tuple(shape), "float32"),
                f"{mods}.relative_position_index": ((n, n), "int64")}
    if leaf in ("kernel", "scale"):
        tshape = {2: lambda s: (s[1], s[0]), 4: lambda s: (s[3], s[2], s[0], s[1])}.get(len(shape), tuple)(shape)
        return {f"{mods}.weight": (tuple(tshape), "float32")}
    return {f"{mods}.{leaf}": (tuple(shape), "float32")}


def torch_key_shapes(variables: Mapping, native: re.Pattern | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """All torch keys (with shape, dtype) that a Flax variables tree (arrays or ShapeDtypeStructs)
    corresponds to, in the original checkpoint format."""
    out: dict = {}
    for coll in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(dict(variables.get(coll, {}))).items():
            out.update(flax_entry_to_torch(coll, path, tuple(leaf.shape), native))
    return out


def state_to_variables(state: Mapping[str, np.ndarray], expected: Mapping, *, dtype=np.float32,
                       native: re.Pattern | None = None) -> dict:
    """Torch state dict -> Flax variables shaped like `expected` (an eval_shape of `init`).

    Every problem is collected and raised as one `WeightKeysError`: keys the network needs that
    the file lacks, keys the file has that the network does not use, and mis-shaped arrays."""
    want = {(c,) + p: tuple(v.shape) for c in ("params", "batch_stats")
            for p, v in traverse_util.flatten_dict(dict(expected.get(c, {}))).items()}
    flat, unexpected, misshaped, seen = {}, [], [], set()
    for key, arr in state.items():
        arr = np.asarray(arr)
        entry = torch_entry_to_flax(key, arr.shape)
        if entry is None:
            continue
        coll, path, fshape, transform = entry
        full = (coll,) + path
        seen.add(full)
        if full not in want:
            unexpected.append(key)
        elif want[full] != fshape:
            misshaped.append(f"{key}: file {tuple(arr.shape)}, network wants (flax) {want[full]}")
        else:
            flat[full] = transform(arr).astype(dtype)
    missing = [next(iter(flax_entry_to_torch(k[0], k[1:], want[k], native))) for k in want if k not in seen]
    if missing or unexpected or misshaped:
        lines = ([f"missing ({len(missing)}): " + ", ".join(sorted(missing)[:50])] if missing else []) + \
                ([f"unexpected ({len(unexpected)}): " + ", ".join(sorted(unexpected)[:50])] if unexpected else []) + \
                ([f"mis-shaped ({len(misshaped)}): " + "; ".join(misshaped[:50])] if misshaped else [])
        raise WeightKeysError("weight file does not match the network:\n  " + "\n  ".join(lines))
    return traverse_util.unflatten_dict(flat)


def strip_prefix(state: Mapping[str, np.ndarray], token: str) -> dict:
    """The app's loader: `key.replace(token, '')` on every key containing it (e.g. 'module.')."""
    return {k.replace(token, "") if token in k else k: v for k, v in state.items()}


def variables_to_state(variables: Mapping, native: re.Pattern | None = None) -> dict[str, np.ndarray]:
    """Inverse of `state_to_variables`: Flax variables -> torch state dict (numpy, torch layouts),
    with the dropped buffers re-created (`num_batches_tracked` = 0, `relative_position_index`)."""
    from cdv2.modules.preprocess_nets.swin import relative_position_index

    out: dict[str, np.ndarray] = {}
    for coll in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(dict(variables.get(coll, {}))).items():
            arr = np.asarray(leaf)
            for key, (shape, dtype) in flax_entry_to_torch(coll, path, arr.shape, native).items():
                if key.endswith("num_batches_tracked"):
                    out[key] = np.zeros((), np.int64)
                elif key.endswith("relative_position_index"):
                    out[key] = relative_position_index(int(round(shape[0] ** 0.5))).astype(np.int64)
                elif arr.ndim in (2, 4) and path[-1] == "kernel":
                    out[key] = np.ascontiguousarray(arr.T if arr.ndim == 2 else arr.transpose(3, 2, 0, 1))
                else:
                    out[key] = arr
    return out
