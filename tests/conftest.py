"""Shared fixtures: the oracle folder beside the repo (../shared/oracle) loaded once.

The parity fixtures are NOT shipped in the repo (they are ~180 MB): tests that need them skip with
a visible reason when `../shared/oracle` (or $CDV2_ORACLE) is absent, and fail instead when
$CDV2_REQUIRE_ORACLE=1 (set by `.ci/run`, so CI can never pass by skipping them)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
ORACLE = Path(os.environ.get("CDV2_ORACLE", REPO.parent / "shared" / "oracle"))
DATA = REPO / "tests" / "data"  # small reference files shipped with the repo (key lists)


def read_key_list(path) -> dict:
    """A `key (shape) dtype` listing (tests/data/*_keys.txt) -> {key: (shape, dtype)}."""
    out = {}
    for line in Path(path).read_text().splitlines():
        key, rest = line.split(" ", 1)
        shape, dtype = rest.rsplit(" ", 1)
        out[key] = (tuple(json.loads(shape.replace("(", "[").replace(")", "]").replace(",]", "]"))), dtype)
    return out


def rel_err(out, ref) -> float:
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def require_oracle(relative: str) -> Path:
    """ORACLE / relative, or skip (fail under CDV2_REQUIRE_ORACLE=1) when it is absent."""
    path = ORACLE / relative
    if not path.exists():
        msg = f"oracle fixture {path} not found (parity fixtures live in ../shared/oracle; set CDV2_ORACLE)"
        if os.environ.get("CDV2_REQUIRE_ORACLE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    """The first oracle set (top level of ../shared/oracle)."""
    require_oracle("tiny_v2_fixtures.npz")
    return ORACLE


@pytest.fixture(scope="session")
def oracle_v2_dir() -> Path:
    """../shared/oracle/v2: the non-square single-file set (see its FIXTURES.md)."""
    return require_oracle("v2/tiny_v2_fixtures.npz").parent


@pytest.fixture(scope="session")
def preprocessors_oracle_dir() -> Path:
    """../shared/oracle/preprocessors: the mask and line networks (see its FIXTURES.md)."""
    return require_oracle("preprocessors/summary.json").parent


@pytest.fixture(scope="session")
def fixtures(oracle_dir):
    return dict(np.load(oracle_dir / "tiny_v2_fixtures.npz"))


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


@pytest.fixture(scope="session")
def tiny_state_dict(oracle_dir):
    from safetensors.numpy import load_file

    return load_file(str(oracle_dir / "tiny_v2.safetensors"))


@pytest.fixture(scope="session")
def tiny_config():
    from cdv2.config import load_model_config

    return load_model_config("tiny")


@pytest.fixture(scope="session")
def tiny_params(oracle_dir, tiny_config):
    """Every param group of the oracle's tiny model (authors' file + open_clip file), fp32 numpy."""
    from cdv2.weights.pretrained import load_pretrained

    params, _ = load_pretrained(oracle_dir / "tiny_v2.safetensors",
                                clip=str(oracle_dir / "tiny_openclip_visual.safetensors"), config=tiny_config)
    return params


@pytest.fixture(scope="session", autouse=True)
def persistent_xla_cache():
    """One on-disk XLA cache for the whole suite, kept between runs (a re-run, or CI on the same
    machine, reuses the compiled programs). $CDV2_TEST_XLA_CACHE: a folder, or 0 to turn it off."""
    import jax

    where = os.environ.get("CDV2_TEST_XLA_CACHE", str(Path.home() / ".cache" / "cdv2" / "xla-tests"))
    if where != "0":
        jax.config.update("jax_compilation_cache_dir", where)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A module-wide persistent XLA cache: tests that run the same program in several fresh
    "processes" (train runs, resumes, demo re-runs) compile it once."""
    import jax

    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def run_with_fake_devices(script, devices: int, timeout: int = 600) -> dict:
    """Run `python script` with `devices` fake CPU devices (fixed before jax starts, hence a
    subprocess) and the repo importable; -> the JSON object its last stdout line prints."""
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
