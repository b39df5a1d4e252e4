"""The authors' v2 checkpoint (`v2-full.safetensors`, `.ckpt`, `.pth`) <-> cdv2 params.

Key map: torch prefix -> cdv2 param group (`SOURCES`); inside a group, the group's `KeyMap`
(`torch_layout`'s rule; open_clip's exceptions for the CLIP image tower). The authors' single-file
form may also hold the CLIP image tower (`cond_stage_model.visual.model.*` -> group `clip`) and the
text tower (`cond_stage_model.transformer.model.*` -> group `clip_text`, converted by
`cdv2.weights.open_clip_text`); both are optional (the released file has neither).

Conversion validates the whole file against the model's expected shapes first (from the header
only, so a wrong file fails in seconds) and reports every missing, unexpected and mis-shaped key in
one `CheckpointMismatchError`; then it streams the tensors one at a time, each cast to `dtype` as it
is read, so peak memory is the params in that dtype plus one tensor. Export is the exact inverse:
same keys, torch shapes and (recorded) dtypes, so a round trip reproduces the source bit for bit.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Optional

import ml_dtypes
import numpy as np
from tqdm import tqdm

from cdv2.weights.dtypes import cast_floating, is_floating
from cdv2.weights.mismatch import CheckpointMismatchError
from cdv2.weights.open_clip import OPEN_CLIP_VISUAL
from cdv2.weights.readers import (ArrayDictReader, SafetensorsReader, open_checkpoint,  # noqa: F401
                                  write_safetensors)
from cdv2.weights.torch_layout import LAYOUT, KeyMap, flax_shape_to_torch  # noqa: F401 (re-exported)
from cdv2.weights.tree import flatten, leaf_shape, unflatten

# torch state-dict prefix -> (cdv2 param group, its key map)
SOURCES: tuple[tuple[str, str, KeyMap], ...] = (
    ("model.diffusion_model.", "unet", LAYOUT),
    ("control_encoder.", "sketch_encoder", LAYOUT),
    ("bg_encoder.", "bg_encoder", LAYOUT),
    ("style_encoder.", "style_encoder", LAYOUT),
    ("first_stage_model.", "vae", LAYOUT),
    ("cond_stage_model.visual.model.", "clip", OPEN_CLIP_VISUAL),
)
GROUPS = tuple((prefix, group) for prefix, group, _ in SOURCES)
OPTIONAL_GROUPS = ("clip",)  # expected only when the file has keys under their prefix
TEXT_PREFIX, TEXT_GROUP = "cond_stage_model.transformer.model.", "clip_text"
RAW_TEXT_GROUP = "clip_text_torch"  # the text tower's arrays, open_clip names, when not converted
# keys that other tools put in the authors' files and that no cdv2 group uses (EMA copies, other
# CLIP spellings); skipped with a warning by default
KNOWN_EXTRA_PREFIXES = ("cond_stage_model.", "model_ema.")
_SOURCE_OF_GROUP = {group: (prefix, keymap) for prefix, group, keymap in SOURCES}

# the DDPM buffers the authors' LatentDiffusion registers (persistent, fp32, shape [timesteps])
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)


def read_torch_checkpoint(path):
    """A lazy reader (see `cdv2.weights.readers.open_checkpoint`)."""
    return open_checkpoint(path)


# ---------------------------------------------------------------------------------- key map
def torch_key_to_param_path(key: str, ndim: int) -> tuple[str, ...] | None:
    """`model.diffusion_model.out.2.weight` (4-D) -> ('unet', 'out_2', 'kernel'); None if the key
    is outside the group table."""
    for prefix, group, keymap in SOURCES:
        if key.startswith(prefix):
            return (group,) + keymap.to_path(key[len(prefix):], ndim)
    return None


def param_path_to_torch_key(path: tuple[str, ...]) -> str:
    if path[0] not in _SOURCE_OF_GROUP:
        raise ValueError(f"param group '{path[0]}' has no place in the authors' checkpoint "
                         f"(known groups: {sorted(_SOURCE_OF_GROUP)})")
    prefix, keymap = _SOURCE_OF_GROUP[path[0]]
    return prefix + keymap.to_key(tuple(path[1:]))


def param_torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """A param's shape as the authors' file stores it."""
    return _SOURCE_OF_GROUP[path[0]][1].torch_shape(tuple(path[1:]), shape)


def _flax_array(key: str, path: tuple[str, ...], arr: np.ndarray) -> np.ndarray:
    prefix, keymap = _SOURCE_OF_GROUP[path[0]]
    return keymap.to_flax(key[len(prefix):], arr)


# backwards-compatible names (one implementation each: cdv2.weights.tree)
def flatten_tree(tree: Mapping) -> dict:
    """Nested dict -> {path tuple: leaf} (`cdv2.weights.tree.flatten(tree, sep=None)`)."""
    return flatten(tree, sep=None)


def unflatten_tree(flat: Mapping) -> dict:
    return unflatten(flat, sep=None)


# ---------------------------------------------------------------------------------- schedule
def schedule_buffers(schedule=None) -> dict[str, np.ndarray]:
    """The 12 buffers as the authors' DDPM.register_schedule computes them, in file order."""
    from cdv2.config import ScheduleConfig
    from cdv2.diffusion.schedule import ldm_schedule_buffers

    bufs = ldm_schedule_buffers(schedule or ScheduleConfig())
    return {k: bufs[k] for k in SCHEDULE_BUFFERS}


