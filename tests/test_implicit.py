"""The implicit engine: custom_root through every JAX transformation, the
gauge, forward/reverse transposition, dense vs CG, second derivatives, and
finite differences (re-relaxed, Newton-polished, minimum image)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import gauge, implicit, linsolve, minimize, observables, sensitivity
from helpers import equilibrium_jvp, relative_error, relaxed

# Small packings: 2D and 3D, compressed enough to have no rattlers at these seeds.
CASES = {2: dict(n=16, dim=2, phi=0.95), 3: dict(n=24, dim=3, phi=0.75)}


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def packing(request):
    return relaxed("bidisperse", seed=1, **CASES[request.param])


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow)], ids=["2d", "3d"])
def packing_2d(request):
    """As ``packing``, the 3D case in the slow run only (the default run keeps 3D in the
    finite-difference test)."""
    return relaxed("bidisperse", seed=1, **CASES[request.param])


def _direction(params, seed):
    """A random tangent on every parameter leaf except the box."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(params))
    return {k: (jnp.zeros_like(v) if k == "box" else jax.random.normal(key, jnp.shape(v)))
            for key, (k, v) in zip(keys, params.items())}


def test_jvp_vjp_are_transposes_and_match_dense(packing_2d):
    system, q, params, rattler = packing_2d
    eq = sensitivity.equilibrium(system, ftol=1e-12)
    v = _direction(params, 0)
    # A generic cotangent, with a centre-of-mass component: plain CG on the
    # singular Hessian diverges on exactly this (docs/design.md, "Pitfalls we measured").
    w = jax.random.normal(jax.random.PRNGKey(1), q.shape) + 0.3

    # (the jvp programs are the ones tests/test_seams.py uses: compiled once per run)
    _, jv = equilibrium_jvp(system, ftol=1e-12)(q, params, v)
    jtw = jax.jit(lambda p, w_: jax.vjp(lambda p_: eq(q, p_), p)[1](w_)[0])(params, w)
    lhs = jnp.vdot(w, jv)
    rhs = sum(jnp.vdot(jtw[k], v[k]) for k in params)
    # Both sides are the same bilinear form through two independent CG solves
    # at rtol 1e-10: agreement to ~1e-9 relative.
    assert float(abs(lhs - rhs)) < 1e-8 * float(abs(lhs))

    _, jv_dense = equilibrium_jvp(system, ftol=1e-12, solve=linsolve.dense())(q, params, v)
    assert relative_error(jv, jv_dense) < 1e-8

    # The gauge: no centre-of-mass motion, rattlers still.
    assert float(jnp.max(jnp.abs(jnp.mean(jv, axis=0)))) < 1e-12
    assert float(jnp.max(jnp.abs(jnp.where(rattler[:, None], jv, 0.0)))) == 0.0


def test_forward_and_reverse_match_finite_differences(packing):
    system, q, params, rattler = packing
    observe = {"energy": observables.energy, "pressure": observables.pressure}
    fw = sensitivity.forward(system, q, params, "diameter", observe, rattler)
    grads = {name: sensitivity.gradient(system, q, params, fn, rattler)[0] for name, fn in observe.items()}
    for s in range(2):
        fd = sensitivity.finite_difference(system, q, params, "diameter", (s,), observe=observe)
        # Newton-polished FD with h = 1e-5: ~1e-9 truncation/round-off on
        # positions, conditioning of H adds a decade or two.
        assert relative_error(fw.values["position"][s], fd["position"]) < 1e-6
        for name in observe:
            assert float(fw.values[name][s]) == pytest.approx(float(fd[name]), rel=1e-6, abs=1e-10)
            # Reverse mode is an independent solve: agrees with forward to CG accuracy.
            assert float(grads[name]["diameter"][s]) == pytest.approx(float(fw.values[name][s]), rel=1e-8)
    assert np.all(np.asarray(fw.residual) < 1e-9)


