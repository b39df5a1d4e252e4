"""The public API and CLI on the oracle's tiny model: bad inputs, options, determinism."""
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw

from cdv2.cli import main as cli_main
from cdv2.sample.colorizer import Colorizer
from cdv2.diffusion.guidance import branches_for, combine
from cdv2.sample.scales import reference_scales


@pytest.fixture(scope="module")
def colorizer(tiny_params, tiny_config):
    return Colorizer(tiny_params, tiny_config)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    sk = Image.new("RGB", (200, 150), "white")
    ImageDraw.Draw(sk).ellipse((50, 30, 150, 120), outline="black", width=3)
    ref = Image.new("RGB", (120, 160), (240, 240, 240))
    ImageDraw.Draw(ref).ellipse((20, 40, 100, 140), fill=(200, 50, 50))
    sk.save(d / "sketch.png")
    ref.save(d / "ref.png")
    Image.new("L", (30, 30), 255).save(d / "bad_mask.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return d


def test_colorize_is_deterministic_and_seeded(colorizer, images):
    kw = dict(mode="full", steps=2, size=(128, 192))
    a = colorizer.colorize(images / "sketch.png", images / "ref.png", seed=1, crop=True, **kw)[0]
    b = colorizer.colorize(images / "sketch.png", images / "ref.png", seed=1, crop=True, **kw)[0]
    c = colorizer.colorize(images / "sketch.png", images / "ref.png", seed=2, crop=True, **kw)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # cropped back to the sketch's aspect inside the 128x192 canvas: 150x200 -> 128x170
    assert a.size == (170, 128)
    full = colorizer.colorize(images / "sketch.png", images / "ref.png", seed=1, **kw)[0]  # the app: no crop
    assert full.size == (192, 128)
    # seed -1 draws a random seed and records it (the app's "Reuse Seed"); reusing it reproduces
    r = colorizer.colorize(images / "sketch.png", images / "ref.png", seed=-1, crop=True, **kw)[0]
    used = colorizer.last_seed
    assert 0 <= used <= 429496729
    again = colorizer.colorize(images / "sketch.png", images / "ref.png", seed=used, crop=True, **kw)[0]
    assert np.array_equal(np.asarray(r), np.asarray(again))
    # the VAE posterior: the authors' sample (default, from the seed) differs from the mean
    m = colorizer.colorize(images / "sketch.png", images / "ref.png", seed=1, crop=True, posterior="mean", **kw)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(m))


def test_num_images_are_distinct_samples(colorizer, images):
    outs = colorizer.colorize(images / "sketch.png", images / "ref.png", mode="vanilla", steps=2, size=(128, 128),
                              num_images=2)
    assert len(outs) == 2 and not np.array_equal(np.asarray(outs[0]), np.asarray(outs[1]))


@pytest.mark.parametrize("bad,err,match", [
    (dict(sketch="missing.png"), FileNotFoundError, "sketch"),
    (dict(reference="corrupt.png"), ValueError, "reference"),
    (dict(mode="sepia"), ValueError, "mode"),
    (dict(size=(100, 128)), ValueError, "multiples of 64"),
    (dict(sketch_mask="bad_mask.png"), ValueError, "sketch mask"),
    (dict(steps=0), ValueError, "steps"),
    (dict(attention_injection=True, injection_noise=np.zeros((3, 1, 16, 24, 4), np.float32)), ValueError,
     "injection_noise"),
    (dict(reference_mask="rmbg"), ValueError, "reference_mask"),
    (dict(reference_padding_scale=3.0), ValueError, "padding"),
    (dict(seed=-2), ValueError, "seed"),
    (dict(posterior="mode"), ValueError, "posterior"),
    (dict(initial_noise=np.zeros((1, 8, 8, 4), np.float32)), ValueError, "initial_noise"),
])
def test_bad_inputs_get_clear_errors(colorizer, images, bad, err, match):
    kw = dict(sketch=images / "sketch.png", reference=images / "ref.png", mode="full", steps=2, size=(128, 192))
    kw.update({k: (images / v if k in ("sketch", "reference", "sketch_mask") else v) for k, v in bad.items()})
    with pytest.raises(err, match=match):
        colorizer.colorize(kw.pop("sketch"), kw.pop("reference"), **kw)


