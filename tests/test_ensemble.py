"""`mdsens ensemble`: batched members are the runs they stand for, on any number
of devices and processes; the file, show/export/check on it; bad input."""

import json
import os
import subprocess
import sys

import h5py
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from mdsens import ensemble, ensemble_io, job as J
from mdsens.cli import app

runner = CliRunner()

N = "16"
SEEDS = range(0, 3)
SWEEP = {"phi": ["0.88", "0.93"]}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """One in-process ensemble (6 members, one batch), written to a file."""
    ej = ensemble.EnsembleJob(J.Job(system="bidisperse", overrides={"n": N}, grad=["energy"]), seeds=SEEDS,
                              sweeps=SWEEP)
    result = ensemble.run(ej)
    path = tmp_path_factory.mktemp("ens") / "ref.h5"
    ensemble_io.write(path, result)
    return result, path


def _minimum_image(d, box):
    return d - box * np.round(d / box)


def test_member_is_the_run_with_its_seed_and_keys(batch, member=5):
    """A member is the minimum `mdsens run` finds for its seed and keys, with the
    same observables and derivatives (forward and reverse)."""
    result, _ = batch
    mb = result.members[member]
    single = J.execute(J.Job(system="bidisperse", overrides={"n": N, **dict(mb.sweep)}, seed=mb.seed,
                             grad=["energy"]))
    assert single.converged and result.converged[member]
    x = np.asarray(single.system.to_real(single.q, single.params))
    box = np.asarray(single.params["box"])
    np.testing.assert_allclose(result.box[member], box, rtol=1e-15)
    assert np.max(np.abs(_minimum_image(x - result.position[member], box))) < 1e-9
    assert result.steps[member] == int(single.info.steps)
    for name in ("energy", "pressure"):
        np.testing.assert_allclose(result.observables[name][member], single.observables[name], rtol=1e-10)
    fw = single.sensitivity["diameter"].values
    for name in ("position", "energy", "pressure"):
        np.testing.assert_allclose(result.sensitivity["diameter"][name][member], fw[name], rtol=1e-7, atol=1e-9)
    grads, _ = single.gradient["energy"]
    for name, value in grads.items():
        np.testing.assert_allclose(result.gradient["energy"][name][member], value, rtol=1e-7, atol=1e-12)


