"""Fixed pressure (mdsens.barostat): the relaxed state, its implicit derivatives
against central differences of an independently written enthalpy, the
triangular crystal in closed form, and the bad-input exits.

The reference here shares no code with the engine's fixed-pressure path: the
enthalpy is written from scratch (all pairs, harmonic spheres, the cell as
``exp(U) diag(L₀)`` by a plain power series, its own box-dof
parametrisation), and the re-minimisation at ``θ ± h`` is a Newton iteration
(pseudo-inverse steps) started from the engine's relaxed state.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from mdsens import barostat, gauge, linsolve, observables, relax
from mdsens.cli import app
from mdsens.systems import UsageError, get

runner = CliRunner()
PRESSURE = 0.01


# -- the independent reference ------------------------------------------------------


def _symmetric(values, dim, box_dof):
    """The test's own box-dof parametrisation of the log-strain."""
    if box_dof == "iso":
        return values[0] * jnp.eye(dim)
    if box_dof == "aniso":
        return jnp.diag(values)
    upper = jnp.zeros((dim, dim)).at[jnp.triu_indices(dim)].set(values)
    return upper + jnp.triu(upper, 1).T


def _n_dof(dim, box_dof):
    return {"iso": 1, "aniso": dim, "shear": dim * (dim + 1) // 2}[box_dof]


def _reference_enthalpy(system, box_dof):
    """H(z, θ) for bidisperse harmonic spheres, z = (q.ravel(), box-dof values)."""
    n, dim = system.n, system.dim
    species = jnp.asarray(system.species)
    off_diagonal = ~np.eye(n, dtype=bool)

    def cell(z, theta):
        u = _symmetric(z[n * dim:], dim, box_dof)
        if box_dof == "shear":
            # The plain power series (no scaling and squaring, unlike the engine's);
            # |U| < 0.5 here, so 20 terms are exact to round-off.
            # (A loop, not 20 unrolled products: the same sums, and the Newton
            # re-minimisation's Hessian compiles in a fraction of the time.)
            def add_term(k, carry):
                deformation, term = carry
                term = term @ u / k
                return deformation + term, term

            deformation, _ = jax.lax.fori_loop(1, 21, add_term, (jnp.eye(dim), jnp.eye(dim)))
        else:
            deformation = jnp.diag(jnp.exp(jnp.diagonal(u)))
        return deformation @ jnp.diag(theta["box"])  # columns: the edge vectors

    def enthalpy(z, theta):
        q = z[:n * dim].reshape(n, dim)
        h = cell(z, theta)
        dq = q[:, None, :] - q[None, :, :]
        r_vec = (dq - jnp.round(dq)) @ h.T
        r2 = jnp.sum(r_vec**2, axis=-1)
        r = jnp.sqrt(jnp.where(off_diagonal, r2, 1.0))
        diameter = theta["diameter"][species]
        sigma = 0.5 * (diameter[:, None] + diameter[None, :])
        overlap = jnp.where(off_diagonal & (r < sigma), 1.0 - r / sigma, 0.0)
        energy = 0.5 * jnp.sum(theta["epsilon"] / theta["alpha"] * overlap**theta["alpha"])
        return energy + theta["pressure"] * jnp.abs(jnp.linalg.det(h)), energy

    return enthalpy, cell


class Reference:
    """Central differences of the test's enthalpy minimum at θ ± h, re-minimised
    by Newton steps from the engine's relaxed state."""

    def __init__(self, system, q, params, rattler):
        self.system, self.n, self.dim = system, system.n, system.dim
        self.enthalpy, self.cell = _reference_enthalpy(system, system.box_dof)
        self.project_q = gauge.translations(rattler)
        theta = {k: jnp.asarray(v) for k, v in params.items() if k != "strain"}
        strain = np.asarray(params["strain"])
        if system.box_dof == "shear":
            values = strain[np.triu_indices(self.dim)]
        elif system.box_dof == "aniso":
            values = np.diag(strain)
        else:
            values = strain[:1, 0]
        self.z = jnp.concatenate([q.ravel(), jnp.asarray(values)])
        self.theta = theta
        grad = jax.grad(lambda z, t: self.enthalpy(z, t)[0])
        hessian = jax.jacfwd(grad)
        # Newton in the gauge: M = P A P + (I − P), P the dense projector that removes
        # the held particles' mean and the rattlers from the q part.
        size = self.z.size
        held = np.repeat(~np.asarray(rattler), self.dim).astype(float)
        count = held.sum() / self.dim
        p = np.diag(np.concatenate([held, np.ones(size - held.size)]))
        for k in range(self.dim):
            mode = np.zeros(size)
            mode[k:held.size:self.dim] = held[k::self.dim] / np.sqrt(count)
            p -= np.outer(mode, mode)
        p = jnp.asarray(p)

        def newton(z, t):
            def step(_, zk):
                m = p @ hessian(zk, t) @ p + (jnp.eye(size) - p)
                return zk - jnp.linalg.solve(m, p @ grad(zk, t))
            return jax.lax.fori_loop(0, 6, step, z)

        self.newton = jax.jit(newton)
        self.grad = jax.jit(grad)
        self._derivatives = {}

    def observe(self, z, theta):
        n, dim = self.n, self.dim
        h = self.cell(z, theta)
        q = z[:n * dim].reshape(n, dim)
        enthalpy, energy = self.enthalpy(z, theta)
        diameter = theta["diameter"][jnp.asarray(self.system.species)]
        each = math.pi * (diameter / 2) ** 2 if dim == 2 else math.pi / 6 * diameter**3
        volume = jnp.abs(jnp.linalg.det(h))
        return {"position": q @ h.T, "cell": h.T, "energy": energy, "enthalpy": enthalpy,
                "packing_fraction": jnp.sum(each) / volume, "volume": volume}

    def derivative(self, name, index, h=1e-5):
        key = (name, tuple(index), h)
        if key not in self._derivatives:  # the same difference asked again (another test): computed once
            self._derivatives[key] = self._derivative(name, index, h)
        return self._derivatives[key]

    def _derivative(self, name, index, h):
        out = []
        for sign in (1.0, -1.0):
            theta = dict(self.theta)
            theta[name] = theta[name].at[index].add(sign * h)
            z = self.newton(self.z, theta)
            assert float(jnp.max(jnp.abs(self.grad(z, theta)))) < 1e-11  # a minimum again, same basin
            out.append((z, theta))
        (zp, tp), (zm, tm) = out
        n, dim = self.n, self.dim
        dq = (zp - zm)[:n * dim].reshape(n, dim)
        dq = dq - jnp.round(dq)
        # The implicit derivative's gauge: held particles' mean fixed, rattlers still.
        dq = self.project_q(dq)
        zp = zp.at[:n * dim].set(self.z[:n * dim] + 0.5 * dq.ravel())
        zm = zm.at[:n * dim].set(self.z[:n * dim] - 0.5 * dq.ravel())
        plus, minus = self.observe(zp, tp), self.observe(zm, tm)
        return {k: np.asarray((plus[k] - minus[k]) / (2 * h)) for k in plus}


# -- relaxed states ----------------------------------------------------------------

CASES = [
    pytest.param(2, "shear", 24, id="2d-shear"),
    pytest.param(2, "iso", 24, id="2d-iso", marks=pytest.mark.slow),
    pytest.param(2, "aniso", 24, id="2d-aniso", marks=pytest.mark.slow),
    pytest.param(3, "shear", 32, id="3d-shear", marks=pytest.mark.slow),
]
#: the fast case differentiates forward in P only (diameters in reverse mode); the slow ones in both
FAST = (2, "shear", 24)


_RELAXED = {}


def relaxed(dim, box_dof, n):
    key = (dim, box_dof, n)
    if key not in _RELAXED:
        system = get("bidisperse").build(n=n, dim=dim, pressure=PRESSURE, box_dof=box_dof)
        out = barostat.relax(system, ftol=1e-12, max_steps=200_000)
        assert bool(out.info.converged), out.info
        q, params = out.q, out.params
        _RELAXED[key] = (system, q, params, observables.rattlers(system, q, params))
    return _RELAXED[key]


_REFERENCES = {}


def reference_for(dim, box_dof, n):
    """One :class:`Reference` per relaxed state and process: its Newton program is
    traced once, and a difference that two tests take is computed once."""
    key = (dim, box_dof, n)
    if key not in _REFERENCES:
        _REFERENCES[key] = Reference(*relaxed(dim, box_dof, n))
    return _REFERENCES[key]


OBSERVE = {k: observables.OBSERVABLES[k] for k in ("cell", "energy", "enthalpy", "packing_fraction", "volume")}


def _h(name):
    # Near jamming the equilibrium is strongly curved in θ: the O(h²) error of
    # h = 1e-5 was 1e-6 relative in P (= 0.01) and 3e-6 in dE/dD (3D), of
    # h = 1e-6 in P 1e-8 and of h = 2e-6 in D 2e-7 (measured); round-off at
    # these steps is ~1e-10 relative (Newton converges to ~1e-15).
    return 1e-6 if name == "pressure" else 2e-6


def _compare(got, expected, what):
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    # Newton re-minimisation to round-off: the differences are good to ~1e-8
    # relative (see _h); 1e-6 is the requirement.
    assert float(np.max(np.abs(np.asarray(got) - expected))) / scale < 1e-6, (what, got, expected)


@pytest.mark.parametrize("dim, box_dof, n", CASES)
def test_forward_and_reverse_match_central_differences(dim, box_dof, n):
    """Forward mode in P (positions, cell, φ, E, H, V; in the slow cases also in
    both diameters), reverse mode of φ in every parameter, against differences."""
    system, q, params, rattler = relaxed(dim, box_dof, n)
    reference = reference_for(dim, box_dof, n)
    solve = linsolve.cg(rtol=1e-12)
    names = ["pressure"] if (dim, box_dof, n) == FAST else ["pressure", "diameter"]
    differences = {}
    for name in names:
        fw = jax.jit(barostat.forward_fn(system, name, OBSERVE, rattler, solve))(q, params)
        for index in np.ndindex(*np.shape(params[name])):
            fd = reference.derivative(name, index, h=_h(name))
            differences[(name, index)] = fd
            for key, expected in fd.items():
                _compare(np.asarray(fw.values[key])[index], expected, (name, index, key))
    # Reverse mode: one solve gives dφ/dθ for every parameter element.
    grad, info = jax.jit(barostat.gradient_fn(system, observables.packing_fraction, rattler, solve))(q, params)
    assert "strain" not in grad
    for index in [(0,), (1,)]:
        fd = differences.get(("diameter", index)) or reference.derivative("diameter", index, h=_h("diameter"))
        _compare(grad["diameter"][index], fd["packing_fraction"], ("reverse diameter", index))
    _compare(grad["pressure"], differences[("pressure", ())]["packing_fraction"], "reverse pressure")


@pytest.mark.parametrize("kind", [pytest.param("jacobi", marks=pytest.mark.slow), "twolevel"])
def test_preconditioned_solves_match_central_differences(kind):
    """CG preconditioned on both blocks (the fixed-box preconditioner on the
    positions, the exact box-dof block inverted) gives the derivatives of the
    independent reference, forward (in P) and reverse (dφ/dθ)."""
    system, q, params, rattler = relaxed(*FAST)
    reference = reference_for(*FAST)
    fd = reference.derivative("pressure", (), h=_h("pressure"))

    def derivatives(q_, p_):
        solve = barostat.solver_for(system, q_, p_, rattler, "cg", 1e-12, kind)
        forward = barostat.forward_fn(system, "pressure", OBSERVE, rattler, solve)(q_, p_)
        return forward, barostat.gradient_fn(system, observables.packing_fraction, rattler, solve)(q_, p_)

    forward, (grad, info) = jax.jit(derivatives)(q, params)
    for key, expected in fd.items():
        _compare(forward.values[key], expected, (kind, key))
    _compare(grad["pressure"], fd["packing_fraction"], (kind, "reverse pressure"))
    assert float(info.residual) < 1e-11


def _dense_reference(reference, rattler):
    """The gauge-fixed dense system of the test's own enthalpy: ``(M, P, ∇²H)``
    with ``M = P ∇²H P + (I − P)`` over the flat ``z = (q, box dofs)``."""
    size = reference.z.size
    nd = reference.n * reference.dim
    held = np.repeat(~np.asarray(rattler), reference.dim).astype(float)
    count = held.sum() / reference.dim
    p = np.diag(np.concatenate([held, np.ones(size - nd)]))
    for k in range(reference.dim):
        mode = np.zeros(size)
        mode[k:nd:reference.dim] = held[k::reference.dim] / np.sqrt(count)
        p -= np.outer(mode, mode)
    hessian = np.asarray(jax.jit(jax.jacfwd(reference.grad))(reference.z, reference.theta))
    return p @ hessian @ p + np.eye(size) - p, p, hessian


@pytest.mark.slow  # long (over a minute on 2 cores); `pytest -m slow`
def test_pytree_derivatives_equal_a_dense_solve():
    """The derivatives over the pair (q, u) — CG on the assembled product
    (pair blocks on q, strain columns by jvp), preconditioned block-diagonally —
    equal a dense solve of the test's own enthalpy Hessian: the Hessian product
    itself, forward in P through every output, reverse dφ/dθ (every θ), and
    barostat.custom_root under jvp (P) and vjp (every θ; the diameter tangent of
    the reference is the one it is checked against)."""
    system, q, params, rattler = relaxed(*FAST)
    reference = reference_for(*FAST)
    m, p, hessian = _dense_reference(reference, rattler)
    theta = reference.theta
    nd = system.n * system.dim
    z = barostat.state(system, q, params)
    assert isinstance(z, tuple) and z[0].shape == q.shape and z[1].shape == (3,)
    np.testing.assert_allclose(np.concatenate([np.asarray(z[0]).ravel(), z[1]]), reference.z, atol=1e-15)
    unit = {}
    for name, index in [("pressure", ()), ("diameter", (1,))]:
        unit[name] = {k: jnp.zeros_like(x) for k, x in theta.items()}
        unit[name][name] = unit[name][name].at[index].set(1.0)
    v = jax.random.normal(jax.random.PRNGKey(4), (reference.z.size,))
    cotangent = (jax.random.normal(jax.random.PRNGKey(5), q.shape), jnp.asarray([1.0, -0.5, 2.0]))

    # -- the reference: dense solves with the test's own enthalpy
    @jax.jit
    def reference_parts(z_flat, theta_):
        d_grad = {name: jax.jvp(lambda t: reference.grad(z_flat, t), (theta_,), (d,))[1] for name, d in unit.items()}
        phi = lambda z_, t_: reference.observe(z_, t_)["packing_fraction"]  # noqa: E731
        g_z, g_theta = jax.grad(phi, argnums=(0, 1))(z_flat, theta_)
        return d_grad, g_z, g_theta, jax.vjp(lambda t: reference.grad(z_flat, t), theta_)[1]

    d_grad, g_z, g_theta, pull = reference_parts(reference.z, theta)
    dense_dz = {name: p @ np.linalg.solve(m, -p @ np.asarray(d_grad[name])) for name in unit}
    observed = jax.jit(lambda dz_, d_: jax.jvp(reference.observe, (reference.z, theta), (dz_, d_))[1])
    (implicit_part,) = pull(jnp.asarray(-(p @ np.linalg.solve(m, p @ np.asarray(g_z)))))
    expected_grad = {k: np.asarray(g_theta[k] + implicit_part[k]) for k in theta}

    # -- the engine, one program
    @barostat.custom_root(system, rattler, solve=linsolve.cg(rtol=1e-12))
    def root(z0, theta_):  # the solver returns the relaxed state (never differentiated)
        return z0

    @jax.jit
    def engine(q_, params_, v_):
        z_ = barostat.state(system, q_, params_)
        theta_, _ = barostat.split(params_)
        hv = barostat.hessian_vp(system)(z_, theta_)(v_)
        # block-Jacobi on q (the two-level one is checked against differences above)
        solve = barostat.solver_for(system, q_, params_, rattler, "cg", 1e-12, "jacobi")
        forwards = {"pressure": barostat.forward_fn(system, "pressure", OBSERVE, rattler, solve)(q_, params_)}
        grad = barostat.gradient_fn(system, observables.packing_fraction, rattler, solve)(q_, params_)
        dz = jax.jvp(lambda t: root(z_, t), (theta_,), (unit["pressure"],))[1]
        (bar,) = jax.vjp(lambda t: root(z_, t), theta_)[1](cotangent)
        return hv, forwards, grad, dz, bar

    hv, forwards, (grad, _), dz, bar = engine(q, params, (v[:nd].reshape(q.shape), v[nd:]))

    # The assembled product over (q, u) is the reference Hessian.
    hv_ref = hessian @ np.asarray(v)
    np.testing.assert_allclose(np.concatenate([np.asarray(hv[0]).ravel(), hv[1]]), hv_ref,
                               rtol=1e-10, atol=1e-12 * float(np.max(np.abs(hv_ref))))
    for name in forwards:
        expected = observed(jnp.asarray(dense_dz[name]), unit[name])
        for key, value in expected.items():
            _compare_tight(forwards[name].values[key], np.asarray(value), (name, key))
        assert float(forwards[name].residual) < 1e-11
    scale = max(float(np.max(np.abs(x))) for x in expected_grad.values())
    for k in theta:
        np.testing.assert_allclose(grad[k], expected_grad[k], rtol=1e-8, atol=1e-9 * scale)
    flat = np.concatenate([np.asarray(dz[0]).ravel(), dz[1]])
    assert float(np.max(np.abs(flat - dense_dz["pressure"]))) < 1e-8 * float(np.max(np.abs(dense_dz["pressure"])))
    c_flat = np.concatenate([np.asarray(cotangent[0]).ravel(), cotangent[1]])
    for name in unit:  # vjp of the root against the dense tangent: <c, dz/dθ_name>
        lhs = float(np.dot(c_flat, dense_dz[name]))
        got = float(np.asarray(bar[name])[(1,) if name == "diameter" else ()])
        assert abs(got - lhs) < 1e-8 * abs(lhs), (name, got, lhs)


def _compare_tight(got, expected, what):
    """Two exact solves of one system (CG at rtol 1e-12, dense LU): ~1e-10 relative."""
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    assert float(np.max(np.abs(np.asarray(got) - expected))) / scale < 1e-8, (what, got, expected)


@pytest.mark.parametrize("dim, box_dof, n", CASES)
def test_relaxed_pressure_equals_the_target(dim, box_dof, n):
    system, q, params, _ = relaxed(dim, box_dof, n)
    measure = jax.jit(lambda q_, p_: (observables.pressure(system, q_, p_), observables.stress(system, q_, p_),
                                      observables.max_force(system, q_, p_)))
    pressure, stress, max_force = (np.asarray(v) for v in measure(q, params))
    assert abs(pressure - PRESSURE) / PRESSURE < 1e-9
    if box_dof == "shear":  # stress-free: the whole stress is isotropic
        np.testing.assert_allclose(stress, -PRESSURE * np.eye(dim), atol=1e-9 * PRESSURE)
    elif box_dof == "aniso":
        np.testing.assert_allclose(np.diag(stress), -PRESSURE, rtol=1e-9)
    assert max_force < 1e-12


def test_cell_system_hessian_blocks_and_coordinates():
    """The pair-Hessian blocks (F L)ᵀ K (F L) that the moduli and preconditioners use
    equal the jvp of the energy's gradient in the sheared cell; to_solver inverts
    to_real; the volume is |det cell|."""
    system, q, params, _ = relaxed(*FAST)
    v = jax.random.normal(jax.random.PRNGKey(0), q.shape)

    @jax.jit  # one compiled program, not op by op
    def products(q_, p_, v_):
        return system.hessian_vp(q_, p_)(v_), jax.jvp(jax.grad(lambda y: system.energy(y, p_)), (q_,), (v_,))[1]

    assembled, reference = products(q, params, v)
    np.testing.assert_allclose(assembled, reference, rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(reference))))
    np.testing.assert_allclose(system.to_solver(system.to_real(q, params), params), q, atol=1e-13)
    cell = np.asarray(system.cell(params))
    assert abs(abs(np.linalg.det(cell)) - float(system.volume(params))) < 1e-10


