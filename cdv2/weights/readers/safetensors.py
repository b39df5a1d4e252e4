"""A streaming safetensors reader and writer: one tensor in memory at a time.

`safetensors.safe_open` memory-maps the whole file, and every page it touches counts in the
process's RSS (measured: 6.9 GB to merely read the 6.8 GB v2 file); these read and write with
plain file IO instead, byte-compatible with the safetensors library (bf16 via ml_dtypes).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np
from tqdm import tqdm

# Own streaming reader/writer for the (tiny) safetensors format: safe_open mmaps the whole file, and
# every mapped page it touches counts in RSS until the file is closed (a 6.8 GB file would cost
# 6.8 GB on top of the params), it has no numpy bfloat16, and save_file builds the whole file in
# memory. Plain reads/writes of one tensor at a time avoid all three.
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAME = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# the safetensors library lays tensors out by dtype (its enum order, largest first), then by name;
# doing the same makes our files byte-identical to the library's
_ST_ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")
_MAX_HEADER = 100 << 20


class SafetensorsReader:
    """Streaming safetensors reader: header parsed once, each get() reads one tensor from disk."""

    def __init__(self, path):
        self.path = Path(path)
        self._f = open(self.path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            self._f.close()
            raise ValueError(f"{self.path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(self._f.read(n))
        except ValueError as e:
            self._f.close()
            raise ValueError(f"{self.path}: not a safetensors file (header is not JSON: {e})") from None
        self.metadata = header.pop("__metadata__", None)
        self._entries = {}
        for key, info in header.items():
            dtype = _ST_DTYPES.get(info.get("dtype"))
            shape = tuple(info.get("shape", ()))
            start, end = info.get("data_offsets", (0, -1))
            if dtype is None:
                self._f.close()
                raise ValueError(f"{self.path}: tensor {key} has unsupported dtype {info.get('dtype')}")
            if end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize or 8 + n + end > size:
                self._f.close()
                raise ValueError(f"{self.path}: tensor {key} lies outside the file (truncated or corrupt)")
            self._entries[key] = (np.dtype(dtype), shape, 8 + n + start)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> np.ndarray:
        dtype, shape, offset = self._entries[key]
        out = np.empty(shape, dtype)
        buf = out.reshape(-1).view(np.uint8)
        self._f.seek(offset)
        if self._f.readinto(buf) != buf.nbytes:
            raise ValueError(f"{self.path}: tensor {key} is truncated")
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_safetensors(path, entries, *, metadata: Mapping[str, str] | None = None,
                      progress=False) -> Path:
    """Write a safetensors file one tensor at a time. entries: (name, dtype, shape, producer),
    producer() returning that array. Written to `<path>.partial`, renamed when complete."""
    path = Path(path)
    rows = sorted(((name, np.dtype(dt), tuple(int(d) for d in shape), make)
                   for name, dt, shape, make in entries),
                  key=lambda r: (-_ST_ORDER.index(_ST_NAME[r[1]]), r[0]))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in rows:
        if name in header:
            raise ValueError(f"duplicate tensor name {name}")
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": _ST_NAME[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, dtype, shape, make in tqdm(rows, desc="writing", unit="tensor",
                                                 disable=not progress):
                arr = np.asarray(make())
                if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
                    arr = arr.copy(order="C")
                if arr.dtype != dtype or arr.shape != shape:
                    raise ValueError(f"{name}: produced {arr.dtype}{list(arr.shape)}, "
                                     f"declared {dtype}{list(shape)}")
                f.write(arr.reshape(-1).view(np.uint8).data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


