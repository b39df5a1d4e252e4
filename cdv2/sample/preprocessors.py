"""The app's preprocessor networks, loaded from a converted directory, called as the app calls them.

    pre = Preprocessors.load("weights/preprocessors")      # written by `cdv2 convert --preprocessor(s-from)`
    smask = pre.sketch_mask(-sketch, H, W)                  # ISNet-sketch, (1, H, W, 1)
    rmask = pre.reference_mask(reference, "rmbg-v2")        # or "isnet"; dilated 11x11
    keep = pre.remove_background(results) >= 0.5            # the app's "rmbg" on the results
    sketch, box, white = pre.preprocess_sketch(img, (H, W), "extract", "lineart_keras")

Images going into the mask networks are NHWC float in [-1, 1] (the app's `to_tensor(pil)`; a
uint8 HxWx3 array, PIL image or path is converted that way); masks come back float32
(B, H, W, 1) in [0, 1]. The calls are those of the app (../shared/oracle/preprocessors/FIXTURES.md,
"Calling convention"); the wrappers themselves are `cdv2.sample.mask_nets` and
`cdv2.sample.line_extract`. Networks are read from disk on first use (one jit compile per input
size each); `available()` says which are present.

Fallback when weights are absent (how the Colorizer uses this class): a network that is not in the
directory raises `MissingPreprocessorError` (naming the file and the convert command) when it is
called, so the caller checks `has(name)` first and, without it, uses the documented network-free
estimates of `cdv2.sample.masks`: `estimate_sketch_mask(sketch, dilate_px)` for ISNet-sketch and
`estimate_reference_mask(rgb, alpha)` for rmbg-v2 / ISNet. It says so once: `warn_missing(name,
instead)` emits a single `UserWarning` per network and instance (later calls are silent), e.g.

    if pre.has("isnet-sketch"):
        full = np.asarray(pre.sketch_mask(-sk, H, W))
    else:
        pre.warn_missing("isnet-sketch", "masks.estimate_sketch_mask")
        full = masks.estimate_sketch_mask(sk, dil)

`Preprocessors.empty()` has no network (every `has` is False): the state without a directory.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from cdv2.sample import line_extract
from cdv2.sample.preprocess import ImageInput, load_image
from cdv2.weights import preprocessors_dir as ppd

MASK_EXTRACTORS = ("rmbg-v2", "isnet")        # the app's mask_extractor choices ("rmbg-v2", "ISNet")
DEFAULT_MASK_EXTRACTOR = "rmbg-v2"
SKETCH_MASK = "isnet-sketch"


class MissingPreprocessorError(LookupError):
    """A call needs a network whose converted weights are not in the preprocessor directory."""


def to_model_image(image, what: str = "image") -> jnp.ndarray:
    """NHWC float in [-1, 1]: float arrays (B, H, W, 3) / (H, W, 3) pass through; uint8 arrays, PIL
    images and paths go through the app's `to_tensor` (x / 255 * 2 - 1)."""
    if isinstance(image, (np.ndarray, jnp.ndarray)) and jnp.issubdtype(image.dtype, jnp.floating):
        x = jnp.asarray(image, jnp.float32)
        return x[None] if x.ndim == 3 else x
    return jnp.asarray(line_extract.to_tensor(load_image(image, what=what)[0]))


