"""Many colorizations at once: distinct sketches, references and seeds in one jitted call, vmapped
through `Pipeline.generate_impl` and split over devices along the batch (data parallel).

    batch = BatchColorizer(Colorizer.from_pretrained(path))          # all local devices
    images = batch.colorize([Request(sk, ref, seed=0), Request(sk2, ref2, seed=1)], mode="full", steps=20)

Each image equals `Colorizer.colorize(sketch, reference, seed=seed, ...)` with the same settings
(tested): the host side (loading, masks, resizing) is `Colorizer.prepare_inputs` per request, the
device side one program for `batch_size` images (padded up: a short last chunk never recompiles).
Shared by the batch (static or one traced value): mode, sampler, steps, generation size and every
numeric control (`cdv2.sample.settings`). Not available in batches: text manipulation,
`num_images` > 1 per request, injected noises, cropping and background removal of the results
(use `Colorizer.colorize`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cdv2.sample.colorizer import Colorizer, requested_modes
from cdv2.sample.seeds import injection_key, resolve_seed, seed_keys
from cdv2.sample.settings import pipeline_settings

AXIS = "batch"


@dataclasses.dataclass
class Request:
    """One colorization of a batch: its images (anything `Colorizer.colorize` accepts) and seed."""

    sketch: Any
    reference: Any
    seed: int = 0
    reference_mask: Any = None
    sketch_mask: Any = None
    background: Any = None
    background_mask: Any = None


class BatchColorizer:
    def __init__(self, colorizer: Colorizer, devices: Optional[Sequence] = None, batch_size: Optional[int] = None):
        """devices: the devices the batch is split over (default: all local ones). batch_size: images per
        device call, a multiple of the device count (default: 8 rounded up to one)."""
        self.colorizer = colorizer
        devices = list(devices if devices is not None else jax.local_devices())
        self.mesh = Mesh(np.array(devices), (AXIS,))
        n = len(devices)
        batch_size = batch_size or -(-8 // n) * n
        if batch_size < 1 or batch_size % n:
            raise ValueError(f"batch_size must be a positive multiple of the {n} devices, got {batch_size}")
        self.batch_size = batch_size
        self.params = jax.device_put(colorizer.params, NamedSharding(self.mesh, P()))  # replicated once
        self._fns: dict = {}

    def _fn(self, modes, branches, sampler, posterior):
        key = (modes, branches, sampler, posterior)
        if key not in self._fns:
            pipe = self.colorizer.pipeline

            def one(params, inputs, strengths, guidance, keys):
                return pipe.generate_impl(params, inputs, strengths, guidance, keys, modes=modes, branches=branches,
                                          sampler=sampler, posterior=posterior)

            self._fns[key] = jax.jit(jax.vmap(one, in_axes=(None, 0, None, None, 0)),
                                     out_shardings=NamedSharding(self.mesh, P(AXIS)))
        return self._fns[key]

    def colorize(self, requests: Sequence[Request], *, mode=None, style_enhance: Optional[bool] = None,
                 background_enhance: Optional[bool] = None, foreground_enhance: Optional[bool] = None,
                 attention_injection: Optional[bool] = None, steps: int = 20, sampler: str = "diffuser_dpm",
                 schedule: str = "Automatic", size: Optional[tuple[int, int]] = None, long_side: int = 768,
                 sketch_polarity: str = "auto", sketch_preprocessor: Optional[str] = None,
                 reference_padding_scale: float = 1.0, remove_foreground_in_background: bool = False,
                 posterior: str = "sample", progress: bool = False, **controls) -> np.ndarray:
        """-> (len(requests), H, W, 3) float32 in [-1, 1] (`preprocess.to_uint8` / `to_pil` for
        images). Keywords as `Colorizer.colorize`; `controls` are its numeric ones (guidance,
        strengths, scales, thresholds, the guidance window, injection fidelities)."""
        if steps < 1:
            raise ValueError("steps must be >= 1")
        if posterior not in ("mean", "sample"):
            raise ValueError(f"posterior must be 'mean' or 'sample', got {posterior!r}")
        if not requests:
            raise ValueError("no requests given")
        modes = requested_modes(mode, dict(style_enhance=style_enhance, background_enhance=background_enhance,
                                  foreground_enhance=foreground_enhance, attention_injection=attention_injection))
        strengths, guidance, branches = pipeline_settings(**controls)
        thr = float(strengths.reference_mask_threshold)
        inputs, seeds, hw = [], [], None
        for i, r in enumerate(requests):
            prep = self.colorizer.prepare_inputs(
                r.sketch, r.reference, mode=modes, background=r.background, sketch_mask=r.sketch_mask,
                reference_mask=r.reference_mask, background_mask=r.background_mask, size=size, long_side=long_side,
                sketch_polarity=sketch_polarity, reference_padding_scale=reference_padding_scale,
                remove_foreground_in_background=remove_foreground_in_background, reference_mask_threshold=thr,
                sketch_preprocessor=sketch_preprocessor)
            if hw is not None and prep.size != hw:
                raise ValueError(f"request {i} is generated at {prep.size}, request 0 at {hw}: a batch has one "
                                 "size; pass size=(H, W)")
            hw = prep.size
            inputs.append(self.colorizer.pipeline.model_inputs(prep.inputs, modes, thr))
            seeds.append(resolve_seed(r.seed))
        fn = self._fn(modes, branches, (sampler, int(steps), schedule), posterior)
        sharded = NamedSharding(self.mesh, P(AXIS))
        pending = []  # every batch is dispatched before any is fetched: the host prepares the next one meanwhile
        for start in range(0, len(inputs), self.batch_size):
            part = list(range(start, min(start + self.batch_size, len(inputs))))
            n_real = len(part)
            part += [part[-1]] * (self.batch_size - n_real)  # pad with copies: one compiled shape
            stacked = _stack([inputs[i] for i in part])
            keys = jnp.stack([jnp.stack([*seed_keys(seeds[i]), injection_key(seeds[i])]) for i in part])
            pending.append((fn(self.params, jax.device_put(stacked, sharded), strengths, guidance,
                               jax.device_put(keys, sharded)), n_real))
        if progress:
            from tqdm import tqdm

            pending = tqdm(pending, desc="batches", unit="batch")
        return np.concatenate([np.asarray(images)[:n_real, 0] for images, n_real in pending])


def _stack(trees):
    """Stack pytrees of equal structure along a new leading axis on the host (None fields stay None)."""
    first = jax.tree_util.tree_structure(trees[0])
    for t in trees[1:]:
        if jax.tree_util.tree_structure(t) != first:
            raise ValueError("the requests of a batch need the same inputs (e.g. all or none with a background)")
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)
