"""The block-Jacobi preconditioner: right blocks, SPD, same solution, fewer iterations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import implicit, linsolve, precondition, sensitivity

from helpers import relaxed, relative_error


def test_blocks_are_the_hessian_diagonal_blocks():
    # the packing of tests/test_implicit.py (relaxed and compiled once per run)
    system, q, params, _ = relaxed("bidisperse", seed=1, n=16, dim=2, phi=0.95)
    h = jax.jit(jax.hessian(system.energy))(q, params)  # (N, d, N, d); compiled: 6× faster than op by op
    n = system.n
    dense = jnp.stack([h[i, :, i, :] for i in range(n)])
    blocks = jax.jit(lambda q_, p_: precondition.diagonal_blocks(system, q_, p_))(q, params)
    assert float(jnp.max(jnp.abs(blocks - dense))) < 1e-10 * float(jnp.max(jnp.abs(dense)))


def test_preconditioner_is_symmetric_positive_definite():
    # the packing with rattlers of tests/test_implicit.py and tests/test_sparse.py
    system, q, params, rattler = relaxed("bidisperse", seed=1, n=32, dim=2, phi=0.86)
    assert bool(jnp.any(rattler))  # the gauge removes rattler rows: B must stay SPD on them too
    project = sensitivity.gauge_for(system, rattler)(q, params)
    apply = precondition.block_jacobi(system, q, params, project)
    size = q.size
    b = jax.vmap(lambda e: apply(e.reshape(q.shape)).ravel())(jnp.eye(size))
    np.testing.assert_allclose(b, b.T, atol=1e-12 * float(jnp.max(jnp.abs(b))))
    assert float(jnp.min(jnp.linalg.eigvalsh(0.5 * (b + b.T)))) > 0


def test_preconditioned_cg_gives_the_same_solution_with_fewer_iterations():
    system, q, params, rattler = relaxed("bidisperse", n=64, dim=2, phi=0.95)
    root_fn = sensitivity.optimality(system)
    gauge = sensitivity.gauge_for(system, rattler)
    dparams = {k: jnp.zeros_like(v) for k, v in params.items()}
    dparams["diameter"] = jnp.array([0.0, 1.0])
    plain = linsolve.cg(rtol=1e-12)

    @jax.jit  # compiled: the eager version ran op by op
    def both(q_, p_, dp_):
        pre = linsolve.cg(rtol=1e-12, preconditioner=precondition.block_jacobi(system, q_, p_, gauge(q_, p_)))
        return (implicit.tangent(root_fn, q_, p_, dp_, plain, gauge),
                implicit.tangent(root_fn, q_, p_, dp_, pre, gauge))

    (u0, i0), (u1, i1) = both(q, params, dparams)
    # both at rtol 1e-12 on a well-posed (gauge-fixed) system: agree to ~1e-10
    assert relative_error(u1, u0) < 1e-9
    assert int(i1.iterations) <= int(i0.iterations)
