"""A synthetic dataset in the authors' QuartLoader layout, rich enough that colour transfer from a
reference is learnable and measurable (training of the built-in demo model, tests, evaluation).

A "character" is 2-4 parts; each part has its own kind (ellipse, rectangle, triangle, diamond,
hexagon: distinct within a character, so the kind names the part) and its own saturated colour
(hues at least 40 degrees apart), on a light plain or gradient background. The colours are random
per character, so nothing but the reference says which colour a part has. The sketch is the
region boundaries (black lines on white), the mask the character silhouette (L, 255 = character).

A *scene* is the character's identity (kinds, colours, background); a *layout* is where the parts
sit (position, size, rotation). `make_pair` draws one scene in two layouts: the target (sketch +
ground truth) and a reference showing the same parts and colours elsewhere, as a user's reference
would (held-out demo and evaluation data). Training triples (`make_triple`) use one layout: the
training pipeline takes the reference from the colour image itself, as the authors' trainer does.

Layouts:
* ``zip`` (the authors'): ``root/{color,sketch,mask}/NNNN.zip``; every member sits under a folder
  named like the zip stem (``0000.zip`` holds ``0000/000123.png``, NOTES 18), and the three
  folders hold the same member names.
* ``folder``: ``root/{color,sketch,mask}/NNNNNN.png`` with matching names.

Everything is a function of ``seed`` (zip entries carry a fixed timestamp, so even the bytes of
the zips repeat).
"""
from __future__ import annotations

import colorsys
import dataclasses
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = ("color", "sketch", "mask")
PART_KINDS = ("ellipse", "rectangle", "triangle", "diamond", "hexagon")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_MIN_HUE_GAP = 40.0 / 360.0


@dataclasses.dataclass(frozen=True)
class Scene:
    """What a character is (layout-independent): part kinds, part colours, background."""

    kinds: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]     # RGB uint8 per part
    bg: tuple[tuple[int, int, int], tuple[int, int, int]]  # gradient end colours (equal: plain)
    bg_vertical: bool


def _hsv_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def draw_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(2, 5))
    kinds = tuple(str(k) for k in rng.choice(PART_KINDS, n, replace=False))
    hues: list[float] = []
    while len(hues) < n:
        h = float(rng.random())
        if all(min(abs(h - g), 1 - abs(h - g)) >= _MIN_HUE_GAP for g in hues):
            hues.append(h)
    colors = tuple(_hsv_rgb(h, rng.uniform(0.65, 1.0), rng.uniform(0.55, 0.95)) for h in hues)
    bh = float(rng.random())
    a = _hsv_rgb(bh, rng.uniform(0.05, 0.3), rng.uniform(0.85, 1.0))
    b = a if rng.random() < 0.5 else _hsv_rgb(bh + rng.uniform(-0.1, 0.1), rng.uniform(0.05, 0.3),
                                               rng.uniform(0.85, 1.0))
    return Scene(kinds, colors, (a, b), bool(rng.random() < 0.5))


def _background(scene: Scene, h: int, w: int) -> np.ndarray:
    a, b = (np.asarray(c, np.float32) for c in scene.bg)
    t = np.linspace(0.0, 1.0, h if scene.bg_vertical else w, dtype=np.float32)
    t = t[:, None, None] if scene.bg_vertical else t[None, :, None]
    return np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).round().astype(np.uint8)


def _part_outline(kind: str, cx: float, cy: float, rx: float, ry: float, rot: float):
    """A polygon (list of (x, y)) or, for ellipses, the bounding box."""
    if kind == "ellipse":
        return [cx - rx, cy - ry, cx + rx, cy + ry]
    corners = {"rectangle": [0.25, 0.75, 1.25, 1.75], "triangle": [0.25, 0.25 + 2 / 3, 0.25 + 4 / 3],
               "diamond": [0.0, 0.5, 1.0, 1.5], "hexagon": [i / 3 for i in range(6)]}[kind]
    return [(cx + rx * np.cos(np.pi * a + rot), cy + ry * np.sin(np.pi * a + rot)) for a in corners]


def render(scene: Scene, rng: np.random.Generator, h: int, w: int):
    """Draw `scene` in a random layout -> (color RGB, sketch RGB, mask L, part labels (h, w) uint8:
    0 background, i + 1 = part i, as visible after occlusion)."""
    color = Image.fromarray(_background(scene, h, w))
    labels = Image.new("L", (w, h), 0)
    dc, dl = ImageDraw.Draw(color), ImageDraw.Draw(labels)
    s = min(h, w)
    # parts spread around a character centre; drawn in a random order (which part occludes which)
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    for i in rng.permutation(len(scene.kinds)):
        ry, rx = s * rng.uniform(0.12, 0.24), s * rng.uniform(0.12, 0.24)
        oy = float(np.clip(cy + s * rng.uniform(-0.25, 0.25), ry, h - ry))
        ox = float(np.clip(cx + s * rng.uniform(-0.25, 0.25), rx, w - rx))
        outline = _part_outline(scene.kinds[i], ox, oy, rx, ry, rng.uniform(0, 2 * np.pi))
        draw_c, draw_l = ((dc.ellipse, dl.ellipse) if scene.kinds[i] == "ellipse" else (dc.polygon, dl.polygon))
        draw_c(outline, fill=scene.colors[i])
        draw_l(outline, fill=int(i) + 1)
    lab = np.asarray(labels)
    # lines where the region id changes, thickened to ~2 px
    edges = np.asarray(labels.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(3)))
    sketch = np.where(edges > 0, 0, 255).astype(np.uint8)
    mask = np.where(lab > 0, 255, 0).astype(np.uint8)
    return color, Image.fromarray(np.stack([sketch] * 3, -1)), Image.fromarray(mask, "L"), lab


def make_triple(rng: np.random.Generator, h: int, w: int) -> tuple[Image.Image, ...]:
    """One training (color RGB, sketch RGB, mask L) triple of size h x w."""
    return render(draw_scene(rng), rng, h, w)[:3]


@dataclasses.dataclass
class Pair:
    """One scene in two layouts: the target (sketch, ground truth, mask, part labels) and a
    reference of the same parts and colours elsewhere (plus its mask and labels)."""

    scene: Scene
    sketch: Image.Image
    target: Image.Image
    mask: Image.Image
    labels: np.ndarray
    reference: Image.Image
    reference_mask: Image.Image
    reference_labels: np.ndarray


def make_pair(rng: np.random.Generator, h: int, w: int, scene: Scene | None = None) -> Pair:
    scene = draw_scene(rng) if scene is None else scene
    target, sketch, mask, labels = render(scene, rng, h, w)
    reference, _, rmask, rlabels = render(scene, rng, h, w)
    return Pair(scene, sketch, target, mask, labels, reference, rmask, rlabels)


def held_out_pairs(n: int, size: int, seed: int = 0) -> list[Pair]:
    """`n` pairs from a seed stream disjoint from the training sets' (`[seed, i]` there)."""
    return [make_pair(np.random.default_rng([seed, 10 ** 6 + i]), size, size) for i in range(n)]


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
