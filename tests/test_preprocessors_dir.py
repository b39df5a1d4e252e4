"""Preprocessor weights directories (issue 11, "Use"): `cdv2 convert --preprocessor(s-from)` on the
torch fixtures (../shared/oracle/preprocessors), `Preprocessors.load`, and the app's calls through
it against the fixtures' wrapper outputs (same 1e-4 tolerance as the per-network tests)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from conftest import nchw_to_nhwc, nhwc_to_nchw, rel_err
from cdv2.cli import convert as cli
from cdv2.sample.preprocessors import MissingPreprocessorError, Preprocessors
from cdv2.weights import preprocessors_dir as ppd
from cdv2.weights.keymaps.common import WeightKeysError
from cdv2.weights.mismatch import CheckpointMismatchError

TOL = 1e-4


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory, preprocessors_oracle_dir):
    """The fixtures laid out like the app's preprocessor/weights (sketch mask, RMBG-2.0 in the HF
    cache layout), converted through the CLI, plus one line extractor named on the command line."""
    root = tmp_path_factory.mktemp("pp")
    app = root / "preprocessor" / "weights"
    snap = app / "models--briaai--RMBG-2.0" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (app / "sketch-segment.safetensors").symlink_to(preprocessors_oracle_dir / "isnet_weights.safetensors")
    (snap / "model.safetensors").symlink_to(preprocessors_oracle_dir / "birefnet_weights.safetensors")
    out = root / "out"
    rc = cli.main(["--preprocessors-from", str(root), "--out", str(out), "--preprocessor", "lineart_sk",
                   str(preprocessors_oracle_dir / "lineart_sk_weights.safetensors")])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def pre(out_dir):
    return Preprocessors.load(out_dir)


def _io(d, name):
    return dict(np.load(d / f"{name}_io.npz"))


def test_directory_layout_and_available(out_dir, pre):
    assert sorted(ppd.list_preprocessors(out_dir)) == ["isnet-sketch", "lineart_sk", "rmbg-v2"]
    manifest = json.loads((out_dir / "rmbg-v2" / "manifest.json").read_text())
    assert manifest["format"] == "cdv2-preprocessor" and manifest["source"].endswith("0123abc/model.safetensors")
    assert pre.available() == {"isnet": False, "isnet-sketch": True, "rmbg-v2": True, "lineart_keras": False,
                               "lineart": False, "lineart_denoise": False, "lineart_sk": True}


def test_stored_variables_equal_direct_conversion(out_dir, preprocessors_oracle_dir):
    """What the directory holds is exactly the key map's conversion of the file (and its config)."""
    from cdv2.weights.readers import load_state_dict
    from cdv2.weights.tree import flatten

    state = load_state_dict(preprocessors_oracle_dir / "lineart_sk_weights.safetensors", np.float32)
    want, cfg = ppd.convert_state("lineart_sk", state)
    got, got_cfg, _ = ppd.load_preprocessor(out_dir, "lineart_sk")
    assert got_cfg == cfg
    want, got = flatten(want), flatten(got)
    assert sorted(want) == sorted(got)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_sketch_mask_matches_app(pre, preprocessors_oracle_dir):
    """ISNet-sketch.proceed(white_sketch, th=H, tw=W, crop=False)."""
    io = _io(preprocessors_oracle_dir, "isnet")
    out = pre.sketch_mask(nchw_to_nhwc(io["wrap_sketch_in"]), 96, 64)
    assert out.shape == (1, 96, 64, 1)
    assert rel_err(nhwc_to_nchw(out), io["wrap_sketch_out"]) <= TOL


def test_rmbg_masks_match_app(pre, preprocessors_oracle_dir):
    """rmbg-v2: the reference mask (dilate=True) and the background removal on results (one
    compile of the network at 1024 x 1024 serves both)."""
    io = _io(preprocessors_oracle_dir, "birefnet")
    x = nchw_to_nhwc(io["wrap_in"])
    assert rel_err(nhwc_to_nchw(pre.reference_mask(x, "rmbg-v2")), io["wrap_out_dilate"]) <= TOL
    assert rel_err(nhwc_to_nchw(pre.remove_background(x)), io["wrap_out"]) <= TOL
    # a uint8 image goes through the app's to_tensor; the Colorizer hook is the undilated mask
    assert rel_err(nhwc_to_nchw(pre.reference_mask(io["wrap_image"])), io["wrap_out_dilate"]) <= TOL
    assert rel_err(pre.mask_fn("rmbg-v2")(io["wrap_image"]), io["wrap_out"][0, 0]) <= TOL


