"""OpenCLIP image tower: the authors' tokens (oracle), an independent torch CLIP (transformers),
and the checkpoint converters' errors and round trip."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from cdv2.config import CLIPVisionConfig, load_model_config
from cdv2.modules.clip import VisionTransformer, encode_reference
from cdv2.weights.open_clip import (clip_config_from_hf, hf_clip_vision_to_params, open_clip_config_from_state_dict,
                                    open_clip_to_params, params_to_open_clip)
from conftest import nchw_to_nhwc, rel_err

TINY = load_model_config("tiny").clip


@functools.lru_cache(maxsize=None)
def _encode_fn(config: CLIPVisionConfig):
    return jax.jit(functools.partial(encode_reference, config=config))


@pytest.fixture(scope="module")
def oracle_sd(oracle_dir):
    return load_file(str(oracle_dir / "tiny_openclip_visual.safetensors"))


def test_oracle_local_tokens(oracle_sd, fixtures):
    """encode_reference (antialiased align_corners squash of the 128^2 reference + tower) vs the
    authors' FrozenOpenCLIPImageEmbedder output."""
    params = open_clip_to_params(oracle_sd, TINY)
    out = _encode_fn(TINY)(params, jnp.asarray(nchw_to_nhwc(fixtures["reference"])))
    err = rel_err(out, fixtures["clip_local_tokens"])
    print(f"oracle clip_local_tokens rel err {err:.3e}")
    assert err <= 1e-4, err


def test_infer_config(oracle_sd):
    assert open_clip_config_from_state_dict(oracle_sd, head_width=32) == TINY
    with pytest.raises(ValueError, match="head_width"):
        open_clip_config_from_state_dict(oracle_sd)  # width 64: head count not knowable


def test_open_clip_round_trip_bit_exact(oracle_sd):
    back = params_to_open_clip(open_clip_to_params(oracle_sd, TINY))
    assert sorted(back) == sorted(oracle_sd)
    for k, v in oracle_sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert np.array_equal(back[k], v), k
    # without the "visual." prefix and with text-tower keys around, the same params come out
    bare = {k.removeprefix("visual."): v for k, v in oracle_sd.items()}
    assert sorted(params_to_open_clip(open_clip_to_params(bare, TINY))) == sorted(oracle_sd)
    with_text = dict(oracle_sd, **{"token_embedding.weight": np.zeros((9, 4)), "positional_embedding": np.zeros(3)})
    jax.tree_util.tree_map(np.testing.assert_array_equal, open_clip_to_params(with_text, TINY),
                           open_clip_to_params(oracle_sd, TINY))


@pytest.mark.parametrize("edit,key", [
    ("missing", "visual.ln_post.bias"),
    ("missing", "visual.transformer.resblocks.1.attn.in_proj_weight"),
    ("extra", "visual.transformer.resblocks.2.ln_1.weight"),
    ("shape", "visual.transformer.resblocks.0.mlp.c_fc.weight"),
    ("shape", "visual.proj"),
])
def test_open_clip_errors_name_the_key(oracle_sd, edit, key):
    sd = dict(oracle_sd)
    if edit == "missing":
        del sd[key]
    elif edit == "extra":
        sd[key] = np.ones(64, np.float32)
    else:
        sd[key] = np.ones(sd[key].shape[:-1] + (sd[key].shape[-1] + 1,), np.float32)
    with pytest.raises(ValueError, match={"missing": "missing", "extra": "unexpected", "shape": "wrong shape"}[edit]) as e:
        open_clip_to_params(sd, TINY)
    assert key in str(e.value)


# ---------------------------------------------------------------- transformers (independent torch CLIP)

torch = pytest.importorskip("torch")
HF_CFG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
              image_size=224, patch_size=14, projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5,
              num_channels=3)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import CLIPVisionConfig as HFConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(HFConfig(**HF_CFG)).eval()
    with torch.no_grad():  # non-zero everywhere (biases and LayerNorms included)
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 * (1.0 if "embedding" not in name else 0.5))
    return model


def test_hf_parity(hf_model):
    config = clip_config_from_hf(HF_CFG)
    assert config == CLIPVisionConfig(image_size=224, patch_size=14, width=64, layers=2, head_width=32,
                                      mlp_ratio=4.0, output_dim=32)
    params = hf_clip_vision_to_params(hf_model.state_dict(), config)
    pixels = np.random.RandomState(0).randn(2, 3, 224, 224).astype(np.float32)
    with torch.no_grad():
        hidden = hf_model.vision_model(pixel_values=torch.from_numpy(pixels)).last_hidden_state
        vm = hf_model.vision_model
        ref = hf_model.visual_projection(vm.post_layernorm(hidden))[:, 1:].numpy()
    out = jax.jit(VisionTransformer(config).apply)({"params": params}, jnp.asarray(nchw_to_nhwc(pixels)))
    err = rel_err(out, ref)
    print(f"HF CLIPVisionModelWithProjection local tokens rel err {err:.3e}")
    assert err <= 1e-4, err


def test_hf_config_rejects_quick_gelu():
    with pytest.raises(ValueError, match="quick_gelu"):
        clip_config_from_hf(dict(HF_CFG, hidden_act="quick_gelu"))


@pytest.mark.parametrize("edit,key", [
    ("missing", "vision_model.encoder.layers.1.self_attn.k_proj.weight"),
    ("missing", "vision_model.post_layernorm.bias"),
    ("extra", "vision_model.encoder.layers.0.mlp.fc3.weight"),
    ("shape", "visual_projection.weight"),
])
def test_hf_errors_name_the_key(hf_model, edit, key):
    sd = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    if edit == "missing":
        del sd[key]
    elif edit == "extra":
        sd[key] = np.ones((4, 4), np.float32)
    else:
        sd[key] = np.ones((33, 64), np.float32)
    with pytest.raises(ValueError) as e:
        hf_clip_vision_to_params(sd, clip_config_from_hf(HF_CFG))
    assert key in str(e.value), str(e.value)


def test_load_torch_pickle_and_safetensors(oracle_sd, oracle_dir, tmp_path):
    from cdv2.weights.open_clip import load_open_clip_params, load_state_dict
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({k: torch.from_numpy(v) for k, v in oracle_sd.items()}, path)
    sd = load_state_dict(path)
    assert sorted(sd) == sorted(oracle_sd) and all(np.array_equal(sd[k], oracle_sd[k]) for k in sd)
    params = load_open_clip_params(oracle_dir / "tiny_openclip_visual.safetensors", head_width=32)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, open_clip_to_params(sd, TINY))
