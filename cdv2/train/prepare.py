"""A folder of colour images -> the training layout that `cdv2.train.data` reads (folder form):

    OUT/color/<name>.png    the colour image, RGB (transparency composited on white)
    OUT/sketch/<name>.png   black lines on white, RGB, same size
    OUT/mask/<name>.png     the character mask, L (255 = character), same size
    OUT/prepare_log.json    what made each sketch/mask (counts) and the images that failed

`<name>` is the image's path under the input folder without its extension, sub-folders joined
with "__" (the reader lists one folder level); two inputs that would get one name are an error.

Sketches ("sketch" option):
* ``extract``: a line extractor network (`cdv2.sample.line_extract`, from a preprocessor directory
  made by `cdv2 convert --preprocessor`), called as the app calls it: the image squashed to
  `extract_size`² (512, the app's size), `proceed`, then resized back to the image size
  (Pillow bicubic in float mode);
* ``classical``: no network: the app's "invert-webui" line detector (`lineart_standard`, a
  difference of Gaussians normalised by its median strong response) at the image's own size;
* ``auto`` (default): ``extract`` when the directory has the extractor, else ``classical``.

Masks ("mask" option; values are soft, undilated: training thresholds them per sample):
* a user folder (`masks_dir`): the mask with the same relative name (any image extension), read
  with `cdv2.sample.masks.load_mask` rules and resized to the image if needed; images without one
  fall through to the next source;
* ``network``: rmbg-v2 / ISNet from the preprocessor directory (`Preprocessors.mask_fn`);
* ``estimate`` (no network, `cdv2.sample.masks`): the alpha channel when the input has real
  transparency, else the plain-background flood fill (`estimate_reference_mask`); when the
  background is not plain, the region enclosed by the sketch's outermost strokes
  (`estimate_sketch_mask`); when that fails too (a sketch that is mostly lines), everything;
* ``auto`` (default): ``network`` when the directory has it, else ``estimate``.

Resumable: a record counts as written when its sketch exists (written last, each file through a
temporary name and an atomic rename); a rerun skips it. The input folder (and the mask folder) is
only read: an output folder inside it, or containing it, is refused. Unreadable images are skipped,
counted and listed at the end. `workers` threads prepare records in parallel (numpy, Pillow and
the jitted networks release the GIL).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from cdv2.sample import line_extract, masks
from cdv2.sample.preprocess import load_image, resize_float
from cdv2.train.data import IMAGE_EXTENSIONS

SKETCH_METHODS = ("auto", "extract", "classical")
MASK_METHODS = ("auto", "network", "estimate")
LOG_FILE = "prepare_log.json"


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    sketch: str = "auto"
    extractor: str = line_extract.DEFAULT_EXTRACTOR
    extract_size: int = line_extract.EXTRACT_SIZE
    mask: str = "auto"
    mask_extractor: str = "rmbg-v2"
    masks_dir: Optional[str] = None
    max_side: Optional[int] = None     # downscale larger images (longer side), None = keep the size
    workers: int = 4

    def __post_init__(self):
        if self.sketch not in SKETCH_METHODS:
            raise ValueError(f"sketch must be one of {SKETCH_METHODS}, got {self.sketch!r}")
        if self.mask not in MASK_METHODS:
            raise ValueError(f"mask must be one of {MASK_METHODS}, got {self.mask!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_side is not None and self.max_side < 64:
            raise ValueError(f"max_side must be >= 64, got {self.max_side}")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS


def record_name(rel: Path) -> str:
    return "__".join(rel.with_suffix("").parts)


def list_inputs(src: Path) -> dict[str, Path]:
    """{record name: image path} of every image under `src` (recursively); clashing names raise."""
    out: dict[str, Path] = {}
    for p in sorted(src.rglob("*")):
        if not _is_image(p):
            continue
        name = record_name(p.relative_to(src))
        if name in out:
            raise ValueError(f"{out[name]} and {p} would both become record {name!r}: rename one")
        out[name] = p
    if not out:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {src}")
    return out


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_paths(src: Path, out: Path, masks_dir: Optional[Path]) -> None:
    """The inputs are never written: refuse an output that overlaps them."""
    if not src.is_dir():
        raise FileNotFoundError(f"input folder {src} does not exist")
    for what, d in (("input folder", src), ("mask folder", masks_dir)):
        if d is not None and (_inside(out, d) or _inside(d, out)):
            raise ValueError(f"output folder {out} overlaps the {what} {d}: choose a separate output folder "
                             "(inputs are never written)")
    if masks_dir is not None and not masks_dir.is_dir():
        raise FileNotFoundError(f"mask folder {masks_dir} does not exist")


def _save_png(img: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def sketch_to_uint8(s: np.ndarray) -> np.ndarray:
    """Model-polarity sketch (lines ~ +1 on -1, HxWx3) -> stored RGB (black lines on white): the
    pipeline's `1 - x / 127.5` gives the model sketch back."""
    return np.clip(np.round((1.0 - s) * 127.5), 0, 255).astype(np.uint8)


