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

# (the relaxed states are shared with other test files of the default run: the same
# helpers.relaxed keys as tests/test_implicit.py and tests/test_systems.py, so each is
# relaxed, and its programs compiled, once per run)
CASES = {
    "periodic-2d-rattler": ("bidisperse", dict(seed=1, n=32, dim=2, phi=0.86)),
    "periodic-3d": ("bidisperse", dict(seed=1, n=24, dim=3, phi=0.75)),
    "free-cluster": ("morse_cluster", dict(n=13, dim=3)),
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
    params = {k: jnp.array(np.asarray(v)) for k, v in params.items()}
    if extra_rattler:
        # A particle with contacts declared a rattler: its contacts are then left out with it
        # (System.held_only), as a touching rattler's are. (Before session 19 they grounded
        # the held particles it touched; that algebra, A T ≠ 0, is still tested on random
        # blocks below.)
        rattler = rattler.at[int(jnp.argmin(rattler))].set(True)
    return system, q, params, rattler


_COMPARE = {}


def _compare(system):
    """One compiled program per system (the rattler mask an argument): the tangent, the
    cotangent and a plain solve of M, by the sparse and by the dense solve."""
    if system not in _COMPARE:

        @jax.jit
        def run(q, params, rattler, dp, x_bar):
            held = system.held_only(rattler)  # what solver_for factors: the held network's Hessian
            root = sensitivity.optimality(held)
            gauge = sensitivity.gauge_for(held, rattler)
            matvec, _ = implicit._operator(root, q, params, gauge, held.hessian_vp)
            out = {}
            for method in ("sparse", "dense"):
                solve = sensitivity.solver_for(system, q, params, rattler, method)
                u, u_info = implicit.tangent(root, q, params, dp, solve, gauge, hvp=held.hessian_vp)
                g, g_info = implicit.cotangent(root, q, params, x_bar, solve, gauge, hvp=held.hessian_vp)
                x, _ = solve(matvec, x_bar)
                out[method] = (u, u_info, g, g_info, x)
            return out

        _COMPARE[system] = run
    return _COMPARE[system]


@pytest.mark.parametrize("backend", ["cholmod", "superlu"])
@pytest.mark.parametrize("extra_rattler", [False, True], ids=["", "touching-rattler"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sparse_equals_dense_forward_and_reverse(case, extra_rattler, backend, monkeypatch):
    if extra_rattler and backend == "cholmod":
        pytest.skip("a load-bearing particle declared a rattler leaves its neighbours off equilibrium, and the "
                    "held network's Hessian can be indefinite (periodic-3d), which CHOLMOD refuses and SuperLU "
                    "solves; a real rattler carries no load (tests/test_rattler_contacts.py, auto: CHOLMOD)")
    monkeypatch.setattr(sparse, "BACKEND", backend)
    before = dict(sparse.STATS)
    system, q, params, rattler = _setup(case, extra_rattler)
    if case == "periodic-2d-rattler":
        assert bool(jnp.any(rattler)), "the case is meant to hold a rattler"
    name = "diameter" if "diameter" in params else sorted(params)[0]
    dp = {k: jnp.zeros_like(v) for k, v in params.items()}
    dp[name] = jnp.ones_like(params[name])
    # a reverse cotangent (and a plain right-hand side) has components along the null
    # space, rattler rows included: P must be applied to it
    x_bar = jax.random.normal(jax.random.PRNGKey(3), q.shape)
    out = _compare(system)(q, params, rattler, dp, x_bar)
    (u, u_info, g, g_info, x), (u_ref, _, g_ref, _, x_ref) = out["sparse"], out["dense"]
    _close(u, u_ref)
    _close(_flat(g), _flat(g_ref))
    _close(x, x_ref)
    for info in (u_info, g_info):
        assert float(info.residual) < 1e-11 and bool(info.converged) and int(info.iterations) == 0
    # the factorization asked for is the one that ran (the cache is keyed by the backend)
    assert sparse.STATS[backend] > before[backend]


def _random_problem(n, d, rattlers, negative, seed):
    """Pair blocks on a ring plus random chords (symmetric d × d; positive definite, or one
    pair's negative definite), a rattler mask and the held translations as modes."""
    rng = np.random.default_rng(seed)
    i = np.concatenate([np.arange(n), rng.integers(0, n, n)])
    j = np.concatenate([(np.arange(n) + 1) % n, rng.integers(0, n, n)])
    keep = i != j
    i, j = i[keep], j[keep]
    g = rng.standard_normal((i.size, d, d))
    k = g @ np.swapaxes(g, 1, 2) + 0.5 * np.eye(d)
    if negative:
        k[0] = -3.0 * k[0]  # one negative pair: a saddle, S not positive definite
    held = np.ones(n, bool)
    held[list(rattlers)] = False
    modes = np.zeros((n, d, d))
    for a in range(d):
        modes[held, a, a] = 1.0 / np.sqrt(held.sum())
    return k, i.astype(np.int32), j.astype(np.int32), held, modes


def _dense_h(k, i, j, n):
    """H = Σ_pairs (e_i − e_j)(e_i − e_j)ᵀ ⊗ K_ij, densely, (n d, n d)."""
    d = k.shape[-1]
    h = np.zeros((n, d, n, d))
    for b, (p, q) in enumerate(zip(i, j)):
        h[p, :, p] += k[b]; h[q, :, q] += k[b]; h[p, :, q] -= k[b]; h[q, :, p] -= k[b].T
    return h.reshape(n * d, n * d)


def _dense_m(k, i, j, held, modes):
    """M = P H P + (I − P), P = D_held − T Tᵀ, assembled densely (the definition)."""
    n, d = held.size, k.shape[-1]
    h = _dense_h(k, i, j, n)
    t = modes.reshape(n * d, -1)
    proj = np.diag(np.repeat(held, d).astype(float)) - t @ t.T
    return proj @ h @ proj + np.eye(n * d) - proj


@pytest.mark.parametrize("ordering", ["default", "nested-dissection", "geometric"])
@pytest.mark.parametrize("refine", ["when-needed", "always"])
@pytest.mark.parametrize("negative", [False, True], ids=["definite", "saddle"])
@pytest.mark.parametrize("backend", ["auto", "superlu"])
def test_host_factor_solves_m_exactly(backend, negative, refine, ordering, monkeypatch):
    """The host factorization alone against the dense M of its definition, for random
    blocks: CHOLMOD where S is positive definite, SuperLU's fallback for a saddle; with
    the refinement step only where the first residual asks for it, and always; in 3D
    also in METIS's nested dissection, and in the geometric one (what a run's solve
    gets: positions given, here at random, in a periodic box and in free space)."""
    monkeypatch.setattr(sparse, "BACKEND", backend)
    if refine == "always":
        monkeypatch.setattr(sparse, "REFINE_TOL", -1.0)
    if ordering == "nested-dissection":
        pytest.importorskip("pymetis")
        monkeypatch.setattr(sparse, "NESTED_DISSECTION_MIN_N", 1)
    if ordering == "geometric":
        monkeypatch.setattr(sparse, "ORDERING", "geometric")
    for d, n, rattlers, seed in ((2, 12, (3,), 0), (3, 9, (), 1), (3, 30, (4, 17), 2)):
        k, i, j, held, modes = _random_problem(n, d, rattlers, negative, seed)
        m = _dense_m(k, i, j, held, modes)
        assert (np.linalg.eigvalsh(m).min() < 0) == negative
        rows = np.random.default_rng(seed + 7).standard_normal((3, n, d))
        before = dict(sparse.STATS)
        geometry = ()
        if ordering == "geometric":
            place = np.random.default_rng(seed + 3).random((n, d))
            geometry = (place, np.ones(d) if seed % 2 == 0 else np.zeros(d))
        factor = sparse._Factor(k, i, j, held, modes, *geometry)
        x = factor.solve(rows)
        # the shortcut for A T = 0 is taken exactly when no pair touches a rattler
        assert factor.null == bool(np.all(held[i] & held[j]))
        ref = np.linalg.solve(m, rows.reshape(3, -1).T).T.reshape(rows.shape)
        _close(x, ref, tol=1e-11)
        # A, the held–held block of H (built from CHOLMOD's S where it factored)
        coords = np.repeat(held, d)
        _close(factor.a.toarray(), _dense_h(k, i, j, n)[np.ix_(coords, coords)], tol=1e-13)
        used = "cholmod" if backend == "auto" and not negative else "superlu"
        assert sparse.STATS[used] == before[used] + 1


@pytest.mark.parametrize("d", [2, 3])
def test_particle_order_is_a_permutation_of_whole_particles(d, monkeypatch):
    """The ordering handed to CHOLMOD: AMD (2D) or METIS's nested dissection (3D) on the
    particle graph, each particle's d coordinates consecutive and in order, every
    coordinate once."""
    pytest.importorskip("cvxopt")
    n = 12
    k, i, j, held, modes = _random_problem(n, d, (), False, 2)
    if d == 3:  # the nested dissection, where it would run for a large packing
        pytest.importorskip("pymetis")
        monkeypatch.setattr(sparse, "NESTED_DISSECTION_MIN_N", 1)
        nested = sparse._nested_dissection(n, np.maximum(i, j), np.minimum(i, j))
        assert nested is not None and sorted(nested.tolist()) == list(range(n))
    order = sparse._particle_order(n, np.maximum(i, j), np.minimum(i, j), d)
    if d == 3:
        np.testing.assert_array_equal(order.reshape(n, d)[:, 0] // d, nested)
    assert sorted(order.tolist()) == list(range(n * d))
    blocks = order.reshape(n, d)
    np.testing.assert_array_equal(blocks, blocks[:, :1] + np.arange(d))
    assert blocks[0, 0] % d == 0


def _lattice(shape, periodic):
    """A simple-cubic lattice of ``shape`` sites (positions in the unit box, nearest
    neighbours paired, round the box where periodic): ``(place, upper, lower)``."""
    index = np.arange(int(np.prod(shape))).reshape(shape)
    place = (np.stack(np.meshgrid(*[np.arange(m) for m in shape], indexing="ij"), axis=-1).reshape(-1, len(shape))
             + 0.5) / np.asarray(shape)
    pairs = []
    for axis in range(len(shape)):
        other = np.roll(index, -1, axis=axis)
        keep = np.ones(shape, bool)
        if not periodic:
            keep[(slice(None),) * axis + (-1,)] = False
        pairs.append(np.stack([index[keep], other[keep]]))
    a, b = np.concatenate(pairs, axis=1)
    return place, np.maximum(a, b), np.minimum(a, b)


def _fill(order, upper, lower, n):
    """The entries of the Cholesky factor of the graph Laplacian plus the identity,
    in ``order`` (CHOLMOD's symbolic count, postordered as the solve's)."""
    from cvxopt import cholmod, matrix, spmatrix

    diag = np.arange(n)
    lap = spmatrix(np.concatenate([-np.ones(upper.size), np.full(n, 7.0)]),
                   np.concatenate([upper, diag]).astype(np.int64), np.concatenate([lower, diag]).astype(np.int64),
                   (n, n))
    saved = dict(cholmod.options)
    try:
        cholmod.options.update(supernodal=0, nmethods=1)
        factor = cholmod.symbolic(lap, p=matrix(np.asarray(order, np.int64)), uplo="L")
        cholmod.numeric(lap, factor)
        return len(cholmod.getfactor(factor).V)
    finally:
        cholmod.options.clear()
        cholmod.options.update(saved)


@pytest.mark.parametrize("shape, periodic", [((64, 64), True), ((48, 40), False), ((16, 16, 16), True),
                                             ((12, 14, 10), False)])
def test_geometric_order_dissects_a_lattice(shape, periodic):
    """The geometric nested dissection of a lattice (a packing's contact graph at its
    most regular), its sites numbered at random (so that only the positions can give
    a good order), is a permutation with the fill of a nested dissection: far below
    the order of rows and columns', and near minimum degree's."""
    pytest.importorskip("cvxopt")
    from cvxopt import amd, spmatrix

    place, upper, lower = _lattice(shape, periodic)
    n, d = place.shape
    rows_first = _fill(np.arange(n), upper, lower, n)
    label = np.random.default_rng(0).permutation(n)  # site s is particle label[s]
    place[label] = place.copy()
    upper, lower = np.maximum(label[upper], label[lower]), np.minimum(label[upper], label[lower])
    sides = np.ones(d) if periodic else np.zeros(d)
    order = sparse._geometric_order(place, sides, upper, lower)
    assert sorted(order.tolist()) == list(range(n))
    pattern = spmatrix(1.0, np.concatenate([upper, np.arange(n)]).astype(np.int64),
                       np.concatenate([lower, np.arange(n)]).astype(np.int64), (n, n))
    minimum_degree = _fill(np.asarray(amd.order(pattern, uplo="L"), np.int64).ravel(), upper, lower, n)
    geometric = _fill(order, upper, lower, n)
    assert geometric < 0.6 * rows_first and geometric < 1.5 * minimum_degree, (geometric, minimum_degree, rows_first)


def test_geometric_order_of_few_or_coincident_particles():
    """Fewer particles than a leaf, every particle at one point (free space), no pairs:
    still a permutation."""
    for place, sides, upper, lower in ((np.random.default_rng(1).random((5, 2)), np.ones(2), np.array([3, 4]),
                                        np.array([0, 1])),
                                       (np.zeros((40, 3)), np.zeros(3), np.array([5, 9]), np.array([1, 2])),
                                       (np.random.default_rng(2).random((100, 2)), np.ones(2), np.zeros(0, int),
                                        np.zeros(0, int))):
        order = sparse._geometric_order(place, sides, upper, lower)
        assert sorted(order.tolist()) == list(range(len(place)))


@pytest.mark.parametrize("backend", ["auto", "superlu"])
def test_host_factor_without_a_live_pair_fails_cleanly(backend, monkeypatch):
    """Held particles with no live pair block (every block zero: M singular beyond the
    gauge) give NaN, the solve's "not converged", not an exception from the callback."""
    monkeypatch.setattr(sparse, "BACKEND", backend)
    k, i, j, held, modes = _random_problem(8, 2, (), False, 3)
    factor = sparse._Factor(np.zeros_like(k), i, j, held, modes)
    assert factor.failed
    assert np.all(np.isnan(factor.solve(np.ones((1, 8, 2)))))


def test_one_factorization_serves_a_vmapped_batch_and_the_next_call():
    system, q, params, rattler = _setup("periodic-2d-rattler")
    root = sensitivity.optimality(system)
    gauge = sensitivity.gauge_for(system, rattler)
    matvec, _ = implicit._operator(root, q, params, gauge, system.hessian_vp)
    solve = sensitivity.solver_for(system, q, params, rattler, "sparse")
    dense_solve = sensitivity.solver_for(system, q, params, rattler, "dense")
    b = jax.random.normal(jax.random.PRNGKey(0), (5,) + q.shape)
    sparse.clear_cache()
    before = dict(sparse.STATS)
    batched = jax.jit(jax.vmap(lambda v: solve(matvec, v)))
    x, info = batched(b)
    assert sparse.STATS["factorizations"] - before["factorizations"] == 1
    assert sparse.STATS["calls"] - before["calls"] == 1  # the whole batch in one host call
    _close(x, jax.vmap(lambda v: dense_solve(matvec, v)[0])(b))
    assert info.residual.shape == (5,) and float(jnp.max(info.residual)) < 1e-11
    # another right-hand side at the same state: the kept factorization
    x2, _ = batched(2.0 * b)
    assert sparse.STATS["factorizations"] - before["factorizations"] == 1
    _close(x2, 2.0 * x)


def test_a_checksum_collision_never_returns_another_matrix_s_factor(monkeypatch):
    """The kept factorizations are found by a checksum and confirmed against the kept
    inputs: with every checksum made equal, a second matrix is factored anew (and solved
    right); the first one's inputs, back again, are factored again (one slot per checksum)
    and then found."""
    monkeypatch.setattr(sparse.zlib, "crc32", lambda data, value=0: 7)
    sparse.clear_cache()
    first = _random_problem(12, 2, (3,), False, 0)
    second = list(first)
    second[0] = 2.0 * first[0]  # the same pairs, every block doubled: M⁻¹ halves on the held part
    rows = np.random.default_rng(3).standard_normal((2, 12, 2))
    before = dict(sparse.STATS)
    x1 = sparse._factor(*first).solve(rows)
    x2 = sparse._factor(*second).solve(rows)
    assert sparse.STATS["factorizations"] - before["factorizations"] == 2
    ref = np.linalg.solve(_dense_m(*second), rows.reshape(2, -1).T).T.reshape(rows.shape)
    _close(x2, ref, tol=1e-11)
    assert not np.allclose(x1, x2)
    again = sparse._factor(*(np.array(a, copy=True) for a in first))
    assert sparse.STATS["factorizations"] - before["factorizations"] == 3  # one slot per checksum: replaced
    _close(again.solve(rows), x1, tol=1e-13)
    same = sparse._factor(*first)
    assert same is again and sparse.STATS["hits"] - before["hits"] == 1


def test_many_tangents_go_in_batches_of_the_solves_size(monkeypatch):
    """A per-particle parameter's N tangents: forward_fn vmaps them in batches of the
    sparse solve's batch_size (lax.map over the batches and the remainder), one host
    call per batch, one factorization; the values are the dense solve's."""
    from mdsens import observables

    system, q, params, rattler = relaxed("polydisperse", n=32, dim=2, phi=0.9, spread=0.2)
    monkeypatch.setattr(sparse, "BATCH_SIZE", 12)  # 32 tangents: 12 + 12 + 8
    observe = {"pressure": observables.pressure}
    solve = sensitivity.solver_for(system, q, params, rattler, "sparse")
    assert solve.batch_size == 12
    sparse.clear_cache()
    before = dict(sparse.STATS)
    got = jax.jit(sensitivity.forward_fn(system, "diameter", observe, rattler, solve))(q, params)
    assert sparse.STATS["calls"] - before["calls"] == 3
    assert sparse.STATS["factorizations"] - before["factorizations"] == 1
    dense = sensitivity.solver_for(system, q, params, rattler, "dense")
    want = jax.jit(sensitivity.forward_fn(system, "diameter", observe, rattler, dense))(q, params)
    for key in ("position", "pressure"):
        _close(got.values[key], want.values[key])
    assert got.values["pressure"].shape == (32,)


def test_vmap_over_states_factors_each_member():
    """Batched blocks (an ensemble's members): one factorization per member, in one host call."""
    system, q, params, rattler = _setup("periodic-2d-rattler")
    root = sensitivity.optimality(system)
    gauge = sensitivity.gauge_for(system, rattler)
    scales = jnp.asarray([1.0, 3.0])  # ε scales H: the members' matrices differ
    b = jax.random.normal(jax.random.PRNGKey(1), q.shape)

    def member(method):
        def one(scale):
            p = dict(params, epsilon=params["epsilon"] * scale)
            matvec, _ = implicit._operator(root, q, p, gauge, system.hessian_vp)
            return sensitivity.solver_for(system, q, p, rattler, method)(matvec, b)[0]
        return jax.jit(jax.vmap(one))

    sparse.clear_cache()
    before = dict(sparse.STATS)
    x = member("sparse")(scales)
    assert sparse.STATS["factorizations"] - before["factorizations"] == 2
    assert sparse.STATS["calls"] - before["calls"] == 2
    _close(x, member("dense")(scales))


@pytest.mark.parametrize("case", sorted(CASES))
def test_geometric_order_in_the_solve_matches_dense(case, monkeypatch):
    """The solve with the geometric ordering forced (what "auto" gives a large 2D
    packing): the positions reach the host through the callback, also batched (members
    whose positions differ by a uniform shift: the same matrix, ordered from other
    places), and the answers are the dense solve's, a touching rattler included."""
    monkeypatch.setattr(sparse, "ORDERING", "geometric")
    calls = []
    original = sparse._geometric_order
    monkeypatch.setattr(sparse, "_geometric_order", lambda *a: calls.append(1) or original(*a))
    system, q, params, rattler = _setup(case, extra_rattler=True)
    held = system.held_only(rattler)  # the operator solver_for factors
    root = sensitivity.optimality(held)
    gauge = sensitivity.gauge_for(held, rattler)
    b = jax.random.normal(jax.random.PRNGKey(5), q.shape)
    shifts = jnp.asarray([0.0, 0.37])

    def member(method):
        def one(shift):
            q_ = jnp.mod(q + shift, 1.0) if system.periodic else q + shift
            matvec, _ = implicit._operator(root, q_, params, gauge, held.hessian_vp)
            return sensitivity.solver_for(system, q_, params, rattler, method)(matvec, b)[0]
        return jax.jit(jax.vmap(one))

    sparse.clear_cache()
    x = member("sparse")(shifts)
    assert len(calls) == 2  # one ordering per member: their positions differ
    _close(x, member("dense")(shifts))


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
    from mdsens import linsolve, observables, systems

    out = tmp_path / "sparse.h5"
    sparse.clear_cache()
    before, before_calls = sparse.STATS["factorizations"], sparse.STATS["calls"]
    result = CliRunner().invoke(app, ["run", "--set", "n=16", "--set", "phi=0.95", "--seed", "1", "--wrt", "diameter",
                                      "--grad", "pressure", "--solver", "sparse", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    got = io.read(out)
    assert got["meta"]["linear_solver"] == "sparse"
    # two tangents and the reverse solve at one state: one factorization
    assert sparse.STATS["factorizations"] - before == 1
    # the two tangents (vmapped: one multi-column solve) and the reverse solve: two host calls
    assert sparse.STATS["calls"] - before_calls == 2
    assert float(np.max(got["sensitivity"]["diameter"]["residual"])) < 1e-11
    assert float(np.max(got["gradient"]["pressure"]["residual"])) < 1e-11
    # the same derivatives at the file's state by the dense exact solve
    system = systems.get("bidisperse").build(n=16, phi=0.95, seed=1)
    params = {k: jnp.asarray(v) for k, v in got["parameters"].items()}
    q = system.to_solver(jnp.asarray(got["positions"]), params)
    rattler = jnp.asarray(got["rattler"])
    dense = linsolve.dense()
    forward = sensitivity.forward(system, q, params, "diameter", {}, rattler, dense)
    _close(got["sensitivity"]["diameter"]["values"]["position"], forward.values["position"])
    grad, _ = sensitivity.gradient(system, q, params, observables.pressure, rattler, dense)
    _close(_flat(got["gradient"]["pressure"]["values"]), _flat(grad))


def test_bench_refuses_an_unknown_solver(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--n", "16", "--solver", "lu", "-o", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "unknown linear solver 'lu'" in result.output


@pytest.mark.slow
def test_bench_with_the_sparse_solver(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("MDSENS_NO_CACHE", "1")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--n", "80", "--unroll-steps", "10", "--fd-sample", "1", "--repeats", "2",
                                      "--set", "phi=0.9", "--solver", "sparse", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert report["solver"] == "sparse"
    implicit_row = row["implicit"]
    assert "error" not in implicit_row, implicit_row
    assert implicit_row["reverse_iterations"] == 0 and implicit_row["forward_iterations"] == 0
    assert implicit_row["reverse_error"] < 1e-9  # against the dense pseudo-inverse reference
    assert implicit_row["reverse_residual"] < 1e-11 and implicit_row["forward_residual"] < 1e-11
    assert {"forward_warm_s", "reverse_warm_s", "shared_s"} <= set(implicit_row)
    assert implicit_row["solver"] == "sparse"
    # reported beside deriv/relax: the forward and reverse calls after one factorization
    assert row["derivative_shared_over_relax"] > 0
    # and as in a run, with the factorization analysed beside the relaxation (the pattern
    # predicted at x* is the derivative's: every timed call refactored in the prepared one)
    assert implicit_row["ahead_used"] is True
    assert row["derivative_ahead_over_relax"] > 0


def test_auto_resolves_to_sparse_only_where_it_pays(monkeypatch):
    """`--solver auto` (the default of `mdsens run`): the sparse solve for a fixed
    box on the CPU in 2D from SPARSE_MIN_N particles, in 3D within SPARSE_3D, or for
    SPARSE_MIN_SOLVES solves (in 3D up to SPARSE_MAX_N_3D), CG elsewhere; resolved once, by prepare, with the
    run's tangents counted, so the file records the solver used. Builds only (no relaxation)."""
    from mdsens import barostat, job, systems

    assert jax.default_backend() == "cpu"
    big = sensitivity.SPARSE_MIN_N
    bi = systems.get("bidisperse")
    assert sensitivity.resolve_solver("auto", bi.build(n=big, phi=0.9, seed=0)) == "sparse"
    assert sensitivity.resolve_solver("auto", bi.build(n=big - 2, phi=0.9, seed=0)) == "cg"
    low, high = sensitivity.SPARSE_3D  # in 3D the factor's fill pays for two solves only in this range
    assert sensitivity.resolve_solver("auto", bi.build(n=low, dim=3, phi=0.7, seed=0)) == "sparse"
    assert sensitivity.resolve_solver("auto", bi.build(n=high, dim=3, phi=0.7, seed=0)) == "sparse"
    assert sensitivity.resolve_solver("auto", bi.build(n=low - 2, dim=3, phi=0.7, seed=0)) == "cg"
    assert sensitivity.resolve_solver("auto", bi.build(n=high + 2, dim=3, phi=0.7, seed=0)) == "cg"
    # many solves (a per-particle parameter's tangents): one factorization serves them all
    many = sensitivity.SPARSE_MIN_SOLVES
    assert sensitivity.resolve_solver("auto", bi.build(n=64, phi=0.9, seed=0), many) == "sparse"
    assert sensitivity.resolve_solver("auto", bi.build(n=64, phi=0.9, seed=0), many - 1) == "cg"
    assert sensitivity.resolve_solver("auto", bi.build(n=high + 2, dim=3, phi=0.7, seed=0), many) == "sparse"
    monkeypatch.setattr(sensitivity, "SPARSE_MAX_N_3D", high + 1)
    assert sensitivity.resolve_solver("auto", bi.build(n=high + 2, dim=3, phi=0.7, seed=0), many) == "cg"
    # a dense pair graph: CG, however many particles and solves
    for dense in (systems.get("lj_crystal").build(dim=3, cells=6, seed=0), systems.get("lj_crystal").build(cells=24, seed=0),
                  systems.get("morse_cluster").build(n=low + 8, seed=0)):
        assert sensitivity.neighbors_per_particle(dense) > sensitivity.SPARSE_MAX_NEIGHBORS[dense.dim]
        assert sensitivity.resolve_solver("auto", dense) == "cg"
        assert sensitivity.resolve_solver("auto", dense, many) == "cg"
    fixed_p = bi.build(n=big, seed=0, pressure=0.01)
    assert barostat.is_fixed_pressure(fixed_p)
    assert sensitivity.resolve_solver("auto", fixed_p) == "cg"
    for explicit in ("cg", "sparse", "dense"):  # a named solver is kept as it is
        assert sensitivity.resolve_solver(explicit, bi.build(n=16, phi=0.9, seed=0)) == explicit
    run = job.Job(overrides={"n": str(big)})
    assert run.solver == "auto"
    job.prepare(run)
    assert run.solver == "sparse"
    small = job.Job(overrides={"n": "64"})
    job.prepare(small)
    assert small.solver == "cg"
    poly = job.Job(system="polydisperse", overrides={"n": "64"})  # --wrt diameter: 64 tangents
    job.prepare(poly)
    assert poly.solver == "sparse"
    one = job.Job(system="polydisperse", overrides={"n": "64"}, wrt=["diameter[3]"])
    job.prepare(one)
    assert one.solver == "cg"
    at_pressure = job.Job(overrides={"n": str(big), "pressure": "0.01"})
    job.prepare(at_pressure)
    assert at_pressure.solver == "cg"


@pytest.mark.parametrize("family, config", [("bidisperse", {"n": 1024}), ("bidisperse", {"n": 1024, "dim": 3}),
                                            ("polydisperse", {"n": 1024, "dim": 3}), ("lj_crystal", {"dim": 3})])
def test_neighbors_per_particle_is_the_pair_count_of_the_start(family, config):
    """`auto`'s estimate of the pair graph's density (N/V times the ball of the cutoff)
    against the pairs within the cutoff counted at the start: a random start (soft
    spheres) or a lattice (the crystal, its shells within 2.5σ)."""
    from mdsens import systems

    system = systems.get(family).build(seed=0, **config)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    q = system.to_solver(jnp.asarray(system.positions), params)
    counted = 2 * system.interacting_pairs(q, params).shape[1] / system.n
    assert abs(sensitivity.neighbors_per_particle(system) / counted - 1) < 0.25, counted


def test_summaries_name_the_solver_that_ran(tmp_path):
    """The human summaries of `run` and `show` count CG iterations only for CG: a
    sparse run (what `--solver auto` gives from N = 1024 in 2D) says so instead of
    reporting "CG iterations [0, 0]"."""
    out = tmp_path / "sparse.h5"
    result = CliRunner().invoke(app, ["run", "--set", "n=16", "--set", "phi=0.95", "--seed", "1", "--wrt", "diameter",
                                      "--grad", "pressure", "--solver", "sparse", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "sparse solve, residual" in result.output and "CG iterations" not in result.output
    shown = CliRunner().invoke(app, ["show", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "(sparse solve, residual" in shown.output and "CG iterations" not in shown.output


def test_warm_up_touches_neither_the_cache_nor_the_counts():
    """The head start a run gives the host side (a thread beside the relaxation) is not a
    factorization anyone can see: no cache entry, no count."""
    sparse.clear_cache()
    before = dict(sparse.STATS)
    sparse.warm_up_beside().join()
    assert sparse.STATS == before
    assert len(sparse._CACHE) == 0