# -- the triangular crystal in closed form --------------------------------------------


def test_triangular_crystal_lattice_constant_and_compressibility():
    """Monodisperse harmonic disks (D = 1, ε = 1, E = Σ ½(1 − r)²) on a triangular
    lattice: six contacts at a, area √3 a²/2 per particle, so per particle
    E = 3·½(1 − a)² and P = −dE/dA = √3 (1 − a)/a, i.e. a(P) = √3/(P + √3);
    φ = π/(2√3 a²) and dφ/dP follows by the chain rule."""
    pressure, cols, rows = 0.05, 6, 6
    a0 = 0.97
    sites = np.array([[(i + 0.5 * (j % 2)) * a0, j * a0 * math.sqrt(3) / 2]
                      for j in range(rows) for i in range(cols)])
    box = np.array([cols * a0, rows * a0 * math.sqrt(3) / 2])
    base = get("bidisperse").build(n=cols * rows, diameter=(1.0, 1.0))
    base = dataclasses.replace(base, positions=sites, params={**base.params, "box": jnp.asarray(box)})
    system = barostat.at_pressure(base, pressure, "iso")
    out = barostat.relax(system, ftol=1e-12)
    assert bool(out.info.converged)
    q, params = out.q, out.params

    a = math.sqrt(3) / (pressure + math.sqrt(3))
    cell = np.asarray(system.cell(params))
    np.testing.assert_allclose(np.diag(cell) / np.array([cols, rows * math.sqrt(3) / 2]), a, rtol=1e-10)
    phi = math.pi / (2 * math.sqrt(3) * a**2)
    dphi_dp = -2 * phi / a * (-math.sqrt(3) / (pressure + math.sqrt(3)) ** 2)
    observe = {"packing_fraction": observables.packing_fraction}
    rattler = observables.rattlers(system, q, params)
    assert not bool(jnp.any(rattler))
    fw = jax.jit(barostat.forward_fn(system, "pressure", observe, rattler))(q, params)
    np.testing.assert_allclose(float(observables.packing_fraction(system, q, params)), phi, rtol=1e-10)
    np.testing.assert_allclose(float(fw.values["packing_fraction"]), dphi_dp, rtol=1e-8)
    # dφ/dP = φ/B with B = −V dP/dV. The moduli strain separations linearly,
    # r → (1 + t) r, so their bulk modulus is ∂²E/∂t²/(d² V) = B − P (d − 1)/d
    # for a prestressed packing (d = 2: B − P/2).
    bulk = float(jax.jit(lambda q_, p_: observables.bulk_modulus(system, q_, p_))(q, params)) + pressure / 2
    np.testing.assert_allclose(float(fw.values["packing_fraction"]), phi / bulk, rtol=1e-8)


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("system, sets, message", [
    ("bidisperse", ["pressure=0.01", "phi=0.9"], "not both"),
    ("polydisperse", ["pressure=0.01", "phi=0.9"], "not both"),
    ("bidisperse", ["pressure=0"], "must be positive"),
    ("bidisperse", ["pressure=-0.5"], "must be positive"),
    ("bidisperse", ["box_dof=shear"], "needs pressure"),
    ("bidisperse", ["pressure=0.01", "box_dof=tilt"], "must be one of"),
    ("morse_cluster", ["box_dof=iso"], "no key"),
    ("morse_cluster", ["pressure=0.01"], "no key"),
])
def test_bad_input_is_one_line_exit_2_and_no_file(tmp_path, system, sets, message):
    out = tmp_path / "x.h5"
    args = ["run", system, *[a for s in sets for a in ("--set", s)], "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["bidisperse", "--set", "n=16", "--observe", "enthalpy"], "needs a target pressure"),
    (["morse_cluster", "--observe", "volume"], "periodic box"),
    (["lj_crystal", "--observe", "packing_fraction"], "diameters"),
    (["bidisperse", "--set", "n=16", "--set", "pressure=0.01", "--solver", "sparse"],
     "not available at fixed pressure"),
])
def test_observables_that_need_a_pressure_or_a_box(tmp_path, args, message):
    out = tmp_path / "x.h5"
    result = runner.invoke(app, ["run", *args, "-o", str(out)])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not out.exists()


