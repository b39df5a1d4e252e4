"""Sharded training equals unsharded training: tests/mesh_worker.py (a subprocess, because the 8
fake CPU devices must be configured before jax starts) runs one stage-1 train step from the same
state and batch on 1 device, on a data x fsdp mesh of 8 x 1 and of 2 x 4, and reports differences
and sharding facts as JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from cdv2.train.config import MeshConfig, ShardingRule
from cdv2.train.mesh import _multi_process_env, auto_spec, leaf_spec, make_mesh, mesh_shape

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def worker_report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(TESTS / "mesh_worker.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    return report


@pytest.mark.slow  # an 8-device subprocess run: ~2.5 min on 2 cores
@pytest.mark.parametrize("mesh", ["8x1", "2x4"])
def test_sharded_step_equals_single_device(worker_report, mesh):
    r = worker_report
    # the step really did something: parameters moved by far more than the tolerance
    assert r["max_param_update"] > 1e-4
    assert r[f"{mesh}/max_param_diff"] <= 1e-5, r
    assert r[f"{mesh}/loss_diff"] <= 1e-5 * max(1.0, abs(r["single/loss"])), r
    assert r[f"{mesh}/grad_norm_rel_diff"] <= 1e-5, r


@pytest.mark.slow  # shares that subprocess run
def test_params_and_optimizer_state_are_really_sharded(worker_report):
    r = worker_report
    # 2 x 4: the big conv kernel (3, 3, 256, 128) is split 4 ways along its largest dim, before and
    # after the step (out_shardings keep it there), and so are many other leaves and Adam moments
    assert r["2x4/big_leaf_spec"] == r["2x4/big_leaf_spec_after"] == "P(None, None, 'fsdp', None)"
    assert r["2x4/big_leaf_shard_shape"] == [3, 3, 64, 128]
    assert r["2x4/sharded_param_leaves"] > 100 and r["2x4/sharded_opt_leaves"] > 100
    # 8 x 1: fsdp size 1, pure data parallel: everything replicated
    assert r["8x1/big_leaf_shard_shape"] == [3, 3, 256, 128]
    assert r["8x1/sharded_param_leaves"] == 0


def test_mesh_shape_validation():
    assert mesh_shape(MeshConfig(-1, 4), 8) == (2, 4)
    assert mesh_shape(MeshConfig(8, 1), 8) == (8, 1)
    with pytest.raises(ValueError, match="jax sees 8"):
        mesh_shape(MeshConfig(4, 4), 8)
    with pytest.raises(ValueError, match="divide the device count"):
        mesh_shape(MeshConfig(-1, 3), 8)


def test_auto_rule():
    assert tuple(auto_spec((3, 3, 256, 128), 4, 1)) == (None, None, "fsdp", None)
    assert tuple(auto_spec((128, 128), 4, 1)) == (None, "fsdp")          # tie: the later (output) dim
    assert tuple(auto_spec((3, 3, 6, 10), 4, 1)) == ()                   # nothing divisible: replicated
    assert tuple(auto_spec((256,), 4, 1000)) == ()                       # below min size: replicated
    assert tuple(auto_spec((256, 512), 1, 1)) == ()                      # no fsdp axis


def test_explicit_rules():
    mesh = make_mesh(MeshConfig(1, 1), jax.devices()[:1])
    rules = (ShardingRule(r"/lora_", "replicated"), ShardingRule(r"kernel$", (None, "fsdp")),
             ShardingRule(".*", "auto"))
    assert tuple(leaf_spec("unet/a/to_q/lora_down_fg/kernel", (64, 4), rules, mesh, 1)) == ()
    assert tuple(leaf_spec("unet/a/to_q/kernel", (64, 64), rules, mesh, 1)) == (None, "fsdp")
    with pytest.raises(ValueError, match="has 2 entries"):
        leaf_spec("unet/conv/kernel", (3, 3, 8, 8), rules, mesh, 1)


def test_distributed_env_detection():
    assert _multi_process_env({}) is None
    assert _multi_process_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "JAX_COORDINATOR_ADDRESS"
    assert _multi_process_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert _multi_process_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == "SLURM"
    assert _multi_process_env({"OMPI_COMM_WORLD_SIZE": "4"}) == "Open MPI"
    assert _multi_process_env({"TPU_WORKER_HOSTNAMES": "a,b"}) == "multi-host TPU"
    assert _multi_process_env({"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert _multi_process_env({"JAX_COORDINATOR_ADDRESS": "x", "CDV2_NO_DISTRIBUTED": "1"}) is None
