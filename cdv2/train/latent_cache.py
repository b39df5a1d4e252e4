"""Cached frozen-encoder inputs: VAE posterior moments and CLIP tokens on disk, read by training.

The training objective runs two frozen networks per sample and step: the VAE encoder on the
cropped colour image and the CLIP image tower on the squashed reference (`cdv2.train.objective`).
Both are pure functions of the record and the frozen weights once the crop is fixed, so they can
be computed once (`tools/cache_latents.py`, `cdv2.train.latent_cache_build`) and read instead:

* ``latent_moments`` (B, h, w, 2C): the VAE posterior (mean | clipped logvar) of the crop. The
  posterior SAMPLE is still drawn in the train step from the sample's own key
  (`latent_from_moments`, the same draw and formula as `cdv2.conditioning.vae_latent`), so a
  cached run has exactly the image path's noise, not one frozen sample.
* ``clip_tokens`` (B, T, C): CLIP tokens of the reference (the full colour image squashed to
  `reference_size`, deterministic per record).

Crops. Without a cache a sample's resize/crop/blanking is drawn afresh every epoch. A cached latent
needs a known crop, so in cached mode every sample's preprocessing draws come from one of
`variants` fixed generators per (record, bucket), ``default_rng([cache_seed, record, h, w,
variant])``; the training stream picks the variant per sample (from the usual per-sample
generator). The cache therefore holds, per record, ``variants`` latents for every distinct bucket
of the collate config (7 for the authors' 768 list) and one set of CLIP tokens.

Cost (v2 at 768, fp32 storage): ~2.1 MB of moments per record and variant (7 buckets of
~96x96x8) + 1.05 MB of tokens (256 x 1024); float16 halves it. Building runs the VAE encoder
7 x variants times per record, so the cache pays for its VAE work after about that many epochs
(the CLIP saving starts with the second epoch).

Layout of a cache directory (all arrays .npy, memory-mapped for random access by grain workers):

    manifest.json          format, weights fingerprint, dataset listing hash, collate config,
                           variants, seed, dtype, inputs, shapes, records that failed to load
    done.npy               (N,) uint8: record finished (the build resumes from it)
    image_hash.npy         (N, 16) uint8: blake2b-128 of each record's colour-image bytes
    clip_tokens.npy        (N, T, C)
    latent_<h>x<w>.npy     (N, variants, h/8, w/8, 2C), one per distinct bucket

Staleness is refused, never silently used (`StaleCacheError`): the training run compares the
fingerprint of ITS frozen VAE-encoder and CLIP weights (`weights_fingerprint`, exact and
independent of sharding) with the manifest's at start, the dataset listing and collate config
when the iterator is built, and each record's colour bytes with the stored hash as it is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cdv2.conditioning import posterior_noise
from cdv2.train.collate import CollateConfig, preprocess_sample
from cdv2.train.data import QuartetSource, _Collate

FORMAT = "cdv2-latent-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INPUTS = ("latent_moments", "clip_tokens")
DTYPES = ("float32", "float16")


class StaleCacheError(RuntimeError):
    """The cache was made from other weights, another dataset listing, other crop settings, or an
    image that has changed since."""


# --- the posterior sample from cached moments (used by the objective) -----------------------------

def latent_from_moments(moments, scale_factor: float, keys=None):
    """Scaled diffusion latent from cached posterior moments (B, h, w, 2C) = (mean | logvar):
    the mean, or with per-sample `keys` the sample mean + exp(logvar/2) * N(0, 1), drawn exactly as
    `cdv2.conditioning.vae_latent` draws it from the same keys."""
    mean, logvar = jnp.split(jnp.asarray(moments).astype(jnp.float32), 2, axis=-1)
    z = mean if keys is None else mean + jnp.exp(0.5 * logvar) * posterior_noise(keys, mean.shape[1:])
    return jax.lax.stop_gradient(z * scale_factor)


def usable_inputs(stage: int, p_white_bg: float, inpaint_p: float) -> tuple[tuple[str, ...], dict]:
    """Which cached inputs a training config can use -> (inputs, {input: why not}). The objective
    refuses a cached latent under background bleaching (stages 2/3, p_white_bg > 0) and cached
    tokens under character-mask merging (inpaint_p > 0): both change the encoders' inputs."""
    why = {}
    if stage > 1 and p_white_bg > 0:
        why["latent_moments"] = f"background bleaching changes the image (p_white_bg={p_white_bg} > 0)"
    if inpaint_p > 0:
        why["clip_tokens"] = f"character-mask merging changes the reference (inpaint_p={inpaint_p} > 0)"
    return tuple(k for k in INPUTS if k not in why), why


# --- fingerprints ----------------------------------------------------------------------------------

def frozen_encoder_params(params: dict) -> dict:
    """The weights the cache depends on: VAE encoder + quant_conv and the CLIP image tower."""
    vae = params["vae"]
    return {"vae": {k: vae[k] for k in ("encoder", "quant_conv")}, "clip": params["clip"]}


