"""Regression tests for defects found on reading: float32 rank thresholds,
an O(N²) contact number, units keyed by system name, the fixed-point view's
indefinite operator, the finite-difference default index, and the two-level
preconditioner beyond one coarse cell."""

from __future__ import annotations

import re

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import relative_error, relaxed
from mdsens import gauge, implicit, io, linsolve, observables, precondition, sensitivity
from mdsens.job import Job, execute

# -- 1. float32: thresholds scale with the dtype ---------------------------------


def test_float32_rigid_body_gauge_of_a_dimer_keeps_the_stretch():
    """A 3D dimer has 3 translations and 2 rotations: the projector keeps exactly
    the stretching direction. In float32 the dependent third rotation's QR
    diagonal is ~1e-7 relative, far above a 1e-10 threshold."""
    axis = np.array([0.48, -0.61, 0.63])
    axis /= np.linalg.norm(axis)
    with jax.enable_x64(False):
        for offset in (np.zeros(3), np.array([0.3, 1.7, -2.1])):
            x = jnp.asarray(np.stack([offset + 0.5 * axis, offset - 0.5 * axis]), jnp.float32)
            project = gauge.rigid_body(x, jnp.zeros(2, bool))
            matrix = jax.vmap(lambda e: project(e.reshape(2, 3)).ravel())(jnp.eye(6, dtype=jnp.float32))
            assert float(jnp.trace(matrix)) == pytest.approx(1.0, abs=1e-5)
            stretch = jnp.asarray(np.stack([axis, -axis]) / np.sqrt(2), jnp.float32)
            assert float(jnp.max(jnp.abs(project(stretch) - stretch))) < 1e-5


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rigid_body_gauge_of_an_axis_aligned_chain(axis):
    """A collinear chain along a coordinate axis: the zero rotation generator
    comes first for the z axis; every real rotation must still be removed."""
    a = np.eye(3)[axis]
    x = jnp.asarray(np.stack([0.5 * a, -0.5 * a, 1.5 * a]))
    project = gauge.rigid_body(x, jnp.zeros(3, bool))
    matrix = jax.vmap(lambda e: project(e.reshape(3, 3)).ravel())(jnp.eye(9))
    assert float(jnp.trace(matrix)) == pytest.approx(9 - 5)
    c = np.asarray(x - jnp.mean(x, axis=0))
    for i in range(3):
        for j in range(i + 1, 3):
            g = np.zeros((3, 3))
            g[:, i], g[:, j] = -c[:, j], c[:, i]
            assert float(jnp.linalg.norm(project(jnp.asarray(g)))) < 1e-12


def _dimer(axis, dtype):
    """The Morse dimer at its exact minimum (distance σ = 1 along ``axis``)."""
    from mdsens import systems

    system = systems.get("morse_cluster").build(n=2, dim=len(axis))
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    x = np.stack([0.3 + 0.5 * axis, 0.3 - 0.5 * axis])
    params = {k: jnp.asarray(np.asarray(v), dtype) for k, v in system.params.items()}
    return system, jnp.asarray(x, dtype), params, axis


@pytest.mark.slow  # long (over a minute on 2 cores); `pytest -m slow`
def test_float32_morse_dimer_derivative_is_exact():
    """Morse dimer: distance = σ, so each particle moves ±½ along the axis per
    unit σ and |dx*/dσ| = 1/√2, for any orientation. In float32 a spurious
    rotation mode (1e-10 rank threshold) projected the stretch away for some
    orientations (|dx*/dσ| ~ 1e-12)."""
    rng = np.random.default_rng(0)
    axes = [rng.normal(size=3) for _ in range(12)] + [rng.normal(size=2) for _ in range(4)]
    with jax.enable_x64(False):
        for axis in axes:
            system, x, params, unit = _dimer(axis, jnp.float32)
            rattler = jnp.zeros(2, bool)
            fw = sensitivity.forward(system, x, params, "sigma", {}, rattler)
            u = np.asarray(fw.values["position"], np.float64)
            assert fw.values["position"].dtype == jnp.float32
            np.testing.assert_allclose(u, 0.5 * np.stack([unit, -unit]), atol=1e-5, err_msg=str(axis))
            assert int(fw.iterations) < 10  # stops at float32 round-off, not at the cap


