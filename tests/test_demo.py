"""`cdv2 demo` end to end at a toy size (data -> VAE fit -> stage-1 training -> sampling -> PNGs),
its resume on a second run, and `cdv2 colorize` with no arguments starting it."""
import json

import numpy as np
from PIL import Image

from cdv2 import demo
from cdv2.cli import main as cli_main

ARGS = ["--train-seconds", "4", "--vae-steps", "3", "--images", "12", "--size", "64", "--batch", "4",
        "--steps", "2"]


def test_demo_writes_grid_and_curve_and_resumes(tmp_path, compilation_cache):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), *ARGS]) == 0
    grid = Image.open(out / "samples.png")
    # 4 held-out rows of (sketch | reference | output | ground truth), 64-px cells, 2-px gaps
    assert grid.size == (4 * 66 + 2, 4 * 66 + 2)
    cells = np.asarray(grid.convert("RGB"), np.float32)
    output = cells[2:66, 2 + 2 * 66:2 * 66 + 66]     # row 0, column 2: the model's colorization
    assert output.std() > 1.0                          # a real image, not a blank cell
    first = json.loads((out / "demo_state.json").read_text())
    assert first["steps"] == list(range(1, len(first["steps"]) + 1)) and len(first["steps"]) >= 1
    assert all(np.isfinite(first["losses"]))
    assert Image.open(out / "loss.png").size == (640, 360)
    vae = (out / "vae.npz").read_bytes()

    assert demo.main(["--out", str(out), *ARGS]) == 0  # again: reuses data + VAE, resumes training
    second = json.loads((out / "demo_state.json").read_text())
    n = len(first["steps"])
    assert second["steps"][:n] == first["steps"] and len(second["steps"]) > n
    assert second["steps"][n] == first["steps"][-1] + 1  # continues from the checkpoint
    assert (out / "vae.npz").read_bytes() == vae


def test_bad_size_is_refused(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--size", "100"]) == 1
    assert "multiple of 64" in capsys.readouterr().err


def test_colorize_without_arguments_runs_the_demo(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda args: seen.append(args))
    assert cli_main(["colorize", "--demo-out", str(tmp_path / "d"), "--seed", "3"]) == 0
    assert seen[0].out == str(tmp_path / "d") and seen[0].seed == 3
    assert "cdv2 convert" in capsys.readouterr().out  # and says how to get the real weights
    # inputs without weights: not silently colorized by the toy model
    assert cli_main(["colorize", "--sketch", "s.png", "--reference", "r.png", "--out", "o.png"]) == 2 and len(seen) == 1
