"""The built-in demo: the shipped model colorizes held-out synthetic sketches and its colours follow
the reference (measured against the synthetic scenes' known part colours); the colour check itself
on known answers; `cdv2 colorize` with no arguments starting the demo; `cdv2 demo --train`."""
import json

import numpy as np
import pytest
from PIL import Image

from cdv2 import demo
from cdv2.cli import demo as demo_cli
from cdv2.cli import main as cli_main
from cdv2.train.synthetic import held_out_pairs, make_pair


def test_shipped_weights_are_small_fp16():
    from safetensors import safe_open

    files = {p.name: p.stat().st_size for p in demo.DEMO_WEIGHTS.iterdir()}
    assert {"params.safetensors", "config.yaml", "manifest.json"} <= set(files)
    assert files["params.safetensors"] < 20 * 2 ** 20             # 16.8 MB: 8.3 M params in fp16
    with safe_open(str(demo.DEMO_WEIGHTS / "params.safetensors"), "np") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}


def test_colour_check_on_known_answers():
    pairs = held_out_pairs(3, 64, seed=7)
    truth = [np.asarray(p.target) for p in pairs]
    swapped = [1, 2, 0]
    # "outputs" that are the ground truth (own colours) for the own reference, and the ground truth
    # repainted with the other scene's part colours for the swapped one: a perfect transfer
    repainted = []
    for i, j in enumerate(swapped):
        img = truth[i].copy()
        for k, c in enumerate(pairs[j].scene.colors[:len(pairs[i].scene.colors)]):
            img[pairs[i].labels == k + 1] = c
        repainted.append(img)
    good = demo.colour_check(pairs, truth, repainted, swapped)
    assert good["fraction_following_reference"] == 1.0
    assert good["mean"]["own_ref_vs_own_colours"] < 0.02
    # ignoring the reference (the same image for both references) cannot follow both
    bad = demo.colour_check(pairs, truth, truth, swapped)
    assert bad["fraction_following_reference"] == 0.0


def test_pair_shares_parts_and_colours_in_another_layout():
    p = make_pair(np.random.default_rng(3), 64, 64)
    t, r = np.asarray(p.target), np.asarray(p.reference)
    for k, c in enumerate(p.scene.colors):
        for img, lab in ((t, p.labels), (r, p.reference_labels)):
            if (lab == k + 1).any():
                assert (img[lab == k + 1] == c).all()
    assert (p.labels != p.reference_labels).mean() > 0.05          # another layout
    sketch = np.asarray(p.sketch)
    assert set(np.unique(sketch)) <= {0, 255} and (sketch == 255).mean() > 0.6


def test_builtin_demo_colours_follow_the_reference(tmp_path, capsys):
    res = demo.run_builtin_demo(tmp_path / "d", num=4, steps=10)
    grid = Image.open(res["grid"])
    # 4 rows x 6 columns of 128-px cells with 2-px gaps, plus the 14-px header
    assert grid.size == (6 * 130 + 2, 4 * 130 + 2 + 14)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["colour_check.json", "samples.png"]
    check = json.loads((tmp_path / "d" / "colour_check.json").read_text())
    m = check["mean"]
    # the output's part colours are nearer the given reference's than another reference's, both ways
    assert m["own_ref_vs_own_colours"] < m["own_ref_vs_other_colours"]
    assert m["other_ref_vs_other_colours"] < m["other_ref_vs_own_colours"]
    # (an untrained model fails these: its outputs ignore the reference). Per sketch the shipped model
    # follows the reference in only some rows (1 of 4 here; docs/DEMO_MODEL.md), so no per-row check.
    # swapping the reference changes the output
    diffs = [np.abs(a.astype(float) - b.astype(float)).mean() for a, b in zip(res["outputs"], res["swapped_outputs"])]
    assert np.mean(diffs) > 3.0, diffs
    out = capsys.readouterr().out
    assert "compiling" in out and "samples.png" in out


def test_colorize_without_arguments_runs_the_demo(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda args: seen.append(args))
    assert cli_main(["colorize", "--demo-out", str(tmp_path / "d"), "--seed", "3"]) == 0
    assert seen[0].out == str(tmp_path / "d") and seen[0].seed == 3 and not seen[0].train
    assert "cdv2 convert" in capsys.readouterr().out  # and says how to get the real weights
    # inputs without weights: not silently colorized by the toy model
    assert cli_main(["colorize", "--sketch", "s.png", "--reference", "r.png", "--out", "o.png"]) == 2 and len(seen) == 1


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert demo_cli.main(["--out", str(tmp_path), "--num", "1"]) == 1
    assert "at least 2" in capsys.readouterr().err
    assert demo_cli.main(["--train", "--out", str(tmp_path), "--size", "100"]) == 1
    assert "multiple of 64" in capsys.readouterr().err


@pytest.mark.slow
def test_train_demo_trains_resumes_and_writes_grid(tmp_path, compilation_cache):
    out = tmp_path / "t"
    args = ["--train", "--out", str(out), "--train-steps", "2", "--images", "16", "--batch", "4", "--steps", "2",
            "--fast-compile"]
    assert demo_cli.main(args) == 0
    first = json.loads((out / "demo_state.json").read_text())
    assert first["steps"] == [1, 2] and all(np.isfinite(first["losses"]))
    assert Image.open(out / "samples.png").size == (4 * 130 + 2, 4 * 130 + 2 + 14)
    assert demo_cli.main(args) == 0                       # again: resumes for 2 more steps
    assert json.loads((out / "demo_state.json").read_text())["steps"] == [1, 2, 3, 4]


def test_demo_training_refuses_a_vae_config_the_shipped_vae_was_not_fitted_for(tmp_path):
    """`cdv2 demo --train` reuses the built-in VAE + CLIP: same shapes under another config (e.g.
    GroupNorm groups) would silently be another model."""
    import argparse
    import dataclasses

    from cdv2.config import load_model_config
    from cdv2.demo_train import _frozen_parts

    cfg = load_model_config("demo")
    other = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, norm_groups=cfg.vae.norm_groups * 2))
    args = argparse.Namespace(seed=0, fit_vae=0)
    with pytest.raises(ValueError, match="vae config"):
        _frozen_parts(args, tmp_path, tmp_path, other)