def test_float32_morse_dimer_through_a_run():
    """The same through the run path (float32 relaxation, default solver and
    preconditioner), as ``mdsens run morse_cluster --set n=2 --precision float32``."""
    with jax.enable_x64(False):
        result = execute(Job(system="morse_cluster", overrides={"n": "2", "dim": "3"}, seed=1, ftol=1e-5))
        assert result.converged and result.q.dtype == jnp.float32
        x = np.asarray(result.system.to_real(result.q, result.params), np.float64)
        u = np.asarray(result.sensitivity["sigma"].values["position"], np.float64)
    axis = (x[0] - x[1]) / np.linalg.norm(x[0] - x[1])
    np.testing.assert_allclose(u, 0.5 * np.stack([axis, -axis]), atol=1e-5)
    assert np.linalg.norm(u) == pytest.approx(1 / np.sqrt(2), rel=1e-5)


def _to_float32(tree):
    return jax.tree_util.tree_map(lambda v: jnp.asarray(np.asarray(v), jnp.float32), tree)


@pytest.mark.slow
def test_float32_coarse_space_drops_the_translation_modes():
    """The coarse matrix of the two-level preconditioner is a cell-graph
    Laplacian: its d translation eigenvalues are round-off, ~1e-7·max in
    float32. Kept (1e-10 threshold), they get 1/round-off weights; the float32
    preconditioner must agree with the float64 one to float32 accuracy."""
    system, q, params, rattler = relaxed("bidisperse", n=128, dim=2, phi=0.9)
    assert precondition._cells(system, q, 32, 1024)[1] > 1
    r = jax.random.normal(jax.random.PRNGKey(0), q.shape)
    project = sensitivity.gauge_for(system, rattler)(q, params)
    reference = precondition.two_level(system, q, params, rattler, project)(r)
    with jax.enable_x64(False):
        q32, p32, r32 = _to_float32(q), _to_float32(params), _to_float32(r)
        project32 = sensitivity.gauge_for(system, rattler)(q32, p32)
        applied = precondition.two_level(system, q32, p32, rattler, project32)(r32)
        assert applied.dtype == jnp.float32
    assert relative_error(np.asarray(applied, np.float64), reference) < 1e-4


@pytest.mark.slow  # long (over a minute on 2 cores); `pytest -m slow`
@pytest.mark.parametrize("family,config,name", [
    ("bidisperse", dict(n=128, dim=2, phi=0.9), "diameter"),   # periodic, 4 coarse cells
    ("morse_cluster", dict(n=7, dim=2), "sigma"),              # free space, 2D rotations
])
def test_float32_derivatives_close_to_float64(family, config, name):
    """At the same (float64-relaxed) state, float32 derivatives with the default
    two-level preconditioner agree with float64 to ~1e-4 relative."""
    from mdsens.job import _solver

    system, q, params, rattler = relaxed(family, **config)
    observe = {"energy": observables.energy}
    ref = sensitivity.forward(system, q, params, name, observe, rattler, _solver(Job(), system, q, params, rattler))
    with jax.enable_x64(False):
        q32, p32 = _to_float32(q), _to_float32(params)
        solve = _solver(Job(), system, q32, p32, rattler)
        fw = sensitivity.forward(system, q32, p32, name, observe, rattler, solve)
        assert fw.values["position"].dtype == jnp.float32
    assert relative_error(np.asarray(fw.values["position"], np.float64), ref.values["position"]) < 1e-3
    cap = 10 * q.size
    assert np.all(np.asarray(fw.iterations) < cap)


