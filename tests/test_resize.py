import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.modules.resize import resize_bicubic
from conftest import nchw_to_nhwc, nhwc_to_nchw

torch = pytest.importorskip("torch")
F = torch.nn.functional


@pytest.mark.parametrize("size", [(16, 16), (8, 8), (2, 2), (74, 100), (9, 13), (37, 50)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_bicubic_matches_torch(size, align_corners):
    x = np.random.RandomState(0).randn(2, 3, 37, 50).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=size, mode="bicubic", align_corners=align_corners).numpy()
    out = nhwc_to_nchw(resize_bicubic(jnp.asarray(nchw_to_nhwc(x)), size, align_corners))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)


def test_oracle_latent_mask(fixtures):
    """The authors' smask_latent is torch bicubic of smask_full by 0.125."""
    out = resize_bicubic(jnp.asarray(nchw_to_nhwc(fixtures["smask_full"])), (16, 16))
    np.testing.assert_allclose(nhwc_to_nchw(out), fixtures["smask_latent"], atol=1e-6)
