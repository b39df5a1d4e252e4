"""Stable Diffusion 2.1 weights -> the SD2.1 parts of cdv2's params (U-Net base, VAE, text tower).

Sources:
  * the original LDM checkpoint (`v2-1_768-ema-pruned.safetensors` / `.ckpt`): U-Net
    `model.diffusion_model.*`, VAE `first_stage_model.*`, open_clip ViT-H-14 text tower
    `cond_stage_model.model.*` (no image tower), schedule buffers, maybe LitEma `model_ema.*`;
  * a diffusers folder: `unet/diffusion_pytorch_model[.fp16].safetensors|.bin`
    (UNet2DConditionModel, named by `cdv2.weights.diffusers_unet`) and `vae/...` (AutoencoderKL,
    converted by `cdv2.weights.diffusers_vae`).

"U-Net base" is every cdv2 `unet` param except the authors' additions (fg/bg LoRA factors, warp
and style modules), which SD2.1 does not have (`is_unet_base`). Names follow cdv2's one layout rule
(`torch_layout.LAYOUT`); the one SD2.1 exception is that its transformers use Linear
proj_in/proj_out (`use_linear_in_transformer` / `use_linear_projection`), stored `[C, C]` where
cdv2 (like the authors' model) has the equivalent 1x1 conv: either form is accepted.

Every source is validated from its header first (all missing / unexpected / mis-shaped keys in one
`CheckpointMismatchError`), then streamed one tensor at a time, each cast to `dtype` as read.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

import numpy as np
from tqdm import tqdm

from cdv2.config import ModelConfig
from cdv2.weights.diffusers_unet import ldm_unet_key_to_diffusers
from cdv2.weights.diffusers_vae import diffusers_vae_to_ldm
from cdv2.weights.dtypes import cast_floating, is_floating
from cdv2.weights.mismatch import CheckpointMismatchError
from cdv2.weights.readers import load_state_dict, open_checkpoint
from cdv2.weights.torch_layout import LAYOUT, state_dict_to_params
from cdv2.weights.tree import flatten, leaf_shape, unflatten
from cdv2.weights.v2_checkpoint import SCHEDULE_BUFFERS

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
EMA_PREFIX = "model_ema."
# keys of an LDM SD checkpoint that no cdv2 group takes (the text tower unless asked for)
_LDM_SKIPPED_PREFIXES = ("cond_stage_model.", EMA_PREFIX)
_NEW_UNET_MODULES = ("warp_modules_", "style_modules_")  # the authors' additions (top level)
DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                   "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")


def is_unet_base(path: tuple[str, ...]) -> bool:
    """True for the U-Net params SD2.1 provides; False for LoRA factors, warp and style modules."""
    return not path[0].startswith(_NEW_UNET_MODULES) and not any(s.startswith("lora_") for s in path)


@dataclasses.dataclass(frozen=True)
class Target:
    path: tuple[str, ...]       # (group, *Flax path)
    shape: tuple[int, ...]      # torch shape as the source stores it
    linear_proj: bool = False   # a transformer proj_in/out kernel: [C, C] or [C, C, 1, 1] accepted

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return shape == self.shape or (self.linear_proj and shape in (self.shape[:2], self.shape[:2] + (1, 1)))


def _is_proj(path: tuple[str, ...]) -> bool:
    return path[0] == "unet" and len(path) > 2 and path[-2] in ("proj_in", "proj_out") and path[-1] == "kernel"


def _ldm_targets(cfg: ModelConfig, groups, linear_proj: bool) -> dict[str, Target]:
    """{LDM key (with its group prefix): Target} for the U-Net base and/or the VAE."""
    from cdv2.weights.pretrained import model_param_shapes

    shapes = {g: model_param_shapes(cfg, (g,))[g] for g in groups}  # cached per group
    out = {}
    for group, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX)):
        if group not in groups:
            continue
        for path, leaf in flatten(shapes[group], sep=None).items():
            if group == "unet" and not is_unet_base(path):
                continue
            full = (group,) + path
            shape = LAYOUT.torch_shape(path, leaf_shape(leaf))
            proj = _is_proj(full)
            if proj and linear_proj:
                shape = shape[:2]
            out[prefix + LAYOUT.to_key(path)] = Target(full, shape, proj)
    return out


def ldm_targets(cfg: ModelConfig, *, vae: bool = True, ema: bool = False,
                linear_proj: bool = True) -> dict[str, Target]:
    """{key of the SD2.1 LDM checkpoint: Target} for cdv2's U-Net base (and VAE). `ema`: the U-Net
    from LitEma's copies (`model_ema.diffusion_modelinput_blocks00weight`, dots dropped).
    `linear_proj`: the shapes listed for proj_in/out are SD2.1's Linear ones (both are accepted)."""
    table = _ldm_targets(cfg, ("unet", "vae") if vae else ("unet",), linear_proj)
    if ema:
        table = {(EMA_PREFIX + k[len("model."):].replace(".", "") if k.startswith(UNET_PREFIX) else k): t
                 for k, t in table.items()}
    return table


