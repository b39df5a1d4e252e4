"""cdv2 preprocessor weights directory: the app's mask and line networks, converted.

    DIR/<name>/params.safetensors   flat keys = "/"-joined Flax paths, collections first
                                    (`params/stage1/rebnconv1/conv_s1/kernel`, `batch_stats/...`)
    DIR/<name>/config.yaml          the network config inferred from the weight shapes
    DIR/<name>/manifest.json        format, network, the app's name and file, source, param count

`<name>` is one of `NETWORKS` (isnet, isnet-sketch, rmbg-v2, lineart_keras, lineart,
lineart_denoise, lineart_sk). One DIR holds any subset; converting another network into it adds
a sub-directory, and replacing an existing one needs `overwrite=True`. `find_app_weights` locates
the released files in a folder laid out like the app's `preprocessor/weights` (torch.hub files at
the top, RMBG-2.0 in the Hugging Face cache layout that `from_pretrained(cache_dir=...)` writes).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from .. import __version__
from .dtypes import cast_floating
from .keymaps.common import WeightKeysError, torch_key_shapes
from .mismatch import raise_if_mismatched
from .readers import SafetensorsReader, load_state_dict, write_safetensors
from .tree import flatten, unflatten
from cdv2.config import plain_data

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
FORMAT = "cdv2-preprocessor"
FORMAT_VERSION = 1
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "preprocessors"
_RMBG_HF = "models--briaai--RMBG-2.0/snapshots/*/"


@dataclasses.dataclass(frozen=True)
class NetSpec:
    """One network: its cdv2 name, the app's name, key map, config kind and released file(s).
    `files` are glob patterns relative to the app's `preprocessor/weights`, first match wins."""

    name: str
    app_name: str
    keymap: str          # module in cdv2.weights.keymaps
    kind: str            # "isnet" | "birefnet" | "line"
    files: tuple[str, ...]
    role: str
    label: str = ""      # how to name the file to a user, when not files[0]

    @property
    def app_file(self) -> str:
        return self.label or self.files[0]

    def keymap_module(self):
        return importlib.import_module(f"cdv2.weights.keymaps.{self.keymap}")


NETWORKS: dict[str, NetSpec] = {s.name: s for s in (
    NetSpec("isnet", "ISNet", "isnet", "isnet", ("isnetis.safetensors",), "reference mask"),
    NetSpec("isnet-sketch", "ISNet-sketch", "isnet", "isnet", ("sketch-segment.safetensors",), "sketch mask"),
    NetSpec("rmbg-v2", "rmbg-v2", "birefnet", "birefnet",
            (_RMBG_HF + "model.safetensors", _RMBG_HF + "pytorch_model.bin", "RMBG-2.0/model.safetensors"),
            "reference mask (app default)", "RMBG-2.0 model.safetensors"),
    NetSpec("lineart_keras", "lineart_keras", "sketch_keras", "line", ("model.pth",), "line extractor (app default)"),
    NetSpec("lineart", "lineart", "anime2sketch", "line", ("netG.pth",), "line extractor"),
    NetSpec("lineart_denoise", "lineart_denoise", "manga_lines", "line", ("erika.pth",), "line extractor"),
    NetSpec("lineart_sk", "lineart_sk", "lineart_sk", "line", ("sk_model.pth",), "line extractor"),
)}
# the real-size config file of each key map (configs/preprocessors/*.yaml)
_REAL_CONFIG = {"isnet": "isnet", "birefnet": "birefnet_swin_l", "sketch_keras": "lineart_keras",
                "anime2sketch": "lineart", "manga_lines": "lineart_denoise", "lineart_sk": "lineart_sk"}


def spec(name: str) -> NetSpec:
    """The network called `name` (cdv2 or app spelling, any case: "ISNet-sketch" = "isnet-sketch")."""
    key = str(name).strip().lower()
    if key not in NETWORKS:
        raise ValueError(f"unknown preprocessor network {name!r}; choose one of {', '.join(NETWORKS)}")
    return NETWORKS[key]


# --- configs -----------------------------------------------------------------------------------------

