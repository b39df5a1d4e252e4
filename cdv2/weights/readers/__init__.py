"""Checkpoint readers: one tensor in memory at a time, no torch needed.

Every reader has keys(), shape(k), dtype(k), get(k) -> np.ndarray and close(), and is a context
manager. `open_checkpoint` picks one by file suffix; `load_state_dict` reads a whole (small) file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from cdv2.weights.dtypes import cast_floating
from cdv2.weights.readers.safetensors import SafetensorsReader, write_safetensors
from cdv2.weights.readers.torch_pickle import TorchPickleReader

PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES

__all__ = ["ArrayDictReader", "SafetensorsReader", "TorchPickleReader", "open_checkpoint",
           "load_state_dict", "write_safetensors", "PICKLE_SUFFIXES", "SUFFIXES"]


class ArrayDictReader:
    """The reader interface over an in-memory {key: array} dict (e.g. a torch model's state dict)."""

    def __init__(self, arrays: Mapping[str, Any], name: str = "<state dict>"):
        self._arrays, self.path = arrays, name

    def keys(self):
        return list(self._arrays)

    def shape(self, key):
        return tuple(np.shape(self._arrays[key]))

    def dtype(self, key):
        return _as_numpy(self._arrays[key]).dtype

    def get(self, key):
        return _as_numpy(self._arrays[key])

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _as_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor (numpy has no bfloat16: go through fp32, exact)
        v = v.detach().cpu()
        return v.float().numpy() if str(v.dtype) == "torch.bfloat16" else v.numpy()
    return np.asarray(v)


def open_checkpoint(path):
    """A lazy reader for `.safetensors` or a torch `.ckpt/.pth/.pt/.bin` file (read without torch).
    Raises FileNotFoundError / ValueError (unknown suffix, corrupt file) naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsReader(path)
    if suffix in PICKLE_SUFFIXES:
        return TorchPickleReader(path)
    raise ValueError(f"{path}: unknown checkpoint type '{suffix}' "
                     f"(expected .safetensors or one of {', '.join(PICKLE_SUFFIXES)})")


def load_state_dict(path, dtype: Optional[np.dtype] = None, strip: str = "module.") -> dict[str, np.ndarray]:
    """The whole file as {key: numpy array} (floats cast to `dtype` unless None), with a leading
    `strip` (DataParallel's "module.") removed from every key."""
    with open_checkpoint(path) as r:
        return {k.removeprefix(strip) if strip else k: cast_floating(r.get(k), dtype) for k in r.keys()}
