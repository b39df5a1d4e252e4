"""Converters between the authors' torch checkpoint and cdv2 params / weights directories.

Everything runs on the tiny oracle checkpoint (74 MB); the full-size memory check is
tools/bench_convert_memory.py, not a test.
"""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from cdv2.config import load_model_config
from cdv2.weights.torch_layout import torch_shape_to_flax
from cdv2.weights.v2_checkpoint import (SCHEDULE_BUFFERS, CheckpointMismatchError, convert_v2_checkpoint,
                                        export_v2_checkpoint, flatten_tree, param_path_to_torch_key,
                                        read_torch_checkpoint, schedule_buffers, torch_key_to_param_path,
                                        unflatten_tree, write_safetensors)
from cdv2.weights.weights_dir import load_weights_dir, read_manifest, save_weights_dir
from conftest import DATA

LORA_KEY = "model.diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.lora_down_fg.weight"


def expected_from(shapes: dict) -> dict:
    """Expected Flax param shapes derived from {torch key: torch shape} (schedule buffers dropped)."""
    flat = {}
    for key, shape in shapes.items():
        path = torch_key_to_param_path(key, len(shape))
        if path is not None:
            flat[path] = torch_shape_to_flax(tuple(shape))
    return unflatten_tree(flat)


@pytest.fixture(scope="module")
def tiny_path(oracle_dir):
    return oracle_dir / "tiny_v2.safetensors"


@pytest.fixture(scope="module")
def tiny_sd(tiny_path):
    with safe_open(tiny_path, "numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def tiny_expected(tiny_sd):
    return expected_from({k: v.shape for k, v in tiny_sd.items()})


@pytest.fixture(scope="module")
def tiny_converted(tiny_path, tiny_expected):
    return convert_v2_checkpoint(tiny_path, tiny_expected, progress=False)


def assert_trees_equal(a, b):
    fa, fb = flatten_tree(a), flatten_tree(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]), k


def test_reader_matches_the_safetensors_library(tiny_path, tiny_sd):
    with read_torch_checkpoint(tiny_path) as r:
        assert sorted(r.keys()) == sorted(tiny_sd)
        for k, v in tiny_sd.items():
            got = r.get(k)
            assert got.dtype == v.dtype and got.shape == v.shape and np.array_equal(got, v), k


def test_writer_is_byte_identical_to_the_safetensors_library(tmp_path):
    rng = np.random.RandomState(0)
    arrays = {"b.w": rng.randn(3, 5).astype(np.float16), "a": rng.randn(7).astype(np.float32),
              "z": rng.randn(2, 2, 1, 1).astype(np.float64), "c": rng.randn(4).astype(np.float16),
              "scalar": np.array(3.5, np.float32)}
    for meta in (None, {"format": "x"}):
        save_file(arrays, tmp_path / "lib.safetensors", metadata=meta)
        write_safetensors(tmp_path / "ours.safetensors",
                          [(k, v.dtype, v.shape, lambda v=v: v) for k, v in arrays.items()], metadata=meta)
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_bf16_tensors_read_and_write_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    t = torch.randn(6, 4).to(torch.bfloat16)
    save_torch({"w": t, "h": t[0].half()}, tmp_path / "lib.safetensors")
    with read_torch_checkpoint(tmp_path / "lib.safetensors") as r:
        w = r.get("w")
        assert w.dtype == ml_dtypes.bfloat16
        assert np.array_equal(w.astype(np.float32), t.float().numpy())
        write_safetensors(tmp_path / "ours.safetensors",
                          [(k, r.dtype(k), r.shape(k), lambda k=k: r.get(k)) for k in r.keys()])
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()


