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
import jax.scipy.linalg
import jax.numpy as jnp
import numpy as np

from mdsens.system import Params, System

Array = jax.Array


def diagonal_blocks(system: System, q: Array, params: Params) -> Array:
    """(N, d, d): the diagonal blocks ``∂²E/∂q_i²`` of the solver-coordinate Hessian."""
    k, i, j = system.pair_hessians(q, params)
    n, d = system.n, system.dim
    return jnp.zeros((n, d, d), k.dtype).at[i].add(k).at[j].add(k)


def block_inverse(blocks: Array, floor: float | None = None) -> Array:
    """Inverse of each symmetric PSD block, eigenvalues floored at ``floor`` times
    the mean block trace / d (zero blocks become that multiple of the identity).

    ``floor`` defaults to ``sqrt(eps)`` of the dtype (1.5e-8 in float64, 3.5e-4
    in float32): eigh returns a zero eigenvalue as round-off of size
    ~eps·|block|, so a fixed 1e-8 sits below float32 noise and would invert
    noise. The floor only regularises degenerate (rattler, or collinearly
    held) blocks; P removes rattler rows anyway."""
    w, v = jnp.linalg.eigh(blocks)
    d = blocks.shape[-1]
    if floor is None:
        floor = float(np.sqrt(np.finfo(blocks.dtype).eps))
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


def _cells(system: System, q: Array, per_cell: int, max_cells: int) -> tuple[Array, int]:
    """Each particle's cell on a regular grid over the (fractional) box, ~``per_cell`` particles a cell."""
    n, d = system.n, system.dim
    side = max(1, int(round((min(n / per_cell, max_cells)) ** (1.0 / d))))
    if system.periodic:
        frac = jnp.mod(q, 1.0)
    else:
        lo, hi = jnp.min(q, axis=0), jnp.max(q, axis=0)
        frac = (q - lo) / jnp.where(hi > lo, hi - lo, 1.0)
    idx = jnp.clip(jnp.floor(frac * side).astype(jnp.int32), 0, side - 1)
    flat = jnp.zeros(n, jnp.int32)
    for k in range(d):
        flat = flat * side + idx[:, k]
    return flat, side**d


def _coarse_inverse(coarse: Array, stiffness: Array) -> Array:
    """The inverse of the singular coarse matrix E that :func:`two_level` applies.

    E's null space is the d global translations (and a cell without held
    particles, an empty row); with one cell, E is round-off. It is inverted
    shifted by τ I, τ = sqrt(eps) times the larger of its largest diagonal entry
    and ``stiffness`` (a particle's largest diagonal block, so that a round-off E
    is shifted by a physical amount): 1.5e-8 relative in float64, 3.5e-4 in
    float32, well above round-off and below the smallest genuine eigenvalue,
    ~(π/side)²/d of the largest (≳1e-3 at max_cells = 1024), so the genuine modes
    keep their weight to ~1e-5. The null modes get weight 1/τ instead of a
    pseudo-inverse's 0, on nothing: a restricted residual Zᵀ P r sums P r over the
    held particles, so it has no global translation (up to round-off, which P
    removes again after the prolongation) and is zero on empty cells. The Cholesky
    inverse costs a third of an eigendecomposition (3D N = 16384, 1536 coarse
    unknowns: 0.12 against 0.36 s; 3000: 0.71 against 1.85 s); each application
    stays one dense product (XLA:CPU's triangular solves took 4.2 against 0.39 ms
    at 1536). Where E + τ I is not positive definite (E indefinite beyond τ: a held
    particle's contacts with rattlers, which E leaves out, under tension), the
    pseudo-inverse of E's positive part, by eigendecomposition, as before."""
    size = coarse.shape[0]
    eye = jnp.eye(size, dtype=coarse.dtype)
    scale = jnp.maximum(jnp.max(jnp.diagonal(coarse)), stiffness)
    tau = jnp.sqrt(jnp.finfo(coarse.dtype).eps) * jnp.where(scale > 0, scale, 1.0)
    inverse = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(coarse + tau * eye, lower=True), eye)

    def positive_part(_):
        lam, vec = jnp.linalg.eigh(coarse)
        keep = lam > jnp.sqrt(jnp.finfo(lam.dtype).eps) * jnp.max(lam)
        return (vec * jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)) @ vec.T

    inverse = jax.lax.cond(jnp.all(jnp.isfinite(inverse)), lambda _: inverse, positive_part, None)
    return 0.5 * (inverse + inverse.T)


#: the most cells of the coarse space, by dimension (:func:`two_level`). In 3D the coarse
#: correction saves few iterations (a compressed packing's spectrum is not piled in long
#: waves: docs/design.md, "In 3D no coarse space fixes CG") and its dense product is paid
#: every iteration: one tangent at 3D bidisperse N = 16384, in one process, block-Jacobi
#: 0.58 s (361 iterations), 216 cells 0.63 s (349), 512 cells 0.81 s (343); an LJ crystal
#: (N = 4000, 125 cells) keeps its 60 against 78 iterations
MAX_CELLS = {2: 1024, 3: 216}


def two_level(
    system: System, q: Array, params: Params, rattler: Array, project: Callable[[Array], Array] | None = None,
    per_cell: int = 32, max_cells: int | None = None,
) -> Callable[[Array], Array]:
    """Block-Jacobi plus an additive coarse correction (two-level Schwarz):

        B = P (B₀ + Z E⁺ Zᵀ) P + (I − P),   E = Zᵀ H Z,

    with Z the piecewise-constant translations of the held particles of each
    cell of a regular grid (~``per_cell`` particles a cell). Block-Jacobi damps
    the local, high-frequency error; the long-wavelength modes, whose tiny
    eigenvalues make CG iterations grow like the box side, live mostly in span(Z)
    and are solved there exactly. E is assembled from the same pair terms
    (a cell-graph Laplacian of d×d blocks) and inverted densely, shifted by a
    tiny multiple of the identity (its null space is the global translation,
    which P removes). Symmetric positive definite like B₀."""
    q, params = jax.lax.stop_gradient(q), jax.lax.stop_gradient(params)
    k, i, j = system.pair_hessians(q, params)
    n, d = system.n, system.dim
    diagonal = jnp.zeros((n, d, d), k.dtype).at[i].add(k).at[j].add(k)
    inverse = block_inverse(diagonal)
    if max_cells is None:
        max_cells = MAX_CELLS.get(system.dim, 1024)
    cell, count = _cells(system, q, per_cell, max_cells)
    held = (~rattler).astype(k.dtype)
    ci, cj = cell[i], cell[j]
    w = (held[i] * held[j])[:, None, None] * k
    coarse = jnp.zeros((count, count, d, d), k.dtype)
    coarse = coarse.at[ci, ci].add(w).at[cj, cj].add(w).at[ci, cj].add(-w).at[cj, ci].add(-w)
    coarse = coarse.transpose(0, 2, 1, 3).reshape(count * d, count * d)
    coarse = 0.5 * (coarse + coarse.T)
    pinv = _coarse_inverse(coarse, jnp.max(jnp.trace(diagonal, axis1=-2, axis2=-1)) / d)
    project = (lambda v: v) if project is None else project

    def apply(r: Array) -> Array:
        pr = project(r)
        local = jnp.einsum("nab,nb->na", inverse, pr)
        restricted = jnp.zeros((count, d), r.dtype).at[cell].add(held[:, None] * pr)
        correction = (pinv @ restricted.ravel()).reshape(count, d)[cell] * held[:, None]
        return project(local + correction) + (r - pr)

    return apply


PRECONDITIONERS = ("none", "jacobi", "twolevel")
