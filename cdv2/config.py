"""Typed model configuration and its one loader (YAML files in `configs/`, plus overrides).

Every network is built from these dataclasses only; the YAML files are plain data. The field
names follow the authors' config keys where one exists, so `configs/v2.yaml` reads like their
`configs/inference/v2.yaml`.
"""
from __future__ import annotations

import dataclasses
import json
import os
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
    schedule: ScheduleConfig = ScheduleConfig()
    size_embed_dim: int = 256      # per ratio; y = [emb(rh) | emb(rw)] is 2x this wide
    image_size: int = 768          # the resolution the model was trained at (pixels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "unet": UNetConfig,
    "bg_encoder": UNetConfig,
    "style_encoder": UNetConfig,
    "sketch_encoder": SketchEncoderConfig,
    "vae": VAEConfig,
    "clip": CLIPVisionConfig,
    "schedule": ScheduleConfig,
}


def _build(cls, data: Mapping[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"config section '{where}': unknown keys {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    data = dict(data)
    kwargs = {}
    for key, cls in _SECTIONS.items():
        if key in data:
            section = data.pop(key)
            if not isinstance(section, Mapping):
                raise ValueError(f"config section '{key}' must be a mapping, got {type(section).__name__}")
            kwargs[key] = _build(cls, section, key)
    top = {f.name for f in dataclasses.fields(ModelConfig)} - set(_SECTIONS)
    unknown = sorted(set(data) - top)
    if unknown:
        raise ValueError(f"model config: unknown keys {unknown}")
    kwargs.update(data)
    return ModelConfig(**kwargs)


def _apply_override(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def load_model_config(name_or_path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> ModelConfig:
    """Load `configs/<name>.yaml` (or a path to a .yaml/.json file); `overrides` maps
    dotted keys (`"unet.model_channels"`) to values."""
    p = Path(name_or_path)
    if not p.suffix:
        p = CONFIG_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"model config not found: {p}")
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at top level")
    for k, v in (overrides or {}).items():
        _apply_override(data, k, v)
    return model_config_from_dict(data)
