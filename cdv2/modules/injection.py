"""Attention injection (the app's "Attention injection", reference-only style; ARCHITECTURE §4.8).

The authors hook every `BasicTransformerBlock` of the U-Net (the 16 SpatialTransformer blocks, not
the warp modules) with hidden module state. Here the bank is an explicit value:

  * WRITE pass: `UNet(...)(rx, t, ..., write_bank=True)` returns `(out, bank)`, bank = the tuple of
    every block's `norm1(x)` (depth-first: encoder, middle, decoder), on
    rx = q_sample(r, round(t)) with the same conditions as the real call except the sketch hints
    (the reference image's hints x sketch fidelity). `out` is discarded.
  * READ pass: `UNet(...)(x, t, ..., injection=AttentionBank(bank, fidelity, plain_rows))`: each
    block's self-attention becomes
        uc = attn1(xn, context=[xn | bank_i])      (queries N tokens, keys/values 2N)
        c  = uc, with c[plain_rows] = attn1(xn[plain_rows]) when plain_rows and fidelity > 1e-5
        out = fidelity * c + (1 - fidelity) * uc
    plain_rows are the no-reference CFG rows (`gr_indice` = [bs, 2bs) when reference CFG is on).

`reference_injection_call` wraps one denoiser call exactly as the authors' hooked forward: write +
read when 1 - t[0]/(T-1) >= start_step, else the plain call.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class AttentionBank:
    """What a read pass consumes. tokens: one (B, N_i, C_i) array per transformer block (as the
    write pass returned them); fidelity: "Injection fidelity (reference)", may be traced;
    plain_rows: static row indices whose conditional part uses plain self-attention."""

    tokens: tuple
    fidelity: Any = 0.5
    plain_rows: tuple = struct.field(pytree_node=False, default=())


@struct.dataclass
class BlockBank:
    """One block's share of an AttentionBank (what BasicTransformerBlock receives)."""

    tokens: Any
    fidelity: Any = 0.5
    plain_rows: tuple = struct.field(pytree_node=False, default=())


def block_bank(bank: AttentionBank | None, index: int) -> BlockBank | None:
    if bank is None:
        return None
    if index >= len(bank.tokens):
        raise ValueError(f"attention bank has {len(bank.tokens)} entries; block {index} has none "
                         "(was it written by the same U-Net?)")
    return BlockBank(bank.tokens[index], bank.fidelity, bank.plain_rows)


def injected_self_attention(attn1: Callable, xn, bank: BlockBank):
    """The authors' hooked attn1 (read side). attn1(x, context=None) is the block's Attention."""
    tokens = bank.tokens.astype(xn.dtype)
    if tokens.shape[0] != xn.shape[0] or tokens.shape[2] != xn.shape[2]:
        raise ValueError(f"attention bank entry {tokens.shape} does not fit the block input {xn.shape}")
    uc = attn1(xn, jnp.concatenate([xn, tokens], axis=1))
    c = uc
    if bank.plain_rows:
        rows = jnp.asarray(bank.plain_rows, jnp.int32)
        plain = attn1(xn[rows])
        fid = jnp.asarray(bank.fidelity, jnp.float32)
        c = jnp.where(fid > 1e-5, uc.at[rows].set(plain), uc)
    fid = jnp.asarray(bank.fidelity, jnp.float32).astype(uc.dtype)
    return fid * c + (1.0 - fid) * uc


def q_sample(r, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """DDPM.q_sample(r, round(t)): r (1 or B, h, w, c) latent, t (B,) (float t is rounded), noise
    like r -> (B, h, w, c). The schedule arrays are the float32 buffers (float64 maths, cast)."""
    ti = jnp.round(jnp.asarray(t, jnp.float32)).astype(jnp.int32)
    a = jnp.asarray(sqrt_alphas_cumprod, jnp.float32)[ti].reshape(-1, 1, 1, 1)
    s = jnp.asarray(sqrt_one_minus_alphas_cumprod, jnp.float32)[ti].reshape(-1, 1, 1, 1)
    return a * r + s * noise


def injection_active(t, start_step, num_timesteps: int = 1000):
    """The authors' test `1 - t[0] / (T - 1) >= start_step` (t may be fractional)."""
    return 1.0 - jnp.asarray(t, jnp.float32).reshape(-1)[0] / (num_timesteps - 1) >= start_step


def reference_injection_call(apply_fn: Callable, x, t, *, r, noise, sqrt_alphas_cumprod,
                             sqrt_one_minus_alphas_cumprod, write_control: Sequence, fidelity,
                             plain_rows: tuple = (), start_step=0.0, num_timesteps: int = 1000,
                             **cond):
    """One denoiser call with attention injection, jittable (`lax.cond` on the start step).

    apply_fn(x, t, **kw) runs the U-Net (e.g. `partial(unet.apply, params)`); cond: the call's
    conditions (context, control, mask, threshold, hs_bg, style, use_lora, scales...);
    write_control: the write pass's sketch hints (the hints of the negated injection image x
    sketch fidelity, repeated to B rows); r: the injection latent (1, h, w, 4); noise: this call's
    q_sample noise (1, h, w, 4)."""

    def injected(_):
        rx = q_sample(r, t, noise, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod).astype(x.dtype)
        rx = jnp.broadcast_to(rx, x.shape)
        _, tokens = apply_fn(rx, t, **{**cond, "control": write_control}, write_bank=True)
        return apply_fn(x, t, **cond, injection=AttentionBank(tuple(tokens), fidelity, tuple(plain_rows)))

    def plain(_):
        return apply_fn(x, t, **cond)

    return jax.lax.cond(injection_active(t, start_step, num_timesteps), injected, plain, None)
