"""Sketch, background and style encoders and the size embedding against the oracle's calls."""
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.conditioning import size_ratios
from cdv2.modules.encoders import SketchEncoder, UNetEncoder, size_embedding
from cdv2.weights.torch_layout import state_dict_to_params
from conftest import nchw_to_nhwc, nhwc_to_nchw, rel_err


@pytest.mark.parametrize("mode", ["vanilla", "full"])
def test_sketch_encoder(fixtures, tiny_state_dict, tiny_config, mode):
    enc = SketchEncoder(tiny_config.sketch_encoder)
    p = {"params": state_dict_to_params(tiny_state_dict, "control_encoder.")}
    outs = enc.apply(p, jnp.asarray(nchw_to_nhwc(fixtures[f"{mode}/sketch_encoder/in0"])))
    assert len(outs) == 5
    for i, o in enumerate(outs):
        assert rel_err(nhwc_to_nchw(o), fixtures[f"{mode}/sketch_encoder/out{i}"]) <= 1e-4


@pytest.mark.parametrize("name,x_key", [("bg_encoder", "in_x"), ("style_encoder", "in0")])
def test_unet_encoders(fixtures, tiny_state_dict, tiny_config, name, x_key):
    m = f"full/{name}/"
    enc = UNetEncoder(getattr(tiny_config, name))
    p = {"params": state_dict_to_params(tiny_state_dict, name + ".")}
    assert float(fixtures[m + "in_timesteps"][0]) == 0.0  # the encoders run at t = 0
    outs = enc.apply(p, jnp.asarray(nchw_to_nhwc(fixtures[m + x_key])), jnp.asarray(fixtures[m + "in_y"]),
                     jnp.asarray(fixtures[m + "in_context"]))
    assert len(outs) == 12
    errs = [rel_err(o, fixtures[f"{m}out{i}"]) for i, o in enumerate(outs)]
    print(name, max(errs))
    assert max(errs) <= 1e-4


def test_size_embedding(fixtures):
    ratios = fixtures["full/size_embedder/in0"].reshape(1, 2)
    y = size_embedding(ratios)
    assert rel_err(np.asarray(y).reshape(2, 256), fixtures["full/size_embedder/out"]) <= 1e-6
    assert rel_err(y, fixtures["full/bg_encoder/in_y"]) <= 1e-6
    # the oracle's reference is 128x128 for a 128x128 generation: ratio 1
    np.testing.assert_allclose(size_ratios((128, 128), (128, 128)), ratios[0])


def test_size_ratios_small_reference_bias():
    # smaller than the target: height grows by max(H, W), aspect kept (authors' get_size_embedding)
    np.testing.assert_allclose(size_ratios((100, 50), (768, 512)), [(100 + 768) / 768, (50 / 100 * 868) / 512])
    np.testing.assert_allclose(size_ratios((1536, 1024), (768, 512)), [2.0, 2.0])