def test_strain_is_state_not_a_parameter(tmp_path):
    out = tmp_path / "x.h5"
    result = runner.invoke(app, ["run", "--set", "n=16", "--set", "pressure=0.01", "--wrt", "strain",
                                 "-o", str(out)])
    assert result.exit_code == 2 and "relaxed state" in result.stderr
    assert not out.exists()


def test_fixed_box_build_is_unchanged():
    system = get("bidisperse").build(n=16)
    assert not barostat.is_fixed_pressure(system)
    assert "pressure" not in system.params and "pressure" not in system.config
    with pytest.raises(UsageError):
        get("bidisperse").build(n=16, box_dof="aniso")


@pytest.mark.parametrize("box_dof", ["iso", "aniso", "shear"])
def test_positions_for_the_file_include_the_cell_deformation(box_dof):
    """The file's positions (Result.record: to_real_on_host) are the cell's real
    positions, to_real with the deformation, and to_solver takes them back to q."""
    system = get("bidisperse").build(n=16, pressure=0.02, box_dof=box_dof)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    rng = np.random.default_rng(3)
    strain = 0.1 * rng.standard_normal(np.shape(params["strain"]))
    if strain.ndim == 2:
        strain = 0.5 * (strain + strain.T)
    params["strain"] = jnp.asarray(strain)
    q = jnp.asarray(rng.random((16, 2)))
    x = system.to_real_on_host(q, params)
    np.testing.assert_allclose(x, np.asarray(system.to_real(q, params)), rtol=0, atol=1e-12)
    back = np.asarray(system.to_solver(jnp.asarray(x), params)) - np.asarray(q)
    assert np.max(np.abs(back - np.round(back))) < 1e-12


