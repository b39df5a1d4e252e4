"""The authors' v2 checkpoint (`v2-full.safetensors`, `.ckpt`, `.pth`) <-> cdv2 params.

Torch prefixes map to cdv2 param groups by `GROUPS`; inside a group, paths and layouts follow
`torch_layout` exactly. Conversion validates the whole file against the model's expected shapes
first (from the header only, so a wrong file fails in seconds) and reports every missing,
unexpected and mis-shaped key in one `CheckpointMismatchError`; then it streams the tensors one at
a time, so peak memory is the fp32 params plus one tensor. Export is the exact inverse: same keys,
torch shapes and (recorded) dtypes, so a round trip reproduces the source file bit for bit.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np
from tqdm import tqdm

from .safetensors_stream import SafetensorsReader, write_safetensors  # noqa: F401 (re-exported)
from .torch_layout import (flax_leaf, flax_to_torch_array, path_to_torch_key, torch_key_to_path,
                           torch_shape_to_flax, torch_to_flax_array)

# torch state-dict prefix -> cdv2 param group (CLIP is not in the authors' file: cdv2.weights.open_clip)
GROUPS = (
    ("model.diffusion_model.", "unet"),
    ("control_encoder.", "sketch_encoder"),
    ("bg_encoder.", "bg_encoder"),
    ("style_encoder.", "style_encoder"),
    ("first_stage_model.", "vae"),
)
_PREFIX_OF_GROUP = {group: prefix for prefix, group in GROUPS}

# the DDPM buffers the authors' LatentDiffusion registers (persistent, fp32, shape [timesteps])
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
_LIST_LIMIT = 40  # entries shown per category in an error message (the exception keeps them all)


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model. `missing`: [(name, expected shape)]; `unexpected`:
    [(name, shape)]; `misshaped`: [(name, expected shape, got shape)]; `problems`: [str]."""

    def __init__(self, source, missing=(), unexpected=(), misshaped=(), problems=()):
        self.source, self.missing, self.unexpected = str(source), list(missing), list(unexpected)
        self.misshaped, self.problems = list(misshaped), list(problems)
        super().__init__(self._message())

    def _message(self) -> str:
        n = len(self.missing) + len(self.unexpected) + len(self.misshaped) + len(self.problems)
        lines = [f"{self.source} does not match the model ({n} problem{'s' * (n != 1)}):"]

        def section(title, rows):
            if rows:
                lines.append(f"  {title} ({len(rows)}):")
                lines.extend(f"    {r}" for r in rows[:_LIST_LIMIT])
                if len(rows) > _LIST_LIMIT:
                    lines.append(f"    ... and {len(rows) - _LIST_LIMIT} more")

        section("missing", [f"{k}  expected {list(s)}" for k, s in self.missing])
        section("unexpected", [f"{k}  {list(s)}" for k, s in self.unexpected])
        section("mis-shaped", [f"{k}  expected {list(e)}, got {list(g)}" for k, e, g in self.misshaped])
        section("other", self.problems)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- readers
