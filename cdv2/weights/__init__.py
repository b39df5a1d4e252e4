"""Checkpoint formats: readers, one declarative key map per source, cdv2 weight directories.

    readers/         safetensors (streaming read/write) and torch zip+pickle (no torch needed)
    tree.py          the one param-tree flattener (`flatten`/`unflatten`, on flax.traverse_util)
    torch_layout.py  the one torch <-> Flax key/layout rule, and `KeyMap` (a source's exceptions)
    dtypes.py        `DTYPES` names, "auto" (bf16 on GPU/TPU, fp32 on CPU), per-tensor casts
    mismatch.py      `CheckpointMismatchError`: every missing / unexpected / mis-shaped key at once
    v2_checkpoint.py the authors' checkpoint (incl. its single-file form with the CLIP towers)
    open_clip.py     open_clip (and HF transformers) CLIP image tower
    open_clip_text.py open_clip CLIP text tower
    diffusers_vae.py diffusers-format SD VAE -> the authors' LDM names
    diffusers_unet.py LDM U-Net names -> diffusers UNet2DConditionModel names
    sd21.py          SD2.1-768-v (LDM checkpoint or diffusers folder) -> U-Net base, VAE, text tower
    sd21_init.py     `init_from_sd21`: stage-1 start (SD2.1 + open_clip + the authors' zero inits)
    weights_dir.py   cdv2's own weights directory (params.safetensors + config.yaml + manifest)
    pretrained.py    `load_pretrained`: any of the above -> (params, ModelConfig)
    keymaps/         the preprocessor networks' key maps
"""