def test_cg_relative_tolerance_is_floored_at_the_dtype_round_off():
    """rtol = 1e-10 cannot be met in float32: CG stops at round-off, not at its cap."""
    with jax.enable_x64(False):
        rng = np.random.default_rng(0)
        basis, _ = np.linalg.qr(rng.normal(size=(40, 40)))
        a = jnp.asarray(basis @ np.diag(np.linspace(1.0, 1e3, 40)) @ basis.T, jnp.float32)
        b = jnp.asarray(rng.normal(size=40), jnp.float32)
        x, info = linsolve.cg(rtol=1e-10)(lambda v: a @ v, b)
        assert int(info.iterations) < 400
        assert float(info.residual) < 1e-4


# -- 2. contact_number is O(pairs) ------------------------------------------------


def _shapes(jaxpr) -> set[tuple[int, ...]]:
    """Every intermediate shape in a (closed) jaxpr, sub-jaxprs included."""
    found = set()
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            found.add(tuple(getattr(v.aval, "shape", ())))
        for param in eqn.params.values():
            subs = param if isinstance(param, (list, tuple)) else [param]
            for sub in subs:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found |= _shapes(inner)
    return found


@pytest.mark.slow  # long (over a minute on 2 cores); `pytest -m slow`
def test_contact_number_builds_no_n_by_n_matrix_on_a_neighbor_list():
    system, q, params, rattler = relaxed("polydisperse", n=32, dim=2, phi=0.9, spread=0.2)
    listed = system.with_pairs(jnp.asarray(system.interacting_pairs(q, params, margin=0.2)))
    n = system.n
    jaxpr = jax.make_jaxpr(lambda q_, p_: observables.contact_number(listed, q_, p_))(q, params).jaxpr
    shapes = _shapes(jaxpr)
    assert not any(s[:2] == (n, n) for s in shapes if len(s) >= 2), sorted(shapes)
    # Same value as all pairs and as an independent dense count.
    x = np.asarray(system.to_real(q, params))
    box, d = np.asarray(params["box"]), np.asarray(params["diameter"])
    delta = x[:, None] - x[None]
    delta -= box * np.round(delta / box)
    touching = (np.sqrt(np.sum(delta**2, -1)) < 0.5 * (d[:, None] + d[None])) & ~np.eye(n, dtype=bool)
    held = ~np.asarray(rattler)
    z = np.sum(touching[np.ix_(held, held)]) / np.sum(held)
    assert float(observables.contact_number(listed, q, params)) == pytest.approx(z, rel=1e-14)
    assert float(observables.contact_number(system, q, params)) == pytest.approx(z, rel=1e-14)


# -- 3. units follow the potential ----------------------------------------------


@pytest.mark.slow  # long (over a minute on 2 cores); `pytest -m slow`
def test_from_file_morse_units(tmp_path):
    source = tmp_path / "dimer.h5"
    first = execute(Job(system="morse_cluster", overrides={"n": "3", "dim": "2"}, wrt=["alpha"]))
    io.write(source, first.record())
    units = io.units_of(source)
    assert units["/parameters/alpha"] == "sigma-1"
    assert units["/sensitivity/alpha/position"] == "sigma+2"
    result = execute(Job(system="from_file", overrides={"path": str(source), "potential": "morse"},
                         wrt=["alpha", "sigma"], grad=["energy"]))
    assert result.converged
    out = tmp_path / "from_file.h5"
    io.write(out, result.record())
    units = io.units_of(out)
    assert units["/parameters/alpha"] == "sigma-1"
    assert units["/parameters/sigma"] == "sigma"
    assert units["/sensitivity/alpha/position"] == "sigma+2"
    assert units["/sensitivity/alpha/energy"] == "epsilon sigma"
    assert units["/sensitivity/sigma/position"] == "1"
    assert units["/gradient/energy/alpha"] == "epsilon sigma"
    # A harmonic from_file run: α is the stiffness exponent, dimensionless.
    assert io.parameter_unit("from_file", "alpha", potential="harmonic") == "1"
    assert io.parameter_unit("bidisperse", "alpha") == "1"
    assert io.parameter_unit("morse_cluster", "alpha") == "sigma-1"
    # Without knowing the potential, α of from_file has no known unit (not a wrong one).
    assert io.parameter_unit("from_file", "alpha") is None
    assert io.potential_of({"system": "from_file", "configuration": {"potential": "morse"}}) == "morse"


