"""OpenCLIP ViT image-tower checkpoints <-> cdv2's `VisionTransformer` params (cdv2/modules/clip.py).

open_clip format: keys `visual.*` (the prefix is optional; text-tower keys are ignored). Module
weights follow cdv2's torch_layout rule, with two exceptions handled here:
  * nn.MultiheadAttention's `attn.in_proj_weight`/`in_proj_bias` are the fused Dense `attn/in_proj`;
  * the raw nn.Parameters `class_embedding`, `positional_embedding` and `proj` keep their torch
    layout (`proj` is already [in, out]: open_clip computes `x @ proj`).
HuggingFace format (`CLIPVisionModelWithProjection`, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K) is
renamed to open_clip's (q/k/v concatenated, `visual_projection.weight` transposed) and then
converted the same way. All conversions are transposes/concatenations only (bit-exact).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from cdv2.config import CLIPVisionConfig
from cdv2.weights.readers import load_state_dict as _load_state_dict
from cdv2.weights.torch_layout import KeyMap
from cdv2.weights.tree import flatten, unflatten

_RAW = ("class_embedding", "positional_embedding", "proj")  # nn.Parameters used as-is
# open_clip visual key map (keys without `visual.`): the layout rule, nn.MultiheadAttention's fused
# in_proj as the Dense `attn/in_proj`, raw parameters, and its own `ln_1`/`ln_2` names
OPEN_CLIP_VISUAL = KeyMap(raw={k: (k,) for k in _RAW},
                          renames=(("attn.in_proj_weight", "attn.in_proj.weight"),
                                   ("attn.in_proj_bias", "attn.in_proj.bias")),
                          native=r"ln_\d+")
# head widths of open_clip's ViT configs (its default is 64); not recoverable from shapes
_KNOWN_HEAD_WIDTH = {768: 64, 1024: 64, 1280: 80, 1408: 88, 1664: 104}


# ---------------------------------------------------------------- loading


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor; numpy has no bfloat16
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A `.safetensors` file, or a torch `.bin/.pt/.pth` pickle (read without torch; an open_clip
    training checkpoint's {"state_dict": ...} unwrapped, "module." stripped), as numpy."""
    return _load_state_dict(path)


def _visual_items(state: Mapping, prefix: str | None) -> dict[str, np.ndarray]:
    """The tower's keys without `prefix` (auto: "visual." if any key has it, else all keys)."""
    if prefix is None:
        prefix = "visual." if any(k.startswith("visual.") for k in state) else ""
    return {k[len(prefix):]: _to_numpy(v) for k, v in state.items() if k.startswith(prefix)}


def _path_to_oc_key(path: tuple[str, ...]) -> str:
    """Flax param path -> open_clip key (no prefix)."""
    return OPEN_CLIP_VISUAL.to_key(path)


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """A Flax param's shape in torch's layout (for error messages)."""
    return OPEN_CLIP_VISUAL.torch_shape(path, shape)


# ---------------------------------------------------------------- config and validation


def expected_param_shapes(config: CLIPVisionConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {Flax path: shape} of `VisionTransformer(config)`'s params (jax.eval_shape, no memory)."""
    import jax
    import jax.numpy as jnp

    from cdv2.modules.clip import VisionTransformer

    pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    tree = jax.eval_shape(VisionTransformer(config).init, jax.random.PRNGKey(0), pixels)
    return {p: tuple(s.shape) for p, s in flatten(tree["params"], sep=None).items()}


def open_clip_config_from_state_dict(state: Mapping, head_width: int | None = None,
                                     prefix: str | None = None) -> CLIPVisionConfig:
    """Infer the tower's config from an open_clip state dict's shapes. The head count is not in the
    shapes: pass `head_width`, or it is taken from open_clip's configs for known widths."""
    sd = _visual_items(state, prefix)
    for k in ("conv1.weight", "positional_embedding", "proj", "transformer.resblocks.0.mlp.c_fc.weight"):
        if k not in sd:
            raise ValueError(f"cannot infer CLIP config: key '{k}' missing (have e.g. {sorted(sd)[:5]})")
    width, _, patch, _ = sd["conv1.weight"].shape
    grid = math.isqrt(sd["positional_embedding"].shape[0] - 1)
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k)))
    if head_width is None:
        if width not in _KNOWN_HEAD_WIDTH:
            raise ValueError(f"CLIP width {width}: head count is not in the weights; pass head_width")
        head_width = _KNOWN_HEAD_WIDTH[width]
    return CLIPVisionConfig(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                            head_width=head_width,
                            mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
                            output_dim=sd["proj"].shape[1])