def test_tiny_converts_to_flax_layout_in_fp32(tiny_sd, tiny_converted):
    params, source_dtypes = tiny_converted
    assert set(params) == {"unet", "sketch_encoder", "bg_encoder", "style_encoder", "vae"}
    assert len(flatten_tree(params)) == len(tiny_sd) - len(SCHEDULE_BUFFERS) == len(source_dtypes)
    assert all(v.dtype == np.float32 for v in flatten_tree(params).values())
    conv = params["unet"]["input_blocks_1_0"]["in_layers_2"]["kernel"]
    ref = tiny_sd["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"]
    assert np.array_equal(conv, ref.transpose(2, 3, 1, 0))
    dense = params["style_encoder"]["zero_layers_3"]["kernel"]
    assert np.array_equal(dense, tiny_sd["style_encoder.zero_layers.3.weight"].T)
    lora = params["unet"]["output_blocks_3_1"]["transformer_blocks_0"]["attn2"]["to_k"]["lora_down_fg"]["kernel"]
    assert np.array_equal(lora, tiny_sd[LORA_KEY].T)
    assert np.array_equal(params["vae"]["decoder"]["mid"]["block_1"]["norm1"]["scale"],
                          tiny_sd["first_stage_model.decoder.mid.block_1.norm1.weight"])


def test_schedule_buffers_match_the_authors_bit_exactly(tiny_sd):
    for name, buf in schedule_buffers().items():
        assert buf.dtype == np.float32 and np.array_equal(buf, tiny_sd[name]), name


def test_round_trip_reproduces_the_file_byte_for_byte(tmp_path, tiny_path, tiny_converted):
    params, source_dtypes = tiny_converted
    export_v2_checkpoint(params, tmp_path / "rt.safetensors", source_dtypes=source_dtypes)
    assert (tmp_path / "rt.safetensors").read_bytes() == tiny_path.read_bytes()


@pytest.mark.parametrize("variant", ["fp16_vae", "bf16_style"])
def test_half_precision_sources_round_trip_bit_exactly(tmp_path, tiny_sd, tiny_expected, variant):
    prefix, dtype = {"fp16_vae": ("first_stage_model.", np.float16),
                     "bf16_style": ("style_encoder.", ml_dtypes.bfloat16)}[variant]
    sd = {k: (v.astype(dtype) if k.startswith(prefix) else v) for k, v in tiny_sd.items()}
    src = tmp_path / "src.safetensors"
    write_safetensors(src, [(k, v.dtype, v.shape, lambda v=v: v) for k, v in sd.items()])
    params, source_dtypes = convert_v2_checkpoint(src, tiny_expected, progress=False)
    assert all(v.dtype == np.float32 for v in flatten_tree(params).values())
    assert {k for k, d in source_dtypes.items() if d != "float32"} == \
        {k for k in sd if k.startswith(prefix)}
    export_v2_checkpoint(params, tmp_path / "rt.safetensors", source_dtypes=source_dtypes)
    with read_torch_checkpoint(tmp_path / "rt.safetensors") as r:
        assert set(r.keys()) == set(sd)
        for k, v in sd.items():
            got = r.get(k)
            assert got.dtype == v.dtype and np.array_equal(got.view(np.uint8), v.view(np.uint8)), k
    if variant == "fp16_vae":  # the default dtypes are the released ones: same file without the record
        export_v2_checkpoint(params, tmp_path / "default.safetensors")
        assert (tmp_path / "default.safetensors").read_bytes() == src.read_bytes()


def test_pickle_with_state_dict_wrapper_converts_like_safetensors(tmp_path, tiny_sd, tiny_expected,
                                                                  tiny_converted):
    torch = pytest.importorskip("torch")
    pth = tmp_path / "v2.pth"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tiny_sd.items()}, "epoch": 3}, pth)
    params, source_dtypes = convert_v2_checkpoint(pth, tiny_expected, progress=False)
    assert source_dtypes == tiny_converted[1]
    assert_trees_equal(params, tiny_converted[0])


def _convert_bad(tmp_path, sd, expected, **kw):
    src = tmp_path / "bad.safetensors"
    save_file(sd, src)
    with pytest.raises(CheckpointMismatchError) as info:
        convert_v2_checkpoint(src, expected, progress=False, **kw)
    return info.value, str(info.value)


