"""Training checkpoint -> cdv2 weights directory (what `init_from`, `Colorizer.from_pretrained` and
`cdv2 colorize --weights` read): the next stage starts from it, inference loads it.

The checkpoint stores the train state as a flat {"params/<group>/...": array, "opt_state/...": ...}
dict (`cdv2.train.checkpoint`); only the params are taken. Zero-size leaves, which orbax cannot
store, are refilled from the model config's shapes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from flax import traverse_util

from cdv2.config import ModelConfig


def checkpoint_params(checkpoint_dir, model_cfg: ModelConfig, step: Optional[int] = None) -> tuple[dict, int]:
    """-> (nested fp32 numpy params of every group, step) of the checkpoint at `step` (default latest)
    in `checkpoint_dir` (a training run's WORKDIR/checkpoints)."""
    import orbax.checkpoint as ocp

    from cdv2.model import param_shapes

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
    shapes = traverse_util.flatten_dict(param_shapes(model_cfg), sep="/")
    for key, shape in shapes.items():
        if key not in flat:
            if int(np.prod(shape.shape)) != 0:
                raise ValueError(f"checkpoint {directory}/{step} lacks {key}")
            flat[key] = np.zeros(shape.shape, np.float32)
    return traverse_util.unflatten_dict(flat, sep="/"), int(step)


def export_checkpoint(checkpoint_dir, model_cfg: ModelConfig, out, *, dtype: str = "float32",
                      step: Optional[int] = None, overwrite: bool = False) -> Path:
    """Write the checkpoint's params as a weights directory, cast to `dtype` (float32 | float16)."""
    from cdv2.weights.weights_dir import save_weights_dir

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    params, step = checkpoint_params(checkpoint_dir, model_cfg, step)
    params = traverse_util.unflatten_dict(
        {k: v.astype(dtype) for k, v in traverse_util.flatten_dict(params).items()})
    return save_weights_dir(out, params, model_cfg, source=f"{Path(checkpoint_dir).absolute()} step {step}",
                            overwrite=overwrite)