def test_reverse_energy_gradient_with_tiny_cotangent(packing_2d):
    """dE*/dθ through the root: the cotangent ∇E(x*) ~ 1e-13 must not send CG
    to its cap (a purely relative tolerance would). Envelope theorem: dE*/dθ = ∂θE.
    (The same CG tolerance in any dimension: the 3D case runs with -m slow.)"""
    system, q, params, _ = packing_2d
    eq = sensitivity.equilibrium(system, ftol=1e-12)
    grad = jax.jit(jax.grad(lambda p: observables.energy(system, eq(q, p), p)))(params)
    partial = jax.grad(lambda p: observables.energy(system, q, p))(params)
    for k in params:
        np.testing.assert_allclose(grad[k], partial[k], rtol=1e-9, atol=1e-12)


def test_second_derivative_through_the_root(packing_2d):
    """d²P*/dD₁²: jvp of a jvp through custom_root vs a central difference of
    the first derivative (itself implicit, at re-relaxed states)."""
    system, q, params, rattler = packing_2d
    eq = sensitivity.equilibrium(system, ftol=1e-12)
    e1 = {k: jnp.zeros_like(v) for k, v in params.items()}
    e1["diameter"] = jnp.array([0.0, 1.0])

    @jax.jit
    def dP(p, q0):
        return jax.jvp(lambda p_: observables.pressure(system, eq(q0, p_), p_), (p,), (e1,))[1]

    second = jax.jit(lambda p: jax.jvp(lambda p_: dP(p_, q), (p,), (e1,))[1])(params)
    # Small h: the nearest non-contact gap in the 3D case is ~4e-4, and the
    # truncation error (measured 1.4e-4 relative at h = 1e-4) scales as h².
    h = 1e-5
    vals = []
    for sign in (1, -1):
        p = dict(params, diameter=params["diameter"] + sign * h * e1["diameter"])
        qs, _ = sensitivity.relax(system, p, q0=q, ftol=1e-12)
        qs = sensitivity.newton_polish(system, qs, p, rattler)
        vals.append(dP(p, qs))
    fd = (vals[0] - vals[1]) / (2 * h)
    # Measured 3e-7 relative at h = 1e-5 (truncation, plus ~1e-10/h round-off).
    assert float(second) == pytest.approx(float(fd), rel=1e-5)


def test_vmap_jacfwd_jacrev_through_the_root():
    system, q, params, _ = relaxed("bidisperse", seed=1, **CASES[2])
    eq = sensitivity.equilibrium(system, ftol=1e-12)
    jf = jax.jit(jax.jacfwd(lambda d: eq(q, dict(params, diameter=d))))(params["diameter"])
    jr = jax.jit(jax.jacrev(lambda d: eq(q, dict(params, diameter=d))))(params["diameter"])
    assert jf.shape == q.shape + (2,)
    assert relative_error(jr, jf) < 1e-8
    # vmap over ε: the positions do not depend on ε (it only scales E), so every
    # batch member returns the same minimum and zero tangent.
    eps = jnp.array([0.8, 1.0, 1.3])
    batch, dq = jax.jit(jax.vmap(lambda e: jax.jvp(lambda e_: eq(q, dict(params, epsilon=e_)), (e,), (1.0,))))(eps)
    assert batch.shape == (3,) + q.shape
    assert float(jnp.max(jnp.abs(dq))) < 1e-9


def test_fixed_point_view_equals_root_view():
    """custom_fixed_point(x − η∇E) and custom_root(∇E) give the same derivative."""
    system, q, params, rattler = relaxed("bidisperse", seed=1, **CASES[2])
    gauge = sensitivity.gauge_for(system, rattler)
    grad_e = jax.grad(system.energy)
    eta = 0.05

    @implicit.custom_fixed_point(lambda x, p: x - eta * grad_e(x, p), gauge=gauge)
    def fixed(x0, p):
        return x0  # already at the minimum

    @implicit.custom_root(grad_e, gauge=gauge)
    def root(x0, p):
        return x0

    d = {k: jnp.zeros_like(v) for k, v in params.items()}
    d["diameter"] = jnp.array([1.0, -0.5])
    # One compiled program for both views (op by op, each solve's setup was dispatched eagerly).
    a, b = jax.jit(lambda p, d_: (jax.jvp(lambda p_: fixed(q, p_), (p,), (d_,))[1],
                                  jax.jvp(lambda p_: root(q, p_), (p,), (d_,))[1]))(params, d)
    assert relative_error(a, b) < 1e-8


