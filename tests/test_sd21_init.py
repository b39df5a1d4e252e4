"""SD2.1-768-v weights -> cdv2 (cdv2.weights.sd21, sd21_init): key coverage of the real files at full
size (header only, jax.eval_shape: nothing full-size is materialised), round trips and errors on a
tiny model, parity against diffusers' UNet2DConditionModel, and the stage-1 init as the authors do."""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import DATA, read_key_list, rel_err
from cdv2.config import CLIPTextConfig, load_model_config
from cdv2.model import build
from cdv2.weights.pretrained import model_param_shapes
from cdv2.weights.diffusers_vae import diffusers_vae_to_ldm
from cdv2.weights.mismatch import CheckpointMismatchError
from cdv2.weights.open_clip import params_to_open_clip
from cdv2.weights.open_clip_text import params_to_open_clip_text
from cdv2.weights.sd21 import (EMA_PREFIX, TEXT_PREFIX, UNET_PREFIX, convert_diffusers_folder,
                               convert_sd21_checkpoint, diffusers_unet_targets, is_unet_base, ldm_targets,
                               plan_sd21_checkpoint)
from cdv2.weights.sd21_init import init_from_sd21
from cdv2.weights.torch_layout import LAYOUT
from cdv2.weights.tree import flatten, leaf_shape, unflatten
from cdv2.weights.v2_checkpoint import schedule_buffers


class ShapeReader:
    """The reader interface over a key list: header only, `get` must never be called."""

    def __init__(self, shapes, name="<key list>"):
        self.shapes, self.path = dict(shapes), name

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]

    def dtype(self, key):
        return np.float32

    def get(self, key):
        raise AssertionError("a header-only check read a tensor")


def _list(name):
    return {k: s for k, (s, _) in read_key_list(DATA / name).items()}


@pytest.fixture(scope="module")
def v2():
    return load_model_config("v2")


# ---------------------------------------------------------------- full size: the real key lists
def test_ldm_key_list_is_exactly_the_unet_base_and_vae(v2):
    want = _list("sd21_ldm_keys.txt")
    table = ldm_targets(v2)
    assert {k: t.shape for k, t in table.items()} == {k: s for k, s in want.items()
                                                      if k.startswith((UNET_PREFIX, "first_stage_model."))}
    base = [p for p in flatten(model_param_shapes(v2, ("unet",))["unet"], sep=None) if is_unet_base(p)]
    n_vae = len(flatten(model_param_shapes(v2, ("vae",))))
    assert len({t.path for t in table.values()}) == len(table) == len(base) + n_vae
    todo = plan_sd21_checkpoint(ShapeReader(want), v2)  # text tower + schedule buffers skipped, no error
    assert len(todo) == len(table) == 934
    # a training file: the U-Net as LitEma copies (dots dropped) next to the raw weights
    ema = {EMA_PREFIX + k[len("model."):].replace(".", ""): s for k, s in want.items() if k.startswith(UNET_PREFIX)}
    todo = plan_sd21_checkpoint(ShapeReader({**want, **ema, "model_ema.decay": (), "model_ema.num_updates": ()}),
                                v2, ema=True)
    assert sum(k.startswith(EMA_PREFIX) for k, _ in todo) == 686


def test_diffusers_unet_key_list_is_exactly_the_unet_base(v2):
    want = _list("sd21_diffusers_unet_keys.txt")
    table = diffusers_unet_targets(v2)
    assert {k: t.shape for k, t in table.items()} == want
    assert len({t.path for t in table.values()}) == 686


def test_diffusers_vae_key_list_maps_onto_the_vae(v2):
    # zero-stride arrays: the real converter runs on the real names and shapes, nothing allocated
    fake = {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in _list("sd21_diffusers_vae_keys.txt").items()}
    ldm = diffusers_vae_to_ldm(fake, v2.vae, dtype=None)
    got = {LAYOUT.to_path(k, v.ndim): v.shape for k, v in ldm.items()}  # torch shapes
    want = {p: LAYOUT.torch_shape(p, leaf_shape(s))
            for p, s in flatten(model_param_shapes(v2, ("vae",))["vae"], sep=None).items()}
    assert got == want and len(got) == 248


