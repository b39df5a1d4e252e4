"""LDM U-Net key names (`model.diffusion_model.*` without the prefix) -> diffusers
`UNet2DConditionModel` names (`unet/diffusion_pytorch_model.safetensors`).

The direction is LDM -> diffusers because cdv2's params already have LDM names (`torch_layout`):
the SD2.1 converter (`cdv2.weights.sd21`) walks cdv2's expected params, names each one in the
source's spelling, and so reports missing keys in that spelling too. Renames (as in diffusers'
own single-file loader):
  * `time_embed.{0,2}` -> `time_embedding.linear_{1,2}`, `input_blocks.0.0` -> `conv_in`,
    `out.{0,2}` -> `conv_norm_out` / `conv_out`;
  * `input_blocks.n` (n >= 1) -> level l, slot j = divmod(n - 1, num_res_blocks + 1):
    `.0` ResBlock -> `down_blocks.l.resnets.j`, `.1` transformer -> `down_blocks.l.attentions.j`,
    the last slot's `.0.op` -> `down_blocks.l.downsamplers.0.conv`;
  * `middle_block.{0,1,2}` -> `mid_block.resnets.0`, `mid_block.attentions.0`, `mid_block.resnets.1`;
  * `output_blocks.n` -> l, j = divmod(n, num_res_blocks + 1): `.0` -> `up_blocks.l.resnets.j`,
    `.1` transformer -> `up_blocks.l.attentions.j`, `.{1,2}.conv` -> `up_blocks.l.upsamplers.0.conv`;
  * inside a ResBlock: in_layers.0/2 -> norm1/conv1, emb_layers.1 -> time_emb_proj,
    out_layers.0/3 -> norm2/conv2, skip_connection -> conv_shortcut; transformer internals keep
    their names. With `use_linear_projection` (SD2.x) proj_in/proj_out are Linear `[out, in]`
    where LDM's conv form is `[out, in, 1, 1]` (the shapes are the converter's business).
"""
from __future__ import annotations

import re

from cdv2.config import UNetConfig

_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
          "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
           ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))
_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}
_BLOCK = re.compile(r"^(input_blocks|output_blocks|middle_block)\.(\d+)\.(?:(\d+)\.)?(.+)$")


def _resnet(rest: str) -> str:
    for old, new in _RESNET:
        if rest.startswith(old):
            return new + rest[len(old):]
    raise ValueError(f"not a ResBlock parameter: '{rest}'")


def ldm_unet_key_to_diffusers(key: str, cfg: UNetConfig) -> str:
    """`input_blocks.4.1.proj_in.weight` -> `down_blocks.1.attentions.0.proj_in.weight`.
    Raises ValueError for a key with no diffusers counterpart (e.g. cdv2's warp/style modules)."""
    head, _, leaf = key.rpartition(".")
    if head in _FIXED:
        return f"{_FIXED[head]}.{leaf}"
    m = _BLOCK.match(key)
    if m is None:
        raise ValueError(f"U-Net key '{key}' has no diffusers UNet2DConditionModel name")
    kind, n, sub, rest = m[1], int(m[2]), m[3], m[4]
    per = cfg.num_res_blocks + 1
    if kind == "middle_block":  # middle_block.<n>.<rest>: no sub index
        rest = f"{sub}.{rest}" if sub is not None else rest
        block = _MIDDLE[str(n)]
        return f"{block}.{_resnet(rest) if 'resnets' in block else rest}"
    if sub is None:
        raise ValueError(f"U-Net key '{key}' has no diffusers UNet2DConditionModel name")
    if kind == "input_blocks":
        level, j = divmod(n - 1, per)
        if j == cfg.num_res_blocks:  # the level's Downsample
            return f"down_blocks.{level}.downsamplers.0.{rest.replace('op.', 'conv.', 1)}"
        if sub == "0":
            return f"down_blocks.{level}.resnets.{j}.{_resnet(rest)}"
        return f"down_blocks.{level}.attentions.{j}.{rest}"
    level, j = divmod(n, per)
    if sub == "0":
        return f"up_blocks.{level}.resnets.{j}.{_resnet(rest)}"
    if rest.startswith("conv."):  # Upsample (`.1.conv` without a transformer, `.2.conv` with one)
        return f"up_blocks.{level}.upsamplers.0.{rest}"
    return f"up_blocks.{level}.attentions.{j}.{rest}"