class TorchPickleReader:
    """`.ckpt/.pth/.pt/.bin` via torch.load(weights_only, mmap): tensors stay on disk until read."""

    def __init__(self, path):
        import torch  # optional extra; only pickles need it

        self.path = Path(path)
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # legacy (pre-zipfile) pickles cannot be memory-mapped
            obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{self.path}: holds objects other than tensors, refusing to unpickle "
                             f"them (re-save its state_dict as .safetensors): {e}") from None
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{self.path}: expected a state dict, got {type(obj).__name__}")
        self._tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        self._torch = torch

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> np.dtype:
        t = self._tensors[key]
        if t.dtype == self._torch.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(str(t.dtype).removeprefix("torch."))

    def get(self, key: str) -> np.ndarray:
        t = self._tensors[key].detach().contiguous()
        if t.dtype == self._torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return t.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()  # own the memory (not the file mapping)

    def close(self) -> None:
        self._tensors = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArrayDictReader:
    """The reader interface over an in-memory {key: array} dict (e.g. a torch model's state dict)."""

    def __init__(self, arrays: Mapping[str, Any], name: str = "<state dict>"):
        self._arrays, self.path = arrays, name

    def keys(self):
        return list(self._arrays)

    def shape(self, key):
        return tuple(np.shape(self._arrays[key]))

    def dtype(self, key):
        return np.asarray(self._arrays[key]).dtype

    def get(self, key):
        return np.asarray(self._arrays[key])

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def read_torch_checkpoint(path):
    """Open a checkpoint lazily: a reader with keys(), shape(k), dtype(k), get(k) -> np.ndarray
    and close() (also a context manager). Nothing is read until get()."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsReader(path)
    if suffix in PICKLE_SUFFIXES:
        return TorchPickleReader(path)
    raise ValueError(f"{path}: unknown checkpoint type '{suffix}' "
                     f"(expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)})")


# ---------------------------------------------------------------------------------- key map
def torch_key_to_param_path(key: str, ndim: int) -> tuple[str, ...] | None:
    """`model.diffusion_model.out.2.weight` (4-D) -> ('unet', 'out_2', 'kernel'); None if the key
    is outside the group table."""
    for prefix, group in GROUPS:
        if key.startswith(prefix):
            p = torch_key_to_path(key[len(prefix):])
            return (group,) + p[:-1] + (flax_leaf(p[-1], ndim),)
    return None


def param_path_to_torch_key(path: tuple[str, ...]) -> str:
    if path[0] not in _PREFIX_OF_GROUP:
        raise ValueError(f"param group '{path[0]}' has no place in the authors' checkpoint "
                         f"(known groups: {sorted(_PREFIX_OF_GROUP)})")
    return _PREFIX_OF_GROUP[path[0]] + path_to_torch_key(path[1:])


def flax_shape_to_torch(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Inverse of torch_layout.torch_shape_to_flax."""
    if len(shape) == 2:
        return (shape[1], shape[0])
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def flatten_tree(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Nested dict -> {path tuple: leaf}; anything that is not a Mapping is a leaf."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, prefix + (str(k),)))
        else:
            out[prefix + (str(k),)] = v
    return out


def unflatten_tree(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = leaf
    return tree


def leaf_shape(leaf) -> tuple[int, ...]:
    """Shape of an expected-shapes leaf: a tuple/list of ints, or anything with .shape
    (jax.ShapeDtypeStruct, arrays)."""
    return tuple(int(d) for d in (leaf.shape if hasattr(leaf, "shape") else leaf))


# ---------------------------------------------------------------------------------- schedule
def schedule_buffers(schedule=None) -> dict[str, np.ndarray]:
    """The 12 buffers as the authors' DDPM.register_schedule computes them, in file order."""
    from cdv2.config import ScheduleConfig
    from cdv2.diffusion.schedule import ldm_schedule_buffers

    bufs = ldm_schedule_buffers(schedule or ScheduleConfig())
    return {k: bufs[k] for k in SCHEDULE_BUFFERS}


def _is_float(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16)


def _check_schedule_buffer(name: str, got: np.ndarray, want: np.ndarray) -> str | None:
    if got.shape != want.shape:
        return f"{name}: shape {list(got.shape)}, the schedule has {list(want.shape)}"
    if not _is_float(got.dtype):
        return f"{name}: dtype {got.dtype} is not a float type"
    finfo = ml_dtypes.finfo(got.dtype)
    eps = float(finfo.eps)  # a buffer saved in fp16 only holds fp16 precision
    g, w = got.astype(np.float64), want.astype(np.float64)
    err = np.abs(g - w) / np.maximum(np.abs(w), float(finfo.tiny))
    if not np.all(err <= max(4 * eps, 1e-6)):
        i = int(np.nanargmax(np.where(np.isfinite(err), err, np.inf)))
        return (f"{name}: differs from the scaled-linear schedule (betas = linspace(sqrt(start), "
                f"sqrt(end), T)**2): at index {i} got {g[i]!r}, expected {w[i]!r}")
    return None


# ---------------------------------------------------------------------------------- convert
def _open(src):
    if isinstance(src, (str, os.PathLike)):
        return read_torch_checkpoint(src), True
    if isinstance(src, Mapping):
        return ArrayDictReader(src), True
    return src, False  # an open reader: the caller closes it


def _plan(reader, expected_shapes, allow_unexpected_prefixes, schedule):
    """Validate keys and shapes from the header (and the small schedule buffers); return
    [(torch key, param path)] and {torch key: dtype name}, or raise CheckpointMismatchError."""
    expected = None
    if expected_shapes is not None:
        expected = {p: leaf_shape(v) for p, v in flatten_tree(expected_shapes).items()
                    if p[0] in _PREFIX_OF_GROUP}  # other groups (clip) come from other files
    allow = tuple(allow_unexpected_prefixes)
    sched = schedule_buffers(schedule)
    missing, unexpected, misshaped, problems, skipped = [], [], [], [], []
    plan, source_dtypes, key_of_path = [], {}, {}
    for key in reader.keys():
        shape, dtype = tuple(reader.shape(key)), np.dtype(reader.dtype(key))
        if key in sched:
            problem = _check_schedule_buffer(key, reader.get(key), sched[key])
            if problem:
                problems.append(problem)
            continue
        path = torch_key_to_param_path(key, len(shape))
        if path is not None and expected is not None and path not in expected:
            # a 1-D/N-D mix-up renames the leaf (scale <-> kernel): call it mis-shaped, not two errors
            other = {"scale": "kernel", "kernel": "scale"}.get(path[-1])
            alt = path[:-1] + (other,) if other else None
            if alt in expected:
                misshaped.append((key, flax_shape_to_torch(expected[alt]), shape))
                key_of_path[alt] = key
                continue
            path = None
        if path is None:
            (skipped if key.startswith(allow) and allow else unexpected).append((key, shape))
            continue
        if path in key_of_path:
            problems.append(f"{key}: maps onto the same param {'/'.join(path)} as {key_of_path[path]}")
            continue
        key_of_path[path] = key
        if not _is_float(dtype):
            problems.append(f"{key}: dtype {dtype} is not a float type")
        elif expected is not None and torch_shape_to_flax(shape) != expected[path]:
            misshaped.append((key, flax_shape_to_torch(expected[path]), shape))
        else:
            plan.append((key, path))
            source_dtypes[key] = dtype.name
    if expected is not None:
        missing = [(param_path_to_torch_key(p), flax_shape_to_torch(s))
                   for p, s in expected.items() if p not in key_of_path]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} keys under allowed prefixes {list(allow)}, e.g. "
                      f"{', '.join(k for k, _ in skipped[:3])}", stacklevel=3)
    if missing or unexpected or misshaped or problems:
        raise CheckpointMismatchError(getattr(reader, "path", "checkpoint"), missing, unexpected,
                                      misshaped, problems)
    return plan, source_dtypes