class Preprocessors:
    """The converted networks of one directory (any subset of `ppd.NETWORKS`)."""

    def __init__(self, path: Optional[Path] = None, present: Optional[dict] = None, dtype: Any = jnp.float32,
                 validate: bool = True):
        self.path = None if path is None else Path(path)
        self.dtype = dtype
        self.validate = validate
        self._present = dict(present or {})   # name -> DIR/<name>
        self._nets: dict[str, Any] = {}       # name -> MaskNet | LineExtractor, built on first use
        self._warned: set[str] = set()

    @classmethod
    def load(cls, path, dtype: Any = jnp.float32, *, eager: bool = False, validate: bool = True) -> "Preprocessors":
        """Every converted network in `path` (read lazily unless `eager`). `dtype`: compute dtype
        (float32 = the parity path; bfloat16 keeps fp32 statistics and outputs)."""
        pre = cls(path, ppd.list_preprocessors(path), dtype, validate)
        if eager:
            for name in pre._present:
                pre.network(name)
        return pre

    @classmethod
    def empty(cls) -> "Preprocessors":
        return cls()

    # --- which networks -------------------------------------------------------------------------
    def available(self) -> dict[str, bool]:
        """{name: converted weights present} for every network the app uses."""
        return {name: name in self._present for name in ppd.NETWORKS}

    def has(self, name: str) -> bool:
        return ppd.spec(name).name in self._present

    def warn_missing(self, name: str, instead: str) -> None:
        """One UserWarning per network (and instance) that its weights are absent and `instead` is used."""
        s = ppd.spec(name)
        if s.name in self._warned:
            return
        self._warned.add(s.name)
        where = f"in {self.path}" if self.path else "(no preprocessor directory given)"
        warnings.warn(f"{s.app_name} ({s.role}) weights not found {where}; using {instead} instead. "
                      f"Convert {s.app_file} with `cdv2 convert --preprocessor {s.name} FILE --out DIR`.",
                      UserWarning, stacklevel=3)

    def _require(self, name: str):
        s = ppd.spec(name)
        if s.name not in self._present:
            where = f"{self.path} has no {s.name}/" if self.path else "no preprocessor directory was given"
            raise MissingPreprocessorError(
                f"{s.app_name} ({s.role}) is not loaded: {where}. Convert the app's {s.app_file} with "
                f"`cdv2 convert --preprocessor {s.name} {s.app_file} --out DIR` (or `--preprocessors-from "
                f"preprocessor/weights`) and pass that DIR.")
        return s

    def network(self, name: str):
        """The loaded network (`mask_nets.MaskNet` or `line_extract.LineExtractor`), built once."""
        s = self._require(name)
        if s.name not in self._nets:
            variables, config, _ = ppd.load_preprocessor(self.path, s.name, validate=self.validate)
            if s.kind == "line":
                self._nets[s.name] = line_extract.LineExtractor(s.name, variables, config, self.dtype)
            else:
                from cdv2.sample.mask_nets import MaskNet
                import jax

                variables = jax.tree_util.tree_map(jnp.asarray, variables)
                self._nets[s.name] = MaskNet("isnet" if s.kind == "isnet" else "rmbg", variables, config, self.dtype)
        return self._nets[s.name]

    # --- the app's calls --------------------------------------------------------------------------
    def sketch_mask(self, white_sketch, height: int, width: int) -> jnp.ndarray:
        """`ISNet-sketch.proceed(white_sketch, th=H, tw=W, crop=False)`: white_sketch = -sketch
        (the app's `white_sketch`, (1, H, W, 3) in [-1, 1]) -> (1, H, W, 1)."""
        return self.network(SKETCH_MASK).proceed(to_model_image(white_sketch, "sketch"), th=height, tw=width,
                                                 crop=False)

    def _mask_net(self, extractor: str):
        name = ppd.spec(extractor).name
        if name not in MASK_EXTRACTORS:
            raise ValueError(f"mask extractor must be one of {MASK_EXTRACTORS}, got {extractor!r}")
        return self.network(name)

    def reference_mask(self, image, extractor: str = DEFAULT_MASK_EXTRACTOR) -> jnp.ndarray:
        """The app's rmask / bgmask: `mask_extractor.proceed(x, dilate=True)` (11x11 max-pool)."""
        return self._mask_net(extractor).proceed(to_model_image(image, "reference"), dilate=True)

    def remove_background(self, results, extractor: str = DEFAULT_MASK_EXTRACTOR) -> jnp.ndarray:
        """The app's `rmbg` on the results: `mask_extractor.proceed(results)`; the app then keeps
        `where(mask >= mask_ts, results, 1)` (mask_ts = 0.5)."""
        return self._mask_net(extractor).proceed(to_model_image(results, "results"))

    def mask_fn(self, extractor: str = DEFAULT_MASK_EXTRACTOR):
        """The network as the Colorizer's `mask_extractor` hook: uint8 (h, w, 3) -> (h, w) float mask,
        undilated (the Colorizer dilates with the same 11x11 max filter)."""
        net = self._mask_net(extractor)
        return lambda rgb: np.asarray(net.proceed(to_model_image(rgb)))[0, ..., 0]

    def extract_lines(self, image: ImageInput, extractor: str = line_extract.DEFAULT_EXTRACTOR) -> np.ndarray:
        """`extractor.proceed(pil)`: (1, H, W, 3) float32, lines ~ +1 on -1."""
        return self._line(extractor).proceed(image)

    def preprocess_sketch(self, image: ImageInput, resolution: tuple[int, int], method: str = "none",
                          extractor: str = line_extract.DEFAULT_EXTRACTOR):
        """The app's `preprocess_sketch(sketch, (th, tw), method)` -> (sketch, box, white_sketch);
        only "extract" needs the line network."""
        net = self._line(extractor) if method == "extract" else None
        return line_extract.preprocess_sketch(image, resolution, method, net, dtype=self.dtype)

    def _line(self, extractor: str):
        s = ppd.spec(extractor)
        if s.kind != "line":
            raise ValueError(f"line extractor must be one of {tuple(line_extract.EXTRACTORS)}, got {extractor!r}")
        return self.network(s.name)

    def __repr__(self) -> str:
        have = [n for n, ok in self.available().items() if ok]
        return f"Preprocessors({str(self.path)!r}, loaded={have})"
