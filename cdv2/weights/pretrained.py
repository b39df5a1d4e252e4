"""Load a model for inference: a cdv2 weights directory, or the authors' checkpoint (its single-file
form with the CLIP towers inside, or the released file plus an open_clip ViT-H-14 file), converted
in memory. Imports only `cdv2.config`, `cdv2.model` and `cdv2.weights` (never `cdv2.sample`)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from cdv2.config import CONFIG_DIR, ModelConfig, load_model_config
from cdv2.model import GROUPS, param_shapes
from cdv2.weights.dtypes import cast_floating, resolve_dtype
from cdv2.weights.mismatch import CheckpointMismatchError, raise_if_mismatched
from cdv2.weights.open_clip import load_open_clip_params
from cdv2.weights.readers import open_checkpoint
from cdv2.weights.tree import flatten, leaf_shape, map_leaves
from cdv2.weights.v2_checkpoint import (GROUPS as SOURCE_GROUPS, KNOWN_EXTRA_PREFIXES, OPTIONAL_GROUPS,
                                        RAW_TEXT_GROUP, TEXT_GROUP, convert_v2_checkpoint)
from cdv2.weights.weights_dir import load_weights_config, load_weights_dir

HOW_TO_GET_WEIGHTS = """\
cdv2 needs the authors' released weights and the OpenCLIP image encoder (neither can be bundled):
  1. v2-full.safetensors from https://huggingface.co/tellurion/ColorizeDiffusion
  2. open_clip_pytorch_model.bin (ViT-H-14, laion2b_s32b_b79k) from
     https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K
then convert them once into a cdv2 weights directory (torch is not needed):
  cdv2 convert --checkpoint v2-full.safetensors --clip open_clip_pytorch_model.bin --out weights/v2
and colorize with --weights weights/v2 (or pass both files directly: --weights v2-full.safetensors
--clip open_clip_pytorch_model.bin, converted in memory at every start). A single-file checkpoint
that already holds the CLIP towers (cond_stage_model.visual.*) needs no --clip."""

AUTHOR_GROUPS = tuple(g for _, g in SOURCE_GROUPS)  # the groups the authors' file can hold
_EXTRA_GROUPS = (TEXT_GROUP, RAW_TEXT_GROUP)  # optional, validated by their own converter


@lru_cache(maxsize=8)
def model_param_shapes(cfg: ModelConfig, groups: tuple[str, ...]) -> dict:
    """`cdv2.model.param_shapes`, cached per (config, groups): tracing the model takes seconds and
    every load, conversion and config suggestion needs it. Treat the result as read-only."""
    return param_shapes(cfg, tuple(groups))


def known_configs() -> list[str]:
    """Names of the model configs shipped in cdv2/configs (`--config NAME`)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _file_fits(shapes: dict[str, tuple], cfg: ModelConfig) -> bool:
    from cdv2.weights.v2_checkpoint import param_path_to_torch_key, param_torch_shape

    groups = [g for g in AUTHOR_GROUPS if g not in OPTIONAL_GROUPS]
    groups += [g for g in OPTIONAL_GROUPS if any(k.startswith(p) for k in shapes for p, gg in SOURCE_GROUPS if gg == g)]
    want = {param_path_to_torch_key(p): param_torch_shape(p, leaf_shape(v))
            for p, v in flatten(model_param_shapes(cfg, tuple(groups)), sep=None).items()}
    return all(shapes.get(k) == s for k, s in want.items())


def suggest_config(path, exclude: str = "") -> Optional[str]:
    """The first shipped config (other than `exclude`) whose every param has its shape in the
    checkpoint at `path` (header only), or None. Used to turn a mismatch into "pass --config X"."""
    try:
        with open_checkpoint(path) as r:
            shapes = {k: tuple(r.shape(k)) for k in r.keys()}
    except (OSError, ValueError):
        return None
    for name in known_configs():
        if name == exclude:
            continue
        try:
            if _file_fits(shapes, load_model_config(name)):
                return name
        except Exception:  # a config this code cannot build fits nothing  # noqa: BLE001
            continue
    return None


