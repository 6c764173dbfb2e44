"""Test configuration: float64 everywhere (the engine's default precision),
and a headless matplotlib backend."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