@jax.jit
def _leaf_digests(leaves):
    """Two order-independent uint32 sums per leaf over its fp32 bit patterns, each element weighted
    by a function of its position (so moved values count): integer sums wrap exactly, so the result
    does not depend on sharding, reduction order or device."""
    out = []
    for x in leaves:
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).ravel()
        idx = jnp.arange(bits.size, dtype=jnp.uint32)
        a = jnp.sum(bits * (idx * jnp.uint32(2654435761) + jnp.uint32(1)), dtype=jnp.uint32)
        b = jnp.sum((bits ^ (idx * jnp.uint32(40503))) * jnp.uint32(2246822519), dtype=jnp.uint32)
        out.append(jnp.stack([a, b]))
    return out


def weights_fingerprint(params: dict) -> str:
    """Hex digest of the frozen encoders' weights (`frozen_encoder_params`); works on host numpy
    trees and on (sharded, multi-process) jax arrays alike (every process must call it then)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(frozen_encoder_params(params), sep="/")
    names = sorted(flat)
    digests = jax.device_get(_leaf_digests([flat[n] for n in names]))
    h = hashlib.sha256()
    for n, d in zip(names, digests):
        h.update(f"{n}:{tuple(flat[n].shape)}:{int(d[0])}:{int(d[1])};".encode())
    return h.hexdigest()


def names_digest(names: Iterable[str]) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0")
    return h.hexdigest()


def image_digest(data: bytes) -> np.ndarray:
    return np.frombuffer(hashlib.blake2b(data, digest_size=16).digest(), np.uint8)


# --- the crops -------------------------------------------------------------------------------------

def distinct_buckets(cfg: CollateConfig) -> list[tuple[int, int]]:
    return sorted({tuple(int(v) for v in b) for b in cfg.buckets})


def crop_rng(seed: int, key: int, bucket: tuple[int, int], variant: int) -> np.random.Generator:
    """The fixed generator of a record's preprocessing draws for one bucket and variant."""
    return np.random.default_rng([seed, int(key), int(bucket[0]), int(bucket[1]), int(variant)])


def latent_file(bucket: tuple[int, int]) -> str:
    return f"latent_{bucket[0]}x{bucket[1]}.npy"


