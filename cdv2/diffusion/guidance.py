"""Dual classifier-free guidance (ARCHITECTURE.md §5.2).

Branches are stacked along the batch in the authors' order [cond, no-reference, blank-sketch];
which branches exist is static (a scale of 1 drops its branch, as the authors do), the scale values
themselves are traced, so changing them never recompiles.
"""
from __future__ import annotations

import jax.numpy as jnp

COND, UNCOND_REF, UNCOND_SKETCH = "cond", "uncond_ref", "uncond_sketch"


def branches_for(reference_guidance: float, sketch_guidance: float) -> tuple[str, ...]:
    """The U-Net batch for these guidance scales (host-side: decides the static batch layout)."""
    out = [COND]
    if reference_guidance > 1:
        out.append(UNCOND_REF)
    if sketch_guidance > 1:
        out.append(UNCOND_SKETCH)
    return tuple(out)


def combine(outputs, branches: tuple[str, ...], reference_guidance, sketch_guidance):
    """outputs: (len(branches) * B, ...) model outputs stacked branch-major -> guided (B, ...).

    One CFG: u + s (c - u). Both: the AVERAGE of the two CFGs, 0.5[(u_r + s_r(c-u_r)) + (u_s + s_s(c-u_s))].
    The weights sum to 1, so combining v-predictions equals combining x0/eps predictions."""
    parts = dict(zip(branches, jnp.split(outputs, len(branches), axis=0)))
    c = parts[COND]
    guided = []
    if UNCOND_REF in parts:
        u = parts[UNCOND_REF]
        guided.append(u + reference_guidance * (c - u))
    if UNCOND_SKETCH in parts:
        u = parts[UNCOND_SKETCH]
        guided.append(u + sketch_guidance * (c - u))
    if not guided:
        return c
    return sum(guided) / len(guided)
