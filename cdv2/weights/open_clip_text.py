"""OpenCLIP text-tower weights <-> cdv2's `TextTransformer` params (cdv2/modules/text_clip.py).

Accepted key spellings (open_clip's names): bare (`token_embedding.weight`, `transformer.resblocks.*`,
...; an open_clip file, whose `visual.*` keys are ignored), `model.`-prefixed (the authors'
`cond_stage_model.transformer.` stripped) or fully prefixed `cond_stage_model.transformer.model.*`
(their single-file checkpoint). Dropped: `logit_scale` (training only) and `attn_mask` (a buffer;
the causal mask is built in the module). Layouts: the raw nn.Parameters `positional_embedding`,
`text_projection` ([width, out], open_clip computes `x @ text_projection`) and the embedding table
`token_embedding.weight` [vocab, width] are used as-is; every other key follows
`cdv2/weights/torch_layout.py` with nn.MultiheadAttention's fused `attn.in_proj_*` as the Dense
`attn/in_proj`. All conversions are transposes only (bit-exact).
"""
from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cdv2.config import CLIPTextConfig
from cdv2.weights.torch_layout import flax_leaf, flax_to_torch_array, torch_key_to_path, torch_to_flax_array

PREFIXES = ("cond_stage_model.transformer.model.", "cond_stage_model.transformer.", "model.")
IGNORED = ("logit_scale", "attn_mask")
_RAW = {  # open_clip key -> Flax path, no layout change
    "token_embedding.weight": ("token_embedding", "embedding"),
    "positional_embedding": ("positional_embedding",),
    "text_projection": ("text_projection",),
}
_TEXT_KEY = re.compile(r"^(token_embedding\.weight|positional_embedding|text_projection|ln_final\.(weight|bias)"
                       r"|transformer\.resblocks\.\d+\..+)$")
_HEAD_WIDTH = 64  # open_clip's text head width for every ViT config (heads = width // 64)


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        return (v.float() if str(v.dtype) == "torch.bfloat16" else v).numpy()
    return np.asarray(v)


def text_items(state: Mapping) -> dict[str, np.ndarray]:
    """The text tower's keys under open_clip's bare names (any accepted prefix stripped)."""
    out = {}
    for key, v in state.items():
        name = key
        for p in PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                break
        if name in IGNORED or not _TEXT_KEY.match(name):
            continue
        if name in out:
            raise ValueError(f"text-tower key '{name}' appears twice (as '{key}' and another spelling)")
        out[name] = _to_numpy(v)
    return out


def _oc_key_to_path(key: str, ndim: int) -> tuple[str, ...]:
    if key in _RAW:
        return _RAW[key]
    key = key.replace("attn.in_proj_weight", "attn.in_proj.weight").replace("attn.in_proj_bias", "attn.in_proj.bias")
    path = torch_key_to_path(key)
    return path[:-1] + (flax_leaf(path[-1], ndim),)


def _path_to_oc_key(path: tuple[str, ...]) -> str:
    for k, p in _RAW.items():
        if p == tuple(path):
            return k
    key = ".".join(path[:-1] + ("weight" if path[-1] in ("scale", "kernel") else path[-1],))
    key = re.sub(r"(^|\.)resblocks_(\d+)(?=\.)", r"\1resblocks.\2", key)
    return key.replace("attn.in_proj.weight", "attn.in_proj_weight").replace("attn.in_proj.bias", "attn.in_proj_bias")


def _flatten(tree, path=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, path + (k,)))
        else:
            out[path + (k,)] = v
    return out


def expected_text_param_shapes(cfg: CLIPTextConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {Flax path: shape} of `TextTransformer(cfg)` (jax.eval_shape: nothing materialised)."""
    from cdv2.modules.text_clip import TextTransformer

    tokens = jax.ShapeDtypeStruct((1, cfg.context_length), jnp.int32)
    tree = jax.eval_shape(TextTransformer(cfg).init, jax.random.PRNGKey(0), tokens)
    return {p: tuple(s.shape) for p, s in _flatten(tree["params"]).items()}


def open_clip_text_config_from_state_dict(state: Mapping, heads: int | None = None,
                                          clip_skip: int = 1) -> CLIPTextConfig:
    """Infer the tower's config from the shapes; heads (not in the shapes) default to width // 64,
    open_clip's text head width (ViT-H-14: 16). The tiny oracle tower needs `heads=2`."""
    sd = text_items(state)
    for k in ("token_embedding.weight", "positional_embedding", "text_projection",
              "transformer.resblocks.0.mlp.c_fc.weight"):
        if k not in sd:
            raise ValueError(f"cannot infer the CLIP text config: key '{k}' missing")
    vocab, width = sd["token_embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)))
    return CLIPTextConfig(context_length=sd["positional_embedding"].shape[0], vocab_size=vocab, width=width,
                          heads=heads or width // _HEAD_WIDTH, layers=layers,
                          mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
                          output_dim=sd["text_projection"].shape[1], clip_skip=clip_skip)


def convert_open_clip_text(state: Mapping[str, np.ndarray], cfg: CLIPTextConfig) -> dict:
    """open_clip text-tower state dict (numpy or torch values, any accepted prefix) -> nested Flax
    params of `TextTransformer(cfg)` (numpy). Raises naming every missing / unexpected /
    wrong-shaped key (torch names and shapes)."""
    sd = text_items(state)
    flat = {_oc_key_to_path(k, v.ndim): (v if k in _RAW else torch_to_flax_array(v)) for k, v in sd.items()}
    want = expected_text_param_shapes(cfg)
    missing = sorted(_path_to_oc_key(p) for p in want.keys() - flat.keys())
    unexpected = sorted(_path_to_oc_key(p) for p in flat.keys() - want.keys())
    bad = sorted(f"{_path_to_oc_key(p)}: got {sd[_path_to_oc_key(p)].shape}, expected "
                 f"{want[p] if p[0] in ('token_embedding', 'positional_embedding', 'text_projection') else want[p][::-1]}"
                 for p in want.keys() & flat.keys() if tuple(flat[p].shape) != want[p])
    if missing or unexpected or bad:
        lines = [f"CLIP text-tower weights do not match {cfg}:"]
        lines += [f"  missing: {k}" for k in missing] + [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  wrong shape: {k}" for k in bad]
        raise ValueError("\n".join(lines))
    params: dict = {}
    for path, v in flat.items():
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return params


def params_to_open_clip_text(params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of `convert_open_clip_text` (bit-exact), keys `prefix + <open_clip name>`."""
    out = {}
    for path, v in _flatten(params).items():
        key = _path_to_oc_key(path)
        v = np.asarray(v)
        out[prefix + key] = v if key in _RAW else flax_to_torch_array(v)
    return out
