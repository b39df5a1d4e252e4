"""Shared loading for the ../shared/oracle/v2 parity tests (see its FIXTURES.md): the tiny model from
its single fp16 file (CLIP inside), the fixture arrays (with aliases) and the per-mode settings."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np


class Fixtures:
    """`fx[name]` reads `npz[aliases.get(name, name)]`; `fx.modes[m]` the applied settings."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "tiny_v2_fixtures.json").read_text())
        self.aliases = self.meta["aliases"]
        self.modes = self.meta["modes"]
        self._npz = np.load(self.folder / "tiny_v2_fixtures.npz")

    def __getitem__(self, name):
        return self._npz[self.aliases.get(name, name)]

    def __contains__(self, name):
        return name in self.meta["arrays"]


def tiny_v2_config():
    """cdv2/configs/tiny_v2.yaml when present, else the tiny config with this set's differences
    (warp head width 16, VAE ch_mult [1,1,1,2]; FIXTURES.md "tiny architecture")."""
    from cdv2.config import CONFIG_DIR, load_model_config

    if (CONFIG_DIR / "tiny_v2.yaml").is_file():
        return load_model_config("tiny_v2")
    return load_model_config("tiny", {"unet.warp_head_dim": 16, "vae.ch_mult": [1, 1, 1, 2]})


@lru_cache(maxsize=1)
def _load_params_cached(path: str):
    return load_tiny_v2_params(Path(path), tiny_v2_config())


def load_tiny_v2_params(path: Path, cfg):
    """Every param group from the single file: `load_pretrained` reads CLIP from the file once the
    single-file loader lands; until then its `cond_stage_model.visual.*` keys go through a
    temporary open_clip file."""
    import tempfile

    from cdv2.weights.pretrained import load_pretrained

    try:
        params, _ = load_pretrained(path, config=cfg)
        return params
    except ValueError as e:
        if "CLIP" not in str(e):
            raise
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(path))
    prefix = "cond_stage_model.visual.model."  # FrozenOpenCLIPImageEmbedder keeps open_clip's visual in .model
    visual = {"visual." + k[len(prefix):]: v.astype(np.float32) for k, v in sd.items() if k.startswith(prefix)}
    with tempfile.TemporaryDirectory() as d:
        clip = Path(d) / "visual.safetensors"
        save_file(visual, str(clip))
        params, _ = load_pretrained(path, clip=str(clip), config=cfg)
    return params


def params_for(folder: Path):
    return _load_params_cached(str(Path(folder) / "tiny_v2.safetensors"))


def nhwc(x):
    x = np.asarray(x)
    return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def nchw(x):
    x = np.asarray(x)
    return np.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x