def _check_schedule_buffer(name: str, got: np.ndarray, want: np.ndarray) -> str | None:
    if got.shape != want.shape:
        return f"{name}: shape {list(got.shape)}, the schedule has {list(want.shape)}"
    if not is_floating(got.dtype):
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


def _expected(reader, expected_shapes) -> Optional[dict]:
    """Flat {path: shape} of the groups this file must provide (optional groups only when the file
    has keys under their prefix; groups the authors' file never has are ignored)."""
    if expected_shapes is None:
        return None
    present = {g for g in OPTIONAL_GROUPS if any(k.startswith(_SOURCE_OF_GROUP[g][0]) for k in reader.keys())}
    want = set(_SOURCE_OF_GROUP) - set(OPTIONAL_GROUPS) | present
    return {p: leaf_shape(v) for p, v in flatten(expected_shapes, sep=None).items() if p[0] in want}


def _plan(reader, expected_shapes, allow_unexpected_prefixes, schedule, with_text):
    """Validate keys and shapes from the header (and the small schedule buffers); return
    [(torch key, param path)], the text-tower keys and {torch key: dtype name}, or raise
    CheckpointMismatchError."""
    expected = _expected(reader, expected_shapes)
    allow = tuple(allow_unexpected_prefixes)
    sched = schedule_buffers(schedule)
    missing, unexpected, misshaped, problems, skipped = [], [], [], [], []
    plan, text_keys, source_dtypes, key_of_path = [], [], {}, {}
    for key in reader.keys():
        shape, dtype = tuple(reader.shape(key)), np.dtype(reader.dtype(key))
        if key in sched:
            problem = _check_schedule_buffer(key, reader.get(key), sched[key])
            if problem:
                problems.append(problem)
            continue
        if with_text and key.startswith(TEXT_PREFIX):
            text_keys.append(key)
            source_dtypes[key] = dtype.name
            continue
        path = torch_key_to_param_path(key, len(shape))
        if path is not None and expected is not None and path not in expected:
            # a 1-D/N-D mix-up renames the leaf (scale <-> kernel): call it mis-shaped, not two errors
            other = {"scale": "kernel", "kernel": "scale"}.get(path[-1])
            alt = path[:-1] + (other,) if other else None
            if alt in expected:
                misshaped.append((key, param_torch_shape(alt, expected[alt]), shape))
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
        if not is_floating(dtype):
            problems.append(f"{key}: dtype {dtype} is not a float type")
        elif expected is not None and param_torch_shape(path, expected[path]) != shape:
            misshaped.append((key, param_torch_shape(path, expected[path]), shape))
        else:
            plan.append((key, path))
            source_dtypes[key] = dtype.name
    if expected is not None:
        missing = [(param_path_to_torch_key(p), param_torch_shape(p, s))
                   for p, s in expected.items() if p not in key_of_path]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} keys under allowed prefixes {list(allow)}, e.g. "
                      f"{', '.join(k for k, _ in skipped[:3])}", stacklevel=3)
    if missing or unexpected or misshaped or problems:
        raise CheckpointMismatchError(getattr(reader, "path", "checkpoint"), missing, unexpected,
                                      misshaped, problems)
    return plan, text_keys, source_dtypes


def _convert_text(reader, keys, text_config, dtype) -> tuple[str, dict]:
    """The text tower: (group name, params) via `cdv2.weights.open_clip_text` when it exists,
    else its arrays under open_clip's names in group RAW_TEXT_GROUP."""
    state = {k[len(TEXT_PREFIX):]: cast_floating(reader.get(k), dtype) for k in keys}
    try:
        from cdv2.weights.open_clip_text import convert_open_clip_text
    except ImportError as e:
        warnings.warn(f"the CLIP text tower's converter is unavailable ({e}); its arrays are kept "
                      f"unconverted under '{RAW_TEXT_GROUP}'", stacklevel=3)
        return RAW_TEXT_GROUP, state
    try:
        return TEXT_GROUP, convert_open_clip_text(state, text_config)
    except ValueError as e:
        raise ValueError(f"{getattr(reader, 'path', 'checkpoint')}: {TEXT_PREFIX}*: {e}") from None


