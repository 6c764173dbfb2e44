"""The implicit engine: custom_root through every JAX transformation, the
gauge, forward/reverse transposition, dense vs CG, second derivatives, and
finite differences (re-relaxed, Newton-polished, minimum image)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import implicit, linsolve, minimize, observables, sensitivity
from helpers import relative_error, relaxed

# Small packings: 2D and 3D, compressed enough to have no rattlers at these seeds.
CASES = {2: dict(n=16, dim=2, phi=0.95), 3: dict(n=24, dim=3, phi=0.75)}


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def packing(request):
    return relaxed("bidisperse", seed=1, **CASES[request.param])


def _direction(params, seed):
    """A random tangent on every parameter leaf except the box."""
    keys = jax.random.split(jax.random.PRNGKey(seed), len(params))
    return {k: (jnp.zeros_like(v) if k == "box" else jax.random.normal(key, jnp.shape(v)))
            for key, (k, v) in zip(keys, params.items())}


def test_jvp_vjp_are_transposes_and_match_dense(packing):
    system, q, params, rattler = packing
    eq = sensitivity.equilibrium(system, ftol=1e-12)
    dense_eq = sensitivity.equilibrium(system, ftol=1e-12, solve=linsolve.dense())
    v = _direction(params, 0)
    # A generic cotangent, with a centre-of-mass component: plain CG on the
    # singular Hessian diverges on exactly this (docs/design.md, "Pitfalls we measured").
    w = jax.random.normal(jax.random.PRNGKey(1), q.shape) + 0.3

    _, jv = jax.jit(lambda p, v_: jax.jvp(lambda p_: eq(q, p_), (p,), (v_,)))(params, v)
    jtw = jax.jit(lambda p, w_: jax.vjp(lambda p_: eq(q, p_), p)[1](w_)[0])(params, w)
    lhs = jnp.vdot(w, jv)
    rhs = sum(jnp.vdot(jtw[k], v[k]) for k in params)
    # Both sides are the same bilinear form through two independent CG solves
    # at rtol 1e-10: agreement to ~1e-9 relative.
    assert float(abs(lhs - rhs)) < 1e-8 * float(abs(lhs))

    _, jv_dense = jax.jit(lambda p, v_: jax.jvp(lambda p_: dense_eq(q, p_), (p,), (v_,)))(params, v)
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


def test_reverse_energy_gradient_with_tiny_cotangent(packing):
    """dE*/dθ through the root: the cotangent ∇E(x*) ~ 1e-13 must not send CG
    to its cap (a purely relative tolerance would). Envelope theorem: dE*/dθ = ∂θE."""
    system, q, params, _ = packing
    eq = sensitivity.equilibrium(system, ftol=1e-12)
    grad = jax.jit(jax.grad(lambda p: observables.energy(system, eq(q, p), p)))(params)
    partial = jax.grad(lambda p: observables.energy(system, q, p))(params)
    for k in params:
        np.testing.assert_allclose(grad[k], partial[k], rtol=1e-9, atol=1e-12)


def test_second_derivative_through_the_root(packing):
    """d²P*/dD₁²: jvp of a jvp through custom_root vs a central difference of
    the first derivative (itself implicit, at re-relaxed states)."""
    system, q, params, rattler = packing
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
    a = jax.jvp(lambda p: fixed(q, p), (params,), (d,))[1]
    b = jax.jvp(lambda p: root(q, p), (params,), (d,))[1]
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
    reference = jax.jvp(lambda y: jax.grad(system.energy)(y, params), (q,), (v,))[1]
    scale = float(jnp.max(jnp.abs(reference)))
    assert float(jnp.max(jnp.abs(system.hessian_vp(q, params)(v) - reference))) < 1e-12 * scale
    listed = system.with_pairs(jnp.asarray(system.interacting_pairs(q, params)))
    assert float(jnp.max(jnp.abs(listed.hessian_vp(q, params)(v) - reference))) < 1e-12 * scale
    d = {k: jnp.zeros_like(x) for k, x in params.items()}
    d["diameter"] = jnp.array([0.3, 1.0])
    assembled = jax.jvp(lambda p: system.hessian_vp(q, p)(v), (params,), (d,))[1]
    autodiff = jax.jvp(lambda p: jax.jvp(lambda y: jax.grad(system.energy)(y, p), (q,), (v,))[1], (params,), (d,))[1]
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
