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
    assert row["fd"]["fd_contacts_changed"] == [False]  # no kink inside ± h here
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


def _report(seed, rows):
    return {"seed": seed, "rows": [{"n": n, "relax": {"steps": steps, "relax_s": seconds},
                                    **({} if peer is None else {"peer": {"steps": peer[0], "relax_s": peer[1]},
                                                                "relax_over_peer": seconds / peer[1]})}
                                   for n, steps, seconds, peer in rows]}


def test_over_seeds_takes_each_start_and_the_medians():
    from mdsens import bench

    reports = [_report(0, [(64, 100, 1.0, (80, 2.0)), (128, 300, 3.0, (200, 1.0))]),
               _report(1, [(64, 140, 2.0, (90, 1.0)), (128, 500, 4.0, (400, 8.0))]),
               _report(2, [(64, 120, 1.2, (70, 1.5)), (128, 400, 2.0, (300, 4.0))])]
    summary = bench.over_seeds(reports)
    assert [e["n"] for e in summary] == [64, 128]
    small, large = summary
    assert small["seeds"] == [0, 1, 2] and small["steps"] == [100, 140, 120]
    assert small["ratios"] == [0.5, 2.0, 1.2 / 1.5]
    assert small["median_ratios"] == pytest.approx(0.8) and small["median_steps"] == 120
    assert small["median_s_per_step"] == pytest.approx(0.01)  # 1.0/100, 2.0/140, 1.2/120
    assert large["median_ratios"] == pytest.approx(0.5)  # 3.0, 0.5, 0.5
    assert large["median_peer_s_per_step"] == pytest.approx(4.0 / 300)  # 1/200, 8/400, 4/300
    text = bench.seeds_table(summary, "lammps")
    assert "over 3 starts (seeds 0, 1, 2)" in text and "ratio per start" in text
    # without a peer: the steps of each start
    bare = bench.over_seeds([_report(s, [(32, 10 + s, 0.1, None)]) for s in range(2)])
    assert "ratios" not in bare[0] and bare[0]["steps"] == [10, 11]
    assert "10, 11" in bench.seeds_table(bare, None)


def test_bench_seed_and_seeds_are_one_choice(tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["bench", "--n", "16", "--seed", "2", "--seeds", "0:2", "-o", str(out)])
    assert result.exit_code == 2 and "--seed and --seeds" in result.output and not out.exists()
    result = CliRunner().invoke(app, ["bench", "--n", "16", "--seeds", "3:1", "-o", str(out)])
    assert result.exit_code == 2 and "empty range" in result.output and not out.exists()