def collate_dict(cfg: CollateConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# --- reading ---------------------------------------------------------------------------------------

class LatentCache:
    """Read access to a cache directory; arrays are memory-mapped lazily per process (picklable)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise FileNotFoundError(f"no latent cache at {self.path} ({MANIFEST} missing): build it with "
                                    f"`python tools/cache_latents.py DATA --weights W --out {self.path}`")
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != FORMAT_VERSION:
            raise StaleCacheError(f"{mf} is not a {FORMAT} v{FORMAT_VERSION} manifest")
        self.variants = int(self.manifest["variants"])
        self.seed = int(self.manifest["seed"])
        self.inputs = tuple(self.manifest["inputs"])
        self._arrays: dict[str, np.ndarray] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def array(self, name: str) -> np.ndarray:
        if self._pid != os.getpid():
            self._arrays, self._pid = {}, os.getpid()
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / name, mmap_mode="r")
        return self._arrays[name]

    def check_dataset(self, names: Sequence[str], collate: CollateConfig) -> None:
        """Refuse a cache made for another listing or other crop settings, or one not finished."""
        m = self.manifest
        if m["count"] != len(names) or m["names_sha256"] != names_digest(names):
            raise StaleCacheError(f"latent cache {self.path} was made for another dataset listing "
                                  f"({m['count']} records from {m.get('dataset_root')}; this dataset has "
                                  f"{len(names)}): rebuild it with tools/cache_latents.py")
        if m["collate"] != collate_dict(collate):
            raise StaleCacheError(f"latent cache {self.path} was made with other crop settings "
                                  f"(collate {m['collate']} vs {collate_dict(collate)}: data.resolution / "
                                  "data.multiple differ): rebuild it with the training config")
        done = np.asarray(self.array("done.npy"))
        failed = set(m.get("failed", []))
        missing = [n for n, d in zip(names, done) if not d and n not in failed]
        if missing:
            raise StaleCacheError(f"latent cache {self.path} is incomplete ({len(missing)} of {len(names)} records "
                                  f"missing, e.g. {missing[0]}): rerun tools/cache_latents.py to finish it")

    def check_weights(self, params: dict) -> None:
        """Refuse a cache made from other frozen VAE-encoder / CLIP weights than `params`."""
        fp = weights_fingerprint(params)
        if fp != self.manifest["weights_fingerprint"]:
            raise StaleCacheError(
                f"latent cache {self.path} was made from other VAE/CLIP weights (fingerprint "
                f"{self.manifest['weights_fingerprint'][:12]}..., these weights {fp[:12]}...; made from "
                f"{self.manifest.get('weights')}): rebuild it with the weights this run trains from")

    def check_record(self, key: int, name: str, color_bytes: bytes) -> None:
        if not self.array("done.npy")[key]:
            raise StaleCacheError(f"record {name} is not in latent cache {self.path}: rerun tools/cache_latents.py")
        if not np.array_equal(self.array("image_hash.npy")[key], image_digest(color_bytes)):
            raise StaleCacheError(f"colour image {name} changed after latent cache {self.path} was built: "
                                  "rebuild the cache (tools/cache_latents.py resumes and redoes changed records)")

    def latent(self, key: int, bucket: tuple[int, int], variant: int) -> np.ndarray:
        return np.asarray(self.array(latent_file(bucket))[key, variant], np.float32)

    def tokens(self, key: int) -> np.ndarray:
        return np.asarray(self.array("clip_tokens.npy")[key], np.float32)


def open_cache(path: str | os.PathLike) -> LatentCache:
    return LatentCache(path)


def check_cache_weights(path: str | os.PathLike, params: dict) -> None:
    LatentCache(path).check_weights(params)


# --- the training pipeline's cached mode (hooked in by cdv2.train.data.make_train_iterator) -------
# (module-level classes: grain worker processes get them pickled)

class CachedQuartetSource(QuartetSource):
    """A `QuartetSource` whose records also carry their index `key`, and that refuses records not in
    the cache or whose colour image changed (StaleCacheError, not a skippable failure)."""

    def __init__(self, root, cache: LatentCache):
        super().__init__(root)
        self.cache = cache

    def __getitem__(self, key: int) -> dict[str, Any]:
        key = int(key)
        rec = super().__getitem__(key)
        if "error" not in rec:
            self.cache.check_record(key, rec["name"], self._read("color", key))
        return {**rec, "key": key}


def cached_source(root, cache_path, collate: CollateConfig) -> CachedQuartetSource:
    source = CachedQuartetSource(root, LatentCache(cache_path))
    source.cache.check_dataset([source.name(i) for i in range(len(source))], collate)
    return source


class CachedCollate(_Collate):
    """The batch function of the cached mode: the batch bucket as in `data._Collate`; each sample's
    preprocessing from its fixed crop generator (variant drawn from the usual per-sample
    generator); the cached `inputs` attached."""

    def __init__(self, cfg, seed, shard_index, shard_len, return_names, cache: LatentCache, inputs):
        super().__init__(cfg, seed, shard_index, shard_len, return_names)
        unknown = set(inputs) - set(cache.inputs)
        if unknown:
            raise ValueError(f"latent cache {cache.path} holds {list(cache.inputs)}, not {sorted(unknown)}")
        self.cache, self.inputs = cache, tuple(inputs)

    def __call__(self, samples: list[dict]) -> dict:
        cache = self.cache
        batch_rng = np.random.default_rng([self.seed, 0, samples[0]["pos"]])
        bucket = tuple(int(v) for v in self.cfg.buckets[int(batch_rng.integers(len(self.cfg.buckets)))])
        items, variants = [], []
        for s in samples:
            srng = np.random.default_rng([self.seed, self.shard_index, 1, *divmod(s["pos"], self.shard_len)])
            v = int(srng.integers(cache.variants))
            variants.append(v)
            items.append(preprocess_sample(s, bucket, crop_rng(cache.seed, s["key"], bucket, v), self.cfg))
        batch = {k: np.stack([it[k] for it in items]) for k in items[0]}
        if "latent_moments" in self.inputs:
            batch["latent_moments"] = np.stack([cache.latent(s["key"], bucket, v) for s, v in zip(samples, variants)])
        if "clip_tokens" in self.inputs:
            batch["clip_tokens"] = np.stack([cache.tokens(s["key"]) for s in samples])
        if self.return_names:
            batch["name"] = np.array([s["name"] for s in samples])
        batch["_skipped"] = [e for s in samples for e in s["_skipped"]]
        return batch


def plan(path: str | os.PathLike, stage: int, p_white_bg: float, inpaint_p: float) -> tuple[tuple[str, ...], dict]:
    """The cached inputs a run reads: those the config can use (`usable_inputs`) that the cache
    at `path` holds -> (inputs, {input: why it is computed live})."""
    inputs, why = usable_inputs(stage, p_white_bg, inpaint_p)
    held = LatentCache(path).inputs
    for k in inputs:
        if k not in held:
            why[k] = "not in the cache"
    return tuple(k for k in inputs if k in held), why


def describe(path: str | os.PathLike, inputs: Optional[Sequence[str]], why_not: dict) -> str:
    """One line for the start of a run: what is read from the cache and what is computed live."""
    used = f"using {', '.join(inputs)}" if inputs else "not used (nothing in it fits this config)"
    notes = "; ".join(f"{k} computed live: {v}" for k, v in why_not.items())
    return f"latent cache {path}: {used}" + (f" ({notes})" if notes else "")
