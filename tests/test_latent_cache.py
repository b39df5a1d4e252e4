"""The latent cache (cdv2.train.latent_cache): training from cached VAE moments + CLIP tokens gives
the image path's loss (same posterior noise), resumable builds, stale caches refused."""
from __future__ import annotations

import shutil
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cdv2.config import load_model_config
from cdv2.conditioning import vae_latent
from cdv2.train.collate import CollateConfig
from cdv2.train.config import load_train_config
from cdv2.train.data import describe_batch, make_train_iterator, restore_iterator
from cdv2.train.latent_cache import (LatentCache, StaleCacheError, describe, latent_from_moments, plan,
                                     usable_inputs, weights_fingerprint)
from cdv2.train.latent_cache_build import build_latent_cache
from cdv2.train.objective import _VAE_IMAGE, _keys, sample_rngs, training_loss
from cdv2.train.step import build_components
from cdv2.train.synthetic import make_synthetic_dataset
from mesh_worker import random_params

RES, MULT, B = 128, 64, 2   # latents divisible by the tiny U-Net's 8x downsampling
KW = dict(batch_size=B, seed=3, resolution=RES, multiple=MULT, read_threads=2)


@pytest.fixture(scope="module")
def model_cfg():
    return load_model_config("tiny")


@pytest.fixture(scope="module")
def params(model_cfg):
    return random_params(model_cfg, seed=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_cfg, params):
    base = tmp_path_factory.mktemp("lc")
    root = base / "data"
    make_synthetic_dataset(root, num_images=6, size=(72, 88), layout="folder", seed=0, aspect_range=(0.7, 1.4))
    cache = base / "cache"
    stats = build_latent_cache(root, cache, params, model_cfg, CollateConfig.for_resolution(RES, MULT),
                               variants=2, seed=5, batch_size=4, progress=False)
    return root, cache, stats


def test_build_then_resume_does_nothing(built, model_cfg, params):
    root, cache, stats = built
    assert stats["encoded"] == 6 and not stats["failed"]
    again = build_latent_cache(root, cache, params, model_cfg, CollateConfig.for_resolution(RES, MULT),
                               variants=2, seed=5, batch_size=4, progress=False)
    assert again["encoded"] == 0 and again["skipped_done"] == 6
    lc = LatentCache(cache)
    assert lc.manifest["weights_fingerprint"] == weights_fingerprint(params)
    with pytest.raises(StaleCacheError, match="refusing to overwrite"):  # other settings: never overwritten
        build_latent_cache(root, cache, params, model_cfg, CollateConfig.for_resolution(RES, MULT),
                           variants=3, seed=5, batch_size=4, progress=False)


