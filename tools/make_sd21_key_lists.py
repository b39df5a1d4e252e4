"""Write the SD2.1 key lists of tests/data (run once; needs torch + diffusers, downloads nothing).

    python tools/make_sd21_key_lists.py [--out tests/data]

sd21_diffusers_unet_keys.txt / sd21_diffusers_vae_keys.txt: diffusers' own UNet2DConditionModel and
AutoencoderKL built with stabilityai/stable-diffusion-2-1's configs on the meta device (no memory).

sd21_ldm_keys.txt: the original v2-1_768-ema-pruned checkpoint. U-Net and VAE: the SD2.1 subset of
the authors' checkpoint key list (tests/data/v2_expected_keys.txt, the same LDM names; their LoRA,
warp and style modules dropped) with proj_in/proj_out as SD2.1's Linear [C, C]
(use_linear_in_transformer); this list is then checked by running diffusers' own single-file
loader (`convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint`) on meta tensors of these
shapes, which must give exactly the diffusers lists above. Text tower (`cond_stage_model.model.*`):
open_clip ViT-H-14's text transformer (width 1024, 24 layers, 16 heads, context 77, vocab 49408)
written out from its architecture; schedule buffers: LDM's 12, [1000] each.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SD21_UNET = dict(
    act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=1024, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=96,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, upcast_attention=True,
    use_linear_projection=True)
SD21_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
    sample_size=768, up_block_types=["UpDecoderBlock2D"] * 4)
SCHEDULE = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
            "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
            "posterior_mean_coef1", "posterior_mean_coef2")


def _meta_state(cls, cfg) -> dict:
    import torch

    with torch.device("meta"):
        model = cls(**cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _ldm_unet_vae() -> dict:
    out = {}
    for line in (REPO / "tests" / "data" / "v2_expected_keys.txt").read_text().splitlines():
        key, shape = line.split(" ", 1)
        shape = tuple(int(s) for s in re.findall(r"\d+", shape))
        if key.startswith("model.diffusion_model."):
            if "lora_" in key or re.search(r"\.(warp_modules|style_modules)\.", key):
                continue
            if re.search(r"\.(proj_in|proj_out)\.weight$", key):
                shape = shape[:2]  # SD2.1: use_linear_in_transformer
            out[key] = shape
        elif key.startswith("first_stage_model."):
            out[key] = shape
    return out


def _open_clip_text(prefix="cond_stage_model.model.", width=1024, layers=24, ctx=77, vocab=49408) -> dict:
    out = {prefix + "positional_embedding": (ctx, width), prefix + "text_projection": (width, width),
           prefix + "logit_scale": (), prefix + "token_embedding.weight": (vocab, width)}
    for i in range(layers):
        b = f"{prefix}transformer.resblocks.{i}."
        out.update({b + "ln_1.weight": (width,), b + "ln_1.bias": (width,),
                    b + "attn.in_proj_weight": (3 * width, width), b + "attn.in_proj_bias": (3 * width,),
                    b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                    b + "ln_2.weight": (width,), b + "ln_2.bias": (width,),
                    b + "mlp.c_fc.weight": (4 * width, width), b + "mlp.c_fc.bias": (4 * width,),
                    b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,)})
    out.update({prefix + "ln_final.weight": (width,), prefix + "ln_final.bias": (width,)})
    return out


def _check_with_diffusers_loader(ldm: dict, unet: dict, vae: dict) -> None:
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    meta = {k: torch.empty(s, device="meta") for k, s in ldm.items()}
    got_unet = {k: tuple(v.shape) for k, v in convert_ldm_unet_checkpoint(meta, SD21_UNET).items()}
    got_vae = {k: tuple(v.shape) for k, v in convert_ldm_vae_checkpoint(meta, SD21_VAE).items()}
    for name, got, want in (("unet", got_unet, unet), ("vae", got_vae, vae)):
        if got != want:
            diff = sorted(set(got.items()) ^ set(want.items()))[:20]
            sys.exit(f"LDM {name} list does not load into diffusers' {name} exactly: {diff}")


def _write(path: Path, shapes: dict) -> None:
    path.write_text("".join(f"{k} {tuple(s)} float32\n" for k, s in shapes.items()))
    print(f"{path}: {len(shapes)} keys")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data")
    args = ap.parse_args(argv)
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = _meta_state(UNet2DConditionModel, SD21_UNET)
    vae = _meta_state(AutoencoderKL, SD21_VAE)
    ldm = _ldm_unet_vae()
    _check_with_diffusers_loader(ldm, unet, vae)
    ldm.update(_open_clip_text())
    ldm.update({k: (1000,) for k in SCHEDULE})
    _write(args.out / "sd21_diffusers_unet_keys.txt", unet)
    _write(args.out / "sd21_diffusers_vae_keys.txt", vae)
    _write(args.out / "sd21_ldm_keys.txt", ldm)


if __name__ == "__main__":
    main()