def convert_v2_checkpoint(src, expected_shapes, *, progress=True,
                          allow_unexpected_prefixes=(), schedule=None):
    """Authors' checkpoint -> (params, source_dtypes).

    src: a path (.safetensors/.ckpt/.pth/.pt/.bin), a {key: array} dict, or an open reader.
    expected_shapes: nested dict like the params with shape leaves (tuples or
    jax.ShapeDtypeStruct, e.g. `cdv2.model.param_shapes(cfg)`); groups other than those in
    `GROUPS` are ignored. None skips the shape check (keys outside the table still fail).
    Keys under `allow_unexpected_prefixes` that the model does not know are skipped with a
    warning. `schedule` (a ScheduleConfig; default scaled-linear 0.00085-0.012, 1000 steps) is
    what the checkpoint's schedule buffers, if any, must equal.
    Returns params as fp32 numpy arrays in Flax layout, and {torch key: source dtype name}.
    """
    reader, owned = _open(src)
    try:
        plan, source_dtypes = _plan(reader, expected_shapes, allow_unexpected_prefixes, schedule)
        flat = {}
        for key, path in tqdm(plan, desc="converting", unit="tensor", disable=not progress):
            arr = reader.get(key).astype(np.float32, copy=False)  # fp16/bf16 upcast exactly
            flat[path] = torch_to_flax_array(arr)
        return unflatten_tree(flat), source_dtypes
    finally:
        if owned:
            reader.close()


# ---------------------------------------------------------------------------------- export
def _export_dtype(key: str, source_dtypes, vae_fp16: bool) -> np.dtype:
    if source_dtypes and key in source_dtypes:
        name = source_dtypes[key]
        return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
    if vae_fp16 and key.startswith(_PREFIX_OF_GROUP["vae"]):
        return np.dtype(np.float16)  # as released
    return np.dtype(np.float32)


def export_entries(params: Mapping, *, source_dtypes=None, vae_fp16=True,
                   schedule=None) -> Iterator[tuple]:
    """(torch key, dtype, torch shape, producer) for every tensor of the authors' file; each
    producer makes its one array when called, so the writer holds one tensor at a time."""
    for path, leaf in flatten_tree(params).items():
        if path[0] == "clip":
            continue  # the authors' file has no CLIP: open_clip supplies it
        key = param_path_to_torch_key(path)
        dtype = _export_dtype(key, source_dtypes, vae_fp16)

        def make(leaf=leaf, dtype=dtype):
            return flax_to_torch_array(np.asarray(leaf)).astype(dtype, copy=False)

        yield key, dtype, flax_shape_to_torch(tuple(np.shape(leaf))), make
    for name, buf in schedule_buffers(schedule).items():
        yield name, buf.dtype, buf.shape, (lambda buf=buf: buf)


def export_v2_checkpoint(params: Mapping, path, *, source_dtypes=None, vae_fp16=True,
                         schedule=None, progress=False) -> Path:
    """cdv2 params -> the authors' safetensors file (their keys and torch shapes, plus the 12
    schedule buffers in fp32). Dtypes: `source_dtypes` ({torch key: dtype name}, as returned by
    convert_v2_checkpoint) where given, else fp32 with the VAE in fp16 (`vae_fp16`), as released.
    The `clip` group is left out. Written streaming, to a temporary name renamed at the end."""
    entries = list(export_entries(params, source_dtypes=source_dtypes, vae_fp16=vae_fp16,
                                  schedule=schedule))
    return write_safetensors(path, entries, progress=progress)
