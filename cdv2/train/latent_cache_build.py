"""Build (or resume) a latent cache over a prepared dataset (format: `cdv2.train.latent_cache`).

    stats = build_latent_cache("data/", "cache/", params, model_cfg, CollateConfig.for_resolution(768))

Records are decoded by `QuartetSource` in reader threads, cropped by `collate.preprocess_sample`
with the fixed crop generators, and run through the frozen VAE encoder (per bucket, fixed batch
so there is one compile per bucket) and CLIP tower (the objective's own `clip_tokens`). Rows are
written into memory-mapped .npy files, flushed, and only then marked done: an interrupted build
resumes where it stopped. On resume every finished record's colour bytes are hashed again and a
changed image is redone. A cache made from other weights, listing or settings is refused (pass a
fresh directory), never overwritten.
"""
from __future__ import annotations

import datetime
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cdv2.conditioning import clip_tokens
from cdv2.model import build
from cdv2.modules.vae import AutoencoderKL
from cdv2.train.collate import CollateConfig, preprocess_sample
from cdv2.train.data import QuartetSource
from cdv2.train.latent_cache import (DTYPES, FORMAT, FORMAT_VERSION, INPUTS, MANIFEST, StaleCacheError, collate_dict,
                                     crop_rng, distinct_buckets, image_digest, latent_file, names_digest,
                                     weights_fingerprint)


def _encoders(model_cfg, dtype):
    comps = build(model_cfg, dtype=dtype)

    @jax.jit
    def moments(params, images):
        mean, logvar = comps.vae.apply({"params": params["vae"]}, images, method=AutoencoderKL.encode)
        return jnp.concatenate([mean, logvar], axis=-1)

    @jax.jit
    def tokens(params, refs):
        return clip_tokens(comps, params, refs)

    return moments, tokens


def _padded(x: np.ndarray, n: int) -> np.ndarray:
    """Pad the batch to n rows (one compile per shape): zero rows, results dropped."""
    return x if len(x) == n else np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)])


