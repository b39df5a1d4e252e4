"""Multi-process start-up: `maybe_initialize_distributed()` calls `jax.distributed.initialize()`
when the environment describes a multi-process job, i.e. when any of these is set:

  JAX_COORDINATOR_ADDRESS                  (explicit; JAX_NUM_PROCESSES / JAX_PROCESS_ID are passed on)
  SLURM_JOB_ID with SLURM_NTASKS > 1       (srun; jax reads the rest of the SLURM_* variables)
  OMPI_COMM_WORLD_SIZE > 1                 (mpirun, Open MPI)
  TPU_WORKER_HOSTNAMES listing > 1 host    (multi-host Cloud TPU slice)

and CDV2_NO_DISTRIBUTED is not "1". Otherwise it is a single process and nothing happens.
CPU-only jobs (JAX_PLATFORMS=cpu: tests, debugging a cluster launch on one machine) use gloo for
the cross-process collectives, which XLA:CPU otherwise lacks.
"""
from __future__ import annotations

import os
from typing import Optional

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
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return kind