def test_guidance_formula():
    c, u_r, u_s = (jnp.full((1, 2), v) for v in (1.0, 0.2, 0.5))
    assert branches_for(1.0, 1.0) == ("cond",)
    assert branches_for(5.0, 1.0) == ("cond", "uncond_ref")
    both = branches_for(5.0, 2.0)
    assert both == ("cond", "uncond_ref", "uncond_sketch")
    out = combine(jnp.concatenate([c, u_r, u_s]), both, 5.0, 2.0)
    np.testing.assert_allclose(out, 0.5 * ((0.2 + 5 * 0.8) + (0.5 + 2 * 0.5)), rtol=1e-6)
    np.testing.assert_allclose(combine(jnp.concatenate([c, u_r]), branches_for(5.0, 1.0), 5.0, 1.0), 0.2 + 5 * 0.8,
                               rtol=1e-6)


def test_reference_scales_mapping():
    np.testing.assert_array_equal(reference_scales(), np.ones(16, np.float32))
    s = reference_scales(0.5, encoder_scale=0.2, middle_scale=0.4, low_scale=0.6)
    assert s[0] == s[1] == pytest.approx(0.1)          # encoder high-res
    assert s[2] == s[10] == s[12] == pytest.approx(0.2)  # middle overrides encoder
    assert s[4] == s[7] == s[9] == pytest.approx(0.3)    # low overrides encoder
    assert s[6] == s[13] == s[15] == pytest.approx(0.5)  # strength reaches every layer (authors: never)
    per = np.arange(16) / 16
    np.testing.assert_allclose(reference_scales(per_layer=per), per)  # layer i = value i (no off-by-one)
    with pytest.raises(ValueError, match="16"):
        reference_scales(per_layer=[1.0] * 15)
    # the authors' applied values (appfunc.set_cas_scales + adjust_reference_scale on a fresh model):
    # groups never reach layers 6, 13-15; the accurate sliders are taken from args[5:] (shift by one)
    a = reference_scales(0.5, encoder_scale=0.2, middle_scale=0.4, low_scale=0.6, authors_layer_mapping=True)
    assert a[0] == a[1] == pytest.approx(0.1) and a[3] == a[11] == pytest.approx(0.2) and a[5] == a[8] == pytest.approx(0.3)
    np.testing.assert_array_equal(a[[6, 13, 14, 15]], 1.0)
    b = reference_scales(0.3, per_layer=per, authors_layer_mapping=True)
    np.testing.assert_allclose(b, np.append(per[1:], 1.0).astype(np.float32))  # layer i = slider i+1, no strength


def test_modes_are_independent_flags():
    from cdv2.sample.conditions import Modes, resolve_modes

    assert resolve_modes("full") == Modes(style=True, background=True)
    assert resolve_modes("vanilla", foreground=True) == Modes(foreground=True)
    assert resolve_modes("full", background=False, foreground=True) == Modes(style=True, foreground=True)
    fg = Modes(foreground=True)
    assert fg.split and not fg.lora and Modes(background=True).lora
    with pytest.raises(ValueError, match="mode"):
        resolve_modes("sepia")


