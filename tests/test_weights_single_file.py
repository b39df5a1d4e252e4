"""The authors' single-file checkpoint (CLIP image + text towers inside, ../shared/oracle/v2
tiny_v2.safetensors, fp16) in one call: exact key and value coverage of every group, fp16/bf16/fp32
sources and load dtypes, `cdv2 convert` without --clip, and each component against the oracle/v2
component arrays (one call each, at the fixtures' tolerance)."""
from __future__ import annotations

import json
from functools import lru_cache

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from cdv2.config import load_model_config
from cdv2.weights.open_clip import params_to_open_clip
from cdv2.weights.pretrained import AUTHOR_GROUPS, load_pretrained, model_param_shapes
from cdv2.weights.readers import open_checkpoint, write_safetensors
from cdv2.weights.tree import flatten
from cdv2.weights.v2_checkpoint import SCHEDULE_BUFFERS, TEXT_PREFIX, export_entries
from conftest import nchw_to_nhwc, nhwc_to_nchw, rel_err

TOL = 1e-4  # FIXTURES.md: rtol ~1e-4 on single calls / components
GROUPS = {"unet", "sketch_encoder", "bg_encoder", "style_encoder", "vae", "clip", "clip_text"}
CFG = load_model_config("tiny_v2")


@pytest.fixture(scope="module")
def path(oracle_v2_dir):
    return oracle_v2_dir / "tiny_v2.safetensors"


@pytest.fixture(scope="module")
def file_sd(path):
    with open_checkpoint(path) as r:
        return {k: r.get(k) for k in r.keys()}


@pytest.fixture(scope="module")
def params(path):
    return load_pretrained(path, config="tiny_v2", dtype="float32")[0]


@pytest.fixture(scope="module")
def fx(oracle_v2_dir):
    meta = json.loads((oracle_v2_dir / "tiny_v2_fixtures.json").read_text())
    npz = np.load(oracle_v2_dir / "tiny_v2_fixtures.npz")
    return lambda name: npz[meta["aliases"].get(name, name)]


def torch_state(params) -> dict:
    """params -> the authors' {key: array} (every group, text tower via its own inverse)."""
    from cdv2.weights.open_clip_text import params_to_open_clip_text

    out = {k: make() for k, _, _, make in export_entries(params, vae_fp16=False) if k not in SCHEDULE_BUFFERS}
    out.update(params_to_open_clip(params["clip"], prefix="cond_stage_model.visual.model."))
    out.update(params_to_open_clip_text(params["clip_text"], prefix=TEXT_PREFIX))
    return out


def test_every_group_loads_with_exact_key_and_value_coverage(params, file_sd):
    assert set(params) == GROUPS
    from cdv2.weights.open_clip_text import expected_text_param_shapes

    want = {k: tuple(v.shape) for k, v in flatten(model_param_shapes(CFG, AUTHOR_GROUPS)).items()}
    want.update({"clip_text/" + "/".join(p): s for p, s in expected_text_param_shapes(CFG.clip_text).items()})
    assert {k: tuple(v.shape) for k, v in flatten(params).items()} == want
    # every tensor of the file is used (the schedule buffers are checked, logit_scale is training-only)
    unused = {"cond_stage_model.transformer.model.logit_scale", *SCHEDULE_BUFFERS}
    back = torch_state(params)
    assert set(back) == set(file_sd) - unused
    for k, v in back.items():
        assert v.dtype == np.float32 and np.array_equal(v, file_sd[k].astype(np.float32)), k


@pytest.mark.parametrize("source,load", [("float16", "bfloat16"), ("bfloat16", "float32"), ("float32", None)])
def test_fp16_bf16_fp32_sources_and_load_dtypes(tmp_path, path, file_sd, source, load):
    src = path
    dt = np.dtype(ml_dtypes.bfloat16 if source == "bfloat16" else source)
    if source != "float16":
        src = tmp_path / f"{source}.safetensors"
        sd = {k: (v if k in SCHEDULE_BUFFERS else v.astype(dt)) for k, v in file_sd.items()}
        write_safetensors(src, [(k, v.dtype, v.shape, lambda v=v: v) for k, v in sd.items()])
    got, _ = load_pretrained(src, config="tiny_v2", dtype=load)
    want_dtype = np.dtype(ml_dtypes.bfloat16 if (load or source) == "bfloat16" else load or source)
    assert {v.dtype for v in flatten(got).values()} == {want_dtype}  # cast once, no fp32 copy kept
    back = torch_state(got)
    for k, v in back.items():  # fp16 values are exact in fp32; bf16 is a rounding of them
        assert np.array_equal(v, file_sd[k].astype(dt).astype(np.float32).astype(want_dtype)), k