def test_cg_zero_rhs_and_absolute_floor():
    solve = linsolve.cg(rtol=1e-10, atol=1e-14)
    a = jnp.diag(jnp.arange(1.0, 6.0))
    x, info = solve(lambda v: a @ v, jnp.zeros(5))
    assert int(info.iterations) == 0 and float(jnp.max(jnp.abs(x))) == 0.0
    b = jnp.ones(5) * 1e-20  # below the absolute floor: nothing to do
    x, info = solve(lambda v: a @ v, b)
    assert int(info.iterations) == 0
    b = jnp.arange(1.0, 6.0)
    x, info = solve(lambda v: a @ v, b)
    np.testing.assert_allclose(x, jnp.ones(5), rtol=1e-10)
    assert float(info.residual) < 1e-10


def test_rattlers_are_detected_and_held():
    """A dilute packing has rattlers; the derivative leaves them still and the
    rest agrees with finite differences."""
    system, q, params, rattler = relaxed("bidisperse", seed=1, n=32, dim=2, phi=0.86)
    assert 0 < int(rattler.sum()) < system.n
    contacts = np.asarray(system.contacts(q, params))
    held = ~np.asarray(rattler)
    z = contacts[np.ix_(held, held)].sum(axis=1)
    assert np.all(z >= system.dim + 1)  # the definition, checked independently
    fw = sensitivity.forward(system, q, params, "diameter", {}, rattler, index=(1,))
    assert float(jnp.max(jnp.abs(fw.values["position"][np.asarray(rattler)]))) == 0.0
    fd = sensitivity.finite_difference(system, q, params, "diameter", (1,))
    assert relative_error(fw.values["position"], fd["position"]) < 1e-6


@pytest.mark.parametrize("family,config", [
    ("bidisperse", dict(n=16, dim=2, phi=0.95)),
    ("bidisperse", dict(n=24, dim=3, phi=0.75)),
])
def test_assembled_hessian_equals_jvp_of_gradient(family, config):
    """System.hessian_vp (pair blocks, assembled once) is the same operator as
    jvp(∇E), on all pairs and on the interacting-pair list; and its derivative
    (used by second-order implicit derivatives) matches too."""
    system, q, params, _ = relaxed(family, seed=1, **config)
    v = jax.random.normal(jax.random.PRNGKey(3), q.shape)
    listed = system.with_pairs(jnp.asarray(system.interacting_pairs(q, params)))
    d = {k: jnp.zeros_like(x) for k, x in params.items()}
    d["diameter"] = jnp.array([0.3, 1.0])

    @jax.jit  # one compiled program, not op by op (3× faster)
    def operators(q, params, v, d):
        reference = jax.jvp(lambda y: jax.grad(system.energy)(y, params), (q,), (v,))[1]
        assembled = jax.jvp(lambda p: system.hessian_vp(q, p)(v), (params,), (d,))[1]
        autodiff = jax.jvp(lambda p: jax.jvp(lambda y: jax.grad(system.energy)(y, p), (q,), (v,))[1],
                           (params,), (d,))[1]
        return reference, system.hessian_vp(q, params)(v), listed.hessian_vp(q, params)(v), assembled, autodiff

    reference, all_pairs, on_list, assembled, autodiff = operators(q, params, v, d)
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(all_pairs - reference))) < 1e-12 * scale
    assert float(jnp.max(jnp.abs(on_list - reference))) < 1e-12 * scale
    assert relative_error(assembled, autodiff) < 1e-12


def test_batched_tangents_vmap_equals_map():
    """The tangents of one parameter solved as one batched CG (vmap, the
    accelerator default) or one after another (map, the CPU default) agree."""
    system, q, params, rattler = relaxed("bidisperse", seed=1, **CASES[2])
    observe = {"pressure": observables.pressure}
    a = jax.jit(sensitivity.forward_fn(system, "diameter", observe, rattler, batch="map"))(q, params)
    b = jax.jit(sensitivity.forward_fn(system, "diameter", observe, rattler, batch="vmap"))(q, params)
    for key in a.values:
        # Same CG per tangent; vmap only batches it: agreement to round-off.
        assert relative_error(b.values[key], a.values[key]) < 1e-10
    np.testing.assert_array_equal(np.asarray(a.iterations), np.asarray(b.iterations))


