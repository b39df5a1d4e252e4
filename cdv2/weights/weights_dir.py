"""cdv2 weights directory: what `tools/convert_torch.py` writes and every cdv2 entry point loads.

    DIR/params.safetensors   flat keys = "/"-joined Flax paths (`unet/input_blocks_1_0/in_layers_2/kernel`)
    DIR/config.yaml          the ModelConfig that these params belong to (`ModelConfig.to_dict()`)
    DIR/manifest.json        provenance: source file, its per-key dtypes, cdv2 version

Saving never deletes anything: it refuses a non-empty directory unless `overwrite=True`, and then
replaces only these three files (each written under a temporary name and renamed).
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import yaml

from .. import __version__
from ..config import ModelConfig, model_config_from_dict
from .dtypes import cast_floating, resolve_dtype
from .mismatch import CheckpointMismatchError, raise_if_mismatched  # noqa: F401 (re-exported)
from .readers import SafetensorsReader, write_safetensors
from .tree import flatten, leaf_shape, unflatten
from cdv2.config import plain_data

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
FORMAT = "cdv2-weights"
FORMAT_VERSION = 1



def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights_dir(path, params: Mapping, config: ModelConfig, source_dtypes=None, *,
                     source=None, overwrite=False, progress=False) -> Path:
    """Write params (nested dict of arrays, any dtype; saved as they are) + config + manifest.
    `source`: where the params came from (recorded in the manifest); `source_dtypes`: the
    {torch key: dtype name} of that source, so export can restore them."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass --overwrite (overwrite=True) to "
                              f"replace its {PARAMS_FILE}, {CONFIG_FILE} and {MANIFEST_FILE}")
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    path.mkdir(parents=True, exist_ok=True)
    flat = flatten(params)
    # dtype and shape from the leaf itself: device arrays come to host one at a time, when written
    entries = [(p, getattr(v, "dtype", None) or np.asarray(v).dtype, np.shape(v),
                (lambda v=v: np.asarray(v))) for p, v in flat.items()]
    write_safetensors(path / PARAMS_FILE, entries, metadata={"format": FORMAT}, progress=progress)
    _write_text(path / CONFIG_FILE, yaml.safe_dump(plain_data(config.to_dict()), sort_keys=False))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "cdv2_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": None if source is None else str(source),
        "num_tensors": len(flat),
        "num_params": int(sum(int(np.prod(np.shape(v))) for v in flat.values())),
        "source_dtypes": dict(source_dtypes or {}),
    }
    _write_text(path / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return path


def _require_files(path: Path, names) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"weights directory not found: {path}")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a cdv2 weights directory: missing {', '.join(missing)}")


def read_manifest(path) -> dict:
    path = Path(path)
    _require_files(path, [MANIFEST_FILE])
    return json.loads((path / MANIFEST_FILE).read_text())


def load_weights_config(path) -> ModelConfig:
    path = Path(path)
    _require_files(path, [CONFIG_FILE])
    data = yaml.safe_load((path / CONFIG_FILE).read_text())
    if not isinstance(data, Mapping):
        raise ValueError(f"{path / CONFIG_FILE}: expected a mapping")
    return model_config_from_dict(data)


def load_weights_dir(path, expected_shapes=None, dtype=np.float32):
    """-> (params as nested dict of numpy arrays, each float tensor cast to `dtype` as it is read
    ("auto", a DTYPES name or a dtype; None keeps the stored dtypes), ModelConfig). With `expected_shapes` (nested dict of shape tuples / jax.ShapeDtypeStruct, e.g.
    `cdv2.model.param_shapes(config)`), every missing, unexpected or mis-shaped param is
    reported in one CheckpointMismatchError before any tensor is read."""
    path = Path(path)
    _require_files(path, [PARAMS_FILE, CONFIG_FILE])
    config = load_weights_config(path)
    with SafetensorsReader(path / PARAMS_FILE) as reader:
        if expected_shapes is not None:
            want = {p: leaf_shape(v) for p, v in flatten(expected_shapes).items()}
            got = {k: tuple(reader.shape(k)) for k in reader.keys()}
            raise_if_mismatched(path / PARAMS_FILE, want, got)
        dtype = resolve_dtype(dtype)
        flat = {key: cast_floating(reader.get(key), dtype) for key in reader.keys()}
    return unflatten(flat), config
