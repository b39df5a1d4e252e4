"""The app's four line extractors in Flax (issue 11): key coverage at real size (eval_shape only),
parity of network and app wrapper against the torch fixtures (../shared/oracle/preprocessors),
weight-file errors, the jitted runner and the bf16 option."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, rel_err

NAMES = ("lineart_keras", "lineart", "lineart_denoise", "lineart_sk")
TOL = 1e-4


def _real_keys(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for line in (DATA / f"{name}_keys.txt").read_text().splitlines():
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        out[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return out


def _n_params(keys) -> int:
    return sum(int(np.prod(s)) for k, (s, d) in keys.items() if d == "float32" and ".running_" not in k)


@pytest.mark.parametrize("name", NAMES)
def test_key_coverage_at_real_size(name):
    from cdv2.sample.line_extract import keymap, load_extractor_config

    got = keymap(name).torch_keys(load_extractor_config(name))  # jax.eval_shape: nothing materialised
    want = _real_keys(name)
    assert sorted(set(want) - set(got)) == [], "keys the network lacks"
    assert sorted(set(got) - set(want)) == [], "keys the network has beyond the checkpoint"
    assert {k: v for k, v in got.items() if want[k] != v} == {}, "shape/dtype mismatches"


def test_real_param_counts(preprocessors_oracle_dir):
    from cdv2.sample.line_extract import keymap, load_extractor_config

    real = json.loads((preprocessors_oracle_dir / "summary.json").read_text())["_real_params"]
    for name in NAMES:
        assert _n_params(keymap(name).torch_keys(load_extractor_config(name))) == real[name], name


@pytest.fixture(scope="module")
def fixture_state(preprocessors_oracle_dir):
    from safetensors.numpy import load_file

    def load(name):
        sd = load_file(str(preprocessors_oracle_dir / f"{name}_weights.safetensors"))
        return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in sd.items()}
    return load


@pytest.fixture(scope="module")
def extractors(fixture_state):
    from cdv2.sample.line_extract import LineExtractor

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = LineExtractor.from_state_dict(name, fixture_state(name))  # widths inferred
        return cache[name]
    return get


def _io(d, name):
    return np.load(d / f"{name}_io.npz")


def _nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


@pytest.mark.parametrize("name", NAMES)
def test_network_and_wrapper_parity(name, extractors, preprocessors_oracle_dir):
    io = _io(preprocessors_oracle_dir, name)
    ex = extractors(name)
    net = np.asarray(ex.net(_nhwc(io["net_in"])))
    e_net = rel_err(net, _nhwc(io["net_out"]))
    e_wrap = rel_err(ex.proceed(io["image"]), _nhwc(io["wrapper_out"]))
    print(f"{name}: net rel err {e_net:.2e}, wrapper rel err {e_wrap:.2e}")
    assert e_net <= TOL and e_wrap <= TOL


def test_keras_input_matches_app(preprocessors_oracle_dir):
    """OpenCV's fixed-point GaussianBlur (bit-exact) and the high-pass normalisation."""
    from cdv2.sample.gaussian_blur import gaussian_blur
    from cdv2.sample.line_extract import keras_input

    io = _io(preprocessors_oracle_dir, "lineart_keras")
    np.testing.assert_array_equal(gaussian_blur(io["image"], 3.0), io["blurred"])
    np.testing.assert_array_equal(keras_input(io["image"]), _nhwc(io["net_in"]))


def test_one_compile_per_input_size(extractors):
    from cdv2.sample import line_extract

    ex = extractors("lineart_sk")
    x = np.random.default_rng(0).uniform(0, 255, (2, 12, 8, 3)).astype(np.float32)
    before = line_extract._run._cache_size()
    y1 = np.asarray(ex.net(x))
    y2 = np.asarray(ex.net(x[::-1].copy()))
    assert line_extract._run._cache_size() == before + 1
    np.testing.assert_allclose(y2, y1[::-1], rtol=1e-5, atol=1e-6)   # batched: items independent
    ex.net(x[:, :8])
    assert line_extract._run._cache_size() == before + 2


def test_bf16_compute(fixture_state, preprocessors_oracle_dir):
    import jax.numpy as jnp

    from cdv2.sample.line_extract import LineExtractor

    io = _io(preprocessors_oracle_dir, "lineart_sk")
    ex = LineExtractor.from_state_dict("lineart_sk", fixture_state("lineart_sk"), dtype=jnp.bfloat16)
    y = np.asarray(ex.net(_nhwc(io["net_in"])))
    assert y.dtype == np.float32 and np.isfinite(y).all()
    assert rel_err(y, _nhwc(io["net_out"])) < 3e-2


def test_wrong_weight_file_lists_every_problem(fixture_state):
    from cdv2.sample.line_extract import keymap
    from cdv2.weights.keymaps.common import WeightKeysError

    sd = dict(fixture_state("lineart_keras"))
    cfg = keymap("lineart_keras").infer_config(sd)
    del sd["upblock_2.6.weight"]
    sd["extra.weight"] = np.zeros((3,), np.float32)
    sd["last_conv.bias"] = np.zeros((2,), np.float32)
    with pytest.raises(WeightKeysError) as e:
        keymap("lineart_keras").convert(sd, cfg)
    msg = str(e.value)
    assert "upblock_2.6.weight" in msg and "extra.weight" in msg and "last_conv.bias" in msg
    with pytest.raises(WeightKeysError, match="lineart_sk"):
        keymap("lineart_sk").infer_config(sd)                    # another network's file


def test_bad_inputs_raise_clearly(extractors):
    from cdv2.sample.line_extract import build_network, preprocess_sketch

    with pytest.raises(ValueError, match="unknown line extractor"):
        build_network("lineart_xyz")
    with pytest.raises(ValueError, match="sketch preprocessor must be"):
        preprocess_sketch(np.zeros((64, 64, 3), np.uint8), (64, 64), method="outline")
    with pytest.raises(ValueError, match="needs its converted params"):
        preprocess_sketch(np.zeros((64, 64, 3), np.uint8), (64, 64), method="extract", extractor="lineart")
    with pytest.raises(ValueError, match="divisible by 32"):
        extractors("lineart_keras").net(np.zeros((1, 48, 64, 1), np.float32))
