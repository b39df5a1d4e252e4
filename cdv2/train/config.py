"""Typed training configuration (`configs/train/*.yaml` plus dotted overrides), loaded by the one
config loader of `cdv2/config.py`.

Authors' values (ARCHITECTURE §6, paper §5.1, original: train.py/options.py and
configs/training/sd2.1/v2.yaml) are the defaults; what the authors' code does not pin down is marked
in the YAML files. `batch_size` is the GLOBAL batch of one `train_step` call (all devices); with
`optim.grad_accum_steps = k` one optimizer update sees k * batch_size samples.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Union

from cdv2.config import CONFIG_DIR, from_dict, load_config
from cdv2.modules.unet import REMAT_POLICIES
from cdv2.weights.dtypes import COMPUTE_DTYPES

TRAIN_CONFIG_DIR = CONFIG_DIR / "train"

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
    """Device mesh ("data", "fsdp"). On a multi-slice / multi-host cluster the `dcn_*` factors give
    the part of each axis that crosses the slower data-centre network (between TPU slices, or between
    hosts on GPUs): the mesh is then ICI (data x fsdp within a slice) x DCN (dcn_data x dcn_fsdp)."""

    data: int = -1      # -1: every device not used by fsdp (per slice when dcn_* > 1)
    fsdp: int = 1
    dcn_data: int = 1   # data-parallel replicas across slices/hosts (usual choice)
    dcn_fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The input pipeline (cdv2.train.data): crop buckets scaled from the authors' 768 list."""

    resolution: int = 768             # training resolution (collate buckets)
    multiple: int = 64                # bucket sides are multiples of this (64 keeps latents /8 divisible)
    workers: Optional[int] = None     # grain worker processes; None = the CPU count, 0 = in-process
    cached: Optional[str] = None      # latent cache dir (tools/cache_latents.py): VAE moments / CLIP tokens read, not computed


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Pretrained starting weights when `init_from` is null (cdv2.weights.sd21_init): the U-Net base
    and VAE from SD2.1-768-v (`sd21`: v2-1_768-ema-pruned.safetensors/.ckpt, or `diffusers`: a
    diffusers SD2.1 folder), the CLIP image tower from `open_clip` (ViT-H-14 open_clip_pytorch_model.bin),
    new modules as the authors initialise them. All null: a random init (tiny configs, tests)."""

    sd21: Optional[str] = None
    diffusers: Optional[str] = None
    open_clip: Optional[str] = None
    ema: bool = False                 # sd21 only: the U-Net from its model_ema.* copies

    @property
    def given(self) -> bool:
        return bool(self.sd21 or self.diffusers or self.open_clip)


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    pattern: str
    spec: SpecLike = "auto"

    def __post_init__(self):
        if isinstance(self.spec, str) and self.spec not in ("auto", "replicated"):
            raise ValueError(f"sharding spec string must be 'auto' or 'replicated', got {self.spec!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "v2"                 # model config name (configs/<model>.yaml) or path
    stage: int = 1                    # paper stage 1 | 2 | 3 (authors' training_stage 0 | 1 | 2)
    batch_size: int = 256             # global, per train_step call
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
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
    attention_impl: Optional[str] = "auto"  # auto (cdv2.train.step.build_components: pallas on TPU, else cdv2.model.resolve_attention), xla, chunked, cudnn, pallas, library
    mesh: MeshConfig = MeshConfig()
    sharding_rules: tuple[ShardingRule, ...] = (ShardingRule(".*", "auto"),)
    min_shard_size: int = 2 ** 16     # "auto" replicates leaves with fewer elements than this
    # bookkeeping
    total_steps: Optional[int] = None
    checkpoint_every: int = 5000      # options.py --save_freq_step
    log_every: int = 1000             # options.py --print_freq
    sample_every: int = 0             # options.py --log_img_step (None); 0 = never
    init_from: Optional[str] = None   # weights dir to start from (stage 2 starts from stage 1, ...)
    init: InitConfig = InitConfig()   # stage 1 from SD2.1 + open_clip when init_from is null
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
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.data.workers is not None and self.data.workers < 0:
            raise ValueError(f"data.workers must be >= 0 (or null: the CPU count), got {self.data.workers}")
        if self.init_from and self.init.given:
            raise ValueError("give either init_from (a cdv2 weights dir / the authors' file) or init.* (SD2.1), not both")
        if not 0.0 <= self.thresh_min <= self.thresh_max <= 1.0:
            raise ValueError("need 0 <= thresh_min <= thresh_max <= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def train_config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    return from_dict(TrainConfig, data)


def load_train_config(name_or_path: str | os.PathLike,
                      overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Load `configs/train/<name>.yaml` (or a .yaml/.json path); `overrides` maps dotted keys
    (`"optim.lr"`, `"mesh.fsdp"`) to values, each checked against the field's type."""
    return load_config(TrainConfig, name_or_path, TRAIN_CONFIG_DIR, overrides, "train config")
