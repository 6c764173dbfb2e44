"""Checkpoints: a relaxation continued from a saved state takes exactly the steps
of an uninterrupted one, through the driver and through `mdsens run --resume`."""

from __future__ import annotations

import json

import pytest

import jax.numpy as jnp
import numpy as np
from typer.testing import CliRunner

from mdsens import relax, systems
from mdsens.cli.app import app


def test_resumed_relaxation_retraces_the_uninterrupted_one():
    system = systems.get("bidisperse").build(n=128, dim=2, phi=0.9, seed=5)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    saved = []
    whole = relax.relax(system, params, chunk=150, checkpoint=saved.append, checkpoint_every=0.0)
    assert bool(whole.info.converged) and len(saved) >= 3
    middle = saved[len(saved) // 2]
    assert 0 < int(middle["step"]) < int(whole.info.steps)
    resumed = relax.relax(system, params, chunk=150, resume=middle)
    assert int(resumed.info.steps) == int(whole.info.steps)
    np.testing.assert_array_equal(np.asarray(resumed.x), np.asarray(whole.x))


@pytest.mark.slow
def test_cli_checkpoint_then_resume(tmp_path):
    runner = CliRunner()
    base = ["run", "--set", "n=96", "--no-cache", "--quiet", "--json"]
    plain = runner.invoke(app, base + ["-o", str(tmp_path / "plain.h5")])
    assert plain.exit_code == 0, plain.output
    steps = json.loads(plain.stdout)["steps"]
    ck = tmp_path / "ck.npz"
    # Stopped early (exit 3, not converged), with a checkpoint of where it was.
    cut = runner.invoke(app, base + ["-o", str(tmp_path / "cut.h5"), "--max-steps", str(steps // 2),
                                     "--checkpoint", str(ck), "--checkpoint-every", "0"])
    assert cut.exit_code == 3, cut.output
    assert ck.exists() and not list(tmp_path.glob("ck.npz.tmp*"))
    done = runner.invoke(app, base + ["-o", str(tmp_path / "done.h5"), "--resume", str(ck)])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["steps"] == steps
    # A checkpoint of another run is refused in one line.
    other = runner.invoke(app, ["run", "--set", "n=64", "--quiet", "-o", str(tmp_path / "x.h5"), "--resume", str(ck)])
    assert other.exit_code == 2 and "another run" in other.output and not (tmp_path / "x.h5").exists()
