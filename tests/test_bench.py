"""`mdsens bench` smoke run: tiny N, every method, a table and a JSON report."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from mdsens.cli import app


@pytest.mark.slow
def test_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("MDSENS_NO_CACHE", "1")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--n", "16", "--unroll-steps", "10,20", "--fd-sample", "1",
                                      "--repeats", "1", "--set", "phi=0.9", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["relax"]["converged"]
    for key in ("implicit", "reference", "fd"):
        assert "error" not in row[key], row[key]
    assert row["implicit"]["reverse_error"] < 1e-6
    # central differences, re-relaxed from x* (not from x0) at D_i ± h, agree with the reference
    assert row["fd"]["fd_error"] < 1e-4, row["fd"]
    assert row["fd"]["fd_relax_steps"] < row["relax"]["steps"], (row["fd"], row["relax"])
    assert [c["steps"] for c in row["unrolled_curve"]] == [10, 20]
    assert "rss_mb" in row["implicit"] and "N" in result.output


def test_fd_relaxation_starts_from_the_given_positions():
    """The finite differences' relaxation starts where it is told (x*), so at x*
    with the same tolerance there is nothing left to do; from x0 there is."""
    import jax.numpy as jnp

    from mdsens import bench

    spec = {"system": "polydisperse", "n": 16, "seed": 0, "set": {"phi": "0.9"}, "max_steps": 100_000}
    system, params = bench._setup(spec)
    relax = bench._relax_fn(spec, system, 1e-10)
    x_star, info, _, _ = relax(jnp.asarray(system.positions), params)
    assert bool(info.converged) and int(info.steps) > 50
    again, info2, _, _ = relax(x_star, params)
    assert bool(info2.converged) and int(info2.steps) <= 1, int(info2.steps)
    box = params["box"]
    assert float(jnp.max(jnp.abs(jnp.mod(again - x_star + box / 2, box) - box / 2))) < 1e-8