@pytest.mark.slow
def test_bench_over_seeds_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("MDSENS_NO_CACHE", "1")
    out = tmp_path / "seeds.json"
    result = CliRunner().invoke(app, ["bench", "bidisperse", "--n", "16", "--seeds", "0:2", "--relax-only",
                                      "--repeats", "1", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["seed"] for r in report["per_seed"]] == [0, 1]
    (entry,) = report["over_seeds"]
    assert entry["steps"] == [r["rows"][0]["relax"]["steps"] for r in report["per_seed"]]
    assert "over 2 starts" in result.output


def test_bench_max_displacement_must_be_a_positive_length(tmp_path):
    out = tmp_path / "b.json"
    for bad in ("0", "-0.1", "inf"):
        result = CliRunner().invoke(app, ["bench", "--n", "16", "--relax-only", "--max-displacement", bad,
                                          "-o", str(out)])
        assert result.exit_code == 2, result.output
        assert "--max-displacement must be a positive length" in result.output and not out.exists()



def test_bench_fd_sample_must_not_be_negative(tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["bench", "--n", "16", "--fd-sample", "-1", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "--fd-sample -1" in result.output and not out.exists()


@pytest.mark.slow
def test_bench_fd_sample_zero_skips_the_finite_differences(tmp_path, monkeypatch):
    """``--fd-sample 0`` used to crash the finite-difference subprocess (a median of nothing)."""
    monkeypatch.setenv("MDSENS_NO_CACHE", "1")
    out = tmp_path / "b.json"
    result = CliRunner().invoke(app, ["bench", "bidisperse", "--n", "16", "--unroll-steps", "10", "--fd-sample", "0",
                                      "--repeats", "1", "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["rows"]
    assert row["fd"] == {"skipped": "--fd-sample 0"}
    assert "error" not in row["implicit"] and row["implicit"]["reverse_error"] < 1e-6
    assert "finite differences skipped" in result.output and "fd failed" not in result.output


def test_unrolled_points_that_would_not_fit_are_never_run(monkeypatch):
    """Before any unrolled point is measured, its memory is predicted from the N(N−1)/2
    pairs: at N = 1024 the first 50 steps (~6 GB) exceed a 4 GB budget, so no unrolled
    child runs at all and the full run is skipped too; at N = 64 the curve and the full
    run go ahead. (The children are faked: only the orchestration is under test.)"""
    from mdsens import bench

    spawned = []

    def fake(spec, timeout):
        task = spec["task"]
        spawned.append((spec["n"], task, spec.get("steps")))
        if task == "relax":
            return {"relax_s": 1.0, "steps": 300, "converged": True, "n_params": 2}
        if task == "baseline":
            return {"rss_mb": 200.0}
        if task == "unrolled":
            return {"unrolled_s": 0.1, "rss_mb": 200.0 + spec["steps"] * 0.5}
        return {"error": "not run in this test"}

    monkeypatch.setattr(bench, "_spawn", fake)
    report = bench.run("bidisperse", ns=(1024, 64), unroll_steps=(50, 100), memory_budget_mb=4000.0)
    big, small = report["rows"]
    assert not [s for s in spawned if s[0] == 1024 and s[1] == "unrolled"]
    assert big["unrolled_curve"] == [{"steps": 50, "skipped": big["unrolled_curve"][0]["skipped"]}]
    assert "skipped" in big["unrolled"] and big["unrolled"]["predicted_rss_mb"] > 4000.0
    assert [s[2] for s in spawned if s[0] == 64 and s[1] == "unrolled"] == [50, 100, 300]
    assert "skipped" not in small["unrolled"]
    # the prior is the measured rate at N = 1024 (112–121 MB a step) to within a few per cent
    assert 112 <= bench.unrolled_prior_mb(1024, 1) <= 125


def test_peer_ratio_is_the_median_over_alternating_rounds(monkeypatch):
    """With a peer, mdsens and the peer are timed in alternating subprocesses: the
    ratio is the median of each round's ratio, so a machine that slows down between
    rounds changes both sides of a round, not one side of the ratio. (Faked children:
    round k's times both scale by the machine's speed then.)"""
    from mdsens import bench

    speed = iter([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])  # the machine slows down round by round
    spawned = []

    def fake(spec, timeout):
        task = spec["task"]
        spawned.append((task, spec.get("repeats"), spec.get("timing_only", False)))
        if task == "relax":
            return {"relax_s": 0.8 * next(speed), "steps": 300, "converged": True, "n_params": 2}
        if task == "peer":
            return {"peer": "lammps", "relax_s": 1.0 * next(speed), "steps": 250, "s_per_step": 0.004}
        return {"rss_mb": 200.0}

    monkeypatch.setattr(bench, "_spawn", fake)
    (row,) = bench.run("bidisperse", ns=(64,), peer="lammps", relax_only=True, repeats=3)["rows"]
    assert row["relax_over_peer_rounds"] == pytest.approx([0.8, 0.8, 0.8])
    assert row["relax_over_peer"] == pytest.approx(0.8)  # mdsens first, peer last would say 0.8 / 3
    assert row["relax"]["relax_s_rounds"] == pytest.approx([0.8, 1.6, 2.4])
    assert row["relax"]["relax_s"] == pytest.approx(1.6) and row["peer"]["relax_s"] == pytest.approx(2.0)
    assert row["peer"]["relax_s_first"] == pytest.approx(1.0) and row["peer"]["s_per_step"] == pytest.approx(2.0 / 250)
    # round 1: the full children; rounds 2 and 3: one mdsens warm-up and timed run, one peer run
    assert [s for s in spawned if s[0] in ("relax", "peer")] == [
        ("relax", 3, False), ("peer", 3, False), ("relax", 1, False), ("peer", 1, True), ("relax", 1, False),
        ("peer", 1, True)]
