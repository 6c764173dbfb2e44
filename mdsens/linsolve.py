"""Linear solves for implicit derivatives: conjugate gradients and a dense reference.

Every solver here has the signature ``solve(matvec, b) -> (x, SolveInfo)`` with
``matvec`` a symmetric linear map on values shaped like ``b``. ``b`` is an
array or any pytree of arrays (the fixed-pressure root is the pair ``(q, u)``,
positions and cell strain): the inner product is the sum over the leaves, so
CG works on the pytree as it is, with no flattening; for a single array every
operation is the one it always was. Only products ``matvec(v)`` are used by CG
(for a Hessian: a jvp of the gradient, or an assembled product), never the
matrix. The implicit engine (:mod:`mdsens.implicit`) hands them the gauge-fixed
operator ``M = P H P + (I - P)`` so that the system is always consistent.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import tree_util
from jax.flatten_util import ravel_pytree

Array = jax.Array
Tree = Any  # an array or a pytree of arrays
MatVec = Callable[[Tree], Tree]


class SolveInfo(NamedTuple):
    """What a linear solve did.

    iterations: CG iterations (0 for the dense solve or a zero right-hand side).
    residual: final ``||M x - b|| / ||b||`` (0 when ``b = 0``), measured
        on the returned ``x`` with one extra matvec, not the recursion's estimate.
    """

    iterations: Array
    residual: Array
    converged: Array = True  # CG: reached its tolerance before the iteration cap; dense: a finite solution


# -- pytree arithmetic (one leaf: exactly the array operations) ----------------------


def _vdot(a: Tree, b: Tree) -> Array:
    """``Σ_leaves <a, b>``."""
    pairs = zip(tree_util.tree_leaves(a), tree_util.tree_leaves(b))
    return functools.reduce(operator.add, [jnp.vdot(x.ravel(), y.ravel()).real for x, y in pairs])


def _norm(a: Tree) -> Array:
    """The Euclidean norm of all leaves together."""
    leaves = tree_util.tree_leaves(a)
    if len(leaves) == 1:
        return jnp.linalg.norm(leaves[0].ravel())
    return jnp.sqrt(_vdot(leaves, leaves))


def _sub(a: Tree, b: Tree) -> Tree:
    return tree_util.tree_map(jnp.subtract, a, b)


def _size(a: Tree) -> int:
    return sum(x.size for x in tree_util.tree_leaves(a))


def _dtype(a: Tree):
    return jnp.result_type(*tree_util.tree_leaves(a))


def _true_residual(matvec: MatVec, x: Tree, b: Tree) -> Array:
    b_norm = _norm(b)
    r = _norm(_sub(matvec(x), b))
    return jnp.where(b_norm > 0, r / jnp.where(b_norm > 0, b_norm, 1.0), 0.0)


def cg(
    rtol: float = 1e-10,
    atol: float = 1e-30,
    maxiter: int | None = None,
    preconditioner: Callable[[Tree], Tree] | None = None,
) -> Callable[[MatVec, Tree], tuple[Tree, SolveInfo]]:
    """Conjugate gradients for a symmetric positive (semi)definite ``matvec``.

    Stops when ``||r|| <= max(max(rtol, 4 eps) * ||b||, atol)`` or after
    ``maxiter`` iterations (default ``10 * size(b)``), ``eps`` being the machine
    epsilon of ``b``'s dtype. The floor on ``rtol`` matters in float32: no
    residual is meaningful below ~eps·||b|| (the matvec itself rounds at that
    level), so the default ``rtol = 1e-10`` would only spend iterations up to
    the cap while the recursion drifts from the true residual. The absolute
    floor matters too: a cotangent such as ``grad E(x*) ~ 1e-10`` makes a
    purely relative tolerance unreachable in round-off, and CG would run to its
    cap and wander off. A zero ``b`` returns zero with no iteration.

    ``b`` may be a pytree (norms and inner products over all its leaves);
    ``preconditioner`` is an optional symmetric positive definite map
    approximating ``M^{-1}``, on values shaped like ``b``.
    """

    def solve(matvec: MatVec, b: Tree) -> tuple[Tree, SolveInfo]:
        cap = 10 * _size(b) if maxiter is None else maxiter
        precond = (lambda r: r) if preconditioner is None else preconditioner
        b_norm = _norm(b)
        floor = 4 * float(jnp.finfo(_dtype(b)).eps)
        threshold = jnp.maximum(max(rtol, floor) * b_norm, atol)

        x0 = tree_util.tree_map(jnp.zeros_like, b)
        r0 = b
        z0 = precond(r0)
        init = (x0, r0, z0, z0, _vdot(r0, z0), jnp.asarray(0, jnp.int32))

        def cond(state):
            _, r, _, _, _, k = state
            return (_norm(r) > threshold) & (k < cap)

        def body(state):
            x, r, z, p, rz, k = state
            Ap = matvec(p)
            pAp = _vdot(p, Ap)
            alpha = rz / jnp.where(pAp != 0, pAp, 1.0)
            x = tree_util.tree_map(lambda x_, p_: x_ + alpha * p_, x, p)
            r = tree_util.tree_map(lambda r_, a_: r_ - alpha * a_, r, Ap)
            z = precond(r)
            rz_new = _vdot(r, z)
            beta = rz_new / jnp.where(rz != 0, rz, 1.0)
            p = tree_util.tree_map(lambda z_, p_: z_ + beta * p_, z, p)
            return x, r, z, p, rz_new, k + 1

        x, r, _, _, _, k = jax.lax.while_loop(cond, body, init)
        return x, SolveInfo(k, _true_residual(matvec, x, b), _norm(r) <= threshold)

    return solve


#: columns of the dense matrix built together (``vmap``) by :func:`dense`; more go in
#: sequential batches of this many, so that memory is this many matvecs' temporaries, not
#: n of them (3D N = 512 with all pairs: n = 1536 matvecs at once took over 20 GB).
DENSE_BATCH = 64


def dense(batch: int = DENSE_BATCH) -> Callable[[MatVec, Tree], tuple[Tree, SolveInfo]]:
    """Exact dense solve: materialize ``M`` column by column, then LU.

    Costs ``size(b)`` matvecs, ``batch`` of them at a time, and O(n^3) time: a
    reference for small systems.
    It is exact only because the engine passes the gauge-fixed, non-singular
    ``M = P H P + (I - P)``; on the raw singular Hessian a dense LU returns a
    solution plus an arbitrary null-space component, or garbage, silently.
    The solution therefore equals the pseudo-inverse of ``H`` on the
    complement of the known null space, applied to ``P b``. A pytree ``b`` is
    flattened (``ravel_pytree``) to build and solve the matrix.
    """

    def solve(matvec: MatVec, b: Tree) -> tuple[Tree, SolveInfo]:
        flat, unravel = ravel_pytree(b)
        n = flat.size

        def column(k):
            return ravel_pytree(matvec(unravel(jnp.zeros(n, flat.dtype).at[k].set(1.0))))[0]

        columns = jax.lax.map(column, jnp.arange(n), batch_size=min(n, batch))
        matrix = columns.T
        x = unravel(jnp.linalg.solve(matrix, flat))
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in tree_util.tree_leaves(x)]))
        return x, SolveInfo(jnp.asarray(0, jnp.int32), _true_residual(matvec, x, b), finite)

    return solve