def _validate(got: dict[tuple[str, ...], np.ndarray], config: CLIPVisionConfig,
              name: Callable[[tuple[str, ...]], str]) -> None:
    want = expected_param_shapes(config)
    missing = sorted(name(p) for p in want.keys() - got.keys())
    unexpected = sorted(name(p) for p in got.keys() - want.keys())
    bad = sorted(f"{name(p)}: got {_torch_shape(p, got[p].shape)}, expected {_torch_shape(p, want[p])}"
                 for p in want.keys() & got.keys() if tuple(got[p].shape) != want[p])
    if missing or unexpected or bad:
        lines = [f"CLIP checkpoint does not match {config}:"]
        lines += [f"  missing: {k}" for k in missing]
        lines += [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  wrong shape: {k}" for k in bad]
        raise ValueError("\n".join(lines))


# ---------------------------------------------------------------- open_clip


def open_clip_to_params(state: Mapping, config: CLIPVisionConfig | None = None, prefix: str | None = None,
                        head_width: int | None = None, _names: Callable | None = None) -> dict:
    """open_clip state dict (numpy or torch values) -> cdv2 `VisionTransformer` params (numpy).
    `config` defaults to the one inferred from the shapes (see `open_clip_config_from_state_dict`)."""
    sd = _visual_items(state, prefix)
    shown = "visual." if prefix is None else prefix
    names = _names or (lambda p: shown + _path_to_oc_key(p))
    if config is None:
        config = open_clip_config_from_state_dict(sd, head_width, prefix="")
    flat = {OPEN_CLIP_VISUAL.to_path(k, v.ndim): OPEN_CLIP_VISUAL.to_flax(k, v) for k, v in sd.items()}
    _validate(flat, config, names)
    return unflatten(flat, sep=None)


def params_to_open_clip(params: Mapping, prefix: str = "visual.") -> dict[str, np.ndarray]:
    """Inverse of `open_clip_to_params` (bit-exact): params -> open_clip `visual.*` state dict."""
    out = {}
    for path, v in flatten(params, sep=None).items():
        out[prefix + _path_to_oc_key(path)] = OPEN_CLIP_VISUAL.to_torch(path, np.asarray(v))
    return out


def load_open_clip_params(path: str | Path, config: CLIPVisionConfig | None = None,
                          head_width: int | None = None) -> dict:
    return open_clip_to_params(load_state_dict(path), config, head_width=head_width)


# ---------------------------------------------------------------- HuggingFace transformers

_HF_RENAMES = (  # (HF suffix under vision_model., open_clip key); {i} = layer index
    ("embeddings.patch_embedding.weight", "conv1.weight"),
    ("embeddings.class_embedding", "class_embedding"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("pre_layrnorm.weight", "ln_pre.weight"),
    ("pre_layrnorm.bias", "ln_pre.bias"),
    ("post_layernorm.weight", "ln_post.weight"),
    ("post_layernorm.bias", "ln_post.bias"),
    ("encoder.layers.{i}.layer_norm1.{p}", "transformer.resblocks.{i}.ln_1.{p}"),
    ("encoder.layers.{i}.layer_norm2.{p}", "transformer.resblocks.{i}.ln_2.{p}"),
    ("encoder.layers.{i}.self_attn.out_proj.{p}", "transformer.resblocks.{i}.attn.out_proj.{p}"),
    ("encoder.layers.{i}.mlp.fc1.{p}", "transformer.resblocks.{i}.mlp.c_fc.{p}"),
    ("encoder.layers.{i}.mlp.fc2.{p}", "transformer.resblocks.{i}.mlp.c_proj.{p}"),
)
_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_HF_IGNORED = ("embeddings.position_ids",)  # a buffer older transformers saved


def _hf_rename(suffix: str) -> str | None:
    for hf, oc in _HF_RENAMES:
        pat = "^" + re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)") + "$"
        if m := re.match(pat, suffix):
            return oc.format(**m.groupdict())
    return None


def _oc_to_hf_name(key: str) -> str:
    """open_clip key -> the HF key(s) it comes from (for error messages)."""
    if key == "proj":
        return "visual_projection.weight"
    if m := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
        return "vision_model.encoder.layers.{0}.self_attn.{{q,k,v}}_proj.{1}".format(*m.groups())
    for hf, oc in _HF_RENAMES:
        pat = "^" + re.escape(oc).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)") + "$"
        if m := re.match(pat, key):
            return "vision_model." + hf.format(**m.groupdict())
    return key