# -- 4. custom_fixed_point solves a positive system and takes an hvp ---------------


def _fixed_point_setup():
    system, q, params, rattler = relaxed("bidisperse", seed=1, n=16, dim=2, phi=0.95)
    gauge_fn = sensitivity.gauge_for(system, rattler)
    d = {k: jnp.zeros_like(v) for k, v in params.items()}
    d["diameter"] = jnp.array([1.0, -0.5])
    return system, q, params, gauge_fn, d


@pytest.mark.slow
def test_fixed_point_hands_cg_a_positive_operator():
    system, q, params, gauge_fn, d = _fixed_point_setup()
    grad_e = jax.grad(system.energy)
    eta = 0.05
    seen = []

    def spy(matvec, b):  # the operator the solver is handed, its spectrum recorded at run time
        matrix = jax.vmap(lambda e: matvec(e.reshape(b.shape)).ravel())(jnp.eye(b.size, dtype=b.dtype))
        jax.debug.callback(lambda lam: seen.append(np.asarray(lam)), jnp.linalg.eigvalsh(0.5 * (matrix + matrix.T)))
        return linsolve.dense()(matvec, b)

    @implicit.custom_fixed_point(lambda x, p: x - eta * grad_e(x, p), solve=spy, gauge=gauge_fn)
    def fixed(x0, p):
        return x0

    jax.block_until_ready(jax.jvp(lambda p: fixed(q, p), (params,), (d,)))
    lam = seen[0]
    assert lam.min() > -1e-10 * lam.max(), lam[:5]


@pytest.mark.slow
def test_fixed_point_equals_root_with_cg_and_with_hvp():
    system, q, params, gauge_fn, d = _fixed_point_setup()
    grad_e = jax.grad(system.energy)
    eta = 0.05
    calls = []

    def jacobian_of_t(x, p):  # ∂T/∂x = I − ηH, assembled from the pair blocks
        calls.append(1)
        h = system.hessian_vp(x, p)
        return lambda v: v - eta * h(v)

    @implicit.custom_root(grad_e, solve=linsolve.cg(rtol=1e-12), gauge=gauge_fn)
    def root(x0, p):
        return x0

    b = jax.jvp(lambda p: root(q, p), (params,), (d,))[1]
    for hvp in (None, jacobian_of_t):
        @implicit.custom_fixed_point(lambda x, p: x - eta * grad_e(x, p), solve=linsolve.cg(rtol=1e-12),
                                     gauge=gauge_fn, hvp=hvp)
        def fixed(x0, p):
            return x0

        a = jax.jvp(lambda p: fixed(q, p), (params,), (d,))[1]
        assert relative_error(a, b) < 1e-9
        g = jax.grad(lambda p: jnp.sum(fixed(q, p) * b))(params)
        g_root = jax.grad(lambda p: jnp.sum(root(q, p) * b))(params)
        assert relative_error(g["diameter"], g_root["diameter"]) < 1e-9
    assert calls, "the hvp was not used"


# -- 6. finite_difference: each element separately by default -----------------------