@pytest.mark.slow
def test_run_at_fixed_pressure_writes_the_cell_and_the_ensemble(tmp_path):
    import h5py

    out = tmp_path / "p.h5"
    result = runner.invoke(app, ["run", "--set", "n=16", "--set", "pressure=0.02", "--set", "box_dof=shear",
                                 "--wrt", "pressure", "--grad", "packing_fraction", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        assert f["particles/all/box/edges"].shape == (2, 2)
        assert f["particles/all/box"].attrs["ensemble"] == "fixed pressure, box_dof=shear"
        assert abs(f["observables/pressure"][()] - 0.02) < 1e-9
        edges = f["particles/all/box/edges"][()]
        assert abs(abs(np.linalg.det(edges)) - f["observables/volume"][()]) < 1e-9
    shown = runner.invoke(app, ["show", str(out)])
    assert "ensemble: fixed pressure, box_dof=shear" in shown.stdout
    checked = runner.invoke(app, ["check", str(out)])
    assert checked.exit_code == 0, checked.output


# -- batches of members (mdsens ensemble) ------------------------------------------------


def test_batch_relaxation_takes_the_single_runs_steps():
    """relax_batch (one vmapped loop over members, tables rebuilt per member)
    reaches each member's single-run minimum in the same number of steps; the
    member's own start is the one :func:`barostat.relax` starts from."""
    from mdsens import ensemble

    system, q, params, _ = relaxed(*FAST)
    other = get("bidisperse").build(n=FAST[2], dim=FAST[0], pressure=PRESSURE, box_dof=FAST[1], seed=1)
    stacked = ensemble.stack([system.params, other.params])
    x0 = jnp.stack([jnp.asarray(system.positions), jnp.asarray(other.positions)])
    out = barostat.relax_batch(system, stacked, x0, ftol=1e-12, max_steps=200_000)
    assert out.converged.all() and out.idx.shape[:2] == (2, FAST[2])
    single = barostat.relax(system, ftol=1e-12, max_steps=200_000)
    assert int(out.steps[0]) == int(single.info.steps)
    dq = np.asarray(out.q[0]) - np.asarray(q)
    assert np.max(np.abs(dq - np.round(dq))) < 1e-9
    np.testing.assert_allclose(out.params["strain"][0], params["strain"], atol=1e-10)
    # the second member is at the target pressure too, in a cell of its own
    p1 = {k: v[1] for k, v in out.params.items()}
    pressure = float(jax.jit(observables.pressure, static_argnums=0)(other, out.q[1], p1))
    assert abs(pressure - PRESSURE) / PRESSURE < 1e-9
    assert float(np.max(np.abs(out.params["strain"][1] - params["strain"]))) > 1e-3


# -- the cell-list relaxation (N ≥ relax.CELL_LIST_THRESHOLD) ---------------------------


@pytest.mark.parametrize("dim,box_dof,n,renumbered", [(2, "shear", 576, True),
                                                      pytest.param(3, "aniso", 512, False, marks=pytest.mark.slow)])
def test_cell_list_relaxation_reaches_a_minimum_of_the_full_enthalpy(dim, box_dof, n, renumbered, monkeypatch):
    """The fixed-pressure relaxation lists pairs from a cell list in the
    reference box. Started in a cell 20% wider than the packing's, it must
    shrink past its first grid and make a new one; the result is checked on
    every pair (no list): the real-space forces and the stress residual of the
    full energy vanish, and the pairs it reports are exactly those within the
    cutoff. ``renumbered``: with the particles renumbered in cell order, as
    from relax.SORT_THRESHOLD particles (a mixed-up numbering leaves forces)."""
    if renumbered:
        monkeypatch.setattr(relax, "SORT_THRESHOLD", 0)
    system = get("bidisperse").build(n=n, dim=dim, pressure=PRESSURE, box_dof=box_dof, seed=3)
    params = {**system.params, "strain": 0.2 * jnp.eye(dim)}
    out = barostat.relax(system, params, ftol=1e-11, max_steps=200_000)
    assert bool(out.info.converged)
    grids = [p["stretch"] for key, ps in barostat._PROGRAMS[system.model].items() if key[0] == "cell-list" for p in ps]
    assert len(set(grids)) >= 2, grids
    x = system.to_real(out.q, out.params)
    force = -jax.jit(jax.grad(system.energy_real))(x, out.params)  # all pairs
    assert float(jnp.max(jnp.linalg.norm(force, axis=-1))) < 1e-10
    assert float(barostat.stress_residual(system, out.q, out.params)) < 1e-10
    q = np.asarray(out.q)
    cell = np.asarray(system.cell(out.params))
    i, j = np.triu_indices(n, 1)
    dq = q[i] - q[j]
    r = np.linalg.norm((dq - np.round(dq)) @ cell, axis=-1)
    within = set(zip(i[r < float(system.cutoff(out.params))].tolist(), j[r < float(system.cutoff(out.params))].tolist()))
    assert set(map(tuple, out.pairs.T.tolist())) == within


# Both force paths (the cell in the pair coefficient: iso/aniso; deformed separations: shear)
# in the default run, in 2D; the rest with -m slow (~27 s each on 2 cores).
@pytest.mark.parametrize("dim,box_dof,n", [(2, "iso", 64),
                                           pytest.param(2, "aniso", 64, marks=pytest.mark.slow),
                                           pytest.param(3, "aniso", 128, marks=pytest.mark.slow),
                                           (2, "shear", 64),
                                           pytest.param(3, "shear", 128, marks=pytest.mark.slow)])
def test_pair_list_force_is_minus_the_enthalpy_gradient(dim, box_dof, n):
    """The relaxation's force on the state (y, w) = (L₀ ⊙ q, c u), taken once per
    pair from the pair list with the cell folded into the pair coefficient
    (``barostat._cell_programs``), against autodiff of the system's own
    all-pairs enthalpy in a strained cell: −∂H/∂y, and for iso and aniso
    −∂H/∂w; for shear the cell's force is the "virial in log space"
    −V (σ + P I) : B_k / c, checked against the stress of the full energy."""
    system = get("bidisperse").build(n=n, dim=dim, seed=1, pressure=PRESSURE, box_dof=box_dof)
    basis = jnp.asarray(barostat.strain_basis(dim, box_dof))
    u = jnp.asarray(0.03 * np.random.default_rng(0).standard_normal(basis.shape[0]))
    params = {**system.params, "strain": jnp.tensordot(u, basis, axes=1)}
    theta, _ = barostat.split(params)
    c = float(barostat._programs(system, "fire", 1e-10, barostat.DEFAULT_SKIN, 1)["scale"](theta))
    deform = barostat.deformation(params["strain"], box_dof)
    smallest = float(np.min(np.linalg.svd(np.asarray(deform), compute_uv=False)))
    stretch = barostat.GRID_MARGIN ** math.ceil(math.log(smallest) / math.log(barostat.GRID_MARGIN) + 0.5)
    programs = barostat._cell_programs(system, theta, "fire", 1e-10, barostat.DEFAULT_SKIN, stretch)
    table, mini = programs["table"], programs["mini"]
    q = system.to_solver(jnp.asarray(system.positions), params)
    y = q * theta["box"]
    capacity, cells = table.capacities(y, deform=deform)
    built = table.build(y, capacity, cells, deform=deform)
    pairs = relax.pair_list(built.idx, n, table.pair_capacity(y, cells, deform=deform))
    f_y, f_w = jax.jit(lambda x: mini.step_force(mini.blank(x), (theta, pairs)).force)((y, u * c))

    def enthalpy(y_, w_):
        p_ = {**theta, "strain": jnp.tensordot(w_ / c, basis, axes=1)}
        return system.energy(y_ / theta["box"], p_) + theta["pressure"] * system.volume(p_)

    g_y, g_w = jax.grad(enthalpy, argnums=(0, 1))(y, u * c)
    assert float(jnp.max(jnp.abs(f_y + g_y))) < 1e-12 * float(jnp.max(jnp.abs(g_y)))
    if box_dof == "shear":
        volume = system.volume(params)
        zero = jnp.zeros((dim, dim))
        sigma = jax.grad(lambda e: system.energy(q, params, strain=e))(zero) / volume
        g_w = volume * jnp.tensordot(basis, sigma + PRESSURE * jnp.eye(dim), axes=([1, 2], [0, 1])) / c
    assert float(jnp.max(jnp.abs(f_w + g_w))) < 1e-12 * float(jnp.max(jnp.abs(g_w)))
