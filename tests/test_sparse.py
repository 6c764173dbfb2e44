"""The sparse direct solve (`--solver sparse`, mdsens/sparse.py): the same answers as the dense
exact solve of the gauge-fixed M, forward and reverse, under jit, vmap and custom_root's
transposition; one factorization per state; the command line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from mdsens import implicit, io, sensitivity, sparse
from mdsens.cli import app

from helpers import relaxed

CASES = {
    "periodic-2d-rattler": ("polydisperse", dict(n=48, dim=2, phi=0.86)),
    "periodic-3d-rattlers": ("bidisperse", dict(n=64, dim=3, phi=0.66)),
    "free-cluster": ("morse_cluster", dict(n=13)),
}


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(tree[k])) for k in sorted(tree)])


def _close(a, b, tol=1e-9):
    """max|a − b| ≤ tol · max|b| over the whole result (a gradient entry that is
    round-off, such as dE/dε of a random cotangent, is not judged on its own)."""
    a, b = np.ravel(np.asarray(a)), np.ravel(np.asarray(b))
    scale = float(np.max(np.abs(b)))
    assert scale > 0
    assert float(np.max(np.abs(a - b))) <= tol * scale, float(np.max(np.abs(a - b))) / scale


def _setup(case, extra_rattler=False):
    family, config = CASES[case]
    system, q, params, rattler = relaxed(family, **config)
    if extra_rattler:
        # A particle with contacts declared a rattler: its contacts then ground the held
        # particles it touches, so the held translations are no null modes of the held
        # block any more: the general case of the gauge algebra.
        rattler = rattler.at[int(jnp.argmin(rattler))].set(True)
    return system, q, params, rattler


@pytest.mark.parametrize("extra_rattler", [False, True], ids=["", "touching-rattler"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sparse_equals_dense_forward_and_reverse(case, extra_rattler):
    system, q, params, rattler = _setup(case, extra_rattler)
    if case.startswith("periodic"):
        assert bool(jnp.any(rattler)), "the case is meant to hold a rattler"
    root = sensitivity.optimality(system)
    gauge = sensitivity.gauge_for(system, rattler)
    sparse_solve = sensitivity.solver_for(system, q, params, rattler, "sparse")
    dense_solve = sensitivity.solver_for(system, q, params, rattler, "dense")
    name = "diameter" if "diameter" in params else sorted(params)[0]
    dp = {k: jnp.zeros_like(v) for k, v in params.items()}
    dp[name] = jnp.ones_like(params[name])
    u, info = implicit.tangent(root, q, params, dp, sparse_solve, gauge, hvp=system.hessian_vp)
    u_ref, _ = implicit.tangent(root, q, params, dp, dense_solve, gauge, hvp=system.hessian_vp)
    _close(u, u_ref)
    assert float(info.residual) < 1e-11 and bool(info.converged) and int(info.iterations) == 0
    # a reverse cotangent has components along the null space: P must be applied to it
    x_bar = jax.random.normal(jax.random.PRNGKey(3), q.shape)
    g, info = implicit.cotangent(root, q, params, x_bar, sparse_solve, gauge, hvp=system.hessian_vp)
    g_ref, _ = implicit.cotangent(root, q, params, x_bar, dense_solve, gauge, hvp=system.hessian_vp)
    _close(_flat(g), _flat(g_ref))
    assert float(info.residual) < 1e-11
    # the solve of M itself, for a right-hand side with every component (rattler rows included)
    matvec, _ = implicit._operator(root, q, params, gauge, system.hessian_vp)
    x, _ = jax.jit(lambda b: sparse_solve(matvec, b))(x_bar)
    x_ref, _ = dense_solve(matvec, x_bar)
    _close(x, x_ref)


def test_one_factorization_serves_a_vmapped_batch_and_the_next_calls():
    system, q, params, rattler = _setup("periodic-2d-rattler")
    root = sensitivity.optimality(system)
    gauge = sensitivity.gauge_for(system, rattler)
    matvec, _ = implicit._operator(root, q, params, gauge, system.hessian_vp)
    solve = sensitivity.solver_for(system, q, params, rattler, "sparse")
    dense_solve = sensitivity.solver_for(system, q, params, rattler, "dense")
    b = jax.random.normal(jax.random.PRNGKey(0), (5,) + q.shape)
    sparse.clear_cache()
    before = dict(sparse.STATS)
    x, info = jax.jit(jax.vmap(lambda v: solve(matvec, v)))(b)
    assert sparse.STATS["factorizations"] - before["factorizations"] == 1
    assert sparse.STATS["calls"] - before["calls"] == 1  # the whole batch in one host call
    _close(x, jax.vmap(lambda v: dense_solve(matvec, v)[0])(b))
    assert info.residual.shape == (5,) and float(jnp.max(info.residual)) < 1e-11
    # the forward derivative's lax.map over tangents and a reverse solve at the same state reuse it
    forward = sensitivity.forward(system, q, params, "diameter", {}, rattler, solve)
    sensitivity.gradient(system, q, params, lambda s, q_, p: jnp.sum(q_[:, 0] ** 2), rattler, solve)
    assert sparse.STATS["factorizations"] - before["factorizations"] == 1
    reference = sensitivity.forward(system, q, params, "diameter", {}, rattler, dense_solve)
    _close(forward.values["position"], reference.values["position"])


def test_equilibrium_gradient_through_custom_root_transposition():
    """custom_root's symmetric custom_linear_solve transposes the sparse solve for
    reverse mode: jax.grad through equilibrium() equals the dense solve's."""
    system, q, params, rattler = _setup("periodic-2d-rattler")

    def loss(solve_at):
        def f(p):
            eq = implicit.custom_root(sensitivity.optimality(system), gauge=sensitivity.gauge_for(system, rattler),
                                      hvp=system.hessian_vp, solve_at=solve_at)(lambda q0, p_: q0)
            q_star = eq(q, p)
            return jnp.sum(jnp.sin(7.0 * q_star))
        return f

    def at(method):
        return lambda q_, p_: sensitivity.solver_for(system, q_, p_, rattler, method)

    g = jax.jit(jax.grad(loss(at("sparse"))))(params)
    g_ref = jax.grad(loss(at("dense")))(params)
    _close(_flat(g), _flat(g_ref))


def test_unknown_solver_names_the_choices():
    from mdsens.systems import UsageError

    system, q, params, rattler = _setup("free-cluster")
    with pytest.raises(UsageError, match="sparse"):
        sensitivity.solver_for(system, q, params, rattler, "lu")


def test_cli_run_with_the_sparse_solver_matches_dense(tmp_path):
    runner = CliRunner()
    records = {}
    for solver in ("sparse", "dense"):
        out = tmp_path / f"{solver}.h5"
        result = runner.invoke(app, ["run", "--set", "n=16", "--set", "phi=0.95", "--seed", "1",
                                     "--wrt", "diameter", "--grad", "pressure", "--solver", solver,
                                     "-o", str(out), "--quiet", "--no-cache"])
        assert result.exit_code == 0, result.output
        records[solver] = io.read(out)
    got, ref = records["sparse"], records["dense"]
    assert got["meta"]["linear_solver"] == "sparse"
    _close(got["sensitivity"]["diameter"]["values"]["position"], ref["sensitivity"]["diameter"]["values"]["position"])
    _close(_flat(got["gradient"]["pressure"]["values"]), _flat(ref["gradient"]["pressure"]["values"]))
    assert float(np.max(got["sensitivity"]["diameter"]["residual"])) < 1e-11
