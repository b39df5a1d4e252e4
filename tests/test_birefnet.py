"""rmbg-v2 = BiRefNet (RMBG-2.0 config) + Swin backbone against the torch oracle fixtures.

The fixture net is the same code with a small Swin (embed 48, depths 2-2-2-2, window 12) and
shrunk decoder widths, all read off the weight file; key coverage uses the real Swin-L through
jax.eval_shape only (never materialised)."""
from __future__ import annotations

import json

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from conftest import DATA, nchw_to_nhwc, nhwc_to_nchw, read_key_list, rel_err  # noqa: E402
from cdv2.config import CONFIG_DIR  # noqa: E402
from cdv2.modules.preprocess_nets.birefnet import BiRefNetConfig, image_to_patches  # noqa: E402
from cdv2.modules.preprocess_nets.swin import SwinConfig, SwinTransformer  # noqa: E402
from cdv2.sample import mask_nets  # noqa: E402
from cdv2.weights.keymaps import birefnet as keymap  # noqa: E402
from cdv2.weights.keymaps.common import WeightKeysError  # noqa: E402

TOL = 1e-4
FIXTURE_CONFIG = BiRefNetConfig(swin=SwinConfig(48, (2, 2, 2, 2), (3, 6, 12, 24), 12),
                                dec_inter=16, aspp_inter=64, ipt_inter=16, gdt_channels=16)


@pytest.fixture(scope="module")
def io(preprocessors_oracle_dir):
    return dict(np.load(preprocessors_oracle_dir / "birefnet_io.npz"))


@pytest.fixture(scope="module")
def state(preprocessors_oracle_dir):
    return mask_nets.load_state(preprocessors_oracle_dir / "birefnet_weights.safetensors")


@pytest.fixture(scope="module")
def net(preprocessors_oracle_dir):
    return mask_nets.load_rmbg(preprocessors_oracle_dir / "birefnet_weights.safetensors")


def test_real_size_key_coverage_and_param_count(preprocessors_oracle_dir):
    """eval_shape of the full Swin-L BiRefNet, mapped to torch keys, IS RMBG-2.0's key list."""
    cfg = BiRefNetConfig.from_yaml(CONFIG_DIR / "preprocessors" / "birefnet_swin_l.yaml")
    assert cfg == BiRefNetConfig()
    shapes = keymap.expected_variables(cfg)
    got = keymap.torch_key_shapes(shapes, keymap.NATIVE)
    want = read_key_list(DATA / "birefnet_swin_l_keys.txt")
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
    summary = json.loads((preprocessors_oracle_dir / "summary.json").read_text())
    assert n == summary["_real_params"]["birefnet_swin_l"] == 220_176_498


def test_config_read_from_weights(state):
    assert keymap.infer_config(state) == FIXTURE_CONFIG


def test_bad_weight_file_lists_every_problem(state):
    state = dict(state)
    optional = {k: state.pop(k) for k in list(state) if k.endswith(("relative_position_index", "num_batches_tracked"))}
    assert optional  # deterministic/unused buffers may be absent from a file
    keymap.convert(state, FIXTURE_CONFIG)
    del state["decoder.gdt_convs_attn_3.0.weight"]
    state["decoder.extra.weight"] = np.zeros((1,), np.float32)
    state["bb.norm2.bias"] = np.zeros((5,), np.float32)
    with pytest.raises(WeightKeysError) as err:
        keymap.convert(state, FIXTURE_CONFIG)
    msg = str(err.value)
    assert "decoder.gdt_convs_attn_3.0.weight" in msg and "decoder.extra.weight" in msg and "bb.norm2.bias" in msg
    wrong = {**state, "bb.layers.0.blocks.0.attn.relative_position_index": np.zeros((144, 144), np.int64)}
    with pytest.raises(WeightKeysError, match="relative_position_index"):
        keymap.convert(wrong, FIXTURE_CONFIG)


def test_patch_split_channel_order():
    """RMBG-2.0's `b c (hg h) (wg w) -> b (wg hg c) h w`: channel (wg*HG + hg)*C + c."""
    x = np.arange(1 * 4 * 6 * 3, dtype=np.float32).reshape(1, 4, 6, 3)
    p = np.asarray(image_to_patches(jnp.asarray(x), (2, 2)))  # hg=2, wg=3
    for hg in range(2):
        for wg in range(3):
            for c in range(3):
                np.testing.assert_array_equal(p[0, :, :, (wg * 2 + hg) * 3 + c], x[0, hg * 2:hg * 2 + 2, wg * 2:wg * 2 + 2, c])


def test_network_parity(net, io):
    """All four eval outputs [m4, m3, m2, p1] (logits) on a 256x192 input."""
    outs = mask_nets.birefnet_logits(net.variables, nchw_to_nhwc(io["net_in"]), net.config)
    for name, out in zip(("net_out_m4", "net_out_m3", "net_out_m2", "net_out"), outs):
        assert rel_err(nhwc_to_nchw(out), io[name]) <= TOL, name


def test_swin_bf16_close():
    """The bf16 compute option of the backbone stays close to fp32 (fp32 LayerNorm/softmax)."""
    cfg = SwinConfig(16, (2, 2), (2, 4), 4)
    m32, m16 = SwinTransformer(cfg), SwinTransformer(cfg, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 36, 28, 3))
    v = jax.jit(m32.init)(jax.random.PRNGKey(0), x)
    for a, b in zip(jax.jit(m32.apply)(v, x), jax.jit(m16.apply)(v, x)):
        assert np.isfinite(np.asarray(b, np.float32)).all()
        assert rel_err(np.asarray(b, np.float32), a) <= 3e-2


@pytest.mark.slow
def test_wrapper_parity(net, io):
    """rmbg_proceed: antialiased bilinear to 1024, ImageNet normalise, sigmoid(p1), back to
    96x64, with and without the 11x11 dilation (one compile of the net at 1024 for both)."""
    x = nchw_to_nhwc(io["wrap_in"])
    assert rel_err(nhwc_to_nchw(net.proceed(x, dilate=True)), io["wrap_out_dilate"]) <= TOL
    assert rel_err(nhwc_to_nchw(net.proceed(x)), io["wrap_out"]) <= TOL


def test_bad_input_size_is_named(net):
    with pytest.raises(ValueError, match="multiples of 32"):
        mask_nets.birefnet_logits(net.variables, np.zeros((1, 48, 32, 3), np.float32), net.config)


def test_torch_round_trip(state):
    """file -> Flax variables -> torch state dict reproduces every key and array exactly
    (including the deterministic relative_position_index buffers)."""
    from cdv2.weights.keymaps.common import variables_to_state

    back = variables_to_state(keymap.convert(state, FIXTURE_CONFIG), keymap.NATIVE)
    assert set(back) == set(state)
    assert [k for k in state if not k.endswith("num_batches_tracked") and not np.array_equal(back[k], state[k])] == []
