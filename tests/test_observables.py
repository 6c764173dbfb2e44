"""Observables: stress, energy per particle, contact number, rattler fraction and
the elastic moduli (against jax-md's independent implementation, against
relaxation under an imposed strain, and their θ-derivatives — second-order
implicit derivatives — against finite differences, forward and reverse)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_md import elasticity as jmd_elasticity

from helpers import Reference, assert_close, relaxed, unit
from mdsens import elasticity, observables, sensitivity

POLY_2D = dict(n=32, dim=2, phi=0.9, spread=0.2)  # same key as test_systems: relaxed once
POLY_3D = dict(n=32, dim=3, phi=0.7, spread=0.2)
MODULI = {
    "elastic_tensor": observables.elastic_tensor,
    "bulk_modulus": observables.bulk_modulus,
    "shear_modulus": observables.shear_modulus,
}


def test_registry_names():
    assert {"energy", "energy_per_particle", "pressure", "stress", "contact_number", "rattler_fraction",
            "elastic_tensor", "bulk_modulus", "shear_modulus"} <= set(observables.OBSERVABLES)


def test_stress_pressure_energy_per_particle():
    system, q, params, _ = relaxed("polydisperse", **POLY_2D)
    sigma = observables.stress(system, q, params)
    assert sigma.shape == (2, 2)
    # Both are one autodiff pass over the same pair sum: round-off only.
    assert_close(sigma, sigma.T, rtol=1e-12)
    assert_close(-jnp.trace(sigma) / 2, observables.pressure(system, q, params), rtol=1e-12)
    assert_close(observables.energy_per_particle(system, q, params),
                 observables.energy(system, q, params) / system.n, rtol=1e-14)


def test_contact_number_and_rattler_fraction_from_numpy():
    system, q, params, rattler = relaxed("polydisperse", **POLY_2D)
    x = np.asarray(system.to_real(q, params))
    box = np.asarray(params["box"])
    d = np.asarray(params["diameter"])
    delta = x[:, None] - x[None]
    delta -= box * np.round(delta / box)
    r = np.sqrt(np.sum(delta**2, -1))
    touching = (r < 0.5 * (d[:, None] + d[None])) & ~np.eye(system.n, dtype=bool)
    held = ~np.asarray(rattler)
    z = np.sum(touching[np.ix_(held, held)]) / np.sum(held)
    assert float(observables.contact_number(system, q, params)) == pytest.approx(z, rel=1e-14)
    assert float(observables.rattler_fraction(system, q, params)) == pytest.approx(np.mean(~held))
    lj, q_lj, p_lj, _ = relaxed("lj_crystal", dim=2, cells=4, vacancies=1, onset=1.8, cutoff=2.2)
    with pytest.raises(ValueError, match="contact rule"):
        observables.contact_number(lj, q_lj, p_lj)
    assert float(observables.rattler_fraction(lj, q_lj, p_lj)) == 0.0


def _jax_md_moduli(system, q, params):
    dim = system.dim

    def energy(R, perturbation=None, **kwargs):
        strain = None if perturbation is None else perturbation - jnp.eye(dim)
        return system.energy(R, params, strain=strain)

    # jax-md's volume for a scalar box is box**dim: pass the cube with our volume.
    side = system.volume(params) ** (1.0 / dim)
    # jax-md's function runs op by op unless jitted: one compiled program (same operations).
    c, converged = jax.jit(jmd_elasticity.athermal_moduli(energy, cg_tol=1e-12, check_convergence=True))(q, side)
    assert bool(converged)
    return c


@pytest.mark.parametrize("dim", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_elastic_tensor_matches_jax_md(dim):
    system, q, params, _ = relaxed("polydisperse", **(POLY_2D if dim == 2 else POLY_3D))
    c = jax.jit(lambda q_, p_: observables.elastic_tensor(system, q_, p_))(q, params)
    assert c.shape == (dim,) * 4
    # Minor and major symmetries (exact by construction).
    assert_close(c, jnp.transpose(c, (1, 0, 2, 3)), rtol=1e-14)
    assert_close(c, jnp.transpose(c, (2, 3, 0, 1)), rtol=1e-14)
    # jax-md solves (H + 1e-10 I) u = Ξ with its own CG at tol 1e-12: the tether
    # shifts C by ~1e-10 relative, the two CG tolerances by less.
    assert_close(c, _jax_md_moduli(system, q, params), rtol=1e-8)
    iso = jmd_elasticity.extract_isotropic_moduli(c)
    assert_close(elasticity.bulk_modulus_of(c), iso["B"], rtol=1e-13)
    assert_close(elasticity.shear_modulus_of(c), iso["G"], rtol=1e-13)


def test_strain_response_against_relaxation_under_strain():
    """R_kl = d²E/dγ_k dγ_l of the relaxed system, by re-relaxing (Newton) under
    the strain ±h S_l and differencing ∂E/∂γ_k (envelope theorem): the
    non-affine part comes from actual relaxation, not from a linear solve."""
    system, q, params, rattler = relaxed("polydisperse", **POLY_2D)
    basis = jnp.asarray(elasticity.strain_basis(2)[0])
    project = sensitivity.gauge_for(system, rattler)(q, params)
    n = q.size
    projector = jax.vmap(lambda e: project(e.reshape(q.shape)).ravel())(jnp.eye(n)).T

    def energy(q_, gamma):
        return system.energy(q_, params, strain=jnp.tensordot(gamma, basis, axes=1))

    @jax.jit
    def strain_force_relaxed(gamma):
        def step(_, qk):
            g = jax.grad(energy)(qk, gamma).ravel()
            h = jax.hessian(lambda y: energy(y.reshape(q.shape), gamma))(qk.ravel())
            m = projector @ h @ projector + jnp.eye(n) - projector
            return qk + jnp.linalg.solve(m, -projector @ g).reshape(q.shape)

        q_gamma = jax.lax.fori_loop(0, 6, step, q)
        return jax.grad(energy, argnums=1)(q_gamma, gamma)

    h = 1e-5
    eye = jnp.eye(basis.shape[0])
    fd = jnp.stack([(strain_force_relaxed(h * e) - strain_force_relaxed(-h * e)) / (2 * h) for e in eye], axis=1)
    # compiled, not op by op
    response, born = jax.jit(lambda q_, r_: (elasticity.strain_response(system, q_, params, r_),
                                             jax.hessian(lambda g: energy(q_, g))(jnp.zeros(basis.shape[0]))))(
        q, rattler)
    # Central differences, h = 1e-5: O(h²) truncation and 1e-16/h round-off on
    # ∂E/∂γ ~ 1: ~1e-10 relative; 1e-7 leaves margin for the softest modes.
    assert_close(response, fd, rtol=1e-7)
    # The non-affine relaxation matters: it lowers the affine (Born) response.
    assert np.all(np.diag(np.asarray(born - response)) > 0)


@pytest.fixture(scope="module")
def poly2d():
    system, q, params, rattler = relaxed("polydisperse", **POLY_2D)
    return system, q, params, rattler, Reference(system, q, params, rattler)


@pytest.mark.parametrize("name", ["alpha", pytest.param("box", marks=pytest.mark.slow)])
def test_moduli_forward_derivative_against_finite_differences(poly2d, name):
    """dC/dθ, dB/dθ, dG/dθ: jax.jvp through the equilibrium's tangent solve and
    the moduli's d(d+1)/2 solves (a second-order implicit derivative)."""
    system, q, params, rattler, reference = poly2d
    result = sensitivity.forward(system, q, params, name, MODULI, rattler)
    index = () if params[name].ndim == 0 else (1,)
    fd = reference.directional(unit(params, name, index), observe=MODULI)
    for key in MODULI:
        # C carries CG error (rtol 1e-10) amplified by 1/(2h) in the FD:
        # ~1e-5 at worst, measured ~3e-9; 1e-5 is the bound.
        assert_close(result.values[key][index], fd[key], rtol=1e-5, what=f"d{key}/d{name}")