class Preparer:
    """Turns one image into its (color, sketch, mask) triple; `pre` is a `Preprocessors` (or None)."""

    def __init__(self, opts: PrepareOptions, pre=None):
        self.opts, self.pre = opts, pre
        has = (lambda n: pre is not None and pre.has(n))
        if opts.sketch == "extract" and not has(opts.extractor):
            raise ValueError(f"sketch 'extract' needs the {opts.extractor} network: pass a preprocessor directory "
                             f"made by `cdv2 convert --preprocessor {opts.extractor} FILE --out DIR`")
        if opts.mask == "network" and not has(opts.mask_extractor):
            raise ValueError(f"mask 'network' needs the {opts.mask_extractor} network: pass a preprocessor directory "
                             f"made by `cdv2 convert --preprocessor {opts.mask_extractor} FILE --out DIR`")
        self.use_extractor = opts.sketch == "extract" or (opts.sketch == "auto" and has(opts.extractor))
        self.use_mask_net = opts.mask == "network" or (opts.mask == "auto" and has(opts.mask_extractor))
        self._mask_fn = pre.mask_fn(opts.mask_extractor) if self.use_mask_net else None

    def sketch(self, rgb: np.ndarray) -> tuple[np.ndarray, str]:
        """-> (model-polarity sketch HxWx3, method)."""
        h, w = rgb.shape[:2]
        if self.use_extractor:
            size = self.opts.extract_size
            small = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
            s = np.asarray(self.pre.extract_lines(small, self.opts.extractor), np.float32)[0]
            return (resize_float(s, (h, w)) if s.shape[:2] != (h, w) else s), f"extract:{self.opts.extractor}"
        return line_extract.lineart_standard(rgb)[0], "classical:lineart_standard"

    def mask(self, rel: Path, rgb, alpha, sketch) -> tuple[np.ndarray, str]:
        """-> (mask HxW float in [0, 1], method); `rel` is the image's path under the input folder."""
        h, w = rgb.shape[:2]
        user = self._user_mask(rel, (h, w))
        if user is not None:
            return user, "user"
        if self._mask_fn is not None:
            return np.asarray(self._mask_fn(rgb), np.float32), f"network:{self.opts.mask_extractor}"
        try:
            m = masks.estimate_reference_mask(rgb, alpha, dilate=False)[0, ..., 0]
            real_alpha = alpha is not None and alpha.min() < 128 <= alpha.max()
            return m, "estimate:alpha" if real_alpha else "estimate:plain_background"
        except ValueError:
            pass
        try:
            return masks.estimate_sketch_mask(sketch[None], 0)[0, ..., 0], "estimate:sketch_outline"
        except ValueError:
            return np.ones((h, w), np.float32), "estimate:everything"

    def _user_mask(self, rel: Path, hw) -> Optional[np.ndarray]:
        if self.opts.masks_dir is None:
            return None
        base = Path(self.opts.masks_dir) / rel.with_suffix("")
        for p in sorted(base.parent.glob(glob.escape(base.name) + ".*")):
            if _is_image(p):
                m = masks.load_mask(p, hw, what=f"{rel} mask", against="colour image")
                return np.asarray(m, np.float32)[0, ..., 0]
        return None

    def __call__(self, name: str, path: Path, rel: Path, out: Path) -> dict[str, Any]:
        rgb, alpha = load_image(path, what="colour image", matte=(255, 255, 255))
        if self.opts.max_side and max(rgb.shape[:2]) > self.opts.max_side:
            h, w = rgb.shape[:2]
            r = self.opts.max_side / max(h, w)
            size = (max(1, round(w * r)), max(1, round(h * r)))
            rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))
            alpha = None if alpha is None else np.asarray(Image.fromarray(alpha).resize(size, Image.BICUBIC))
        sketch, how_sketch = self.sketch(rgb)
        mask, how_mask = self.mask(rel, rgb, alpha, sketch)
        _save_png(Image.fromarray(rgb), out / "color" / f"{name}.png")
        _save_png(Image.fromarray(np.clip(np.round(mask * 255), 0, 255).astype(np.uint8), "L"),
                  out / "mask" / f"{name}.png")
        _save_png(Image.fromarray(sketch_to_uint8(sketch)), out / "sketch" / f"{name}.png")  # last: "done"
        return {"sketch": how_sketch, "mask": how_mask}