def diffusers_unet_targets(cfg: ModelConfig, linear_proj: bool = True) -> dict[str, Target]:
    """{diffusers UNet2DConditionModel key: Target} for cdv2's U-Net base."""
    return {ldm_unet_key_to_diffusers(k[len(UNET_PREFIX):], cfg.unet): t
            for k, t in _ldm_targets(cfg, ("unet",), linear_proj).items()}


# ------------------------------------------------------------------------------- plan, stream
def plan(reader, table: Mapping[str, Target], skip_prefixes=(), skip_keys=()) -> list[tuple[str, Target]]:
    """Check a reader's keys and shapes (header only) against `table`; -> [(key, Target)] or one
    CheckpointMismatchError naming every missing, unexpected and mis-shaped key."""
    unexpected, misshaped, problems, todo = [], [], [], []
    for key in reader.keys():
        shape = tuple(reader.shape(key))
        target = table.get(key)
        if target is None:
            if not (key in skip_keys or (skip_prefixes and key.startswith(tuple(skip_prefixes)))):
                unexpected.append((key, shape))
        elif not target.accepts(shape):
            misshaped.append((key, target.shape, shape))
        elif not is_floating(np.dtype(reader.dtype(key))):
            problems.append(f"{key}: dtype {np.dtype(reader.dtype(key))} is not a float type")
        else:
            todo.append((key, target))
    seen = set(reader.keys())
    missing = [(k, t.shape) for k, t in table.items() if k not in seen]
    if missing or unexpected or misshaped or problems:
        raise CheckpointMismatchError(getattr(reader, "path", "checkpoint"), missing, unexpected, misshaped, problems)
    return todo


def stream(reader, todo, dtype=np.float32, progress: bool = True, desc: str = "converting") -> dict:
    """Read the planned tensors one at a time into {(group, *path): Flax-layout array}."""
    flat = {}
    for key, target in tqdm(todo, desc=desc, unit="tensor", disable=not progress):
        arr = cast_floating(reader.get(key), dtype)
        if target.linear_proj and arr.ndim == 2:
            arr = arr[:, :, None, None]  # Linear [out, in] -> the same map as a 1x1 conv
        flat[target.path] = LAYOUT.to_flax(key, arr)
    return flat


# ------------------------------------------------------------------------------- LDM file
def plan_sd21_checkpoint(reader, cfg: ModelConfig, *, vae: bool = True, ema: bool = False) -> list:
    """Validate an SD2.1 LDM checkpoint's header (any reader: keys/shape/dtype) -> the U-Net
    (and VAE) tensors to read. Schedule buffers, `cond_stage_model.*` and `model_ema.*` (or, with
    `ema`, the non-EMA U-Net) are skipped; every other unknown key is an error."""
    skip = _LDM_SKIPPED_PREFIXES + ((UNET_PREFIX,) if ema else ()) + (() if vae else (VAE_PREFIX,))
    return plan(reader, ldm_targets(cfg, vae=vae, ema=ema), skip,
                SCHEDULE_BUFFERS + ("model_ema.decay", "model_ema.num_updates"))


