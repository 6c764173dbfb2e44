"""Observables ``O(q, θ)`` of a relaxed system: plain differentiable functions.

Each takes ``(system, q, params)`` with ``q`` in solver coordinates (see
:mod:`mdsens.system`). Their derivatives along the equilibrium follow from
JAX's chain rule once ``q*(θ)`` is differentiable: ``dO/dθ = ∂θO + ∂qO·∂q*/∂θ``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mdsens import elasticity
from mdsens.minimize import max_force as _max_force
from mdsens.system import Params, System

Array = jax.Array


def energy(system: System, q: Array, params: Params) -> Array:
    """Total potential energy E (units of ε)."""
    return system.energy(q, params)


def energy_per_particle(system: System, q: Array, params: Params) -> Array:
    """``E / N`` (units of ε)."""
    return system.energy(q, params) / system.n


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


def stress(system: System, q: Array, params: Params) -> Array:
    """Stress tensor ``σ = (1/V) ∂E/∂ε`` at ``ε = 0`` (d, d), for the affine strain
    ``r → (I + ε) r`` of every separation (jax-md ``elasticity`` convention:
    tension positive, so ``P = −tr σ / d``). Periodic systems only."""
    if not system.periodic:
        raise ValueError(f"stress needs a periodic box; system {system.name!r} is in free space")
    d = system.dim
    zero = jnp.zeros((d, d), jnp.result_type(q))
    return jax.grad(lambda e: system.energy(q, params, strain=e))(zero) / system.volume(params)


def volume(system: System, q: Array, params: Params) -> Array:
    """Box volume V (area in 2D): ``prod(box)``, times ``det exp(U)`` at fixed pressure."""
    if not system.periodic:
        raise ValueError(f"volume needs a periodic box; system {system.name!r} is in free space")
    return system.volume(params)


def cell(system: System, q: Array, params: Params) -> Array:
    """The periodic cell's edge vectors as rows (d, d): ``diag(box)`` for a fixed
    box, ``(exp(U) diag(L₀))ᵀ`` at fixed pressure (H5MD's ``box/edges``)."""
    if not system.periodic:
        raise ValueError(f"cell needs a periodic box; system {system.name!r} is in free space")
    if hasattr(system, "cell"):
        return system.cell(params)
    return jnp.diag(params["box"])


def packing_fraction(system: System, q: Array, params: Params) -> Array:
    """``φ = Σ_i v(D_i) / V``, ``v`` the disk area or sphere volume of diameter
    ``D_i`` (per particle, or per species through ``system.species``); overlaps
    are not subtracted. Needs a ``diameter`` parameter and a periodic box."""
    if not system.periodic or "diameter" not in params:
        raise ValueError(f"packing_fraction needs a periodic box and a diameter parameter; "
                         f"system {system.name!r} lacks one")
    d = jnp.asarray(params["diameter"])
    per_particle = d if d.shape == (system.n,) else d[jnp.asarray(system.species)]
    radius = per_particle / 2.0
    each = jnp.pi * radius**2 if system.dim == 2 else 4.0 / 3.0 * jnp.pi * radius**3
    return jnp.sum(each) / system.volume(params)


def enthalpy(system: System, q: Array, params: Params) -> Array:
    """``H = E + P V`` at the target pressure ``P = params["pressure"]`` (fixed
    pressure only: the function the relaxation minimises)."""
    if "pressure" not in params:
        raise ValueError(f"enthalpy needs a target pressure (build with pressure=...); system {system.name!r} "
                         "has a fixed box")
    return system.energy(q, params) + params["pressure"] * system.volume(params)


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
    # Contacts as a pair list, not an (N, N) matrix: O(N) memory with a neighbor list.
    c, i, j = system.contact_list(q, params)
    c = c.astype(jnp.int32)
    need = system.dim + 1

    def body(state):
        rattler, _ = state
        held = (~rattler).astype(jnp.int32)
        z = jnp.zeros(system.n, jnp.int32).at[i].add(c * held[j]).at[j].add(c * held[i])
        new = rattler | (z < need)
        return new, jnp.any(new != rattler)

    init = (jnp.zeros(system.n, bool), jnp.asarray(True))
    rattler, _ = jax.lax.while_loop(lambda s: s[1], body, init)
    return rattler


def contact_number(system: System, q: Array, params: Params) -> Array:
    """Mean number of contacts per held particle ``Z = 2 N_c / N_held``, counting
    only contacts between held (non-rattler) particles. Piecewise constant in θ
    (zero derivative). Needs a contact rule (soft spheres)."""
    if system.contact is None:
        raise ValueError(f"contact_number needs a contact rule; system {system.name!r} has none")
    held = ~rattlers(system, q, params)
    # Over the enumerated pairs, O(M) memory: never the (N, N) contact matrix
    # (9.9 GB peak at N = 32768 on a neighbor list). Each unordered pair is
    # enumerated once, and counts once for each of its two particles.
    c, i, j = system.contact_list(q, params)
    pairs = jnp.sum((c & held[i] & held[j]).astype(jnp.int32))
    count = jnp.sum(held)
    return jnp.where(count > 0, 2 * pairs / jnp.maximum(count, 1), 0.0)


def rattler_fraction(system: System, q: Array, params: Params) -> Array:
    """Fraction of particles that are rattlers (0 for systems without a contact rule)."""
    return jnp.mean(rattlers(system, q, params).astype(jnp.result_type(float)))


def _held_rattlers(system: System, q: Array, params: Params) -> Array:
    # The rattler set is discrete data for the moduli's gauge, not a function of θ.
    return rattlers(system, jax.lax.stop_gradient(q), jax.lax.stop_gradient(params))


def elastic_tensor(system: System, q: Array, params: Params) -> Array:
    """Elastic modulus tensor ``C`` (d, d, d, d) with non-affine relaxation
    (:func:`mdsens.elasticity.elastic_tensor`; d(d+1)/2 linear solves)."""
    return elasticity.elastic_tensor(system, q, params, _held_rattlers(system, q, params))


def bulk_modulus(system: System, q: Array, params: Params) -> Array:
    """Angle-averaged bulk modulus ``B`` of :func:`elastic_tensor`."""
    return elasticity.bulk_modulus_of(elastic_tensor(system, q, params))


def shear_modulus(system: System, q: Array, params: Params) -> Array:
    """Angle-averaged shear modulus ``G`` of :func:`elastic_tensor`."""
    return elasticity.shear_modulus_of(elastic_tensor(system, q, params))


def poisson_ratio_of(bulk: Array, shear: Array, dim: int) -> Array:
    """Isotropic Poisson ratio from the bulk and shear moduli. With the Lamé
    constants of an isotropic ``C`` (``B = λ + 2μ/d``, ``G = μ``) and
    ``ν = −ε_⊥/ε_∥`` under uniaxial stress: 2D ``ν = λ/(λ + 2μ) = (B − G)/(B + G)``;
    3D ``ν = λ/(2(λ + μ)) = (3B − 2G)/(2(3B + G))``."""
    if dim == 2:
        return (bulk - shear) / (bulk + shear)
    if dim == 3:
        return (3 * bulk - 2 * shear) / (2 * (3 * bulk + shear))
    raise ValueError(f"the Poisson ratio needs d = 2 or 3, got d = {dim}")


def poisson_ratio(system: System, q: Array, params: Params) -> Array:
    """Isotropic Poisson ratio ``ν`` (dimensionless) from ``B`` and ``G`` of one
    :func:`elastic_tensor` (:func:`poisson_ratio_of`): 2D ``(B − G)/(B + G)``,
    3D ``(3B − 2G)/(2(3B + G))``."""
    c = elastic_tensor(system, q, params)
    return poisson_ratio_of(elasticity.bulk_modulus_of(c), elasticity.shear_modulus_of(c), system.dim)


OBSERVABLES = {
    "energy": energy,
    "energy_per_particle": energy_per_particle,
    "pressure": pressure,
    "stress": stress,
    "volume": volume,
    "cell": cell,
    "packing_fraction": packing_fraction,
    "enthalpy": enthalpy,
    "contact_number": contact_number,
    "rattler_fraction": rattler_fraction,
    "elastic_tensor": elastic_tensor,
    "bulk_modulus": bulk_modulus,
    "shear_modulus": shear_modulus,
    "poisson_ratio": poisson_ratio,
    "max_force": max_force,
}
