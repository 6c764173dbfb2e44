"""A rattler pressed against a held neighbour carries no load.

FIRE leaves a rattler touching whatever last pushed it, with an overlap of ~ftol/k. Summed
into the Hessian, that contact pinned the rattler and acted on its held neighbour as a spring
to a fixed point: in a 2D polydisperse packing (N = 2500, φ = 0.86) a held particle's dx*/dD
came out 0.05 where re-relaxed finite differences (both one-sided ones alike) gave 0.49, and
dP/dD 10 % off. Every derivative now differentiates the held network (``System.held_only``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mdsens import observables, sensitivity, systems
from mdsens.observables import OBSERVABLES

OBSERVE = {"pressure": OBSERVABLES["pressure"]}


@pytest.fixture(scope="module")
def touching():
    """A relaxed 2D packing with one rattler (N = 64, φ = 0.86, seed 3), and the same packing
    with that rattler moved inside its cage until it overlaps its nearest held neighbour
    by 1e-11 σ, as FIRE leaves one; no other contact forms."""
    family = systems.get("bidisperse")
    system = family.build_fn(seed=3, **family.resolve({"n": "64", "dim": "2", "phi": "0.86"}))
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    q, info = sensitivity.relax(system, params, ftol=1e-12)
    assert bool(info.converged)
    rattler = np.asarray(observables.rattlers(system, q, params))
    assert rattler.sum() == 1, "the fixture expects one rattler"
    r = int(np.flatnonzero(rattler)[0])
    box = np.asarray(params["box"])
    x = np.asarray(system.to_real(q, params))
    diameter = np.asarray(params["diameter"])[np.asarray(system.species)]
    dr = x[r] - x
    dr -= box * np.round(dr / box)
    dist = np.linalg.norm(dr, axis=1)
    sigma = (diameter[r] + diameter) / 2
    gap = np.where(rattler, np.inf, dist / sigma - 1)
    h = int(np.argmin(gap))
    assert 0 < gap[h] < 0.05
    moved = x.copy()
    moved[r] = x[r] - dr[h] / dist[h] * (dist[h] - sigma[h] * (1 - 1e-11))
    q_touch = system.to_solver(jnp.asarray(moved), params)
    dr = moved[r] - moved
    dr -= box * np.round(dr / box)
    gaps = np.linalg.norm(dr, axis=1) / sigma - 1
    gaps[r] = np.inf
    assert gaps[h] < 0 and np.sort(gaps)[1] > 0  # one contact, with overlap 1e-11
    assert np.array_equal(np.asarray(observables.rattlers(system, q_touch, params)), rattler)
    return system, params, q, q_touch, jnp.asarray(rattler), h


def _forward(system, q, params, rattler, method, pairs=False):
    s = system.with_pairs(jnp.asarray(system.interacting_pairs(q, params, margin=0.2))) if pairs else system
    solve = sensitivity.solver_for(s, q, params, rattler, method)
    f = sensitivity.forward(s, q, params, "diameter", OBSERVE, rattler, solve, (0,))
    return np.asarray(f.values["position"]), float(f.values["pressure"])


def test_a_touching_rattler_does_not_pin_its_neighbour(touching):
    """Against re-relaxed central differences (the rattler free to move away)."""
    system, params, _, q_touch, rattler, h = touching
    held = ~np.asarray(rattler)
    fd = sensitivity.finite_difference(system, q_touch, params, "diameter", (0,), h=1e-6, observe=OBSERVE, stencil=2)
    scale = np.max(np.abs(fd["position"][held]))
    position, pressure = _forward(system, q_touch, params, rattler, "dense")
    assert np.max(np.abs(position[held] - fd["position"][held])) < 1e-6 * scale
    assert abs(pressure - fd["pressure"]) < 1e-6 * abs(fd["pressure"])
    # the neighbour itself, where the pinned contact did its harm (off by ~4 of 5.5)
    assert np.max(np.abs(position[h] - fd["position"][h])) < 1e-6 * scale


@pytest.mark.parametrize("method", ["sparse", "cg"])
def test_every_solver_differentiates_the_held_network(touching, method):
    """Moving a rattler inside its cage changes no derivative: the sparse factorization and
    CG (its preconditioner built on the same held network), on the neighbor-list pairs,
    give at the touching packing what the dense solve gives at the free one; so does the
    reverse mode, and the elastic moduli (whose Born term summed the touching contact too)."""
    system, params, q, q_touch, rattler, _ = touching
    held = ~np.asarray(rattler)
    free_position, free_pressure = _forward(system, q, params, rattler, "dense")
    position, pressure = _forward(system, q_touch, params, rattler, method, pairs=True)
    scale = np.max(np.abs(free_position[held]))
    assert np.max(np.abs(position[held] - free_position[held])) < 1e-6 * scale
    assert abs(pressure - free_pressure) < 1e-6 * abs(free_pressure)
    s = system.with_pairs(jnp.asarray(system.interacting_pairs(q_touch, params, margin=0.2)))
    solve = sensitivity.solver_for(s, q_touch, params, rattler, method)
    grad, _ = sensitivity.gradient(s, q_touch, params, OBSERVABLES["pressure"], rattler, solve)
    assert abs(float(grad["diameter"][0]) - free_pressure) < 1e-6 * abs(free_pressure)


def test_moduli_and_equilibrium_see_the_held_network(touching):
    system, params, q, q_touch, rattler, _ = touching
    bulk = OBSERVABLES["bulk_modulus"]
    free, pressed = float(bulk(system, q, params)), float(bulk(system, q_touch, params))
    assert abs(pressed - free) < 1e-8 * abs(free)
    # the library's differentiable relaxation, from the touching state (one force evaluation)
    solver = sensitivity.equilibrium(system, ftol=1e-10, solve=None)
    tangent = {k: jnp.zeros_like(v) for k, v in params.items()}
    tangent["diameter"] = tangent["diameter"].at[0].set(1.0)
    _, dq = jax.jvp(lambda p: solver(q_touch, p), (params,), (tangent,))
    free_position, _ = _forward(system, q, params, rattler, "dense")
    dx = np.asarray(jax.jvp(system.to_real, (q_touch, params), (dq, tangent))[1])
    held = ~np.asarray(rattler)
    # equilibrium's gauge keeps the held particles' centre of mass, like the forward solve
    assert np.max(np.abs(dx[held] - free_position[held])) < 1e-6 * np.max(np.abs(free_position[held]))


def test_cg_newton_polish_matches_the_dense_one(touching, monkeypatch):
    """Above N·d = DENSE_POLISH_LIMIT the finite differences' Newton steps solve by CG
    (what lets `mdsens check` take 3D files up to N = 4096): the same differences."""
    system, params, _, q_touch, _, _ = touching
    dense = sensitivity.finite_difference(system, q_touch, params, "diameter", (1,), h=1e-6, observe=OBSERVE)
    monkeypatch.setattr(sensitivity, "DENSE_POLISH_LIMIT", 0)
    cg = sensitivity.finite_difference(system, q_touch, params, "diameter", (1,), h=1e-6, observe=OBSERVE)
    for key in dense:
        scale = np.max(np.abs(dense[key]))
        assert np.max(np.abs(cg[key] - dense[key])) < 1e-7 * scale, key


def test_host_coverage_test_gives_the_same_differences(touching, monkeypatch):
    """From HOST_COVERAGE_N particles the polish asks a k-d tree whether its state gained a
    pair (missing_pairs is O(N²)): the same differences."""
    system, params, _, q_touch, _, _ = touching
    before = sensitivity.finite_difference(system, q_touch, params, "diameter", (0,), h=1e-6, observe=OBSERVE)
    monkeypatch.setattr(sensitivity, "HOST_COVERAGE_N", 0)
    calls = []
    original = system.interacting_pairs
    monkeypatch.setattr(type(system), "interacting_pairs",
                        lambda self, *a, **k: calls.append(a) or original(*a, **k))
    after = sensitivity.finite_difference(system, q_touch, params, "diameter", (0,), h=1e-6, observe=OBSERVE)
    assert any(a[-1] == 0.0 for a in calls)  # the coverage test ran on the host
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