def test_missing_key_is_named(tmp_path, tiny_sd, tiny_expected):
    sd = {k: v for k, v in tiny_sd.items() if k != "model.diffusion_model.out.2.bias"}
    err, msg = _convert_bad(tmp_path, sd, tiny_expected)
    assert err.missing == [("model.diffusion_model.out.2.bias", (4,))]
    assert "missing (1)" in msg and "model.diffusion_model.out.2.bias" in msg


def test_unexpected_keys_are_named_and_known_extras_can_be_skipped(tmp_path, tiny_sd, tiny_expected):
    lora_in = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.lora_down_fg.weight"
    sd = dict(tiny_sd, **{lora_in: np.ones((4, 32), np.float32),
                          "cond_stage_model.model.visual.proj": np.ones((64, 64), np.float32)})
    err, msg = _convert_bad(tmp_path, sd, tiny_expected)
    assert {k for k, _ in err.unexpected} == {lora_in, "cond_stage_model.model.visual.proj"}
    assert lora_in in msg and "cond_stage_model.model.visual.proj" in msg
    with pytest.warns(UserWarning, match="cond_stage_model"):
        err, msg = _convert_bad(tmp_path, sd, tiny_expected, allow_unexpected_prefixes=("cond_stage_model.",))
    assert [k for k, _ in err.unexpected] == [lora_in]
    del sd[lora_in]
    with pytest.warns(UserWarning, match="cond_stage_model"):
        params, _ = convert_v2_checkpoint(sd, tiny_expected, progress=False,
                                          allow_unexpected_prefixes=("cond_stage_model.",))
    assert_trees_equal(params, convert_v2_checkpoint(tiny_sd, tiny_expected, progress=False)[0])


def test_misshaped_key_is_named_with_both_shapes(tmp_path, tiny_sd, tiny_expected):
    key = "bg_encoder.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    sd = dict(tiny_sd, **{key: np.ones((32, 48), np.float32)})
    err, msg = _convert_bad(tmp_path, sd, tiny_expected)
    assert err.misshaped == [(key, (32, 64), (32, 48))] and not err.missing
    assert f"{key}  expected [32, 64], got [32, 48]" in msg
    norm = "first_stage_model.encoder.norm_out.weight"  # 1-D expected, 2-D given: one mis-shape
    err, _ = _convert_bad(tmp_path, dict(tiny_sd, **{norm: np.ones((64, 1), np.float32)}), tiny_expected)
    assert err.misshaped == [(norm, (64,), (64, 1))] and not err.missing and not err.unexpected


def test_wrong_schedule_buffer_is_named(tmp_path, tiny_sd, tiny_expected):
    linear = np.linspace(0.00085, 0.012, 1000).astype(np.float32)  # linear, not scaled-linear
    err, msg = _convert_bad(tmp_path, dict(tiny_sd, betas=linear), tiny_expected)
    assert len(err.problems) == 1 and err.problems[0].startswith("betas:")
    sd = {k: v for k, v in tiny_sd.items() if k not in SCHEDULE_BUFFERS}  # absent buffers: fine
    params, _ = convert_v2_checkpoint(sd, tiny_expected, progress=False)
    assert len(flatten_tree(params)) == len(sd)


def test_all_problems_are_reported_together(tmp_path, tiny_sd, tiny_expected):
    sd = {k: v for k, v in tiny_sd.items() if k != "control_encoder.model.0.bias"}
    sd.update({"model_ema.decay": np.ones((), np.float32), "betas": np.ones(1000, np.float32),
               "vae_typo.weight": np.ones(3, np.float32),
               "model.diffusion_model.out.2.weight": np.ones((4, 32, 1, 1), np.float32)})
    err, msg = _convert_bad(tmp_path, sd, tiny_expected)
    assert "5 problems" in msg
    for name in ["control_encoder.model.0.bias", "model_ema.decay", "vae_typo.weight", "betas:",
                 "model.diffusion_model.out.2.weight  expected [4, 32, 3, 3], got [4, 32, 1, 1]"]:
        assert name in msg


