"""Attention injection and text manipulation through the public `Colorizer.colorize`, from the raw
uint8 images of ../shared/oracle/v2 (app preprocessing) to the decoded image, with the recorded
draws injected; the app-named keywords; no recompilation when the injection numbers change; the
text tower's sources and the error without one. (The per-call and condition-level replay of every
injection/manipulation mode is tests/test_oracle_v2_modes.py.)"""
import jax
import numpy as np
import pytest

from cdv2.sample.colorizer import Colorizer
from cdv2.sample.injection import noise_per_call
from cdv2.sample.manipulation import Manipulation, app_manipulations, parse_prompts
from conftest import rel_err
from oracle_v2 import Fixtures, nchw, nhwc, params_for, tiny_v2_config

pytestmark = pytest.mark.torch
SIZE = (64, 128)
PROMPT_LINES = [  # FIXTURES.md, manip_prompt
    "[target] red dress; [anchor] none; [control] dress; [scale] 3.0; [enhanced] False; [ts0] 0.4; [ts1] 0.5; [ts2] 0.6; [ts3] 0.9",
    "[target] green eyes; [anchor] brown eyes; [control] eyes; [scale] 1.5; [enhanced] True; [ts0] 0.5; [ts1] 0.55; [ts2] 0.65; [ts3] 0.95",
]


@pytest.fixture(scope="module")
def fx(oracle_v2_dir):
    return Fixtures(oracle_v2_dir)


@pytest.fixture(scope="module")
def params(oracle_v2_dir):
    return params_for(oracle_v2_dir)


@pytest.fixture(scope="module")
def col(params):
    return Colorizer(params, tiny_v2_config())


def _run(col, fx, **kw):
    return col.colorize(fx["in/sketch_u8"], fx["in/reference_u8"], steps=8, size=SIZE, sketch_polarity="black_on_white",
                        seed=0, initial_noise=nhwc(fx["in/xT"]), output="array", **kw)


def _q_noise(fx, mode, start_step):
    draws = np.transpose(fx[f"mode/{mode}/noise/q_sample"], (0, 1, 3, 4, 2))
    return noise_per_call(draws, fx[f"mode/{mode}/sample/t_in"][:, 0], start_step)


def test_injection_through_colorizer(col, fx):
    """inject_default from the uint8 images (the injection image by PIL bicubic here too), then the
    same compiled loop with other fidelities / start step: no recompile, another image."""
    m = fx.modes["inject_default"]
    kw = dict(attention_injection=True, posterior="sample",
              vae_noise={"injection": nhwc(fx["mode/inject_default/vae_noise"][0])},
              injection_noise=_q_noise(fx, "inject_default", m["injection_start_step"]))
    out = _run(col, fx, injection_fidelity=m["injection_fidelity"],
               injection_sketch_fidelity=m["injection_control_scale"],
               injection_start_step=m["injection_start_step"], **kw)
    err = rel_err(nchw(out), fx["mode/inject_default/sample/image"])
    print(f"inject_default via Colorizer: image {err:.2e}")
    assert err <= 1e-3
    traces = dict(col.pipeline.trace_counts)
    other = _run(col, fx, injection_fidelity=0.8, injection_sketch_fidelity=0.6, injection_start_step=0.3, **kw)
    assert col.pipeline.trace_counts == traces
    assert rel_err(other, out) > 1e-3


def test_injection_from_the_seed_is_reproducible(col, fx):
    kw = dict(attention_injection=True, steps=2, size=SIZE, output="array", sketch_polarity="black_on_white")
    a = col.colorize(fx["in/sketch_u8"], fx["in/reference_u8"], seed=5, **kw)
    b = col.colorize(fx["in/sketch_u8"], fx["in/reference_u8"], seed=5, **kw)
    c = col.colorize(fx["in/sketch_u8"], fx["in/reference_u8"], seed=6, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def _authors(m):
    mp = m["manipulation_params"]
    return [Manipulation(t, a, c, s, e, tuple(th)) for t, a, c, s, e, th in
            zip(mp["targets"], mp["anchors"], mp["controls"], mp["target_scales"], mp["enhances"], mp["thresholds_list"])]


def test_manipulation_through_colorizer(col, fx):
    """manip_target (the authors' parse: anchor "" encoded as text) to the image; the app's direct
    fields give the fixed parse (empty anchor = none), identical to passing it explicitly."""
    out = _run(col, fx, manipulations=_authors(fx.modes["manip_target"]))
    err = rel_err(nchw(out), fx["mode/manip_target/sample/image"])
    print(f"manip_target via Colorizer: image {err:.2e}")
    assert err <= 1e-3
    fields = _run(col, fx, target_prompt="blue hair", anchor_prompt="", control_prompt="hair", target_scale=2.0)
    explicit = _run(col, fx, manipulations=[Manipulation("blue hair", None, "hair", 2.0)])
    np.testing.assert_array_equal(fields, explicit)
    assert rel_err(fields, out) > 1e-6  # the authors' empty-anchor bug changes the image
    plain = _run(col, fx, target_prompt="blue hair", control_prompt="hair", target_scale=0.0)  # inactive
    assert rel_err(nchw(plain), fx["mode/vanilla/sample/image"]) <= 1e-3


def test_app_fields_order_and_validation():
    got = app_manipulations("\n".join(PROMPT_LINES), "blue hair", "none", "hair", 2.0, (0.4, 0.5, 0.6, 0.9), True,
                            [Manipulation("x", scale=1.0)])
    want = parse_prompts("\n".join(PROMPT_LINES), "blue hair", "none", "hair", 2.0, 0.4, 0.5, 0.6, 0.9, True)
    assert got == want + [Manipulation("x", scale=1.0)] and len(got) == 4
    with pytest.raises(ValueError, match="4 numbers"):
        app_manipulations(thresholds=(0.5, 0.6))
    with pytest.raises(TypeError, match="Manipulation"):
        app_manipulations(extra=["blue hair"])


def test_text_tower_sources(params, fx, tmp_path):
    """Without `clip_text` in the weights: a clear error; with the open_clip file given as the
    text tower's source it is read on first use and equals the converted tower."""
    from safetensors.numpy import save_file

    from cdv2.weights.open_clip_text import params_to_open_clip_text

    bare = {k: v for k, v in params.items() if k != "clip_text"}
    with pytest.raises(ValueError, match="text tower"):
        Colorizer(bare, tiny_v2_config()).colorize(fx["in/sketch_u8"], fx["in/reference_u8"], size=SIZE, steps=1,
                                                   target_prompt="blue hair", target_scale=1.0)
    f = tmp_path / "open_clip.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in
               params_to_open_clip_text(jax.tree_util.tree_map(np.asarray, params["clip_text"])).items()}, str(f))
    lazy = Colorizer(bare, tiny_v2_config(), text_tower_file=str(f)).text_encoder()(["blue hair", "hair"])
    full = Colorizer(params, tiny_v2_config()).text_encoder()(["blue hair", "hair"])
    np.testing.assert_array_equal(np.asarray(lazy), np.asarray(full))
