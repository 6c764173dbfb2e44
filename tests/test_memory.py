"""Memory preflight (mdsens/memory.py): a run too big for the machine is refused
in one line (exit 2, no file) before anything big is allocated; the estimate
is linear in N and grows with d; ``--json`` reports it beside the peak RSS."""

import json
import time

import h5py
import pytest
from typer.testing import CliRunner

from mdsens import memory
from mdsens.cli import app
from mdsens.job import Job, prepare
from mdsens.systems import UsageError

runner = CliRunner()


def test_two_billion_particles_refused_in_one_line(tmp_path):
    out = tmp_path / "x.h5"
    start = time.perf_counter()
    result = runner.invoke(app, ["run", "--set", "n=2000000000", "-o", str(out)])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --set n=2000000000 needs an estimated ")
    assert " TB" in lines[0] and "available" in lines[0] and "fewer particles" in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert elapsed < 10, elapsed  # before the build: no 32 GB of positions


def test_refused_with_the_machines_numbers(monkeypatch):
    monkeypatch.setattr(memory, "host_available", lambda: (21_000_000_000, "available"))
    with pytest.raises(UsageError, match=r"^--set n=10000000 needs an estimated \d+ GB; this machine has 21 GB "
                                         r"available \(use fewer particles\)$"):
        prepare(Job(overrides={"n": "10000000"}))


def test_checked_again_after_the_build(monkeypatch):
    # polydisperse: --wrt diameter is N tangents, N·(N, d) outputs: only the built
    # system knows; a free-space Morse cluster has no cutoff (all pairs, N²).
    with pytest.raises(UsageError, match="needs an estimated"):
        prepare(Job(system="polydisperse", overrides={"n": "100000"}))
    with pytest.raises(UsageError, match="needs an estimated"):
        prepare(Job(system="morse_cluster", overrides={"n": "60000"}))


def test_estimate_linear_in_n_and_grows_with_d():
    def total(n, dim, **kw):
        return memory.estimate(n, dim, neighbors=30, candidates=160, **kw)["total"]

    # From 32768 particles the coarse space is at its 1024 cells: affine in N.
    n = 100_000
    step1 = total(2 * n, 2) - total(n, 2)
    step2 = total(4 * n, 2) - total(2 * n, 2)
    assert step1 > 0 and step2 == pytest.approx(2 * step1, rel=1e-9)
    for n in (1000, 100_000, 10_000_000):
        assert total(n, 3) > total(n, 2)
        assert memory.estimate(n, 3)["total"] > memory.estimate(n, 2)["total"]  # default table widths too
        assert total(n, 2, wrt_elements=4) > total(n, 2)
        assert total(n, 2, elastic=True) > total(n, 2)
    # all pairs: quadratic
    assert memory.estimate(2000, 2, all_pairs=True)["total"] > 3 * memory.estimate(1000, 2, all_pairs=True)["total"]
    # the sparse solve's factors: N log N, counted only when that solve runs
    assert memory.estimate(1000, 2)["sparse_factor"] == 0
    f1, f2 = (memory.estimate(n, 2, sparse=True)["sparse_factor"] for n in (16384, 131072))
    assert 8 < f2 / f1 < 8 * 1.5
    # at N = 131072 SuperLU's L + U held 4.3e7 entries (docs/design.md): the estimate is not below that
    assert memory.sparse_fill(2 * 131072) >= 4.2e7


def test_prepare_counts_the_factor_when_auto_picks_the_sparse_solve():
    run, cg = Job(overrides={"n": "4096"}), Job(overrides={"n": "4096"}, solver="cg")
    system, _, _ = prepare(run)
    prepare(cg)
    assert run.solver == "sparse" and cg.solver == "cg"
    assert memory.recall(system)["sparse_factor"] > 0


def test_json_reports_estimate_and_peak(tmp_path):
    out = tmp_path / "x.h5"
    result = runner.invoke(app, ["run", "--set", "n=32", "--json", "-q", "-o", str(out)])
    assert result.exit_code == 0, result.output
    mem = json.loads(result.stdout)["memory"]
    # the bare process (~0.5 GB) plus N = 32's data: at least the runtime floor
    assert mem["estimate_mb"] >= memory.RUNTIME_BYTES / 1e6
    assert mem["estimate_mb"] < 2000
    assert mem["peak_rss_mb"] > 50
    with h5py.File(out) as f:
        assert json.loads(f["parameters"].attrs["memory"])["estimate_mb"] == pytest.approx(mem["estimate_mb"])
