"""Sample grids during training: every `sample_every` steps, the current weights colorize a fixed
set of training sketches after their own references, written as
`WORKDIR/samples/step_NNNNNNN.png` (rows: sketch | reference | output).

The grid uses the reference-based (vanilla) path in every stage: it shows what the sketch encoder
and U-Net have learnt; the background and style paths are not drawn. Single-process only (the
weights are gathered to this host); multi-host runs skip it with a note.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cdv2.config import ModelConfig
from cdv2.train.feedback import image_grid, to_uint8_image


class TrainingSampler:
    def __init__(self, model_cfg: ModelConfig, out_dir, *, num_images: int = 4, steps: int = 20,
                 reference_guidance: float = 2.0):
        self.model_cfg, self.out_dir = model_cfg, Path(out_dir)
        self.num_images, self.steps, self.guidance = num_images, steps, reference_guidance
        self.items = None      # (sketch, reference) uint8 pairs, from the first batch seen
        self.colorizer = None  # built once: later calls swap in new weights (no recompilation)

    def take(self, batch: dict) -> None:
        """Keep the first samples of `batch` (model-polarity sketches, references in [-1, 1])."""
        if self.items is None:
            n = min(self.num_images, len(batch["sketch"]))
            self.items = [(to_uint8_image(batch["sketch"][i]), to_uint8_image(batch["reference"][i]))
                          for i in range(n)]

    def __call__(self, step: int, state) -> Path:
        from cdv2.sample.colorizer import Colorizer

        if self.items is None:
            raise RuntimeError("TrainingSampler.take(batch) must see a batch before sampling")
        params = jax.device_get(state.params)
        if self.colorizer is None:
            self.colorizer = Colorizer(params, self.model_cfg)
        else:
            self.colorizer.params = jax.tree_util.tree_map(jnp.asarray, params)
        rows = []
        for i, (sketch, reference) in enumerate(self.items):
            out = self.colorizer.colorize(sketch, reference, mode="vanilla", steps=self.steps, size=sketch.shape[:2],
                                          reference_guidance=self.guidance, sketch_polarity="white_on_black",
                                          seed=i)[0]
            rows.append([_unit(sketch), _unit(reference), _unit(np.asarray(out.convert("RGB")))])
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step_{step:07d}.png"
        image_grid(rows, cell=max(self.items[0][0].shape[:2])).save(path)
        return path


def _unit(img: np.ndarray) -> np.ndarray:
    return np.asarray(img, np.float32) / 127.5 - 1.0
