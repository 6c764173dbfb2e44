"""Observables ``O(q, θ)`` of a relaxed system: plain differentiable functions.

Each takes ``(system, q, params)`` with ``q`` in solver coordinates (see
:mod:`mdsens.system`). Their derivatives along the equilibrium follow from
JAX's chain rule once ``q*(θ)`` is differentiable: ``dO/dθ = ∂θO + ∂qO·∂q*/∂θ``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mdsens.minimize import max_force as _max_force
from mdsens.system import Params, System

Array = jax.Array


def energy(system: System, q: Array, params: Params) -> Array:
    """Total potential energy E (units of ε)."""
    return system.energy(q, params)


def pressure(system: System, q: Array, params: Params) -> Array:
    """Athermal pressure ``P = −∂E/∂V`` under affine dilation of the box.

    Dilating every side by ``λ`` at fixed fractional ``q``:
    ``dE/dλ|₁ = Σ_k L_k ∂E/∂L_k`` and ``dV/dλ|₁ = d·V``, so
    ``P = −Σ_k L_k ∂E/∂L_k / (d V)``. Periodic systems only.
    """
    if not system.periodic:
        raise ValueError(f"pressure needs a periodic box; system {system.name!r} is in free space")
    dE_dbox = jax.grad(lambda box: system.energy(q, {**params, "box": box}))(params["box"])
    box = params["box"]
    return -jnp.sum(box * dE_dbox) / (system.dim * system.volume(params))


def forces(system: System, q: Array, params: Params) -> Array:
    """Real-space forces ``−∇ₓE`` (N, d)."""
    x = system.to_real(q, params)
    return -jax.grad(system.energy_real)(x, params)


def max_force(system: System, q: Array, params: Params) -> Array:
    """``max_i |F_i|``: how far the state is from equilibrium."""
    return _max_force(forces(system, q, params))


def rattlers(system: System, q: Array, params: Params) -> Array:
    """(N,) bool: particles not held by the contact network.

    Iteratively, a particle with fewer than ``d + 1`` contacts with held
    particles is a rattler; removing it can leave a neighbour short, so repeat
    until nothing changes. All False for systems without a contact rule.
    """
    if system.contact is None:
        return jnp.zeros(system.n, bool)
    c = system.contacts(q, params).astype(jnp.int32)
    need = system.dim + 1

    def body(state):
        rattler, _ = state
        z = c @ (~rattler).astype(jnp.int32)
        new = rattler | (z < need)
        return new, jnp.any(new != rattler)

    init = (jnp.zeros(system.n, bool), jnp.asarray(True))
    rattler, _ = jax.lax.while_loop(lambda s: s[1], body, init)
    return rattler


OBSERVABLES = {
    "energy": energy,
    "pressure": pressure,
    "max_force": max_force,
}
