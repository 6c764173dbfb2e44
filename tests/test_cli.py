"""`mdsens run` / `mdsens systems`: the file contract, JSON, exit codes, errors."""

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from mdsens.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "small.h5"
    result = runner.invoke(app, ["run", "--set", "n=16", "--set", "phi=0.95", "--seed", "1",
                                 "--wrt", "diameter", "--wrt", "alpha", "--grad", "energy",
                                 "-o", str(out), "--json"])
    return result, out


def test_run_writes_the_contracted_paths(small_run):
    result, out = small_run
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("converged", "steps", "energy", "pressure", "max_force", "output"):
        assert key in summary
    assert set(summary["timings"]) >= {"compile_s", "relax_s", "derivative_s"}
    assert summary["converged"] is True and summary["output"] == str(out)
    with h5py.File(out) as f:
        assert list(f["h5md"].attrs["version"]) == [1, 1]
        assert f["h5md/creator"].attrs["name"] == "mdsens"
        assert "name" in f["h5md/author"].attrs
        assert f["particles/all/position/value"].shape == (1, 16, 2)
        assert "step" in f["particles/all/position"] and "time" in f["particles/all/position"]
        box = f["particles/all/box"]
        assert box.attrs["dimension"] == 2
        assert [b.decode() if isinstance(b, bytes) else b for b in box.attrs["boundary"]] == ["periodic"] * 2
        assert box["edges"].shape == (2,)
        assert f["particles/all/species"].shape == (16,) and f["particles/all/species"].dtype.kind == "i"
        assert f["particles/all/rattler"].dtype == bool
        assert f["parameters/diameter"].shape == (2,)
        assert f["parameters/epsilon"].shape == () and f["parameters/alpha"].shape == ()
        attrs = f["parameters"].attrs
        for key in ("configuration", "seed", "command", "versions", "device", "precision"):
            assert key in attrs
        assert json.loads(attrs["configuration"])["n"] == 16
        for key in ("energy", "pressure", "max_force", "minimizer_steps", "converged"):
            assert f[f"observables/{key}"].shape == ()
        assert f["sensitivity/diameter/position"].shape == (2, 16, 2)
        assert f["sensitivity/diameter/energy"].shape == (2,)
        assert f["sensitivity/alpha/position"].shape == (16, 2)
        assert len(f["sensitivity/diameter"].attrs["iterations"]) == 2
        assert np.all(f["sensitivity/diameter"].attrs["residual"] < 1e-9)
        # Forward (per element) and reverse (all at once) are separate solves.
        np.testing.assert_allclose(f["gradient/energy/diameter"][()], f["sensitivity/diameter/energy"][()],
                                   rtol=1e-8)
        assert f["gradient/energy/box"].shape == (2,)
        assert np.isclose(float(f["observables/energy"][()]), summary["energy"])


def test_refuses_to_overwrite(small_run):
    _, out = small_run
    before = out.read_bytes()
    result = runner.invoke(app, ["run", "-o", str(out)])
    assert result.exit_code == 2 and "--force" in result.stderr
    assert out.read_bytes() == before