def _new_manifest(root, source, params, model_cfg, collate, variants, seed, dtype, inputs, weights_label):
    return {"format": FORMAT, "version": FORMAT_VERSION, "dataset_root": str(Path(root).resolve()),
            "count": len(source), "names_sha256": names_digest(source.name(i) for i in range(len(source))),
            "weights": weights_label, "weights_fingerprint": weights_fingerprint(params),
            "model": model_cfg.name, "collate": collate_dict(collate), "variants": int(variants), "seed": int(seed),
            "dtype": dtype, "inputs": list(inputs), "buckets": [list(b) for b in distinct_buckets(collate)],
            "failed": [], "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


_MUST_MATCH = ("count", "names_sha256", "weights_fingerprint", "collate", "variants", "seed", "dtype", "inputs")


def build_latent_cache(root, out, params: dict, model_cfg, collate: CollateConfig, *, variants: int = 1,
                       seed: int = 0, batch_size: int = 8, dtype: str = "float32",
                       inputs: Sequence[str] = INPUTS, compute_dtype=jnp.float32, read_threads: int = 4,
                       weights_label: Optional[str] = None, progress: bool = True) -> dict:
    """Write/resume the cache of dataset `root` under `out` with frozen weights `params` (a full
    param tree; only vae and clip are used). -> {"encoded", "skipped_done", "redone", "failed"}."""
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {DTYPES}, got {dtype!r}")
    if variants < 1 or batch_size < 1:
        raise ValueError("variants and batch_size must be >= 1")
    inputs = tuple(i for i in INPUTS if i in inputs)
    if not inputs:
        raise ValueError(f"nothing to cache: inputs must name some of {INPUTS}")
    source = QuartetSource(root)
    n, out = len(source), Path(out)
    manifest = _new_manifest(root, source, params, model_cfg, collate, variants, seed, dtype, inputs, weights_label)
    mf = out / MANIFEST
    resume = mf.is_file()
    if resume:
        old = json.loads(mf.read_text())
        diff = [k for k in _MUST_MATCH if old.get(k) != manifest[k]]
        if diff:
            raise StaleCacheError(f"{out} holds a cache made with other {', '.join(diff)}; refusing to overwrite "
                                  "it: pass a new --out directory (or delete the old cache yourself)")
        manifest["created"] = old.get("created", manifest["created"])
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a latent cache (no {MANIFEST}); choose an empty directory")
    out.mkdir(parents=True, exist_ok=True)

    moments_fn, tokens_fn = _encoders(model_cfg, compute_dtype)
    params = {"vae": jax.tree.map(jnp.asarray, params["vae"]), "clip": jax.tree.map(jnp.asarray, params["clip"])}
    buckets = distinct_buckets(collate)
    mode = "r+" if resume else "w+"
    npdt = np.dtype(dtype)

    def arr(name, shape, dt):
        return np.lib.format.open_memmap(out / name, mode=mode, dtype=dt, shape=None if resume else shape)

    # shapes from one abstract evaluation per encoder
    c2 = jax.eval_shape(moments_fn, params, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)).shape[-1]
    r = collate.reference_size
    tok_shape = jax.eval_shape(tokens_fn, params, jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32)).shape[1:]
    done = arr("done.npy", (n,), np.uint8)
    hashes = arr("image_hash.npy", (n, 16), np.uint8)
    lat = {b: arr(latent_file(b), (n, variants, b[0] // 8, b[1] // 8, c2), npdt) for b in buckets} \
        if "latent_moments" in inputs else {}
    tok = arr("clip_tokens.npy", (n, *tok_shape), npdt) if "clip_tokens" in inputs else None
    manifest["shapes"] = {"latent_channels": int(c2), "clip_tokens": list(tok_shape)}
    if not resume:
        done[:] = 0
        done.flush()
    mf.write_text(json.dumps(manifest, indent=1))

    stats = {"encoded": 0, "skipped_done": 0, "redone": 0, "failed": []}
    todo = []
    for i in range(n):                     # resume: finished records are checked, not recomputed
        if done[i]:
            if np.array_equal(hashes[i], image_digest(source._read("color", i))):
                stats["skipped_done"] += 1
                continue
            done[i] = 0
            stats["redone"] += 1
        todo.append(i)
    done.flush()

    bar = tqdm(total=n, initial=n - len(todo), desc="cache latents", unit="img", disable=not progress)
    with ThreadPoolExecutor(max(1, read_threads)) as pool:
        for start in range(0, len(todo), batch_size):
            keys = todo[start:start + batch_size]
            recs = list(pool.map(source.__getitem__, keys))
            good = [(k, rec) for k, rec in zip(keys, recs) if "error" not in rec]
            stats["failed"] += [(rec["name"], rec["error"]) for rec in recs if "error" in rec]
            if good:
                _encode_chunk(good, source, params, collate, buckets, variants, seed, batch_size, inputs,
                              moments_fn, tokens_fn, lat, tok, hashes, npdt)
                for m in list(lat.values()) + ([tok] if tok is not None else []) + [hashes]:
                    m.flush()
                for k, _ in good:
                    done[k] = 1
                done.flush()
                stats["encoded"] += len(good)
            bar.update(len(keys))
    bar.close()
    manifest["failed"] = sorted({name for name, _ in stats["failed"]})
    mf.write_text(json.dumps(manifest, indent=1))
    return stats


def _encode_chunk(good, source, params, collate, buckets, variants, seed, batch_size, inputs,
                  moments_fn, tokens_fn, lat, tok, hashes, npdt):
    keys = [k for k, _ in good]
    for k in keys:
        hashes[k] = image_digest(source._read("color", k))
    if "clip_tokens" in inputs:
        refs = np.stack([preprocess_sample(rec, buckets[0], np.random.default_rng(0), collate)["reference"]
                         for _, rec in good])
        t = np.asarray(tokens_fn(params, _padded(refs, batch_size)))[:len(good)]
        for row, k in enumerate(keys):
            tok[k] = t[row].astype(npdt)
    if "latent_moments" not in inputs:
        return
    for b in buckets:
        jobs = [(k, v, preprocess_sample(rec, b, crop_rng(seed, k, b, v), collate)["image"])
                for k, rec in good for v in range(variants)]
        for s in range(0, len(jobs), batch_size):
            part = jobs[s:s + batch_size]
            m = np.asarray(moments_fn(params, _padded(np.stack([j[2] for j in part]), batch_size)))
            for row, (k, v, _) in enumerate(part):
                lat[b][k, v] = m[row].astype(npdt)
