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

    def oracle(sketch, reference, *, mode, seed, reference_mask=None):  # the ground truth of the sketch given
        return next(it.target for it in items if it.sketch is sketch)

    def feats(images):                              # a stand-in feature extractor (FID wiring)
        return np.concatenate([images.mean((1, 2)), images.std((1, 2))], -1) + 1e-3 * np.random.default_rng(0).normal(size=(len(images), 6))

    clip = lambda imgs: imgs.reshape(len(imgs), -1).astype(float)
    good = protocol.evaluate(protocol.one_at_a_time(oracle), items, inception=feats, clip_embed=clip, progress=False,
                             chunk=4)["vanilla"]  # chunks of 4 + 2
    flat = protocol.evaluate(protocol.one_at_a_time(eval_cli.flat_fill), items, inception=feats, clip_embed=clip, progress=False)["vanilla"]
    assert good["psnr"] > 60 and good["ms_ssim"] == pytest.approx(1.0) and good["clip_similarity"] == pytest.approx(1.0)
    assert good["part_colour_error"] < 1e-6
    assert good["fid"] < flat["fid"] and flat["psnr"] < 30 and flat["part_colour_error"] > 0.1
    files = write_report({"oracle": {"vanilla": good, "n": 6}, "flat": {"vanilla": flat, "n": 6}}, tmp_path)
    assert json.loads(files["json"].read_text())["results"]["oracle"]["n"] == 6
    table = files["markdown"].read_text()
    assert "| oracle | vanilla |" in table and "FID" in table
    from PIL import Image

    assert Image.open(files["chart"]).size[0] == 900


def test_synthetic_items_carry_the_references_true_masks():
    items = protocol.synthetic_items(6, 64, seed=1)
    for it in items:
        for ref, mask in ((it.random_reference, it.random_reference_mask), (it.tps_reference, it.tps_reference_mask)):
            assert mask.shape == ref.shape[:2] and set(np.unique(mask)) <= {0, 255}
            assert 0.02 < (mask == 255).mean() < 0.9
        # the TPS mask is warped WITH the image: inside it the warped picture shows the parts' colours
        colours = np.asarray(it.part_colors, float)
        shows_a_part = np.abs(it.tps_reference[..., None, :].astype(float) - colours).sum(-1).min(-1) < 30
        agreement = lambda m: ((m == 255) == shows_a_part).mean()
        unwarped = np.where(it.labels > 0, 255, 0)
        assert agreement(it.tps_reference_mask) > 0.96                  # only blended edge pixels differ
        assert agreement(it.tps_reference_mask) > agreement(unwarped)   # and it is the warped mask


@pytest.mark.slow
def test_eval_cli_runs_every_mode_on_synthetic_data(tmp_path):
    """The modes that need a reference mask get the scenes' true masks (synthetic references have
    gradient backgrounds, which the classical estimate refuses)."""
    out = tmp_path / "eval"
    assert eval_cli.main(["--num", "2", "--steps", "2", "--modes", "vanilla,style,background,full",
                          "--baselines", "flat", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res["builtin"]) == {"vanilla", "style", "background", "full", "n"}
    assert all(np.isfinite(v["psnr"]) for k, v in res["builtin"].items() if k != "n")


def test_eval_cli_refuses_bad_arguments(capsys):
    assert eval_cli.main(["--size", "100"]) == 1
    assert "multiple of 64" in capsys.readouterr().err
    assert eval_cli.main(["--modes", "vanilla,nope"]) == 1
    assert "unknown modes" in capsys.readouterr().err
    assert eval_cli.main(["--inception", "/nonexistent.pth"]) == 1
    assert "pt_inception" in capsys.readouterr().err
