"""The engine's seams (issue 13): one solver factory, no silent failure, compile once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import elasticity, implicit, linsolve, observables, sensitivity, systems


@pytest.fixture(scope="module")
def relaxed():
    system = systems.get("bidisperse").build(n=16, phi=0.95, seed=2)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    q, info = sensitivity.relax(system, params)
    assert bool(info.converged)
    return system, params, q, observables.rattlers(system, q, params)


def test_equilibrium_is_preconditioned_and_exact(relaxed):
    """equilibrium() builds its solve at the root (twolevel by default); its
    derivative equals the dense exact solve's."""
    system, params, q, _ = relaxed
    dp = {k: jnp.zeros_like(v) for k, v in params.items()}
    dp["diameter"] = jnp.asarray([0.0, 1.0])
    outs = []
    for kwargs in ({}, {"preconditioner": "jacobi"}, {"solve": linsolve.dense()}):
        eq = sensitivity.equilibrium(system, **kwargs)
        outs.append(jax.jvp(lambda p: eq(q, p), (params,), (dp,))[1])
    np.testing.assert_allclose(outs[0], outs[2], rtol=0, atol=1e-8)
    np.testing.assert_allclose(outs[1], outs[2], rtol=0, atol=1e-8)
    assert float(jnp.max(jnp.abs(outs[2]))) > 1e-3


def test_unconverged_relaxation_and_capped_solve_are_nan(relaxed):
    system, params, q, _ = relaxed
    start = jnp.asarray(system.to_solver(jnp.asarray(system.positions), params))
    short = sensitivity.equilibrium(system, max_steps=5)
    assert bool(jnp.all(jnp.isnan(short(start, params))))
    # an observable of the failed state and its gradient are NaN too (not a finite energy of garbage)
    grad = jax.grad(lambda d: observables.energy(system, short(start, {**params, "diameter": d}),
                                                 {**params, "diameter": d}))(params["diameter"])
    assert bool(jnp.all(jnp.isnan(grad)))
    # A CG capped at 2 iterations does not reach 1e-10: the tangent is NaN, not a plausible number.
    capped = sensitivity.equilibrium(system, solve=linsolve.cg(maxiter=2))
    dp = {k: jnp.zeros_like(v) for k, v in params.items()}
    dp["diameter"] = jnp.asarray([1.0, 0.0])
    assert bool(jnp.all(jnp.isnan(jax.jvp(lambda p: capped(q, p), (params,), (dp,))[1])))
    # (an uncapped CG gives a finite tangent: test_equilibrium_is_preconditioned_and_exact)


def test_moduli_solves_follow_the_solver_options(relaxed, monkeypatch):
    """Inside sensitivity.solving(...), the elastic moduli's solves come from
    solver_for with those options (they ignored --solver/--preconditioner)."""
    system, params, q, _ = relaxed
    calls = []
    real = sensitivity.solver_for

    def spy(*args, **kwargs):
        calls.append(args[4:])
        return real(*args, **kwargs)

    monkeypatch.setattr(sensitivity, "solver_for", spy)
    plain = float(observables.shear_modulus(system, q, params))
    assert calls == []
    with sensitivity.solving("dense", 1e-10, "none"):
        dense = float(observables.shear_modulus(system, q, params))
    assert calls and calls[0][0] == "dense"
    assert elasticity.SOLVE_AT.get() is None
    np.testing.assert_allclose(plain, dense, rtol=1e-8)


def test_forward_and_gradient_compile_once(relaxed):
    """A second call with new parameters, positions or rattlers of the same
    shapes reuses the compiled function."""
    system, params, q, rattler = relaxed
    observe = {"energy": observables.OBSERVABLES["energy"]}
    first = sensitivity.forward(system, q, params, "diameter", observe, rattler)
    moved = {**params, "epsilon": params["epsilon"] * 1.1}
    second = sensitivity.forward(system, q, moved, "diameter", observe, jnp.array(rattler))
    np.testing.assert_allclose(second.values["energy"], 1.1 * first.values["energy"], rtol=1e-9)
    fns = list(sensitivity._JITTED[system].values())
    assert len(fns) == 1 and fns[0]._cache_size() == 1
    sensitivity.gradient(system, q, params, observables.OBSERVABLES["energy"], rattler)
    sensitivity.gradient(system, q * 1.0, moved, observables.OBSERVABLES["energy"], rattler)
    assert len(sensitivity._JITTED[system]) == 2
    assert all(f._cache_size() == 1 for f in sensitivity._JITTED[system].values())
