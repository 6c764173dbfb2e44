"""Persistent JAX compilation cache for the command line.

A second ``mdsens`` run with the same shapes loads its compiled programs from
disk instead of compiling them again. The cache lives in
``$XDG_CACHE_HOME/mdsens/jax`` (default ``~/.cache/mdsens/jax``); set
``MDSENS_CACHE_DIR`` to move it, and ``MDSENS_NO_CACHE=1`` (or pass
``--no-cache``) to switch it off.
"""

from __future__ import annotations

import os
from pathlib import Path


def directory() -> Path:
    if os.environ.get("MDSENS_CACHE_DIR"):
        return Path(os.environ["MDSENS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mdsens" / "jax"


def disabled_by_env() -> bool:
    return os.environ.get("MDSENS_NO_CACHE", "").strip().lower() not in ("", "0", "false", "no")


def enable(enabled: bool = True) -> str | None:
    """Switch the persistent cache on (every compiled program is stored, however
    fast it compiled) unless ``enabled`` is False or ``MDSENS_NO_CACHE`` is set.
    Returns the directory used, or None. Call before the first compilation."""
    import jax

    if not enabled or disabled_by_env():
        return None
    path = directory()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # an unwritable home must not stop a run
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(path)