@pytest.mark.parametrize("args,message", [
    (["--wrt", "foo"], "no parameter 'foo'"),
    (["--wrt", "diameter[5]"], "out of range"),
    (["--wrt", "diameter[x"], "expected NAME"),
    (["--set", "nn=3"], "has no key 'nn'"),
    (["--set", "n=three"], "expected int"),
    (["--set", "phi=-1"], "must be positive"),
    (["--set", "diameter=1.0"], "exactly two"),
    (["--observe", "entropy"], "unknown observable"),
    (["--grad", "entropy"], "unknown observable"),
    (["--minimizer", "bfgs"], "unknown minimizer"),
    (["nosuchsystem"], "unknown system"),
    (["--max-steps", str(2**70)], "--max-steps must be between 0 and"),
    (["--max-steps", "-1"], "--max-steps must be between 0 and"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["run", *args, "-o", str(tmp_path / "x.h5")])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "x.h5").exists()


def test_not_converged_writes_flagged_state_exit_3(tmp_path):
    out = tmp_path / "partial.h5"
    result = runner.invoke(app, ["run", "--set", "n=16", "--max-steps", "5", "-o", str(out), "--quiet"])
    assert result.exit_code == 3 and "did not converge" in result.stderr
    with h5py.File(out) as f:
        assert not bool(f["observables/converged"][()])
        assert int(f["observables/minimizer_steps"][()]) == 5
        assert "sensitivity" not in f


def test_systems_lists_keys_and_parameters():
    result = runner.invoke(app, ["systems", "--json"])
    assert result.exit_code == 0
    catalogue = json.loads(result.stdout)
    entry = catalogue["bidisperse"]
    assert entry["keys"]["n"]["default"] == 128 and "diameter" in entry["parameters"]


def test_default_wrt_is_the_systems_first_parameter(tmp_path):
    """A system without `diameter` differentiates by its first parameter; a
    neighbor list is refused for an interaction with no cutoff."""
    out = tmp_path / "dimer.h5"
    result = runner.invoke(app, ["run", "morse_cluster", "--set", "n=2", "--set", "dim=2", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert list(summary["sensitivity"]) == ["sigma"] and "pressure" not in summary
    with h5py.File(out) as f:
        x = f["particles/all/position/value"][0]
        dx = f["sensitivity/sigma/position"][()]
        # The dimer: distance = σ and d(distance)/dσ = 1 (analytic), and the gauge
        # keeps the centre of mass still.
        assert np.linalg.norm(x[0] - x[1]) == pytest.approx(float(f["parameters/sigma"][()]), rel=1e-9)
        assert np.dot(dx[0] - dx[1], (x[0] - x[1]) / np.linalg.norm(x[0] - x[1])) == pytest.approx(1.0, rel=1e-8)
        np.testing.assert_allclose(dx.sum(axis=0), 0.0, atol=1e-12)
    result = runner.invoke(app, ["run", "morse_cluster", "--neighbor-list", "-o", str(tmp_path / "x.h5")])
    assert result.exit_code == 2 and "no cutoff" in result.stderr


def test_device_gpu_without_a_gpu_is_one_line_exit_2(tmp_path):
    """`--device gpu` where JAX has no CUDA plugin or sees no GPU: one line saying
    what to install (or that no GPU is visible), exit 2, no file — checked before
    any work, in a fresh process (the platform is chosen once per process)."""
    import subprocess
    import sys
    from pathlib import Path

    import jax

    try:
        jax.devices("gpu")
        pytest.skip("a GPU is visible here; this checks the machine without one")
    except RuntimeError:
        pass
    script = Path(sys.executable).with_name("mdsens")
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", "from mdsens.cli import main; main()"]
    out = tmp_path / "gpu.h5"
    proc = subprocess.run([*cmd, "run", "--device", "gpu", "--set", "n=16", "-o", str(out), "--no-cache"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: --device gpu:")
    assert 'pip install -e ".[cuda12]"' in lines[0] or "no GPU is visible" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_run_max_displacement_is_recorded_and_checked(tmp_path):
    from mdsens import io

    out = tmp_path / "capped.h5"
    result = runner.invoke(app, ["run", "--set", "n=16", "--set", "phi=0.95", "--max-displacement", "0.05",
                                 "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    got = io.read(out)
    assert got["meta"]["max_displacement"] == 0.05 and got["meta"]["converged"]
    for args, message in ((["--max-displacement", "0.1", "--minimizer", "gd"], "caps FIRE"),
                          (["--max-displacement", "0"], "positive length")):
        bad = tmp_path / "bad.h5"
        result = runner.invoke(app, ["run", "--set", "n=16", *args, "-o", str(bad)])
        assert result.exit_code == 2 and message in result.output and not bad.exists()


@pytest.mark.parametrize("command, text", [
    (["bench"], ".[peers]"), (["run"], "NAME[i]"), (["check"], "NAME[i]"),
    (["ensemble"], "NAME[i]"), (["plot"], "NAME[i]"),
])
def test_help_keeps_its_brackets(command, text):
    """Help text goes through Rich markup, where an unescaped ``[i]`` or ``[peers]`` is a
    tag and vanishes: "NAME or NAME[i]" would read "NAME or NAME"."""
    result = CliRunner().invoke(app, command + ["--help"], env={"COLUMNS": "300"})
    assert result.exit_code == 0
    assert text in result.output
