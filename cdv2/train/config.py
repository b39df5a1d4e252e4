"""Typed training configuration and its loader (`configs/train/*.yaml` plus dotted overrides),
the training counterpart of `cdv2/config.py`.

Authors' values (ARCHITECTURE §6, paper §5.1, original: train.py/options.py and
configs/training/sd2.1/v2.yaml) are the defaults; what the authors' code does not pin down is marked
in the YAML files. `batch_size` is the GLOBAL batch of one `train_step` call (all devices); with
`optim.grad_accum_steps = k` one optimizer update sees k * batch_size samples.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

from cdv2.config import CONFIG_DIR, _apply_override

TRAIN_CONFIG_DIR = CONFIG_DIR / "train"
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")
COMPUTE_DTYPES = ("float32", "bfloat16")

# One sharding rule: (regex searched in the "/"-joined param path, spec). A spec is a list with one
# entry per array dim (None, a mesh axis name, or a list of axis names), or the string "auto"
# (shard the largest dim divisible by the fsdp size along "fsdp", replicate small/odd leaves) or
# "replicated". The first matching rule wins; leaves no rule matches are replicated.
SpecLike = Union[str, tuple]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5                          # paper / options.py
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01                # torch AdamW default (train.py passes only lr)
    eps: float = 1e-8
    warmup_steps: int = 0                     # authors: no schedule, no warmup
    grad_clip_norm: Optional[float] = None    # authors: no clipping in train.py
    grad_accum_steps: int = 1                 # authors: --accumulate_batches is not wired in


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1      # -1: every device not used by fsdp
    fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    pattern: str
    spec: SpecLike = "auto"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "v2"                 # model config name (configs/<model>.yaml) or path
    stage: int = 1                    # paper stage 1 | 2 | 3 (authors' training_stage 0 | 1 | 2)
    batch_size: int = 256             # global, per train_step call
    optim: OptimConfig = OptimConfig()
    # objective (ARCHITECTURE §6.2)
    ucg_rate: float = 0.5             # whole-reference drop probability
    ucg_rate_noisy: float = 0.8       # stage 1 only: drop rate during the first `noisy_steps` updates
    noisy_steps: int = 0
    offset_noise: float = 0.05
    vae_sample: bool = True           # latents are posterior samples (authors), else the mean
    # batch augmentations (ARCHITECTURE §6.4, cdv2.train.augment)
    p_white_bg: float = 0.05
    inpaint_p: float = 0.1
    merge_offset: int = 4
    thresh_min: float = 0.01
    thresh_max: float = 0.99
    bg_path_p: float = 0.5            # stage 3: probability that a step runs the stage-2 background path
    # precision, memory, parallelism
    compute_dtype: str = "float32"    # params are always fp32 master weights
    remat: str = "none"
    attention_impl: Optional[str] = "auto"  # cdv2.model.resolve_attention: auto, xla, chunked, cudnn, library
    mesh: MeshConfig = MeshConfig()
    sharding_rules: tuple[ShardingRule, ...] = (ShardingRule(".*", "auto"),)
    min_shard_size: int = 2 ** 16     # "auto" replicates leaves with fewer elements than this
    # bookkeeping
    total_steps: Optional[int] = None
    checkpoint_every: int = 5000      # options.py --save_freq_step
    log_every: int = 1000             # options.py --print_freq
    sample_every: int = 0             # options.py --log_img_step (None); 0 = never
    init_from: Optional[str] = None   # weights dir to start from (stage 2 starts from stage 1, ...)
    seed: int = 0

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.optim.grad_accum_steps < 1:
            raise ValueError("optim.grad_accum_steps must be >= 1")
        if not 0.0 <= self.thresh_min <= self.thresh_max <= 1.0:
            raise ValueError("need 0 <= thresh_min <= thresh_max <= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _spec(value) -> SpecLike:
    if isinstance(value, str):
        if value not in ("auto", "replicated"):
            raise ValueError(f"sharding spec string must be 'auto' or 'replicated', got {value!r}")
        return value
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)


def _rules(data) -> tuple[ShardingRule, ...]:
    rules = []
    for item in data:
        if isinstance(item, Mapping):
            rules.append(ShardingRule(item["pattern"], _spec(item.get("spec", "auto"))))
        else:
            pattern, spec = item
            rules.append(ShardingRule(pattern, _spec(spec)))
    return tuple(rules)


def _section(cls, data: Mapping[str, Any], where: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"train config section '{where}': unknown keys {unknown}; known: {sorted(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def train_config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    data = dict(data)
    kwargs: dict[str, Any] = {}
    if "optim" in data:
        kwargs["optim"] = _section(OptimConfig, data.pop("optim"), "optim")
    if "mesh" in data:
        kwargs["mesh"] = _section(MeshConfig, data.pop("mesh"), "mesh")
    if "sharding_rules" in data:
        kwargs["sharding_rules"] = _rules(data.pop("sharding_rules"))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"train config: unknown keys {unknown}")
    kwargs.update(data)
    return TrainConfig(**kwargs)


def load_train_config(name_or_path: str | os.PathLike,
                      overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Load `configs/train/<name>.yaml` (or a .yaml/.json path); `overrides` maps dotted keys
    (`"optim.lr"`, `"mesh.fsdp"`) to values."""
    p = Path(name_or_path)
    if not p.suffix:
        p = TRAIN_CONFIG_DIR / f"{name_or_path}.yaml"
    if not p.is_file():
        raise FileNotFoundError(f"train config not found: {p}")
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at top level")
    for k, v in (overrides or {}).items():
        _apply_override(data, k, v)
    return train_config_from_dict(data)
