"""The training loop end to end on a synthetic dataset: checkpoints, kill-and-resume identity,
TensorBoard events, and the `python -m cdv2.train` entry point."""
import jax
import numpy as np
import pytest

from cdv2.train.config import load_train_config
from cdv2.train.loop import RunOptions, train
from cdv2.train.synthetic import make_synthetic_dataset
from mesh_worker import FAST_COMPILE


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, num_images=12, size=(64, 64), seed=0)
    return root


@pytest.fixture(scope="module", autouse=True)
def _cache(compilation_cache):
    """The same step compiles in every run of this module: let XLA's cache serve the repeats."""


def tiny_cfg(**over):
    return load_train_config("stage1", {"model": "tiny", "batch_size": 2, "compute_dtype": "float32",
                                        "optim.lr": 1e-4, "checkpoint_every": 2, "log_every": 1,
                                        "data.resolution": 64, "data.workers": 0, **over})


def run(dataset, workdir, steps, params):
    return train(tiny_cfg(), RunOptions(data_root=str(dataset), workdir=str(workdir),
                                        max_steps=steps, progress=False, compiler_options=FAST_COMPILE), params=params)


@pytest.mark.slow  # three training runs: ~2 min on 2 cores
def test_killed_and_resumed_run_repeats_the_uninterrupted_one(dataset, tmp_path, tiny_params):
    straight = run(dataset, tmp_path / "a", 4, tiny_params)
    first = run(dataset, tmp_path / "b", 2, tiny_params)
    assert first.resumed_from is None
    resumed = run(dataset, tmp_path / "b", 4, tiny_params)  # a fresh process would do exactly this
    assert resumed.resumed_from == 2 and resumed.steps == [3, 4]
    assert straight.losses == first.losses + resumed.losses  # bit-identical losses
    a = jax.tree_util.tree_leaves(straight.state.params)
    b = jax.tree_util.tree_leaves(resumed.state.params)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len({round(l, 6) for l in straight.losses}) == 4  # the batches really differ
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))


def test_cli_entry_point_trains_from_weights_and_reports_bad_config(dataset, tmp_path, capsys, tiny_params,
                                                                   tiny_config):
    from cdv2.cli.train import main
    from cdv2.weights.weights_dir import save_weights_dir

    weights = save_weights_dir(tmp_path / "init", tiny_params, tiny_config)  # fine-tuning start point
    assert main(["--config", "stage1", "--data", str(dataset), "--workdir", str(tmp_path / "w"),
                 "--max-steps", "1", "--set", "model=tiny", "--set", "batch_size=2", "--set", "data.resolution=64",
                 "--set", "data.workers=0", "--set", "compute_dtype=float32", "--set", f"init_from={weights}"]) == 0
    assert "trained steps 1..1" in capsys.readouterr().out
    # the run directory keeps the configs it was started with
    import yaml

    saved = yaml.safe_load((tmp_path / "w" / "config" / "train.yaml").read_text())
    assert saved["model"] == "tiny" and saved["data"]["resolution"] == 64 and saved["init_from"] == str(weights)
    assert yaml.safe_load((tmp_path / "w" / "config" / "model.yaml").read_text()) == _plain(tiny_config.to_dict())
    assert main(["--data", str(dataset), "--workdir", str(tmp_path / "x"), "--set", "stage=4"]) == 1
    assert "stage" in capsys.readouterr().err


def _plain(x):
    return {k: _plain(v) for k, v in x.items()} if isinstance(x, dict) else \
        [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


@pytest.mark.parametrize("bad,message", [
    (["--set", "optim.lr=abc"], "optim.lr: expected float, got 'abc'"),
    (["--set", "data.resolution=big"], "data.resolution: expected int"),
    (["--set", "optim.nope=1"], "unknown keys ['nope']"),
    (["--set", "batch_size=13"], "batch_size 13 needs 13 records per process, but"),
    (["--data", "/nonexistent/data"], "no such folder"),
    (["--workdir", "/proc/not_writable"], "is not writable"),
])
def test_cli_fails_fast_on_user_errors(dataset, tmp_path, capsys, monkeypatch, bad, message):
    """Every user error is reported before any model is built or compiled (train() is never reached)."""
    import cdv2.train.loop as loop

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("train() reached"))
    from cdv2.cli.train import main

    args = {"--data": str(dataset), "--workdir": str(tmp_path / "w")}
    argv = ["--set", "model=tiny"]
    for flag in ("--data", "--workdir"):
        argv += [flag, bad[1] if bad[0] == flag else args[flag]]
    if bad[0] == "--set":
        argv += bad
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_empty_data_folder_is_reported(tmp_path, capsys):
    from cdv2.cli.train import main

    (tmp_path / "data" / "sketch").mkdir(parents=True)
    assert main(["--data", str(tmp_path / "data"), "--workdir", str(tmp_path / "w")]) == 1
    assert "no training images" in capsys.readouterr().err


def test_sample_grids_every_m_steps(dataset, tmp_path, tiny_params):
    cfg = tiny_cfg(sample_every=2)
    train(cfg, RunOptions(data_root=str(dataset), workdir=str(tmp_path), max_steps=4,
                          progress=False, compiler_options=FAST_COMPILE), params=tiny_params)
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png"]
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / "samples" / g).convert("RGB"), np.float32) for g in grids)
    assert a.shape == (2 * 66 + 2, 3 * 66 + 2, 3)  # a row per sample (batch 2): sketch | reference | output
    out_a, out_b = a[2:66, 134:198], b[2:66, 134:198]
    assert out_a.std() > 1.0 and np.abs(out_a - out_b).mean() > 0.5  # real outputs, from newer weights
    assert np.array_equal(a[:, :132], b[:, :132])  # the same fixed sketches and references
