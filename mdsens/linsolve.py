"""Linear solves for implicit derivatives: conjugate gradients and a dense reference.

Every solver here has the signature ``solve(matvec, b) -> (x, SolveInfo)`` with
``matvec`` a symmetric linear map on arrays shaped like ``b``. Only products
``matvec(v)`` are used by CG (for a Hessian: a jvp of the gradient), never the
matrix. The implicit engine (:mod:`mdsens.implicit`) hands them the gauge-fixed
operator ``M = P H P + (I - P)`` so that the system is always consistent.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
MatVec = Callable[[Array], Array]


class SolveInfo(NamedTuple):
    """What a linear solve did.

    iterations: CG iterations (0 for the dense solve or a zero right-hand side).
    residual: final ``||M x - b|| / ||b||`` (0 when ``b = 0``), measured
        on the returned ``x`` with one extra matvec, not the recursion's estimate.
    """

    iterations: Array
    residual: Array
    converged: Array = True  # CG: reached its tolerance before the iteration cap; dense: a finite solution


def _vdot(a: Array, b: Array) -> Array:
    return jnp.vdot(a.ravel(), b.ravel()).real


def _true_residual(matvec: MatVec, x: Array, b: Array) -> Array:
    b_norm = jnp.linalg.norm(b.ravel())
    r = jnp.linalg.norm((matvec(x) - b).ravel())
    return jnp.where(b_norm > 0, r / jnp.where(b_norm > 0, b_norm, 1.0), 0.0)


def cg(
    rtol: float = 1e-10,
    atol: float = 1e-30,
    maxiter: int | None = None,
    preconditioner: Callable[[Array], Array] | None = None,
) -> Callable[[MatVec, Array], tuple[Array, SolveInfo]]:
    """Conjugate gradients for a symmetric positive (semi)definite ``matvec``.

    Stops when ``||r|| <= max(max(rtol, 4 eps) * ||b||, atol)`` or after
    ``maxiter`` iterations (default ``10 * b.size``), ``eps`` being the machine
    epsilon of ``b``'s dtype. The floor on ``rtol`` matters in float32: no
    residual is meaningful below ~eps·||b|| (the matvec itself rounds at that
    level), so the default ``rtol = 1e-10`` would only spend iterations up to
    the cap while the recursion drifts from the true residual. The absolute
    floor matters too: a cotangent such as ``grad E(x*) ~ 1e-10`` makes a
    purely relative tolerance unreachable in round-off, and CG would run to its
    cap and wander off. A zero ``b`` returns zero with no iteration.

    ``preconditioner`` is an optional symmetric positive definite map
    approximating ``M^{-1}``.
    """

    def solve(matvec: MatVec, b: Array) -> tuple[Array, SolveInfo]:
        cap = 10 * b.size if maxiter is None else maxiter
        precond = (lambda r: r) if preconditioner is None else preconditioner
        b_norm = jnp.linalg.norm(b.ravel())
        floor = 4 * float(jnp.finfo(b.dtype).eps)
        threshold = jnp.maximum(max(rtol, floor) * b_norm, atol)

        x0 = jnp.zeros_like(b)
        r0 = b
        z0 = precond(r0)
        init = (x0, r0, z0, z0, _vdot(r0, z0), jnp.asarray(0, jnp.int32))

        def cond(state):
            _, r, _, _, _, k = state
            return (jnp.linalg.norm(r.ravel()) > threshold) & (k < cap)

        def body(state):
            x, r, z, p, rz, k = state
            Ap = matvec(p)
            pAp = _vdot(p, Ap)
            alpha = rz / jnp.where(pAp != 0, pAp, 1.0)
            x = x + alpha * p
            r = r - alpha * Ap
            z = precond(r)
            rz_new = _vdot(r, z)
            beta = rz_new / jnp.where(rz != 0, rz, 1.0)
            p = z + beta * p
            return x, r, z, p, rz_new, k + 1

        x, r, _, _, _, k = jax.lax.while_loop(cond, body, init)
        return x, SolveInfo(k, _true_residual(matvec, x, b), jnp.linalg.norm(r.ravel()) <= threshold)

    return solve


def dense() -> Callable[[MatVec, Array], tuple[Array, SolveInfo]]:
    """Exact dense solve: materialize ``M`` column by column, then LU.

    Costs ``b.size`` matvecs and O(n^3) time: a reference for small systems.
    It is exact only because the engine passes the gauge-fixed, non-singular
    ``M = P H P + (I - P)``; on the raw singular Hessian a dense LU returns a
    solution plus an arbitrary null-space component, or garbage, silently.
    The solution therefore equals the pseudo-inverse of ``H`` on the
    complement of the known null space, applied to ``P b``.
    """

    def solve(matvec: MatVec, b: Array) -> tuple[Array, SolveInfo]:
        n = b.size
        columns = jax.vmap(lambda e: matvec(e.reshape(b.shape)).ravel())(jnp.eye(n, dtype=b.dtype))
        matrix = columns.T
        x = jnp.linalg.solve(matrix, b.ravel()).reshape(b.shape)
        return x, SolveInfo(jnp.asarray(0, jnp.int32), _true_residual(matvec, x, b), jnp.all(jnp.isfinite(x)))

    return solve

