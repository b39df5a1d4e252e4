"""The training input pipeline (grain): a random-access source over the authors' QuartLoader
layout, shuffled/repeated/sharded with grain's MapDataset, decoded in reader threads, failed
records replaced (and counted), and collated per batch (`collate.py`).

Layouts (spec §6.5, NOTES 18):
* zip: ``root/{color,sketch,mask}/NNNN.zip``, members ``NNNN/<name>.png`` listed from the sketch
  zips; the color and mask zips of the same stem hold the same member names.
* folder: ``root/{color,sketch,mask}/<name>.png`` (also one sub-folder level), listed from sketch.

Pipeline (one host; ``shard_index``/``shard_count`` = ``jax.process_index()/process_count()``):

    source[start:end]          contiguous shard (grain ShardOptions, drop_remainder: equal shards)
    .seed(seed).shuffle()      reshuffled each epoch
    .repeat(num_epochs)        None = forever
    _ReplaceFailed             a record that fails to load is replaced by the next readable one
                               of the stream (logged with the sample), so positions never shift
    .map_with_index(tag)       each element learns its stream position -> (epoch, index)
    .to_iter_dataset(...)      decoding in `read_threads` reader threads
    .batch(B, collate)         bucket from (seed, stream position of the batch); crops from
                               (seed, shard, epoch, index)
    .mp_prefetch(...)          when worker_count > 0

Every host has the same shard length and batch size, and no record is ever filtered out, so the
k-th batch of every host starts at the same stream position: the aspect bucket, a function of
(seed, position) only, is the same on all hosts, as `jax.make_array_from_process_local_data`
needs. Randomness is a pure function of (seed, shard, stream position), so two iterators built
alike give identical batches, and grain's iterator state (plus the skip log) restores a run
mid-stream.
Cached mode (`cache=DIR`, `cdv2.train.latent_cache`): crops come from the cache's fixed crop
generators and batches also carry the cached VAE posterior moments / CLIP tokens.
With worker_count > 0 the batches are still deterministic but differ from worker_count = 0 (grain
slices the stream across workers before filtering/batching), so a state only restores into a
pipeline with the same worker_count.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import threading
import zipfile
from pathlib import Path
from typing import Any

import grain
import numpy as np
from PIL import Image

from cdv2.train.collate import CollateConfig, collate_batch

IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}
KINDS = ("color", "sketch", "mask")


def _is_image(name: str) -> bool:
    return not name.endswith("/") and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


class _ZipPool:
    """Lazily opened ZipFile handles of this process (an LRU of at most `max_open`); reopened after
    a fork/spawn, never pickled. Member bytes are read under a lock (reader threads share handles);
    decoding happens outside it."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self.__setstate__({})

    def __getstate__(self):
        return {"max_open": self.max_open}

    def __setstate__(self, state):
        self.max_open = state.get("max_open", getattr(self, "max_open", 64))
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._open: collections.OrderedDict[str, zipfile.ZipFile] = collections.OrderedDict()

    def read(self, path: str, member: str) -> bytes:
        with self._lock:
            if self._pid != os.getpid():
                self.__setstate__(self.__getstate__())
                return self.read(path, member)
            zf = self._open.pop(path, None) or zipfile.ZipFile(path, "r")
            self._open[path] = zf
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)[1].close()
            return zf.read(member)


