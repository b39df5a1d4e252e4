import numpy as np

from cdv2.weights.torch_layout import (flax_leaf, flax_to_torch_array, path_to_torch_key,
                                       torch_key_to_path, torch_to_flax_array)
from conftest import DATA


def test_every_released_key_round_trips_through_the_path_rule():
    keys = [line.split()[0] for line in open(DATA / "v2_expected_keys.txt")]
    assert len(keys) == 1884
    paths = set()
    for k in keys:
        p = torch_key_to_path(k)
        p = p[:-1] + (flax_leaf(p[-1], 2),)
        assert path_to_torch_key(p) == k
        paths.add(p)
    assert len(paths) == len(keys)  # injective


def test_examples():
    assert torch_key_to_path("model.diffusion_model.input_blocks.1.0.in_layers.2.weight") == (
        "model", "diffusion_model", "input_blocks_1_0", "in_layers_2", "weight")
    assert path_to_torch_key(("first_stage_model", "decoder", "mid", "block_1", "norm1", "scale")) == \
        "first_stage_model.decoder.mid.block_1.norm1.weight"


def test_layout_round_trip_is_exact():
    rng = np.random.RandomState(0)
    for shape in [(5,), (7, 3), (8, 4, 3, 3)]:
        a = rng.randn(*shape).astype(np.float16)
        b = flax_to_torch_array(torch_to_flax_array(a))
        assert b.dtype == a.dtype and np.array_equal(a, b)
    conv = rng.randn(8, 4, 3, 1)
    assert torch_to_flax_array(conv).shape == (3, 1, 4, 8)
    assert torch_to_flax_array(conv)[2, 0, 1, 5] == conv[5, 1, 2, 0]
