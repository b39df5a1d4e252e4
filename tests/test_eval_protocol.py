"""The evaluation protocol end to end on tiny synthetic data: metric wiring, the baselines,
the report files, and `python -m cdv2.eval` argument checks."""
import json

import numpy as np
import pytest

from cdv2.cli import eval as eval_cli
from cdv2.eval import protocol
from cdv2.eval.report import write_report


def test_protocol_ranks_oracle_above_baseline(tmp_path):
    items = protocol.synthetic_items(6, 64, seed=1)
    assert all((it.random_reference != it.target).any() for it in items)        # never its own image
    assert all(np.abs(it.tps_reference.astype(int) - it.target).mean() > 1 for it in items)  # deformed

    def oracle(sketch, reference, *, mode, seed):   # returns the ground truth of the sketch it is given
        return next(it.target for it in items if it.sketch is sketch)

    def feats(images):                              # a stand-in feature extractor (FID wiring)
        return np.concatenate([images.mean((1, 2)), images.std((1, 2))], -1) + 1e-3 * np.random.default_rng(0).normal(size=(len(images), 6))

    clip = lambda imgs: imgs.reshape(len(imgs), -1).astype(float)
    good = protocol.evaluate(oracle, items, inception=feats, clip_embed=clip, progress=False)["vanilla"]
    flat = protocol.evaluate(eval_cli.flat_fill, items, inception=feats, clip_embed=clip, progress=False)["vanilla"]
    assert good["psnr"] > 60 and good["ms_ssim"] == pytest.approx(1.0) and good["clip_similarity"] == pytest.approx(1.0)
    assert good["part_colour_error"] < 1e-6
    assert good["fid"] < flat["fid"] and flat["psnr"] < 30 and flat["part_colour_error"] > 0.1
    files = write_report({"oracle": {"vanilla": good, "n": 6}, "flat": {"vanilla": flat, "n": 6}}, tmp_path)
    assert json.loads(files["json"].read_text())["results"]["oracle"]["n"] == 6
    table = files["markdown"].read_text()
    assert "| oracle | vanilla |" in table and "FID" in table
    from PIL import Image

    assert Image.open(files["chart"]).size[0] == 900


def test_eval_cli_refuses_bad_arguments(capsys):
    assert eval_cli.main(["--size", "100"]) == 1
    assert "multiple of 64" in capsys.readouterr().err
    assert eval_cli.main(["--modes", "vanilla,nope"]) == 1
    assert "unknown modes" in capsys.readouterr().err
    assert eval_cli.main(["--inception", "/nonexistent.pth"]) == 1
    assert "pt_inception" in capsys.readouterr().err