def config_hint(name: str) -> str:
    return (f"hint: the file's shapes fit the shipped config '{name}': pass --config {name} "
            f"(config=\"{name}\" in Python)")


def load_pretrained(path, clip: Optional[str] = None, config: Optional[str | ModelConfig] = None,
                    dtype="float32"):
    """-> (params: nested dict of numpy arrays for every group, ModelConfig).

    `path`: a cdv2 weights directory (its config.yaml decides the architecture), or the authors'
    `.safetensors/.ckpt/.pth/.pt/.bin` (architecture from `config`, a name in cdv2/configs or a
    ModelConfig; default "v2"). Its single-file form also holds the CLIP image tower (group `clip`)
    and text tower (group `clip_text`); otherwise `clip` names an open_clip visual checkpoint.
    `dtype` ("float32" (default), "bfloat16", "auto" = bf16 on GPU/TPU and fp32 on CPU, a dtype, or
    None = as stored): every float tensor is cast as it is read, so no fp32 copy is kept.
    A checkpoint that does not fit `config` but fits another shipped config says which."""
    p = Path(path)
    dtype = resolve_dtype(dtype)
    if not p.exists():
        raise FileNotFoundError(f"weights not found: {p}\n\n{HOW_TO_GET_WEIGHTS}")
    if p.is_dir():
        params, cfg = _load_dir(p, dtype)
    else:
        cfg = config if isinstance(config, ModelConfig) else load_model_config(config or "v2")
        try:
            params, _ = convert_v2_checkpoint(p, model_param_shapes(cfg, AUTHOR_GROUPS), progress=True,
                                              allow_unexpected_prefixes=KNOWN_EXTRA_PREFIXES,
                                              schedule=cfg.schedule, dtype=dtype, text_config=cfg.clip_text)
        except CheckpointMismatchError as e:
            fit = suggest_config(p, exclude=cfg.name)
            raise (e.with_hint(config_hint(fit)) if fit else e) from None
    missing = [g for g in GROUPS if g not in params and g != "clip"]
    if missing:
        raise ValueError(f"{p}: the weights lack the groups {missing}")
    if clip is not None or "clip" not in params:  # an explicit clip file wins over the file's tower
        if clip is None:
            raise ValueError(f"{p} holds no CLIP image encoder; pass the open_clip ViT-H-14 file "
                             f"(--clip FILE; clip=... in Python).\n\n{HOW_TO_GET_WEIGHTS}")
        if not Path(clip).is_file():
            raise FileNotFoundError(f"CLIP weights not found: {clip}")
        params["clip"] = map_leaves(lambda a: cast_floating(np.asarray(a), dtype),
                                    load_open_clip_params(clip, cfg.clip))
    return params, cfg


def _load_dir(p: Path, dtype):
    cfg = load_weights_config(p)
    params, _ = load_weights_dir(p, expected_shapes=None, dtype=dtype)
    groups = tuple(g for g in GROUPS if g in params)
    want = {k: leaf_shape(v) for k, v in flatten(model_param_shapes(cfg, groups)).items()}
    got = {k: tuple(v.shape) for k, v in flatten(params).items() if k.split("/", 1)[0] not in _EXTRA_GROUPS}
    raise_if_mismatched(p, want, got)  # same error as conversion
    if TEXT_GROUP in params:
        try:
            from cdv2.weights.open_clip_text import expected_text_param_shapes
        except ImportError:
            return params, cfg
        want = {"clip_text/" + "/".join(k): s for k, s in expected_text_param_shapes(cfg.clip_text).items()}
        raise_if_mismatched(p, want, {"clip_text/" + k: tuple(v.shape)
                                      for k, v in flatten(params[TEXT_GROUP]).items()})
    return params, cfg
