"""Dtype names used across cdv2 (`DTYPES`), the compute dtypes (`COMPUTE_DTYPES`), the "auto"
choice, and per-tensor casts.

"auto" is bf16 on accelerators (GPU/TPU: half the memory, and the compute dtype there) and fp32 on
CPU (bf16 matmuls are slow and lossy on CPU). Weights are cast one tensor at a time while they are
read, so a bf16 load never holds an fp32 copy.
"""
from __future__ import annotations

from typing import Optional

import ml_dtypes
import numpy as np

DTYPES = {
    "float32": np.dtype(np.float32), "fp32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "bf16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16), "fp16": np.dtype(np.float16),
}

# what the modules compute in (fp16 is a storage format only: its range overflows in attention)
COMPUTE_DTYPES = ("float32", "bfloat16")
_SHORT = {"fp32": "float32", "bf16": "bfloat16"}


def auto_dtype(backend: Optional[str] = None) -> np.dtype:
    """bf16 on "gpu"/"tpu", fp32 otherwise; `backend` defaults to jax.default_backend()."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    return DTYPES["bfloat16"] if backend in ("gpu", "cuda", "rocm", "tpu") else DTYPES["float32"]


def resolve_dtype(dtype="auto", backend: Optional[str] = None) -> Optional[np.dtype]:
    """"auto" | a name in DTYPES | a numpy/jax dtype -> np.dtype; None stays None (keep as stored)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype == "auto":
            return auto_dtype(backend)
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    try:
        return np.dtype(dtype)
    except TypeError:
        raise ValueError(f"not a dtype: {dtype!r}") from None


def compute_dtype_name(dtype: str = "auto", backend: Optional[str] = None) -> str:
    """"float32" | "bfloat16" (or "fp32"/"bf16") | "auto" (bf16 on GPU/TPU, fp32 on CPU) -> the long name."""
    if dtype == "auto":
        return "bfloat16" if auto_dtype(backend) == DTYPES["bfloat16"] else "float32"
    name = _SHORT.get(dtype, dtype)
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be 'auto' or one of {sorted(COMPUTE_DTYPES + tuple(_SHORT))}, "
                         f"got {dtype!r}")
    return name


def compute_dtype(dtype: str = "auto", backend: Optional[str] = None) -> np.dtype:
    """The dtype object for a compute-dtype name (see `compute_dtype_name`); usable as a Flax `dtype`."""
    return DTYPES[compute_dtype_name(dtype, backend)]


def is_floating(dtype) -> bool:
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype == DTYPES["bfloat16"]


def cast_floating(arr: np.ndarray, dtype: Optional[np.dtype]) -> np.ndarray:
    """`arr` in `dtype` if it is a float array (integers/bools stay); None keeps it."""
    if dtype is None or not is_floating(arr.dtype) or arr.dtype == dtype:
        return arr
    return arr.astype(dtype)
