"""A persistent XLA compilation cache, on by default for the CLI, the app and training: the second
start of `cdv2 colorize` at the same size (same sampler, steps, modes) loads its programs from disk
instead of compiling them.

    from cdv2.sample import compile_cache
    compile_cache.enable()          # call before the first jit; returns the folder or None

Settings (environment): CDV2_COMPILATION_CACHE=0 (or off/false/no) turns it off;
CDV2_COMPILATION_CACHE_DIR picks the folder (default: $XDG_CACHE_HOME/cdv2/xla, i.e.
~/.cache/cdv2/xla). An explicit `path` argument wins over the folder setting, not over "off".
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

ENV_SWITCH = "CDV2_COMPILATION_CACHE"
ENV_DIR = "CDV2_COMPILATION_CACHE_DIR"
_OFF = {"0", "off", "false", "no"}


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cdv2" / "xla"


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in _OFF


def enable(path: Optional[str | os.PathLike] = None, *, min_compile_time_s: float = 0.0) -> Optional[Path]:
    """Point JAX's persistent compilation cache at `path` (default: the env folder or
    `default_dir()`) unless the user turned it off. Programs compiling faster than
    `min_compile_time_s` are not stored (0: all, so small CPU programs are cached too).
    Returns the folder in use, or None when off or not creatable (then JAX compiles as usual)."""
    if not enabled_by_env():
        return None
    import jax

    env = os.environ.get(ENV_DIR)
    if path is None and not env and jax.config.jax_compilation_cache_dir:  # already chosen by the caller
        return Path(jax.config.jax_compilation_cache_dir)
    folder = Path(path or env or default_dir()).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # a read-only home must not stop colorizing
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def disable() -> None:
    """Stop using the persistent cache in this process (tests)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", None)
