"""Observables ``O(q, θ)`` of a relaxed system: plain differentiable functions.

Each takes ``(system, q, params)`` with ``q`` in solver coordinates (see
:mod:`mdsens.system`). Their derivatives along the equilibrium follow from
JAX's chain rule once ``q*(θ)`` is differentiable: ``dO/dθ = ∂θO + ∂qO·∂q*/∂θ``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

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
    require(system, "pressure")
    dE_dbox = jax.grad(lambda box: system.energy(q, {**params, "box": box}))(params["box"])
    box = params["box"]
    return -jnp.sum(box * dE_dbox) / (system.dim * system.volume(params))


def stress(system: System, q: Array, params: Params) -> Array:
    """Stress tensor ``σ = (1/V) ∂E/∂ε`` at ``ε = 0`` (d, d), for the affine strain
    ``r → (I + ε) r`` of every separation (jax-md ``elasticity`` convention:
    tension positive, so ``P = −tr σ / d``). Periodic systems only."""
    require(system, "stress")
    d = system.dim
    zero = jnp.zeros((d, d), jnp.result_type(q))
    return jax.grad(lambda e: system.energy(q, params, strain=e))(zero) / system.volume(params)


def volume(system: System, q: Array, params: Params) -> Array:
    """Box volume V (area in 2D): ``prod(box)``, times ``det exp(U)`` at fixed pressure."""
    require(system, "volume")
    return system.volume(params)


def cell(system: System, q: Array, params: Params) -> Array:
    """The periodic cell's edge vectors as rows (d, d): ``diag(box)`` for a fixed
    box, ``(exp(U) diag(L₀))ᵀ`` at fixed pressure (H5MD's ``box/edges``)."""
    require(system, "cell")
    if hasattr(system, "cell"):
        return system.cell(params)
    return jnp.diag(params["box"])


def packing_fraction(system: System, q: Array, params: Params) -> Array:
    """``φ = Σ_i v(D_i) / V``, ``v`` the disk area or sphere volume of diameter
    ``D_i`` (per particle, or per species through ``system.species``); overlaps
    are not subtracted. Needs a ``diameter`` parameter and a periodic box."""
    require(system, "packing_fraction")
    d = jnp.asarray(params["diameter"])
    per_particle = d if d.shape == (system.n,) else d[jnp.asarray(system.species)]
    radius = per_particle / 2.0
    each = jnp.pi * radius**2 if system.dim == 2 else 4.0 / 3.0 * jnp.pi * radius**3
    return jnp.sum(each) / system.volume(params)


def enthalpy(system: System, q: Array, params: Params) -> Array:
    """``H = E + P V`` at the target pressure ``P = params["pressure"]`` (fixed
    pressure only: the function the relaxation minimises)."""
    require(system, "enthalpy")
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
    require(system, "contact_number")
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
    require(system, "elastic_tensor")
    return elasticity.elastic_tensor(system, q, params, _held_rattlers(system, q, params))


def bulk_modulus(system: System, q: Array, params: Params) -> Array:
    """Angle-averaged bulk modulus ``B`` of :func:`elastic_tensor`."""
    require(system, "bulk_modulus")
    return elasticity.bulk_modulus_of(elastic_tensor(system, q, params))


def shear_modulus(system: System, q: Array, params: Params) -> Array:
    """Angle-averaged shear modulus ``G`` of :func:`elastic_tensor`."""
    require(system, "shear_modulus")
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
    require(system, "poisson_ratio")
    c = elastic_tensor(system, q, params)
    return poisson_ratio_of(elasticity.bulk_modulus_of(c), elasticity.shear_modulus_of(c), system.dim)


# -- the registry: one place that knows an observable ----------------------------

#: what an observable can need of a system: (the requirement, what the system lacks)
NEEDS = {
    "box": ("a periodic box", "is in free space"),
    "diameter": ("particle diameters", "has none"),
    "pressure": ("a target pressure (build with --set pressure=P)", "has a fixed box"),
    "contact": ("a contact rule", "has none"),
}

_PRESSURE = "epsilon sigma-{d}"  # an energy density: energy over a d-dimensional volume


@dataclass(frozen=True)
class Quantity:
    """A named quantity a run records: its unit (an H5MD unit string in reduced
    units, ``{d}`` the dimension; None for a count or a flag) and a one-line
    description (the file's ``description`` attribute)."""

    name: str
    unit: str | None
    description: str

    def unit_in(self, dim: int) -> str | None:
        return None if self.unit is None else self.unit.format(d=dim)


@dataclass(frozen=True)
class Observable(Quantity):
    """An observable: a :class:`Quantity` with the ``rank`` of its shape
    ``(d,) * rank``, its function ``fn(system, q, params)`` and what it
    ``needs`` of the system (keys of :data:`NEEDS`; ``fn`` checks them with
    :func:`require`). Calling the entry calls ``fn``."""

    rank: int = 0
    fn: Callable[[System, Array, Params], Array] = field(default=None, repr=False)
    needs: tuple[str, ...] = ()

    def shape(self, dim: int) -> tuple[int, ...]:
        return (dim,) * self.rank

    def __call__(self, system: System, q: Array, params: Params) -> Array:
        return self.fn(system, q, params)


def require_box(system: System, what: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` (one line) unless ``system`` has a periodic box: the one
    check and message for everything that needs a volume (observables, the
    moduli, fixed pressure, ``--keep phi``, the LAMMPS peer)."""
    if not system.periodic:
        raise error(f"{what} {_need_text(system, 'box')}")


def requirement(system: System, name: str, what: str | None = None) -> str | None:
    """Why observable ``name`` cannot be computed on ``system`` (one line,
    starting with ``what``, default ``observable 'name'``), or None."""
    for need in OBSERVABLES[name].needs:
        met = {"box": system.periodic, "diameter": "diameter" in system.params,
               "pressure": "pressure" in system.params, "contact": system.contact is not None}[need]
        if not met:
            return f"{what or f'observable {name!r}'} {_need_text(system, need)}"
    return None


def require(system: System, name: str, error: type[Exception] = ValueError, what: str | None = None) -> None:
    """Raise ``error`` with :func:`requirement`'s message if ``name`` cannot be computed on ``system``."""
    reason = requirement(system, name, what)
    if reason is not None:
        raise error(reason)


def _need_text(system: System, need: str) -> str:
    wanted, lacking = NEEDS[need]
    return f"needs {wanted}; system {system.name!r} {lacking}"


def _observable(fn: Callable, rank: int, unit: str | None, description: str, *needs: str) -> Observable:
    return Observable(fn.__name__, unit, description, rank, fn, needs)


OBSERVABLES: dict[str, Observable] = {o.name: o for o in (
    _observable(energy, 0, "epsilon", "total potential energy E at the relaxed state"),
    _observable(energy_per_particle, 0, "epsilon", "E / N at the relaxed state"),
    _observable(pressure, 0, _PRESSURE, "athermal pressure P = -dE/dV under affine dilation", "box"),
    _observable(stress, 2, _PRESSURE, "stress tensor (1/V) dE/dstrain, tension positive", "box"),
    _observable(volume, 0, "sigma{d}", "box volume (area in 2D)", "box"),
    _observable(cell, 2, "sigma", "periodic cell, edge vectors as rows", "box"),
    _observable(packing_fraction, 0, "1", "sum of the particles' volumes over the box volume", "box", "diameter"),
    _observable(enthalpy, 0, "epsilon", "enthalpy E + P V at the target pressure P", "pressure"),
    _observable(contact_number, 0, "1", "mean contacts per held particle", "contact"),
    _observable(rattler_fraction, 0, "1", "fraction of particles that are rattlers"),
    _observable(elastic_tensor, 4, _PRESSURE, "elastic modulus tensor C with non-affine relaxation", "box"),
    _observable(bulk_modulus, 0, _PRESSURE, "angle-averaged bulk modulus", "box"),
    _observable(shear_modulus, 0, _PRESSURE, "angle-averaged shear modulus", "box"),
    _observable(poisson_ratio, 0, "1", "isotropic Poisson ratio from B and G: (B - G)/(B + G) in 2D, "
                                       "(3B - 2G)/(2(3B + G)) in 3D", "box"),
    _observable(max_force, 0, "epsilon sigma-1",
                "largest per-particle force magnitude max_i |F_i| at the end of the relaxation"),
)}

#: what a run file records beside the observables (no function of its own)
RECORDED: dict[str, Quantity] = {q.name: q for q in (
    Quantity("position", "sigma", "relaxed positions x*"),
    Quantity("stress_residual", "epsilon sigma-1",
             "fixed pressure: max |sigma + P I| over the relaxed stress components, times (V/N)^((d-1)/d) "
             "(a force; converged when below ftol)"),
    Quantity("minimizer_steps", None, "minimizer steps taken"),
    Quantity("converged", None, "whether max|F| < ftol was reached (derivatives are written only if so)"),
)}


def quantity(name: str) -> Quantity | None:
    """The registered observable or recorded quantity ``name`` (None: not known)."""
    return OBSERVABLES.get(name) or RECORDED.get(name)


def unit(name: str, dim: int) -> str | None:
    """Unit of ``name`` in ``dim`` dimensions (None: a count, a flag, or not known)."""
    known = quantity(name)
    return None if known is None else known.unit_in(dim)


def description(name: str) -> str:
    """One-line description of ``name`` (a generic one when not known)."""
    known = quantity(name)
    return f"observable {name}" if known is None else known.description
