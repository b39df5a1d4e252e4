"""cdv2.sample.batch: a batch of distinct requests, vmapped and split over devices, gives each
request's `Colorizer.colorize` image (built-in demo weights: no ../shared needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdv2.demo import DEMO_WEIGHTS
from cdv2.eval.protocol import synthetic_items
from cdv2.sample.batch import BatchColorizer, Request
from cdv2.sample.colorizer import Colorizer
from cdv2.weights.pretrained import load_pretrained

TESTS = Path(__file__).resolve().parent
KW = dict(steps=3, size=(64, 64), sketch_polarity="black_on_white", reference_guidance=2.0)


@pytest.fixture(scope="module")
def colorizer():
    params, cfg = load_pretrained(str(DEMO_WEIGHTS))
    return Colorizer(params, cfg)


def _one_by_one(col, reqs, **kw):
    return np.stack([col.colorize(r.sketch, r.reference, seed=r.seed, output="array",
                                  reference_mask=None if r.reference_mask is None else Image.fromarray(r.reference_mask),
                                  **kw)[0] for r in reqs])


def test_batch_equals_one_image_at_a_time(colorizer):
    items = synthetic_items(3, 64, seed=3)
    reqs = [Request(it.sketch, it.tps_reference, seed=10 + i) for i, it in enumerate(items)]
    batch = BatchColorizer(colorizer, batch_size=2)        # 3 requests: a full batch and a padded one
    out = batch.colorize(reqs, **KW)
    ref = _one_by_one(colorizer, reqs, **KW)
    assert out.shape == (3, 64, 64, 3)
    assert np.abs(out - ref).max() < 1e-4, np.abs(out - ref).max()
    assert np.abs(out[0] - out[1]).mean() > 0.05             # distinct requests, distinct images
    fn = next(iter(batch._fns.values()))
    assert fn._cache_size() == 1                               # the padded batch did not recompile


def test_batch_full_mode_with_injection_and_masks(colorizer):
    """Style + background + attention injection: per-request masks and per-seed injection draws."""
    items = synthetic_items(2, 64, seed=5)
    reqs = [Request(it.sketch, it.tps_reference, seed=30 + i, reference_mask=it.tps_reference_mask)
            for i, it in enumerate(items)]
    kw = dict(KW, mode="full", attention_injection=True, injection_fidelity=0.7)
    out = BatchColorizer(colorizer, batch_size=2).colorize(
        [Request(r.sketch, r.reference, r.seed, Image.fromarray(r.reference_mask)) for r in reqs], **kw)
    ref = _one_by_one(colorizer, reqs, **kw)
    assert np.abs(out - ref).max() < 1e-4, np.abs(out - ref).max()


def test_batch_refuses_mixed_sizes_and_bad_batch_size(colorizer):
    items = synthetic_items(2, 64, seed=3)
    wide = np.concatenate([items[1].sketch, items[1].sketch], axis=1)     # 64 x 128
    with pytest.raises(ValueError, match="a batch has one size"):
        BatchColorizer(colorizer).colorize([Request(items[0].sketch, items[0].target),
                                            Request(wide, items[1].target)], steps=2)
    with pytest.raises(ValueError, match="no requests"):
        BatchColorizer(colorizer).colorize([], steps=2)
    import jax

    with pytest.raises(ValueError, match="multiple of the 2 devices"):
        BatchColorizer(colorizer, devices=[jax.devices()[0]] * 2, batch_size=3)


def test_batch_split_over_four_devices():
    """A subprocess with 4 fake CPU devices: 5 requests in batches of 4 (one image per device)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(TESTS / "batch_worker.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == r["mesh_devices"] == 4
    assert r["shape"] == [5, 64, 64, 3] and r["compiles"] == 1
    assert r["max_diff"] < 1e-4 and r["mean_abs"] > 0.1, r
