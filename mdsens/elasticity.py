"""Athermal elastic moduli with their non-affine relaxation, differentiable in θ.

For a symmetric strain ``ε`` applied to every pair separation, ``r → (I + ε) r``
(:meth:`mdsens.system.System.energy` with ``strain=``), the energy of the
*relaxed* system expands as (jax-md ``elasticity`` conventions)

    E(ε)/V = E⁰/V + σ_ij ε_ij + ½ C_ijkl ε_ij ε_kl + …

    C = (1/V) [∂²E/∂ε² − Ξᵀ H⁻¹ Ξ],   Ξ = ∂ε∇_q E,

the second term being the non-affine relaxation of the particles. Writing
``ε = Σ_k γ_k S_k`` over the ``d(d+1)/2`` symmetric basis tensors ``S_k``, the
relaxed response is ``R_kl = d²E/dγ_k dγ_l = ∂γ_k∂γ_l E + Ξ_k · u_l`` with
``u_l = ∂q*/∂γ_l`` from one implicit tangent each (:func:`mdsens.implicit.tangent`,
the strain being a parameter of the optimality function ``∇_q E(q, θ, γ)``).
Those solves are ``jax.lax.custom_linear_solve``\\ s, so the derivative of C
along the equilibrium, ``dC/dθ``, is a second-order implicit derivative that
JAX computes through both solves (forward or reverse mode).
"""

from __future__ import annotations

import contextvars
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import gauge as _gauge
from mdsens import implicit
from mdsens.system import Params, System

Array = jax.Array


def strain_basis(dim: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """The symmetric strain basis ``S_k = e_a e_bᵀ + e_b e_aᵀ`` (``e_a e_aᵀ`` on the
    diagonal) for ``a ≤ b``: returns ``S`` (k, d, d), the weights ``w_k`` (1 on
    the diagonal, 2 off it, so that ``S_k : C : S_l = w_k w_l C_abcd``) and the
    index pairs ``(a, b)``."""
    pairs = [(a, b) for a in range(dim) for b in range(a, dim)]
    basis = np.zeros((len(pairs), dim, dim))
    for k, (a, b) in enumerate(pairs):
        basis[k, a, b] = basis[k, b, a] = 1.0
    weights = np.array([1.0 if a == b else 2.0 for a, b in pairs])
    return basis, weights, pairs


def _require_box(system: System, what: str) -> None:
    from mdsens.observables import require_box  # the one box check (observables imports this module)

    require_box(system, what)


#: ``(system, q, params, rattler) -> solve`` for the moduli's solves, or None
#: (unpreconditioned CG at rtol 1e-10); set by :func:`mdsens.sensitivity.solving`.
SOLVE_AT: "contextvars.ContextVar[Callable | None]" = contextvars.ContextVar("mdsens_elastic_solve", default=None)


def strain_response(
    system: System, q: Array, params: Params, rattler: Array, solve: implicit.Solve | None = None
) -> Array:
    """``R_kl = d²E/dγ_k dγ_l`` of the relaxed system (k, k), ``k = d(d+1)/2``.

    Costs ``k`` linear solves with the gauge-fixed Hessian (translations and
    ``rattler`` (N,) bool removed). ``q`` must be a minimum.
    """
    system = system.held_only(rattler)  # a rattler's contact carries no load (System.held_only)
    basis = jnp.asarray(strain_basis(system.dim)[0], dtype=q.dtype)
    k = basis.shape[0]

    def energy(q_: Array, gamma: Array) -> Array:
        return system.energy(q_, params, strain=jnp.tensordot(gamma, basis, axes=1))

    def root_fn(q_: Array, gamma: Array) -> Array:
        return jax.grad(energy, argnums=0)(q_, gamma)

    def strain_force(q_: Array, gamma: Array) -> Array:
        return jax.grad(energy, argnums=1)(q_, gamma)

    project = _gauge.translations(rattler)
    if solve is None and SOLVE_AT.get() is not None:
        solve = SOLVE_AT.get()(system, q, params, rattler)
    gamma0 = jnp.zeros(k, q.dtype)
    directions = jnp.eye(k, dtype=q.dtype)

    def column(e: Array) -> Array:
        # The assembled Hessian is the strain-free one, exact here because the
        # tangent is taken at γ = 0.
        u, _ = implicit.tangent(root_fn, q, gamma0, e, solve, lambda x, p: project,
                                hvp=lambda x, gamma: system.hessian_vp(x, params))
        return jax.jvp(strain_force, (q, gamma0), (u, e))[1]

    response = jax.lax.map(column, directions).T
    # Exactly symmetric in exact arithmetic; symmetrising removes the solve's
    # round-off asymmetry, so C has its major symmetry to machine precision.
    return 0.5 * (response + response.T)


def elastic_tensor(
    system: System, q: Array, params: Params, rattler: Array, solve: implicit.Solve | None = None
) -> Array:
    """The elastic modulus tensor ``C_ijkl`` (d, d, d, d) with the non-affine
    relaxation, in jax-md's convention (units ε / length^d). Periodic systems."""
    _require_box(system, "the elastic modulus tensor")
    d = system.dim
    _, weights, pairs = strain_basis(d)
    response = strain_response(system, q, params, rattler, solve)
    response = response / (jnp.outer(weights, weights) * system.volume(params))
    index = np.zeros((d, d), dtype=int)
    for k, (a, b) in enumerate(pairs):
        index[a, b] = index[b, a] = k
    return response[index[:, :, None, None], index[None, None, :, :]]


def bulk_modulus_of(C: Array) -> Array:
    """Isotropic (angle-averaged) bulk modulus ``B`` from ``C`` (jax-md's definition):
    2D ``(Cxxxx + Cyyyy + 2Cxxyy)/4``; 3D ``Σ_{ab} C_aabb / 9``."""
    d = C.shape[0]
    return jnp.einsum("iijj->", C) / d**2


def shear_modulus_of(C: Array) -> Array:
    """Isotropic (angle-averaged) shear modulus ``G`` from ``C`` (jax-md's definition):
    ``G = (Σ_ab C_abab − Σ_ab C_aabb / d) / ((d − 1)(d + 2))``, which is
    ``(4Cxyxy + Cxxxx + Cyyyy − 2Cxxyy)/8`` in 2D and jax-md's ``/15`` formula in 3D."""
    d = C.shape[0]
    return (jnp.einsum("ijij->", C) - jnp.einsum("iijj->", C) / d) / ((d - 1) * (d + 2))
