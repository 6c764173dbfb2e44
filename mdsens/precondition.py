"""Block-Jacobi preconditioner for the gauge-fixed Hessian, from the pair terms.

The diagonal d×d block of particle i of the solver-coordinate Hessian is

    H_ii = Σ_j  L · K_ij · L,      K_ij = ∂²φ(|r_ij|)/∂r_ij²  (d×d),

with ``L = diag(box)`` (fractional coordinates, ``r = Δq·L``; identity in free
space). It is assembled in one pass over the enumerated pairs (all pairs or a
neighbor list), O(M d²), without any Hessian-vector product. ``H_ii`` is a
principal submatrix of a positive semidefinite H at a minimum, hence PSD; its
eigenvalues are floored (rattlers have a zero block) before inversion, so
``B₀ = blockdiag(H_ii)⁻¹`` is symmetric positive definite.

Gauge. The engine solves with ``M = P H P + (I − P)``; the preconditioner is
``B = P B₀ P + (I − P)``: symmetric, positive definite (for ``v = a + b`` with
``a = Pv``, ``vᵀBv = aᵀB₀a + |b|²``), and equal to M⁻¹ on the null space, so CG's
iterates stay consistent with the gauge.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mdsens.system import Params, System

Array = jax.Array


def diagonal_blocks(system: System, q: Array, params: Params) -> Array:
    """(N, d, d): the diagonal blocks ``∂²E/∂q_i²`` of the solver-coordinate Hessian."""
    dr, i, j, valid = system.pair_list(q, params)

    def pair_energy(r_vec: Array, a: Array, b: Array) -> Array:
        d2 = jnp.sum(r_vec**2)
        r = jnp.sqrt(jnp.where(d2 > 0, d2, 1.0))
        return system.pair(r, a, b, params)

    k = jax.vmap(jax.hessian(pair_energy))(dr, i, j)
    k = jnp.where(valid[:, None, None], k, 0.0)
    if system.periodic:
        scale = params["box"]
        k = k * scale[None, :, None] * scale[None, None, :]
    n, d = system.n, system.dim
    return jnp.zeros((n, d, d), k.dtype).at[i].add(k).at[j].add(k)


def block_inverse(blocks: Array, floor: float = 1e-8) -> Array:
    """Inverse of each symmetric PSD block, eigenvalues floored at ``floor`` times
    the mean block trace / d (zero blocks become that multiple of the identity)."""
    w, v = jnp.linalg.eigh(blocks)
    d = blocks.shape[-1]
    scale = jnp.mean(jnp.trace(blocks, axis1=-2, axis2=-1)) / d
    scale = jnp.where(scale > 0, scale, 1.0)
    w = jnp.maximum(w, floor * scale)
    return jnp.einsum("nab,nb,ncb->nac", v, 1.0 / w, v)


def block_jacobi(
    system: System, q: Array, params: Params, project: Callable[[Array], Array] | None = None
) -> Callable[[Array], Array]:
    """The preconditioner ``r ↦ P B₀ P r + (I − P) r`` for :func:`mdsens.linsolve.cg`.

    ``q``, ``params`` are treated as data (the preconditioner is not differentiated).
    """
    q, params = jax.lax.stop_gradient(q), jax.lax.stop_gradient(params)
    inverse = block_inverse(diagonal_blocks(system, q, params))
    project = (lambda v: v) if project is None else project

    def apply(r: Array) -> Array:
        pr = project(r)
        return project(jnp.einsum("nab,nb->na", inverse, pr)) + (r - pr)

    return apply


PRECONDITIONERS = ("none", "jacobi")
