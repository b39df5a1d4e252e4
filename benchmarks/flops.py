"""Analytic FLOP count of one U-Net forward (matmuls and convolutions only; 1 MAC = 2 FLOP).

    python -m benchmarks.flops                       # SD2.1 anchor: v2 at a 96x96 latent, 256 tokens
    python -m benchmarks.flops --config tiny --size 128 --xla   # + XLA's own count for the same call

What is counted (per image unless said otherwise):
  conv          2*k*k*cin*cout*Ho*Wo for every conv (conv_in, ResBlocks, skip 1x1, down/up, proj_in/out, out)
  attn1         q/k/v/out projections 4 * 2*C*C*T, attention 4*T*T*C (QK^T and AV)
  attn2         q/out 2 * 2*C*C*T, k/v 2 * 2*ctx*C*M, attention 4*T*M*C over M context tokens;
                split attention (a sketch mask) runs q/k/v and the attention once per half:
                the attention work equals one pass over both halves (2x that of 256 tokens) and q twice
  ff            GEGLU proj 2*C*8C*T + out 2*4C*C*T
  warp          background injection per decoder skip: attention skip tokens x bg tokens (64-ch heads)
                + SiLU FFN (C -> 4C -> C)
  dense         time embedding, ResBlock emb_layers, style modules (per image, tiny)
  lora_merge    W + down@up for the decoder attn2 q/k/v, once per CALL (does not scale with batch)
Ignored: norms, activations, softmax, residual adds, resizes (elementwise work).

`valid_taps=True` counts only the conv taps that land inside the input (padding excluded): that is
what XLA's HloCostAnalysis counts, and what the cross-check against it uses.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from cdv2.config import UNetConfig
from cdv2.modules.unet import input_layout, output_layout

CATEGORIES = ("conv", "attn1", "attn2", "ff", "warp", "dense", "lora_merge")


@dataclass(frozen=True)
class Mode:
    """Which optional parts of the U-Net run (mirrors the call arguments of `UNet`)."""

    split: bool = False   # a sketch mask: split cross-attention over [fg | bg] context halves
    warp: bool = False    # hs_bg given: the warp modules run on every decoder skip
    style: bool = False   # style vectors given: style modulation after every decoder block
    lora: bool = False    # fg/bg LoRAs merged into the decoder attn2 q/k/v (needs split)


VANILLA = Mode()
FULL = Mode(split=True, warp=True, style=True, lora=True)


def _taps_1d(n: int, k: int, stride: int, pad: int, valid_taps: bool) -> int:
    """Sum over output positions of the kernel taps used along one spatial dimension."""
    out = (n + 2 * pad - k) // stride + 1
    if not valid_taps:
        return out * k
    return sum(1 for p in range(out) for j in range(k) if 0 <= p * stride - pad + j < n)


def conv_flops(h: int, w: int, cin: int, cout: int, k: int = 3, stride: int = 1, valid_taps: bool = False) -> int:
    pad = 1 if k == 3 else 0
    return 2 * cin * cout * _taps_1d(h, k, stride, pad, valid_taps) * _taps_1d(w, k, stride, pad, valid_taps)


class _Counter:
    def __init__(self):
        self.total = dict.fromkeys(CATEGORIES, 0)

    def add(self, cat: str, flops: int):
        self.total[cat] += int(flops)


def _resblock(c: _Counter, h, w, cin, cout, ted, vt):
    c.add("conv", conv_flops(h, w, cin, cout, 3, 1, vt) + conv_flops(h, w, cout, cout, 3, 1, vt))
    if cin != cout:
        c.add("conv", conv_flops(h, w, cin, cout, 1, 1, vt))
    c.add("dense", 2 * ted * cout)


def _spatial_transformer(c: _Counter, h, w, ch, cfg: UNetConfig, ctx_tokens, mode: Mode, decoder: bool, vt):
    t = h * w
    c.add("conv", 2 * conv_flops(h, w, ch, ch, 1, 1, vt))  # proj_in, proj_out
    for _ in range(cfg.transformer_depth):
        c.add("attn1", 4 * 2 * ch * ch * t + 4 * t * t * ch)
        ctx = cfg.context_dim
        if mode.split:
            half = ctx_tokens // 2
            c.add("attn2", 2 * (2 * ch * ch * t + 2 * 2 * ctx * ch * half + 4 * t * half * ch) + 2 * ch * ch * t)
            if decoder and mode.lora and cfg.lora_rank:
                r = cfg.lora_rank
                # per call, per adapter (fg, bg): to_q (ch -> ch), to_k/to_v (ctx -> ch)
                c.add("lora_merge", 2 * (2 * ch * r * ch + 2 * (2 * ctx * r * ch)))
        else:
            c.add("attn2", 2 * 2 * ch * ch * t + 2 * 2 * ctx * ch * ctx_tokens + 4 * t * ctx_tokens * ch)
        c.add("ff", 2 * ch * 8 * ch * t + 2 * 4 * ch * ch * t)


def _warp(c: _Counter, h, w, d, head_dim: int):
    t = h * w
    inner = (d // head_dim) * head_dim
    c.add("warp", 3 * 2 * d * inner * t + 4 * t * t * inner + 2 * inner * d * t + 2 * 2 * d * 4 * d * t)


def unet_flops(cfg: UNetConfig, latent_hw: tuple[int, int], batch: int = 1, context_tokens: int = 256,
               mode: Mode = VANILLA, valid_taps: bool = False) -> dict[str, int]:
    """FLOPs of one `UNet.__call__` on a (batch, h, w, 4) latent, by category (plus "total").
    `context_tokens` is the whole context length (both halves, e.g. 512, when `mode.split`)."""
    c = _Counter()
    mc, ted, vt = cfg.model_channels, cfg.time_embed_dim, valid_taps
    h, w = latent_hw
    c.add("dense", 2 * mc * ted + 2 * ted * ted)  # time embedding
    sizes, ch = [], cfg.in_channels
    for blk in input_layout(cfg):
        if blk.kind == "conv_in":
            c.add("conv", conv_flops(h, w, ch, blk.channels, 3, 1, vt))
        elif blk.kind == "down":
            c.add("conv", conv_flops(h, w, ch, blk.channels, 3, 2, vt))
            h, w = (h + 1) // 2, (w + 1) // 2
        else:
            _resblock(c, h, w, ch, blk.channels, ted, vt)
            if blk.attention:
                _spatial_transformer(c, h, w, blk.channels, cfg, context_tokens, mode, False, vt)
        ch = blk.channels
        sizes.append((h, w))
    _resblock(c, h, w, ch, ch, ted, vt)
    _spatial_transformer(c, h, w, ch, cfg, context_tokens, mode, False, vt)
    _resblock(c, h, w, ch, ch, ted, vt)
    for blk in output_layout(cfg):
        sh, sw = sizes.pop()
        if mode.warp and cfg.warp_module:
            _warp(c, sh, sw, blk.skip_channels, cfg.warp_head_dim)
        _resblock(c, h, w, ch + blk.skip_channels, blk.channels, ted, vt)
        ch = blk.channels
        if blk.attention:
            _spatial_transformer(c, h, w, ch, cfg, context_tokens, mode, True, vt)
        if blk.upsample:
            h, w = 2 * h, 2 * w
            c.add("conv", conv_flops(h, w, ch, ch, 3, 1, vt))
        if mode.style and cfg.style_modulation:
            c.add("dense", 2 * ted * 2 * ch + 2 * 2 * ch * 2 * ch)
    c.add("conv", conv_flops(h, w, ch, cfg.out_channels, 3, 1, vt))
    out = {k: v * (1 if k == "lora_merge" else batch) for k, v in c.total.items()}
    out["total"] = sum(out.values())
    return out


def xla_flops(model_cfg, latent_hw, batch=1, context_tokens=256, mode: Mode = VANILLA, dtype=None) -> float:
    """XLA's own count (HloCostAnalysis of the compiled U-Net call) for comparison; it also counts
    elementwise work (norms, softmax, activations) that the analytic count leaves out."""
    import jax
    import jax.numpy as jnp

    from benchmarks.common import call_unet, unet_args, unet_params
    from cdv2.modules.unet import UNet

    unet = UNet(model_cfg.unet, None, dtype or jnp.float32)
    params = unet_params(model_cfg, dtype or jnp.float32, shapes_only=True)
    args, static = unet_args(model_cfg.unet, latent_hw, batch, context_tokens, mode, shapes_only=True)
    fn = jax.jit(lambda p, *a: call_unet(unet, p, *a, **static))
    cost = fn.lower(params, *args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def main(argv=None):
    from cdv2.config import load_model_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="v2")
    ap.add_argument("--size", type=int, default=768, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256, help="context tokens (full mode uses 2x: fg | bg)")
    ap.add_argument("--xla", action="store_true", help="also compile the U-Net and print XLA's count")
    a = ap.parse_args(argv)
    mcfg = load_model_config(a.config)
    cfg = mcfg.unet
    lat = (a.size // 8, a.size // 8)
    for name, mode, tokens in (("vanilla", VANILLA, a.tokens), ("full", FULL, 2 * a.tokens)):
        f = unet_flops(cfg, lat, a.batch, tokens, mode)
        parts = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in f.items() if k != "total")
        print(f"{a.config} {name}: latent {lat[0]}x{lat[1]}, batch {a.batch}, {tokens} tokens: "
              f"{f['total'] / 1e12:.4f} TFLOP  (GFLOP: {parts})")
        if a.xla:
            fv = unet_flops(cfg, lat, a.batch, tokens, mode, valid_taps=True)["total"]
            x = xla_flops(mcfg, lat, a.batch, tokens, mode)
            print(f"  XLA cost_analysis {x / 1e9:.3f} GFLOP; analytic {f['total'] / 1e9:.3f} GFLOP "
                  f"(valid taps only {fv / 1e9:.3f}); XLA / analytic-valid = {x / fv:.3f}")


if __name__ == "__main__":
    main()
