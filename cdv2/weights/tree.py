"""The one param-tree flattener: nested dict <-> flat {"a/b/c": leaf} (or tuple paths).

Built on `flax.traverse_util`; every part of cdv2 that needs flat param names (converters,
weights directories, training stages, sharding rules) uses these.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from flax import traverse_util


def flatten(tree: Mapping, sep: Optional[str] = "/") -> dict:
    """{"a/b/c": leaf}; with `sep=None` the keys are path tuples ("a", "b", "c")."""
    return traverse_util.flatten_dict(tree, sep=sep)


def unflatten(flat: Mapping, sep: Optional[str] = "/") -> dict:
    """Inverse of `flatten` (same `sep`); returns plain nested dicts."""
    return traverse_util.unflatten_dict(dict(flat), sep=sep)


def map_leaves(fn: Callable[[Any], Any], tree: Mapping) -> dict:
    """The same tree with `fn` applied to every leaf (leaves: anything that is not a dict)."""
    return unflatten({k: fn(v) for k, v in flatten(tree, sep=None).items()}, sep=None)


def leaf_shape(leaf) -> tuple[int, ...]:
    """Shape of an expected-shapes leaf: a tuple/list of ints, or anything with .shape
    (jax.ShapeDtypeStruct, arrays)."""
    return tuple(int(d) for d in (leaf.shape if hasattr(leaf, "shape") else leaf))
