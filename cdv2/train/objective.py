"""The training objective: v-prediction MSE with offset noise (ARCHITECTURE §6.2) and the per-stage
condition assembly, built with the
shared conditioning builder `cdv2.conditioning` (also used by inference, §4.2-4.3).

Randomness. Every per-sample draw (t, noise, offset noise, reference drop, VAE posterior noise)
comes from that sample's own key, `fold_in(step_key, global sample index)`, so the draws do not
depend on the mesh, the process count or how a batch is split into accumulation micro-batches
(k micro-batches then equal one big batch exactly). Batch-level draws (the augmentations of
`cdv2.train.augment`, which mix samples, and the stage-3 coin) use a separate batch key.

Choices where the authors' v2 trainer is missing (documented, INFERRED):
* Size embedding y (bg/style encoders): the inference formula (`size_ratios`: the original image
  size `batch["size"]` over the crop (H, W), with the authors' "bias" for sources smaller than the
  crop), since in training the reference is the squashed full image of that size.
* Stage 2 follows inference background enhancement without a background image: r_bg is the
  reference with its character whitened (or a flat bleached level), z_bg = VAE(squash(r_bg, H, W)),
  e_bg = CLIP(r_bg), hs_bg = bg_encoder(z_bg, y, e) (context e, paper Eq. for stage 2), the U-Net
  context [e | e_bg] is dropped as a whole per sample, split cross-attention with the latent sketch
  mask and the per-sample threshold ts_s, decoder fg/bg LoRAs on.
* Stage 3: style = style_encoder(z_ref, y, e) with z_ref = VAE(squash(reference, H, W)); the
  stage-2 background path is on for a whole (micro-)step with probability `bg_path_p` (see step.py:
  a per-step coin, because the two paths differ in context length and LoRA use, so they cannot be
  mixed per sample without changing the plain path).
* The bg/style encoder inputs (hs_bg, style vectors) are NOT dropped with the reference, as at
  inference, where the unconditional-reference branch keeps them.
* Cached inputs: `batch["latent"]` (scaled diffusion latent of `image`) and `batch["clip_tokens"]`
  (CLIP tokens of the un-augmented `reference`) replace the VAE / CLIP forward. They cannot carry
  augmentations, so a cached latent with background bleaching (stages 2/3, p_white_bg > 0) or
  cached tokens with character-mask merging (inpaint_p > 0) is an error.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from cdv2.model import Components
# the one conditioning builder, shared with inference (cdv2.sample.conditions)
from cdv2.conditioning import (background_features, clip_tokens, latent_sketch_mask, size_condition, sketch_hints,
                               split_context, squash, style_vectors, vae_latent)
from cdv2.conditioning import size_ratios as training_size_ratios  # noqa: F401  (the inference formula)
from cdv2.diffusion.parameterization import get_v, q_sample
from cdv2.diffusion.schedule import ldm_alphas_cumprod
from cdv2.train.augment import AugmentConfig, augment_batch, merge_character_masks, sample_thresholds
from cdv2.train.config import TrainConfig
from cdv2.train.latent_cache import latent_from_moments

# purposes of per-sample keys (fold_in tags)
_T, _EPS, _OFFSET, _DROP, _VAE_IMAGE, _VAE_REF, _VAE_BG = range(7)


@struct.dataclass
class StepRngs:
    sample_keys: jax.Array     # (B, 2) uint32: one key per sample, from its global index
    batch_key: jax.Array       # (2,) uint32: batch-level draws (augmentations)


def sample_rngs(step_key, first_index, batch_size: int, batch_key) -> StepRngs:
    ids = first_index + jnp.arange(batch_size, dtype=jnp.uint32)
    return StepRngs(jax.vmap(jax.random.fold_in, (None, 0))(step_key, ids), batch_key)


def _keys(rngs: StepRngs, purpose: int):
    return jax.vmap(jax.random.fold_in, (0, None))(rngs.sample_keys, purpose)


def _normal(keys, shape_tail):
    return jax.vmap(lambda k: jax.random.normal(k, shape_tail, jnp.float32))(keys)


# --- the diffusion objective (pure formulas) ----------------------------------------------------

def draw_noise(rngs: StepRngs, latent_shape, num_timesteps: int = 1000):
    """Per-sample t ~ U{0..T-1} (B,), eps ~ N(0,1) of the latent shape, and offset noise
    n_bc ~ N(0,1) of shape (B, 1, 1, C)."""
    b, c = latent_shape[0], latent_shape[-1]
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_timesteps))(_keys(rngs, _T))
    eps = _normal(_keys(rngs, _EPS), tuple(latent_shape[1:]))
    n_bc = _normal(_keys(rngs, _OFFSET), (1, 1, c))
    assert n_bc.shape == (b, 1, 1, c)
    return t, eps, n_bc


def noisy_latent_and_target(x0, eps, n_bc, alpha_bar, offset_noise: float):
    """noise = eps + offset * n_bc; x_t = sqrt(a) x0 + sqrt(1-a) noise; v = sqrt(a) noise - sqrt(1-a) x0.
    alpha_bar broadcasts against x0 (e.g. (B, 1, 1, 1))."""
    noise = eps + offset_noise * n_bc
    return q_sample(x0, noise, alpha_bar), get_v(x0, noise, alpha_bar)


def v_mse(model_out, v):
    """MSE over everything, in fp32 (the authors' `MSE(model_out.float(), v)`)."""
    return jnp.mean(jnp.square(model_out.astype(jnp.float32) - v.astype(jnp.float32)))


# --- condition assembly -----------------------------------------------------------------------------

def _augment(batch: dict, rngs: StepRngs, cfg: TrainConfig) -> dict:
    """Stage 1: thresholds + character-mask merging; stages 2/3: + background bleaching
    (`cdv2.train.augment`, XL's order). The reference drop is drawn per sample elsewhere."""
    aug = AugmentConfig(thresh_min=cfg.thresh_min, thresh_max=cfg.thresh_max, ucg_rate=0.0,
                        inpaint_p=cfg.inpaint_p, merge_offset=cfg.merge_offset, p_white_bg=cfg.p_white_bg,
                        bleach=True)
    if cfg.stage > 1:
        return augment_batch(rngs.batch_key, batch, aug)[0]
    if cfg.inpaint_p <= 0:
        return batch
    k_ts, k_merge = jax.random.split(rngs.batch_key)
    _, ts_r = sample_thresholds(k_ts, batch["reference"].shape[0], cfg.thresh_min, cfg.thresh_max)
    reference, _ = merge_character_masks(k_merge, batch["reference"], batch["rmask"], ts_r,
                                         cfg.inpaint_p, cfg.merge_offset)
    return dict(batch, reference=reference)


def _check_cache(batch: dict, cfg: TrainConfig) -> None:
    """Cached inputs skip the VAE / CLIP forward but cannot carry the augmentations. (In stages 2/3
    the batch still needs image/reference/masks: the background path and bleaching read them.)"""
    if ("latent" in batch or "latent_moments" in batch) and cfg.stage > 1 and cfg.p_white_bg > 0:
        raise ValueError("a cached `latent` cannot carry background bleaching: set p_white_bg=0 or "
                         "drop the cache in stages 2/3")
    if "clip_tokens" in batch and cfg.inpaint_p > 0:
        raise ValueError("cached `clip_tokens` cannot carry character-mask merging: set inpaint_p=0 "
                         "or drop the cache")


def _remat(fn, policy: str):
    """`jax.checkpoint` around a whole encoder apply (sketch/bg/style) with a named policy: its
    activations are recomputed in the backward pass instead of kept across the U-Net's. The U-Net
    itself is checkpointed per block (`cdv2.modules.unet.remat_block`, set in `build_components`):
    around the whole U-Net it saves nothing, since its backward needs them all at once anyway."""
    if policy == "none":
        return fn
    policies = jax.checkpoint_policies
    pol = {"full": policies.nothing_saveable, "dots_saveable": policies.dots_saveable,
           "dots_with_no_batch_dims_saveable": policies.dots_with_no_batch_dims_saveable,
           "everything_saveable": policies.everything_saveable}[policy]
    return jax.checkpoint(fn, policy=pol)


def unet_conditions(comps: Components, params, batch: dict, rngs: StepRngs, e, *, cfg: TrainConfig,
                    bg_path: bool, ucg_rate) -> dict:
    """Keyword arguments of the U-Net call for this stage (context, control, mask, threshold,
    hs_bg, style, use_lora), from the augmented batch and the reference tokens `e`."""
    sketch = batch["sketch"]
    hw = sketch.shape[1:3]
    sketch_enc = _remat(lambda p, s: comps.sketch_encoder.apply({"params": p}, s), cfg.remat)
    control = sketch_hints(comps, params, sketch, with_blank=False, apply=sketch_enc)
    keep = (jax.vmap(lambda k: jax.random.uniform(k, ()))(_keys(rngs, _DROP)) >= ucg_rate).astype(jnp.float32)
    keep = keep[:, None, None]
    kw = dict(control=control)
    if cfg.stage == 1:
        return dict(kw, context=e * keep)

    y = None
    if cfg.stage == 3 or bg_path:
        y = size_condition(comps, training_size_ratios(jnp.asarray(batch["size"]), hw))
    if cfg.stage == 3:
        z_ref = vae_latent(comps, params, squash(batch["reference"], hw),
                           keys=_keys(rngs, _VAE_REF) if cfg.vae_sample else None)
        style_enc = _remat(lambda p, *a: comps.style_encoder.apply({"params": p}, *a), cfg.remat)
        kw["style"] = style_vectors(comps, params, z_ref, y, e, apply=style_enc)
    if not bg_path:
        return dict(kw, context=e * keep)

    r_bg = batch["reference_bg"]
    z_bg = vae_latent(comps, params, squash(r_bg, hw), keys=_keys(rngs, _VAE_BG) if cfg.vae_sample else None)
    e_bg = clip_tokens(comps, params, r_bg)
    bg_enc = _remat(lambda p, *a: comps.bg_encoder.apply({"params": p}, *a), cfg.remat)
    hs_bg = background_features(comps, params, z_bg, y, e, apply=bg_enc)
    mask = latent_sketch_mask(batch["smask"], hw)
    context = split_context(e, e_bg) * keep
    return dict(kw, context=context, mask=mask, threshold=batch["ts_s"], hs_bg=hs_bg, use_lora=True)


def training_loss(params, batch: dict, rngs: StepRngs, *, comps: Components, cfg: TrainConfig,
                  bg_path: bool, ucg_rate, alphas_cumprod=None):
    """Scalar fp32 loss of one (micro-)batch. `bg_path` (static) selects the stage-2 background path
    (always on in stage 2, off in stage 1, a per-step coin in stage 3); `ucg_rate` may be traced;
    `alphas_cumprod` defaults to the authors' SD schedule (`ldm_alphas_cumprod()`)."""
    _check_cache(batch, cfg)
    batch = _augment(batch, rngs, cfg)
    if "latent" in batch:
        x0 = batch["latent"].astype(jnp.float32)
    elif "latent_moments" in batch:  # cached posterior (cdv2.train.latent_cache): vae_latent's own draw
        x0 = latent_from_moments(batch["latent_moments"], comps.vae.config.scale_factor,
                                 _keys(rngs, _VAE_IMAGE) if cfg.vae_sample else None)
    else:
        x0 = vae_latent(comps, params, batch["image"], keys=_keys(rngs, _VAE_IMAGE) if cfg.vae_sample else None)
    if "clip_tokens" in batch:
        e = jax.lax.stop_gradient(batch["clip_tokens"].astype(jnp.float32))
    else:
        e = clip_tokens(comps, params, batch["reference"])
    kw = unet_conditions(comps, params, batch, rngs, e, cfg=cfg, bg_path=bg_path, ucg_rate=ucg_rate)
    use_lora = kw.pop("use_lora", False)

    alphas = jnp.asarray(ldm_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod, jnp.float32)
    t, eps, n_bc = draw_noise(rngs, x0.shape, alphas.shape[0])
    x_t, v = noisy_latent_and_target(x0, eps, n_bc, alphas[t].reshape(-1, 1, 1, 1), cfg.offset_noise)

    def run_unet(p, x, tt, kwargs):
        return comps.unet.apply({"params": p}, x, tt, use_lora=use_lora, **kwargs)

    return v_mse(run_unet(params["unet"], x_t, t, kw), v)  # remat: per block inside the U-Net