def convert_v2_checkpoint(src, expected_shapes, *, progress=True, allow_unexpected_prefixes=(),
                          schedule=None, dtype=np.float32, text_config=None):
    """Authors' checkpoint -> (params, source_dtypes).

    src: a path (.safetensors/.ckpt/.pth/.pt/.bin, read without torch), a {key: array} dict, or an
    open reader. expected_shapes: nested dict like the params with shape leaves (tuples or
    jax.ShapeDtypeStruct, e.g. `cdv2.model.param_shapes(cfg)`); only the groups of `SOURCES` are
    checked (`clip` only when the file has it). None skips the shape check (keys outside the table
    still fail). Keys under `allow_unexpected_prefixes` that the model does not know are skipped
    with a warning. `schedule` (a ScheduleConfig; default scaled-linear 0.00085-0.012, 1000 steps)
    is what the checkpoint's schedule buffers, if any, must equal. `dtype`: every float tensor is
    cast to it as it is read (None keeps the stored dtypes). `text_config` (a CLIPTextConfig):
    convert the text tower (`cond_stage_model.transformer.model.*`) into group `clip_text`; None
    leaves those keys to `allow_unexpected_prefixes`.
    Returns params as numpy arrays in Flax layout, and {torch key: source dtype name}.
    """
    reader, owned = _open(src)
    try:
        plan, text_keys, source_dtypes = _plan(reader, expected_shapes, allow_unexpected_prefixes,
                                               schedule, with_text=text_config is not None)
        params = {}
        if text_keys:  # first: its converter validates it, so a bad tower fails early
            group, tree = _convert_text(reader, text_keys, text_config, dtype)
            params[group] = tree
        flat = {}
        for key, path in tqdm(plan, desc="converting", unit="tensor", disable=not progress):
            flat[path] = _flax_array(key, path, cast_floating(reader.get(key), dtype))  # fp16/bf16 upcast exactly
        params.update(unflatten(flat, sep=None))
        return params, source_dtypes
    finally:
        if owned:
            reader.close()


# ---------------------------------------------------------------------------------- export
def _export_dtype(key: str, source_dtypes, vae_fp16: bool) -> np.dtype:
    if source_dtypes and key in source_dtypes:
        name = source_dtypes[key]
        return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
    if vae_fp16 and key.startswith(_SOURCE_OF_GROUP["vae"][0]):
        return np.dtype(np.float16)  # as released
    return np.dtype(np.float32)


def export_entries(params: Mapping, *, source_dtypes=None, vae_fp16=True,
                   schedule=None) -> Iterator[tuple]:
    """(torch key, dtype, torch shape, producer) for every tensor of the authors' file; each
    producer makes its one array when called, so the writer holds one tensor at a time."""
    for path, leaf in flatten(params, sep=None).items():
        if path[0] not in _SOURCE_OF_GROUP or path[0] in OPTIONAL_GROUPS:
            continue  # the released file has no CLIP towers: open_clip supplies them
        key = param_path_to_torch_key(path)
        dtype = _export_dtype(key, source_dtypes, vae_fp16)
        keymap = _SOURCE_OF_GROUP[path[0]][1]

        def make(leaf=leaf, dtype=dtype, rel=path[1:], keymap=keymap):
            return keymap.to_torch(rel, np.asarray(leaf)).astype(dtype, copy=False)

        yield key, dtype, param_torch_shape(path, tuple(np.shape(leaf))), make
    for name, buf in schedule_buffers(schedule).items():
        yield name, buf.dtype, buf.shape, (lambda buf=buf: buf)


def export_v2_checkpoint(params: Mapping, path, *, source_dtypes=None, vae_fp16=True,
                         schedule=None, progress=False) -> Path:
    """cdv2 params -> the authors' safetensors file (their keys and torch shapes, plus the 12
    schedule buffers in fp32). Dtypes: `source_dtypes` ({torch key: dtype name}, as returned by
    convert_v2_checkpoint) where given, else fp32 with the VAE in fp16 (`vae_fp16`), as released.
    The CLIP groups are left out. Written streaming, to a temporary name renamed at the end."""
    entries = list(export_entries(params, source_dtypes=source_dtypes, vae_fp16=vae_fp16,
                                  schedule=schedule))
    return write_safetensors(path, entries, progress=progress)