class QuartetSource(grain.sources.RandomAccessDataSource):
    """Random access to (color RGB, sketch RGB, mask L) triples as uint8 numpy arrays.

    `source[i]` never raises for a bad record: it returns ``{"name", "error"}`` instead (missing
    member or zip, corrupt image); problems found while listing are in `listing_errors`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.listing_errors: list[tuple[str, str]] = []
        sketch_root = self.root / "sketch"
        zips = sorted(sketch_root.glob("*.zip"))
        self.layout = "zip" if zips else "folder"
        shard_ids, names = [], []
        self._stems: list[str] = []
        if zips:
            for zp in zips:
                try:
                    with zipfile.ZipFile(zp) as zf:
                        members = sorted(n for n in zf.namelist() if _is_image(n))
                except (OSError, zipfile.BadZipFile) as e:
                    self.listing_errors.append((f"sketch/{zp.name}", f"{type(e).__name__}: {e}"))
                    continue
                shard_ids += [len(self._stems)] * len(members)
                names += members
                self._stems.append(zp.stem)
        else:
            files = sorted(p for p in sketch_root.glob("*") if p.is_file() and _is_image(p.name))
            files += sorted(p for p in sketch_root.glob("*/*") if p.is_file() and _is_image(p.name))
            names = [p.relative_to(sketch_root).as_posix() for p in files]
            shard_ids = [-1] * len(names)
        if not names:
            raise FileNotFoundError(f"no training images listed under {sketch_root}")
        # Compact arrays: the source is pickled into every worker process.
        self._names = np.array([n.encode() for n in names])
        self._shard = np.array(shard_ids, np.int32)
        self._zips = _ZipPool()

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"QuartetSource(root={str(self.root)!r}, layout={self.layout}, n={len(self)})"

    def name(self, key: int) -> str:
        return self._names[key].decode()

    def _read(self, kind: str, key: int) -> bytes:
        name, shard = self.name(key), int(self._shard[key])
        if shard < 0:
            return (self.root / kind / name).read_bytes()
        return self._zips.read(str(self.root / kind / f"{self._stems[shard]}.zip"), name)

    def _decode(self, kind: str, key: int) -> np.ndarray:
        with Image.open(io.BytesIO(self._read(kind, key))) as img:
            return np.asarray(img.convert("L" if kind == "mask" else "RGB"))

    def __getitem__(self, key: int) -> dict[str, Any]:
        key = int(key)
        try:
            color, sketch, mask = (self._decode(k, key) for k in KINDS)
            hw = color.shape[:2]
            if sketch.shape[:2] != hw:      # derived images should match; resize rather than drop
                sketch = np.asarray(Image.fromarray(sketch).resize(hw[::-1], Image.BICUBIC))
            if mask.shape[:2] != hw:
                mask = np.asarray(Image.fromarray(mask).resize(hw[::-1], Image.BICUBIC))
            return {"name": self.name(key), "color": color, "sketch": sketch, "mask": mask}
        except Exception as e:  # noqa: BLE001 -- any unreadable record is skipped, never fatal
            return {"name": self.name(key), "error": f"{type(e).__name__}: {e}"}


def shard_bounds(n: int, shard: grain.sharding.ShardOptions) -> tuple[int, int]:
    """[start, end) of this shard: contiguous (a host mostly opens its own zips), as grain's
    even_split; with drop_remainder every shard has n // shard_count records."""
    per = n // shard.shard_count
    start, end = per * shard.shard_index, per * (shard.shard_index + 1)
    if not shard.drop_remainder:
        extra = n % shard.shard_count
        start += min(shard.shard_index, extra)
        end += min(shard.shard_index + 1, extra)
    return start, end


class _TagPosition(grain.transforms.MapWithIndex):
    def map_with_index(self, index: int, element: dict) -> dict:
        return {**element, "pos": index}


class _ReplaceFailed(grain.MapDataset):
    """Element i is the record at i, or, when that fails to load, the first readable one of
    i+1, i+2, ... (the stream wraps at its end); the failures ride along in the element under
    "_skipped". Raises once a whole shard's worth of consecutive records failed, instead of
    searching an unreadable dataset forever. Nothing is dropped, so the stream positions (and with
    them the batch buckets) stay the same on every host whatever fails where."""

    def __init__(self, parent: grain.MapDataset, shard_len: int):
        super().__init__(parent)
        self.shard_len = shard_len

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return "ReplaceFailed"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        failed = []
        for j in range(self.shard_len):
            element = self._parent[(index + j) % len(self._parent)]
            if "error" not in element:
                return {**element, "_skipped": failed}
            failed.append((element["name"], element["error"]))
        raise RuntimeError(f"no readable record in {self.shard_len} consecutive reads; "
                           f"last: {failed[-1][0]}: {failed[-1][1]}")


