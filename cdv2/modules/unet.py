"""The denoising U-Net (the authors' DualCondUNet with v2's `enhanced_forward`).

SD2.1 layout; sketch hints added after input blocks 0/3/6/9/11; split cross-attention when a
sketch mask is given; background injection replacing skip connections in background regions;
style modulation after each whole decoder block. Everything mode-dependent is an argument of the
call: absent parts are None (chosen at trace time), numbers (scales, thresholds) may be traced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cdv2.config import UNetConfig
from cdv2.modules.attention import SplitSpec
from cdv2.modules.injection import AttentionBank, block_bank
from cdv2.modules.layers import Downsample, ResBlock, Upsample, conv, group_norm, time_embed
from cdv2.modules.resize import resize_bicubic
from cdv2.modules.transformer import SelfTransformerBlock, SpatialTransformer, layer_norm

Dtype = Any
HINT_AFTER_INPUT_BLOCKS = (0, 3, 6, 9, 11)


@dataclass(frozen=True)
class InputBlock:
    index: int
    kind: str          # "conv_in" | "res" | "down"
    channels: int      # output channels
    attention: bool


@dataclass(frozen=True)
class OutputBlock:
    index: int
    skip_channels: int
    channels: int
    attention: bool
    upsample: bool


def input_layout(cfg: UNetConfig) -> list[InputBlock]:
    mc = cfg.model_channels
    blocks = [InputBlock(0, "conv_in", mc, False)]
    ch, ds = mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            ch = mult * mc
            blocks.append(InputBlock(len(blocks), "res", ch, ds in cfg.attention_resolutions))
        if level != len(cfg.channel_mult) - 1:
            blocks.append(InputBlock(len(blocks), "down", ch, False))
            ds *= 2
    return blocks


def output_layout(cfg: UNetConfig) -> list[OutputBlock]:
    mc = cfg.model_channels
    skips = [b.channels for b in input_layout(cfg)]
    ds = 2 ** (len(cfg.channel_mult) - 1)
    blocks = []
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            up = bool(level) and i == cfg.num_res_blocks
            blocks.append(OutputBlock(len(blocks), skips.pop(), mult * mc, ds in cfg.attention_resolutions, up))
            if up:
                ds //= 2
    return blocks


def num_attention_layers(cfg: UNetConfig) -> int:
    """Cross-attention layers in depth-first order: encoder, middle, decoder (16 for SD2.1)."""
    return sum(b.attention for b in input_layout(cfg)) + 1 + sum(b.attention for b in output_layout(cfg))


REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")


def remat_block(cls, policy: str = "none"):
    """`cls` itself for "none" (the exact same module), else `nn.remat(cls)` with the named
    jax.checkpoint policy: the block's activations are recomputed in the backward pass instead of
    kept ("full" keeps only its inputs; the dots_* variants also keep matmul/conv outputs)."""
    if policy == "none":
        return cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat policy must be one of {REMAT_POLICIES}, got {policy!r}")
    import jax

    pols = jax.checkpoint_policies
    pol = {"full": pols.nothing_saveable, "dots_saveable": pols.dots_saveable,
           "dots_with_no_batch_dims_saveable": pols.dots_with_no_batch_dims_saveable,
           "everything_saveable": pols.everything_saveable}[policy]
    return nn.remat(cls, policy=pol)


def _layer_scale(reference_scales, i: int):
    rs = jnp.asarray(reference_scales, jnp.float32)
    return rs if rs.ndim == 0 else rs[i]


def _bank_kwargs(cfg: UNetConfig, injection: Optional[AttentionBank], bank_out: Optional[list], layer: int) -> dict:
    """SpatialTransformer kwargs for attention injection at attention layer `layer` (none when off,
    so the plain call is exactly the pre-injection one)."""
    kw = {}
    if injection is not None:
        d = cfg.transformer_depth
        kw["bank"] = [block_bank(injection, layer * d + j) for j in range(d)]
    if bank_out is not None:
        kw["write_bank"] = True
    return kw


def _collect(h, bank_out: Optional[list]):
    """A SpatialTransformer's output; in a write pass its bank entries go to `bank_out`."""
    if bank_out is None:
        return h
    h, written = h
    bank_out.extend(written)
    return h


