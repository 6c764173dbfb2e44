"""Neighbor-list energies agree with all pairs at one shared x*; overflow reallocates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import neighbors, observables, sensitivity, systems
from mdsens.job import Job, execute

from helpers import relaxed, relative_error


def _shared(n=96, phi=0.9):
    system, q, params, rattler = relaxed("bidisperse", n=n, dim=2, phi=phi)
    nbrs = neighbors.build(system, system.to_real(q, params), params)
    return system, system.with_pairs(nbrs.idx), q, params, rattler


def test_energy_forces_observables_agree_at_shared_minimum():
    # Same pairs, different summation order: agreement to round-off (1e-10 is
    # the bar; the observed differences are ~1e-15).
    system, listed, q, params, rattler = _shared()
    for fn in (observables.energy, observables.pressure):
        assert abs(float(fn(system, q, params)) - float(fn(listed, q, params))) <= 1e-10 * abs(float(fn(system, q, params)))
    g_all, g_nl = jax.grad(system.energy)(q, params), jax.grad(listed.energy)(q, params)
    assert float(jnp.max(jnp.abs(g_all - g_nl))) < 1e-10
    assert np.array_equal(np.asarray(observables.rattlers(listed, q, params)), np.asarray(rattler))


def test_derivatives_agree_at_shared_minimum():
    # The Hessian-vector products differ only in round-off, so the CG solves agree
    # to about their tolerance (rtol 1e-12 here); checked at 1e-10.
    system, listed, q, params, rattler = _shared()
    solve = sensitivity.linsolve.cg(rtol=1e-12)
    observe = {"pressure": observables.pressure}
    a = sensitivity.forward(system, q, params, "diameter", observe, rattler, solve)
    b = sensitivity.forward(listed, q, params, "diameter", observe, rattler, solve)
    assert relative_error(b.values["position"], a.values["position"]) < 1e-10
    assert relative_error(b.values["pressure"], a.values["pressure"]) < 1e-10
    ga, _ = sensitivity.gradient(system, q, params, observables.pressure, rattler, solve)
    gb, _ = sensitivity.gradient(listed, q, params, observables.pressure, rattler, solve)
    assert relative_error(gb["diameter"], ga["diameter"]) < 1e-10


def test_overflow_is_detected_and_reallocated():
    system = systems.get("bidisperse").build(n=256, dim=2, phi=0.9)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    fns = neighbors.neighbor_fns(system, params)
    x0 = jnp.asarray(system.positions)
    nbrs = fns.allocate(x0)
    # A list too small for a denser configuration: jax-md flags it (a uint8 bitmask).
    squeezed = fns.update(x0 * 0.5, nbrs)
    assert neighbors.overflowed(squeezed)
    bigger = neighbors.allocate(fns, x0 * 0.5)
    assert not neighbors.overflowed(bigger) and bigger.idx.shape[1] > nbrs.idx.shape[1]


def test_relax_recovers_from_a_too_small_list(monkeypatch):
    # Start from a list with almost no room: the chunk must be redone on a bigger one.
    system = systems.get("bidisperse").build(n=128, dim=2, phi=0.9)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    real = neighbors.neighbor_fns

    def tight(*args, **kwargs):
        kwargs["capacity_multiplier"] = 0.3
        return real(*args, **kwargs)

    monkeypatch.setattr(neighbors, "neighbor_fns", tight)
    original, first = neighbors.allocate, []

    def allocate(fns, x, extra=0, attempts=8):
        if not first:  # the initial list: as allocated, overflowing (capacity 0.3× the need)
            first.append(True)
            return fns.allocate(x)
        return original(fns, x, extra, attempts)

    monkeypatch.setattr(neighbors, "allocate", allocate)
    x, info, _, nbrs, stats = neighbors.relax(system, jnp.asarray(system.positions), params, chunk=200)
    assert bool(info.converged)
    assert stats.reallocations >= 1
    assert not neighbors.overflowed(nbrs)


def test_job_neighbor_list_path_runs():
    result = execute(Job(overrides={"n": "64"}, neighbor_list=True, wrt=["diameter[1]"]))
    assert result.converged and result.meta["neighbor_list"]["used"]
    assert np.all(np.isfinite(np.asarray(result.sensitivity["diameter[1]"].values["position"])))