def test_released_key_list_maps_bijectively():
    rows = [line.split(maxsplit=1) for line in open(DATA / "v2_expected_keys.txt")]
    shapes = {k: tuple(json.loads(s)) for k, s in rows}
    assert len(shapes) == 1884
    paths = {}
    for key, shape in shapes.items():
        path = torch_key_to_param_path(key, len(shape))
        assert (path is None) == (key in SCHEDULE_BUFFERS), key
        if path is not None:
            assert param_path_to_torch_key(path) == key
            paths[path] = key
    assert len(paths) == 1884 - len(SCHEDULE_BUFFERS)  # injective
    flat = flatten_tree(expected_from(shapes))
    assert set(flat) == set(paths)
    assert {param_path_to_torch_key(p) for p in flat} == set(shapes) - set(SCHEDULE_BUFFERS)


def test_weights_dir_round_trip(tmp_path, tiny_path, tiny_converted):
    params, source_dtypes = tiny_converted
    cfg = load_model_config("tiny")
    out = save_weights_dir(tmp_path / "w", params, cfg, source_dtypes, source=tiny_path)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json", "params.safetensors"]
    loaded, cfg2 = load_weights_dir(out, expected_shapes=params)
    assert cfg2 == cfg
    assert_trees_equal(loaded, params)
    with safe_open(out / "params.safetensors", "numpy") as f:
        assert "unet/input_blocks_1_0/in_layers_2/kernel" in f.keys()
    man = read_manifest(out)
    assert man["source"] == str(tiny_path) and man["source_dtypes"] == source_dtypes
    assert man["num_tensors"] == len(flatten_tree(params))
    half, _ = load_weights_dir(out, dtype=ml_dtypes.bfloat16)
    assert half["vae"]["quant_conv"]["kernel"].dtype == ml_dtypes.bfloat16


def test_weights_dir_refuses_to_overwrite_and_keeps_user_files(tmp_path, tiny_converted):
    params, _ = tiny_converted
    small = {"vae": params["vae"]}
    cfg = load_model_config("tiny")
    d = tmp_path / "w"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_weights_dir(d, small, cfg)
    assert [p.name for p in d.iterdir()] == ["notes.txt"]
    save_weights_dir(d, small, cfg, overwrite=True)
    assert (d / "notes.txt").read_text() == "mine"
    assert_trees_equal(load_weights_dir(d)[0], small)


def test_weights_dir_load_errors_name_what_is_wrong(tmp_path, tiny_converted):
    params, _ = tiny_converted
    with pytest.raises(FileNotFoundError, match="not found"):
        load_weights_dir(tmp_path / "nowhere")
    d = save_weights_dir(tmp_path / "w", {"vae": params["vae"]}, load_model_config("tiny"))
    expected = {"vae": dict(params["vae"]), "clip": {"proj": (64, 64)}}
    expected["vae"]["quant_conv"] = {"kernel": (1, 1, 8, 9), "bias": (8,)}
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights_dir(d, expected_shapes=expected)
    assert info.value.missing == [("clip/proj", (64, 64))]
    assert info.value.misshaped == [("vae/quant_conv/kernel", (1, 1, 8, 9), (1, 1, 8, 8))]
    (d / "params.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing params.safetensors"):
        load_weights_dir(d)


def test_command_line_tools_round_trip_and_fail_cleanly(tmp_path, tiny_path, capsys):
    from cdv2.cli import convert, export

    w = tmp_path / "w"
    assert convert.main(["--checkpoint", str(tiny_path), "--config", "tiny", "--out", str(w),
                         "--no-progress"]) == 0
    assert export.main(["--weights", str(w), "--out", str(tmp_path / "rt.safetensors"),
                        "--no-progress"]) == 0
    assert (tmp_path / "rt.safetensors").read_bytes() == tiny_path.read_bytes()
    capsys.readouterr()
    assert convert.main(["--checkpoint", str(tiny_path), "--config", "tiny", "--out", str(w)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert convert.main(["--checkpoint", str(tmp_path / "none.safetensors"), "--config", "tiny",
                         "--out", str(tmp_path / "x")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert export.main(["--weights", str(w), "--out", str(tmp_path / "rt.safetensors")]) == 1
    assert "exists" in capsys.readouterr().err