# -- a root variable that is a pytree ------------------------------------------------------
#
# A toy energy over {"a": (N, d) positions, "b": (k,) extra dofs}, quadratic in the
# state with θ-dependent loads: E = ½ xᵀ A x − ⟨a, f(θ)⟩ − ⟨b, g(θ)⟩, x = (a, b),
# A positive definite off the d uniform translations of a (a spring network on a,
# a translation-free coupling a–b, an SPD block on b). The minimum is x* = A⁺(f, g)
# in the gauge (mean of a fixed), so dx*/dθ = A⁺ (∂f/∂θ, ∂g/∂θ): the reference is
# that closed form, built in NumPy from the matrices and the hand-written load
# derivatives below, not from the engine.

TOY_N, TOY_D, TOY_K = 7, 2, 3


def _toy():
    rng = np.random.default_rng(5)
    n, d, k = TOY_N, TOY_D, TOY_K
    laplacian = np.zeros((n, n))
    edges = [(i, (i + 1) % n) for i in range(n)] + [(0, 3), (2, 5), (1, 4)]
    for i, j in edges:
        w = rng.uniform(0.5, 2.0)
        laplacian[[i, j], [i, j]] += w
        laplacian[i, j] -= w
        laplacian[j, i] -= w
    aa = np.kron(laplacian, np.eye(d))  # rows ordered (particle, component): a.ravel()
    center = np.kron(np.eye(n) - 1.0 / n, np.eye(d))
    ab = 0.3 * center @ rng.normal(size=(n * d, k))  # translation-free coupling
    bb = 4.0 * np.eye(k) + 0.2 * (lambda m: m @ m.T)(rng.normal(size=(k, k)))
    matrix = np.block([[aa, ab], [ab.T, bb]])
    # The gauge as a dense projector: remove the mean of a, keep b.
    projector = np.eye(n * d + k)
    projector[:n * d, :n * d] = center
    return matrix, projector


def _loads(theta):
    """f(θ) (N, d) and g(θ) (k,): nonlinear in θ = {"s": (), "w": (N,), "c": (k,)}."""
    i = jnp.arange(TOY_N, dtype=float)
    f = jnp.stack([theta["s"] * jnp.sin(theta["w"] * (i + 1)), theta["s"] ** 2 * jnp.cos(i) * theta["w"]], axis=1)
    g = theta["c"] ** 3 + theta["s"]
    return f, g


def _load_jacobian(theta):
    """∂(f.ravel(), g)/∂θ by hand, as a dict name -> (N d + k, size of θ[name])."""
    n, k = TOY_N, TOY_K
    s, w, c = float(theta["s"]), np.asarray(theta["w"]), np.asarray(theta["c"])
    i = np.arange(n, dtype=float)
    ds = np.concatenate([np.stack([np.sin(w * (i + 1)), 2 * s * np.cos(i) * w], axis=1).ravel(), np.ones(k)])
    dw = np.zeros((n, 2, n))
    dw[np.arange(n), 0, np.arange(n)] = s * np.cos(w * (i + 1)) * (i + 1)
    dw[np.arange(n), 1, np.arange(n)] = s**2 * np.cos(i)
    dc = np.zeros((n * 2 + k, k))
    dc[n * 2:, :] = np.diag(3 * c**2)
    return {"s": ds[:, None], "w": np.concatenate([dw.reshape(n * 2, n), np.zeros((k, n))]), "c": dc}