def test_moduli_reverse_gradient_against_finite_differences(poly2d):
    """∂G/∂D_i for all N diameters (and every other parameter) in one reverse
    pass through both solves, checked along a random direction."""
    system, q, params, rattler, reference = poly2d
    grad, info = sensitivity.gradient(system, q, params, observables.shear_modulus, rattler)
    assert grad["diameter"].shape == (system.n,)
    rng = np.random.default_rng(2)
    direction = {k: jnp.asarray(rng.normal(size=np.shape(v))) for k, v in params.items()}
    predicted = sum(float(jnp.sum(grad[k] * direction[k])) for k in params)
    # observe=MODULI: the differences' compiled program of the forward test above (G is one of its outputs)
    expected = reference.directional(direction, observe=MODULI)["shear_modulus"]
    # Same error budget as the forward moduli test.
    assert_close(predicted, expected, rtol=1e-5)


@pytest.mark.slow
def test_moduli_derivative_3d_against_finite_differences():
    system, q, params, rattler = relaxed("polydisperse", **POLY_3D)
    reference = Reference(system, q, params, rattler)
    result = sensitivity.forward(system, q, params, "alpha", MODULI, rattler)
    fd = reference.directional(unit(params, "alpha"), observe=MODULI)
    for key in MODULI:
        # As in 2D.
        assert_close(result.values[key], fd[key], rtol=1e-5, what=f"d{key}/dα (3D)")
