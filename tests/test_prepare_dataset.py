"""tools/prepare_dataset.py / cdv2.train.prepare: colour images -> the layout the training pipeline
reads; classical sketches equal the app's network-free line detector, masks from alpha / user
folders / networks, resumable, inputs never written, unreadable images skipped and reported."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdv2.sample.line_extract import lineart_standard
from cdv2.train.data import QuartetSource
from cdv2.train.prepare import PrepareOptions, prepare_dataset
from cdv2.train.synthetic import make_triple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import prepare_dataset as tool  # noqa: E402


def _digest(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def images(tmp_path):
    src = tmp_path / "images"
    (src / "a" / "b").mkdir(parents=True)
    rng = np.random.default_rng(0)
    make_triple(rng, 72, 96)[0].save(src / "a" / "0.png")
    make_triple(rng, 80, 64)[0].save(src / "a" / "b" / "1.jpg", quality=95)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (64, 64, 3))
    yy, xx = np.mgrid[:64, :64]
    rgba[..., 3] = np.where((yy - 32) ** 2 + (xx - 30) ** 2 < 20 ** 2, 255, 0)
    Image.fromarray(rgba, "RGBA").save(src / "2.png")
    (src / "broken.png").write_bytes(b"not an image at all")
    (src / "notes.txt").write_text("ignored")
    return src


def test_prepare_classical_resumable_and_inputs_untouched(images, tmp_path):
    before = _digest(images)
    out = tmp_path / "out"
    log = prepare_dataset(images, out, PrepareOptions(workers=2), progress=False)
    assert _digest(images) == before
    assert (log["records"], log["written"], log["skipped_existing"]) == (4, 3, 0)
    assert len(log["failed"]) == 1 and log["failed"][0][0].endswith("broken.png")
    assert log["sketch_methods"] == {"classical:lineart_standard": 3}
    src = QuartetSource(out)
    assert sorted(src.name(i) for i in range(len(src))) == ["2.png", "a__0.png", "a__b__1.png"]
    for i in range(len(src)):
        rec = src[i]
        assert "error" not in rec, rec
        # the pipeline's sketch normalisation gives back the app's line detector on the colour image
        model_sketch = 1.0 - rec["sketch"].astype(np.float32) / 127.5
        np.testing.assert_allclose(model_sketch, lineart_standard(rec["color"])[0], atol=1 / 127.5 + 1e-6)
        assert rec["mask"].shape == rec["color"].shape[:2]
    alpha = np.asarray(Image.open(images / "2.png"))[..., 3]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "mask" / "2.png")), alpha)
    assert log["mask_methods"]["estimate:alpha"] == 1
    # transparency composited on white in the colour image
    assert (np.asarray(Image.open(out / "color" / "2.png"))[alpha == 0] == 255).all()

    written = _digest(out / "sketch")
    again = prepare_dataset(images, out, PrepareOptions(workers=1), progress=False)
    assert (again["written"], again["skipped_existing"], len(again["failed"])) == (0, 3, 1)
    assert _digest(out / "sketch") == written


def test_user_masks_and_refused_outputs(images, tmp_path):
    masks = tmp_path / "masks"
    (masks / "a").mkdir(parents=True)
    m = (np.arange(36 * 48).reshape(36, 48) % 256).astype(np.uint8)   # half size, same aspect as 72x96
    Image.fromarray(m, "L").save(masks / "a" / "0.png")
    out = tmp_path / "out"
    log = prepare_dataset(images, out, PrepareOptions(masks_dir=str(masks)), progress=False)
    assert log["mask_methods"]["user"] == 1
    got = np.asarray(Image.open(out / "mask" / "a__0.png"))
    assert got.shape == (72, 96)
    expect = np.asarray(Image.fromarray(m.astype(np.float32) / 255, "F").resize((96, 72), Image.BILINEAR))
    np.testing.assert_allclose(got, np.clip(np.round(np.clip(expect, 0, 1) * 255), 0, 255), atol=1)
    for bad in (images / "out", images, masks / "x"):
        with pytest.raises(ValueError, match="overlaps"):
            prepare_dataset(images, bad, PrepareOptions(masks_dir=str(masks)), progress=False)
    (images / "a" / "0.jpg").write_bytes((images / "a" / "0.png").read_bytes())
    with pytest.raises(ValueError, match="would both become record 'a__0'"):
        prepare_dataset(images, tmp_path / "o2", progress=False)


class _StubNets:
    """Preprocessors stand-in: a line extractor that draws one horizontal line, a constant mask."""

    def __init__(self):
        self.calls = []

    def has(self, name):
        return name in ("lineart_keras", "rmbg-v2")

    def extract_lines(self, image, extractor):
        self.calls.append((np.asarray(image).shape, extractor))
        s = -np.ones((1, 512, 512, 3), np.float32)
        s[:, 250:262] = 1.0
        return s

    def mask_fn(self, extractor):
        return lambda rgb: np.full(rgb.shape[:2], 0.25, np.float32)


def test_networks_when_present(images, tmp_path):
    stub = _StubNets()
    out = tmp_path / "out"
    log = prepare_dataset(images, out, PrepareOptions(), preprocessors=stub, progress=False)
    assert log["sketch_methods"] == {"extract:lineart_keras": 3} and log["mask_methods"] == {"network:rmbg-v2": 3}
    assert {c for c in stub.calls} == {((512, 512, 3), "lineart_keras")}   # the app's 512x512 squash
    sk = np.asarray(Image.open(out / "sketch" / "a__0.png"))
    assert sk.shape == (72, 96, 3)
    assert (sk[:30] == 255).all() and (sk[35:37] < 60).all()   # white background, the black line mid-height
    assert (np.asarray(Image.open(out / "mask" / "a__0.png")) == 64).all()
    with pytest.raises(ValueError, match="needs the lineart network"):
        prepare_dataset(images, tmp_path / "o3", PrepareOptions(sketch="extract", extractor="lineart"),
                        preprocessors=stub, progress=False)


def test_tool_reports(images, tmp_path, capsys):
    assert tool.main([str(images), str(tmp_path / "out"), "--workers", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "3 written, 0 already there, 1 failed (of 4 images)" in text and "broken.png" in text
    assert tool.main([str(images), str(images / "o"), "--no-progress"]) == 1
    assert "overlaps the input folder" in capsys.readouterr().err