@pytest.mark.slow  # long (over a minute on 2 cores); `pytest -m slow`
def test_finite_difference_default_is_each_element_like_forward():
    system, q, params, rattler = relaxed("bidisperse", seed=1, n=16, dim=2, phi=0.95)
    observe = {"energy": observables.energy}
    fw = sensitivity.forward(system, q, params, "diameter", observe, rattler)
    fd = sensitivity.finite_difference(system, q, params, "diameter", observe=observe)
    assert fd["position"].shape == fw.values["position"].shape == (2, system.n, 2)
    assert fd["energy"].shape == (2,)
    assert relative_error(fd["position"], fw.values["position"]) < 1e-6
    np.testing.assert_allclose(fd["energy"], fw.values["energy"], rtol=1e-6)
    one = sensitivity.finite_difference(system, q, params, "diameter", (1,))
    assert one["position"].shape == (system.n, 2)
    assert relative_error(one["position"], fw.values["position"][1]) < 1e-6
    with pytest.raises(ValueError, match="index"):
        sensitivity.finite_difference(system, q, params, "diameter", ())


def test_forward_docstring_names_the_batching():
    doc = sensitivity.forward.__doc__
    assert "batched with vmap" not in doc and "lax.map" in doc


# -- 7. the two-level preconditioner with several coarse cells ---------------------


@pytest.mark.slow
def test_two_level_with_several_coarse_cells():
    system, q, params, rattler = relaxed("bidisperse", n=256, dim=2, phi=0.9)
    cells = precondition._cells(system, q, 32, 1024)[1]
    assert cells == 9
    project = sensitivity.gauge_for(system, rattler)(q, params)
    two = precondition.two_level(system, q, params, rattler, project)
    jacobi = precondition.block_jacobi(system, q, params, project)
    r = project(jax.random.normal(jax.random.PRNGKey(1), q.shape))
    # The coarse correction is a substantial part of the preconditioner here.
    assert relative_error(two(r), jacobi(r)) > 0.1
    observe = {"pressure": observables.pressure}
    listed = system.with_pairs(jnp.asarray(system.interacting_pairs(q, params, margin=0.1)))
    plain = sensitivity.forward(listed, q, params, "diameter", observe, rattler, linsolve.cg(rtol=1e-12))
    pre = sensitivity.forward(listed, q, params, "diameter", observe, rattler,
                              linsolve.cg(rtol=1e-12, preconditioner=two))
    assert relative_error(pre.values["position"], plain.values["position"]) < 1e-8
    np.testing.assert_allclose(pre.values["pressure"], plain.values["pressure"], rtol=1e-8)
    assert np.all(np.asarray(pre.iterations) < np.asarray(plain.iterations))
    assert np.all(np.asarray(pre.residual) < 1e-11)


# -- 8. the finite-difference reference at moderate N -------------------------------
# `mdsens check` on a 2D N = 1024 file asked XLA for 77 GB, and on 3D N = 512 grew past
# 20 GB: the Newton polish built its dense matrix from N·d Hessian products at once, each
# over all N(N−1)/2 pairs. It also compiled its step anew at every call.


def test_dense_solve_in_batches_of_columns():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((10, 10))
    m = a @ a.T + 10 * np.eye(10)
    b = rng.standard_normal(10)
    for batch in (3, 10, 64):
        x, info = linsolve.dense(batch)(lambda v: jnp.asarray(m) @ v, jnp.asarray(b))
        np.testing.assert_allclose(np.asarray(x), np.linalg.solve(m, b), rtol=1e-12)
        assert bool(info.converged)


def test_newton_polish_over_listed_pairs_equals_all_pairs_and_compiles_once():
    from mdsens import cache

    system, q, params, rattler = relaxed("bidisperse", n=96, dim=2, phi=0.9)
    assert system.pairs is None
    held = (~rattler)[:, None]  # the gauge keeps rattlers where they are: push the others

    def push(key):
        kick = held * jax.random.normal(jax.random.PRNGKey(key), q.shape)
        return q + 1e-5 * held * (kick - jnp.sum(kick, axis=0) / jnp.sum(held))

    pushed = push(0)
    listed = sensitivity.newton_polish(system, pushed, params, rattler)
    everything = sensitivity._newton_steps(system, pushed, params, rattler, 4, None)
    # Both return to the minimum the push left (1e-5 away) to round-off.
    assert float(jnp.max(jnp.abs(listed - everything))) < 1e-12
    for polished in (listed, everything):
        assert float(jnp.max(jnp.abs(sensitivity.optimality(system)(polished, params)))) < 1e-11
    before = cache.programs()
    sensitivity.newton_polish(system, push(1), params, rattler)
    assert cache.programs() == before


