"""Multi-process start-up: `maybe_initialize_distributed()` calls `jax.distributed.initialize()`
when the environment describes a multi-process job, i.e. when any of these is set:

  JAX_COORDINATOR_ADDRESS                  (explicit; JAX_NUM_PROCESSES / JAX_PROCESS_ID are passed on)
  SLURM_JOB_ID with SLURM_NTASKS > 1       (srun; jax reads the rest of the SLURM_* variables)
  OMPI_COMM_WORLD_SIZE > 1                 (mpirun, Open MPI)
  TPU_WORKER_HOSTNAMES listing > 1 host    (multi-host Cloud TPU slice)

and CDV2_NO_DISTRIBUTED is not "1". Otherwise it is a single process and nothing happens.
CDV2_HEARTBEAT_TIMEOUT_S (default jax's 100 s): how long a silent process counts as alive (raise it
on hosts so overloaded that heartbeat threads starve, e.g. tests on a shared CPU box).
CPU-only jobs (JAX_PLATFORMS=cpu: tests, debugging a cluster launch on one machine) use gloo for
the cross-process collectives, which XLA:CPU otherwise lacks.

`CompileThenSync` wraps the train step for multi-process runs: each new batch signature is
compiled ahead of time and then all processes meet at a coordination-service `barrier` before
running it. Processes compile at different speeds (a persistent-cache hit on one, a miss on
another, a busy host), and the first collective of a new communicator must rendezvous within a
fixed deadline (gloo: 30 s, "Gloo context initialization failed: DEADLINE_EXCEEDED"); the barrier
has a long timeout and uses no device collective.
"""
from __future__ import annotations

import itertools
import os
from typing import Callable, Optional

import jax


def _multi_process_env(env=os.environ) -> Optional[str]:
    if env.get("CDV2_NO_DISTRIBUTED") == "1":
        return None
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "multi-host TPU"
    return None


def maybe_initialize_distributed() -> Optional[str]:
    """Start jax's distributed runtime when the environment says this is a multi-process job
    (see the module docstring); a no-op when it already runs. Returns the detected environment,
    or None (single process)."""
    kind = _multi_process_env()
    if kind is None or jax.distributed.is_initialized():
        return kind
    kwargs = {}
    if kind == "JAX_COORDINATOR_ADDRESS":
        kwargs["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
        if "JAX_NUM_PROCESSES" in os.environ:
            kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in os.environ:
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    if os.environ.get("CDV2_HEARTBEAT_TIMEOUT_S"):
        kwargs["heartbeat_timeout_seconds"] = int(os.environ["CDV2_HEARTBEAT_TIMEOUT_S"])
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return kind


BARRIER_TIMEOUT_S = 3600.0   # a slow compile on a loaded host; far beyond any collective's deadline
_barrier_ids = itertools.count()


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Every process waits here until all have arrived (jax's coordination service; no device
    collective). A no-op in a single-process run. Processes must call it in the same order."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client orbax's barriers use, too

    jax_distributed.global_state.client.wait_at_barrier(f"cdv2_{name}_{next(_barrier_ids)}", int(timeout_s * 1000))


class CompileThenSync:
    """`fn(state, batch)` (a jitted function); multi-process: each new batch signature (keys, shapes,
    dtypes) is lowered and compiled first, then all processes pass a `barrier`, then it runs, so
    every program's first collectives start together. Single-process: `fn` itself."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled = {}

    def __call__(self, state, batch):
        if jax.process_count() == 1:
            return self.fn(state, batch)
        key = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))
        exe = self.compiled.get(key)
        if exe is None:
            exe = self.compiled[key] = self.fn.lower(state, batch).compile()
            barrier("compiled_train_step")
        return exe(state, batch)
