"""`resize_bicubic_antialias` against torch's own `F.interpolate(bicubic, antialias=True)`."""
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.modules.resize import resize_bicubic_antialias
from conftest import nchw_to_nhwc, nhwc_to_nchw

torch = pytest.importorskip("torch")
F = torch.nn.functional

CASES = [
    ((128, 128), (224, 224)),   # the oracle's CLIP input (upsampling)
    ((500, 300), (224, 224)),   # non-square squash, down in H and W
    ((1000, 1000), (224, 224)),  # strong downsampling (support 2*scale)
    ((224, 224), (224, 224)),   # identity
    ((37, 50), (9, 13)),
    ((5, 6), (17, 3)),          # up in H, down in W
    ((7, 5), (1, 1)),           # single output pixel (align_corners scale 0)
]


@pytest.mark.parametrize("in_size,out_size", CASES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_torch(in_size, out_size, align_corners):
    x = np.random.RandomState(sum(in_size) + sum(out_size)).randn(1, 2, *in_size).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=out_size, mode="bicubic",
                        align_corners=align_corners, antialias=True).numpy()
    out = nhwc_to_nchw(resize_bicubic_antialias(jnp.asarray(nchw_to_nhwc(x)), out_size, align_corners))
    err = float(np.abs(out - ref).max())
    assert err <= 1e-5, err


def test_differs_from_plain_bicubic():
    """Guard against a silent fallback to the non-antialiased (a = -0.75) kernel."""
    x = np.random.RandomState(1).randn(1, 1, 128, 128).astype(np.float32)
    plain = F.interpolate(torch.from_numpy(x), size=(224, 224), mode="bicubic", align_corners=True).numpy()
    out = nhwc_to_nchw(resize_bicubic_antialias(jnp.asarray(nchw_to_nhwc(x)), (224, 224), True))
    assert np.abs(out - plain).max() > 1e-2
