"""Torch-exact layers shared by the line extractors (NHWC): padded convs, transposed convs, norms.

Convs keep fp32 params and compute in `dtype` (fp32 for parity, bf16 optional); norm statistics are
always fp32. Param names follow `cdv2/weights/torch_layout.py`: `kernel` [kh, kw, in, out] for a
Conv2d and [kh, kw, out, in] for a ConvTranspose2d (torch's [in, out, kh, kw] under the same
transpose rule), `bias`; BatchNorm keeps `scale`/`bias` params and `mean`/`var` batch_stats.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdv2.modules.resize import bicubic_matrix

Dtype = Any
_DN = ("NHWC", "HWIO", "NHWC")


def _precision(dtype) -> Any:
    # fp32 parity path: no TF32/bf16 passes on accelerators (CPU is exact either way)
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def reflect_pad(x: jnp.ndarray, top: int, bottom: int, left: int, right: int) -> jnp.ndarray:
    """torch ReflectionPad2d((left, right, top, bottom)): mirror without repeating the edge."""
    return jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), mode="reflect")


def conv(features: int, kernel: int | tuple[int, int], name: str, dtype: Dtype, *, stride: int = 1,
         padding: int | tuple[int, int] = 0, bias: bool = True) -> nn.Conv:
    """torch Conv2d: `padding` is symmetric zero padding; pad reflectively before calling instead."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return nn.Conv(features, (kh, kw), strides=(stride, stride), padding=((ph, ph), (pw, pw)), use_bias=bias,
                   dtype=dtype, param_dtype=jnp.float32, precision=_precision(dtype), name=name)


class ConvTranspose(nn.Module):
    """torch ConvTranspose2d(k, stride, padding, output_padding) as a dilated direct convolution.

    Output size (H-1)*stride - 2*padding + k + output_padding. The direct form convolves the
    stride-dilated input, padded by k-1-p (plus output_padding at the end), with the spatially
    flipped kernel whose in/out axes are swapped."""

    features: int
    kernel: int
    stride: int
    padding: int
    output_padding: int = 0
    bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel, x.shape[-1]
        w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, self.features, cin), jnp.float32)
        w = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2).astype(self.dtype)
        lo = k - 1 - self.padding
        hi = lo + self.output_padding
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), w, (1, 1), ((lo, hi), (lo, hi)),
                                         lhs_dilation=(self.stride, self.stride), dimension_numbers=_DN,
                                         precision=_precision(self.dtype))
        if self.bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        return y


def batch_norm(x: jnp.ndarray, name: str, eps: float) -> jnp.ndarray:
    """Eval-mode torch BatchNorm2d (running statistics), computed in fp32."""
    y = nn.BatchNorm(use_running_average=True, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                     name=name)(x.astype(jnp.float32))
    return y.astype(x.dtype)


def instance_norm(x: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
    """torch InstanceNorm2d(affine=False, track_running_stats=False): per-sample, per-channel
    normalisation over H, W with the biased variance; statistics in fp32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(xf - mean).mean(axis=(1, 2), keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def upsample_nearest2(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def upsample_bicubic2(x: jnp.ndarray) -> jnp.ndarray:
    """nn.Upsample(scale_factor=2, mode="bicubic"): A=-0.75, align_corners=False, clamped taps.
    At an exact factor 2 the scale-given and size-given source positions coincide."""
    h, w = x.shape[1:3]
    mh = jnp.asarray(bicubic_matrix(h, 2 * h), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(w, 2 * w), jnp.float32)
    y = jnp.einsum("oh,nhwc->nowc", mh, x.astype(jnp.float32), precision="highest")
    return jnp.einsum("pw,nowc->nopc", mw, y, precision="highest").astype(x.dtype)


def leaky_relu(x: jnp.ndarray, slope: float = 0.2) -> jnp.ndarray:
    return jnp.where(x >= 0, x, x * jnp.asarray(slope, x.dtype))
