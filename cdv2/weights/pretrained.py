"""Load a model for inference: a cdv2 weights directory, or the authors' torch checkpoint plus an
open_clip ViT-H-14 file converted on the fly."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from cdv2.config import ModelConfig, load_model_config
from cdv2.model import GROUPS, param_shapes

KNOWN_EXTRA_PREFIXES = ("cond_stage_model.", "model_ema.")
HOW_TO_GET_WEIGHTS = """\
cdv2 needs the authors' released weights and the OpenCLIP image encoder (neither can be bundled):
  1. v2-full.safetensors from https://huggingface.co/tellurion/ColorizeDiffusion
  2. open_clip_pytorch_model.bin (ViT-H-14, laion2b_s32b_b79k) from
     https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K
then convert them once into a cdv2 weights directory:
  cdv2 convert --checkpoint v2-full.safetensors --clip open_clip_pytorch_model.bin --out weights/v2
and colorize with --weights weights/v2 (or pass both files directly: --weights v2-full.safetensors
--clip open_clip_pytorch_model.bin, converted in memory at every start)."""


def load_pretrained(path, clip: Optional[str] = None, config: Optional[str | ModelConfig] = None):
    """-> (params: nested dict of fp32 numpy arrays for every group, ModelConfig).

    `path`: a cdv2 weights directory (its config.yaml decides the architecture), or the authors'
    `.safetensors/.ckpt/.pth` (architecture from `config`, default "v2"). `clip`: an open_clip
    visual checkpoint, required when the weights have no `clip` group (the authors' file never
    has one)."""
    from cdv2.weights.open_clip import load_open_clip_params
    from cdv2.weights.v2_checkpoint import convert_v2_checkpoint
    from cdv2.weights.weights_dir import load_weights_config, load_weights_dir

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights not found: {p}\n\n{HOW_TO_GET_WEIGHTS}")
    if p.is_dir():
        cfg = load_weights_config(p)
        params, _ = load_weights_dir(p, expected_shapes=None)
        groups = tuple(g for g in GROUPS if g in params)
        from cdv2.weights.weights_dir import raise_if_mismatched  # same error as conversion
        from cdv2.weights.v2_checkpoint import flatten_tree, leaf_shape

        want = {"/".join(k): leaf_shape(v) for k, v in flatten_tree(param_shapes(cfg, groups)).items()}
        got = {"/".join(k): tuple(v.shape) for k, v in flatten_tree(params).items()}
        raise_if_mismatched(p, want, got)
    else:
        cfg = config if isinstance(config, ModelConfig) else load_model_config(config or "v2")
        groups = tuple(g for g in GROUPS if g != "clip")
        params, _ = convert_v2_checkpoint(p, param_shapes(cfg, groups), progress=True,
                                          allow_unexpected_prefixes=KNOWN_EXTRA_PREFIXES, schedule=cfg.schedule)
    missing = [g for g in GROUPS if g not in params and g != "clip"]
    if missing:
        raise ValueError(f"{p}: the weights lack the groups {missing}")
    if "clip" not in params:
        if clip is None:
            raise ValueError(f"{p} holds no CLIP image encoder; pass the open_clip ViT-H-14 file (clip=...).\n\n"
                             f"{HOW_TO_GET_WEIGHTS}")
        if not Path(clip).is_file():
            raise FileNotFoundError(f"CLIP weights not found: {clip}")
        params["clip"] = load_open_clip_params(clip, cfg.clip)
    return params, cfg
