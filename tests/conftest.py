"""Test configuration: float64 everywhere (the engine's default precision),
and a headless matplotlib backend."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
# mdsens's own persistent cache (~/.cache/mdsens) is for users' repeated runs:
# tests never read or write it.
os.environ.setdefault("MDSENS_NO_CACHE", "1")

# One test run shares its compiled programs: the first test (on either xdist
# worker, or in a CLI subprocess or notebook kernel) to compile a program
# stores it in a directory of this run's own, and a test that builds the same
# program again loads it instead of compiling it again. The directory starts
# empty and is removed when the run ends, so every program is still compiled
# once per run. MDSENS_TEST_SHARED_COMPILES=0 switches it off; tests that count
# compilations switch it off for themselves (tests/test_seams.py).
_OWN_COMPILE_DIR = None
if (os.environ.get("MDSENS_TEST_SHARED_COMPILES", "1") != "0"
        and "PYTEST_XDIST_WORKER" not in os.environ
        and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
    import tempfile

    _OWN_COMPILE_DIR = tempfile.mkdtemp(prefix="mdsens-test-compiles-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_COMPILE_DIR  # the workers inherit it
    # Programs, not single operations: storing each of the hundreds of eager
    # operations' tiny executables cost more than it saved (tests/test_linsolve_precond.py:
    # 502 entries and 71 s at 0 s against 10 entries and 60 s at 0.3 s).
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_unconfigure(config):
    if _OWN_COMPILE_DIR is not None:
        import shutil

        shutil.rmtree(_OWN_COMPILE_DIR, ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture
def compile_fresh():
    """Switch the run's shared compiled programs off for one test: a test that
    counts compilations must see every one."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)
