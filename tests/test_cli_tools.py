"""The file tools: show, plot, export (read back with ASE and MDAnalysis),
check, and the progress display."""

from __future__ import annotations

import io as _stdio
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mdsens import io
from mdsens.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 2D run made by the CLI (16 disks) and a 3D one (24 spheres)."""
    folder = tmp_path_factory.mktemp("runs")
    out = {}
    for name, sets in (("2d", ["--set", "n=16"]), ("3d", ["--set", "n=24", "--set", "dim=3"])):
        path = folder / f"{name}.h5"
        result = invoke("run", *sets, "-o", path, "--quiet")
        assert result.exit_code == 0, result.output
        out[name] = path
    return out


def test_show_text_and_json(files):
    result = invoke("show", files["2d"])
    assert result.exit_code == 0, result.output
    assert "bidisperse, N = 16, d = 2" in result.stdout
    assert "most sensitive to diameter[0]" in result.stdout
    assert "made by: mdsens" in result.stdout  # the rest is sys.argv: pytest's, or empty under xdist
    result = invoke("show", files["2d"], "--json", "--top", "3")
    summary = json.loads(result.stdout)
    assert summary["system"]["n"] == 16 and summary["convergence"]["converged"]
    assert set(summary["observables"]) == {"energy", "pressure"}
    top = summary["sensitivity"]["diameter"]["most_sensitive"]["diameter[1]"]
    u = io.read(files["2d"])["sensitivity"]["diameter"]["values"]["position"][1]
    assert [row["particle"] for row in top] == list(np.argsort(-np.linalg.norm(u, axis=-1))[:3])
    assert summary["provenance"]["seed"] == 0 and summary["provenance"]["versions"]["jax"]


def test_show_bad_file_is_one_line(tmp_path):
    path = tmp_path / "x.h5"
    path.write_text("hello")
    result = invoke("show", path)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")


def test_extxyz_reads_in_ase(files, tmp_path):
    ase_io = pytest.importorskip("ase.io")
    out = tmp_path / "run.xyz"
    result = invoke("export", files["2d"], "--format", "extxyz", "-o", out)
    assert result.exit_code == 0, result.output
    record = io.read(files["2d"])
    atoms = ase_io.read(out)
    n = len(record["species"])
    assert len(atoms) == n
    np.testing.assert_allclose(atoms.positions[:, :2], record["positions"], rtol=0, atol=1e-14)
    np.testing.assert_array_equal(atoms.positions[:, 2], 0.0)
    np.testing.assert_allclose(np.diag(atoms.cell)[:2], record["box"])
    assert list(atoms.pbc) == [True, True, False]
    np.testing.assert_array_equal(atoms.arrays["type_id"], record["species"])
    np.testing.assert_allclose(atoms.arrays["diameter"], record["diameter"])
    np.testing.assert_array_equal(atoms.arrays["rattler"], record["rattler"])
    u = record["sensitivity"]["diameter"]["values"]["position"]
    for i in range(2):
        np.testing.assert_allclose(atoms.arrays[f"dx_ddiameter_{i}"][:, :2], u[i], rtol=1e-15, atol=1e-15)
    assert atoms.get_potential_energy() == pytest.approx(float(record["observables"]["energy"]), rel=1e-15)
    np.testing.assert_allclose(atoms.info["dpressure_ddiameter"], record["sensitivity"]["diameter"]["values"]["pressure"])


def test_h5md3d_reads_in_mdanalysis(files, tmp_path):
    mda = pytest.importorskip("MDAnalysis")
    out = tmp_path / "run.h5md"
    result = invoke("export", files["2d"], "--format", "h5md3d", "-o", out)
    assert result.exit_code == 0, result.output
    record = io.read(files["2d"])
    with pytest.warns(UserWarning):  # MDAnalysis cannot guess masses of unnamed particles
        universe = mda.Universe(str(out))
    assert universe.atoms.n_atoms == len(record["species"])
    ts = universe.trajectory.ts
    assert ts.time == 0.0 and ts.data["step"] == record["meta"]["steps"]
    np.testing.assert_allclose(ts.dimensions[:2], record["box"], rtol=1e-6)  # MDAnalysis keeps float32
    np.testing.assert_allclose(ts.dimensions[3:], 90.0)
    np.testing.assert_allclose(universe.atoms.positions[:, :2], record["positions"], rtol=1e-6, atol=1e-5)
    assert ts.data["energy"] == pytest.approx(float(record["observables"]["energy"]))


def test_export_refuses_to_overwrite_and_bad_format(files, tmp_path):
    out = tmp_path / "exists.xyz"
    out.write_text("keep")
    assert invoke("export", files["2d"], "--format", "extxyz", "-o", out).exit_code == 2
    assert out.read_text() == "keep"
    assert invoke("export", files["2d"], "--format", "pdb", "-o", tmp_path / "x.pdb").exit_code == 2


@pytest.mark.parametrize("dim, wrt", [("2d", None), ("2d", "diameter[1]"), ("3d", "diameter")])
def test_plot_writes_a_png(files, tmp_path, dim, wrt):
    import matplotlib.image

    out = tmp_path / "fig.png"
    args = ["plot", files[dim], "-o", out] + (["--wrt", wrt] if wrt else [])
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 500 and image.shape[1] > 1000
    assert image[..., :3].std() > 0.1  # not blank


def test_plot_unknown_wrt_is_a_usage_error(files, tmp_path):
    result = invoke("plot", files["2d"], "-o", tmp_path / "x.png", "--wrt", "epsilon")
    assert result.exit_code == 2 and "available: diameter[0], diameter[1]" in result.stderr


def test_check_agrees_with_finite_differences(files):
    result = invoke("check", files["2d"], "--wrt", "diameter[1]", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["elements"]) == ["diameter[1]"]
    # FD with Newton-polished re-relaxations reaches ~1e-7 (docs/design.md, "Pitfalls we measured"); 1e-5 leaves margin.
    assert report["ok"] and report["max_error"] < 1e-5
    assert set(report["elements"]["diameter[1]"]) == {"position", "energy", "pressure"}
    assert report["stencil"] == 4


@pytest.mark.parametrize("option, value, message", [("--stencil", "3", "choose 4"), ("--h", "0", "positive"),
                                                    ("--h", "nan", "positive")])
def test_check_refuses_a_bad_stencil_or_step(files, option, value, message):
    result = invoke("check", files["2d"], option, value)
    assert result.exit_code == 2 and message in result.stderr and "checking" not in result.stderr


def test_check_detects_a_corrupted_derivative(files, tmp_path):
    import h5py

    path = tmp_path / "bad.h5"
    path.write_bytes(files["2d"].read_bytes())
    with h5py.File(path, "a") as f:
        f["sensitivity/diameter/position"][1, 0, 0] += 0.5
    result = invoke("check", path, "--wrt", "diameter[1]")
    assert result.exit_code == 1 and "DISAGREE" in result.stdout


# -- progress -----------------------------------------------------------------------


def test_progress_is_off_when_quiet_or_not_a_terminal():
    from mdsens.cli import progress

    assert progress.relaxation_progress(1e-10, quiet=True) is None
    assert progress.relaxation_progress(1e-10, quiet=False) is None  # pytest's stderr is no terminal
    progress.finish(None)


def test_progress_display_on_a_terminal():
    from rich.console import Console

    from mdsens.cli.progress import RelaxationProgress

    sink = _stdio.StringIO()
    show = RelaxationProgress(1e-10, Console(file=sink, force_terminal=True, width=120))
    show(100, 1e-2, 0.1)
    # log scale: from 1e-2 to 1e-10 is 8 decades; 1e-6 is halfway
    assert show.fraction(1e-6) == pytest.approx(0.5)
    show(200, 1e-6, 0.2)
    show(300, 5e-11, 0.3)
    assert show.fraction(5e-11) == 1.0
    show.close()
    text = sink.getvalue()
    assert "max|F|" in text and "300" in text and "ftol 1e-10" in text


@pytest.mark.slow
def test_chunking_overhead():
    """relax.relax in chunks of 100, 500 and 2000 steps: the same steps, and the
    time per chunk boundary. Run with ``pytest -m slow -k overhead -s``."""
    import time

    import jax.numpy as jnp

    from mdsens import relax, systems

    system = systems.get("bidisperse").build(n=512, seed=0)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    base = relax.relax(system, params, chunk=100_000)
    times = {}
    for chunk in (100_000, 100, 500, 2000):
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            out = relax.relax(system, params, chunk=chunk)
            runs.append(time.perf_counter() - start - out.compile_s)
        times[chunk] = min(runs)
        assert int(out.info.steps) == int(base.info.steps)
        print(f"  chunk {chunk:6d}: {times[chunk]:.3f} s  ({100 * (times[chunk] / times[100_000] - 1):+.1f}%)")


def test_check_leaves_an_element_whose_contacts_change_unjudged(tmp_path):
    """Polydisperse N = 400, φ = 0.84, seed 6: particle 1 is a rattler ~3e-8 from
    touching a neighbour, so x*(D_1) has a kink inside θ ± 2h and the differences are
    off by 100 %. The check says the element could not be checked (exit 1: nothing was
    judged), not DISAGREE."""
    path = tmp_path / "kink.h5"
    made = invoke("run", "polydisperse", "--set", "n=400", "--set", "phi=0.84", "--seed", "6",
                  "--wrt", "diameter[1]", "-o", path, "-q")
    assert made.exit_code == 0, made.output
    result = invoke("check", path)
    assert result.exit_code == 1 and "not checked: relative error" in result.stdout
    assert "but a contact opens or closes" in result.stdout
    assert "nothing could be checked" in result.stdout and "DISAGREE" not in result.stdout
    report = json.loads(invoke("check", path, "--json", "--h", "1e-9", "--stencil", "2").stdout)
    assert report["ok"] and not report["unchecked"] and list(report["elements"]) == ["diameter[1]"]


def test_check_takes_a_derivative_zero_by_symmetry_as_zero(tmp_path):
    """A perfect Lennard-Jones crystal (no vacancy) relaxes back onto its lattice for every
    σ, so ∂x*/∂σ is zero up to round-off, on both sides of the comparison: the check
    agrees (it read DISAGREE, 190 % between two noises), and still flags a position
    derivative that is off by 1e-6."""
    import h5py

    path = tmp_path / "crystal.h5"
    made = invoke("run", "lj_crystal", "--set", "cells=6", "-o", path, "-q")
    assert made.exit_code == 0, made.output
    with h5py.File(path) as f:
        assert np.max(np.abs(f["sensitivity/sigma/position"][()])) < 1e-9  # the case: a zero by symmetry
    report = json.loads(invoke("check", path, "--json").stdout)
    assert report["ok"] and report["elements"]["sigma"]["position"] < 1e-3, report
    with h5py.File(path, "a") as f:
        f["sensitivity/sigma/position"][3, 0] += 1e-6
    result = invoke("check", path)
    assert result.exit_code == 1 and "DISAGREE" in result.stdout


def test_check_refuses_a_fixed_pressure_file_too_large_for_its_dense_polish(tmp_path, monkeypatch):
    """Fixed-box files of any size are checked (CG polish above N·d = 6000); a fixed-pressure
    file above it is refused with one line, before any relaxation."""
    import jax.numpy as jnp

    from mdsens import systems
    import mdsens.cli.check as check_cli

    family = systems.get("bidisperse")
    system = family.build_fn(seed=0, **family.resolve({"n": "3001", "pressure": "0.001"}))
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    monkeypatch.setattr(io, "read", lambda path: {"positions": system.positions, "parameters": params})
    monkeypatch.setattr(check_cli, "rebuild", lambda record: (system, params))
    result = invoke("check", str(tmp_path / "big.h5"))
    assert result.exit_code == 2, result.output
    assert "N·d = 6002 is too large" in result.stderr and "fixed-pressure" in result.stderr
    assert str(tmp_path / "big.h5") in result.stderr
