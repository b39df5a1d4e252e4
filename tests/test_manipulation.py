"""Text manipulation against ../shared/oracle/v2 (manip_target, manip_prompt, manip_target_bg): the
CLIP reference tokens before/after `local_manipulate` and the context the U-Net received, through
cdv2's tokenizer + text tower + token shift; the prompt parser and its fixed bugs."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.sample.manipulation import (Manipulation, encode_reference_full, format_line, is_active,
                                      make_text_encoder, manipulate_tokens, parse_line, parse_prompts,
                                      piecewise_weight)
from conftest import nchw_to_nhwc, rel_err

MODES = ["manip_target", "manip_prompt", "manip_target_bg"]
PROMPT_LINES = [  # FIXTURES.md, manip_prompt
    "[target] red dress; [anchor] none; [control] dress; [scale] 3.0; [enhanced] False; [ts0] 0.4; [ts1] 0.5; [ts2] 0.6; [ts3] 0.9",
    "[target] green eyes; [anchor] brown eyes; [control] eyes; [scale] 1.5; [enhanced] True; [ts0] 0.5; [ts1] 0.55; [ts2] 0.65; [ts3] 0.95",
]


@pytest.fixture(scope="module")
def v2(oracle_v2_dir):
    from safetensors.numpy import load_file

    from cdv2.weights.open_clip_text import convert_open_clip_text, open_clip_text_config_from_state_dict

    meta = json.loads((oracle_v2_dir / "tiny_v2_fixtures.json").read_text())
    npz = np.load(oracle_v2_dir / "tiny_v2_fixtures.npz")
    get = lambda n: npz[meta["aliases"].get(n, n)]
    sd = {k: v.astype(np.float32) for k, v in load_file(str(oracle_v2_dir / "tiny_v2.safetensors")).items()
          if k.startswith("cond_stage_model.")}
    cfg = open_clip_text_config_from_state_dict(sd, heads=2)
    encode = make_text_encoder(convert_open_clip_text(sd, cfg), cfg)
    return meta, get, sd, encode


def _authors_params(meta, mode):
    """The manipulations exactly as the authors' parser produced them (json `manipulation_params`)."""
    mp = meta["modes"][mode]["manipulation_params"]
    return [Manipulation(t, a, c, s, e, tuple(th)) for t, a, c, s, e, th in
            zip(mp["targets"], mp["anchors"], mp["controls"], mp["target_scales"], mp["enhances"], mp["thresholds_list"])]


@pytest.mark.parametrize("mode", MODES)
def test_manipulated_tokens_match_oracle(v2, mode):
    meta, get, _, encode = v2
    m = f"mode/{mode}/"
    v_in, v_out = get(m + "manip/emb_full_in"), get(m + "manip/emb_full_out")
    out = np.asarray(manipulate_tokens(jnp.asarray(v_in), _authors_params(meta, mode), encode))
    shift = rel_err(out - v_in, v_out - v_in)  # error relative to the manipulation itself
    print(f"{mode}: max abs {np.abs(out - v_out).max():.2e}, rel to shift {shift:.2e}")
    assert shift <= 1e-4
    ctx = get(m + "cond/context/0")  # cond and blank-sketch rows: manipulated tokens (bg tokens after them)
    np.testing.assert_allclose(ctx[0, :256], out[0, 1:], rtol=0, atol=1e-5)


def test_full_reference_tokens(v2):
    """`encode_reference_full` = the authors' encode(reference, "full"): CLS + 256 tokens."""
    from cdv2.config import CLIPVisionConfig
    from cdv2.weights.open_clip import open_clip_to_params

    meta, get, sd, _ = v2
    cfg = CLIPVisionConfig(image_size=224, patch_size=14, width=64, layers=2, head_width=32, output_dim=64)
    params = open_clip_to_params(sd, cfg, prefix="cond_stage_model.visual.model.")
    ref = jnp.asarray(nchw_to_nhwc(get("pre/reference")))
    out = np.asarray(encode_reference_full(params, ref, cfg))
    assert out.shape == (1, 257, 64)
    assert rel_err(out, get("mode/manip_target/manip/emb_full_in")) <= 1e-4


