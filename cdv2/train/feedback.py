"""Training feedback: TensorBoard scalars (tensorboardX event files), a progress bar, PNG grids of
(sketch, reference, output) rows and a loss-curve PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw


class MetricsWriter:
    """Scalars to TensorBoard event files under `logdir` (only process 0 writes)."""

    def __init__(self, logdir, enabled: bool = True):
        self.writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(logdir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, float(v), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def to_uint8_image(x: np.ndarray) -> np.ndarray:
    """[-1, 1] HxWxC (C = 1 or 3) -> uint8 HxWx3."""
    x = np.asarray(x, np.float32)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8)


def image_grid(rows: Sequence[Sequence[np.ndarray]], cell: int = 128, pad: int = 2) -> Image.Image:
    """rows of [-1,1] images (each HxWxC, any size) -> one PIL grid, every image fitted in a cell."""
    n_cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (n_cols * (cell + pad) + pad, len(rows) * (cell + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            im = Image.fromarray(to_uint8_image(img))
            im.thumbnail((cell, cell), Image.BICUBIC)
            x = pad + j * (cell + pad) + (cell - im.width) // 2
            y = pad + i * (cell + pad) + (cell - im.height) // 2
            grid.paste(im, (x, y))
    return grid


def loss_curve(steps: Sequence[int], losses: Sequence[float], path, size=(640, 360), smooth: int = 10) -> Path:
    """A plain PNG plot of the loss (raw in grey, moving average in blue), no plotting library."""
    w, h = size
    margin = 48
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    steps = np.asarray(steps, np.float64)
    losses = np.asarray(losses, np.float64)
    if len(steps) >= 2:
        lo, hi = float(losses.min()), float(losses.max())
        hi = hi if hi > lo else lo + 1e-6

        def xy(s, v):
            x = margin + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (w - 2 * margin)
            return x, h - margin - (v - lo) / (hi - lo) * (h - 2 * margin)

        draw.line([xy(s, v) for s, v in zip(steps, losses)], fill=(180, 180, 180), width=1)
        k = max(1, min(smooth, len(losses)))
        avg = np.convolve(losses, np.ones(k) / k, mode="valid")
        draw.line([xy(s, v) for s, v in zip(steps[k - 1:], avg)], fill=(30, 90, 200), width=2)
        draw.text((4, margin - 12), f"{hi:.4f}", fill="black")
        draw.text((4, h - margin - 4), f"{lo:.4f}", fill="black")
        draw.text((margin, h - margin + 8), f"step {int(steps[0])}", fill="black")
        draw.text((w - margin - 60, h - margin + 8), f"step {int(steps[-1])}", fill="black")
    draw.rectangle([margin, margin, w - margin, h - margin], outline="black")
    draw.text((margin, 8), "training loss (v-prediction MSE)", fill="black")
    path = Path(path)
    img.save(path)
    return path