def test_text_tower_key_list_names_every_text_param(v2):
    from cdv2.weights.open_clip_text import _path_to_oc_key, expected_text_param_shapes

    text = {k[len(TEXT_PREFIX):] for k in _list("sd21_ldm_keys.txt") if k.startswith(TEXT_PREFIX)}
    shapes = expected_text_param_shapes(v2.clip_text)
    assert {_path_to_oc_key(p) for p in shapes} == text - {"logit_scale"}


# ---------------------------------------------------------------- tiny model: files on disk
TINY_TEXT = CLIPTextConfig(context_length=8, vocab_size=50, width=32, heads=2, layers=2, output_dim=32)


@pytest.fixture(scope="module")
def tiny():
    return dataclasses.replace(load_model_config("tiny"), clip_text=TINY_TEXT)


def _shapes(cfg, groups=("unet", "sketch_encoder", "bg_encoder", "style_encoder", "vae", "clip")):
    return {g: model_param_shapes(cfg, (g,))[g] for g in groups}


def _random_like(shapes, seed):
    """Random non-zero fp32 arrays of the given shapes (numpy: instant, unlike an eager Flax init)."""
    rnd = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: (rnd.standard_normal(s.shape) / np.sqrt(max(1, np.prod(s.shape[:-1])))).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def tiny_source(tiny):
    """Random 'SD2.1' params of the tiny model: U-Net base (flat), VAE, CLIP towers."""
    from cdv2.weights.open_clip_text import expected_text_param_shapes

    p = _random_like(_shapes(tiny, ("unet", "vae", "clip")), 1)
    p["unet"] = {k: v for k, v in flatten(p["unet"], sep=None).items() if is_unet_base(k)}
    text = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in expected_text_param_shapes(TINY_TEXT).items()}
    p["clip_text"] = unflatten(_random_like(text, 2), sep=None)
    return p