def convert_sd21_checkpoint(src, cfg: ModelConfig, *, vae: bool = True, ema: bool = False, text: bool = False,
                            dtype=np.float32, progress: bool = True) -> dict:
    """The original SD2.1 checkpoint (a path or an open reader) -> {"unet": U-Net base params,
    "vae": ..., ["clip_text": ...]} (numpy, Flax layout).

    `ema`: take the U-Net from LitEma's `model_ema.*` (a non-pruned training file) instead of
    `model.diffusion_model.*`. `text`: also convert the open_clip text tower
    (`cond_stage_model.model.*`, via `cdv2.weights.open_clip_text`) into group `clip_text`."""
    reader = open_checkpoint(src) if isinstance(src, (str, Path)) else src
    try:
        params = unflatten(stream(reader, plan_sd21_checkpoint(reader, cfg, vae=vae, ema=ema), dtype, progress),
                           sep=None)
        if text:
            params["clip_text"] = _convert_text(reader, cfg, dtype)
    finally:
        if reader is not src:
            reader.close()
    return params


def _convert_text(reader, cfg: ModelConfig, dtype) -> dict:
    from cdv2.weights.open_clip_text import convert_open_clip_text

    source = getattr(reader, "path", "checkpoint")
    keys = [k for k in reader.keys() if k.startswith(TEXT_PREFIX)]
    if not keys:
        raise CheckpointMismatchError(source, problems=[f"no text tower: no key starts with '{TEXT_PREFIX}'"])
    state = {"model." + k[len(TEXT_PREFIX):]: cast_floating(reader.get(k), dtype) for k in keys}
    try:
        return convert_open_clip_text(state, cfg.clip_text)
    except ValueError as e:
        raise CheckpointMismatchError(source, problems=[str(e)]) from None


# ------------------------------------------------------------------------------- diffusers folder
def diffusers_weights_file(folder, component: str) -> Path:
    """FOLDER/<component>/diffusion_pytorch_model[.fp16].safetensors|.bin (first that exists)."""
    base = Path(folder) / component
    for name in DIFFUSERS_FILES:
        if (base / name).is_file():
            return base / name
    raise FileNotFoundError(f"{folder}: no diffusers {component} weights (looked for "
                            f"{', '.join(f'{component}/{n}' for n in DIFFUSERS_FILES)})")


def convert_diffusers_unet(path, cfg: ModelConfig, dtype=np.float32, progress: bool = True) -> dict:
    """A diffusers UNet2DConditionModel file -> cdv2 U-Net base params (nested, numpy)."""
    with open_checkpoint(path) as reader:
        flat = stream(reader, plan(reader, diffusers_unet_targets(cfg)), dtype, progress)
    return unflatten({p[1:]: v for p, v in flat.items()}, sep=None)


def convert_diffusers_vae(path, cfg: ModelConfig, dtype=np.float32) -> dict:
    """A diffusers AutoencoderKL file -> cdv2 VAE params (via `diffusers_vae_to_ldm`)."""
    try:
        ldm = diffusers_vae_to_ldm(load_state_dict(path), cfg.vae, dtype=dtype)
    except ValueError as e:
        raise CheckpointMismatchError(path, problems=[str(e)]) from None
    return state_dict_to_params(ldm)


def convert_diffusers_folder(folder, cfg: ModelConfig, *, vae: bool = True, dtype=np.float32,
                             progress: bool = True) -> dict:
    """A diffusers SD2.1 folder (unet/, vae/) -> {"unet": U-Net base params, "vae": ...}."""
    out = {"unet": convert_diffusers_unet(diffusers_weights_file(folder, "unet"), cfg, dtype, progress)}
    if vae:
        out["vae"] = convert_diffusers_vae(diffusers_weights_file(folder, "vae"), cfg, dtype)
    return out


def convert_sd21(source, cfg: ModelConfig, *, dtype=np.float32, progress: bool = True, **kw) -> dict:
    """`source`: an LDM checkpoint file or a diffusers folder -> {"unet": base, "vae": ...}."""
    p = Path(source)
    if p.is_dir():
        return convert_diffusers_folder(p, cfg, dtype=dtype, progress=progress, **kw)
    return convert_sd21_checkpoint(p, cfg, dtype=dtype, progress=progress, **kw)
