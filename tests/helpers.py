"""Shared test helpers: small relaxed systems and comparisons.

The finite-difference reference itself is :func:`mdsens.sensitivity.finite_difference`
(re-relax from the relaxed state at θ ± h, Newton-polish to round-off, minimum-image
differences in the implicit derivative's gauge); these helpers only wrap it.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from mdsens import observables, sensitivity, systems


@functools.lru_cache(maxsize=None)
def relaxed(family: str, seed: int = 0, **config):
    """Build and relax a system once per test session: (system, q*, params, rattler).

    ``config`` values must be hashable (tuples for lists)."""
    system = systems.get(family).build(seed=seed, **config)
    q, info = sensitivity.relax(system, ftol=1e-12, max_steps=200_000)
    assert bool(info.converged), f"{family} {config} did not relax: {info}"
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    q = sensitivity.newton_polish(system, q, params, observables.rattlers(system, q, params))
    return system, q, params, observables.rattlers(system, q, params)


def relative_error(a, b) -> float:
    """max|a − b| / max|b| (absolute when b is zero)."""
    a, b = np.asarray(a), np.asarray(b)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))
