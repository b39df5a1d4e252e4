"""A tiny synthetic training set in the authors' QuartLoader layout (for tests and smoke runs).

Each triple is a "character" (a few filled ellipses/polygons of random colours) on a plain or
gradient background; the sketch is the character's region boundaries as black lines on white;
the mask is the character silhouette (L mode, 255 = character).

Layouts:
* ``zip`` (the authors'): ``root/{color,sketch,mask}/NNNN.zip``; every member sits under a folder
  named like the zip stem (``0000.zip`` holds ``0000/000123.png``, NOTES 18), and the three
  folders hold the same member names.
* ``folder``: ``root/{color,sketch,mask}/NNNNNN.png`` with matching names.

Everything is a function of ``seed`` (zip entries carry a fixed timestamp, so even the bytes of
the zips repeat).
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = ("color", "sketch", "mask")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Plain or linear-gradient light background, uint8 HWC."""
    a = rng.integers(150, 256, 3).astype(np.float32)
    if rng.random() < 0.5:
        return np.broadcast_to(a, (h, w, 3)).astype(np.uint8)
    b = rng.integers(150, 256, 3).astype(np.float32)
    t = np.linspace(0.0, 1.0, h if rng.random() < 0.5 else w, dtype=np.float32)
    t = t[:, None, None] if len(t) == h else t[None, :, None]
    return np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.uint8)


def make_triple(rng: np.random.Generator, h: int, w: int) -> tuple[Image.Image, ...]:
    """One (color RGB, sketch RGB, mask L) triple of size h x w."""
    color = Image.fromarray(_background(rng, h, w))
    labels = Image.new("L", (w, h), 0)           # region id per pixel, 0 = background
    dc, dl = ImageDraw.Draw(color), ImageDraw.Draw(labels)
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    for k in range(int(rng.integers(2, 6))):
        ry, rx = h * rng.uniform(0.08, 0.25), w * rng.uniform(0.08, 0.25)
        oy, ox = cy + h * rng.uniform(-0.2, 0.2), cx + w * rng.uniform(-0.2, 0.2)
        fill = tuple(int(v) for v in rng.integers(0, 200, 3))
        if rng.random() < 0.5:
            box = [ox - rx, oy - ry, ox + rx, oy + ry]
            dc.ellipse(box, fill=fill)
            dl.ellipse(box, fill=k + 1)
        else:
            ang = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 7))))
            pts = [(ox + rx * np.cos(a), oy + ry * np.sin(a)) for a in ang]
            dc.polygon(pts, fill=fill)
            dl.polygon(pts, fill=k + 1)
    # Lines where the region id changes (FIND_EDGES on the label image), thickened to ~2 px.
    edges = np.asarray(labels.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(3)))
    sketch = np.where(edges > 0, 0, 255).astype(np.uint8)
    mask = np.where(np.asarray(labels) > 0, 255, 0).astype(np.uint8)
    return color, Image.fromarray(np.stack([sketch] * 3, -1)), Image.fromarray(mask, "L")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_synthetic_dataset(
    root: str | Path,
    *,
    num_images: int = 64,
    size: tuple[int, int] = (256, 256),
    num_shards: int = 2,
    seed: int = 0,
    layout: str = "zip",
    aspect_range: tuple[float, float] | None = None,
) -> list[str]:
    """Write the dataset under ``root``; returns the member names (``NNNN/NNNNNN.png`` for zips,
    ``NNNNNN.png`` for folders). ``size`` is (h, w); with ``aspect_range=(lo, hi)`` each image's
    h/w ratio is drawn from it (area kept about h*w) so the buckets see non-square originals."""
    if layout not in ("zip", "folder"):
        raise ValueError(f"layout must be 'zip' or 'folder', got {layout!r}")
    root = Path(root)
    for kind in KINDS:
        (root / kind).mkdir(parents=True, exist_ok=True)
    shards = [[] for _ in range(num_shards)] if layout == "zip" else None
    names = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        h, w = size
        if aspect_range is not None:
            r = rng.uniform(*aspect_range)
            h, w = int(round(np.sqrt(h * w * r))), int(round(np.sqrt(h * w / r)))
        triple = make_triple(rng, h, w)
        if layout == "zip":
            shard = i * num_shards // num_images
            name = f"{shard:04d}/{i:06d}.png"
            shards[shard].append((name, triple))
        else:
            name = f"{i:06d}.png"
            for kind, img in zip(KINDS, triple):
                img.save(root / kind / name)
        names.append(name)
    if layout == "zip":
        for s, members in enumerate(shards):
            for j, kind in enumerate(KINDS):
                with zipfile.ZipFile(root / kind / f"{s:04d}.zip", "w", zipfile.ZIP_STORED) as zf:
                    for name, triple in members:
                        zf.writestr(zipfile.ZipInfo(name, _ZIP_DATE), _png_bytes(triple[j]))
    return names