def _ldm_state(src, ema=False):
    out = {}
    for path, v in src["unet"].items():
        arr = LAYOUT.to_torch(path, v)
        if path[-2] in ("proj_in", "proj_out") and path[-1] == "kernel":
            arr = arr[:, :, 0, 0]  # SD2.1 stores Linear projections
        key = UNET_PREFIX + LAYOUT.to_key(path)
        out[EMA_PREFIX + key[len("model."):].replace(".", "") if ema else key] = np.ascontiguousarray(arr)
    for path, v in flatten(src["vae"], sep=None).items():
        out["first_stage_model." + LAYOUT.to_key(path)] = LAYOUT.to_torch(path, v)
    out.update(params_to_open_clip_text(src["clip_text"], prefix=TEXT_PREFIX))
    out[TEXT_PREFIX + "logit_scale"] = np.array(4.6, np.float32)
    out.update(schedule_buffers())
    return out


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_source):
    d = tmp_path_factory.mktemp("sd21")
    save_file(_ldm_state(tiny_source), str(d / "v2-1_768-ema-pruned.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in params_to_open_clip(tiny_source["clip"]).items()},
              str(d / "open_clip_model.safetensors"))
    return d / "v2-1_768-ema-pruned.safetensors", d / "open_clip_model.safetensors"


def _flat(tree):
    return tree if all(isinstance(k, tuple) for k in tree) else flatten(tree, sep=None)


def _assert_same(got, want):
    g, w = _flat(got), _flat(want)
    assert g.keys() == w.keys()
    for k in w:
        np.testing.assert_array_equal(g[k], w[k], err_msg=str(k))


def test_ldm_checkpoint_converts_exactly(tiny, tiny_source, tiny_files, tmp_path):
    out = convert_sd21_checkpoint(tiny_files[0], tiny, text=True, progress=False)
    _assert_same(out["unet"], tiny_source["unet"])
    _assert_same(out["vae"], tiny_source["vae"])
    _assert_same(out["clip_text"], tiny_source["clip_text"])
    # conv-form projections ([C, C, 1, 1], SD1.x / the authors' files) are the same params
    state = _ldm_state(tiny_source)
    key = UNET_PREFIX + "input_blocks.1.1.proj_in.weight"
    state[key] = state[key][:, :, None, None]
    save_file(state, str(tmp_path / "conv.safetensors"))
    _assert_same(convert_sd21_checkpoint(tmp_path / "conv.safetensors", tiny, progress=False)["unet"],
                 tiny_source["unet"])
    # the U-Net from LitEma's copies
    save_file({**_ldm_state(tiny_source, ema=True), "model_ema.num_updates": np.array(7, np.int64)},
              str(tmp_path / "ema.safetensors"))
    _assert_same(convert_sd21_checkpoint(tmp_path / "ema.safetensors", tiny, ema=True, progress=False)["unet"],
                 tiny_source["unet"])


def test_bad_ldm_checkpoint_names_every_problem(tiny, tiny_source, tmp_path):
    state = _ldm_state(tiny_source)
    del state[UNET_PREFIX + "out.2.bias"]
    state["model.diffusion_model.label_emb.0.0.weight"] = np.zeros((3, 3), np.float32)
    state["first_stage_model.encoder.conv_in.weight"] = np.zeros((8, 3, 3, 3), np.float32)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError) as e:
        convert_sd21_checkpoint(tmp_path / "bad.safetensors", tiny, progress=False)
    assert [k for k, _ in e.value.missing] == [UNET_PREFIX + "out.2.bias"]
    assert [k for k, _ in e.value.unexpected] == ["model.diffusion_model.label_emb.0.0.weight"]
    assert [k for k, _, _ in e.value.misshaped] == ["first_stage_model.encoder.conv_in.weight"]
    assert "out.2.bias" in str(e.value) and "label_emb" in str(e.value) and "conv_in" in str(e.value)
    # a file without the U-Net (e.g. a VAE-only file): every U-Net key named missing
    save_file({k: v for k, v in state.items() if not k.startswith(UNET_PREFIX)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"missing \(\d+\)"):
        convert_sd21_checkpoint(tmp_path / "vae.safetensors", tiny, progress=False)


# ---------------------------------------------------------------- the stage-1 init
def _zero_rule_paths(params):
    pat = {"unet": r"(^|/)(out_layers_3|proj_out)/|^out_2/|^warp_modules_\d+/ff_2/|^style_modules_\d+_2/|/lora_up_",
           "sketch_encoder": r"^(zero_layer_0|zero_blocks_\d+_0)/",
           "bg_encoder": r"(^|/)(out_layers_3|proj_out)/|^zero_layers_\d+/",
           "style_encoder": r"(^|/)(out_layers_3|proj_out)/|^zero_layers_\d+/"}
    return {k: v for k, v in flatten(params).items()
            if k.split("/")[0] in pat and re.search(pat[k.split("/")[0]], k.split("/", 1)[1])}


@pytest.fixture
def fast_fresh_init(monkeypatch):
    """cdv2's own random init (`cdv2.model.init_params`, tested elsewhere) runs the model eagerly;
    here random arrays of the same shapes stand in for it, which is all `init_from_sd21` relies on."""
    import cdv2.model

    def fake(cfg, rng, groups):
        return jax.tree_util.tree_map(jnp.asarray, _random_like(_shapes(cfg, tuple(groups)), 7))

    monkeypatch.setattr(cdv2.model, "init_params", fake)


def test_init_from_sd21_starts_as_the_authors(tiny, tiny_source, tiny_files, fast_fresh_init):
    sd21, oc = tiny_files
    params = init_from_sd21(tiny, jax.random.PRNGKey(0), sd21=str(sd21), open_clip=str(oc), progress=False)
    want = {k: leaf_shape(v) for k, v in flatten(_shapes(tiny)).items()}
    assert {k: np.shape(v) for k, v in flatten(params).items()} == want
    assert all(np.asarray(v).dtype == np.float32 for v in flatten(params).values())
    unet = flatten(params["unet"], sep=None)
    _assert_same({k: unet[k] for k in tiny_source["unet"]}, tiny_source["unet"])  # SD2.1 base
    _assert_same(params["vae"], tiny_source["vae"])
    _assert_same(params["clip"], tiny_source["clip"])
    zeros = _zero_rule_paths(params)
    fresh = {k: v for k, v in zeros.items() if not (k.startswith("unet/") and is_unet_base(tuple(k.split("/")[1:])))}
    assert {k.split("/")[0] for k in fresh} == {"unet", "sketch_encoder", "bg_encoder", "style_encoder"}
    assert sum("lora_up" in k for k in fresh) == 2 * 3 * 9 and sum("warp_modules" in k for k in fresh) == 24
    assert all(not np.any(v) for v in fresh.values())
    # ... and nothing else fresh is zero (LoRA down, warp attention, encoders' other layers are random)
    for k in ("unet/output_blocks_3_1/transformer_blocks_0/attn2/to_q/lora_down_fg/kernel",
              "unet/warp_modules_0/ff_0/kernel", "sketch_encoder/model_0/kernel", "bg_encoder/input_blocks_0_0/kernel",
              "style_encoder/label_emb_0_0/kernel"):
        assert np.any(flatten(params)[k]), k


def test_init_errors_are_clear(tiny, tiny_files, tmp_path):
    sd21, oc = tiny_files
    with pytest.raises(ValueError, match="exactly one of sd21"):
        init_from_sd21(tiny, jax.random.PRNGKey(0), open_clip=str(oc))
    with pytest.raises(ValueError, match="open_clip"):
        init_from_sd21(tiny, jax.random.PRNGKey(0), sd21=str(sd21))
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        init_from_sd21(tiny, jax.random.PRNGKey(0), sd21=str(tmp_path / "nothing.safetensors"), open_clip=str(oc))
    with pytest.raises(FileNotFoundError, match="unet/diffusion_pytorch_model"):
        init_from_sd21(tiny, jax.random.PRNGKey(0), diffusers=str(tmp_path), open_clip=str(oc))


def test_train_config_wires_the_init(tiny_files, monkeypatch):
    import cdv2.weights.sd21_init as sd21_init
    from cdv2.train.config import load_train_config
    from cdv2.train.loop import initial_params

    sd21, oc = tiny_files
    calls = []
    monkeypatch.setattr(sd21_init, "init_from_sd21", lambda cfg, rng, **kw: calls.append((cfg, rng, kw)) or "params")
    cfg = load_train_config("stage1", {"model": "tiny", "init.sd21": str(sd21), "init.open_clip": str(oc)})
    model_cfg = load_model_config("tiny")
    assert initial_params(cfg, model_cfg, seed=3) == "params"
    (got_cfg, rng, kw), = calls
    assert got_cfg == model_cfg and np.array_equal(rng, jax.random.PRNGKey(3))
    assert kw == dict(sd21=str(sd21), diffusers=None, open_clip=str(oc), ema=False)
    with pytest.raises(ValueError, match="not both"):
        load_train_config("stage1", {"init_from": "weights/x", "init.sd21": str(sd21)})
    assert not load_train_config("stage1").init.given  # the shipped config: random until files are named


# ---------------------------------------------------------------- diffusers (torch oracle)
TINY_DIFFUSERS_UNET = dict(
    block_out_channels=(32, 64, 128, 128), attention_head_dim=(2, 4, 8, 8), cross_attention_dim=64,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2, in_channels=4,
    out_channels=4, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    use_linear_projection=True, upcast_attention=True, sample_size=16)
TINY_DIFFUSERS_VAE = dict(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32,
                          latent_channels=4, sample_size=64)


def _randomise(torch, model):
    with torch.no_grad():  # every parameter random and non-zero, activations kept O(1)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
    return model.eval()


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = _randomise(torch, diffusers.UNet2DConditionModel(**TINY_DIFFUSERS_UNET))
    vae = _randomise(torch, diffusers.AutoencoderKL(**TINY_DIFFUSERS_VAE))
    d = tmp_path_factory.mktemp("diffusers_sd21")
    for name, model in (("unet", unet), ("vae", vae)):
        (d / name).mkdir()
        save_file({k: v.contiguous().numpy() for k, v in model.state_dict().items()},
                  str(d / name / "diffusion_pytorch_model.safetensors"))
    return torch, unet, vae, d


@pytest.mark.torch
def test_diffusers_unet_parity(tiny, diffusers_folder):
    torch, unet, vae, folder = diffusers_folder
    _check_unet_parity(torch, unet, folder, tiny)


@pytest.mark.torch
def test_diffusers_unet_parity_with_fewer_norm_groups(tiny, tmp_path):
    """`UNetConfig.norm_groups` is diffusers' norm_num_groups (the demo model's setting)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    unet = _randomise(torch, diffusers.UNet2DConditionModel(**{**TINY_DIFFUSERS_UNET, "norm_num_groups": 8}))
    (tmp_path / "unet").mkdir()
    save_file({k: v.contiguous().numpy() for k, v in unet.state_dict().items()},
              str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    cfg = dataclasses.replace(tiny, unet=dataclasses.replace(tiny.unet, norm_groups=8))
    err8 = _check_unet_parity(torch, unet, tmp_path, cfg)
    assert _check_unet_parity(torch, unet, tmp_path, tiny, tol=None) > 100 * err8  # the setting matters


def _check_unet_parity(torch, unet, folder, tiny, tol=1e-4):
    conv = convert_diffusers_folder(folder, tiny, progress=False, vae=False)
    flat = {p: np.zeros(s.shape, np.float32) for p, s in flatten(_shapes(tiny, ("unet",))["unet"], sep=None).items()}
    base = flatten(conv["unet"], sep=None)
    assert set(base) == {p for p in flat if is_unet_base(p)}
    flat.update(base)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    t = np.array([17.0, 803.0], np.float32)
    ctx = rng.standard_normal((2, 5, 64)).astype(np.float32)
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
    model = build(tiny, attention_impl=None).unet
    out = jax.jit(model.apply)({"params": jax.tree_util.tree_map(jnp.asarray, unflatten(flat, sep=None))},
                      jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))
    err = rel_err(np.asarray(out).transpose(0, 3, 1, 2), ref)
    print(f"diffusers UNet2DConditionModel vs cdv2 U-Net (tiny, fp32, {tiny.unet.norm_groups} norm groups): "
          f"rel err {err:.2e}")
    assert tol is None or err <= tol
    return err


@pytest.mark.torch
def test_diffusers_vae_in_the_folder_converts_exactly(tiny, diffusers_folder):
    from cdv2.weights.torch_layout import state_dict_to_params

    torch, unet, vae, folder = diffusers_folder
    conv = convert_diffusers_folder(folder, tiny, progress=False)
    sd = {k: v.numpy() for k, v in vae.state_dict().items()}
    _assert_same(conv["vae"], state_dict_to_params(diffusers_vae_to_ldm(sd, tiny.vae)))
    assert {k: np.shape(v) for k, v in flatten(conv["vae"]).items()} == \
        {k: leaf_shape(v) for k, v in flatten(model_param_shapes(tiny, ("vae",))["vae"]).items()}


@pytest.mark.torch
def test_init_from_a_diffusers_folder(tiny, diffusers_folder, tiny_files, fast_fresh_init):
    torch, unet, vae, folder = diffusers_folder
    params = init_from_sd21(tiny, jax.random.PRNGKey(0), diffusers=str(folder), open_clip=str(tiny_files[1]),
                            progress=False)
    conv = convert_diffusers_folder(folder, tiny, progress=False)
    unet_flat = flatten(params["unet"], sep=None)
    _assert_same({k: unet_flat[k] for k in flatten(conv["unet"], sep=None)}, flatten(conv["unet"], sep=None))
    _assert_same(params["vae"], conv["vae"])
