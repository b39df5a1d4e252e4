"""Masks (cdv2.sample.masks): user-given masks with clear size errors, the network-free
estimates of the sketch and reference masks, and the authors' latent downscale."""
from collections import deque

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cdv2.sample.masks import (
    estimate_reference_mask, estimate_sketch_mask, latent_mask, load_mask, max_filter,
    place_mask_in_box, reachable_from_border,
)
from cdv2.sample.preprocess import prepare_reference, prepare_sketch
from conftest import nchw_to_nhwc

RNG = np.random.default_rng(1)


# --- load_mask -------------------------------------------------------------------------------------

def test_mask_png_modes(tmp_path):
    g = RNG.integers(0, 256, (30, 20), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "l.png")
    m = load_mask(tmp_path / "l.png", (30, 20), what="sketch mask")
    assert m.shape == (1, 30, 20, 1) and m.dtype == np.float32
    np.testing.assert_allclose(m[0, ..., 0], g / 255.0, atol=1e-7)

    rgb = RNG.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    luma = (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114) / 255.0
    np.testing.assert_allclose(load_mask(tmp_path / "rgb.png", (30, 20), what="m")[0, ..., 0], luma, atol=1e-6)

    # RGBA: a pure alpha mask (uniform colour) uses the alpha; a coloured image uses its luma
    rgba = np.zeros((30, 20, 4), np.uint8)
    rgba[..., 3] = g
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    np.testing.assert_allclose(load_mask(tmp_path / "alpha.png", (30, 20), what="m")[0, ..., 0], g / 255.0, atol=1e-7)
    rgba[..., :3] = rgb
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(load_mask(tmp_path / "rgba.png", (30, 20), what="m")[0, ..., 0], luma, atol=1e-6)

    v16 = RNG.integers(0, 65536, (30, 20)).astype(np.uint16)
    Image.fromarray(v16).save(tmp_path / "m16.png")
    np.testing.assert_allclose(load_mask(tmp_path / "m16.png", (30, 20), what="m")[0, ..., 0], v16 / 65535.0,
                               atol=1e-7)


def test_mask_arrays():
    b = RNG.random((8, 6)) > 0.5
    np.testing.assert_array_equal(load_mask(b, (8, 6), what="m")[0, ..., 0], b.astype(np.float32))
    with pytest.raises(ValueError, match=r"float mask values must be finite and in \[0, 1\]"):
        load_mask(np.full((8, 6), 1.5), (8, 6), what="m")


def test_mask_of_wrong_aspect_names_both_sizes(tmp_path):
    Image.new("L", (200, 300)).save(tmp_path / "m.png")  # 300 high, 200 wide
    with pytest.raises(ValueError, match="sketch mask is 300x200 but the sketch is 512x512"):
        load_mask(tmp_path / "m.png", (512, 512), what="sketch mask")
    with pytest.raises(ValueError, match="reference mask is 300x200 but the reference is 100x100"):
        load_mask(tmp_path / "m.png", (100, 100), what="reference mask")


def test_mask_of_same_aspect_is_resized(tmp_path):
    m = np.zeros((60, 40), np.uint8)
    m[:, 20:] = 255
    Image.fromarray(m).save(tmp_path / "half.png")
    out = load_mask(tmp_path / "half.png", (90, 60), what="sketch mask")  # x1.5
    assert out.shape == (1, 90, 60, 1) and out.min() >= 0.0 and out.max() <= 1.0
    assert np.all(out[0, :, :29, 0] == 0.0) and np.all(out[0, :, 31:, 0] == 1.0)
    assert load_mask(tmp_path / "half.png", (31, 20), what="m").shape == (1, 31, 20, 1)  # 1 px rounding ok


def test_mask_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="sketch mask file .*missing.png"):
        load_mask(tmp_path / "missing.png", (8, 8), what="sketch mask")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="reference mask file .*junk.png.* is not a readable image"):
        load_mask(tmp_path / "junk.png", (8, 8), what="reference mask")


def test_place_mask_in_box():
    m = np.ones((1, 50, 30, 1), np.float32)
    out = place_mask_in_box(m, (0, 26, 128, 76), (128, 128))
    assert out.shape == (1, 128, 128, 1)
    assert out[0, :, 26:102].min() == 1.0 and out[0, :, :26].max() == 0.0 and out[0, :, 102:].max() == 0.0