def test_foreground_enhance_is_split_attention_over_reference_twice(tiny_params, tiny_config, fixtures):
    """FG enhance: context [e | e], the sketch mask and threshold, no LoRA, no skip injection, no style."""
    from cdv2.sample.conditions import Inputs, Modes, Strengths
    from cdv2.sample.pipeline import Pipeline
    from conftest import nchw_to_nhwc

    pipe = Pipeline(tiny_config)
    inputs = Inputs(sketch=nchw_to_nhwc(fixtures["sketch"]), reference=nchw_to_nhwc(fixtures["reference"]),
                    sketch_mask=nchw_to_nhwc(fixtures["smask_latent"]))
    fg, dbg = pipe.prepare(tiny_params, inputs, Strengths(), mode=Modes(foreground=True), branches=("cond", "uncond_ref"))
    van, _ = pipe.prepare(tiny_params, inputs, Strengths(), mode="vanilla", branches=("cond", "uncond_ref"))
    n = van.context.shape[1]
    np.testing.assert_array_equal(fg.context[:, :n], van.context)
    np.testing.assert_array_equal(fg.context[:, n:], van.context)
    assert fg.mask is not None and fg.hs_bg is None and fg.style is None and not fg.use_lora


def test_host_side_options(colorizer, images):
    """Reference padding, removing the background's characters, removing the result's background."""
    from cdv2.sample.conditions import Modes

    ref = np.asarray(Image.open(images / "ref.png"))
    p = colorizer.prepare_inputs(images / "sketch.png", images / "ref.png", size=(128, 192),
                                 reference_padding_scale=1.5)
    h, w = ref.shape[:2]
    assert p.inputs.reference.shape == (1, h, int(w * 1.5), 3)
    np.testing.assert_array_equal(p.inputs.reference[0, :, 0], 1.0)  # white padding
    bg = np.full((90, 90, 3), 40, np.uint8)
    bg_mask = np.zeros((90, 90), np.float32)
    bg_mask[30:60, 30:60] = 1.0  # a "character" in the background image
    p = colorizer.prepare_inputs(images / "sketch.png", images / "ref.png", mode=Modes(foreground=True),
                                 background=bg, background_mask=bg_mask, size=(128, 192),
                                 remove_foreground_in_background=True)
    got = p.inputs.background[0]
    np.testing.assert_array_equal(got[30:60, 30:60], 1.0)
    np.testing.assert_allclose(got[:30], 40 / 127.5 - 1, rtol=1e-6)
    out = np.full((64, 64, 3), -0.8, np.float32)  # a plain dark background around a figure
    out[16:48, 16:48] = 0.3
    cleaned = colorizer.remove_background(out)
    np.testing.assert_array_equal(cleaned[:8], 1.0)
    np.testing.assert_array_equal(cleaned[20:40, 20:40], out[20:40, 20:40])


def test_compile_cache_setting(tmp_path, monkeypatch):
    import jax

    from cdv2.sample import compile_cache

    old = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("CDV2_COMPILATION_CACHE", "0")
        assert compile_cache.enable(tmp_path) is None
        monkeypatch.setenv("CDV2_COMPILATION_CACHE", "1")
        monkeypatch.setenv("CDV2_COMPILATION_CACHE_DIR", str(tmp_path / "env"))
        assert compile_cache.enable() == tmp_path / "env" and (tmp_path / "env").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
        assert compile_cache.enable(tmp_path / "arg") == tmp_path / "arg"
    finally:
        jax.config.update("jax_compilation_cache_dir", old)


def test_cli_colorize_convert_and_refusals(tmp_path, images, oracle_dir, capsys):
    w = tmp_path / "weights"
    assert cli_main(["convert", "--checkpoint", str(oracle_dir / "tiny_v2.safetensors"), "--clip",
                     str(oracle_dir / "tiny_openclip_visual.safetensors"), "--config", "tiny", "--out", str(w),
                     "--no-progress"]) == 0
    out = tmp_path / "o.png"
    args = ["colorize", "--weights", str(w), "--sketch", str(images / "sketch.png"), "--reference",
            str(images / "ref.png"), "--mode", "vanilla", "--steps", "2", "--long-side", "128", "--out", str(out)]
    assert cli_main(args) == 0 and Image.open(out).size == (128, 96)  # long side 128, aspect kept
    before = out.read_bytes()
    assert cli_main(args) == 1  # never overwrites what a user has
    assert "overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert cli_main(args[:1] + args[3:]) == 2  # no weights: says how to get them
    assert "cdv2 convert" in capsys.readouterr().err