class _Collate:
    """grain batch_fn: the batch bucket from (seed, stream position of the first sample) -- the
    same on every host, never the shard --, each sample's crops from (seed, shard, epoch, index);
    gathers the samples' replacement logs under "_skipped"."""

    def __init__(self, cfg: CollateConfig, seed: int, shard_index: int, shard_len: int,
                 return_names: bool):
        self.cfg, self.seed, self.shard_index, self.shard_len = cfg, seed, shard_index, shard_len
        self.return_names = return_names

    def __call__(self, samples: list[dict]) -> dict:
        batch_rng = np.random.default_rng([self.seed, 0, samples[0]["pos"]])
        sample_rngs = [np.random.default_rng([self.seed, self.shard_index, 1, *divmod(s["pos"], self.shard_len)])
                       for s in samples]
        batch = collate_batch(samples, batch_rng, sample_rngs, self.cfg)
        if self.return_names:
            batch["name"] = np.array([s["name"] for s in samples])
        batch["_skipped"] = [e for s in samples for e in s["_skipped"]]
        return batch


# Arguments that define the batch stream; a saved state only restores into an equal pipeline.
_STREAM_KEYS = ("batch_size", "seed", "resolution", "multiple", "collate", "worker_count",
                "shard_index", "shard_count", "num_epochs", "shuffle", "cache_inputs")


class TrainIterator:
    """Iterator of collated batches with a skip counter and a JSON-able checkpoint state."""

    def __init__(self, grain_iter, source: QuartetSource, config: dict):
        self._it = grain_iter
        self.source = source
        self.config = config
        self.skipped: list[tuple[str, str]] = list(source.listing_errors)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._it))
        self.skipped += [tuple(e) for e in batch.pop("_skipped")]
        return batch

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def get_state(self) -> dict:
        return {"grain": self._it.get_state(), "skipped": [list(e) for e in self.skipped],
                "config": dict(self.config)}

    def set_state(self, state: dict) -> None:
        diff = {k for k in _STREAM_KEYS if state["config"].get(k) != self.config.get(k)}
        if diff:
            raise ValueError(f"state was saved by a different pipeline (differs in {sorted(diff)})")
        self._it.set_state(state["grain"])
        self.skipped = [tuple(e) for e in state["skipped"]]

    def close(self) -> None:
        if hasattr(self._it, "close"):
            self._it.close()


