"""BiRefNet / RMBG-2.0 (`model.safetensors`, keys `bb.*`, `squeeze_module.0.*`, `decoder.*`)
<-> Flax variables. Same layout rule as every net here (`common.py`); the torch names that natively
end in "_<digit>" (`conv_ms_spvn_4`, `gdt_convs_4`, `gdt_convs_pred_4`, `gdt_convs_attn_4`) are
declared so the inverse keeps them. Swin's `relative_position_index` buffers are optional."""
from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cdv2.modules.preprocess_nets.birefnet import BiRefNet, BiRefNetConfig
from cdv2.modules.preprocess_nets.swin import SwinConfig, relative_position_index
from cdv2.weights.keymaps.common import WeightKeysError, state_to_variables, torch_key_shapes

NATIVE = re.compile(r"(?:conv_ms_spvn|gdt_convs(?:_pred|_attn)?)_\d+")


def expected_variables(config: BiRefNetConfig, size: int = 64):
    """ShapeDtypeStructs of the network's variables (never materialised)."""
    return jax.eval_shape(BiRefNet(config).init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))


def torch_keys(config: BiRefNetConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    return torch_key_shapes(expected_variables(config), NATIVE)


def convert(state: Mapping[str, np.ndarray], config: BiRefNetConfig) -> dict:
    """Torch state dict (numpy) -> {'params', 'batch_stats'}; raises WeightKeysError on mismatch.
    A present `relative_position_index` must equal the deterministic one (else the window differs)."""
    ws = config.swin.window_size
    bad = [k for k, v in state.items() if k.endswith("relative_position_index")
           and not np.array_equal(np.asarray(v), relative_position_index(ws))]
    if bad:
        raise WeightKeysError(f"relative_position_index differs from window_size={ws}: {bad[:5]}")
    return state_to_variables(state, expected_variables(config), native=NATIVE)


def infer_config(state: Mapping[str, np.ndarray], window_size: int = 12) -> BiRefNetConfig:
    """Backbone and decoder widths read off the weight shapes (heads from the bias tables)."""
    embed = int(np.shape(state["bb.patch_embed.proj.weight"])[0])
    n_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("bb.layers."))
    depths = tuple(1 + max(int(k.split(".")[4]) for k in state if k.startswith(f"bb.layers.{i}.blocks."))
                   for i in range(n_layers))
    heads = tuple(int(np.shape(state[f"bb.layers.{i}.blocks.0.attn.relative_position_bias_table"])[1])
                  for i in range(n_layers))
    rows = int(np.shape(state["bb.layers.0.blocks.0.attn.relative_position_bias_table"])[0])
    ws = (int(round(rows ** 0.5)) + 1) // 2 if rows else window_size
    dec = "decoder.decoder_block4."
    return BiRefNetConfig(
        swin=SwinConfig(embed_dim=embed, depths=depths, num_heads=heads, window_size=ws),
        dec_inter=int(np.shape(state[dec + "conv_in.weight"])[0]),
        aspp_inter=int(np.shape(state[dec + "dec_att.aspp1.atrous_conv.regular_conv.weight"])[0]),
        ipt_inter=int(np.shape(state["decoder.ipt_blk5.conv1.weight"])[0]),
        gdt_channels=int(np.shape(state["decoder.gdt_convs_4.0.weight"])[0]),
    )