def test_convert_cli_needs_no_clip_and_suggests_the_config(tmp_path, path, params, capsys):
    from cdv2.cli import convert

    out = tmp_path / "w"
    assert convert.main(["--checkpoint", str(path), "--config", "tiny_v2", "--out", str(out),
                         "--no-progress"]) == 0
    loaded, cfg = load_pretrained(out)
    assert cfg == CFG and flatten(loaded).keys() == flatten(params).keys()
    assert all(np.array_equal(a, flatten(params)[k]) for k, a in flatten(loaded).items())
    capsys.readouterr()
    assert convert.main(["--checkpoint", str(path), "--config", "tiny", "--out", str(tmp_path / "x"),
                         "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "pass --config tiny_v2" in err and "Traceback" not in err


def test_colorizer_from_pretrained_single_file(path):
    from cdv2.sample.colorizer import Colorizer

    col = Colorizer.from_pretrained(path, config="tiny_v2")
    assert col.config == CFG and set(col.params) >= GROUPS - {"clip_text"}


# ------------------------------------------------------------------ components vs oracle/v2


@lru_cache(maxsize=None)
def _apply(module):
    return jax.jit(lambda p, *a: module.apply({"params": p}, *a))


def test_clip_image_tower_tokens(params, fx):
    from cdv2.modules.clip import VisionTransformer

    out = jax.jit(lambda p, x: VisionTransformer(CFG.clip).apply({"params": p}, x, full=True))(
        params["clip"], jnp.asarray(nchw_to_nhwc(fx("comp/clip/pre_reference"))))
    assert rel_err(out, fx("comp/clip/full_reference")) <= TOL


def test_vae_posterior_and_decode(params, fx):
    from cdv2.modules.vae import AutoencoderKL, latent_to_image

    vae = AutoencoderKL(CFG.vae)
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))(
        params["vae"], jnp.asarray(nchw_to_nhwc(fx("comp/vae/in_reference"))))
    assert rel_err(nhwc_to_nchw(mean), fx("comp/vae/mean")) <= TOL
    assert rel_err(nhwc_to_nchw(logvar), fx("comp/vae/logvar")) <= TOL
    img = jax.jit(lambda p, z: latent_to_image(vae, p, z))(params["vae"], jnp.asarray(nchw_to_nhwc(fx("in/vae_dec_in"))))
    assert rel_err(nhwc_to_nchw(img), fx("comp/vae/dec_out")) <= TOL


def test_sketch_encoder(params, fx):
    from cdv2.modules.encoders import SketchEncoder

    outs = _apply(SketchEncoder(CFG.sketch_encoder))(params["sketch_encoder"],
                                                     jnp.asarray(nchw_to_nhwc(fx("comp/sketch_enc/in"))))
    assert max(rel_err(nhwc_to_nchw(o), fx(f"comp/sketch_enc/out/{i}")) for i, o in enumerate(outs)) <= TOL


@pytest.mark.parametrize("name,group", [("style_enc", "style_encoder"), ("bg_enc", "bg_encoder")])
def test_style_and_background_encoders(params, fx, name, group):
    from cdv2.modules.encoders import UNetEncoder

    args = [jnp.asarray(nchw_to_nhwc(fx(f"comp/{name}/x"))), jnp.asarray(fx(f"comp/{name}/y")),
            jnp.asarray(fx(f"comp/{name}/context"))]
    outs = _apply(UNetEncoder(getattr(CFG, group)))(params[group], *args)
    assert len(outs) == 12
    assert max(rel_err(o, fx(f"comp/{name}/out/{i}")) for i, o in enumerate(outs)) <= TOL


def test_clip_text_tower(params, fx):
    text_clip = pytest.importorskip("cdv2.modules.text_clip")
    tokens = fx("mode/manip_target/text/0/tokens")
    out = jax.jit(lambda p, t: text_clip.encode_text_tokens(p, t, CFG.clip_text))(params["clip_text"], tokens)
    assert rel_err(out, fx("mode/manip_target/text/0/emb")) <= TOL
