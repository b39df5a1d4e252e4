"""Every recorded component of ../shared/oracle/v2 (FIXTURES.md "Inputs and preprocessing",
"Components") through cdv2's public preprocessing and the shared conditioning builder."""
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2 import conditioning as cb
from cdv2.diffusion.schedule import ldm_alphas_cumprod
from cdv2.modules.vae import AutoencoderKL
from cdv2.sample import masks as mask_ops
from cdv2.sample import preprocess as pre
from cdv2.sample.pipeline import Pipeline
from conftest import rel_err
from oracle_v2 import Fixtures, nchw, nhwc, params_for, tiny_v2_config

pytestmark = pytest.mark.torch
TOL = 1e-4  # FIXTURES.md: single calls / components
ERRORS = {}


@pytest.fixture(scope="module")
def fx(oracle_v2_dir):
    return Fixtures(oracle_v2_dir)


@pytest.fixture(scope="module")
def model(oracle_v2_dir):
    pipe = Pipeline(tiny_v2_config())
    return pipe.components, params_for(oracle_v2_dir)


def check(name, ours, ref, tol=TOL):
    err = rel_err(ours, ref)
    ERRORS[name] = err
    print(f"{name}: {err:.2e}")
    assert err <= tol, (name, err)


def test_preprocessing(fx):
    sk, box = pre.prepare_sketch(fx["in/sketch_u8"], (64, 128), polarity="black_on_white")
    check("pre/sketch", nchw(sk), fx["pre/sketch"])
    left, top, w, h = fx["pre/sketch_original_shape"]
    assert box == (top, left, h, w)
    ref, ref_hw = pre.prepare_reference(fx["in/reference_u8"])
    check("pre/reference", nchw(ref), fx["pre/reference"], 1e-6)
    bg, _ = pre.prepare_background(fx["in/background_u8"])
    check("pre/background", nchw(bg), fx["pre/background"], 1e-6)
    check("pre/smask", nchw(mask_ops.latent_mask(nhwc(fx["in/smask_full"]), (8, 16))), fx["pre/smask"])
    check("comp/masked_reference", nchw(np.where(nhwc(fx["in/rmask"]) < 0.5, ref, 1.0)), fx["comp/masked_reference"])


@pytest.mark.parametrize("what", ["reference", "background", "masked_reference"])
def test_host_resizes_equal_torch(fx, what):
    src = {"reference": "pre/reference", "background": "pre/background",
           "masked_reference": "comp/masked_reference"}[what]
    img = nhwc(fx[src])
    check(f"comp/vae/in_{what}", nchw(pre.squash_to(img, (64, 128))), fx[f"comp/vae/in_{what}"])
    if f"comp/clip/pre_{what}" in fx:
        got = cb.normalize_for_clip(jnp.asarray(pre.squash_for_clip(img, 224)))
        check(f"comp/clip/pre_{what}", nchw(got), fx[f"comp/clip/pre_{what}"])


def test_clip_tokens(fx, model):
    comps, params = model
    for what, key in (("reference", "comp/clip/emb_reference"), ("background", "comp/clip/local_background"),
                      ("masked_reference", "comp/clip/local_masked_reference")):
        src = {"reference": "pre/reference", "background": "pre/background",
               "masked_reference": "comp/masked_reference"}[what]
        squashed = jnp.asarray(pre.squash_for_clip(nhwc(fx[src]), 224))
        check(key, cb.clip_tokens(comps, params, squashed, squashed=True), fx[key])
        if what == "reference":  # the in-graph squash (training) gives the same tokens
            check(key + " (in-graph squash)", cb.clip_tokens(comps, params, jnp.asarray(nhwc(fx[src]))), fx[key])
    check("comp/clip/local_reference", cb.clip_tokens(
        comps, params, jnp.asarray(pre.squash_for_clip(nhwc(fx["pre/reference"]), 224)), squashed=True),
        fx["comp/clip/local_reference"])


def test_vae(fx, model):
    comps, params = model
    x = jnp.asarray(nhwc(fx["comp/vae/in_reference"]))
    mean, logvar = comps.vae.apply({"params": params["vae"]}, x, method=AutoencoderKL.encode)
    check("comp/vae/mean", nchw(mean), fx["comp/vae/mean"])
    check("comp/vae/logvar", nchw(logvar), fx["comp/vae/logvar"])
    z = cb.vae_latent(comps, params, x, jnp.asarray(nhwc(fx["comp/vae/noise"])))
    check("comp/vae/z", nchw(z), fx["comp/vae/z"])
    pipe_decode = comps.vae.apply({"params": params["vae"]}, jnp.asarray(nhwc(fx["in/vae_dec_in"])) / 0.18215,
                                  method=AutoencoderKL.decode)
    check("comp/vae/dec_out", nchw(pipe_decode), fx["comp/vae/dec_out"])
    raw = comps.vae.apply({"params": params["vae"]}, jnp.asarray(nhwc(fx["in/vae_dec_in"])),
                          method=AutoencoderKL.decode)
    check("comp/vae/dec_out_raw", nchw(raw), fx["comp/vae/dec_out_raw"])


def test_size_embeddings(fx, model):
    comps, _ = model
    for what, u8 in (("reference", "in/reference_u8"), ("background", "in/background_u8")):
        ratios = cb.size_ratios(fx[u8].shape[:2], (64, 128))[None]
        check(f"comp/size_emb/{what}", cb.size_condition(comps, ratios), fx[f"comp/size_emb/{what}"], 1e-6)
    # the batched (training) form is the same formula
    hw = np.array([fx["in/reference_u8"].shape[:2], fx["in/background_u8"].shape[:2]], np.float32)
    np.testing.assert_allclose(np.asarray(cb.size_ratios(jnp.asarray(hw), (64, 128))),
                               np.stack([cb.size_ratios(tuple(s), (64, 128)) for s in hw.astype(int)]), rtol=1e-6)


def test_encoders(fx, model):
    comps, params = model
    sk = jnp.asarray(nhwc(fx["comp/sketch_enc/in"][:1]))
    control, uc_control = cb.sketch_hints(comps, params, sk)
    for i in range(5):
        check(f"comp/sketch_enc/out/{i}", nchw(jnp.concatenate([control[i], uc_control[i]])),
              fx[f"comp/sketch_enc/out/{i}"])
    for enc in ("style", "bg"):
        x = jnp.asarray(nhwc(fx[f"comp/{enc}_enc/x"]))
        y = jnp.asarray(fx[f"comp/{enc}_enc/y"])
        ctx = jnp.asarray(fx[f"comp/{enc}_enc/context"])
        outs = (cb.style_vectors(comps, params, x, y, ctx) if enc == "style"
                else cb.background_features(comps, params, x, y, ctx))
        for i, o in enumerate(outs):
            check(f"comp/{enc}_enc/out/{i}", o, fx[f"comp/{enc}_enc/out/{i}"])


def test_schedule(fx):
    check("sched/alphas_cumprod", ldm_alphas_cumprod(), fx["sched/alphas_cumprod"], 1e-7)