def test_file_layout_and_statistics(batch):
    result, path = batch
    m, n = 6, int(N)
    with h5py.File(path) as f:
        assert list(f["h5md"].attrs["version"]) == [1, 1]
        g = f["ensemble"]
        assert g["seed"][()].tolist() == [0, 1, 2, 0, 1, 2]
        np.testing.assert_allclose(g["phi"][()], [0.88] * 3 + [0.93] * 3)
        for name, shape in [("converged", (m,)), ("steps", (m,)), ("position", (m, n, 2)), ("box", (m, 2)),
                            ("diameter", (m, n)), ("species", (m, n)), ("observables/energy", (m,)),
                            ("sensitivity/diameter/position", (m, 2, n, 2)),
                            ("sensitivity/diameter/pressure", (m, 2)), ("gradient/energy/diameter", (m, 2))]:
            assert g[name].shape == shape, name
        assert g["position"].attrs["unit"] == "sigma"
        assert json.loads(g["configuration"][3])["phi"] == 0.93
        # a smaller box at the higher packing fraction
        assert g["box"][3, 0] < g["box"][0, 0]
    stats = ensemble_io.statistics(ensemble_io.read(path))
    assert [s["sweep"]["phi"] for s in stats] == [0.88, 0.93]
    energies = result.observables["energy"][3:]
    np.testing.assert_allclose(stats[1]["observables"]["energy"]["mean"], energies.mean(), rtol=1e-12)
    np.testing.assert_allclose(stats[1]["observables"]["energy"]["sem"], energies.std(ddof=1) / np.sqrt(3),
                               rtol=1e-12)
    shown = runner.invoke(app, ["show", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "phi = 0.93: 3/3 converged" in shown.stdout
    png = path.parent / "ens.png"
    assert runner.invoke(app, ["plot", str(path), "-o", str(png)]).exit_code == 0 and png.stat().st_size > 0


def test_exported_member_passes_the_finite_difference_check(batch, tmp_path):
    """export --member writes a run file that `mdsens check` re-derives by
    central finite differences (re-relaxing the member's own system)."""
    _, path = batch
    out = tmp_path / "m4.h5"
    res = runner.invoke(app, ["export", str(path), "--member", "4", "-o", str(out)])
    assert res.exit_code == 0, res.output
    shown = json.loads(runner.invoke(app, ["show", str(out), "--json"]).stdout)
    assert shown["provenance"]["seed"] == 1 and shown["provenance"]["configuration"]["phi"] == 0.93
    checked = runner.invoke(app, ["check", str(out)])
    assert checked.exit_code == 0, checked.output
    assert "agree with finite differences" in checked.output


def _cli(args, env=None):
    return subprocess.Popen([sys.executable, "-c", "from mdsens.cli import main; main()", *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


BASE = ["ensemble", "--set", f"n={N}", "--seeds", "0:3", "--sweep", "phi=0.88,0.93", "--grad", "energy", "-q"]


def _agrees(result, path, devices=None):
    other = ensemble_io.read(path)
    if devices is not None:
        assert len(other["meta"]["devices"]) == devices
    assert other["steps"].tolist() == result.steps.tolist()
    np.testing.assert_allclose(other["position"], result.position, rtol=0, atol=1e-12)
    for key in ("energy", "pressure"):
        np.testing.assert_allclose(other["observables"][key], result.observables[key], rtol=1e-12)
    for key in ("position", "pressure"):
        np.testing.assert_allclose(other["sensitivity"]["diameter"][key], result.sensitivity["diameter"][key],
                                   rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(other["gradient"]["energy"]["diameter"], result.gradient["energy"]["diameter"],
                               rtol=1e-12)


def test_devices_agree_with_one(batch, tmp_path):
    """The same ensemble on 4 simulated CPU devices equals the one-device result."""
    result, _ = batch
    proc = _cli(BASE + ["-o", str(tmp_path / "d4.h5")], {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    _agrees(result, tmp_path / "d4.h5", devices=4)


@pytest.mark.slow  # two more processes, each compiling the whole ensemble (~40 s of 2 cores)
def test_processes_agree_with_one(batch, tmp_path):
    """The same ensemble split over 2 processes joined by jax.distributed on
    127.0.0.1 equals the one-device result."""
    result, _ = batch
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    coordinator = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--timeout", "120"]
    procs = [_cli(BASE + ["-o", str(tmp_path / "p2.h5"), *coordinator, "--process-id", str(k)]) for k in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert not list(tmp_path.glob("p2.h5.part*"))
    _agrees(result, tmp_path / "p2.h5")


@pytest.mark.slow  # long (over a minute on 2 cores); `pytest -m slow`
def test_unconverged_members_are_kept_and_flagged(tmp_path):
    out = tmp_path / "short.h5"
    res = runner.invoke(app, ["ensemble", "--set", "n=16", "--seeds", "0:2", "--max-steps", "20", "-o", str(out)])
    assert res.exit_code == 3, res.output
    data = ensemble_io.read(out)
    assert not data["converged"].any() and (data["steps"] <= 20).all()
    assert np.isnan(data["sensitivity"]["diameter"]["position"]).all()
    assert np.isfinite(data["observables"]["energy"]).all()


@pytest.mark.parametrize("args, message", [
    (["--seeds", "3:3"], "empty range"),
    (["--seeds", "5:2"], "empty range"),
    (["--seeds", "a:b"], "expected A:B"),
    (["--sweep", "nope=1,2"], "no key 'nope'"),
    (["--sweep", "phi=0.9,-1"], "phi=-1.0"),
    (["--sweep", "phi"], "expected KEY=V1,V2"),
    (["--set", "n=64", "--sweep", "dim=2,3"], "changes N or d"),
    (["--set", "phi=0.9", "--sweep", "phi=0.8,0.9"], "give the key one way"),
    (["--num-processes", "2"], "need --coordinator"),
    (["--coordinator", "127.0.0.1:5", "--num-processes", "2", "--process-id", "2"], "must be in 0 … 1"),
    (["--coordinator", "nowhere", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT"),
    (["--devices", "9"], "local device"),
    (["--set", "pressure=0.01", "--sweep", "box_dof=iso,shear"], "one ensemble per box_dof"),
])
def test_bad_input_is_one_line_exit_2_no_file(tmp_path, args, message):
    out = tmp_path / "bad.h5"
    sets = [] if "n=64" in args else ["--set", "n=16"]
    res = runner.invoke(app, ["ensemble", *sets, *args, "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_unreachable_coordinator_times_out_with_a_message(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    out = tmp_path / "u.h5"
    p = _cli(["ensemble", "--set", "n=16", "-o", str(out), "--coordinator", f"127.0.0.1:{port}",
              "--num-processes", "2", "--process-id", "1", "--timeout", "2"])
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "no coordinator answered within 2 s" in err
    assert not out.exists()


@pytest.mark.slow
def test_jamming_from_a_small_ensemble():
    """Above jamming ⟨P⟩ grows linearly in φ and extrapolates to zero near φ_c ≈ 0.84
    (O'Hern et al. 2003; 0.82–0.86 allows for N = 64), and a larger diameter raises P."""
    ej = ensemble.EnsembleJob(J.Job(system="bidisperse", overrides={"n": "64"}, max_steps=300_000),
                              seeds=range(8), sweeps={"phi": ["0.86", "0.88", "0.90", "0.92"]})
    r = ensemble.run(ej)
    assert r.converged.all()
    phis = np.asarray([0.86, 0.88, 0.90, 0.92])
    mean_p = np.asarray([r.observables["pressure"][r.sweep["phi"] == p].mean() for p in phis])
    assert np.all(np.diff(mean_p) > 0)
    a, b = np.polyfit(phis, mean_p, 1)
    assert 0.82 < -b / a < 0.86
    assert np.all(r.sensitivity["diameter"]["pressure"] > 0)


def test_export_member_and_bench_ensemble_bad_input(batch, tmp_path):
    _, path = batch
    out = tmp_path / "m.h5"
    res = runner.invoke(app, ["export", str(path), "--member", "6", "-o", str(out)])
    assert res.exit_code == 2 and "members 0 … 5" in res.output and not out.exists()
    res = runner.invoke(app, ["export", str(path), "--member", "1", "--format", "extxyz", "-o", str(out)])
    assert res.exit_code == 2 and "--member writes an mdsens run file" in res.output and not out.exists()
    res = runner.invoke(app, ["export", str(path), "-o", str(out)])
    assert res.exit_code == 2 and "--format is required" in res.output
    report = tmp_path / "b.json"
    res = runner.invoke(app, ["bench", "bidisperse", "--ensemble", "0", "-o", str(report)])
    assert res.exit_code == 2 and "at least 1" in res.output and not report.exists()


@pytest.mark.slow
def test_fixed_pressure_members_are_their_runs(tmp_path):
    """`mdsens ensemble --set pressure=P --set box_dof=shear`: each member is the
    `mdsens run` of its seed and pressure (same steps, minimum, cell, observables,
    derivatives); shear-stabilised packings have G > 0; the exported member passes
    the finite-difference check of the enthalpy minimum."""
    base = {"n": "16", "box_dof": "shear"}
    observe = ["energy", "shear_modulus", "packing_fraction"]
    ej = ensemble.EnsembleJob(J.Job(system="bidisperse", overrides=base, wrt=["pressure"], observe=observe,
                                    grad=["packing_fraction"]), seeds=range(2), sweeps={"pressure": ["0.005", "0.02"]})
    result = ensemble.run(ej)
    path = tmp_path / "p.h5"
    ensemble_io.write(path, result)
    assert result.converged.all() and result.box.shape == (4, 2, 2)
    assert np.all(result.observables["shear_modulus"] > 0)
    np.testing.assert_allclose(result.observables["stress_residual"], 0, atol=1e-10)
    for member in (1, 2):
        mb = result.members[member]
        single = J.execute(J.Job(system="bidisperse", overrides={**base, **dict(mb.sweep)}, seed=mb.seed,
                                 wrt=["pressure"], observe=observe, grad=["packing_fraction"]))
        assert single.converged and result.steps[member] == int(single.info.steps)
        record = single.record()
        np.testing.assert_allclose(result.box[member], record["box"], rtol=1e-10, atol=1e-12)
        q = np.asarray(single.system.to_solver(jnp.asarray(result.position[member]), single.params))
        dq = q - np.asarray(single.q)
        assert np.max(np.abs(dq - np.round(dq))) < 1e-9
        for name in observe:
            np.testing.assert_allclose(result.observables[name][member], single.observables[name], rtol=1e-8)
        fw = single.sensitivity["pressure"].values
        for name in ("position", "energy", "shear_modulus", "packing_fraction"):
            np.testing.assert_allclose(result.sensitivity["pressure"][name][member], fw[name], rtol=1e-6, atol=1e-8)
        grads, _ = single.gradient["packing_fraction"]
        for name, value in grads.items():
            np.testing.assert_allclose(result.gradient["packing_fraction"][name][member], value, rtol=1e-6,
                                       atol=1e-10)
    with h5py.File(path) as f:
        assert f["ensemble"].attrs["ensemble"] == "fixed pressure, box_dof=shear"
        np.testing.assert_allclose(f["ensemble/parameters/pressure"][()], [0.005, 0.005, 0.02, 0.02])
    assert "ensemble: fixed pressure, box_dof=shear" in runner.invoke(app, ["show", str(path)]).stdout
    out = tmp_path / "m2.h5"
    assert runner.invoke(app, ["export", str(path), "--member", "2", "-o", str(out)]).exit_code == 0
    checked = runner.invoke(app, ["check", str(out)])
    assert checked.exit_code == 0, checked.output