def hf_clip_vision_to_open_clip(state: Mapping) -> dict[str, np.ndarray]:
    """transformers CLIPVisionModelWithProjection (or CLIPModel) state dict -> open_clip `visual.*`.
    Text-model keys are ignored; unknown vision keys and incomplete q/k/v triples raise."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, v in state.items():
        if key == "visual_projection.weight":
            out["visual.proj"] = np.ascontiguousarray(_to_numpy(v).T)  # Linear [out, in] -> [in, out]
            continue
        if not key.startswith("vision_model."):
            continue  # text tower, logit_scale, text_projection
        suffix = key[len("vision_model."):]
        if suffix in _HF_IGNORED:
            continue
        if m := _HF_QKV.match(suffix):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = _to_numpy(v)
        elif (oc := _hf_rename(suffix)) is not None:
            out["visual." + oc] = _to_numpy(v)
        else:
            unknown.append(key)
    problems = [f"  unexpected: {k}" for k in sorted(unknown)]
    for (layer, leaf), parts in sorted(qkv.items()):
        hf = f"vision_model.encoder.layers.{layer}.self_attn.{{}}_proj.{leaf}"
        missing = [hf.format(c) for c in "qkv" if c not in parts]
        problems += [f"  missing: {k}" for k in missing]
        if not missing and len({p.shape for p in parts.values()}) != 1:
            problems.append("  wrong shape: " + ", ".join(f"{hf.format(c)} {parts[c].shape}" for c in "qkv"))
        if not missing and len({p.shape for p in parts.values()}) == 1:
            out[f"visual.transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = np.concatenate(
                [parts[c] for c in "qkv"], axis=0)  # nn.MultiheadAttention packs q|k|v
    if problems:
        raise ValueError("HF CLIP vision checkpoint:\n" + "\n".join(problems))
    return out


def clip_config_from_hf(hf_config: Mapping) -> CLIPVisionConfig:
    """A transformers CLIPConfig / CLIPVisionConfig dict (config.json) -> CLIPVisionConfig.
    Raises unless the activation is exact GELU and LayerNorm eps is 1e-5 (what the tower computes)."""
    vc = hf_config.get("vision_config", hf_config)
    act = vc.get("hidden_act", "quick_gelu")  # transformers' CLIPVisionConfig default
    if act != "gelu":
        raise ValueError(f"HF CLIP hidden_act={act!r}: cdv2's tower uses exact GELU ('gelu') only")
    eps = vc.get("layer_norm_eps", 1e-5)
    if eps != 1e-5:
        raise ValueError(f"HF CLIP layer_norm_eps={eps}: cdv2's tower uses 1e-5")
    width, heads = vc["hidden_size"], vc["num_attention_heads"]
    proj = vc.get("projection_dim", hf_config.get("projection_dim"))
    return CLIPVisionConfig(image_size=vc["image_size"], patch_size=vc["patch_size"], width=width,
                            layers=vc["num_hidden_layers"], head_width=width // heads,
                            mlp_ratio=vc["intermediate_size"] / width, output_dim=proj)


def hf_clip_vision_to_params(state: Mapping, config: CLIPVisionConfig) -> dict:
    """HF CLIPVisionModelWithProjection state dict -> params; errors name the HF keys.
    Build `config` with `clip_config_from_hf` (it checks hidden_act is exact GELU)."""
    oc = hf_clip_vision_to_open_clip(state)
    return open_clip_to_params(oc, config, prefix="visual.",
                               _names=lambda p: _oc_to_hf_name(_path_to_oc_key(p)))
