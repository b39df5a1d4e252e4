"""SD VAE (cdv2.modules.vae) against the authors' torch VAE (oracle fixtures) and diffusers' torch
AutoencoderKL (through cdv2.weights.diffusers_vae); posterior sampling and latent scaling."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from cdv2.config import VAEConfig, load_model_config
from cdv2.modules.vae import (AutoencoderKL, encode_to_latent, image_to_latent, latent_to_image)
from cdv2.weights.diffusers_vae import diffusers_vae_to_ldm, infer_vae_config
from cdv2.weights.torch_layout import state_dict_to_params
from conftest import nchw_to_nhwc, nhwc_to_nchw, rel_err

TOL = 1e-4
_encode = jax.jit(lambda vae, p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode),
                  static_argnums=0)
_decode = jax.jit(lambda vae, p, z: vae.apply({"params": p}, z, method=AutoencoderKL.decode),
                  static_argnums=0)


def _shape_tree(tree):
    return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


# ---------------------------------------------------------------- the authors' VAE (oracle)

@pytest.fixture(scope="module")
def oracle_vae(oracle_dir):
    sd = load_file(str(oracle_dir / "tiny_v2.safetensors"))
    sd = {k: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    return AutoencoderKL(load_model_config("tiny").vae), state_dict_to_params(sd, "first_stage_model.")


@pytest.fixture(scope="module")
def oracle_posterior(oracle_vae, fixtures):
    vae, params = oracle_vae
    return _encode(vae, params, nchw_to_nhwc(fixtures["reference"]))


def test_init_tree_is_exactly_the_checkpoint_tree(oracle_vae):
    vae, params = oracle_vae
    shapes = jax.eval_shape(vae.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    assert _shape_tree(shapes) == _shape_tree(params)  # names and shapes: no key ignored or missing


def test_encode_matches_oracle(oracle_posterior, fixtures):
    mean, logvar = oracle_posterior
    err = rel_err(nhwc_to_nchw(mean), fixtures["vae_encode_mean"])
    print(f"oracle encode mean rel err {err:.3e}")
    assert err <= TOL
    assert np.all(np.isfinite(logvar)) and logvar.shape == mean.shape


def test_decode_matches_oracle(oracle_vae, fixtures):
    vae, params = oracle_vae
    img = _decode(vae, params, nchw_to_nhwc(fixtures["vae_encode_mean"]))
    err = rel_err(nhwc_to_nchw(img), fixtures["vae_decode_of_mean"])
    print(f"oracle decode rel err {err:.3e}")
    assert err <= TOL


def test_posterior_sample_and_scale_round_trip(oracle_vae, oracle_posterior):
    vae, params = oracle_vae
    mean, logvar = oracle_posterior
    scale = vae.config.scale_factor
    rng = jax.random.PRNGKey(7)
    z = encode_to_latent(mean, logvar, rng, scale)
    expected = (mean + np.exp(0.5 * np.asarray(logvar)) * np.asarray(jax.random.normal(rng, mean.shape))) * scale
    np.testing.assert_allclose(z, expected, rtol=1e-6, atol=1e-7)
    # the standardised noise is N(0,1)-like, and a different key gives a different sample
    eps = (np.asarray(z) / scale - mean) / np.exp(0.5 * np.asarray(logvar))
    assert abs(eps.mean()) < 0.2 and abs(eps.std() - 1) < 0.2
    assert not np.allclose(encode_to_latent(mean, logvar, jax.random.PRNGKey(8), scale), z)
    # no rng -> the scaled posterior mean; image_to_latent is encode + the same
    z_mean = encode_to_latent(mean, logvar, None, scale)
    np.testing.assert_allclose(z_mean, np.asarray(mean) * scale, rtol=1e-7)
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 32, 32, 3), minval=-1, maxval=1)
    m32, lv32 = _encode(vae, params, x)
    np.testing.assert_allclose(image_to_latent(vae, params, x, rng), encode_to_latent(m32, lv32, rng, scale),
                               rtol=1e-5, atol=1e-6)
    # latent_to_image undoes the scale: decode(z/s) == decode(mean), for the default and another s
    ref = _decode(vae, params, m32)
    assert rel_err(latent_to_image(vae, params, m32 * scale), ref) < 1e-5
    assert rel_err(latent_to_image(vae, params, m32 * 0.5, scale_factor=0.5), ref) < 1e-5


def test_bf16_compute_runs_close_to_fp32(oracle_vae):
    vae, params = oracle_vae
    x = jax.random.uniform(jax.random.PRNGKey(2), (1, 32, 32, 3), minval=-1, maxval=1)
    m32, _ = _encode(vae, params, x)
    m16, lv16 = _encode(AutoencoderKL(vae.config, dtype=jnp.bfloat16), params, x)
    assert m16.dtype == jnp.float32 and lv16.dtype == jnp.float32
    assert rel_err(m16, m32) < 5e-2


# ---------------------------------------------------------------- diffusers' VAE (independent)

DIFFUSERS_CFG = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                     up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2,
                     norm_num_groups=32, latent_channels=4, sample_size=32)


def _diffusers_vae(groups: int = 32):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**{**DIFFUSERS_CFG, "norm_num_groups": groups}).eval()
    with torch.no_grad():  # every parameter random and non-zero, activations kept O(1)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:  # GroupNorm scale
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    return torch, model, sd


@pytest.fixture(scope="module")
def diffusers_vae():
    return _diffusers_vae()


@pytest.mark.parametrize("groups", [32, 8])
def test_diffusers_vae_parity(diffusers_vae, groups):
    """groups 8: `VAEConfig.norm_groups` is diffusers' norm_num_groups (the demo VAE's setting)."""
    torch, model, sd = diffusers_vae if groups == 32 else _diffusers_vae(groups)
    ldm = diffusers_vae_to_ldm(sd, out_prefix="first_stage_model.")
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, z_channels=4, embed_dim=4, norm_groups=groups)
    # shapes cannot tell the group count: inferred configs carry SD's 32
    inferred = infer_vae_config({k[len("first_stage_model."):]: v for k, v in ldm.items()})
    assert dataclasses.replace(inferred, norm_groups=groups) == cfg
    vae, params = AutoencoderKL(cfg), state_dict_to_params(ldm, "first_stage_model.")
    x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        post = model.encode(torch.from_numpy(x)).latent_dist
        z = torch.from_numpy(np.random.RandomState(1).randn(2, 4, 16, 16).astype(np.float32))
        ref_img = model.decode(z).sample.numpy()
    mean, logvar = _encode(vae, params, nchw_to_nhwc(x))
    img = _decode(vae, params, nchw_to_nhwc(z.numpy()))
    errs = {"mean": rel_err(nhwc_to_nchw(mean), post.mean.numpy()),
            "logvar": rel_err(nhwc_to_nchw(logvar), post.logvar.numpy()),
            "decode": rel_err(nhwc_to_nchw(img), ref_img)}
    print("diffusers parity rel errs", {k: f"{v:.3e}" for k, v in errs.items()})
    assert all(v <= TOL for v in errs.values()), errs


def test_diffusers_old_attention_names_and_fp16(diffusers_vae):
    _, _, sd = diffusers_vae
    new = diffusers_vae_to_ldm(sd)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in sd.items():
        for a, b in old_names.items():
            k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
        old["vae." + k] = v.astype(np.float16)
    conv = diffusers_vae_to_ldm(old, prefix="vae.")
    assert conv.keys() == new.keys()
    for k in new:  # same tensors, upcast to fp32
        assert conv[k].dtype == np.float32
        np.testing.assert_array_equal(conv[k], new[k].astype(np.float16).astype(np.float32))


def test_diffusers_bad_keys_are_reported(diffusers_vae):
    _, _, sd = diffusers_vae
    with pytest.raises(ValueError, match="unmapped.*encoder.mid_block.extra.weight"):
        diffusers_vae_to_ldm({**sd, "encoder.mid_block.extra.weight": np.zeros(3)})
    missing = {k: v for k, v in sd.items() if "decoder.up_blocks.0.resnets.2.conv1" not in k}
    with pytest.raises(ValueError, match=r"missing \['decoder.up.1.block.2.conv1.bias'"):
        diffusers_vae_to_ldm(missing)
    wrong = dict(sd, **{"quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)})
    with pytest.raises(ValueError, match="wrong shapes.*quant_conv.weight"):
        diffusers_vae_to_ldm(wrong)
