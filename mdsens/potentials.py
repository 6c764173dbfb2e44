"""Pair potentials ``φ(r; parameters)``, differentiable in every parameter.

Plain functions of the pair distance ``r`` (any shape) and broadcastable
parameter arrays; a :class:`mdsens.system.System` sums them over pairs.
Energies in units of ε, lengths in units of the reference diameter / σ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

Array = jax.Array


def power(base: Array, exponent: Array | float) -> Array:
    """``base ** exponent``: :func:`traced_power` for an array exponent; a
    Python-number exponent picks its fast form at trace time (no branch in the
    compiled code, so the force fuses; see :func:`mdsens.relax.pair_force_fn`)."""
    if isinstance(exponent, (int, float)):
        for e, f in _FAST_POWERS:
            if float(exponent) == e:
                return f(base)
        return base ** exponent
    return traced_power(base, exponent)


@jax.custom_jvp
def traced_power(base: Array, exponent: Array) -> Array:
    """``base ** exponent`` for ``base > 0``; a scalar exponent of 0, ½, 1, 3/2,
    2, 5/2 or 3 (harmonic and Hertzian soft spheres and their derivatives) is
    evaluated as products and a square root.

    XLA:CPU evaluates a float power with a traced exponent as ``exp(a log b)``,
    measured at ~25 ns per element in float64 — the largest single cost of a
    soft-sphere force. The exponent is a differentiable parameter, so it stays
    traced; the branch is chosen at run time and the derivative rule (below)
    is exact in both arguments and at every order."""
    if jnp.ndim(exponent) != 0:
        return base ** exponent
    which = jnp.asarray(len(_FAST_POWERS), jnp.int32)
    for k, (e, _) in enumerate(_FAST_POWERS):
        which = jnp.where(exponent == e, k, which)
    branches = [lambda b, a, f=f: f(b) for _, f in _FAST_POWERS] + [lambda b, a: b ** a]
    return jax.lax.switch(which, branches, base, exponent)


# Exponents evaluated without exp/log: the soft-sphere α of harmonic (2) and
# Hertzian (2.5) contacts, and the exponents their derivatives need (α − 1, α − 2, …).
_FAST_POWERS = (
    (2.0, lambda b: b * b),
    (1.0, lambda b: b),
    (0.0, lambda b: jnp.ones_like(b)),
    (2.5, lambda b: b * b * jnp.sqrt(b)),
    (1.5, lambda b: b * jnp.sqrt(b)),
    (0.5, lambda b: jnp.sqrt(b)),
    (3.0, lambda b: b * b * b),
)


def _power_jvp(primals, tangents):
    base, exponent = primals
    d_base, d_exponent = tangents
    y = traced_power(base, exponent)
    # d/db b^a = a b^(a-1); d/da b^a = log(b) b^a (base > 0 wherever it is used).
    # Symbolic zeros: a force (no tangent in the exponent) never pays for the log.
    out = jnp.zeros_like(y)
    if type(d_base) is not SymbolicZero:
        out = out + exponent * traced_power(base, exponent - 1.0) * d_base
    if type(d_exponent) is not SymbolicZero:
        out = out + jnp.log(base) * y * d_exponent
    return y, out


traced_power.defjvp(_power_jvp, symbolic_zeros=True)


def soft_sphere(r: Array, sigma: Array, epsilon: Array, alpha: Array) -> Array:
    """``(ε/α)(1 − r/σ)^α`` for ``r < σ``, else 0 (harmonic for α = 2).

    The power is evaluated on a base set to 1 outside contact, so that the
    derivative with respect to α (``log(1 − r/σ)``) stays finite there.
    """
    overlap = r < sigma
    base = jnp.where(overlap, 1.0 - r / sigma, 1.0)
    return jnp.where(overlap, epsilon / alpha * power(base, alpha), 0.0)


def lennard_jones(r: Array, sigma: Array, epsilon: Array, r_onset: Array, r_cutoff: Array) -> Array:
    """``4ε[(σ/r)^12 − (σ/r)^6]`` times a smooth multiplicative cutoff ``S(r)``:
    1 below ``r_onset``, 0 beyond ``r_cutoff`` (absolute distances), and in
    between ``S = (r_c² − r²)² (r_c² + 2r² − 3r_o²) / (r_c² − r_o²)³`` (HOOMD's
    XPLOR form, as in jax-md's ``multiplicative_isotropic_cutoff``), with
    continuous first derivative. Computed in the parameters' own precision
    (jax-md's version multiplies by float32 constants, which rounded weakly
    typed parameters and their derivatives)."""
    idr2 = (sigma / r) ** 2
    idr6 = idr2 * idr2 * idr2
    lj = jnp.nan_to_num(4.0 * epsilon * (idr6 * idr6 - idr6))
    r2, rc2, ro2 = r * r, r_cutoff * r_cutoff, r_onset * r_onset
    inner = jnp.where(r < r_cutoff, (rc2 - r2) ** 2 * (rc2 + 2.0 * r2 - 3.0 * ro2) / (rc2 - ro2) ** 3, 0.0)
    return jnp.where(r < r_onset, 1.0, inner) * lj


def morse(r: Array, sigma: Array, epsilon: Array, alpha: Array) -> Array:
    """Morse ``ε(1 − e^{−α(r − σ)})² − ε``: minimum −ε at ``r = σ``, width 1/α."""
    return epsilon * (1.0 - jnp.exp(-alpha * (r - sigma))) ** 2 - epsilon