def test_parser_fixes_the_authors_bugs(v2):
    meta, _, _, _ = v2
    # prompt box: "[enhanced] False" is False here (the authors parsed True)
    got = parse_prompts("\n".join(PROMPT_LINES))
    want = _authors_params(meta, "manip_prompt")
    assert [g.enhance for g in got] == [False, True] and [w.enhance for w in want] == [True, True]
    assert got[0].anchor is None and want[0].anchor == "none"
    for g, w in zip(got, want):
        assert (g.target, g.control, g.scale, g.thresholds) == (w.target, w.control, w.scale, w.thresholds)
    assert got[1].anchor == w.anchor == "brown eyes"
    # direct fields: an empty anchor means no anchor (the authors encoded "")
    (d,) = parse_prompts("", "blue hair", "", "hair", 2.0, 0.5, 0.55, 0.65, 0.95, False)
    assert d.anchor is None and _authors_params(meta, "manip_target")[0].anchor == ""
    # control "everything" means every token (the authors compared a tensor with the string)
    (e,) = parse_prompts(None, "blue hair", "none", "everything", 1.0, enhance=True)
    assert e.control is None and _authors_params(meta, "manip_target_bg")[0].control == "everything"
    assert parse_prompts("", "", "x", "y", 3.0) == []  # no target: the direct fields are unused


def test_fixed_behaviours_differ_where_the_bugs_trigger(v2):
    """Where a bug triggers, the fixed result differs from the oracle; the fixed "everything"
    moves every token by the same dscale * target (no anchor) as the authors intended."""
    meta, get, _, encode = v2
    v_in = jnp.asarray(get("mode/manip_target/manip/emb_full_in"))
    ref = get("mode/manip_target/manip/emb_full_out")
    (fixed,) = parse_prompts("", "blue hair", "", "hair", 2.0)
    assert rel_err(manipulate_tokens(v_in, [fixed], encode), ref) > 1e-4
    (everything,) = parse_prompts("", "blue hair", "none", "everything", 1.0, enhance=True)
    out = np.asarray(manipulate_tokens(v_in, [everything], encode))
    t = np.asarray(encode(["blue hair"]))[0, 0]
    v = np.asarray(v_in)
    dscale = 1.0 - v[0, 0] @ t
    np.testing.assert_allclose(out[0, 1:], v[0, 1:] + dscale * t, atol=1e-5)
    np.testing.assert_array_equal(out[0, 0], v[0, 0])  # the CLS token is never moved


def test_piecewise_weight_matches_numpy():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 256, 1)).astype(np.float32)
    d = np.array([0.7, -1.3], np.float32).reshape(2, 1, 1)
    th = (0.4, 0.5, 0.6, 0.9)
    m = (s - s.min(1, keepdims=True)) / (s.max(1, keepdims=True) - s.min(1, keepdims=True))
    ref = np.select([m <= th[0], m <= th[1], m <= th[2], m <= th[3]],
                    [-2 * d + 0 * m, -d + d * (m - th[0]) / (th[1] - th[0]), 0.5 * d * (m - th[1]) / (th[2] - th[1]),
                     0.5 * d + 0.5 * d * (m - th[2]) / (th[3] - th[2])], d + 0 * m)
    np.testing.assert_allclose(piecewise_weight(jnp.asarray(s), jnp.asarray(d), th), ref, atol=1e-6)


def test_lines_round_trip_and_errors():
    for m in (Manipulation("red dress", None, "dress", 3.0, False, (0.4, 0.5, 0.6, 0.9)),
              Manipulation("green eyes", "brown eyes", None, 1.5, True)):
        assert parse_line(format_line(m)) == m
    assert [parse_line(line) for line in PROMPT_LINES] == parse_prompts("\n\n".join(PROMPT_LINES) + "\n")
    with pytest.raises(ValueError, match="enhanced"):
        parse_line(PROMPT_LINES[0].replace("False", "maybe"))
    with pytest.raises(ValueError, match=r"\[control\]"):
        parse_line("[target] red; [anchor] none")
    with pytest.raises(ValueError, match="numbers"):
        parse_line(PROMPT_LINES[0].replace("3.0", "lots"))
    with pytest.raises(ValueError, match="4 thresholds"):
        Manipulation("x", thresholds=(0.1, 0.2))
    assert not is_active([Manipulation("x", scale=0.0)]) and is_active([Manipulation("x"), Manipulation("y", scale=1.0)])
