"""The whole v2 model as named components, and its param tree (built, never loaded, here).

Param groups (top-level keys of a cdv2 params dict) and the authors' torch prefixes they come from
(the key map itself lives in `cdv2.weights`):
    unet            model.diffusion_model.*   (with LoRA, warp and style modules)
    sketch_encoder  control_encoder.*
    bg_encoder      bg_encoder.*
    style_encoder   style_encoder.*
    vae             first_stage_model.*
    clip            open_clip's visual.*      (not in the authors' file)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import jax
import jax.numpy as jnp

from cdv2.config import ModelConfig
from cdv2.modules.encoders import SketchEncoder, UNetEncoder
from cdv2.modules.unet import UNet, input_layout, output_layout

GROUPS = ("unet", "sketch_encoder", "bg_encoder", "style_encoder", "vae", "clip")


@dataclass(frozen=True)
class Components:
    unet: UNet
    sketch_encoder: SketchEncoder
    bg_encoder: UNetEncoder
    style_encoder: UNetEncoder
    vae: Any
    clip: Any


def resolve_attention(attention_impl: Optional[str], dtype=jnp.float32, backend: Optional[str] = None):
    """"auto" -> the fastest exact attention for the backend: cuDNN flash attention on GPU in
    fp16/bf16 (it has no fp32 kernel), query-chunked XLA attention on CPU, plain XLA attention
    elsewhere (TPU). Any other value is passed on unchanged (see `multihead_attention`)."""
    if attention_impl != "auto":
        return attention_impl
    backend = backend or jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "chunked" if backend == "cpu" else None


def build(cfg: ModelConfig, dtype=jnp.float32, param_dtype=jnp.float32,
          attention_impl: Optional[str] = "auto") -> Components:
    """The model's modules. `attention_impl`: "auto" (`resolve_attention`) or an explicit choice."""
    from cdv2.modules.clip import VisionTransformer
    from cdv2.modules.vae import AutoencoderKL

    attention_impl = resolve_attention(attention_impl, dtype)

    return Components(
        unet=UNet(cfg.unet, attention_impl, dtype, param_dtype),
        sketch_encoder=SketchEncoder(cfg.sketch_encoder, dtype, param_dtype),
        bg_encoder=UNetEncoder(cfg.bg_encoder, attention_impl, dtype, param_dtype),
        style_encoder=UNetEncoder(cfg.style_encoder, attention_impl, dtype, param_dtype),
        vae=AutoencoderKL(cfg.vae, dtype=dtype, param_dtype=param_dtype),
        clip=VisionTransformer(cfg.clip, dtype=dtype, param_dtype=param_dtype),
    )


def _init_fns(cfg: ModelConfig, comps: Components):
    """One init function per group, with the smallest inputs that create every parameter."""
    b = 1
    lat = 2 ** (len(cfg.unet.channel_mult) - 1)  # divisible by every downsampling
    x = jnp.zeros((b, lat, lat, cfg.unet.in_channels))
    t = jnp.zeros((b,))
    ctx_dim = cfg.unet.context_dim
    ctx = jnp.zeros((b, 2, ctx_dim))
    y = jnp.zeros((b, 2 * cfg.size_embed_dim))
    mask = jnp.zeros((b, lat, lat, 1))
    img = 64

    def unet(rng):
        skips = [bk.skip_channels for bk in output_layout(cfg.unet)]
        sizes = _output_skip_sizes(cfg, lat)
        hs_bg = [jnp.zeros((b, s * s, c)) for c, s in zip(skips, sizes)] if cfg.unet.warp_module else None
        style = ([jnp.zeros((b, 2 * bk.channels)) for bk in output_layout(cfg.unet)]
                 if cfg.unet.style_modulation else None)
        return comps.unet.init(rng, x, t, ctx, mask=mask, threshold=0.5, hs_bg=hs_bg, style=style,
                               use_lora=cfg.unet.lora_rank > 0)

    return {
        "unet": unet,
        "sketch_encoder": lambda rng: comps.sketch_encoder.init(rng, jnp.zeros((b, img, img, 3))),
        "bg_encoder": lambda rng: comps.bg_encoder.init(rng, x, y, ctx[:, :1]),
        "style_encoder": lambda rng: comps.style_encoder.init(rng, x, y, ctx[:, :1]),
        "vae": lambda rng: comps.vae.init(rng, jnp.zeros((b, 8 * lat, 8 * lat, 3))),
        "clip": lambda rng: comps.clip.init(rng, jnp.zeros((b, cfg.clip.image_size, cfg.clip.image_size, 3))),
    }


def _output_skip_sizes(cfg: ModelConfig, lat: int) -> list[int]:
    sizes, s = [], lat
    for blk in input_layout(cfg.unet):
        if blk.kind == "down":
            s = (s + 1) // 2
        sizes.append(s)
    return sizes[::-1]


def param_shapes(cfg: ModelConfig, groups=GROUPS) -> dict:
    """Nested dict of `jax.ShapeDtypeStruct` for every group (no memory is allocated)."""
    comps = build(cfg)
    fns = _init_fns(cfg, comps)
    rng = jax.random.PRNGKey(0)
    return {g: jax.eval_shape(fns[g], rng)["params"] for g in groups}


def init_params(cfg: ModelConfig, rng, groups=GROUPS) -> dict:
    """Random params for every group (tiny configs, tests and training from scratch)."""
    comps = build(cfg)
    fns = _init_fns(cfg, comps)
    keys = jax.random.split(rng, len(groups))
    # eager on purpose: jitting init compiles the whole forward pass, which is slower on CPU
    return {g: fns[g](k)["params"] for g, k in zip(groups, keys)}
