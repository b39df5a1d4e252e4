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
                                        "optim.lr": 1e-4, "checkpoint_every": 2, "log_every": 1, **over})


def run(dataset, workdir, steps, params):
    return train(tiny_cfg(), RunOptions(data_root=str(dataset), workdir=str(workdir), resolution=64,
                                        max_steps=steps, progress=False, compiler_options=FAST_COMPILE), params=params)


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
    assert main(["--config", "stage1", "--data", str(dataset), "--workdir", str(tmp_path / "w"), "--resolution",
                 "64", "--max-steps", "1", "--set", "model=tiny", "--set", "batch_size=2",
                 "--set", "compute_dtype=float32", "--set", f"init_from={weights}"]) == 0
    assert "trained steps 1..1" in capsys.readouterr().out
    assert main(["--data", str(dataset), "--workdir", str(tmp_path / "x"), "--set", "stage=4"]) == 1
    assert "stage" in capsys.readouterr().err


def test_sample_grids_every_m_steps(dataset, tmp_path, tiny_params):
    cfg = tiny_cfg(sample_every=2)
    train(cfg, RunOptions(data_root=str(dataset), workdir=str(tmp_path), resolution=64, max_steps=4,
                          progress=False, compiler_options=FAST_COMPILE), params=tiny_params)
    grids = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png"]
    from PIL import Image

    a, b = (np.asarray(Image.open(tmp_path / "samples" / g).convert("RGB"), np.float32) for g in grids)
    assert a.shape == (2 * 66 + 2, 3 * 66 + 2, 3)  # a row per sample (batch 2): sketch | reference | output
    out_a, out_b = a[2:66, 134:198], b[2:66, 134:198]
    assert out_a.std() > 1.0 and np.abs(out_a - out_b).mean() > 0.5  # real outputs, from newer weights
    assert np.array_equal(a[:, :132], b[:, :132])  # the same fixed sketches and references
