"""Attention: the core, the (LoRA-able) projections, and split cross-attention.

Split cross-attention (the authors' `masked_forward`, paper Eq. 1): the context is
[e_fg | e_bg] along tokens; each query token takes the fg-half result where the sketch mask says
"foreground" and the bg-half result elsewhere, mixed before `to_out`. In the decoder the fg/bg
paths use their own rank-4 LoRA on q/k/v; which adapters apply is an explicit argument (the
authors' stale `mode` flag, which leaked the fg-LoRA into later vanilla runs, cannot happen).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
from flax import struct
import jax.numpy as jnp

Dtype = Any


IMPLEMENTATIONS = (None, "xla", "chunked", "cudnn", "library", "pallas")


def multihead_attention(q, k, v, heads: int, implementation: Optional[str] = None, causal: bool = False):
    """Softmax attention, (B, N, C) in and out, heads split as (h d) with h major (torch's
    `rearrange(..., 'b n (h d) -> b n h d')`); scale 1/sqrt(d); softmax statistics in fp32.
    `causal`: query i sees keys j <= i only (the CLIP text tower's mask); "chunked" then runs as "xla".

    `implementation` (all exact, the same mathematics): None or "xla" = `xla_attention`;
    "chunked" = `chunked_xla_attention` (CPU); "cudnn" = `jax.nn.dot_product_attention`'s cuDNN
    flash attention (GPU, fp16/bf16); "library" = `jax.nn.dot_product_attention`'s XLA path.
    "pallas" = `pallas_tpu_attention`, TPU flash attention (no N x M scores in HBM; causal: "xla").
    `cdv2.model.resolve_attention` picks one per backend."""
    if implementation in (None, "xla") or (causal and implementation == "chunked"):
        return xla_attention(q, k, v, heads, causal)
    if implementation == "chunked":
        return chunked_xla_attention(q, k, v, heads)
    if implementation == "pallas" and not causal:
        return pallas_tpu_attention(q, k, v, heads)
    if implementation not in ("cudnn", "library"):
        raise ValueError(f"unknown attention implementation {implementation!r}; one of {IMPLEMENTATIONS}")
    b, n, c = q.shape
    d = c // heads
    q = q.reshape(b, n, heads, d)
    k = k.reshape(b, k.shape[1], heads, d)
    v = v.reshape(b, v.shape[1], heads, d)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                       implementation="cudnn" if implementation == "cudnn" else None)
    return out.reshape(b, n, c)


def chunked_xla_attention(q, k, v, heads: int, block_bytes: int = 10 << 20):
    """Exact softmax attention for XLA's CPU kernels: heads split, q scaled and K transposed ONCE
    into (batch x heads, ...) operands; a score matrix of at most 2 blocks (`block_bytes`, fp32) is
    done in one batched piece, a larger one ONE HEAD at a time over blocks of queries (sequential
    `lax.map`s), each block's (queries x keys) fp32 scores about `block_bytes`, so that QK^T,
    softmax and PV of a block run while its scores are still in cache, as torch's tiled CPU kernel
    does.

    The layout matters on CPU: QK^T as a plain (q, d) x (d, k) matmul with no per-block transposes
    of K/V inside the loop ran 1.5-1.7x faster than `xla_attention` at 2304-4096 tokens; per-head
    ~10 MB blocks a further 1.3-1.4x at 4096-9216 tokens over blocks spanning all heads (2-core
    EPYC, BENCHMARKS.md issue-15 blocks)."""
    b, n, c = q.shape
    m = k.shape[1]
    d = c // heads
    g = b * heads
    qh = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, n, heads, d).transpose(0, 2, 1, 3).reshape(g, n, d)
    kt = k.reshape(b, m, heads, d).transpose(0, 2, 3, 1).reshape(g, d, m)
    vh = v.reshape(b, m, heads, d).transpose(0, 2, 1, 3).reshape(g, m, d)

    def attend(qb, kt, vh):
        s = jnp.einsum("...qd,...dk->...qk", qb, kt, preferred_element_type=jnp.float32)
        p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
        out = jnp.einsum("...qk,...kd->...qd", p.astype(v.dtype), vh, preferred_element_type=jnp.float32)
        return out / jnp.sum(p, axis=-1, keepdims=True)

    if g * n * m * 4 <= 2 * block_bytes:
        out = attend(qh, kt, vh)
    else:
        limit = max(64, block_bytes // (m * 4))
        block = max((x for x in range(1, min(limit, n) + 1) if n % x == 0), default=n)

        def one_head(operands):
            q1, kt1, v1 = operands
            return jax.lax.map(lambda qb: attend(qb, kt1, v1), q1.reshape(n // block, block, d)).reshape(n, d)

        out = jax.lax.map(one_head, (qh, kt, vh))
    return out.astype(q.dtype).reshape(b, heads, n, d).transpose(0, 2, 1, 3).reshape(b, n, c)


def _flash_block(n: int) -> Optional[int]:
    """The largest of 512/256/128 that divides a sequence length (the kernel's tiles are multiples
    of 128), else None."""
    return next((b for b in (512, 256, 128) if n % b == 0), None)


def pallas_tpu_attention(q, k, v, heads: int):
    """Exact softmax attention by JAX's Pallas TPU flash-attention kernel (forward and backward;
    fp32 softmax statistics inside): TPU only (on CPU it runs under
    `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`, for tests).

    A Pallas kernel is a custom call that XLA's SPMD partitioner cannot split: under a mesh set with
    `jax.set_mesh(mesh)` the batch is mapped over every mesh axis by `jax.shard_map` (each device
    attends its own samples); without one the kernel sees the whole batch. Sequence lengths that are
    not multiples of 128 (the U-Net's 24x24 and 12x12 levels at 768 px: small score matrices) use
    `xla_attention`."""
    from jax.experimental.pallas.ops.tpu.flash_attention import BlockSizes, flash_attention
    from jax.sharding import PartitionSpec

    n, m, c = q.shape[1], k.shape[1], q.shape[2]
    d = c // heads
    bq, bk = _flash_block(n), _flash_block(m)
    if bq is None or bk is None:
        return xla_attention(q, k, v, heads)
    blocks = BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq,
                        block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk,
                        block_k_dq=bk, block_q_dq=bq)

    def attend(q, k, v):
        b = q.shape[0]
        split = lambda a: a.reshape(b, a.shape[1], heads, d).transpose(0, 2, 1, 3)  # noqa: E731
        out = flash_attention(split(q), split(k), split(v), sm_scale=d ** -0.5, block_sizes=blocks)
        return out.astype(q.dtype).transpose(0, 2, 1, 3).reshape(b, n, c)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or q.shape[0] % mesh.size:
        return attend(q, k, v)
    spec = PartitionSpec(tuple(mesh.axis_names))
    return jax.shard_map(attend, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def xla_attention(q, k, v, heads: int, causal: bool = False):
    """Exact softmax attention written for XLA's own kernels: q pre-scaled (not the N x M scores),
    heads in front for the two batched matmuls, and the softmax denominator applied to the (N, d)
    output instead of the (N, M) probabilities. This saves two full passes over the score matrix
    against `jax.nn.dot_product_attention`'s XLA path: 1.4x faster U-Net steps on CPU
    (BENCHMARKS.md, torch comparison)."""
    b, n, c = q.shape
    d = c // heads

    def heads_first(a):
        return a.reshape(b, a.shape[1], heads, d).transpose(0, 2, 1, 3)

    s = jnp.einsum("bhqd,bhkd->bhqk", heads_first(q * jnp.asarray(d ** -0.5, q.dtype)), heads_first(k),
                   preferred_element_type=jnp.float32)
    if causal:  # torch's additive -inf upper triangle: exp(-inf) = 0
        n_k = k.shape[1]
        s = jnp.where(jnp.arange(n_k)[None, :] <= jnp.arange(n)[:, None], s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), heads_first(v),
                     preferred_element_type=jnp.float32) / denom
    return out.astype(q.dtype).transpose(0, 2, 1, 3).reshape(b, n, c)


class _Kernel(nn.Module):
    """A bare weight matrix under `<name>/kernel` (the LoRA factors: no bias, used pre-merged)."""

    shape: tuple[int, int]
    init: Any
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        return self.param("kernel", self.init, self.shape, self.param_dtype)


class LoRALinear(nn.Module):
    """Bias-free Linear with optional fg/bg rank-r adapters (`lora_{down,up}_{fg,bg}`).

    With an adapter the merged kernel W + down@up is used: exact, since the authors' LoRA scale is 1
    and dropout 0, and one matmul is cheaper than three."""

    features: int
    rank: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, adapter: Optional[str] = None):
        fin = x.shape[-1]
        init = nn.initializers.lecun_normal() if self.features else nn.initializers.zeros
        w = self.param("kernel", init, (fin, self.features), self.param_dtype)
        if self.rank:
            factors = {}
            for a in ("fg", "bg"):
                down = _Kernel((fin, self.rank), nn.initializers.normal(1.0 / self.rank), self.param_dtype,
                               name=f"lora_down_{a}")()
                up = _Kernel((self.rank, self.features), nn.initializers.zeros, self.param_dtype,
                             name=f"lora_up_{a}")()
                factors[a] = (down, up)
            if adapter is not None:
                down, up = factors[adapter]
                w = w + jnp.dot(down.astype(jnp.float32), up.astype(jnp.float32)).astype(w.dtype)
        elif adapter is not None:
            raise ValueError(f"LoRA adapter '{adapter}' requested on a layer without LoRA")
        return jnp.dot(x.astype(self.dtype), w.astype(self.dtype))


@struct.dataclass
class SplitSpec:
    """How a split cross-attention layer mixes its fg and bg halves (all values may be traced).

    mask: (B, h, w, 1) sketch mask already at this layer's token grid; threshold: scalar or (B,);
    strict: `m > threshold` (decoder) instead of `m >= threshold` (encoder/middle), as the authors.
    A pytree (the flags static), so it can cross `nn.remat` block boundaries."""

    mask: jnp.ndarray
    threshold: Any
    strict: bool = struct.field(pytree_node=False)
    fg_scale: Any = 1.0
    bg_scale: Any = 1.0
    merge_scale: Any = 0.0
    use_lora: bool = struct.field(pytree_node=False, default=False)


class Attention(nn.Module):
    """to_q/to_k/to_v (bias-free, dim -> heads * head_dim) + to_out.0; plain or split cross-attention.

    `head_dim` defaults to dim // heads (the U-Net); the warp modules fix it (`warp_head_dim`, the
    authors' 64), so a block narrower than that has zero heads and reduces to to_out's bias."""

    dim: int
    heads: int
    head_dim: Optional[int] = None
    lora_rank: int = 0
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(rank=self.lora_rank, dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * (self.head_dim or self.dim // self.heads)
        self.to_q = LoRALinear(inner, **kw)
        self.to_k = LoRALinear(inner, **kw)
        self.to_v = LoRALinear(inner, **kw)
        out_init = nn.initializers.lecun_normal() if inner else nn.initializers.zeros
        self.to_out_0 = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=out_init)

    def _attend(self, x, context, adapter):
        q = self.to_q(x, adapter)
        k = self.to_k(context, adapter)
        v = self.to_v(context, adapter)
        if self.heads == 0:
            return q  # (B, N, 0): no heads, nothing to attend
        return multihead_attention(q, k, v, self.heads, self.attention_impl)

    def __call__(self, x, context=None, reference_scale=1.0, split: Optional[SplitSpec] = None):
        context = x if context is None else context
        scale = jnp.asarray(reference_scale, jnp.float32)
        if split is None:
            out = self._attend(x, context, None) * scale.astype(x.dtype)
            return self.to_out_0(out)
        b, n = x.shape[0], context.shape[1] // 2
        ctx_fg, ctx_bg = context[:, :n], context[:, n:]
        fg_adapter, bg_adapter = ("fg", "bg") if split.use_lora else (None, None)
        bg = self._attend(x, ctx_bg, bg_adapter).astype(jnp.float32) * scale * _per_sample(split.bg_scale, b)
        fg = self._attend(x, ctx_fg, fg_adapter).astype(jnp.float32) * scale * _per_sample(split.fg_scale, b)
        merge = _per_sample(split.merge_scale, b)
        fg = (1.0 - merge) * fg + merge * bg
        m = split.mask.reshape(b, -1, 1).astype(jnp.float32)
        thr = _per_sample(split.threshold, b)
        is_fg = m > thr if split.strict else m >= thr
        out = jnp.where(is_fg, fg, bg).astype(x.dtype)
        return self.to_out_0(out)


def _per_sample(value, batch: int):
    """Scalar or (B,) -> broadcastable (B, 1, 1) fp32."""
    v = jnp.asarray(value, jnp.float32)
    if v.ndim == 0:
        return v
    return v.reshape(batch, 1, 1)