def _toy_problem(hvp=False, solve=None):
    matrix, projector = _toy()
    a_mat = jnp.asarray(matrix)
    nd = TOY_N * TOY_D

    def energy(x, theta):
        flat = jnp.concatenate([x["a"].ravel(), x["b"]])
        f, g = _loads(theta)
        return 0.5 * flat @ a_mat @ flat - jnp.vdot(x["a"], f) - jnp.vdot(x["b"], g)

    def translations(a):
        return a - jnp.mean(a, axis=0)

    gauge_fn = lambda x, theta: gauge.on("a", translations)  # noqa: E731

    def assembled(x, theta):  # the exact Hessian product, as a pytree map
        def matvec(v):
            out = a_mat @ jnp.concatenate([v["a"].ravel(), v["b"]])
            return {"a": out[:nd].reshape(TOY_N, TOY_D), "b": out[nd:]}
        return matvec

    optimality = jax.grad(energy)

    @implicit.custom_root(optimality, solve=solve, gauge=gauge_fn, hvp=assembled if hvp else None)
    def root(init, theta):  # the minimum, solved densely in the gauge (never differentiated)
        f, g = _loads(theta)
        p = jnp.asarray(projector)
        m = p @ a_mat @ p + (jnp.eye(p.shape[0]) - p)
        flat = jnp.linalg.solve(m, p @ jnp.concatenate([f.ravel(), g]))
        return {"a": flat[:nd].reshape(TOY_N, TOY_D), "b": flat[nd:]}

    return root, optimality, gauge_fn, matrix, projector


def _toy_theta():
    return {"s": jnp.asarray(0.7), "w": jnp.linspace(0.3, 1.1, TOY_N), "c": jnp.asarray([0.5, -0.4, 0.9])}


def _toy_jacobian(theta):
    """dx*/dθ in closed form: P M⁻¹ P ∂(f, g)/∂θ, M = P A P + (I − P) (NumPy)."""
    matrix, projector = _toy()
    m = projector @ matrix @ projector + np.eye(len(matrix)) - projector
    return {name: projector @ np.linalg.solve(m, projector @ jac) for name, jac in _load_jacobian(theta).items()}


def _flat(x):
    return np.concatenate([np.asarray(x["a"]).ravel(), np.asarray(x["b"])])


@pytest.mark.parametrize("hvp", [False, True], ids=["jvp", "assembled"])
def test_pytree_root_forward_reverse_against_the_closed_form(hvp):
    """custom_root over {"a": (N, d), "b": (k,)}: jvp and vjp equal the closed-form
    Jacobian, are transposes, and the gauge acts on "a" only."""
    root, _, _, _, projector = _toy_problem(hvp=hvp, solve=linsolve.cg(rtol=1e-13))
    theta = _toy_theta()
    init = {"a": jnp.zeros((TOY_N, TOY_D)), "b": jnp.zeros(TOY_K)}
    jac = _toy_jacobian(theta)
    direction = {"s": jnp.asarray(0.4), "w": jnp.linspace(-1.0, 1.0, TOY_N), "c": jnp.asarray([1.0, 0.2, -0.7])}
    expected = sum(jac[k] @ np.atleast_1d(np.asarray(direction[k])) for k in jac)

    x, dx = jax.jit(lambda t, v: jax.jvp(lambda t_: root(init, t_), (t,), (v,)))(theta, direction)
    assert set(dx) == {"a", "b"} and dx["a"].shape == (TOY_N, TOY_D) and dx["b"].shape == (TOY_K,)
    assert relative_error(_flat(dx), expected) < 1e-10
    assert float(jnp.max(jnp.abs(jnp.mean(dx["a"], axis=0)))) < 1e-13  # the gauge on "a"
    assert float(jnp.max(jnp.abs(dx["b"]))) > 1e-2  # and "b" is not projected away

    # Reverse: a cotangent with a translation component on "a" (the gauge removes it).
    key_a, key_b = jax.random.split(jax.random.PRNGKey(2))
    w = {"a": jax.random.normal(key_a, (TOY_N, TOY_D)) + 0.5, "b": jax.random.normal(key_b, (TOY_K,))}
    (theta_bar,) = jax.jit(lambda t, w_: jax.vjp(lambda t_: root(init, t_), t)[1](w_))(theta, w)
    for name in jac:
        np.testing.assert_allclose(np.atleast_1d(np.asarray(theta_bar[name])), jac[name].T @ _flat(w),
                                   rtol=1e-10, atol=1e-12)
    lhs = float(np.dot(_flat(w), _flat(dx)))
    rhs = sum(float(jnp.vdot(theta_bar[k], direction[k])) for k in theta)
    assert abs(lhs - rhs) < 1e-10 * abs(lhs)


