"""Key coverage: the Flax model's param tree (jax.eval_shape, never materialised) mapped through the
converter's key rule is exactly the authors' released checkpoint, names and shapes."""
import math

import numpy as np
import pytest

from cdv2.config import load_model_config
from cdv2.model import param_shapes
from cdv2.weights.v2_checkpoint import (SCHEDULE_BUFFERS, flatten_tree, flax_shape_to_torch,
                                        param_path_to_torch_key)
from conftest import DATA

AUTHOR_GROUPS = ("unet", "sketch_encoder", "bg_encoder", "style_encoder", "vae")


def torch_keys_of(shapes: dict) -> dict:
    return {param_path_to_torch_key(p): flax_shape_to_torch(tuple(v.shape)) for p, v in flatten_tree(shapes).items()}


@pytest.fixture(scope="module")
def v2_shapes():
    return param_shapes(load_model_config("v2"))


def test_full_v2_model_has_exactly_the_released_keys_and_shapes(v2_shapes):
    released = {}
    for line in open(DATA / "v2_expected_keys.txt"):
        key, shape = line.split(" ", 1)
        released[key] = tuple(int(s) for s in shape.strip().strip("[]").split(",") if s.strip())
    for name in SCHEDULE_BUFFERS:  # buffers, not params: checked against the schedule instead
        released.pop(name)
    ours = torch_keys_of({g: v2_shapes[g] for g in AUTHOR_GROUPS})
    assert sorted(set(released) - set(ours)) == []
    assert sorted(set(ours) - set(released)) == []
    assert {k: s for k, s in ours.items() if released[k] != s} == {}
    counts = {g: sum(math.prod(v.shape) for v in flatten_tree(v2_shapes[g]).values()) for g in v2_shapes}
    print("params per group:", counts)
    assert sum(counts[g] for g in AUTHOR_GROUPS) == 1_747_630_363 - 12 * 1000  # ARCHITECTURE §7.2 minus buffers
    assert counts["clip"] == 632_076_800  # open_clip ViT-H-14 visual tower


def test_tiny_model_matches_the_oracle_checkpoint(tiny_config, tiny_state_dict):
    ours = torch_keys_of({g: s for g, s in param_shapes(tiny_config, AUTHOR_GROUPS).items()})
    theirs = {k: tuple(v.shape) for k, v in tiny_state_dict.items() if k not in SCHEDULE_BUFFERS}
    assert ours == theirs


def test_oracle_checkpoint_has_no_zero_tensors(tiny_state_dict):
    """FIXTURES.md promises non-zero random weights everywhere (so no path hides behind a zero)."""
    zero = [k for k, v in tiny_state_dict.items() if v.size and not np.any(v)]
    assert zero == []


@pytest.mark.parametrize("name, mult", [("tiny", None), ("demo", None), ("tiny", (1, 2, 2, 2)), ("tiny", (1, 1, 2))])
def test_style_encoder_widths_match_the_decoder_for_any_channel_mult(name, mult):
    """Entry i of the style encoder scales and shifts output block i: 2 x that block's channels
    (the released v2 shapes are checked above; the demo's channel_mult 1,2,2,2 broke a v2-only rule)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from cdv2.modules.encoders import UNetEncoder
    from cdv2.modules.unet import output_layout

    cfg = load_model_config(name).style_encoder
    if mult is not None:
        cfg = dataclasses.replace(cfg, channel_mult=mult, attention_resolutions=(1,))
    enc = UNetEncoder(cfg)
    x = jnp.zeros((1, 16, 16, cfg.in_channels))
    y = jnp.zeros((1, cfg.adm_in_channels))
    ctx = jnp.zeros((1, 3, cfg.context_dim))
    outs = jax.eval_shape(lambda: enc.apply(enc.init(jax.random.PRNGKey(0), x, y, ctx), x, y, ctx))
    assert [o.shape[-1] for o in outs] == [2 * b.channels for b in output_layout(cfg)]
