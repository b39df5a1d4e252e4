"""Input/output image handling (cdv2.sample.preprocess): every bad input gives a clear error or a
documented coercion; sketch polarity and the authors' fit+pad geometry; generation sizes."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from cdv2.sample.preprocess import (
    choose_generation_size, crop_to_box, detect_sketch_polarity, load_image, prepare_background,
    prepare_reference, prepare_sketch, resize_float, to_pil, to_uint8,
)

RNG = np.random.default_rng(0)


def _rand_rgb(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _drawing(h, w, black_on_white=True):
    """A little line drawing: an ellipse outline and a diagonal stroke."""
    bg, ink = (255, 0) if black_on_white else (0, 255)
    img = Image.new("L", (w, h), bg)
    d = ImageDraw.Draw(img)
    d.ellipse((w * 0.2, h * 0.2, w * 0.8, h * 0.8), outline=ink, width=3)
    d.line((w * 0.3, h * 0.7, w * 0.7, h * 0.3), fill=ink, width=2)
    return img.convert("RGB")


# --- load_image: errors ----------------------------------------------------------------------------

def test_missing_file_names_what_and_path(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match=r"reference file .*nope\.png.* does not exist"):
        load_image(p, what="reference")
    with pytest.raises(FileNotFoundError, match="sketch file .* is a directory"):
        load_image(tmp_path, what="sketch")


def test_corrupt_and_truncated_files_are_value_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(ValueError, match=r"sketch file .*bad\.png.* is not a readable image"):
        load_image(bad, what="sketch")
    good = tmp_path / "good.png"
    Image.fromarray(_rand_rgb(64, 64)).save(good)
    cut = tmp_path / "truncated.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"background file .*truncated\.png.* is not a readable image"):
        load_image(cut, what="background")


def test_bad_arrays_and_types():
    with pytest.raises(ValueError, match=r"float pixels must be finite and in \[0, 1\]"):
        load_image(np.full((4, 4, 3), -0.5, np.float32), what="sketch")
    with pytest.raises(ValueError, match="expected an HxW"):
        load_image(np.zeros((4, 4, 5), np.uint8), what="sketch")
    with pytest.raises(ValueError, match="0..65535"):
        load_image(np.full((4, 4), 70000, np.int32), what="sketch")
    with pytest.raises(TypeError, match="expected a path"):
        load_image(12, what="sketch")


# --- load_image: coercions -------------------------------------------------------------------------

def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    g = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    rgb, alpha = load_image(tmp_path / "g.png", what="sketch")
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8 and alpha is None
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], g)
    rgb1, _ = load_image(Image.fromarray(g > 127), what="sketch")  # mode '1'
    np.testing.assert_array_equal(rgb1[..., 0], np.where(g > 127, 255, 0))


def test_rgba_png_keeps_alpha_and_matte_composites(tmp_path):
    rgba = np.concatenate([_rand_rgb(16, 24), RNG.integers(0, 256, (16, 24, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    rgb, alpha = load_image(tmp_path / "a.png", what="reference")
    np.testing.assert_array_equal(rgb, rgba[..., :3])
    np.testing.assert_array_equal(alpha, rgba[..., 3])
    flat, alpha2 = load_image(tmp_path / "a.png", what="reference", matte=(255, 255, 255))
    a = rgba[..., 3:].astype(np.float64) / 255
    np.testing.assert_array_equal(flat, np.round(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8))
    np.testing.assert_array_equal(alpha2, rgba[..., 3])
    la = np.stack([rgba[..., 0], rgba[..., 3]], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    rgb, alpha = load_image(tmp_path / "la.png", what="reference")
    np.testing.assert_array_equal(rgb[..., 2], la[..., 0])
    np.testing.assert_array_equal(alpha, la[..., 1])


def test_16bit_png_is_scaled_by_1_over_257(tmp_path):
    v = np.array([[0, 257, 257 * 100, 65535], [128, 129, 40000, 65000]], np.uint16)
    Image.fromarray(v).save(tmp_path / "d16.png")
    with Image.open(tmp_path / "d16.png") as im:
        assert im.mode == "I;16"
    rgb, alpha = load_image(tmp_path / "d16.png", what="sketch")
    assert alpha is None
    np.testing.assert_array_equal(rgb[..., 1], np.round(v / 257.0).astype(np.uint8))
    assert rgb[0, :, 0].tolist() == [0, 1, 100, 255]
    # 32-bit 'I' images in the 16-bit range read the same; outside it they are refused
    rgb_i, _ = load_image(Image.fromarray(v.astype(np.int32)), what="sketch")
    np.testing.assert_array_equal(rgb_i, rgb)
    with pytest.raises(ValueError, match="only 0..65535"):
        load_image(Image.fromarray(np.full((3, 3), 100000, np.int32)), what="sketch")


def test_palette_png_with_and_without_transparency(tmp_path):
    idx = RNG.integers(0, 4, (10, 12), dtype=np.uint8)
    pal = [255, 0, 0, 0, 255, 0, 0, 0, 255, 250, 250, 250]
    p = Image.fromarray(idx, "P")
    p.putpalette(pal + [0] * (768 - len(pal)))
    p.save(tmp_path / "p.png")
    rgb, alpha = load_image(tmp_path / "p.png", what="reference")
    np.testing.assert_array_equal(rgb, np.array(pal, np.uint8).reshape(4, 3)[idx])
    assert alpha is None
    p.save(tmp_path / "pt.png", transparency=3)
    rgb, alpha = load_image(tmp_path / "pt.png", what="reference")
    np.testing.assert_array_equal(alpha, np.where(idx == 3, 0, 255))


def test_cmyk_and_exif_rotation(tmp_path):
    cmyk = Image.new("CMYK", (5, 4), (0, 255, 0, 0))  # magenta
    rgb, _ = load_image(cmyk, what="reference")
    assert rgb.shape == (4, 5, 3) and rgb[0, 0].tolist() == [255, 0, 255]
    img = Image.fromarray(_rand_rgb(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif)
    rgb, _ = load_image(tmp_path / "rot.jpg", what="reference")
    assert rgb.shape == (40, 20, 3)


def test_array_inputs():
    u16 = np.full((3, 4), 65535, np.uint16)
    assert (load_image(u16, what="x")[0] == 255).all()
    f = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(load_image(f, what="x")[0][..., 0], np.round(f * 255).astype(np.uint8))
    rgba = np.concatenate([_rand_rgb(3, 4), np.full((3, 4, 1), 7, np.uint8)], -1)
    rgb, alpha = load_image(rgba[None], what="x")
    np.testing.assert_array_equal(rgb, rgba[..., :3])
    assert (alpha == 7).all()


# --- sketch ----------------------------------------------------------------------------------------

def test_sketch_polarity_formulas():
    v = _rand_rgb(32, 48)
    x, box = prepare_sketch(v, (32, 48), polarity="black_on_white")
    assert x.shape == (1, 32, 48, 3) and x.dtype == np.float32 and box == (0, 0, 32, 48)
    np.testing.assert_allclose(x[0], -(2.0 * v / 255.0 - 1.0), atol=1e-6)  # the authors' "invert"
    x, _ = prepare_sketch(v, (32, 48), polarity="white_on_black")
    np.testing.assert_allclose(x[0], 2.0 * v / 255.0 - 1.0, atol=1e-6)  # the authors' "none"
    with pytest.raises(ValueError, match="polarity must be"):
        prepare_sketch(v, (32, 48), polarity="inverted")


@pytest.mark.parametrize("black_on_white", [True, False])
def test_auto_polarity_gives_bright_lines_on_minus_one(black_on_white):
    img = _drawing(96, 80, black_on_white)
    expected = "black_on_white" if black_on_white else "white_on_black"
    assert detect_sketch_polarity(np.asarray(img)) == expected
    x, _ = prepare_sketch(img, (96, 80), polarity="auto")
    ref, _ = prepare_sketch(img, (96, 80), polarity=expected)
    np.testing.assert_array_equal(x, ref)
    ink = np.asarray(img)[..., 0] == (0 if black_on_white else 255)
    assert np.all(x[0][ink] == 1.0) and np.all(x[0][~ink] == -1.0)


def test_auto_polarity_with_a_grey_frame_uses_the_whole_image():
    img = np.asarray(_drawing(100, 100, True)).copy()
    img[:3], img[-3:], img[:, :3], img[:, -3:] = 128, 128, 128, 128  # mid-grey border
    assert detect_sketch_polarity(img) == "black_on_white"


def test_transparent_sketch_reads_transparency_as_background():
    lines = np.zeros((40, 40, 4), np.uint8)  # black RGB everywhere, opaque only on the lines
    lines[20, 5:35, 3] = 255
    x, _ = prepare_sketch(Image.fromarray(lines, "RGBA"), (40, 40))
    assert np.all(x[0, 20, 5:35] == 1.0)
    assert (x[0] == -1.0).sum() == 40 * 40 * 3 - 30 * 3


@pytest.mark.parametrize("src_hw,target_hw", [((100, 60), (128, 128)), ((300, 200), (128, 192)),
                                              ((90, 250), (128, 128)), ((64, 64), (128, 128))])
def test_fit_pad_geometry_and_torch_antialias_resize(src_hw, target_hw):
    torch = pytest.importorskip("torch")
    h, w = src_hw
    v = _rand_rgb(h, w)
    x, box = prepare_sketch(v, target_hw, polarity="black_on_white")
    r = min(target_hw[0] / h, target_hw[1] / w)
    nh, nw = int(h * r), int(w * r)
    top, left = (target_hw[0] - nh) // 2, (target_hw[1] - nw) // 2
    assert box == (top, left, nh, nw) and x.shape == (1, *target_hw, 3)
    pad = np.ones(target_hw, bool)
    pad[top:top + nh, left:left + nw] = False
    assert np.all(x[0][pad] == -1.0)  # the padding is exactly -1
    inner = crop_to_box(x, box)
    assert inner.shape == (1, nh, nw, 3)
    # the content equals the authors' resize: torchvision Resize on a float tensor =
    # F.interpolate(bicubic, antialias=True) of the already-inverted sketch
    t = -(torch.from_numpy(v).permute(2, 0, 1)[None].float() / 255.0 * 2 - 1)
    ref = torch.nn.functional.interpolate(t, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    err = np.abs(inner[0] - ref[0].permute(1, 2, 0).numpy()).max()
    assert err <= 1e-4, err


def test_resize_float_does_not_clip():
    x = np.zeros((20, 20, 1), np.float32)
    x[:, 10:] = 1.0
    y = resize_float(x, (40, 40))  # bicubic overshoots next to the edge
    assert y.max() > 1.0 and y.min() < 0.0


# --- generation size -------------------------------------------------------------------------------

def test_choose_generation_size_invariants():
    sizes = [(64, 64), (512, 512), (1024, 700), (700, 1024), (768, 200), (3000, 4000), (65, 4000)]
    sizes += [tuple(int(v) for v in RNG.integers(64, 4000, 2)) for _ in range(300)]
    for h, w in sizes:
        H, W = choose_generation_size((h, w))
        assert H % 64 == 0 and W % 64 == 0, (h, w, H, W)
        assert max(H, W) == 768 and min(H, W) >= 256
        assert (H >= W) == (h >= w) or H == W
        s_exact = 768 * min(h, w) / max(h, w)
        if s_exact >= 256:
            assert abs(min(H, W) - s_exact) <= 32, (h, w, H, W)
    assert choose_generation_size((900, 1200), target_long_side=1024) == (768, 1024)
    assert choose_generation_size((100, 100), target_long_side=128, min_side=64) == (128, 128)


def test_choose_generation_size_rejects_tiny_sketches():
    with pytest.raises(ValueError, match=r"sketch is 40x300 px \(height x width\); at least 64 px per side"):
        choose_generation_size((40, 300))
    with pytest.raises(ValueError, match="multiple of 8"):
        choose_generation_size((512, 512), multiple=60)


# --- reference and output --------------------------------------------------------------------------

def test_reference_at_own_resolution_and_round_trip(tmp_path):
    v = _rand_rgb(37, 53)
    Image.fromarray(v).save(tmp_path / "ref.png")
    x, hw = prepare_reference(tmp_path / "ref.png")
    assert x.shape == (1, 37, 53, 3) and hw == (37, 53)
    np.testing.assert_allclose(x[0], 2.0 * v / 255.0 - 1.0, atol=1e-6)
    (back,) = to_pil(x)
    np.testing.assert_array_equal(np.asarray(back), v)  # [-1, 1] -> uint8 is exact
    bg, bhw = prepare_background(Image.fromarray(v))
    np.testing.assert_array_equal(bg, x)
    padded, phw = prepare_reference(v, pad_scale=1.5)
    assert phw == (37, 79)
    left = (79 - 53) // 2
    np.testing.assert_array_equal(padded[0, :, left:left + 53], x[0])
    assert np.all(padded[0, :, :left] == 1.0) and np.all(padded[0, :, left + 53:] == 1.0)


def test_reference_rgba_is_composited_on_white_by_default():
    rgba = np.zeros((4, 4, 4), np.uint8)  # transparent black
    rgba[0, 0] = (10, 20, 30, 255)
    x, _ = prepare_reference(rgba)
    assert np.all(x[0, 1:] == 1.0) and np.allclose(x[0, 0, 0], np.array([10, 20, 30]) / 127.5 - 1)
    raw, _ = prepare_reference(rgba, matte=None)  # the authors' UI: alpha dropped
    assert np.all(raw[0, 1:] == -1.0)


def test_to_uint8_clips_and_rounds():
    x = np.array([-3.0, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0], np.float32)
    assert to_uint8(x).tolist() == [0, 0, 64, 128, 255, 255, 255]
    ims = to_pil(np.zeros((2, 5, 6, 3), np.float32))
    assert len(ims) == 2 and ims[0].size == (6, 5) and ims[0].mode == "RGB"
    assert to_pil(np.zeros((1, 5, 6, 1), np.float32))[0].mode == "L"
    with pytest.raises(ValueError, match="NHWC"):
        to_pil(np.zeros((1, 3, 5, 6), np.float32))


def test_crop_to_box_recovers_the_sketch_content():
    img = _drawing(120, 80, True)
    x, box = prepare_sketch(img, (128, 128))
    r = min(128 / 120, 128 / 80)
    expect = -resize_float(np.asarray(img, np.float32) * (2 / 255) - 1, (int(120 * r), int(80 * r)))
    np.testing.assert_array_equal(crop_to_box(x, box)[0], expect)
    (pil,) = to_pil(x)
    cropped = crop_to_box(pil, box)
    assert cropped.size == (box[3], box[2])
    np.testing.assert_array_equal(np.asarray(cropped), to_uint8(expect))
    assert crop_to_box([pil, pil], box)[1].size == cropped.size
    with pytest.raises(ValueError, match="does not fit"):
        crop_to_box(x, (10, 10, 128, 128))
