"""Cases with answers in closed form: a perfect triangular crystal of harmonic
soft disks, the Morse dimer, and the rotational gauge of a free cluster."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close
from mdsens import observables, sensitivity, systems
from mdsens.system import System
from mdsens.systems import _lattice
from mdsens.systems.bidisperse import soft_sphere_pair

CELLS, SPACING, SIGMA, EPSILON = 4, 0.9, 1.0, 1.0  # a < σ < √3 a: six overlapping neighbours


def triangular_crystal() -> System:
    positions, box = _lattice.triangular(CELLS, SPACING)
    n = len(positions)
    pair, contact = soft_sphere_pair(np.zeros(n, dtype=int))
    params = {"diameter": jnp.asarray([SIGMA]), "epsilon": jnp.asarray(EPSILON), "alpha": jnp.asarray(2.0),
              "box": jnp.asarray(box)}
    return System("crystal", positions, np.zeros(n, np.int32), params, pair,
                  cutoff=lambda p: jnp.max(p["diameter"]), contact=contact)


def crystal_energy_per_particle(lx, ly, sigma):
    """Closed form for the affinely stretched crystal (every site stays a centre
    of inversion, hence in equilibrium): one bond (a_x, 0) and two bonds
    (a_x/2, a_y) per particle, a_x = L_x/cells, a_y = L_y/(2 cells);
    harmonic pair energy (ε/2)(1 − ℓ/σ)²."""
    ax, ay = lx / CELLS, ly / (2 * CELLS)
    l1, l2 = ax, jnp.sqrt(ax**2 / 4 + ay**2)
    return 0.5 * EPSILON * ((1 - l1 / sigma) ** 2 + 2 * (1 - l2 / sigma) ** 2)


@pytest.fixture(scope="module")
def crystal():
    system = triangular_crystal()
    params = dict(system.params)
    q, info = sensitivity.relax(system, ftol=1e-12)
    assert bool(info.converged)
    return system, q, params, observables.rattlers(system, q, params)


def test_triangular_crystal_energy_pressure_contacts(crystal):
    system, q, params, _ = crystal
    a, s, e = SPACING, SIGMA, EPSILON
    # Six bonds of length a per particle, each shared by two: E/N = 3(ε/2)(1 − a/σ)².
    # Pressure from the virial, P = (1/(2V)) Σ_bonds r f(r) with f = (ε/σ)(1 − r/σ)
    # and V/N = (√3/2)a²:  P = √3 ε (1 − a/σ) / (σ a).
    energy_per_particle = 1.5 * e * (1 - a / s) ** 2
    pressure = math.sqrt(3) * e * (1 - a / s) / (s * a)
    # Round-off on sums of N = 32 terms.
    assert_close(observables.energy_per_particle(system, q, params), energy_per_particle, rtol=1e-12)
    assert_close(observables.pressure(system, q, params), pressure, rtol=1e-12)
    assert float(observables.contact_number(system, q, params)) == 6.0
    assert float(observables.rattler_fraction(system, q, params)) == 0.0
    # The stress is isotropic: σ = −P I.
    assert_close(observables.stress(system, q, params), -pressure * jnp.eye(2), rtol=1e-12)


def test_triangular_crystal_pressure_derivative_in_sigma(crystal):
    system, q, params, rattler = crystal
    a, s, e = SPACING, SIGMA, EPSILON
    # P(σ) at fixed box = √3 ε (1/(σa) − 1/σ²):  dP/dσ = √3 ε (2/σ³ − 1/(σ² a)).
    dp_dsigma = math.sqrt(3) * e * (2 / s**3 - 1 / (s**2 * a))
    # E/N = (3ε/2)(1 − a/σ)²:  d(E/N)/dσ = 3ε (1 − a/σ) a/σ².
    de_dsigma = 3 * e * (1 - a / s) * a / s**2
    observe = {"pressure": observables.pressure, "energy_per_particle": observables.energy_per_particle}
    result = sensitivity.forward(system, q, params, "diameter", observe, rattler)
    # The lattice does not move (every site is a centre of symmetry): the
    # right-hand side vanishes and CG returns zero; round-off only.
    assert_close(result.values["position"], 0.0, rtol=0, atol=1e-12)
    assert_close(result.values["pressure"][0], dp_dsigma, rtol=1e-10)
    assert_close(result.values["energy_per_particle"][0], de_dsigma, rtol=1e-10)


def test_triangular_crystal_box_derivatives_are_affine(crystal):
    """∂x*/∂L_k = q_k e_k exactly (the crystal stretches affinely), and
    dE/dL, dP/dL from the closed form E(L_x, L_y)."""
    system, q, params, rattler = crystal
    observe = {"energy": observables.energy, "pressure": observables.pressure}
    result = sensitivity.forward(system, q, params, "box", observe, rattler)
    n = system.n

    def energy(box):
        return n * crystal_energy_per_particle(box[0], box[1], SIGMA)

    def pressure(box):
        # P = −(Σ_k L_k ∂E/∂L_k) / (d V): the dilation derivative of the closed form.
        return -jnp.sum(box * jax.grad(energy)(box)) / (2 * jnp.prod(box))

    box = params["box"]
    for k in range(2):
        affine = jnp.zeros_like(q).at[:, k].set(q[:, k])
        # Round-off: the non-affine part is a zero right-hand side.
        assert_close(result.values["position"][k], affine, rtol=1e-12, atol=1e-12)
    assert_close(result.values["energy"], jax.grad(energy)(box), rtol=1e-10)
    assert_close(result.values["pressure"], jax.grad(pressure)(box), rtol=1e-10)


def morse_relaxed(dim, n, sigma=1.0, alpha=6.0):
    system = systems.get("morse_cluster").build(n=n, dim=dim, alpha=alpha)
    # The start is laid out at spacing 1; scale it to σ (a start far inside the
    # stiff Morse core would shoot the atoms out of each other's range).
    system = dataclasses.replace(system, positions=system.positions * sigma)
    params = {**system.params, "sigma": jnp.asarray(sigma)}
    q, info = sensitivity.relax(system, params, ftol=1e-12)
    assert bool(info.converged)
    return system, q, params, observables.rattlers(system, q, params)


def distance(system, q, params):
    return jnp.linalg.norm(q[0] - q[1])


@pytest.mark.parametrize("dim", [2, 3])
def test_morse_dimer(dim):
    sigma = 1.3
    system, q, params, rattler = morse_relaxed(dim, 2, sigma=sigma)
    # FIRE to max|F| < 1e-12 with stiffness 2εα² = 72: |r − σ| < 1e-12/72.
    assert float(distance(system, q, params)) == pytest.approx(sigma, abs=1e-12)
    observe = {"distance": distance, "energy": observables.energy}
    d_sigma = sensitivity.forward(system, q, params, "sigma", observe, rattler).values
    d_alpha = sensitivity.forward(system, q, params, "alpha", observe, rattler).values
    d_epsilon = sensitivity.forward(system, q, params, "epsilon", observe, rattler).values
    # d(distance)/dσ = 1 and dE/dσ = 0 exactly; the width does not move the
    # minimum; E = −ε at the minimum. Tolerances: one CG solve at rtol 1e-10
    # and the 1e-12/72 offset of the relaxed distance.
    assert float(d_sigma["distance"]) == pytest.approx(1.0, abs=1e-9)
    assert float(d_sigma["energy"]) == pytest.approx(0.0, abs=1e-9)
    assert float(d_alpha["distance"]) == pytest.approx(0.0, abs=1e-9)
    assert float(d_epsilon["energy"]) == pytest.approx(-1.0, abs=1e-12)
    # The two atoms move apart symmetrically, along the bond.
    u = np.asarray(d_sigma["position"])
    bond = np.asarray(q[0] - q[1]) / sigma
    np.testing.assert_allclose(u[0], 0.5 * bond, atol=1e-9)
    np.testing.assert_allclose(u[1], -0.5 * bond, atol=1e-9)


@pytest.mark.parametrize("dim, n, modes", [(2, 7, 3), (3, 13, 6)])
def test_free_cluster_gauge_removes_rigid_motions(dim, n, modes):
    system, q, params, rattler = morse_relaxed(dim, n)
    # The Hessian has exactly the rigid-body zero modes: 3 in 2D, 6 in 3D.
    h = jax.hessian(lambda y: system.energy(y.reshape(q.shape), params))(q.ravel())
    eigenvalues = np.linalg.eigvalsh(np.asarray(h))
    scale = np.max(np.abs(eigenvalues))
    assert np.sum(np.abs(eigenvalues) < 1e-8 * scale) == modes
    u = np.asarray(sensitivity.forward(system, q, params, "alpha", {}, rattler).values["position"])
    assert np.max(np.abs(u)) > 1e-3  # a real response, not a trivial zero
    x = np.asarray(q) - np.asarray(q).mean(axis=0)
    # No net translation and no net rotation: Σ u_i = 0 and Σ (x_i − x̄) × u_i = 0,
    # to round-off of the projector (QR on O(N) vectors).
    np.testing.assert_allclose(u.sum(axis=0), 0.0, atol=1e-12)
    if dim == 2:
        torque = np.sum(x[:, 0] * u[:, 1] - x[:, 1] * u[:, 0])
    else:
        torque = np.cross(x, u).sum(axis=0)
    np.testing.assert_allclose(torque, 0.0, atol=1e-12)
