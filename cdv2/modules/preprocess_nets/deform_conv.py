"""Modulated deformable convolution (DCNv2) with torchvision `ops.deform_conv2d` semantics, NHWC.

Semantics (torchvision's CPU/CUDA kernels): for output pixel (oy, ox) and kernel tap k = i*kw + j
the sample point is (oy*stride - pad + i*dil + off[2k], ox*stride - pad + j*dil + off[2k+1]) (the
offset channels are [dy0, dx0, dy1, dx1, ...]); the value there is bilinear over the 4 corners,
a corner outside the image counts 0, and the whole sample is 0 when y <= -1, y >= H, x <= -1 or
x >= W; the mask (modulator) multiplies each tap. One offset group, one weight group (what
BiRefNet uses); other groupings raise.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdv2.modules.preprocess_nets.ops import conv

Dtype = Any


def _bilinear_taps(flat: jnp.ndarray, h: int, w: int, py: jnp.ndarray, px: jnp.ndarray) -> jnp.ndarray:
    """Sample flat (B, H*W, C) at float positions py, px (B, P) -> (B, P, C), zero outside."""
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    y0, x0 = jnp.floor(py), jnp.floor(px)
    ly, lx = py - y0, px - x0
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    corners = ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
               (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx))
    out = 0.0
    for yy, xx, wt in corners:
        ok = inside & (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
        idx = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
        val = jnp.take_along_axis(flat, idx[..., None], axis=1)
        out = out + val * jnp.where(ok, wt, 0.0)[..., None].astype(flat.dtype)
    return out


def deform_conv2d(x: jnp.ndarray, offset: jnp.ndarray, kernel: jnp.ndarray, mask: jnp.ndarray | None = None,
                  bias: jnp.ndarray | None = None, stride: int = 1, padding: int = 0, dilation: int = 1) -> jnp.ndarray:
    """x (B,H,W,C), offset (B,Ho,Wo,2*kh*kw), kernel (kh,kw,C,O), mask (B,Ho,Wo,kh*kw) -> (B,Ho,Wo,O).

    Positions and bilinear weights are computed in fp32 whatever x's dtype."""
    b, h, w, c = x.shape
    kh, kw, cin, cout = kernel.shape
    ho, wo = offset.shape[1:3]
    if cin != c:
        raise NotImplementedError(f"deform_conv2d: weight groups unsupported (x has {c} channels, kernel {cin})")
    if offset.shape[-1] != 2 * kh * kw:
        raise NotImplementedError(f"deform_conv2d: offset needs 2*{kh}*{kw} channels (one offset group), "
                                  f"got {offset.shape[-1]}")
    if mask is not None and mask.shape[-1] != kh * kw:
        raise ValueError(f"deform_conv2d: mask needs {kh * kw} channels, got {mask.shape[-1]}")
    want = ((h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1,
            (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1)
    if (ho, wo) != want:
        raise ValueError(f"deform_conv2d: offset spatial size {(ho, wo)} != output size {want}")
    flat = x.reshape(b, h * w, c)
    p = ho * wo
    offset = offset.astype(jnp.float32).reshape(b, p, kh, kw, 2).transpose(2, 0, 1, 3, 4)  # (kh, B, P, kw, 2)
    mask = jnp.ones((b, ho, wo, kh * kw), jnp.float32) if mask is None else mask
    mask = mask.reshape(b, p, kh, kw).transpose(2, 0, 1, 3)                                 # (kh, B, P, kw)
    oy = jnp.arange(ho, dtype=jnp.float32) * stride - padding
    ox = jnp.arange(wo, dtype=jnp.float32) * stride - padding
    base_y = jnp.broadcast_to(oy[:, None], (ho, wo)).reshape(1, p, 1)
    base_x = (jnp.broadcast_to(ox[None, :], (ho, wo)).reshape(1, p, 1)
              + jnp.arange(kw, dtype=jnp.float32) * dilation)

    def row(out, inputs):
        """One kernel row: its kw taps are sampled together (bounded memory, small program)."""
        i, off, m, k_row = inputs
        py = (base_y + i * dilation + off[..., 0]).reshape(b, p * kw)
        px = (base_x + off[..., 1]).reshape(b, p * kw)
        val = _bilinear_taps(flat, h, w, py, px).reshape(b, p, kw, c)
        val = val * m[..., None].astype(val.dtype)
        return out + jnp.einsum("bpjc,jco->bpo", val, k_row.astype(val.dtype),
                                preferred_element_type=jnp.float32), None

    rows = (jnp.arange(kh, dtype=jnp.float32), offset, mask, kernel)
    out, _ = jax.lax.scan(row, jnp.zeros((b, p, cout), jnp.float32), rows)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.reshape(b, ho, wo, cout).astype(x.dtype)


class _ConvWeight(nn.Module):
    """Holds a conv's `kernel` (kh, kw, in, out) and optional `bias` without applying it."""

    features: int
    kernel_size: int
    use_bias: bool

    @nn.compact
    def __call__(self, in_features: int):
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        return kernel, bias


class DeformableConv2d(nn.Module):
    """BiRefNet's DeformableConv2d: offsets and a 2*sigmoid modulator predicted by plain convs,
    then `deform_conv2d` with `regular_conv`'s weight (stride 1; no bias in BiRefNet)."""

    out_channels: int
    kernel_size: int = 3
    padding: int = 1
    bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, p, d = self.kernel_size, self.padding, self.dtype
        offset = conv(2 * k * k, k, "offset_conv", d, padding=p)(x)
        modulator = 2.0 * jax.nn.sigmoid(conv(k * k, k, "modulator_conv", d, padding=p)(x).astype(jnp.float32))
        kernel, bias = _ConvWeight(self.out_channels, k, self.bias, name="regular_conv")(x.shape[-1])
        return deform_conv2d(x.astype(d), offset, kernel.astype(d), modulator, bias, padding=p)
