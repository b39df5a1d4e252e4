"""Run by tests/test_batch.py in a subprocess with 4 fake CPU devices: a batch split over the 4
devices against `Colorizer.colorize` one image at a time; prints a JSON report."""
import json
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cdv2.demo import DEMO_WEIGHTS  # noqa: E402
from cdv2.eval.protocol import synthetic_items  # noqa: E402
from cdv2.sample.batch import BatchColorizer, Request  # noqa: E402
from cdv2.sample.colorizer import Colorizer  # noqa: E402
from cdv2.weights.pretrained import load_pretrained  # noqa: E402

params, cfg = load_pretrained(str(DEMO_WEIGHTS))
col = Colorizer(params, cfg)
items = synthetic_items(5, 64, seed=4)
reqs = [Request(it.sketch, it.tps_reference, seed=20 + i) for i, it in enumerate(items)]
kw = dict(steps=3, size=(64, 64), sketch_polarity="black_on_white", reference_guidance=2.0)
batch = BatchColorizer(col, batch_size=4)
out = batch.colorize(reqs, **kw)
ref = np.stack([col.colorize(r.sketch, r.reference, seed=r.seed, output="array", **kw)[0] for r in reqs])
fn = next(iter(batch._fns.values()))
print(json.dumps({"devices": len(jax.devices()), "mesh_devices": int(batch.mesh.devices.size),
                  "max_diff": float(np.abs(out - ref).max()), "mean_abs": float(np.abs(ref).mean()),
                  "shape": list(out.shape), "compiles": int(fn._cache_size())}))
