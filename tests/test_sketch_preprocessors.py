"""The app's sketch preprocessors (`backend/functool.py preprocess_sketch`): "none", "invert",
"invert-webui" (lineart_standard) and "extract", with the antialiased-bicubic fit and -1 padding,
against torch (F.interpolate) and OpenCV (GaussianBlur) references built here."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import rel_err


def _sketch(h=70, w=50, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 255, np.uint8)
    for _ in range(12):  # dark strokes on white, a few grey pixels
        r, c = rng.integers(0, h), rng.integers(0, w)
        img[r:r + rng.integers(1, 4), max(0, c - 15):c + 15] = rng.integers(0, 90)
        img[max(0, r - 10):r + 10, c:c + 2] = rng.integers(0, 90)
    return img


def _torch_fit_pad(s_nhwc: np.ndarray, src_hw, resolution):
    """The app: r from the original size, torchvision tensor resize (bicubic, antialias), pad_image."""
    import torch
    import torch.nn.functional as F

    h, w = src_hw
    th, tw = resolution
    r = min(th / h, tw / w)
    nh, nw = int(h * r), int(w * r)
    t = torch.from_numpy(np.ascontiguousarray(s_nhwc.transpose(0, 3, 1, 2)))
    if tuple(t.shape[-2:]) != (nh, nw):
        t = F.interpolate(t, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    canvas = -torch.ones((1, 3, th, tw))
    left, top = (tw - nw) // 2, (th - nh) // 2
    canvas[:, :, top:top + nh, left:left + nw] = t
    return canvas.numpy().transpose(0, 2, 3, 1), (top, left, nh, nw)


def _torch_to_tensor(rgb):
    import torch

    x = torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float().div(255)
    return ((x - 0.5) / 0.5)[None].numpy().transpose(0, 2, 3, 1)


@pytest.mark.torch
@pytest.mark.parametrize("method", ["none", "invert"])
@pytest.mark.parametrize("resolution", [(96, 64), (64, 96), (70, 50)])
def test_none_and_invert_match_torch(method, resolution):
    from cdv2.sample.line_extract import preprocess_sketch

    img = _sketch()
    sketch, box, white = preprocess_sketch(img, resolution, method=method)
    s = _torch_to_tensor(img) * (-1 if method == "invert" else 1)
    ref, ref_box = _torch_fit_pad(s, img.shape[:2], resolution)
    assert box == ref_box and sketch.shape == (1, *resolution, 3)
    assert rel_err(sketch, ref) <= 1e-5
    np.testing.assert_array_equal(white, -sketch)


class _Stub:
    """Stands in for a line extractor: records its input, returns a fixed function of it."""

    def __init__(self):
        self.seen = None

    def proceed(self, rgb):
        self.seen = np.asarray(rgb)
        x = self.seen.astype(np.float32) / 127.5 - 1
        return np.tanh(3 * x[None, ..., ::-1])      # (1, H, W, 3), any deterministic map


@pytest.mark.torch
def test_extract_resizes_to_512_then_fits():
    from cdv2.sample.line_extract import preprocess_sketch

    img = _sketch(90, 60)
    stub = _Stub()
    sketch, box, _ = preprocess_sketch(img, (128, 96), method="extract", extractor=stub)
    expect_in = np.asarray(Image.fromarray(img).resize((512, 512), Image.BICUBIC))  # PIL path of Resize
    np.testing.assert_array_equal(stub.seen, expect_in)
    ref, ref_box = _torch_fit_pad(_Stub().proceed(expect_in), img.shape[:2], (128, 96))
    assert box == ref_box
    assert rel_err(sketch, ref) <= 1e-5


def _cv2():
    return pytest.importorskip("cv2", reason="OpenCV (opencv-python-headless) is the oracle for the blurs")


@pytest.mark.parametrize("shape", [(61, 47, 3), (512, 512, 3), (33, 80, 1)])
def test_uint8_blur_is_bit_exact(shape):
    cv2 = _cv2()
    from cdv2.sample.gaussian_blur import gaussian_blur

    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    ref = cv2.GaussianBlur(img, (0, 0), 3)
    np.testing.assert_array_equal(gaussian_blur(img, 3.0), ref.reshape(shape))


def test_invert_webui_matches_opencv_app_function():
    cv2 = _cv2()
    from cdv2.sample.line_extract import lineart_standard, preprocess_sketch

    img = _sketch(96, 80, seed=3)
    x = img.astype(np.float32)  # the app's lineart_standard with the real cv2
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    inten = np.min(g - x, axis=2).clip(0, 255)
    inten /= max(16, np.median(inten[inten > 8]))
    inten *= 127
    ref = np.repeat(inten.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2).astype(np.float32) / 255 * 2 - 1
    got = lineart_standard(img)[0]
    # float32 accumulation order may move a value across a uint8 step at a handful of pixels
    assert np.mean(got != ref) < 1e-3 and rel_err(got, ref) <= 1e-4
    sketch, _, _ = preprocess_sketch(img, (96, 80), method="invert-webui")
    np.testing.assert_array_equal(sketch[0], got)          # same size: no resize
