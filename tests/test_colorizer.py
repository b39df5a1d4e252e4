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
    a = colorizer.colorize(images / "sketch.png", images / "ref.png", seed=1, **kw)[0]
    b = colorizer.colorize(images / "sketch.png", images / "ref.png", seed=1, **kw)[0]
    c = colorizer.colorize(images / "sketch.png", images / "ref.png", seed=2, **kw)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    # cropped back to the sketch's aspect inside the 128x192 canvas: 150x200 -> 128x170
    assert a.size == (170, 128)
    full = colorizer.colorize(images / "sketch.png", images / "ref.png", seed=1, crop=False, **kw)[0]
    assert full.size == (192, 128)


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