def _tuples(x):
    if isinstance(x, Mapping):
        return {k: _tuples(v) for k, v in x.items()}
    return tuple(x) if isinstance(x, list) else x


def config_to_dict(s: NetSpec, config) -> dict:
    return plain_data(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config))


def config_from_dict(s: NetSpec, d: Mapping):
    """The config object the key map and network take (dataclass for ISNet/BiRefNet, dict for lines)."""
    if s.kind == "isnet":
        from cdv2.modules.preprocess_nets.isnet import ISNetConfig
        return ISNetConfig(**dict(d))
    if s.kind == "birefnet":
        from cdv2.modules.preprocess_nets.birefnet import BiRefNetConfig
        return BiRefNetConfig.from_dict(dict(d))
    return _tuples(dict(d))


def real_config(s: NetSpec):
    """The released network's config (configs/preprocessors/<file>.yaml)."""
    data = yaml.safe_load((CONFIG_DIR / f"{_REAL_CONFIG[s.keymap]}.yaml").read_text()) or {}
    return config_from_dict(s, data)


# --- converting --------------------------------------------------------------------------------------
def _count(variables) -> int:
    return int(sum(int(np.prod(np.shape(v))) for v in flatten(dict(variables).get("params", {})).values()))


def convert_state(name: str, state: Mapping[str, np.ndarray], source: str = "<state dict>"):
    """Torch state dict (numpy, released key format) -> (Flax variables, config). Widths are read
    off the weights; when that fails (another network's file) the real-size config is used, so
    the `WeightKeysError` lists every missing/unexpected/mis-shaped key either way."""
    s = spec(name)
    km = s.keymap_module()
    try:
        config = km.infer_config(state)
    except (KeyError, IndexError, ValueError, TypeError):
        config = real_config(s)
    try:
        return km.convert(state, config), config
    except WeightKeysError as e:
        raise WeightKeysError(f"{source} is not the {s.name} network's weight file ({s.app_file}): {e}") from None


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_preprocessor(out, name: str, variables: Mapping, config, *, source=None, dtype=np.float32,
                      overwrite: bool = False) -> Path:
    """Write DIR/<name>/{params.safetensors, config.yaml, manifest.json}; floats stored as `dtype`
    (None keeps them). Refuses an existing non-empty DIR/<name> unless `overwrite`."""
    s = spec(name)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    sub = out / s.name
    if sub.is_dir() and any(sub.iterdir()) and not overwrite:
        raise FileExistsError(f"{sub} exists; pass --overwrite (overwrite=True) to replace it")
    sub.mkdir(parents=True, exist_ok=True)
    flat = {k: cast_floating(np.asarray(v), dtype) for k, v in flatten(dict(variables)).items()}
    write_safetensors(sub / PARAMS_FILE, [(k, v.dtype, v.shape, (lambda v=v: v)) for k, v in flat.items()],
                      metadata={"format": FORMAT, "network": s.name})
    _write_text(sub / CONFIG_FILE, yaml.safe_dump(config_to_dict(s, config), sort_keys=False))
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "network": s.name, "app_name": s.app_name,
                "app_file": s.app_file, "role": s.role, "cdv2_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "source": None if source is None else str(source), "num_tensors": len(flat),
                "num_params": _count(variables)}
    _write_text(sub / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    return sub


def convert_preprocessor(name: str, file, out, *, dtype=np.float32, overwrite: bool = False) -> Path:
    """The released weight `file` of network `name` -> DIR/<name>/ (see module doc)."""
    s = spec(name)
    file = Path(file)
    sub = Path(out) / s.name
    if sub.is_dir() and any(sub.iterdir()) and not overwrite:  # fail before reading a big file
        raise FileExistsError(f"{sub} exists; pass --overwrite (overwrite=True) to replace it")
    state = load_state_dict(file, dtype=np.float32)
    variables, config = convert_state(s.name, state, source=str(file))
    return save_preprocessor(out, s.name, variables, config, source=file, dtype=dtype, overwrite=overwrite)


def find_app_weights(folder, required: bool = False) -> dict[str, Path]:
    """{name: file} of every known network file in a folder laid out like the app's
    `preprocessor/weights` (the folder itself, or its parent `preprocessor/`, or the app root).
    `required`: raise FileNotFoundError naming the expected files when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"preprocessor weights folder not found: {folder}")
    roots = [folder, folder / "weights", folder / "preprocessor" / "weights"]
    found: dict[str, Path] = {}
    for s in NETWORKS.values():
        for root in roots:
            for pattern in s.files:  # several HF snapshots: the most recently written one
                hits = sorted((p for p in root.glob(pattern) if p.is_file()), key=lambda p: p.stat().st_mtime)
                if hits:
                    found[s.name] = hits[-1]
                    break
            if s.name in found:
                break
    if required and not found:
        expected = ", ".join(f"{s.app_file} ({s.name})" for s in NETWORKS.values())
        raise FileNotFoundError(f"{folder}: no preprocessor weight file found; expected any of {expected}")
    return found


def convert_app_folder(folder, out, *, dtype=np.float32, overwrite: bool = False) -> dict[str, Path]:
    """Convert every known network file in `folder` (see `find_app_weights`) into DIR; raises
    FileNotFoundError naming the expected files when none is there."""
    found = find_app_weights(folder, required=True)
    return {name: convert_preprocessor(name, path, out, dtype=dtype, overwrite=overwrite)
            for name, path in found.items()}


# --- loading -----------------------------------------------------------------------------------------
def list_preprocessors(path) -> dict[str, Path]:
    """{name: DIR/<name>} of the converted networks in DIR (those with all three files)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"preprocessor weights directory not found: {path}")
    return {n: path / n for n in NETWORKS
            if all((path / n / f).is_file() for f in (PARAMS_FILE, CONFIG_FILE, MANIFEST_FILE))}


