"""Batch-level training augmentations (spec §6.2, §6.4), pure jax.numpy for the jitted train step:
static shapes, all randomness from one PRNG key. Arrays are NHWC in the pipeline's ranges
(image/reference/sketch in [-1, 1], white = +1 for images and -1 for the inverted sketch; masks
in [0, 1]). Per-sample flags and thresholds are (B,) vectors.

Reference implementation: ColorizeDiffusionXL `ColorizerXLTrainer.get_input` (thresholds,
character-mask merging) and `refnet/util.py background_bleaching` (also in the v2 repo).

Character-mask merging rolls the reference masks by `merge_offset` (4) along the batch. `jnp.roll`
(like `torch.roll`) shifts modulo B, so for B in {1, 2, 4} the shift is a multiple of B and every
sample gets *its own* mask: a merged sample then has its own character whitened out (only its
background is left) instead of a mismatched silhouette; for B = 3 the shift is 1. Only B >= 5
gives the intended "another sample's silhouette" for every sample.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    thresh_min: float = 0.01        # XL; v1.5 used [0.05, 0.95]
    thresh_max: float = 0.99
    ucg_rate: float = 0.5           # reference (context) drop probability, v2 config
    inpaint_p: float = 0.1          # character-mask merging probability, XL
    merge_offset: int = 4
    p_white_bg: float = 0.05        # v2 config `p_white_bg` (the paper says 1%)
    bleach: bool = True             # background bleaching + reference_bg (stages > 0)


def _per_sample(v: jax.Array, ndim: int) -> jax.Array:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def sample_thresholds(key: jax.Array, batch_size: int, thresh_min: float = 0.01,
                      thresh_max: float = 0.99) -> tuple[jax.Array, jax.Array]:
    """Per-sample mask thresholds (ts_s, ts_r), each (B,) ~ U[thresh_min, thresh_max)."""
    u = jax.random.uniform(key, (2, batch_size), minval=thresh_min, maxval=thresh_max)
    return u[0], u[1]


def reference_keep(key: jax.Array, batch_size: int, ucg_rate: float) -> jax.Array:
    """(B,) float32 multiplier for each sample's whole reference context: 0 with probability
    `ucg_rate` (the unconditional reference branch), else 1."""
    return (jax.random.uniform(key, (batch_size,)) >= ucg_rate).astype(jnp.float32)


def drop_reference(context: jax.Array, keep: jax.Array) -> jax.Array:
    """Zero the dropped samples' context (B, tokens, dim)."""
    return context * _per_sample(keep, context.ndim).astype(context.dtype)


def merge_character_masks(key: jax.Array, reference: jax.Array, rmask: jax.Array,
                          ts_r: jax.Array, inpaint_p: float, offset: int = 4):
    """With probability `inpaint_p` per sample, whiten (+1) the reference where the mask of the
    sample `offset` places earlier in the batch is >= ts_r:
    ``where(roll(rmask, offset, 0) < ts_r, ref, 1)``. Returns (reference, merged flags (B,))."""
    flags = jax.random.uniform(key, (reference.shape[0],)) < inpaint_p
    other = jnp.roll(rmask, offset, axis=0)
    merged = jnp.where(other < _per_sample(ts_r, rmask.ndim), reference, 1.0)
    return jnp.where(_per_sample(flags, reference.ndim), merged, reference), flags


def background_bleaching(key: jax.Array, image: jax.Array, sketch: jax.Array,
                         reference: jax.Array, smask: jax.Array, rmask: jax.Array,
                         ts_s: jax.Array, ts_r: jax.Array, p: float):
    """`background_bleaching` of refnet/util.py. Per sample with probability p ("bleached"): the
    GT background (smask <= ts_s) becomes white and the background reference a flat level
    U[0.95, 1); otherwise the background reference is the reference with its character
    (rmask > ts_r) whitened. For every sample the sketch background becomes -1.
    Returns (image, sketch, reference_bg, bleached flags (B,))."""
    k_flag, k_level = jax.random.split(key)
    b = image.shape[0]
    bleached = jax.random.uniform(k_flag, (b,)) < p
    level = jax.random.uniform(k_level, (b,)) * 0.05 + 0.95
    fg = smask > _per_sample(ts_s, smask.ndim)
    flag_img = _per_sample(bleached, image.ndim)
    image = jnp.where(flag_img & ~fg, 1.0, image).astype(image.dtype)
    sketch = jnp.where(fg, sketch, -1.0).astype(sketch.dtype)
    ref_bg = jnp.where(rmask <= _per_sample(ts_r, rmask.ndim), reference, 1.0)
    flat = jnp.broadcast_to(_per_sample(level, reference.ndim), reference.shape)
    ref_bg = jnp.where(_per_sample(bleached, reference.ndim), flat, ref_bg).astype(reference.dtype)
    return image, sketch, ref_bg, bleached


def augment_batch(key: jax.Array, batch: dict, cfg: AugmentConfig = AugmentConfig()):
    """All of the above on a pipeline batch (keys image, sketch, reference, smask, rmask).

    Returns (batch, flags): the batch with `reference` merged, `ts_s`, `ts_r` and `ref_keep`
    added and, when cfg.bleach, `image`/`sketch` bleached and `reference_bg` added; flags holds
    the (B,) booleans `merged`, `bleached` and `ref_dropped`. The order (merge, then bleaching from
    the merged reference) is XL's."""
    k_ts, k_merge, k_bleach, k_drop = jax.random.split(key, 4)
    b = batch["image"].shape[0]
    ts_s, ts_r = sample_thresholds(k_ts, b, cfg.thresh_min, cfg.thresh_max)
    out = dict(batch, ts_s=ts_s, ts_r=ts_r)
    out["reference"], merged = merge_character_masks(
        k_merge, batch["reference"], batch["rmask"], ts_r, cfg.inpaint_p, cfg.merge_offset)
    bleached = jnp.zeros((b,), bool)
    if cfg.bleach:
        out["image"], out["sketch"], out["reference_bg"], bleached = background_bleaching(
            k_bleach, batch["image"], batch["sketch"], out["reference"], batch["smask"],
            batch["rmask"], ts_s, ts_r, cfg.p_white_bg)
    out["ref_keep"] = reference_keep(k_drop, b, cfg.ucg_rate)
    flags = {"merged": merged, "bleached": bleached, "ref_dropped": out["ref_keep"] == 0}
    return out, flags
