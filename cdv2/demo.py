"""`cdv2 demo` (and `cdv2 colorize` with no arguments): the system working, without downloads.

The built-in model (`cdv2/demo_weights`, fp16; the tiny architecture of configs/demo.yaml trained
with `python -m cdv2.train` on the synthetic shapes of `cdv2.train.synthetic`, recipe
tools/train_demo_model.sh) colorizes held-out synthetic sketches after references that show the
same parts and colours in another layout, and again after another sample's reference. The grid
(`OUT/samples.png`) has one row per sketch:

    sketch | reference | output | ground truth | other reference | output with the other reference

so the colours visibly follow the reference. `OUT/colour_check.json` measures it: per part, the
distance of the output's mean colour to the part's colour in the reference used vs in the other.
Compiled programs are cached under ~/.cache/cdv2/xla ($CDV2_COMPILATION_CACHE=0 turns it off): a second run
skips compilation. `cdv2 demo --train` trains a model from scratch instead (cdv2/demo_train.py).
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

from cdv2.sample.compile_cache import enable as enable_compilation_cache  # noqa: F401 (re-exported)

DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo_weights"
DEMO_SIZE = 64
COLUMNS = ("sketch", "reference", "output", "ground truth", "other reference", "output (other ref.)")


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


class heartbeat:
    """Context manager: prints `msg... N s` every `every` seconds while a long silent step (XLA
    compilation, weight loading) runs, so the demo is never quiet for long."""

    def __init__(self, msg: str, every: float = 5.0):
        self.msg, self.every = msg, every
        self._stop = threading.Event()

    def __enter__(self):
        self.t0 = time.perf_counter()
        _log(f"{self.msg}...")

        def beat():
            while not self._stop.wait(self.every):
                _log(f"  {self.msg}... {time.perf_counter() - self.t0:.0f} s")

        self._thread = threading.Thread(target=beat, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Silence it early (the step it announced is over, others report their own progress)."""
        self._stop.set()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.t0
        return False


def run_demo(args):
    """The built-in demo for parsed `cdv2 demo` arguments (cdv2/cli/demo.py); -> its result dict."""
    return run_builtin_demo(args.out, weights=args.weights, num=args.num, steps=args.steps,
                            reference_guidance=args.reference_guidance, seed=args.seed)


def load_demo_colorizer(weights=None):
    """The built-in model (fp16 on disk, fp32 in memory) as a Colorizer."""
    from cdv2.sample.colorizer import Colorizer

    path = Path(weights) if weights else DEMO_WEIGHTS
    if not (path / "params.safetensors").is_file():
        raise FileNotFoundError(f"no demo weights at {path} (params.safetensors missing); "
                                "tools/train_demo_model.sh trains them")
    return Colorizer.from_pretrained(path)


def colorize_pairs(col, pairs, references, *, steps=20, reference_guidance=2.0, seed=0, on_image=None):
    """Colorize each pair's sketch after references[i] (PIL images) -> list of uint8 HxWx3."""
    out = []
    for i, (pair, ref) in enumerate(zip(pairs, references)):
        img = col.colorize(pair.sketch, ref, mode="vanilla", steps=steps, size=pair.labels.shape,
                           reference_guidance=reference_guidance, sketch_polarity="black_on_white", seed=seed + i)[0]
        out.append(np.asarray(img.convert("RGB")))
        if on_image is not None:
            on_image(i)
    return out


def part_colour_errors(output: np.ndarray, labels: np.ndarray, colours, erode: int = 2) -> list[float]:
    """Per part: distance (RGB, 0..1 per channel, Euclidean) between the output's mean colour inside
    the part (eroded by `erode` px, away from the lines) and `colours[part]` (RGB uint8)."""
    from PIL import Image, ImageFilter

    errs = []
    for k, colour in enumerate(colours):
        region = Image.fromarray(np.where(labels == k + 1, 255, 0).astype(np.uint8))
        if erode:
            region = region.filter(ImageFilter.MinFilter(2 * erode + 1))
        m = np.asarray(region) > 0
        if m.sum() < 4:
            continue
        mean = output[m].astype(np.float64).mean(0) / 255.0
        errs.append(float(np.linalg.norm(mean - np.asarray(colour, np.float64) / 255.0)))
    return errs


