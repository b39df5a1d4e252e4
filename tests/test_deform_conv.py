"""deform_conv2d vs an explicit per-pixel numpy transcription of torchvision's kernel.

The BiRefNet fixture's torch side used a pure-torch DCN checked on simple offsets only, so this
test is the one that pins the semantics on RANDOM offsets (many samples land outside the image,
on its border and exactly on the -1 / H cut-offs)."""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")

from cdv2.modules.preprocess_nets.deform_conv import DeformableConv2d, deform_conv2d  # noqa: E402


def _bilinear_ref(im, h, w, y, x):
    """torchvision `bilinear_interpolate` (deform_conv2d_kernel.cpp) for one channel plane."""
    height, width = im.shape
    if y <= -1 or height <= y or x <= -1 or width <= x:
        return 0.0
    y_low, x_low = int(np.floor(y)), int(np.floor(x))
    y_high, x_high = y_low + 1, x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    v1 = im[y_low, x_low] if (y_low >= 0 and x_low >= 0) else 0.0
    v2 = im[y_low, x_high] if (y_low >= 0 and x_high <= width - 1) else 0.0
    v3 = im[y_high, x_low] if (y_high <= height - 1 and x_low >= 0) else 0.0
    v4 = im[y_high, x_high] if (y_high <= height - 1 and x_high <= width - 1) else 0.0
    return hy * hx * v1 + hy * lx * v2 + ly * hx * v3 + ly * lx * v4


def deform_conv2d_ref(x, offset, weight, mask, bias, stride, pad, dil):
    """NCHW numpy, torch layouts: x (B,C,H,W), offset (B,2K,Ho,Wo) = [dy0,dx0,dy1,dx1,...],
    weight (O,C,kh,kw), mask (B,K,Ho,Wo). Plain loops over every output pixel and tap."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = offset.shape[2:]
    out = np.zeros((b, o, ho, wo), np.float64)
    for n in range(b):
        for oy in range(ho):
            for ox in range(wo):
                col = np.zeros((c, kh, kw))
                for i in range(kh):
                    for j in range(kw):
                        k = i * kw + j
                        y = oy * stride - pad + i * dil + offset[n, 2 * k, oy, ox]
                        xx = ox * stride - pad + j * dil + offset[n, 2 * k + 1, oy, ox]
                        for ch in range(c):
                            col[ch, i, j] = _bilinear_ref(x[n, ch], h, w, y, xx) * mask[n, k, oy, ox]
                out[n, :, oy, ox] = np.tensordot(weight, col, axes=([1, 2, 3], [0, 1, 2]))
    if bias is not None:
        out += bias[None, :, None, None]
    return out


@pytest.mark.parametrize("k,stride,pad,dil", [(3, 1, 1, 1), (1, 1, 0, 1), (3, 2, 2, 2), (5, 1, 2, 1)])
def test_deform_conv2d_random_offsets(k, stride, pad, dil):
    rng = np.random.default_rng(k * 100 + stride * 10 + dil)
    b, c, h, w, o = 2, 3, 7, 6, 4
    ho = (h + 2 * pad - dil * (k - 1) - 1) // stride + 1
    wo = (w + 2 * pad - dil * (k - 1) - 1) // stride + 1
    x = rng.normal(size=(b, c, h, w)).astype(np.float32)
    offset = (rng.normal(size=(b, 2 * k * k, ho, wo)) * 2.5).astype(np.float32)
    # exact cut-off and integer cases: some taps land on y = -1, y = H, x = W - 1, x = -1 + tiny
    offset[0, 0, 0, 0] = -1.0 - (0 * stride - pad)          # y == -1 exactly -> 0
    offset[0, 1, 0, 0] = 0.25
    offset[1, 0, -1, -1] = float(h) - ((ho - 1) * stride - pad)  # y == H exactly -> 0
    offset[1, 1, 0, 0] = (w - 1) - (0 * stride - pad)         # x == W-1 exactly (integer)
    offset[0, 1, -1, 0] = -1.0 + 1e-3 - (0 * stride - pad)   # just inside x > -1
    mask = rng.uniform(0, 2, size=(b, k * k, ho, wo)).astype(np.float32)
    weight = rng.normal(size=(o, c, k, k)).astype(np.float32)
    bias = rng.normal(size=(o,)).astype(np.float32)
    ref = deform_conv2d_ref(x.astype(np.float64), offset.astype(np.float64), weight.astype(np.float64),
                            mask.astype(np.float64), bias.astype(np.float64), stride, pad, dil)
    out = deform_conv2d(x.transpose(0, 2, 3, 1), offset.transpose(0, 2, 3, 1), weight.transpose(2, 3, 1, 0),
                        mask.transpose(0, 2, 3, 1), bias, stride=stride, padding=pad, dilation=dil)
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=2e-5)


def test_deform_conv2d_zero_offsets_is_conv():
    """Zero offsets and unit mask reduce to an ordinary (zero-padded) convolution."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 9, 8, 5)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 5, 6)).astype(np.float32)
    out = deform_conv2d(x, np.zeros((1, 9, 8, 18), np.float32), kernel, np.ones((1, 9, 8, 9), np.float32), padding=1)
    ref = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_deformable_module_keys_and_bad_input():
    m = DeformableConv2d(out_channels=4, kernel_size=3, padding=1)
    v = m.init(jax.random.PRNGKey(0), np.zeros((1, 5, 5, 2), np.float32))
    p = v["params"]
    assert p["offset_conv"]["kernel"].shape == (3, 3, 2, 18)
    assert p["modulator_conv"]["kernel"].shape == (3, 3, 2, 9)
    assert set(p["regular_conv"]) == {"kernel"} and p["regular_conv"]["kernel"].shape == (3, 3, 2, 4)
    with pytest.raises(NotImplementedError, match="offset group"):
        deform_conv2d(np.zeros((1, 4, 4, 2)), np.zeros((1, 4, 4, 36)), np.zeros((3, 3, 2, 1)), padding=1)


def test_deform_conv2d_bf16_close_to_fp32():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 6, 5, 8)).astype(np.float32)
    off = (rng.normal(size=(1, 6, 5, 18)) * 1.5).astype(np.float32)
    mask = rng.uniform(0, 2, size=(1, 6, 5, 9)).astype(np.float32)
    kernel = (rng.normal(size=(3, 3, 8, 4)) / 8).astype(np.float32)
    ref = np.asarray(deform_conv2d(x, off, kernel, mask, padding=1))
    out = deform_conv2d(jax.numpy.asarray(x, "bfloat16"), off, kernel, mask, padding=1)
    assert out.dtype == jax.numpy.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0, atol=3e-2 * np.abs(ref).max())
