"""Training checkpoint -> cdv2 weights directory (what `init_from`, `Colorizer.from_pretrained` and
`cdv2 colorize --weights` read): the next stage starts from it, inference loads it.

The checkpoint stores the train state as a flat {"params/<group>/...": array, "opt_state/...": ...}
dict (`cdv2.train.checkpoint`); only the params are taken. A trainable-only checkpoint holds just
the trained params: the frozen ones are reloaded from the source its record names (the `init_from`
weights dir, ...; content-checked) and merged, so the export is always a full weights dir.
Zero-size leaves, which orbax cannot store, are refilled from the model config's shapes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from flax import traverse_util

from cdv2.config import ModelConfig


def checkpoint_params(checkpoint_dir, model_cfg: ModelConfig, step: Optional[int] = None,
                      frozen_from=None) -> tuple[dict, int]:
    """-> (nested fp32 numpy params of every group, step) of the checkpoint at `step` (default latest)
    in `checkpoint_dir` (a training run's WORKDIR/checkpoints). `frozen_from`: where to take the
    frozen params of a trainable-only checkpoint instead of its recorded source (a weights dir, e.g.
    the moved `init_from`, or in-memory params; required when the run started from in-memory params)."""
    import orbax.checkpoint as ocp

    from cdv2.model import param_shapes
    from cdv2.train.checkpoint import load_frozen_source, read_frozen_record

    directory = Path(checkpoint_dir).absolute()
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    flat = {k[len("params/"):]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("params/")}
    if not flat:
        raise ValueError(f"checkpoint {directory}/{step} holds no params/ entries")
    record = read_frozen_record(directory, step)
    if record is not None:  # trainable-only: merge the frozen params from their (checked) source
        given = frozen_from if isinstance(frozen_from, dict) else None
        path = None if given is not None else frozen_from
        frozen = load_frozen_source(record, model_cfg, params=given, init_from=path)
        flat = {**{k: np.asarray(v, np.float32) for k, v in frozen.items()}, **flat}
    shapes = traverse_util.flatten_dict(param_shapes(model_cfg), sep="/")
    for key, shape in shapes.items():
        if key not in flat:
            if int(np.prod(shape.shape)) != 0:
                raise ValueError(f"checkpoint {directory}/{step} lacks {key}")
            flat[key] = np.zeros(shape.shape, np.float32)
    return traverse_util.unflatten_dict(flat, sep="/"), int(step)


def export_checkpoint(checkpoint_dir, model_cfg: ModelConfig, out, *, dtype: str = "float32",
                      step: Optional[int] = None, overwrite: bool = False, frozen_from=None) -> Path:
    """Write the checkpoint's params (trained + frozen: every group) as a weights directory, cast to
    `dtype` (float32 | float16). `frozen_from`: see `checkpoint_params`."""
    from cdv2.weights.weights_dir import save_weights_dir

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    params, step = checkpoint_params(checkpoint_dir, model_cfg, step, frozen_from=frozen_from)
    params = traverse_util.unflatten_dict(
        {k: v.astype(dtype) for k, v in traverse_util.flatten_dict(params).items()})
    return save_weights_dir(out, params, model_cfg, source=f"{Path(checkpoint_dir).absolute()} step {step}",
                            overwrite=overwrite)
