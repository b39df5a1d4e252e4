"""diffusers-format SD VAE state dict -> LDM (`first_stage_model.*`) key names.

Reads e.g. `vae/diffusion_pytorch_model.safetensors` of SD2.1 or `stabilityai/sd-vae-ft-mse`.
The result uses the authors' LDM names, so `state_dict_to_params(ldm, out_prefix)` gives the params
of `cdv2.modules.vae.AutoencoderKL`. Differences handled here:
  * `down_blocks.i.resnets.j` -> `down.i.block.j`, `conv_shortcut` -> `nin_shortcut`,
    `downsamplers.0` -> `downsample`, `conv_norm_out` -> `norm_out`;
  * decoder `up_blocks.i` -> `up.(n-1-i)` (diffusers lists levels in the order applied, LDM by level);
  * `mid_block.resnets.{0,1}` -> `mid.block_{1,2}`; `mid_block.attentions.0.{group_norm, to_q|query,
    to_k|key, to_v|value, to_out.0|proj_attn}` -> `mid.attn_1.{norm,q,k,v,proj_out}`, Linear
    weights `[out,in]` reshaped to 1x1 conv `[out,in,1,1]`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Optional

import numpy as np

from cdv2.config import VAEConfig
from cdv2.weights.torch_layout import LAYOUT
from cdv2.weights.tree import flatten

_RESNET_PART = r"(norm1|conv1|norm2|conv2|conv_shortcut)"
_ATTN_PART = r"(group_norm|to_q|query|to_k|key|to_v|value|to_out\.0|proj_attn)"
_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "query": "q", "to_k": "k", "key": "k",
               "to_v": "v", "value": "v", "to_out.0": "proj_out", "proj_attn": "proj_out"}
_LEAF = r"\.(weight|bias)$"


def _resnet(part: str) -> str:
    return "nin_shortcut" if part == "conv_shortcut" else part


def _rules(num_levels: int) -> list[tuple[re.Pattern, Callable[[re.Match], str]]]:
    """(diffusers-key regex, LDM key builder). `num_levels` = len(ch_mult) (decoder index flip)."""
    up = lambda i: num_levels - 1 - int(i)  # noqa: E731
    table = [
        (r"(encoder|decoder)\.(conv_in|conv_out)" + _LEAF, lambda m: f"{m[1]}.{m[2]}.{m[3]}"),
        (r"(encoder|decoder)\.conv_norm_out" + _LEAF, lambda m: f"{m[1]}.norm_out.{m[2]}"),
        (r"(quant_conv|post_quant_conv)" + _LEAF, lambda m: f"{m[1]}.{m[2]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\." + _RESNET_PART + _LEAF,
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_resnet(m[3])}.{m[4]}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv" + _LEAF,
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\." + _RESNET_PART + _LEAF,
         lambda m: f"decoder.up.{up(m[1])}.block.{m[2]}.{_resnet(m[3])}.{m[4]}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv" + _LEAF,
         lambda m: f"decoder.up.{up(m[1])}.upsample.conv.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.([01])\." + _RESNET_PART + _LEAF,
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet(m[3])}.{m[4]}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\." + _ATTN_PART + _LEAF,
         lambda m: f"{m[1]}.mid.attn_1.{_ATTN_NAMES[m[2]]}.{m[3]}"),
    ]
    return [(re.compile("^" + pat), fn) for pat, fn in table]


def _num_levels(keys) -> int:
    idx = {int(m[1]) for k in keys if (m := re.match(r"^decoder\.up_blocks\.(\d+)\.", k))}
    if not idx:
        raise ValueError("not a diffusers VAE state dict: no 'decoder.up_blocks.*' keys")
    return max(idx) + 1


def infer_vae_config(ldm: Mapping[str, np.ndarray], scale_factor: float = 0.18215) -> VAEConfig:
    """The VAEConfig that an LDM-keyed VAE state dict (no prefix) was built with, from its shapes."""
    ch = ldm["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m[1]) for k in ldm if (m := re.match(r"^encoder\.down\.(\d+)\.", k))})
    blocks = {int(m[1]) for k in ldm if (m := re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k))}
    mults = tuple(ldm[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    return VAEConfig(in_channels=ldm["encoder.conv_in.weight"].shape[1],
                     out_ch=ldm["decoder.conv_out.weight"].shape[0], ch=ch, ch_mult=mults,
                     num_res_blocks=len(blocks), z_channels=ldm["decoder.conv_in.weight"].shape[1],
                     embed_dim=ldm["post_quant_conv.weight"].shape[0], scale_factor=scale_factor)


def expected_ldm_vae_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Torch key -> torch shape of every parameter of `AutoencoderKL(cfg)` (from its Flax init)."""
    import jax
    import jax.numpy as jnp

    from cdv2.modules.vae import AutoencoderKL

    side = 2 ** (len(cfg.ch_mult) - 1)
    shapes = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, side, side, cfg.in_channels)))["params"]
    return {LAYOUT.to_key(path): LAYOUT.torch_shape(path, tuple(leaf.shape))
            for path, leaf in flatten(shapes, sep=None).items()}


def diffusers_vae_to_ldm(sd: Mapping[str, np.ndarray], cfg: Optional[VAEConfig] = None,
                         prefix: str = "", out_prefix: str = "",
                         dtype: Optional[np.dtype] = np.float32) -> dict[str, np.ndarray]:
    """Rename a diffusers AutoencoderKL state dict (keys under `prefix`) to LDM keys (under
    `out_prefix`, e.g. "first_stage_model."), casting floats to `dtype` (None keeps them; SD VAE
    files are often fp16). Raises ValueError listing unmapped, missing or mis-shaped keys; the
    expected set comes from `cfg`, or from the config inferred from the shapes when `cfg` is None."""
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    rules = _rules(_num_levels(sd))
    ldm, unmapped = {}, []
    for key, arr in sd.items():
        for pat, build in rules:
            if (m := pat.match(key)):
                new = build(m)
                break
        else:
            unmapped.append(key)
            continue
        arr = np.asarray(arr)
        if ".mid.attn_1." in new and new.endswith(".weight") and arr.ndim == 2:
            arr = arr[:, :, None, None]  # Linear [out,in] -> 1x1 conv [out,in,1,1]
        if dtype is not None and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(dtype)
        if new in ldm:
            raise ValueError(f"diffusers VAE: two keys map to '{new}' (e.g. both to_q and query)")
        ldm[new] = arr
    if unmapped:
        raise ValueError(f"diffusers VAE: {len(unmapped)} unmapped keys: {sorted(unmapped)}")
    try:
        cfg = cfg or infer_vae_config(ldm)
    except KeyError as e:
        raise ValueError(f"diffusers VAE: cannot infer the config, key {e} missing") from e
    expected = expected_ldm_vae_shapes(cfg)
    missing = sorted(set(expected) - set(ldm))
    extra = sorted(set(ldm) - set(expected))
    bad = sorted(f"{k}: {ldm[k].shape} != {expected[k]}" for k in set(ldm) & set(expected)
                 if tuple(ldm[k].shape) != expected[k])
    if missing or extra or bad:
        raise ValueError(f"diffusers VAE does not match {dataclasses.asdict(cfg)}: "
                         f"missing {missing}; unexpected {extra}; wrong shapes {bad}")
    return {out_prefix + k: v for k, v in ldm.items()}