def _done(out: Path, name: str) -> bool:
    return all((out / k / f"{name}.png").is_file() for k in ("sketch", "color", "mask"))


def prepare_dataset(src, out, opts: PrepareOptions = PrepareOptions(), *, preprocessors=None,
                    progress: bool = True) -> dict[str, Any]:
    """Prepare every image under `src` into `out` (see the module doc). `preprocessors`: a
    `cdv2.sample.preprocessors.Preprocessors` (None: no networks). -> the log written to
    OUT/prepare_log.json: counts of written / skipped (already there) / failed records, the
    methods used, and the failures (name, error)."""
    from tqdm import tqdm

    src, out = Path(src).resolve(), Path(out).resolve()
    masks_dir = Path(opts.masks_dir).resolve() if opts.masks_dir else None
    check_paths(src, out, masks_dir)
    inputs = list_inputs(src)
    preparer = Preparer(opts, preprocessors)
    for k in ("color", "sketch", "mask"):
        (out / k).mkdir(parents=True, exist_ok=True)
    todo = [(n, p) for n, p in inputs.items() if not _done(out, n)]
    log: dict[str, Any] = {"input": str(src), "records": len(inputs), "written": 0,
                           "skipped_existing": len(inputs) - len(todo), "failed": [],
                           "sketch_methods": Counter(), "mask_methods": Counter()}

    def one(item):
        name, path = item
        try:
            return name, preparer(name, path, path.relative_to(src), out), None
        except Exception as e:  # noqa: BLE001 -- one bad image never stops the run
            return name, None, f"{type(e).__name__}: {e}"

    bar = tqdm(total=len(inputs), initial=len(inputs) - len(todo), desc="prepare", unit="img", disable=not progress)
    with ThreadPoolExecutor(opts.workers) as pool:
        for name, how, err in pool.map(one, todo):
            if err is None:
                log["written"] += 1
                log["sketch_methods"][how["sketch"]] += 1
                log["mask_methods"][how["mask"]] += 1
            else:
                log["failed"].append([str(inputs[name]), err])
            bar.update(1)
    bar.close()
    log["sketch_methods"], log["mask_methods"] = dict(log["sketch_methods"]), dict(log["mask_methods"])
    (out / LOG_FILE).write_text(json.dumps(log, indent=1))
    return log


def summary(log: dict) -> str:
    lines = [f"{log['written']} written, {log['skipped_existing']} already there, {len(log['failed'])} failed "
             f"(of {log['records']} images)"]
    if log["sketch_methods"]:
        lines.append("sketches: " + ", ".join(f"{k} {v}" for k, v in sorted(log["sketch_methods"].items())))
        lines.append("masks: " + ", ".join(f"{k} {v}" for k, v in sorted(log["mask_methods"].items())))
    for path, err in log["failed"][:10]:
        lines.append(f"  skipped {path}: {err}")
    if len(log["failed"]) > 10:
        lines.append(f"  ... and {len(log['failed']) - 10} more (see {LOG_FILE})")
    return "\n".join(lines)
