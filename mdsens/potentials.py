"""Pair potentials ``φ(r; parameters)``, differentiable in every parameter.

Plain functions of the pair distance ``r`` (any shape) and broadcastable
parameter arrays; a :class:`mdsens.system.System` sums them over pairs.
Energies in units of ε, lengths in units of the reference diameter / σ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def soft_sphere(r: Array, sigma: Array, epsilon: Array, alpha: Array) -> Array:
    """``(ε/α)(1 − r/σ)^α`` for ``r < σ``, else 0 (harmonic for α = 2).

    The power is evaluated on a base set to 1 outside contact, so that the
    derivative with respect to α (``log(1 − r/σ)``) stays finite there.
    """
    overlap = r < sigma
    base = jnp.where(overlap, 1.0 - r / sigma, 1.0)
    return jnp.where(overlap, epsilon / alpha * base**alpha, 0.0)


def lennard_jones(r: Array, sigma: Array, epsilon: Array, r_onset: Array, r_cutoff: Array) -> Array:
    """``4ε[(σ/r)^12 − (σ/r)^6]`` times jax-md's smooth multiplicative cutoff,
    which goes from 1 at ``r_onset`` to 0 at ``r_cutoff`` (both absolute
    distances) with continuous first and second derivatives."""
    from jax_md import energy as jmd_energy

    # jax-md multiplies by float32 constants (``f32(4) * epsilon``,
    # ``r_cutoff ** f32(2)``): a weakly typed parameter such as
    # ``jnp.asarray(1.0)`` would be rounded to float32 there, derivatives included.
    dtype = jnp.result_type(r, sigma, epsilon, r_onset, r_cutoff)
    sigma, epsilon, r_onset, r_cutoff = (
        jax.lax.convert_element_type(v, dtype) for v in (sigma, epsilon, r_onset, r_cutoff)
    )
    smooth = jmd_energy.multiplicative_isotropic_cutoff(
        lambda dr, **kw: jmd_energy.lennard_jones(dr, sigma, epsilon), r_onset, r_cutoff
    )
    return smooth(r)


def morse(r: Array, sigma: Array, epsilon: Array, alpha: Array) -> Array:
    """Morse ``ε(1 − e^{−α(r − σ)})² − ε``: minimum −ε at ``r = σ``, width 1/α."""
    return epsilon * (1.0 - jnp.exp(-alpha * (r - sigma))) ** 2 - epsilon