def test_cached_loss_equals_image_loss(built, model_cfg, params):
    """Same batch (cached-mode crops), same keys: loss from (latent_moments, clip_tokens) equals the
    loss from (image, reference) through the live VAE / CLIP, and so does the posterior sample."""
    root, cache, _ = built
    cfg = load_train_config("stage1", {"model": "tiny", "batch_size": B, "compute_dtype": "float32",
                                       "inpaint_p": 0.0, "vae_sample": True})
    assert usable_inputs(cfg.stage, cfg.p_white_bg, cfg.inpaint_p)[0] == ("latent_moments", "clip_tokens")
    comps = build_components(cfg, model_cfg)
    p = jax.tree.map(jnp.asarray, params)
    loss = jax.jit(partial(training_loss, comps=comps, cfg=cfg, bg_path=False, ucg_rate=0.0))
    it = make_train_iterator(root, cache=cache, **KW)
    checked = 0
    for n in range(2):
        batch = next(it)
        assert batch["latent_moments"].shape == (B, *(d // 8 for d in batch["image"].shape[1:3]), 8)
        rngs = sample_rngs(jax.random.PRNGKey(n), jnp.uint32(0), B, jax.random.PRNGKey(100 + n))
        keys = _keys(rngs, _VAE_IMAGE)
        z_live = vae_latent(comps, p, jnp.asarray(batch["image"]), keys=keys)
        z_cached = latent_from_moments(batch["latent_moments"], comps.vae.config.scale_factor, keys)
        np.testing.assert_allclose(z_cached, z_live, rtol=1e-5, atol=1e-5)
        live = {k: v for k, v in batch.items() if k not in ("latent_moments", "clip_tokens")}
        cached = {k: v for k, v in batch.items() if k != "image"}
        a, b = float(loss(p, live, rngs)), float(loss(p, cached, rngs))
        print(f"loss live {a:.8g} cached {b:.8g} rel {abs(a - b) / abs(a):.2e}; z max abs diff {float(jnp.max(jnp.abs(z_cached - z_live))):.2e}")
        assert abs(a - b) <= 1e-5 * abs(a), (a, b)
        checked += 1
    it.close()
    assert checked == 2


def test_variant_crops_are_fixed_and_state_restores(built):
    root, cache, _ = built
    it = make_train_iterator(root, cache=cache, return_names=True, **KW)
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    nxt = next(it)
    it.close()
    again = restore_iterator(state)
    np.testing.assert_array_equal(next(again)["latent_moments"], nxt["latent_moments"])
    again.close()
    # only the cached inputs asked for ride along
    it = make_train_iterator(root, cache=cache, cache_inputs=["latent_moments"], **KW)
    b = next(it)
    it.close()
    assert "clip_tokens" not in b and "latent_moments" in b
    assert first[0]["image"].dtype == np.float32


def test_cached_mode_in_worker_processes(built):
    """grain worker processes get the cached source and collate pickled; rows equal the cache's."""
    root, cache, _ = built
    it = make_train_iterator(root, cache=cache, worker_count=1, return_names=True, **KW)
    b = next(it)
    it.close()
    lc = LatentCache(cache)
    assert b["latent_moments"].shape[0] == B and b["clip_tokens"].shape[0] == B
    src_names = [n.decode() if isinstance(n, bytes) else str(n) for n in b["name"]]
    keys = [sorted(p.name for p in (root / "sketch").glob("*.png")).index(n) for n in src_names]
    for row, k in enumerate(keys):
        np.testing.assert_array_equal(b["clip_tokens"][row], lc.tokens(k))


def test_other_weights_are_refused(built, params):
    _, cache, _ = built
    LatentCache(cache).check_weights(params)        # its own weights pass
    other = jax.tree.map(lambda x: x, params)
    other["vae"] = dict(other["vae"])
    enc = jax.tree.map(np.array, other["vae"]["encoder"])
    leaf = enc["conv_in"]["kernel"]
    leaf.flat[0] = np.nextafter(leaf.flat[0], np.float32(1))   # one ulp of one weight
    other["vae"]["encoder"] = enc
    with pytest.raises(StaleCacheError, match="other VAE/CLIP weights"):
        LatentCache(cache).check_weights(other)
    # the VAE decoder and the trainable groups are not part of the fingerprint
    dec = dict(params, unet=jax.tree.map(lambda x: x + 1, params["unet"]))
    LatentCache(cache).check_weights(dec)


def test_changed_image_and_other_settings_are_refused(built, tmp_path):
    root, cache, _ = built
    copy = tmp_path / "data"
    shutil.copytree(root, copy)
    victim = sorted((copy / "color").glob("*.png"))[0]
    arr = np.array(Image.open(victim))
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(victim)
    it = make_train_iterator(copy, cache=cache, shuffle=False, **KW)
    with pytest.raises(StaleCacheError, match=f"{victim.name} changed"):
        next(it)
    it.close()
    with pytest.raises(StaleCacheError, match="other crop settings"):
        make_train_iterator(root, cache=cache, **dict(KW, resolution=256))
    (copy / "sketch" / victim.name).unlink()            # another listing
    with pytest.raises(StaleCacheError, match="another dataset listing"):
        make_train_iterator(copy, cache=cache, **KW)


def test_describe_batch():
    assert describe_batch(16, 4, 8) == ("batch: 2 per device x 8 devices x 4 accumulation steps = "
                                        "global batch 64 per optimizer update")
    with pytest.raises(ValueError, match="multiple of 8"):
        describe_batch(4, 1, 8)


@pytest.mark.slow  # one tiny train-step compile: minutes on the shared CPU
def test_training_run_reads_the_cache_and_refuses_other_weights(built, params, tmp_path, capsys):
    from cdv2.train.loop import RunOptions, train
    from mesh_worker import FAST_COMPILE

    root, cache, _ = built
    cfg = load_train_config("stage1", {"model": "tiny", "batch_size": B, "compute_dtype": "float32",
                                       "data.resolution": RES, "data.multiple": MULT, "data.workers": 0,
                                       "data.cached": str(cache), "log_every": 1, "sample_every": 0})
    opts = RunOptions(data_root=str(root), workdir=str(tmp_path / "w"), max_steps=1, progress=False,
                      compiler_options=FAST_COMPILE)
    out = train(cfg, opts, params=params)
    assert len(out.losses) == 1 and np.isfinite(out.losses[0])
    printed = capsys.readouterr().out
    assert "batch: 2 per device x 1 devices x 1 accumulation steps = global batch 2" in printed
    # stage 1 merges character masks (inpaint_p 0.1): the tokens are computed live, the latents read
    assert "using latent_moments (clip_tokens computed live: character-mask merging" in printed
    other = dict(params, clip=jax.tree.map(lambda x: x * 2, params["clip"]))
    with pytest.raises(StaleCacheError, match="other VAE/CLIP weights"):
        train(cfg, RunOptions(data_root=str(root), workdir=str(tmp_path / "v"), max_steps=1, progress=False,
                              compiler_options=FAST_COMPILE), params=other)


def test_tool_builds_from_a_weights_dir(built, params, model_cfg, tmp_path, capsys):
    import sys
    from pathlib import Path

    from cdv2.weights.weights_dir import save_weights_dir

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import cache_latents

    root, _, _ = built
    weights = save_weights_dir(tmp_path / "w", params, model_cfg)
    argv = [str(root), "--out", str(tmp_path / "c"), "--weights", str(weights), "--set", "model=tiny",
            "--set", f"data.resolution={RES}", "--set", f"data.multiple={MULT}", "--inputs", "clip_tokens",
            "--no-progress"]
    assert cache_latents.main(argv) == 0
    assert "cached 6 records" in capsys.readouterr().out
    lc = LatentCache(tmp_path / "c")
    assert lc.inputs == ("clip_tokens",) and lc.manifest["weights_fingerprint"] == weights_fingerprint(params)
    assert plan(tmp_path / "c", 1, 0.05, 0.0) == (("clip_tokens",), {"latent_moments": "not in the cache"})
    assert plan(tmp_path / "c", 2, 0.05, 0.1)[0] == ()      # bleaching and merging: nothing usable
    assert "not used" in describe(tmp_path / "c", *plan(tmp_path / "c", 2, 0.05, 0.1))
    assert cache_latents.main(argv + ["--variants", "2"]) == 1   # other settings: refused
    assert "refusing to overwrite" in capsys.readouterr().err