def make_train_iterator(
    root: str | os.PathLike,
    *,
    batch_size: int,
    seed: int,
    resolution: int = 768,
    multiple: int = 64,
    collate: CollateConfig | None = None,
    worker_count: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    read_threads: int = 4,
    prefetch: int | None = None,
    return_names: bool = False,
    cache: str | os.PathLike | None = None,
    cache_inputs: tuple | list | None = None,
) -> TrainIterator:
    """Batches of `batch_size` (all one bucket) as dicts of float32 NHWC numpy arrays `image`,
    `sketch`, `reference`, `smask`, `rmask` and `size` (B, 2) = original (h, w).

    `collate` overrides the sizes that `resolution`/`multiple` derive
    (`CollateConfig.for_resolution`). `prefetch` is the reader threads' look-ahead in records
    (default 2 batches). `return_names` adds `name` (B,) (the member names, for debugging).
    The last incomplete batch of a finite run is dropped.
    `cache`: a latent cache directory (`cdv2.train.latent_cache`): crops come from its fixed crop
    generators and the batches also carry the cached `cache_inputs` (default: all it holds), e.g.
    `latent_moments` and `clip_tokens`; a stale cache raises `StaleCacheError`."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    cfg = collate or CollateConfig.for_resolution(resolution, multiple)
    if cache is not None:
        from cdv2.train import latent_cache as lc

        source = lc.cached_source(root, cache, cfg)
        cache_inputs = list(source.cache.inputs if cache_inputs is None else cache_inputs)
    else:
        source = QuartetSource(root)
    shard = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True)
    start, end = shard_bounds(len(source), shard)
    if end - start < batch_size:
        raise ValueError(f"shard {shard_index}/{shard_count} has {end - start} records "
                         f"< batch_size {batch_size}")
    ds = grain.MapDataset.source(source)[start:end].seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = _ReplaceFailed(ds.repeat(num_epochs), end - start).map_with_index(_TagPosition())
    n_read = prefetch if prefetch is not None else 2 * batch_size
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=min(read_threads, n_read) or 1,
                                              prefetch_buffer_size=n_read))
    batch_fn = (_Collate(cfg, seed, shard_index, end - start, return_names) if cache is None else
                lc.CachedCollate(cfg, seed, shard_index, end - start, return_names, source.cache, cache_inputs))
    ds = ds.batch(batch_size, drop_remainder=True, batch_fn=batch_fn)
    if worker_count > 0:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    config = {"root": str(source.root), "batch_size": batch_size, "seed": seed,
              "resolution": resolution, "multiple": multiple,
              "collate": dataclasses.asdict(cfg), "worker_count": worker_count,
              "shard_index": shard_index, "shard_count": shard_count, "num_epochs": num_epochs,
              "shuffle": shuffle, "read_threads": read_threads, "prefetch": prefetch,
              "return_names": return_names, "cache": None if cache is None else str(cache),
              "cache_inputs": cache_inputs}
    config = json.loads(json.dumps(config))          # the form it has after a JSON round trip
    return TrainIterator(iter(ds), source, config)


def _absl_flags_parsed() -> None:
    """grain's mp_prefetch reads an absl flag (--grain_enable_multiprocess_worker_profiling) and
    raises UnparsedFlagAccessError in programs that never ran absl's app.run / parsed flags
    (pytest, plain scripts); mark the flags parsed so their defaults apply."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def iterator_state(it: TrainIterator) -> dict:
    """JSON-serialisable state: grain's iterator state, the skip log and the pipeline arguments."""
    return it.get_state()


def restore_iterator(state: dict, root: str | os.PathLike | None = None, **overrides) -> TrainIterator:
    """A fresh iterator that continues exactly after the batch at which `state` was taken.
    It is rebuilt from the arguments saved in the state; `root` (a moved dataset) and the
    non-stream arguments (`read_threads`, `prefetch`, `return_names`) may be overridden."""
    kwargs = {k: v for k, v in state["config"].items() if k not in ("root", "collate")}
    kwargs["collate"] = _collate_from_dict(state["config"]["collate"])
    kwargs.update(overrides)
    it = make_train_iterator(root if root is not None else state["config"]["root"], **kwargs)
    it.set_state(state)
    return it


def _collate_from_dict(d: dict) -> CollateConfig:
    d = dict(d)
    d["buckets"] = tuple(tuple(b) for b in d["buckets"])
    if d.get("mask_expansion_size") is not None:
        d["mask_expansion_size"] = tuple(d["mask_expansion_size"])
    return CollateConfig(**d)


def describe_batch(batch_size: int, grad_accum_steps: int, devices: int) -> str:
    """The start-of-run batch line: per-device batch x devices x accumulation = global batch per
    optimizer update. `batch_size` is the config's (global, per train_step call) batch; it must
    split evenly over the devices the batch is sharded on."""
    if batch_size % devices:
        raise ValueError(f"batch_size {batch_size} does not split over {devices} devices: set batch_size to a "
                         f"multiple of {devices} (it is the global batch of one step; e.g. "
                         f"{devices * max(1, batch_size // devices)} = {max(1, batch_size // devices)} per device)")
    per = batch_size // devices
    return (f"batch: {per} per device x {devices} devices x {grad_accum_steps} accumulation steps = "
            f"global batch {per * devices * grad_accum_steps} per optimizer update")
