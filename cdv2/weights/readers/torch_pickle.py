"""Torch `.bin/.pt/.pth/.ckpt` checkpoints read WITHOUT torch: the zip + pickle format that
`torch.save` writes since torch 1.6, through a restricted unpickler.

The archive holds `<name>/data.pkl` (the pickled object; tensors appear as calls of
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`, storages as persistent ids
`("storage", torch.FloatStorage, key, location, numel)`) and one raw little-endian file
`<name>/data/<key>` per storage. The unpickler resolves only that handful of torch names (mapped
to inert records here) plus `collections.OrderedDict` and a few builtins; any other global is
refused with an error naming it, so no code in the file can run. Tensors are read lazily: `get()`
reads just the bytes that one tensor spans (views and shared storages included) and returns a
C-contiguous numpy array (bf16 as `ml_dtypes.bfloat16`).

Not supported (clear error): the legacy pre-1.6 format (a bare pickle stream) and TorchScript
archives; re-save those with a current torch, or as safetensors.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

# torch storage class names -> element dtype
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64, "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8,
}
# torch dtype names (`torch.float32` pickles as the global "torch float32") -> numpy
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}
# what `torch.save` of a (pre-1.6, or _use_new_zipfile_serialization=False) file starts with
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TorchDtype:
    dtype: np.dtype


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor's elements lie: storage file, element offset, size and stride (elements)."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype


def _rebuild_tensor(storage, offset, size, stride, *rest, dtype=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    dt = np.dtype(dtype.dtype) if isinstance(dtype, _TorchDtype) else storage.dtype
    return TensorRecord(storage, int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride), dt)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *metadata):
    return _rebuild_tensor(storage, offset, size, stride, dtype=dtype)


def _rebuild_parameter(data, *rest):  # nn.Parameter: its tensor
    return data


def _rebuild_from_type_v2(func, new_type, args, state):  # tensor subclasses: the plain tensor
    if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
        raise pickle.UnpicklingError("tensor subclass rebuilt by an unknown function")
    return func(*args)


def _encode(text, encoding="latin1"):  # protocol-2 pickles store bytes as _codecs.encode(str, enc)
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return text.encode("latin1")


_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): "torch.Tensor",
    ("torch.nn.parameter", "Parameter"): "torch.nn.Parameter",
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    **{("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage")},
    **{("torch", name): _TorchDtype(np.dtype(dt)) for name, dt in _TORCH_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, source: Path):
        super().__init__(io.BytesIO(data))
        self._source = source

    def find_class(self, module, name):
        # protocol-2 pickles name Python 2 modules (`__builtin__.set`): the standard renames
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"holds a '{module}.{name}' object; only tensors, numbers, strings and containers "
                f"are read (no code is run from a checkpoint)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        _, stype, key, _location, numel = pid
        return _Storage(str(key), np.dtype(_STORAGE_DTYPES[stype.name]), int(numel))


def _collect(obj) -> dict[str, TensorRecord]:
    """The state dict inside a loaded object: a {name: tensor} mapping, unwrapping Lightning's and
    open_clip's {"state_dict": ...}; non-tensor entries (epoch, hyper-parameters) are dropped."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    return {str(k): v for k, v in obj.items() if isinstance(v, TensorRecord)}


class TorchPickleReader:
    """Reader over a torch zip checkpoint: keys(), shape(k), dtype(k), get(k) -> np.ndarray,
    close(); a context manager. Nothing but the pickle is read until get()."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise ValueError(self._not_zip_reason()) from None
        try:
            self._open()
        except BaseException:
            self._zip.close()
            raise

    def _not_zip_reason(self) -> str:
        with open(self.path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            return (f"{self.path}: legacy (pre-1.6) torch serialization is not supported; re-save it "
                    f"with a current torch (torch.save(torch.load(f), f)) or as .safetensors")
        return f"{self.path}: not a torch checkpoint (not a zip archive: corrupt or truncated?)"

    def _open(self) -> None:
        names = self._zip.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            what = "a TorchScript archive" if any(n.endswith("constants.pkl") for n in names) else \
                "not a torch.save archive"
            raise ValueError(f"{self.path}: {what} (no <name>/data.pkl); save a state_dict instead")
        self._root = pkl[0][: -len("data.pkl")]
        order = self._root + "byteorder"
        self._big_endian = order in names and self._zip.read(order).strip() == b"big"
        try:
            obj = _RestrictedUnpickler(self._zip.read(pkl[0]), self.path).load()
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, zlib.error, ValueError,
                TypeError, IndexError, KeyError, AttributeError, OSError) as e:
            raise ValueError(f"{self.path}: cannot read the checkpoint ({e})") from None
        try:
            self._tensors = _collect(obj)
        except ValueError as e:
            raise ValueError(f"{self.path}: {e}") from None

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def dtype(self, key: str) -> np.dtype:
        return self._tensors[key].dtype

    def record(self, key: str) -> TensorRecord:
        return self._tensors[key]

    def get(self, key: str) -> np.ndarray:
        t = self._tensors[key]
        dtype = t.dtype.newbyteorder(">") if self._big_endian else t.dtype
        size = int(np.prod(t.shape))
        if size == 0:
            return np.zeros(t.shape, t.dtype)
        # element span of this view inside its storage (strides are >= 0 in saved tensors)
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
        start, nbytes = t.offset * dtype.itemsize, span * dtype.itemsize
        member = f"{self._root}data/{t.storage.key}"
        try:
            with self._zip.open(member) as f:
                f.seek(start)
                raw = f.read(nbytes)
        except (KeyError, zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
            raise ValueError(f"{self.path}: tensor {key}: storage {member} unreadable ({e})") from None
        if len(raw) != nbytes or min(t.stride, default=0) < 0:
            raise ValueError(f"{self.path}: tensor {key} lies outside its storage (truncated or corrupt)")
        flat = np.frombuffer(raw, dtype)
        view = np.lib.stride_tricks.as_strided(flat, t.shape, tuple(s * dtype.itemsize for s in t.stride))
        out = np.empty(t.shape, t.dtype)  # own, writable, native byte order
        out[...] = view
        return out

    def close(self) -> None:
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