def test_pytree_root_vmap_jacfwd_and_explicit_tangent_cotangent():
    root, optimality, gauge_fn, _, _ = _toy_problem(hvp=True)
    theta = _toy_theta()
    init = {"a": jnp.zeros((TOY_N, TOY_D)), "b": jnp.zeros(TOY_K)}
    jac = _toy_jacobian(theta)

    # vmap over a batch of s values: each member's dx*/ds against its own closed form.
    batch = jnp.asarray([0.3, 0.7, 1.2])
    dxs = jax.jit(jax.vmap(lambda s: jax.jvp(lambda s_: root(init, dict(theta, s=s_)), (s,), (1.0,))[1]))(batch)
    assert dxs["a"].shape == (3, TOY_N, TOY_D)
    for m, s in enumerate(np.asarray(batch)):
        ref = _toy_jacobian(dict(theta, s=jnp.asarray(s)))["s"][:, 0]
        assert relative_error(_flat({"a": dxs["a"][m], "b": dxs["b"][m]}), ref) < 1e-9

    # jacfwd in w: a pytree of Jacobians, leaf shapes + (N,)
    jw = jax.jit(jax.jacfwd(lambda w_: root(init, dict(theta, w=w_))))(theta["w"])
    assert jw["a"].shape == (TOY_N, TOY_D, TOY_N) and jw["b"].shape == (TOY_K, TOY_N)
    flat = np.concatenate([np.asarray(jw["a"]).reshape(-1, TOY_N), np.asarray(jw["b"])])
    assert relative_error(flat, jac["w"]) < 1e-9

    # tangent / cotangent directly, CG against the dense (ravelled) solve
    x = root(init, theta)
    dtheta = {"s": jnp.asarray(1.0), "w": jnp.zeros(TOY_N), "c": jnp.zeros(TOY_K)}

    @jax.jit
    def tangents(x_, t_):
        return (implicit.tangent(optimality, x_, t_, dtheta, linsolve.cg(rtol=1e-13), gauge_fn),
                implicit.tangent(optimality, x_, t_, dtheta, linsolve.dense(), gauge_fn))

    (u_cg, info), (u_dense, dense_info) = tangents(x, theta)
    assert int(info.iterations) > 0 and float(info.residual) < 1e-12 and bool(info.converged)
    assert float(dense_info.residual) < 1e-12
    assert relative_error(_flat(u_cg), jac["s"][:, 0]) < 1e-10
    assert relative_error(_flat(u_dense), jac["s"][:, 0]) < 1e-12
    w = {"a": jnp.ones((TOY_N, TOY_D)).at[0, 1].set(3.0), "b": jnp.asarray([1.0, 0.0, -2.0])}
    bar, _ = jax.jit(lambda x_, t_: implicit.cotangent(optimality, x_, t_, w, linsolve.dense(), gauge_fn))(x, theta)
    np.testing.assert_allclose(np.asarray(bar["c"]), jac["c"].T @ _flat(w), rtol=1e-11, atol=1e-13)


def test_cg_on_a_tuple_equals_the_dense_solution():
    """linsolve.cg on a pytree (tuple) right-hand side: inner products over the
    leaves; the same solution as NumPy on the flattened system; zero b returns zero."""
    rng = np.random.default_rng(0)
    m = rng.normal(size=(9, 9))
    m = m @ m.T + 9 * np.eye(9)
    mat = jnp.asarray(m)

    def matvec(v):
        out = mat @ jnp.concatenate([v[0].ravel(), v[1]])
        return out[:6].reshape(3, 2), out[6:]

    b = (jnp.asarray(rng.normal(size=(3, 2))), jnp.asarray(rng.normal(size=3)))
    x, info = jax.jit(lambda b_: linsolve.cg(rtol=1e-13)(matvec, b_))(b)
    expected = np.linalg.solve(m, np.concatenate([np.asarray(b[0]).ravel(), np.asarray(b[1])]))
    np.testing.assert_allclose(np.concatenate([np.asarray(x[0]).ravel(), np.asarray(x[1])]), expected, rtol=1e-11)
    assert isinstance(x, tuple) and x[0].shape == (3, 2) and float(info.residual) < 1e-12
    zero, zinfo = linsolve.cg()(matvec, (jnp.zeros((3, 2)), jnp.zeros(3)))
    assert int(zinfo.iterations) == 0 and float(jnp.max(jnp.abs(zero[0]))) == 0.0
