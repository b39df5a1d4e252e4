"""Batch augmentations (spec §6.2 reference drop, §6.4 thresholds, mask merging, bleaching):
invariants checked against direct numpy statements of the XL formulas, and rates within 3 sigma."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdv2.train.augment import (AugmentConfig, augment_batch, background_bleaching,
                                drop_reference, merge_character_masks, reference_keep,
                                sample_thresholds)


def within_3_sigma(flags, p):
    n = flags.size
    assert abs(float(np.mean(flags)) - p) <= 3 * np.sqrt(p * (1 - p) / n), (np.mean(flags), p)


def fake_batch(b, hw=8, rhw=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(-1, 1, (b, hw, hw, 3)).astype(np.float32),
        "sketch": rng.uniform(-1, 1, (b, hw, hw, 3)).astype(np.float32),
        "reference": rng.uniform(-1, 0.9, (b, rhw, rhw, 3)).astype(np.float32),
        "smask": rng.uniform(0, 1, (b, hw, hw, 1)).astype(np.float32),
        "rmask": rng.uniform(0, 1, (b, rhw, rhw, 1)).astype(np.float32),
    }


def test_thresholds_range_and_independence():
    ts_s, ts_r = sample_thresholds(jax.random.key(0), 4000, 0.01, 0.99)
    for t in (ts_s, ts_r):
        t = np.asarray(t)
        assert t.shape == (4000,) and t.min() >= 0.01 and t.max() < 0.99
        assert abs(t.mean() - 0.5) < 3 * 0.98 / np.sqrt(12 * 4000)
    assert abs(np.corrcoef(ts_s, ts_r)[0, 1]) < 0.05
    lo, hi = sample_thresholds(jax.random.key(1), 1000, 0.05, 0.95)
    assert float(jnp.minimum(lo, hi).min()) >= 0.05 and float(jnp.maximum(lo, hi).max()) < 0.95


def test_reference_drop_rate_and_zeroing():
    keep = np.asarray(reference_keep(jax.random.key(0), 4000, 0.5))
    assert set(np.unique(keep)) == {0.0, 1.0}
    within_3_sigma(keep == 0, 0.5)
    within_3_sigma(np.asarray(reference_keep(jax.random.key(1), 4000, 0.8)) == 0, 0.8)
    ctx = jnp.ones((6, 5, 4))
    k = jnp.array([1, 0, 1, 0, 0, 1], jnp.float32)
    out = np.asarray(drop_reference(ctx, k))
    np.testing.assert_array_equal(out.sum(axis=(1, 2)), np.asarray(k) * 20)


@pytest.mark.parametrize("b", [7, 3, 4])
def test_merging_whitens_only_the_rolled_mask_region(b):
    x = fake_batch(b, seed=b)
    ts_r = np.linspace(0.2, 0.8, b).astype(np.float32)
    ref, flags = merge_character_masks(jax.random.key(0), x["reference"], x["rmask"], ts_r, 0.6)
    ref, flags = np.asarray(ref), np.asarray(flags)
    assert flags.any() and not flags.all()
    for i in range(b):
        if not flags[i]:
            np.testing.assert_array_equal(ref[i], x["reference"][i])
            continue
        other = x["rmask"][(i - 4) % b, ..., 0]       # sample 4 places earlier (roll by 4)
        inside = other >= ts_r[i]
        assert inside.any() and (~inside).any()
        np.testing.assert_array_equal(ref[i][inside], 1.0)
        np.testing.assert_array_equal(ref[i][~inside], x["reference"][i][~inside])
    if b == 4:                                         # roll by 4 == identity: own silhouette
        i = int(np.argmax(flags))
        np.testing.assert_array_equal(ref[i][x["rmask"][i, ..., 0] >= ts_r[i]], 1.0)


def test_merging_rate():
    x = fake_batch(4000, hw=2, rhw=2)
    ts_r = jnp.full((4000,), 0.5)
    _, flags = merge_character_masks(jax.random.key(3), x["reference"], x["rmask"], ts_r, 0.1)
    within_3_sigma(np.asarray(flags), 0.1)


def test_background_bleaching():
    b, p = 4000, 0.3
    x = fake_batch(b, hw=4, rhw=4, seed=1)
    ts_s, ts_r = (np.random.default_rng(2).uniform(0.01, 0.99, (2, b))).astype(np.float32)
    image, sketch, ref_bg, bleached = map(np.asarray, background_bleaching(
        jax.random.key(0), x["image"], x["sketch"], x["reference"], x["smask"], x["rmask"],
        ts_s, ts_r, p))
    within_3_sigma(bleached, p)
    fg = x["smask"] > ts_s[:, None, None, None]                       # (B, h, w, 1)
    fg3 = np.broadcast_to(fg, image.shape)
    # sketch background -1 for every sample, foreground untouched
    np.testing.assert_array_equal(sketch[~fg3], -1.0)
    np.testing.assert_array_equal(sketch[fg3], x["sketch"][fg3])
    # GT: bleached samples get a white background, everything else unchanged
    bl = np.broadcast_to(bleached[:, None, None, None], image.shape)
    np.testing.assert_array_equal(image[bl & ~fg3], 1.0)
    np.testing.assert_array_equal(image[~(bl & ~fg3)], x["image"][~(bl & ~fg3)])
    # background reference: flat level in [0.95, 1) when bleached, else character whitened
    levels = ref_bg[bleached].reshape(int(bleached.sum()), -1)
    assert (levels == levels[:, :1]).all() and levels.min() >= 0.95 and levels.max() < 1.0
    keep = x["rmask"][~bleached] <= ts_r[~bleached, None, None, None]
    expect = np.where(keep, x["reference"][~bleached], 1.0)
    np.testing.assert_array_equal(ref_bg[~bleached], expect)


def test_augment_batch_jit_deterministic_and_consistent():
    x = fake_batch(16, seed=4)
    cfg = AugmentConfig(inpaint_p=0.5, p_white_bg=0.5, ucg_rate=0.5)
    f = jax.jit(lambda k, bt: augment_batch(k, bt, cfg))
    out, flags = f(jax.random.key(1), x)
    out2, flags2 = f(jax.random.key(1), x)
    for k in out:
        np.testing.assert_array_equal(out[k], out2[k])
    assert set(out) == set(x) | {"ts_s", "ts_r", "ref_keep", "reference_bg"}
    np.testing.assert_array_equal(flags["ref_dropped"], np.asarray(out["ref_keep"]) == 0)
    ts_s = np.asarray(out["ts_s"])
    fg = np.broadcast_to(x["smask"] > ts_s[:, None, None, None], x["sketch"].shape)
    np.testing.assert_array_equal(np.asarray(out["sketch"])[~fg], -1.0)
    # bleaching sees the merged reference (XL order)
    nb = ~np.asarray(flags["bleached"])
    keep = x["rmask"][nb] <= np.asarray(out["ts_r"])[nb, None, None, None]
    np.testing.assert_array_equal(np.asarray(out["reference_bg"])[nb],
                                  np.where(keep, np.asarray(out["reference"])[nb], 1.0))
    # stage 0: no bleaching, GT and sketch untouched
    out0, flags0 = augment_batch(jax.random.key(1), x, AugmentConfig(bleach=False))
    assert "reference_bg" not in out0 and not np.asarray(flags0["bleached"]).any()
    np.testing.assert_array_equal(out0["image"], x["image"])
    np.testing.assert_array_equal(out0["sketch"], x["sketch"])


def test_bf16_dtypes_kept():
    x = {k: jnp.asarray(v, jnp.bfloat16) for k, v in fake_batch(6).items()}
    out, _ = augment_batch(jax.random.key(0), x, AugmentConfig(inpaint_p=1.0, p_white_bg=1.0))
    for k in ("image", "sketch", "reference", "reference_bg"):
        assert out[k].dtype == jnp.bfloat16, k
