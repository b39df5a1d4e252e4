"""The one tree flattener, the dtype table / "auto" choice, and the convert/export CLIs' help."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from cdv2.weights.dtypes import DTYPES, auto_dtype, cast_floating, resolve_dtype
from cdv2.weights.tree import flatten, leaf_shape, map_leaves, unflatten


def test_flatten_round_trips_and_matches_flax_paths():
    tree = {"unet": {"input_blocks_1_0": {"in_layers_2": {"kernel": np.ones((3, 3, 2, 4)), "bias": np.zeros(4)}}},
            "vae": {"quant_conv": {"kernel": np.ones((1, 1, 8, 8))}}}
    flat = flatten(tree)
    assert sorted(flat) == ["unet/input_blocks_1_0/in_layers_2/bias", "unet/input_blocks_1_0/in_layers_2/kernel",
                            "vae/quant_conv/kernel"]
    assert flat == traverse_util.flatten_dict(tree, sep="/")
    assert set(flatten(tree, sep=None)) == {tuple(k.split("/")) for k in flat}
    back = unflatten(flat)
    assert flatten(back) == flat and unflatten(flatten(tree, sep=None), sep=None).keys() == tree.keys()
    assert flatten(map_leaves(np.shape, tree))["vae/quant_conv/kernel"] == (1, 1, 8, 8)
    assert leaf_shape((2, 3)) == leaf_shape(np.zeros((2, 3))) == (2, 3)


def test_dtype_table_and_auto():
    assert DTYPES["bf16"] == DTYPES["bfloat16"] == np.dtype(ml_dtypes.bfloat16)
    assert DTYPES["fp32"] == np.float32
    assert auto_dtype("cpu") == np.float32 and auto_dtype("gpu") == auto_dtype("tpu") == DTYPES["bf16"]
    assert resolve_dtype("auto", backend="cpu") == np.float32
    assert resolve_dtype(None) is None and resolve_dtype(np.float16) == np.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8")
    x = np.arange(3, dtype=np.float16)
    assert cast_floating(x, DTYPES["bf16"]).dtype == DTYPES["bf16"]
    assert cast_floating(np.arange(3), DTYPES["bf16"]).dtype == np.int64  # integers stay
    assert cast_floating(x, None) is x


@pytest.mark.parametrize("name", ["convert", "export"])
def test_cli_options_all_have_help_and_usage_names_the_subcommand(name, capsys):
    import importlib

    mod = importlib.import_module(f"cdv2.cli.{name}")
    ap = mod.build_parser()
    assert ap.format_usage().startswith(f"usage: cdv2 {name} ")
    for action in ap._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        mod.main([])
    assert f"cdv2 {name}: error" in capsys.readouterr().err
