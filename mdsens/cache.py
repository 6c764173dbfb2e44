"""Compiled programs, in this process and on disk.

In process (:func:`program`): the engine's entry points — ``job.execute``,
``sensitivity.forward``/``gradient`` — compile each function once per
(key, argument shapes and dtypes, backend), the key naming the model
(:class:`mdsens.system.Model`, hashable by value) and the options, never an
array: a Python loop over runs or parameter values compiles nothing after
its first pass.

On disk, for the command line: a second ``mdsens`` run with the same shapes loads its compiled programs from
disk instead of compiling them again. The cache lives in
``$XDG_CACHE_HOME/mdsens/jax`` (default ``~/.cache/mdsens/jax``); set
``MDSENS_CACHE_DIR`` to move it, and ``MDSENS_NO_CACHE=1`` (or pass
``--no-cache``) to switch it off.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Hashable

#: compiled programs kept in process (least recently used dropped first)
PROGRAM_LIMIT = 256
_PROGRAMS: "OrderedDict[Hashable, Callable]" = OrderedDict()
#: guards _PROGRAMS (not the compiles): ``job`` compiles the derivative programs
#: in a second thread while the relaxation compiles and runs
_LOCK = threading.Lock()


def program(key: Hashable, make: Callable[[], Callable], *args: Any) -> tuple[Callable, float]:
    """``make()`` compiled ahead of time for ``args`` (their shapes, dtypes and
    pytree structure), once per ``key``: returns ``(compiled, compile_s)``,
    ``compile_s`` 0 when it was cached. ``key`` holds what ``make()``'s function
    depends on besides its arguments (a model, options); an unhashable key
    compiles every time."""
    import jax

    leaves, tree = jax.tree.flatten(args)
    signature = (key, tree, tuple(jax.typeof(x) for x in leaves), jax.default_backend())
    with _LOCK:
        try:
            compiled = _PROGRAMS.get(signature)
        except TypeError:  # an unhashable key: no caching
            signature, compiled = None, None
        if compiled is not None:
            _PROGRAMS.move_to_end(signature)
            return compiled, 0.0
    start = time.perf_counter()
    compiled = jax.jit(make()).lower(*args).compile()
    elapsed = time.perf_counter() - start
    if signature is not None:
        with _LOCK:
            _PROGRAMS[signature] = compiled
            while len(_PROGRAMS) > PROGRAM_LIMIT:
                _PROGRAMS.popitem(last=False)
    return compiled, elapsed


def programs() -> int:
    """How many compiled programs :func:`program` holds."""
    return len(_PROGRAMS)


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