# --- morphology helpers against independent implementations ----------------------------------------

def test_max_filter_equals_torch_max_pool():
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((23, 31)).astype(np.float32)
    for r in (1, 5):
        ref = torch.nn.functional.max_pool2d(torch.from_numpy(x)[None, None], 2 * r + 1, stride=1, padding=r)
        np.testing.assert_array_equal(max_filter(x, r), ref[0, 0].numpy())
    b = x > 1.5
    np.testing.assert_array_equal(max_filter(b, 2), max_filter(b.astype(np.float32), 2) > 0)


def _bfs_reachable(free):
    h, w = free.shape
    seen = np.zeros_like(free)
    q = deque((i, j) for i in range(h) for j in range(w) if free[i, j] and (i in (0, h - 1) or j in (0, w - 1)))
    for i, j in q:
        seen[i, j] = True
    while q:
        i, j = q.popleft()
        for a, b in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
            if 0 <= a < h and 0 <= b < w and free[a, b] and not seen[a, b]:
                seen[a, b] = True
                q.append((a, b))
    return seen


@pytest.mark.parametrize("density", [0.3, 0.45, 0.55])
def test_flood_fill_equals_bfs(density):
    free = RNG.random((47, 53)) > density  # random mazes around the percolation threshold
    np.testing.assert_array_equal(reachable_from_border(free), _bfs_reachable(free))


# --- sketch mask -----------------------------------------------------------------------------------

def _circle_sketch(size=256, radius=80, width=3, gap_deg=0):
    img = Image.new("RGB", (size, size), "white")
    c = size / 2
    ImageDraw.Draw(img).arc((c - radius, c - radius, c + radius, c + radius), gap_deg / 2, 360 - gap_deg / 2,
                            fill="black", width=width)
    return prepare_sketch(img, (size, size))[0]


def test_circle_outline_becomes_filled_disk():
    x = _circle_sketch()
    R = 80.5  # PIL's arc: outer radius of the stroke ~ radius (+ half a pixel of rasterisation)
    m = estimate_sketch_mask(x, 0)
    assert m.shape == (1, 256, 256, 1) and set(np.unique(m)) <= {0.0, 1.0}
    assert m[0, 128, 128, 0] == 1.0 and m[0, 5, 5, 0] == 0.0
    assert abs(m.sum() / (np.pi * R**2) - 1) < 0.02, m.sum() / (np.pi * R**2)
    for d in (3, 6):  # a square max filter of half-width d grows a disk to pi R^2 + 8 R d + 4 d^2
        md = estimate_sketch_mask(x, d)
        expect = np.pi * R**2 + 8 * R * d + 4 * d * d
        assert abs(md.sum() / expect - 1) < 0.02, (d, md.sum() / expect)
        np.testing.assert_array_equal(md[0, ..., 0], max_filter(m[0, ..., 0], d))


def test_open_outline_needs_gap_closing():
    x = _circle_sketch(gap_deg=4)  # a ~6 px gap in the outline
    lines = (x[0].mean(-1) > 0).sum()
    leaked = estimate_sketch_mask(x, 0)
    assert leaked.sum() == lines  # the fill leaks in: only the strokes remain
    closed = estimate_sketch_mask(x, 0, gap_px=4)
    assert abs(closed.sum() / (np.pi * 80.5**2) - 1) < 0.03
    assert closed[0, 128, 128, 0] == 1.0 and closed[0, 2, 2, 0] == 0.0


def test_outermost_strokes_define_the_region_and_padding_is_background():
    img = Image.new("RGB", (60, 100), "white")  # portrait (100 high): padded left/right in a square
    d = ImageDraw.Draw(img)
    d.rectangle((10, 20, 50, 80), outline="black", width=2)
    d.ellipse((20, 35, 40, 55), outline="black", width=2)  # an inner shape does not cut a hole
    x, box = prepare_sketch(img, (128, 128))
    m = estimate_sketch_mask(x, 0)[0, ..., 0]
    top, left, h, w = box
    assert m[:, :left].max() == 0.0 and m[:, left + w:].max() == 0.0
    assert (top, left, h, w) == (0, 26, 128, 76)
    r = 128 / 100
    assert m[int(23 * r):int(77 * r), left + int(13 * r):left + int(47 * r)].min() == 1.0  # inside the box
    assert m[int(85 * r):, left:left + w].max() == 0.0 and m[:int(15 * r), left:left + w].max() == 0.0


