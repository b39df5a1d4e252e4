"""Compute dtype choice: "auto" is fp32 on CPU (bf16 on GPU/TPU); a bf16 Colorizer loads its weights
in bf16 once (no fp32 copy kept) and still colorizes."""
import jax
import numpy as np
import pytest
from PIL import Image

from cdv2.sample.colorizer import Colorizer
from cdv2.weights.dtypes import compute_dtype_name


def test_auto_dtype_follows_the_backend(monkeypatch):
    assert compute_dtype_name("auto") == ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    assert compute_dtype_name("bf16") == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be"):
        compute_dtype_name("float16")  # a storage dtype, not a compute dtype


def test_bfloat16_weights_loaded_once(oracle_v2_dir):
    col = Colorizer.from_pretrained(oracle_v2_dir / "tiny_v2.safetensors", config="tiny_v2", dtype="bfloat16")
    assert {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(col.params)} == {"bfloat16"}
    sketch = Image.new("RGB", (64, 64), "white")
    out = col.colorize(sketch, Image.new("RGB", (48, 40), (200, 30, 30)), steps=1, size=(64, 64), seed=0,
                       output="array")
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