def test_five_point_stencil_is_more_accurate_than_two_point():
    system, q, params, rattler = relaxed("bidisperse", seed=1, n=16, dim=2, phi=0.95)
    observe = {"energy": observables.energy}
    exact = sensitivity.forward(system, q, params, "diameter", observe, rattler, index=(0,)).values
    errors = {}
    for stencil in (2, 4):
        fd = sensitivity.finite_difference(system, q, params, "diameter", (0,), h=3e-4, observe=observe,
                                           stencil=stencil)
        errors[stencil] = relative_error(fd["position"], exact["position"])
    assert errors[4] < errors[2] / 10, errors
    with pytest.raises(ValueError, match="stencil"):
        sensitivity.finite_difference(system, q, params, "diameter", (0,), stencil=3)


def test_a_contact_free_rattlers_diameter_differences_to_exactly_zero():
    """Particle 0 of this packing touches nobody: nothing depends on its diameter. The
    five-point sum of four equal values was ~1e-15, not 0, and `mdsens check` called
    that a relative error of 1; the stencils now difference symmetric points first."""
    system, q, params, rattler = relaxed("polydisperse", seed=6, n=400, dim=2, phi=0.84)
    listed = system.with_pairs(jnp.asarray(system.interacting_pairs(q, params, 0.0)))
    contact, i, j = listed.contact_list(q, params)
    assert bool(rattler[0]) and not bool(jnp.any(contact & ((i == 0) | (j == 0))))
    observe = {"energy": observables.energy, "pressure": observables.pressure}
    for stencil in (2, 4):
        fd = sensitivity.finite_difference(system, q, params, "diameter", (0,), observe=observe, stencil=stencil)
        assert all(not np.any(fd[key]) for key in ("position", "energy", "pressure")), stencil


def test_a_contact_closing_inside_the_stencil_is_reported():
    """Particle 1 of the same packing is a rattler 3e-8 from touching a neighbour: at
    θ + h it pushes it, at θ − h it does not, and x*(θ) has a kink that no difference
    straddling it estimates. `finite_difference` says so, and `mdsens check` leaves
    the element unjudged instead of calling a correct derivative wrong."""
    system, q, params, rattler = relaxed("polydisperse", seed=6, n=400, dim=2, phi=0.84)
    changed = []
    for index in ((0,), (1,)):
        sensitivity.finite_difference(system, q, params, "diameter", index, contacts_changed=changed)
    assert changed == [False, True]
    changed = []
    sensitivity.finite_difference(system, q, params, "diameter", (1,), h=1e-9, contacts_changed=changed)
    assert changed == [False]


@pytest.mark.parametrize("dim,n", [(2, 1500), (3, 1200)])
def test_interacting_pairs_by_tree_equal_the_blocked_search(dim, n):
    """Above ``block`` particles the pairs within reach come from a periodic k-d tree (a
    `mdsens check` at N = 16384 spent minutes and gigabytes in the N × block blocks):
    the same pairs in the same order."""
    from mdsens import systems as _systems

    family = _systems.get("bidisperse")
    system = family.build_fn(seed=2, **family.resolve({"n": str(n), "dim": str(dim), "phi": "0.8"}))
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    q = system.to_solver(jnp.asarray(system.positions), params)
    tree = system.interacting_pairs(q, params, 0.15)
    blocks = system.interacting_pairs(q, params, 0.15, block=n)
    assert tree.shape[1] > n and np.array_equal(tree, blocks)
