"""System families: every parameter of every system against finite differences,
reverse-mode gradients along random directions, the box parameter against the
engine's own FD check, and the builders' input validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import Reference, assert_close, relaxed, unit
from mdsens import observables, sensitivity, systems
from mdsens.systems import UsageError

# Small systems (N ≤ 32), both dimensions, one per family and dimension.
# lj_crystal: the cutoff must stay below half the smallest box side (minimum
# image), hence shorter cutoffs than the default 2.5σ.
CASES = {
    "polydisperse-2d": ("polydisperse", dict(n=32, dim=2, phi=0.9, spread=0.2)),
    "polydisperse-3d": ("polydisperse", dict(n=32, dim=3, phi=0.7, spread=0.2)),
    "lj_crystal-2d": ("lj_crystal", dict(dim=2, cells=4, vacancies=1, onset=1.8, cutoff=2.2)),
    # onset below the minimum 2^(1/6)σ: the cutoff acts on the nearest shell, so
    # the crystal is not trivially at the pair minimum (dE/dσ ≠ 0).
    "lj_crystal-3d": ("lj_crystal", dict(dim=3, cells=2, vacancies=1, onset=1.0, cutoff=1.5)),
    "morse_cluster-2d": ("morse_cluster", dict(n=7, dim=2)),
    "morse_cluster-3d": ("morse_cluster", dict(n=13, dim=3)),
    # Positions of lj_crystal-2d written to extended XYZ, read back with the LJ potential.
    "from_file-lj-2d": ("from_file", dict(potential="lj", onset=1.8, cutoff=2.2)),
}

# 3D periodic: compile-heavy, run with -m slow. The 2D Morse cluster too: its parameters take
# the same (dimension-generic) code path as the 3D cluster's, checked here in the default run,
# and its 2D rigid-body gauge is checked in the default run by
# tests/test_analytic.py::test_free_cluster_gauge_removes_rigid_motions[2-7-3].
SLOW = {"polydisperse-3d", "lj_crystal-3d", "from_file-lj-2d", "morse_cluster-2d"}
PARAMS_CASES = [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in CASES]


@functools.lru_cache(maxsize=None)
def case(name: str):
    family, config = CASES[name]
    if family == "from_file":
        config = dict(config, path=str(write_extxyz("lj_crystal", **CASES["lj_crystal-2d"][1])))
    system, q, params, rattler = relaxed(family, **config)
    return system, q, params, rattler, Reference(system, q, params, rattler)


def scalar_observables(system):
    observe = {"energy": observables.energy, "energy_per_particle": observables.energy_per_particle}
    if system.periodic:
        observe["pressure"] = observables.pressure
        observe["stress"] = observables.stress
    return observe


def sample_indices(shape, rng, count=2):
    """All elements of a small parameter, ``count`` random ones of a per-particle one."""
    size = int(np.prod(shape))
    flat = range(size) if size <= 3 else rng.choice(size, count, replace=False)
    return [np.unravel_index(int(k), shape) if shape else () for k in flat]


@functools.lru_cache(maxsize=None)
def jacobians(name: str):
    """Forward-mode Jacobians of x* and the observables w.r.t. every parameter,
    through :func:`mdsens.sensitivity.equilibrium` (custom_root): one jacfwd,
    compiled once per system. Entry ``[key][param]`` has shape key.shape + param.shape."""
    system, q, params, _, _ = case(name)
    equilibrium = sensitivity.equilibrium(system)
    observe = scalar_observables(system)

    def outputs(p):
        q_star = equilibrium(q, p)
        return {"position": system.to_real(q_star, p), **{k: fn(system, q_star, p) for k, fn in observe.items()}}

    return jax.jit(jax.jacfwd(outputs))(params)


@pytest.mark.parametrize("name", PARAMS_CASES)
def test_every_parameter_against_finite_differences(name):
    system, q, params, rattler, reference = case(name)
    observe = scalar_observables(system)
    jac = jacobians(name)
    rng = np.random.default_rng(0)
    assert set(params) <= set(systems.get(system.name).parameters)
    for param in params:
        for index in sample_indices(params[param].shape, rng):
            fd = reference.directional(unit(params, param, index), observe=observe)
            for key, expected in fd.items():
                actual = np.asarray(jac[key][param])[(...,) + tuple(index)]
                # h = 1e-5: truncation O(h²) ~ 1e-10 and round-off ~ 1e-16·|x|/h ~ 1e-10
                # relative; measured agreement 1e-8 to 1e-11 (the LJ tail is the
                # stiffest). atol covers derivatives that vanish exactly (∂x*/∂ε):
                # there both sides are round-off, ~1e-11 in units of σ and ε.
                assert_close(actual, expected, rtol=1e-6, atol=1e-8, what=f"{name} d{key}/d{param}{list(index)}")


def test_forward_per_element_shapes_and_values():
    """:func:`mdsens.sensitivity.forward` (the CLI's path): one solve per
    element of the per-particle ``diameter``, shape param.shape + quantity.shape."""
    name = "polydisperse-2d"
    system, q, params, rattler, _ = case(name)
    observe = scalar_observables(system)
    result = sensitivity.forward(system, q, params, "diameter", observe, rattler)
    jac = jacobians(name)
    n = system.n
    assert result.values["position"].shape == (n, n, system.dim)
    assert result.values["stress"].shape == (n, system.dim, system.dim)
    assert np.all(np.asarray(result.residual) < 1e-9)
    for key in observe:
        # Two CG solves of the same systems at rtol 1e-10.
        assert_close(np.moveaxis(np.asarray(jac[key]["diameter"]), -1, 0), result.values[key], rtol=1e-7)


@pytest.mark.parametrize("name", PARAMS_CASES)
def test_reverse_gradient_along_random_directions(name):
    system, q, params, rattler, reference = case(name)
    fn = observables.pressure if system.periodic else observables.energy
    grad, info = sensitivity.gradient(system, q, params, fn, rattler)
    assert {k: v.shape for k, v in grad.items()} == {k: v.shape for k, v in params.items()}
    rng = np.random.default_rng(1)
    for _ in range(2):
        direction = {k: jnp.asarray(rng.normal(size=np.shape(v))) for k, v in params.items()}
        predicted = sum(float(jnp.sum(grad[k] * direction[k])) for k in params)
        expected = reference.directional(direction, observe={"o": fn})["o"]
        # Same FD error budget as the forward test (a sum of N+3 element derivatives).
        assert_close(predicted, expected, rtol=1e-6, atol=1e-9, what=f"{name} <∇O, v>")


@pytest.mark.parametrize("index", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_box_derivatives_against_engine_finite_difference(index):
    """∂x*/∂L (affine part included), dE/dL, dP/dL against
    :func:`mdsens.sensitivity.finite_difference` (FIRE re-relaxation + Newton
    polish), independently of the Newton reference used elsewhere."""
    system, q, params, rattler, _ = case("polydisperse-2d")
    observe = {"energy": observables.energy, "pressure": observables.pressure}
    result = sensitivity.forward(system, q, params, "box", observe, rattler)
    fd = sensitivity.finite_difference(system, q, params, "box", (index,), observe=observe)
    for key in ("position", "energy", "pressure"):
        # Measured 1e-10 to 1e-9 relative; 1e-6 leaves room for the FIRE path.
        assert_close(result.values[key][index], fd[key], rtol=1e-6, atol=1e-9, what=f"d{key}/dL{index}")


def test_morse_has_no_box_and_free_space_observables_refuse():
    system, q, params, _, _ = case("morse_cluster-3d")
    assert "box" not in params and not system.periodic
    for fn in (observables.pressure, observables.stress, observables.elastic_tensor):
        with pytest.raises(ValueError, match="free space"):
            fn(system, q, params)


def test_declared_parameters_match_the_built_systems():
    for family in systems.FAMILIES.values():
        if family.name == "from_file":
            continue  # needs a file; its parameters depend on the potential (tested below)
        system = family.build()
        assert list(system.params) == list(family.parameters), family.name
        assert system.name == family.name
        assert np.all(np.isfinite(system.positions))


def test_polydisperse_diameters_per_particle():
    system = systems.get("polydisperse").build(n=40, dim=3, phi=0.6, spread=0.3, seed=4)
    d = np.asarray(system.params["diameter"])
    assert d.shape == (40,) and np.all(np.abs(d - 1.0) <= 0.3)
    again = systems.get("polydisperse").build(n=40, dim=3, phi=0.6, spread=0.3, seed=4)
    np.testing.assert_array_equal(np.asarray(again.params["diameter"]), d)


def test_lj_crystal_lattice_and_vacancies():
    full = systems.get("lj_crystal").build(dim=3, cells=2, vacancies=0, displacement=0.0, onset=1.3, cutoff=1.5)
    assert full.n == 32
    # FCC: 12 nearest neighbours at the LJ minimum 2^(1/6) σ.
    x, box = full.positions, np.asarray(full.params["box"])
    d = x[:, None] - x[None]
    d -= box * np.round(d / box)
    r = np.sqrt(np.sum(d**2, -1))
    assert np.all(np.sum(np.abs(r - 2 ** (1 / 6)) < 1e-9, axis=1) == 12)
    holes = systems.get("lj_crystal").build(dim=2, cells=4, vacancies=3, onset=1.8, cutoff=2.2)
    assert holes.n == 29


def test_morse_dimer_start():
    system = systems.get("morse_cluster").build(n=2, dim=3)
    assert system.n == 2 and system.positions.shape == (2, 3)


@pytest.mark.parametrize(
    "family, overrides, message",
    [
        ("polydisperse", dict(spread=1.5), "spread"),
        ("polydisperse", dict(dim=4), "dim"),
        ("polydisperse", dict(n=4, phi=0.9), "too small"),
        ("polydisperse", dict(colour=3), "no key 'colour'"),
        ("lj_crystal", dict(cells=2), "too small"),
        ("lj_crystal", dict(vacancies=200), "vacancies"),
        ("lj_crystal", dict(onset=2.6), "onset"),
        ("morse_cluster", dict(n=1), "n=1"),
        ("morse_cluster", dict(alpha=-1.0), "alpha"),
    ],
)
def test_builders_reject_bad_input(family, overrides, message):
    with pytest.raises(UsageError, match=message):
        systems.get(family).build(**overrides)


def test_unknown_family():
    with pytest.raises(UsageError, match="choose from"):
        systems.get("argon")


# -- from_file ----------------------------------------------------------------


def _record(system, q, params, rattler):
    x = np.asarray(system.to_real(q, params))
    diameter = np.asarray(params["diameter"]) if "diameter" in params else np.ones(system.n)
    return {"positions": x, "box": np.asarray(params["box"]) if system.periodic else None,
            "species": np.asarray(system.species), "rattler": np.asarray(rattler), "diameter": diameter,
            "parameters": {k: np.asarray(v) for k, v in params.items() if k != "box"},
            "observables": {}, "sensitivity": {}, "gradient": {}, "meta": {"system": system.name}}


@functools.lru_cache(maxsize=None)
def write_extxyz(family: str, **config):
    """The relaxed state of a catalogue system as an extended-XYZ file (mdsens.export)."""
    import tempfile
    from pathlib import Path

    from mdsens import export

    path = Path(tempfile.mkdtemp()) / f"{family}.xyz"
    export.to_extxyz(_record(*relaxed(family, **config)), path)
    return path


def _same_state(loaded, system, q, params):
    q_loaded = loaded.to_solver(jnp.asarray(loaded.positions), loaded.params)
    # The file stores positions as text (17 significant digits) or float64.
    assert_close(loaded.to_real(q_loaded, loaded.params), system.to_real(q, params), rtol=1e-13)
    for fn in (observables.energy, observables.pressure):
        assert_close(fn(loaded, q_loaded, loaded.params), fn(system, q, params), rtol=1e-10)


def test_from_file_hdf5_round_trip(tmp_path):
    from mdsens import io

    system, q, params, rattler, _ = case("polydisperse-2d")
    path = tmp_path / "run.h5"
    io.write(path, _record(system, q, params, rattler))
    loaded = systems.get("from_file").build(path=str(path), potential="harmonic")
    assert loaded.periodic and set(loaded.params) == {"diameter", "epsilon", "alpha", "box"}
    np.testing.assert_array_equal(np.asarray(loaded.params["diameter"]), np.asarray(params["diameter"]))
    _same_state(loaded, system, q, params)


def test_from_file_extxyz_round_trip():
    system, q, params, _, _ = case("polydisperse-2d")
    path = write_extxyz("polydisperse", **CASES["polydisperse-2d"][1])
    loaded = systems.get("from_file").build(path=str(path), potential="harmonic")
    assert_close(loaded.params["diameter"], params["diameter"], rtol=1e-15)
    _same_state(loaded, system, q, params)


def test_from_file_free_space_morse(tmp_path):
    path = tmp_path / "dimer.xyz"
    path.write_text('2\npbc="F F F" Properties=species:S:1:pos:R:3\nX 0 0 0\nX 1.1 0 0\n')
    # All z equal and z not periodic: 2D unless dim=3 says otherwise.
    assert systems.get("from_file").build(path=str(path), potential="morse").dim == 2
    loaded = systems.get("from_file").build(path=str(path), potential="morse", dim=3)
    assert not loaded.periodic and loaded.dim == 3 and set(loaded.params) == {"sigma", "epsilon", "alpha"}
    q, info = sensitivity.relax(loaded, ftol=1e-12)
    # Morse minimum at r = σ = 1; FIRE to max|F| < 1e-12 with stiffness 2εα² = 72.
    assert float(jnp.linalg.norm(q[0] - q[1])) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "content, overrides, message",
    [
        (None, dict(path=""), "needs path"),
        (None, dict(path="/nonexistent/run.h5"), "no such file"),
        ("hello\n", dict(), "cannot read as extxyz"),
        ('2\npbc="F F F"\nX 0 0 0\nX 1 0 0\n', dict(potential="yukawa"), "potential"),
        ('2\nLattice="3 0 0 0 3 0 0 0 3" pbc="T T T"\nX 0 0 0\nX 1 0 0\n', dict(potential="lj"), "too small"),
    ],
)
def test_from_file_rejects_bad_input(tmp_path, content, overrides, message):
    if content is not None:
        path = tmp_path / "bad.xyz"
        path.write_text(content)
        overrides = dict(path=str(path), **overrides)
    with pytest.raises(UsageError, match=message):
        systems.get("from_file").build(**overrides)
