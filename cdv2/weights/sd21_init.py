"""Stage-1 starting weights as the authors start: SD2.1 where it has the part, their init elsewhere.

The authors build the whole model (its constructors' init: `zero_module` on every zero conv/Linear,
LoRA up = 0) and then load SD2.1-768-v non-strictly (`init_from_ckpt(ckpt_path)`, basemodel.py):
    unet            SD2.1 U-Net; LoRA factors, warp and style modules from their constructors
    vae             SD2.1 (first_stage_model)
    clip            open_clip ViT-H-14 image tower (their FrozenOpenCLIPImageEmbedder loads it)
    sketch_encoder, bg_encoder, style_encoder: fresh (constructor init)
cdv2 uses its own random init (Flax defaults) for what is fresh, then zeroes exactly what the
authors' constructors zero (`AUTHORS_ZERO_INIT`); the rest of their init is torch's default, which
is not reproduced (a random init is a random init; the zeros are what makes training start from
SD2.1's function).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from cdv2.config import ModelConfig
from cdv2.weights.mismatch import raise_if_mismatched
from cdv2.weights.sd21 import convert_sd21
from cdv2.weights.tree import flatten, unflatten

# (group, regex searched in the "/"-joined param path): params the authors' constructors zero.
# LDM ResBlock out_layers.3, SpatialTransformer proj_out, U-Net out.2 (LDM's zero_module; SD2.1
# overwrites them in the U-Net, the encoders keep them); SelfTransformerBlock ff.2 (warp modules);
# style_modules[i][2]; MultiEncoder zero_layer/zero_blocks; UNetEncoder zero_layers; LoRA up.
AUTHORS_ZERO_INIT: tuple[tuple[str, str], ...] = (
    ("unet", r"(^|/)(out_layers_3|proj_out)/|^out_2/|^warp_modules_\d+/ff_2/|^style_modules_\d+_2/"
             r"|/lora_up_(fg|bg)/"),
    ("sketch_encoder", r"^(zero_layer_0|zero_blocks_\d+_0)/"),
    ("bg_encoder", r"(^|/)(out_layers_3|proj_out)/|^zero_layers_\d+/"),
    ("style_encoder", r"(^|/)(out_layers_3|proj_out)/|^zero_layers_\d+/"),
)
FRESH_GROUPS = ("unet", "sketch_encoder", "bg_encoder", "style_encoder")


def apply_authors_zero_init(params: dict) -> dict:
    """The same tree with every `AUTHORS_ZERO_INIT` param set to zeros (other leaves untouched)."""
    rules = [(g, re.compile(p)) for g, p in AUTHORS_ZERO_INIT]
    flat = flatten(params)
    for name, leaf in flat.items():
        group, rest = name.split("/", 1)
        if any(g == group and r.search(rest) for g, r in rules):
            flat[name] = np.zeros(np.shape(leaf), np.asarray(leaf).dtype)
    return unflatten(flat)


def init_from_sd21(cfg: ModelConfig, rng, *, sd21: Optional[str] = None, diffusers: Optional[str] = None,
                   open_clip: Optional[str] = None, ema: bool = False, dtype=np.float32,
                   progress: bool = True) -> dict:
    """Every param group of `cfg` (numpy, `dtype`): U-Net base and VAE from SD2.1 (`sd21`: the LDM
    checkpoint, e.g. v2-1_768-ema-pruned.safetensors; or `diffusers`: a diffusers SD2.1 folder),
    the CLIP image tower from `open_clip` (open_clip_pytorch_model.bin of ViT-H-14), the rest fresh
    with the authors' zero inits. Each file is validated before anything large is read; a file that
    does not fit raises `CheckpointMismatchError` naming every missing/unexpected/mis-shaped key."""
    from cdv2.model import init_params
    from cdv2.weights.open_clip import load_open_clip_params
    from cdv2.weights.pretrained import model_param_shapes

    if (sd21 is None) == (diffusers is None):
        raise ValueError("SD2.1 init: give exactly one of sd21 (the LDM checkpoint file) and diffusers "
                         "(a diffusers SD2.1 folder with unet/ and vae/)")
    if ema and sd21 is None:
        raise ValueError("SD2.1 init: ema (the U-Net from model_ema.*) applies to the sd21 LDM checkpoint only")
    if open_clip is None:
        raise ValueError("SD2.1 init: the CLIP image tower needs open_clip (open_clip_pytorch_model.bin "
                         "of ViT-H-14 laion2b_s32b_b79k; SD2.1 files hold only the text tower)")
    for p in (sd21, diffusers, open_clip):
        if p is not None and not Path(p).exists():
            raise FileNotFoundError(f"SD2.1 init: not found: {p}")
    # validate and convert the pretrained parts first: a wrong file fails before the random init
    loaded = convert_sd21(sd21 or diffusers, cfg, dtype=dtype, progress=progress,
                          **({"ema": ema} if sd21 else {}))
    clip = load_open_clip_params(open_clip, cfg.clip)
    fresh = init_params(cfg, rng, groups=FRESH_GROUPS)
    params = apply_authors_zero_init(jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), fresh))
    unet = flatten(params["unet"], sep=None)
    base = flatten(loaded["unet"], sep=None)
    unet.update(base)  # U-Net base from SD2.1; LoRA, warp and style modules stay as initialised
    params["unet"] = unflatten(unet, sep=None)
    params["vae"] = loaded["vae"]
    params["clip"] = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), clip)
    want = {f"{g}/{k}": tuple(v.shape) for g in params for k, v in flatten(model_param_shapes(cfg, (g,))[g]).items()}
    raise_if_mismatched("SD2.1 init", want, {k: tuple(np.shape(v)) for k, v in flatten(params).items()})
    return params