def test_sketch_mask_rejects_wrong_polarity_and_handles_empty():
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((10, 10, 50, 50), outline="black", width=2)
    normal = (np.asarray(img, np.float32) / 127.5 - 1)[None]  # not inverted: background +1
    with pytest.raises(ValueError, match="looks like a black-on-white image"):
        estimate_sketch_mask(normal, 0)
    assert estimate_sketch_mask(-np.ones((1, 64, 64, 3), np.float32), 4).max() == 0.0


# --- reference mask --------------------------------------------------------------------------------

def _character(h=120, w=90):
    """A 'character' on a plain, slightly noisy background, and its true silhouette."""
    bg = np.array([240, 236, 250])
    img = np.clip(bg + RNG.integers(-3, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    sil = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(sil)
    d.ellipse((25, 10, 65, 50), fill=255)       # head
    d.rectangle((20, 45, 70, 119), fill=255)    # body touching the bottom edge
    truth = np.asarray(sil) > 0
    yy, xx = np.mgrid[:h, :w]
    colours = np.stack([(xx * 3) % 200, (yy * 2) % 180 + 20, np.full_like(xx, 90)], -1).astype(np.uint8)
    img[truth] = colours[truth]
    img[70:90, 35:55] = bg  # an enclosed patch of background colour stays foreground
    return img, truth


def test_reference_mask_on_plain_background():
    img, truth = _character()
    m = estimate_reference_mask(img, None, dilate=False)[0, ..., 0]
    iou = (m.astype(bool) & truth).sum() / (m.astype(bool) | truth).sum()
    assert iou > 0.99, iou
    assert m[80, 45] == 1.0  # enclosed background-coloured patch
    md = estimate_reference_mask(img, None)  # the authors' 11x11 dilation by default
    np.testing.assert_array_equal(md[0, ..., 0], max_filter(m, 5))
    x, _ = prepare_reference(img)  # also accepts the [-1, 1] model array
    np.testing.assert_array_equal(estimate_reference_mask(x), md)


def test_reference_mask_from_alpha():
    img, truth = _character()
    alpha = np.where(truth, 255, 0).astype(np.uint8)
    alpha[truth & (np.arange(90) < 30)] = 200  # soft values are kept
    rgb = RNG.integers(0, 256, img.shape, dtype=np.uint8)  # colour is ignored when alpha is usable
    m = estimate_reference_mask(rgb, alpha)
    assert m.shape == (1, 120, 90, 1)
    np.testing.assert_allclose(m[0, ..., 0], max_filter(alpha / 255.0, 5), atol=1e-7)
    # an all-opaque alpha is trivial: fall back to the colour estimate
    np.testing.assert_array_equal(estimate_reference_mask(img, np.full((120, 90), 255, np.uint8)),
                                  estimate_reference_mask(img, None))


def test_reference_mask_errors():
    busy = RNG.integers(0, 256, (50, 50, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="not a plain colour"):
        estimate_reference_mask(busy, None)
    with pytest.raises(ValueError, match="alpha"):
        estimate_reference_mask(busy, np.zeros((10, 10), np.uint8))


# --- latent mask -----------------------------------------------------------------------------------

def test_latent_mask_equals_oracle(fixtures):
    full = nchw_to_nhwc(fixtures["smask_full"])
    out = latent_mask(full, (16, 16))
    err = np.abs(out - nchw_to_nhwc(fixtures["smask_latent"])).max()
    assert err <= 1e-6, err


def test_latent_mask_equals_torch_scaled_resize():
    torch = pytest.importorskip("torch")
    soft = max_filter(RNG.random((64, 96)).astype(np.float32) ** 8, 2)  # soft, non-binary values
    ref = torch.nn.functional.interpolate(torch.from_numpy(soft)[None, None], scale_factor=0.125, mode="bicubic")
    out = latent_mask(soft[None, :, :, None], (8, 12))
    assert np.abs(out[0, ..., 0] - ref[0, 0].numpy()).max() <= 1e-6
    with pytest.raises(ValueError, match="exact multiple"):
        latent_mask(soft[None, :, :, None], (9, 12))