def run_input_blocks(cfg: UNetConfig, x, emb, context, *, control=None, split=None, reference_scales=1.0,
                     attention_impl=None, dtype=jnp.float32, param_dtype=jnp.float32, remat="none",
                     injection: Optional[AttentionBank] = None, bank_out: Optional[list] = None):
    """The SD2.1 encoder half; call inside a compact method (modules attach to the caller as
    `input_blocks_<i>_<j>`). Returns the list of per-block outputs (the skip stack). `remat`: the
    per-block policy of `remat_block` for the ResBlocks and SpatialTransformers. Attention
    injection (inference): `injection` is read; `bank_out` (a list) receives the written entries."""
    hs, h, attn_idx = [], x, 0
    hints = iter(control) if control is not None else None
    for blk in input_layout(cfg):
        name = f"input_blocks_{blk.index}"
        if blk.kind == "conv_in":
            h = conv(blk.channels, 3, f"{name}_0", dtype, param_dtype)(h)
        elif blk.kind == "down":
            h = Downsample(blk.channels, dtype, param_dtype, name=f"{name}_0")(h)
        else:
            h = remat_block(ResBlock, remat)(blk.channels, dtype, param_dtype, cfg.norm_groups, name=f"{name}_0")(h, emb)
            if blk.attention:
                h = remat_block(SpatialTransformer, remat)(blk.channels, blk.channels // cfg.num_head_channels, cfg.transformer_depth,
                                       0, attention_impl, dtype, param_dtype, cfg.norm_groups, name=f"{name}_1")(
                    h, context, _layer_scale(reference_scales, attn_idx), split,
                    **_bank_kwargs(cfg, injection, bank_out, attn_idx))
                h = _collect(h, bank_out)
                attn_idx += 1
        if hints is not None and blk.index in HINT_AFTER_INPUT_BLOCKS:
            h = h + next(hints).astype(h.dtype)
        hs.append(h)
    return hs


