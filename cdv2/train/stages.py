"""What each training stage trains (paper §4.1, ARCHITECTURE §6.3), and the optimizer built so
that frozen parameters carry no optimizer state.

    stage 1  all of `unet` except the LoRA factors, warp_modules_* and style_modules_*; all of
             `sketch_encoder`
    stage 2  the decoder fg/bg LoRA factors, unet warp_modules_*, all of `bg_encoder`
    stage 3  all of `style_encoder`, unet style_modules_*
CLIP and the VAE never train. (The authors' v2 trainer is missing; this mapping follows the paper
and XL's `setup_training_params`.)

Paths are "/"-joined param paths (`unet/output_blocks_3_1/.../attn2/to_q/lora_down_fg/kernel`).
"""
from __future__ import annotations

import re
from typing import Any, Callable

import jax
import optax

from cdv2.train.config import OptimConfig
from cdv2.weights.tree import flatten, unflatten

TRAINABLE, FROZEN = "trainable", "frozen"
_LORA = re.compile(r"/lora_(down|up)_(fg|bg)/")
_WARP = re.compile(r"^unet/warp_modules_\d+/")
_STYLE = re.compile(r"^unet/style_modules_\d+_\d+/")


def is_trainable(path: str, stage: int) -> bool:
    group = path.split("/", 1)[0]
    lora, warp, style = bool(_LORA.search(path)), bool(_WARP.match(path)), bool(_STYLE.match(path))
    if stage == 1:
        return group == "sketch_encoder" or (group == "unet" and not (lora or warp or style))
    if stage == 2:
        return group == "bg_encoder" or (group == "unet" and (lora or warp))
    if stage == 3:
        return group == "style_encoder" or (group == "unet" and style)
    raise ValueError(f"stage must be 1, 2 or 3, got {stage}")


def path_str(key_path) -> str:
    """"a/b/0/c" for a jax key path (dict keys, attribute names, sequence indices)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in key_path)


def trainable_mask(params, stage: int):
    """Boolean pytree over `params` (any pytree of arrays, shapes or tracers): True = trained."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: is_trainable(path_str(kp), stage), params)


def stage_labels(stage: int) -> Callable[[Any], Any]:
    """`optax.multi_transform` labels: a function of the params tree."""
    return lambda params: jax.tree.map(lambda m: TRAINABLE if m else FROZEN, trainable_mask(params, stage))


def split_trainable(params, stage: int) -> tuple[dict, dict]:
    """Flat {path: leaf} dicts (trainable, frozen); `merge_params` inverts."""
    flat = flatten(params)
    train = {k: v for k, v in flat.items() if is_trainable(k, stage)}
    frozen = {k: v for k, v in flat.items() if k not in train}
    return train, frozen


def merge_params(*flat_dicts: dict) -> dict:
    merged = {}
    for d in flat_dicts:
        merged.update(d)
    return unflatten(merged)


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps` optimizer updates, then constant (authors: constant)."""
    if cfg.warmup_steps > 0:
        return optax.warmup_constant_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: OptimConfig, stage: int) -> optax.GradientTransformation:
    """AdamW (torch semantics: decoupled decay on every trainable leaf) behind optional global-norm
    clipping and k-step gradient accumulation (MultiSteps, mean of the micro-batch gradients), all
    inside the TRAINABLE branch of a multi_transform; frozen leaves get `set_to_zero`, which has an
    empty state, so neither Adam moments nor accumulators exist for them."""
    inner = optax.adamw(lr_schedule(cfg), b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    if cfg.grad_clip_norm is not None:
        inner = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), inner)
    if cfg.grad_accum_steps > 1:
        inner = optax.MultiSteps(inner, every_k_schedule=cfg.grad_accum_steps).gradient_transformation()
    return optax.multi_transform({TRAINABLE: inner, FROZEN: optax.set_to_zero()}, stage_labels(stage))
