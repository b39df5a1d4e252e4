"""Inputs of attention injection for the pipeline (the math is cdv2/modules/injection.py).

The authors' `generate` with "Attention injection" on (backend/functool.preprocessing_inputs +
basemodel.generate + refnet/sampling/hook.py):
  * injection image `inject_xr` = the reference PIL image resized to the generation size (H, W)
    with PIL bicubic (torchvision's Resize on a PIL image), to [-1, 1]  -> `injection_image`;
  * r = VAE posterior SAMPLE of inject_xr, times the scale factor (one VAE draw, after those of
    the conditions);
  * write-pass sketch hints = control_encoder(-inject_xr) x "Injection fidelity (sketch)", repeated
    to every U-Net row;
  * the rows whose conditional part keeps plain self-attention are the no-reference CFG branch
    (`gr_indice` = [bs, 2bs): only when reference CFG is on)  -> `plain_rows`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cdv2.diffusion.guidance import UNCOND_REF


def injection_image(reference_u8: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, 3) uint8 reference -> (1, H, W, 3) float32 in [-1, 1] (PIL bicubic resize)."""
    from PIL import Image

    ref = np.asarray(reference_u8)
    if ref.dtype != np.uint8 or ref.ndim != 3 or ref.shape[2] != 3:
        raise ValueError(f"injection image: expected an (h, w, 3) uint8 RGB image, got {ref.shape} {ref.dtype}")
    img = Image.fromarray(ref).resize((int(width), int(height)), Image.BICUBIC)
    x = np.asarray(img, np.float32) / 255.0
    return ((x - 0.5) / 0.5)[None]


def plain_rows(branches: Sequence[str], num_images: int) -> tuple[int, ...]:
    """U-Net rows of the no-reference branch (branch-major stacking, `num_images` rows each), or ()
    when reference CFG is off: the authors' `gr_indice`."""
    if UNCOND_REF not in branches:
        return ()
    k = list(branches).index(UNCOND_REF)
    return tuple(range(k * num_images, (k + 1) * num_images))


def noise_per_call(active_draws: np.ndarray, call_timesteps: Sequence[float], start_step: float,
                   num_timesteps: int = 1000) -> np.ndarray:
    """Recorded q_sample draws in order of the ACTIVE calls (the authors' `noise/q_sample`: one per
    write pass) -> one entry per U-Net call, as `Pipeline.denoise(injection_noise=...)` takes them
    (zeros at the calls before the start step, which draw nothing). call_timesteps: each call's
    model timestep (for the activity test 1 - t/(T-1) >= start_step)."""
    draws = np.asarray(active_draws, np.float32)
    t = np.asarray(call_timesteps, np.float64).reshape(-1)
    active = 1.0 - t.astype(np.float32) / (num_timesteps - 1) >= np.float32(start_step)
    if int(active.sum()) != draws.shape[0]:
        raise ValueError(f"{draws.shape[0]} recorded draws for {int(active.sum())} active calls")
    out = np.zeros((t.shape[0],) + draws.shape[1:], np.float32)
    out[active] = draws
    return out
