"""`mdsens bench` smoke run: tiny N, every method, a table and a JSON report."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mdsens.cli import app


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
    assert [c["steps"] for c in row["unrolled_curve"]] == [10, 20]
    assert "rss_mb" in row["implicit"] and "N" in result.output