def test_line_extractor_matches_app(pre, preprocessors_oracle_dir):
    io = _io(preprocessors_oracle_dir, "lineart_sk")
    assert rel_err(pre.extract_lines(io["image"], "lineart_sk"), nchw_to_nhwc(io["wrapper_out"])) <= TOL


def test_missing_network_names_file_and_command(pre):
    with pytest.raises(MissingPreprocessorError, match=r"netG\.pth.*cdv2 convert --preprocessor lineart "):
        pre.extract_lines(np.zeros((8, 8, 3), np.uint8), "lineart")
    with pytest.raises(MissingPreprocessorError, match=r"isnetis\.safetensors"):
        pre.reference_mask(np.zeros((1, 8, 8, 3), np.float32), "ISNet")   # the app's spelling
    with pytest.raises(MissingPreprocessorError, match="no preprocessor directory"):
        Preprocessors.empty().sketch_mask(np.zeros((1, 8, 8, 3), np.float32), 8, 8)
    with pytest.raises(ValueError, match="mask extractor must be one of"):
        pre.reference_mask(np.zeros((1, 8, 8, 3), np.float32), "lineart_sk")
    assert not Preprocessors.empty().has("rmbg-v2")


def test_fallback_warns_once():
    pre = Preprocessors.empty()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            pre.warn_missing("isnet-sketch", "masks.estimate_sketch_mask")
    assert len(caught) == 1 and "ISNet-sketch" in str(caught[0].message)


def test_wrong_file_is_one_cli_line_listing_keys(tmp_path, preprocessors_oracle_dir, capsys):
    rc = cli.main(["--preprocessor", "isnet-sketch", str(preprocessors_oracle_dir / "lineart_sk_weights.safetensors"),
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert "missing (" in err and "side1.weight" in err and "unexpected (24)" in err and "model0.1.weight" in err
    assert not (tmp_path / "o" / "isnet-sketch").exists()


def test_partial_file_lists_missing_and_misshaped(tmp_path, preprocessors_oracle_dir):
    from safetensors.numpy import load_file, save_file

    state = load_file(str(preprocessors_oracle_dir / "lineart_sk_weights.safetensors"))
    del state["model3.0.bias"]
    state["model1.0.bias"] = np.zeros((7,), np.float16)
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightKeysError) as e:
        ppd.convert_preprocessor("lineart_sk", tmp_path / "partial.safetensors", tmp_path / "o")
    msg = str(e.value)
    assert "missing (1): model3.0.bias" in msg and "mis-shaped (1): model1.0.bias" in msg


def test_tampered_directory_is_refused(tmp_path, out_dir):
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(out_dir / "lineart_sk", tmp_path / "lineart_sk")
    flat = load_file(str(tmp_path / "lineart_sk" / "params.safetensors"))
    del flat["params/model3_0/bias"]
    save_file(flat, str(tmp_path / "lineart_sk" / "params.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="model3.0.bias"):
        Preprocessors.load(tmp_path).network("lineart_sk")


def test_app_folder_discovery(tmp_path):
    """Every released file name (the app's remote_model_dict basenames + RMBG-2.0's HF cache)."""
    app = tmp_path / "colorizeDiffusion" / "preprocessor" / "weights"
    (app / "models--briaai--RMBG-2.0" / "snapshots" / "x").mkdir(parents=True)
    names = ["netG.pth", "erika.pth", "model.pth", "sk_model.pth", "isnetis.safetensors",
             "sketch-segment.safetensors", "models--briaai--RMBG-2.0/snapshots/x/model.safetensors"]
    for n in names:
        (app / n).write_bytes(b"")
    found = ppd.find_app_weights(tmp_path / "colorizeDiffusion")
    assert {k: v.relative_to(app).as_posix() for k, v in found.items()} == dict(zip(
        ["lineart", "lineart_denoise", "lineart_keras", "lineart_sk", "isnet", "isnet-sketch", "rmbg-v2"], names))
    with pytest.raises(FileNotFoundError, match="sketch-segment.safetensors"):
        ppd.find_app_weights(tmp_path / "colorizeDiffusion" / "preprocessor" / "weights" / "models--briaai--RMBG-2.0",
                             required=True)


def test_network_table_agrees_with_line_extractors():
    from cdv2.sample.line_extract import EXTRACTORS

    for name, (module, _, file) in EXTRACTORS.items():
        assert ppd.NETWORKS[name].files == (file,) and ppd.NETWORKS[name].keymap == module
