"""Trainable-only training checkpoints: a checkpoint holds the stage's trained params, their
optimizer state, step, RNG and data position; the frozen params (VAE, CLIP, the U-Net parts the
stage does not train) are referenced by their source (the `init_from` weights dir, ...) with a
content fingerprint, reloaded on resume (bit-identical), refused when missing or changed, and
merged back by export (a full weights dir)."""
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from cdv2.config import load_model_config
from cdv2.train.checkpoint import Checkpointer, abstract_like, frozen_record, load_frozen_source
from cdv2.train.config import load_train_config
from cdv2.train.data import make_train_iterator
from cdv2.train.stages import is_trainable, make_optimizer, split_trainable
from cdv2.train.step import create_train_state
from cdv2.train.synthetic import make_synthetic_dataset
from cdv2.weights.tree import flatten
from mesh_worker import FAST_COMPILE, random_params

STAGE = 2


@pytest.fixture(scope="module", autouse=True)
def _cache(compilation_cache):
    """Every run of this module compiles the same stage-2 step: XLA's cache serves the repeats."""


@pytest.fixture(scope="module")
def model_cfg():
    return load_model_config("tiny")


@pytest.fixture(scope="module")
def params(model_cfg):
    return random_params(model_cfg)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, num_images=8, size=(64, 64), seed=0)
    return root


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _stored_keys(directory: Path, step: int) -> set:
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(directory) as m:
        return set(m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"])


def test_stage2_checkpoint_holds_only_the_trained_params_and_restores_exactly(tmp_path, params, dataset):
    cfg = load_train_config(f"stage{STAGE}", {"model": "tiny"})
    state = create_train_state(params, make_optimizer(cfg.optim, STAGE), seed=0)
    # Adam moments as after some training (fresh zeros would compress to nothing and hide their size)
    rng = np.random.default_rng(1)
    state = state.replace(opt_state=jax.tree.map(
        lambda x: (x + 1e-3 * rng.standard_normal(x.shape)).astype(x.dtype) if x.ndim else x, state.opt_state))
    it = make_train_iterator(dataset, batch_size=2, seed=0, resolution=64, worker_count=0)
    trained, frozen = split_trainable(params, STAGE)
    nbytes = lambda d: sum(np.asarray(v).nbytes for v in d.values())  # noqa: E731
    record = frozen_record({"kind": "given"}, STAGE, frozen)
    try:
        full = Checkpointer(tmp_path / "full", every=1, async_save=False)          # the whole state
        full.save(1, state, it)
        full.close()
        only = Checkpointer(tmp_path / "trainable", every=1, async_save=False,
                            trainable=lambda p: is_trainable(p, STAGE), frozen_record=record)
        only.save(1, state, it)
        only.close()
        size_full, size_only = _tree_bytes(tmp_path / "full" / "1"), _tree_bytes(tmp_path / "trainable" / "1")
        print(f"stage {STAGE} tiny checkpoint: whole state {size_full / 2**20:.2f} MiB, trainable-only "
              f"{size_only / 2**20:.2f} MiB (params: {nbytes(trained) / 2**20:.2f} MiB trained, "
              f"{nbytes(frozen) / 2**20:.2f} MiB frozen)")
        # the frozen bytes are gone (orbax compresses the random floats a little: ~5%); what is left
        # is the trained params and Adam's two moments of them
        assert size_full - size_only >= 0.8 * nbytes(frozen)
        assert 2.5 * nbytes(trained) <= size_only <= 3.3 * nbytes(trained) + 2**20
        keys = _stored_keys(tmp_path / "trainable", 1)
        stored_params = {k[len("params/"):] for k in keys if k.startswith("params/")}
        assert stored_params == {k for k, v in trained.items() if np.size(v)}
        assert any(k.startswith("opt_state/") for k in keys) and {"step", "rng"} <= keys
        assert only.saved_frozen_record(1) == record and full.saved_frozen_record(1) is None

        # restore: trained leaves from the checkpoint, frozen ones from their source, bit for bit
        back = Checkpointer(tmp_path / "trainable", every=1, trainable=lambda p: is_trainable(p, STAGE))
        got = back.restore(abstract_like(state), it, frozen=load_frozen_source(record, None, params=params))
        back.close()
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
        # without the frozen params a trainable-only checkpoint cannot be completed
        with pytest.raises(ValueError, match="pass the same params again"):
            load_frozen_source(record, None)
        changed = jax.tree.map(np.copy, params)
        changed["vae"]["decoder"]["conv_in"]["kernel"][0, 0, 0, 0] += 1e-3
        with pytest.raises(ValueError, match="do not match the ones this run started from"):
            load_frozen_source(record, None, params=changed)
    finally:
        it.close()


def _cfg(init_from, **over):
    return load_train_config(f"stage{STAGE}", {
        "model": "tiny", "batch_size": 2, "compute_dtype": "float32", "optim.lr": 1e-3, "checkpoint_every": 2,
        "log_every": 0, "sample_every": 0, "inpaint_p": 0.0, "data.resolution": 64, "data.workers": 0,
        "init_from": str(init_from), **over})


def _run(dataset, workdir, steps, init_from):
    from cdv2.train.loop import RunOptions, train

    return train(_cfg(init_from), RunOptions(data_root=str(dataset), workdir=str(workdir), max_steps=steps,
                                             progress=False, compiler_options=FAST_COMPILE))


@pytest.mark.slow  # two training runs + an export: ~4 min on 2 cores
def test_stage2_resume_reloads_frozen_params_from_init_from_and_export_is_full(tmp_path, params, model_cfg, dataset):
    from cdv2.train.export import export_checkpoint
    from cdv2.weights.weights_dir import load_weights_dir, save_weights_dir

    weights = save_weights_dir(tmp_path / "init", params, model_cfg)
    straight = _run(dataset, tmp_path / "a", 4, weights)
    first = _run(dataset, tmp_path / "b", 2, weights)
    resumed = _run(dataset, tmp_path / "b", 4, weights)
    assert resumed.resumed_from == 2 and resumed.steps == [3, 4]
    assert straight.losses == first.losses + resumed.losses          # bit-identical
    flat_a, flat_b = flatten(jax.device_get(straight.state.params)), flatten(jax.device_get(resumed.state.params))
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
    ckpts = tmp_path / "b" / "checkpoints"
    stored = {k[len("params/"):] for k in _stored_keys(ckpts, 4) if k.startswith("params/")}
    assert stored and all(is_trainable(k, STAGE) for k in stored)
    assert any(not np.array_equal(flat_b[k], flatten(params)[k]) for k in stored)   # it trained

    # export: a full weights dir (frozen from init_from + trained from the checkpoint)
    out = export_checkpoint(ckpts, model_cfg, tmp_path / "export")
    exported = flatten(load_weights_dir(out)[0])
    assert set(exported) == set(flat_b)
    assert all(np.array_equal(exported[k], flat_b[k]) for k in flat_b)

    # the frozen source moved: resume / export say so; export accepts the new place
    moved = tmp_path / "moved_init"
    shutil.move(str(weights), moved)
    with pytest.raises(FileNotFoundError, match="which is missing"):
        _run(dataset, tmp_path / "b", 6, weights)
    with pytest.raises(FileNotFoundError, match="which is missing"):
        export_checkpoint(ckpts, model_cfg, tmp_path / "export2")
    again = flatten(load_weights_dir(export_checkpoint(ckpts, model_cfg, tmp_path / "export2",
                                                       frozen_from=moved))[0])
    assert all(np.array_equal(again[k], flat_b[k]) for k in flat_b)
    # ... or its content changed (a frozen VAE weight): refused before anything is compiled
    changed = jax.tree.map(np.copy, params)
    changed["vae"]["decoder"]["conv_in"]["kernel"][0, 0, 0, 0] += 1e-3
    save_weights_dir(weights, changed, model_cfg)
    with pytest.raises(ValueError, match="do not match the ones this run started from"):
        _run(dataset, tmp_path / "b", 6, weights)