@dataclasses.dataclass(frozen=True)
class _Shape:
    """A leaf with only a shape: stored tensors are listed without being read."""
    shape: tuple


def expected_torch_keys(name: str, config) -> dict[str, tuple]:
    """torch key -> shape that the network with `config` loads (jax.eval_shape; nothing allocated)."""
    return {k: s for k, (s, _) in spec(name).keymap_module().torch_keys(config).items()}


def load_preprocessor(path, name: str, *, dtype=np.float32, validate: bool = True) -> tuple[dict, Any, dict]:
    """DIR/<name> -> (variables {'params', 'batch_stats'?} as numpy, config, manifest). With
    `validate`, stored shapes are checked against the network built from the stored config and
    every difference is reported in one CheckpointMismatchError (torch key names)."""
    s = spec(name)
    sub = Path(path) / s.name
    missing = [f for f in (PARAMS_FILE, CONFIG_FILE, MANIFEST_FILE) if not (sub / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{sub} is not a converted {s.name} network (missing {', '.join(missing)}); "
                                f"run: cdv2 convert --preprocessor {s.name} {s.app_file} --out {path}")
    manifest = json.loads((sub / MANIFEST_FILE).read_text())
    if manifest.get("format") != FORMAT or manifest.get("network") != s.name:
        raise ValueError(f"{sub / MANIFEST_FILE}: not a cdv2 {s.name} preprocessor directory")
    config = config_from_dict(s, yaml.safe_load((sub / CONFIG_FILE).read_text()) or {})
    with SafetensorsReader(sub / PARAMS_FILE) as reader:
        if validate:
            stored = unflatten({k: _Shape(tuple(reader.shape(k))) for k in reader.keys()})
            got = {k: sd[0] for k, sd in torch_key_shapes(stored, getattr(s.keymap_module(), "NATIVE", None)).items()}
            raise_if_mismatched(sub / PARAMS_FILE, expected_torch_keys(s.name, config), got)
        variables = unflatten({k: cast_floating(reader.get(k), dtype) for k in reader.keys()})
    return variables, config, manifest


def read_num_params(sub) -> int:
    """The parameter count a converted network's manifest records."""
    return int(json.loads((Path(sub) / MANIFEST_FILE).read_text())["num_params"])
