"""Test configuration: float64 everywhere (the engine's default precision),
and a headless matplotlib backend."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
# Tests compile fresh: the persistent compilation cache is for users' repeated
# runs (tests of the cache switch it on themselves).
os.environ.setdefault("MDSENS_NO_CACHE", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
