"""Regression against data/bidisperse_reference.npz: derivatives by central
finite differences of an independent NumPy implementation (analytic forces,
Hessian and virial pressure, Newton re-solves); see data/make_reference.py."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import linsolve, observables, sensitivity, systems
from helpers import relative_error

DATA = Path(__file__).resolve().parents[1] / "data" / "bidisperse_reference.npz"


@pytest.fixture(scope="module")
def reference():
    ref = dict(np.load(DATA))
    system = systems.get("bidisperse").build(seed=int(ref["seed"]), n=int(ref["n"]), dim=int(ref["dim"]),
                                             phi=float(ref["phi"]))
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    np.testing.assert_allclose(params["box"], ref["box"], rtol=1e-14)
    q = jnp.asarray(ref["positions"] / ref["box"])
    return ref, system, q, params


def test_state_matches_reference(reference):
    ref, system, q, params = reference
    # The stored state is a Newton-converged minimum: the engine's own force
    # and energy must agree with the independent implementation to round-off.
    assert float(observables.max_force(system, q, params)) < 1e-12
    assert float(observables.energy(system, q, params)) == pytest.approx(float(ref["energy"]), rel=1e-12)
    # Pressure from the box derivative of E vs the virial sum: two formulas.
    assert float(observables.pressure(system, q, params)) == pytest.approx(float(ref["pressure"]), rel=1e-12)


@pytest.mark.parametrize("solver", ["cg", "dense"])
@pytest.mark.parametrize("name,index", [("diameter", (0,)), ("diameter", (1,)), ("epsilon", None), ("alpha", None)])
def test_forward_matches_reference(reference, name, index, solver):
    ref, system, q, params = reference
    rattler = observables.rattlers(system, q, params)
    assert not bool(rattler.any())
    solve = linsolve.cg() if solver == "cg" else linsolve.dense()
    fw = sensitivity.forward(system, q, params, name, {"energy": observables.energy,
                                                      "pressure": observables.pressure},
                             rattler, solve, index=index)
    key = name if index is None else f"{name}{index[0]}"
    # FD with h = 1e-5 on Newton-exact equilibria: truncation ~h² ≈ 1e-10,
    # round-off ~1e-16/h ≈ 1e-11; 1e-7 leaves margin for conditioning.
    dx_ref = ref[f"d_position_d_{key}"]
    if np.max(np.abs(dx_ref)) == 0:  # ε only rescales E: positions do not move
        assert float(jnp.max(jnp.abs(fw.values["position"]))) < 1e-9
    else:
        assert relative_error(fw.values["position"], dx_ref) < 1e-7
    assert float(fw.values["energy"]) == pytest.approx(float(ref[f"d_energy_d_{key}"]), rel=1e-7)
    assert float(fw.values["pressure"]) == pytest.approx(float(ref[f"d_pressure_d_{key}"]), rel=1e-7)