def colour_check(pairs, own_outputs, swapped_outputs, swapped_index) -> dict:
    """How much the colours follow the reference. For output o of sketch i after reference r:
    `own` = mean part-colour error against r's part colours, `other` = against the colours of the
    reference it was not given. Transfer works when own < other for both the own and swapped runs."""
    def err(out, i, j):  # output of sketch i's parts against scene j's part colours
        n = min(len(pairs[i].scene.colors), len(pairs[j].scene.colors))
        return float(np.mean(part_colour_errors(out, pairs[i].labels, pairs[j].scene.colors[:n])))

    rows = []
    for i, (o, s) in enumerate(zip(own_outputs, swapped_outputs)):
        j = swapped_index[i]
        rows.append({"own_ref_vs_own_colours": err(o, i, i), "own_ref_vs_other_colours": err(o, i, j),
                     "other_ref_vs_other_colours": err(s, i, j), "other_ref_vs_own_colours": err(s, i, i)})
    summary = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    follows = [r["own_ref_vs_own_colours"] < r["own_ref_vs_other_colours"]
               and r["other_ref_vs_other_colours"] < r["other_ref_vs_own_colours"] for r in rows]
    return {"per_sample": rows, "mean": summary, "fraction_following_reference": float(np.mean(follows))}


def _upscale(img: np.ndarray, factor: int) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(np.asarray(img, np.uint8))
    return np.asarray(pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST))


def demo_grid(rows, cell: int = 128):
    """rows of uint8 images -> a PIL grid with a header naming the columns."""
    from PIL import Image, ImageDraw

    from cdv2.train.feedback import image_grid

    scaled = [[_upscale(im, max(1, cell // im.shape[0])).astype(np.float32) / 127.5 - 1.0 for im in r] for r in rows]
    body = image_grid(scaled, cell=cell)
    header = 14
    grid = Image.new("RGB", (body.width, body.height + header), (255, 255, 255))
    grid.paste(body, (0, header))
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(COLUMNS[:len(rows[0])]):
        draw.text((2 + j * (cell + 2) + 2, 1), name, fill=(0, 0, 0))
    return grid


def run_builtin_demo(out="cdv2-demo", *, weights=None, num: int = 4, steps: int = 20,
                     reference_guidance: float = 2.0, seed: int = 0) -> dict:
    """Colorize `num` held-out synthetic sketches with the built-in model; writes OUT/samples.png and
    OUT/colour_check.json; -> {"grid", "check", "seconds", "compile_seconds"}."""
    if num < 2:
        raise ValueError(f"--num must be at least 2 (the swapped-reference column), got {num}")
    t0 = time.perf_counter()
    cache = enable_compilation_cache()
    from cdv2.train.synthetic import held_out_pairs

    with heartbeat("loading the built-in model (jax start-up, weights)"):
        col = load_demo_colorizer(weights)
    pairs = held_out_pairs(num, DEMO_SIZE, seed=seed)
    swapped = [(i + 1) % num for i in range(num)]
    with heartbeat("first colorization: compiling the sampler" + (f" (cached in {cache})" if cache else "")) as hb:
        first = colorize_pairs(col, pairs[:1], [pairs[0].reference], steps=steps,
                               reference_guidance=reference_guidance, seed=seed)
    compile_s = hb.seconds
    _log(f"colorizing {num} held-out sketches after their references, then after another sample's...")
    own = first + colorize_pairs(col, pairs[1:], [p.reference for p in pairs[1:]], steps=steps,
                                 reference_guidance=reference_guidance, seed=seed + 1)
    other = colorize_pairs(col, pairs, [pairs[j].reference for j in swapped], steps=steps,
                           reference_guidance=reference_guidance, seed=seed)
    rows = [[np.asarray(p.sketch), np.asarray(p.reference), o, np.asarray(p.target),
             np.asarray(pairs[j].reference), s] for p, o, s, j in zip(pairs, own, other, swapped)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    demo_grid(rows).save(out / "samples.png")
    check = colour_check(pairs, own, other, swapped)
    (out / "colour_check.json").write_text(json.dumps(check, indent=1) + "\n")
    m = check["mean"]
    _log(f"grid ({' | '.join(COLUMNS)}): {out / 'samples.png'}")
    _log(f"colour transfer: part-colour error {m['own_ref_vs_own_colours']:.3f} against the reference's colours "
         f"vs {m['own_ref_vs_other_colours']:.3f} against another's; with the other reference "
         f"{m['other_ref_vs_other_colours']:.3f} vs {m['other_ref_vs_own_colours']:.3f} "
         f"({check['fraction_following_reference']:.0%} of sketches follow their reference)")
    seconds = time.perf_counter() - t0
    _log(f"done in {seconds:.0f} s")
    return {"grid": out / "samples.png", "check": check, "seconds": seconds, "compile_seconds": compile_s,
            "outputs": own, "swapped_outputs": other, "pairs": pairs}
