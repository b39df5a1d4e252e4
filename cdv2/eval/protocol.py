"""The paper's §5 evaluation protocol (Table 3) for any generator `fn(sketch, reference, mode, seed)`:

* FID (†): outputs colorized after RANDOM references (another sample's colour image) against the
  ground-truth set, pool3 features of the FID InceptionV3 (cdv2.eval.fid; needs the user's weights);
* PSNR, MS-SSIM, CLIP cosine similarity (‡): outputs colorized after the ground truth deformed by a
  thin-plate-spline warp (cdv2.eval.tps), against the ground truth; CLIP similarity is the cosine of
  the image embeddings (CLS token after ln_post + proj) of cdv2's CLIP ViT (the model's own);
* on synthetic data also the colour-transfer check: per part, the distance of the output's mean
  colour to the part's colour (‡ pairs), in RGB units of 0..1.
Per mode (vanilla | style | background | full). Aesthetic score: not implemented (its predictor,
aesthetic-predictor-v2-5, is a SigLIP model cdv2 has no port of).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

# fn(sketches, references, *, mode, seeds, reference_masks) -> uint8 (N, H, W, 3): one chunk of images
# (cdv2.cli.eval.colorizer_fn batches them through cdv2.sample.batch); `one_at_a_time` adapts a
# per-image fn(sketch, reference, *, mode, seed, reference_mask) -> uint8 HxWx3.
Generator = Callable[..., np.ndarray]


@dataclasses.dataclass
class EvalItem:
    sketch: np.ndarray            # uint8 HxWx3, black lines on white
    target: np.ndarray            # uint8 HxWx3 ground truth
    random_reference: np.ndarray  # another sample's colour image (†)
    tps_reference: np.ndarray     # the ground truth TPS-deformed (‡)
    labels: Optional[np.ndarray] = None      # synthetic: part id per pixel (0 = background)
    part_colors: Optional[Sequence] = None   # synthetic: RGB per part
    # known character masks of the two references (uint8 HxW, 255 = character), given to the
    # generator in the modes that need one (synthetic: from the scenes' labels, TPS-warped alike)
    random_reference_mask: Optional[np.ndarray] = None
    tps_reference_mask: Optional[np.ndarray] = None


def synthetic_items(n: int, size: int = 64, seed: int = 0, tps_strength: float = 0.15) -> list[EvalItem]:
    """Held-out synthetic scenes (cdv2.train.synthetic: a seed stream disjoint from training)."""
    from cdv2.eval.tps import tps_warp
    from cdv2.train.synthetic import held_out_pairs

    pairs = held_out_pairs(n, size, seed=seed)
    rng = np.random.default_rng([seed, 7])
    perm = _derangement(n, rng)

    def mask(labels):
        return np.where(np.asarray(labels) > 0, 255, 0).astype(np.uint8)

    items = []
    for i, p in enumerate(pairs):
        # the mask rides along as a 4th channel: the same warp (bilinear per channel), then threshold
        warped = tps_warp(np.concatenate([np.asarray(p.target), mask(p.labels)[..., None]], -1), rng,
                          strength=tps_strength)
        items.append(EvalItem(np.asarray(p.sketch), np.asarray(p.target), np.asarray(pairs[perm[i]].target),
                              warped[..., :3], p.labels, p.scene.colors,
                              random_reference_mask=mask(pairs[perm[i]].labels),
                              tps_reference_mask=np.where(warped[..., 3] >= 128, 255, 0).astype(np.uint8)))
    return items


def folder_items(root, n: Optional[int] = None, size: int = 256, seed: int = 0,
                 tps_strength: float = 0.15) -> list[EvalItem]:
    """ROOT/color/NAME and ROOT/sketch/NAME image pairs (same names), resized to size x size."""
    from pathlib import Path

    from PIL import Image

    from cdv2.eval.tps import tps_warp

    root = Path(root)
    names = sorted(p.name for p in (root / "sketch").glob("*") if p.is_file())
    if not names:
        raise FileNotFoundError(f"no images under {root / 'sketch'} (expected ROOT/sketch and ROOT/color)")
    names = names[:n] if n else names

    def load(kind, name):
        path = root / kind / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing (every sketch needs a colour image of the same name)")
        return np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC))

    targets = [load("color", nm) for nm in names]
    sketches = [load("sketch", nm) for nm in names]
    rng = np.random.default_rng([seed, 7])
    perm = _derangement(len(names), rng)
    return [EvalItem(s, t, targets[perm[i]], tps_warp(t, rng, strength=tps_strength))
            for i, (s, t) in enumerate(zip(sketches, targets))]


def one_at_a_time(fn) -> Generator:
    """A per-image generator as a chunk generator."""
    def many(sketches, references, *, mode, seeds, reference_masks):
        return np.stack([fn(s, r, mode=mode, seed=sd, reference_mask=m)
                         for s, r, sd, m in zip(sketches, references, seeds, reference_masks)])
    return many


def _derangement(n: int, rng) -> np.ndarray:
    """A permutation without fixed points (a random reference is never the sample's own)."""
    if n < 2:
        raise ValueError("the evaluation needs at least 2 samples")
    while True:
        p = rng.permutation(n)
        if (p != np.arange(n)).all():
            return p


def part_colour_error(output: np.ndarray, item: EvalItem) -> Optional[float]:
    if item.labels is None:
        return None
    from cdv2.demo import part_colour_errors

    errs = part_colour_errors(output, item.labels, item.part_colors)
    return float(np.mean(errs)) if errs else None


def evaluate(fn: Generator, items: Sequence[EvalItem], *, modes=("vanilla",), seed: int = 0,
             inception=None, clip_embed=None, progress: bool = True, name: str = "", chunk: int = 32) -> dict:
    """-> {mode: {metric: value}} (+ "n"). fn gets `chunk` items at a time (item i: seed + i).
    `inception`: a cdv2.eval.fid.InceptionFeatures (FID skipped when None); `clip_embed(images uint8
    NHWC) -> (N, D)` (CLIP similarity skipped when None)."""
    from tqdm import tqdm

    from cdv2.eval import image_metrics
    from cdv2.eval.fid import fid_from_features

    targets = np.stack([it.target for it in items])
    results = {}
    for mode in modes:
        bar = tqdm(total=2 * len(items), desc=f"{name} {mode}".strip(), unit="img", disable=not progress)

        def generate(reference_of, mask_of):
            out = []
            for start in range(0, len(items), chunk):
                part = items[start:start + chunk]
                out.append(np.asarray(fn([it.sketch for it in part], [reference_of(it) for it in part], mode=mode,
                                         seeds=[seed + start + j for j in range(len(part))],
                                         reference_masks=[mask_of(it) for it in part]), np.uint8))
                bar.update(len(part))
            return np.concatenate(out)

        rand_out = generate(lambda it: it.random_reference, lambda it: it.random_reference_mask)
        paired = generate(lambda it: it.tps_reference, lambda it: it.tps_reference_mask)
        bar.close()
        r = {"psnr": float(image_metrics.psnr(paired, targets).mean()),
             "ms_ssim": float(image_metrics.ms_ssim_any_size(paired, targets).mean())}
        if clip_embed is not None:
            a, b = clip_embed(paired), clip_embed(targets)
            cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
            r["clip_similarity"] = float(cos.mean())
        if inception is not None:
            r["fid"] = fid_from_features(inception(rand_out / 255.0), inception(targets / 255.0))
        errs = [e for e in (part_colour_error(o, it) for o, it in zip(paired, items)) if e is not None]
        if errs:
            r["part_colour_error"] = float(np.mean(errs))
        results[mode] = r
    results["n"] = len(items)
    return results