class UNet(nn.Module):
    config: UNetConfig
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"      # per-block rematerialisation policy (`remat_block`), training only

    @nn.compact
    def __call__(self, x, t, context, *, control: Optional[Sequence] = None, mask=None, threshold=None,
                 hs_bg: Optional[Sequence] = None, style: Optional[Sequence] = None, use_lora: bool = False,
                 reference_scales=1.0, fg_scale=1.0, bg_scale=1.0, merge_scale=0.0,
                 write_bank: bool = False, injection: Optional[AttentionBank] = None):
        """x: (B, h, w, 4) latent; t: (B,) timesteps; context: (B, N, ctx) CLIP tokens ([fg | bg]
        halves when `mask` is given); control: 5 sketch hints; mask: (B, h, w, 1) latent sketch mask;
        threshold: sketch-mask threshold, scalar or (B,); hs_bg: 12 bg-encoder token maps (B, HW, C)
        indexed by output block; style: 12 style vectors (B, 2C); reference_scales: scalar or one per
        cross-attention layer (depth-first). Returns the raw model output (v-prediction), fp32.
        Attention injection (cdv2/modules/injection.py): write_bank=True returns (output, bank), bank
        = tuple of every transformer block's norm1(x); injection=AttentionBank(bank, ...) reads it."""
        cfg, d, pd = self.config, self.dtype, self.param_dtype
        if mask is not None and threshold is None:
            raise ValueError("a sketch mask needs a threshold (split cross-attention)")
        if use_lora and mask is None:
            raise ValueError("the fg/bg LoRAs only act in split cross-attention: give a sketch mask")
        if write_bank and injection is not None:
            raise ValueError("attention injection: a call either writes the bank or reads one, not both")
        bank_out = [] if write_bank else None
        emb = time_embed(t, cfg.model_channels, pd)
        h = x.astype(d)
        context = context.astype(d)
        mask = None if mask is None else mask.astype(jnp.float32)

        def split(strict: bool, lora: bool):
            if mask is None:
                return None
            return SplitSpec(mask, threshold, strict, fg_scale, bg_scale, merge_scale, lora)

        hs = run_input_blocks(cfg, h, emb, context, control=control, split=split(False, False),
                              reference_scales=reference_scales, attention_impl=self.attention_impl,
                              dtype=d, param_dtype=pd, remat=self.remat, injection=injection, bank_out=bank_out)
        n_enc = sum(b.attention for b in input_layout(cfg))
        res, st = remat_block(ResBlock, self.remat), remat_block(SpatialTransformer, self.remat)
        ch = hs[-1].shape[-1]
        h = res(ch, d, pd, cfg.norm_groups, name="middle_block_0")(hs[-1], emb)
        h = st(ch, ch // cfg.num_head_channels, cfg.transformer_depth, 0, self.attention_impl, d, pd,
               cfg.norm_groups, name="middle_block_1")(h, context, _layer_scale(reference_scales, n_enc), split(False, False),
                                      **_bank_kwargs(cfg, injection, bank_out, n_enc))
        h = _collect(h, bank_out)
        h = res(ch, d, pd, cfg.norm_groups, name="middle_block_2")(h, emb)

        attn_idx = n_enc + 1
        for blk in output_layout(cfg):
            i = blk.index
            skip = hs.pop()
            if cfg.warp_module and (hs_bg is not None or self.is_initializing()):
                warp = remat_block(SelfTransformerBlock, self.remat)(
                    blk.skip_channels, cfg.warp_head_dim, self.attention_impl, d, pd, name=f"warp_modules_{i}")
                skip = _inject_background(warp, skip, None if hs_bg is None else hs_bg[i], mask, threshold)
            elif hs_bg is not None:
                raise ValueError("hs_bg given but this U-Net has no warp modules")
            h = jnp.concatenate([h, skip.astype(h.dtype)], axis=-1)
            h = res(blk.channels, d, pd, cfg.norm_groups, name=f"output_blocks_{i}_0")(h, emb)
            sub = 1
            if blk.attention:
                h = st(blk.channels, blk.channels // cfg.num_head_channels, cfg.transformer_depth,
                       cfg.lora_rank, self.attention_impl, d, pd, cfg.norm_groups, name=f"output_blocks_{i}_1")(
                    h, context, _layer_scale(reference_scales, attn_idx), split(True, use_lora),
                    **_bank_kwargs(cfg, injection, bank_out, attn_idx))
                h = _collect(h, bank_out)
                attn_idx += 1
                sub = 2
            if blk.upsample:
                h = Upsample(blk.channels, d, pd, name=f"output_blocks_{i}_{sub}")(h)
            if cfg.style_modulation and (style is not None or self.is_initializing()):
                s_in = style[i] if style is not None else jnp.zeros((h.shape[0], 2 * blk.channels), jnp.float32)
                h = _style_modulate(h, s_in, emb, blk.channels, pd, f"style_modules_{i}")
            elif style is not None:
                raise ValueError("style modulations given but this U-Net has no style modules")

        h = nn.silu(group_norm("out_0", 1e-5, d, pd, cfg.norm_groups)(h))
        h = conv(cfg.out_channels, 3, "out_2", d, pd)(h)
        if write_bank:
            return h.astype(jnp.float32), tuple(bank_out)
        return h.astype(jnp.float32)


def _inject_background(warp, skip, bg_tokens, mask, threshold):
    """Background injection into one skip connection: the warp block attends from the skip to the
    bg encoder's tokens (its own tokens at init); where the sketch mask is below the threshold the
    skip is replaced by that background path."""
    own = skip.reshape(skip.shape[0], -1, skip.shape[-1])
    bg_path = warp(skip, own if bg_tokens is None else bg_tokens)
    if mask is None or bg_tokens is None:
        return skip
    m = resize_bicubic(mask, skip.shape[1:3])
    thr = jnp.asarray(threshold, jnp.float32).reshape(-1, 1, 1, 1)
    return jnp.where(m > thr, skip, bg_path.astype(skip.dtype))


def _style_modulate(h, style_vec, emb, channels: int, param_dtype, prefix: str):
    """h * (1 + scale) + shift with [scale | shift] = Lin2(LN0(style_vec + Lin1(emb))) (paper Eq. 3/4);
    emb is the U-Net time embedding, without SiLU. Computed in fp32 (it is a per-sample vector)."""
    s = style_vec.astype(jnp.float32) + nn.Dense(2 * channels, name=f"{prefix}_1", param_dtype=param_dtype)(emb)
    s = layer_norm(f"{prefix}_0", jnp.float32, param_dtype)(s)
    s = nn.Dense(2 * channels, name=f"{prefix}_2", param_dtype=param_dtype)(s)
    scale, shift = jnp.split(s, 2, axis=-1)
    return (h * (1 + scale[:, None, None, :]) + shift[:, None, None, :]).astype(h.dtype)
