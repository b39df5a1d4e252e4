"""Typed model configuration and its one loader (YAML files in `configs/`, plus overrides).

Every network is built from these dataclasses only; the YAML files are plain data. The field
names follow the authors' config keys where one exists, so `configs/v2.yaml` reads like their
`configs/inference/v2.yaml`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data (top-level `configs` links here)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """SD2.1-style U-Net (the denoiser) or its encoder half (bg/style encoders)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_head_channels: int = 64
    transformer_depth: int = 1
    context_dim: int = 1024
    # denoiser extras
    warp_module: bool = True        # background-injection modules on the skip connections
    warp_head_dim: int = 64         # their attention's head width (heads = skip channels // this)
    style_modulation: bool = True   # style modules after each decoder block
    lora_rank: int = 4              # fg/bg LoRA rank on decoder attn2 q/k/v (0 = none)
    # encoder extras (bg/style encoders): size-embedding input width
    adm_in_channels: int = 512
    # GroupNorm groups (diffusers' norm_num_groups): SD's 32; small demo widths use fewer, since
    # one channel per group normalises away each channel's mean (the colour of a flat region)
    norm_groups: int = 32

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4


@dataclasses.dataclass(frozen=True)
class SketchEncoderConfig:
    in_channels: int = 3
    model_channels: int = 320
    ch_mults: tuple[int, ...] = (1, 2, 4, 4)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    scale_factor: float = 0.18215
    norm_groups: int = 32           # GroupNorm groups, as UNetConfig.norm_groups


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """OpenCLIP VisionTransformer (ViT-H/14 at full size)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    head_width: int = 80
    mlp_ratio: float = 4.0
    output_dim: int = 1024

    @property
    def heads(self) -> int:
        return self.width // self.head_width


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """OpenCLIP text tower (ViT-H/14's at full size), used only by text manipulation.
    `clip_skip`: how many final resblocks are skipped (the authors' FrozenOpenCLIPEmbedder: 1)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 1024
    heads: int = 16
    layers: int = 24
    mlp_ratio: float = 4.0
    output_dim: int = 1024
    clip_skip: int = 1


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    parameterization: str = "v"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "v2"
    unet: UNetConfig = UNetConfig()
    bg_encoder: UNetConfig = UNetConfig(warp_module=False, style_modulation=False, lora_rank=0)
    style_encoder: UNetConfig = UNetConfig(warp_module=False, style_modulation=True, lora_rank=0)
    sketch_encoder: SketchEncoderConfig = SketchEncoderConfig()
    vae: VAEConfig = VAEConfig()
    clip: CLIPVisionConfig = CLIPVisionConfig()
    clip_text: CLIPTextConfig = CLIPTextConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    size_embed_dim: int = 256      # per ratio; y = [emb(rh) | emb(rw)] is 2x this wide
    image_size: int = 768          # the resolution the model was trained at (pixels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the one loader (model and training configs): typed dataclasses + YAML + dotted overrides ----

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (parsed YAML / a --set value) checked against the field type `tp` and converted to
    it (lists -> tuples, mappings -> dataclasses, ints -> floats). Raises ValueError naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else
                         f"{where}: {value!r} fits none of {' | '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, where)
        if isinstance(value, (list, tuple)):  # positional form, e.g. a sharding rule [pattern, spec]
            names = [f.name for f in dataclasses.fields(tp)]
            if len(value) > len(names):
                raise ValueError(f"{where}: {tp.__name__} takes at most {len(names)} values, got {value!r}")
            return from_dict(tp, dict(zip(names, value)), where)
        raise ValueError(f"{where}: expected a mapping ({tp.__name__}), got {value!r}")
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        if not args:   # bare tuple: nested lists become tuples
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{where}: unsupported config field type {tp!r}")
    raise ValueError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def plain_data(x):
    """Mappings -> dicts and tuples -> lists, recursively: what yaml.safe_dump / json can write."""
    if isinstance(x, Mapping):
        return {k: plain_data(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain_data(v) for v in x]
    return x


def from_dict(cls, data: Mapping[str, Any], where: str = ""):
    """A config dataclass from plain data, every value type-checked; unknown keys are errors. A
    nested section given in the data starts from ITS class defaults."""
    what = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ValueError(f"{what}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; known: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: Mapping[str, Any] | None) -> dict:
    """Set dotted keys ("optim.lr") in nested plain data (in place); values are checked when the
    dataclass is built (`from_dict`)."""
    for dotted, value in (overrides or {}).items():
        keys = dotted.split(".")
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {dotted}: '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_config(cls, name_or_path: str | os.PathLike, directory: Path,
                overrides: Mapping[str, Any] | None = None, what: str = "config"):
    """`directory/<name>.yaml` (or a .yaml/.json path) + dotted `overrides` -> a `cls` instance."""
    p = Path(name_or_path)
    if not p.suffix:
        p = directory / f"{name_or_path}.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at top level")
    return from_dict(cls, apply_overrides(data, overrides))


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    return from_dict(ModelConfig, data)


def load_model_config(name_or_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """Load `configs/<name>.yaml` (or a path to a .yaml/.json file); `overrides` maps
    dotted keys (`"unet.model_channels"`) to values."""
    return load_config(ModelConfig, name_or_path, CONFIG_DIR, overrides, "model config")
