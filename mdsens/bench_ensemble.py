"""``mdsens bench --ensemble M``: one ``mdsens ensemble`` of M members against
M sequential ``mdsens run`` calls, side by side, as a user would run them.

Every figure is a whole command's wall time in its own process (start-up,
import, compilation or the persistent compilation cache, relaxation,
derivatives, writing the file), because that is what a shell loop over
``mdsens run`` costs. The ensemble command is run twice (the second finds its
compiled programs in the persistent cache, like every run of the loop after
the first); ``sequential`` of the M runs are timed and their median is
multiplied by M. The runs' minima are compared with the members'
(same seed): a member that ended in another minimum is counted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np


def _command(args: list[str], timeout: float) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    # Run from the temporary directory: from a source checkout's root, "mdsens"
    # would import the source folder instead of the installed package.
    done = subprocess.run([sys.executable, "-c", "from mdsens.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - start
    if done.returncode not in (0, 3):
        raise RuntimeError(f"mdsens {' '.join(args[:3])} … failed (exit {done.returncode}): "
                           f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    return wall, json.loads(done.stdout)


def run(system: str, ns: tuple[int, ...], members: int, sequential: int, overrides: dict[str, str],
        timeout: float = 3600.0, log: Callable[[str], None] = print, device: str | None = None) -> dict[str, Any]:
    """The report: per N, the ensemble's and the runs' wall times, packings per
    second, their ratio, the ensemble's peak RSS, and the minima that differ."""
    from mdsens import ensemble_io

    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    dev = [] if device is None else ["--device", device]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in ns:
            base = [system, "--set", f"n={n}", *sets, *dev, "--json", "-q", "--force"]
            ens_path = os.path.join(tmp, f"ens{n}.h5")
            log(f"N = {n}: mdsens ensemble --seeds 0:{members} (twice) ...")
            first, _ = _command(["ensemble", *base, "--seeds", f"0:{members}", "-o", ens_path], timeout)
            second, summary = _command(["ensemble", *base, "--seeds", f"0:{members}", "-o", ens_path], timeout)
            data = ensemble_io.read(ens_path)
            count = min(sequential, members)
            log(f"N = {n}: {count} sequential mdsens run ...")
            walls, same = [], 0
            for seed in range(count):
                run_path = os.path.join(tmp, f"run{n}_{seed}.h5")
                wall, _ = _command(["run", *base, "--seed", str(seed), "-o", run_path], timeout)
                walls.append(wall)
                from mdsens import io

                record = io.read(run_path)
                d = np.asarray(record["positions"]) - data["position"][seed]
                if record["box"] is not None:
                    box = np.asarray(record["box"])
                    d -= box * np.round(d / box)
                same += int(np.max(np.abs(d)) < 1e-8)
            per_run = statistics.median(walls)
            rows.append({
                "n": n, "members": members, "ensemble_first_s": first, "ensemble_s": second,
                "ensemble_timings": summary["timings"], "converged": summary["converged"],
                "peak_rss_mb": summary.get("peak_rss_mb"),
                "runs_timed": count, "run_median_s": per_run, "runs_total_s": per_run * members,
                "packings_per_s_ensemble": members / second, "packings_per_s_runs": 1.0 / per_run,
                "speedup": per_run * members / second, "same_minimum": same, "compared": count,
            })
    return {"kind": "ensemble", "system": system, "overrides": overrides, "rows": rows}


def table(report: dict[str, Any]) -> str:
    lines = [f"{report['system']}: one `mdsens ensemble` of M members vs M sequential `mdsens run` (wall times of "
             "whole commands)",
             "| N | M | ensemble (first / cached) | relax / derivatives inside | per run (median) | M runs | "
             "packings/s ensemble / runs | speed-up | peak RSS | same minimum |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        t = r["ensemble_timings"]
        lines.append(
            f"| {r['n']} | {r['members']} | {r['ensemble_first_s']:.1f} s / {r['ensemble_s']:.1f} s | "
            f"{t['relax_s']:.2f} s / {t['derivative_s']:.2f} s | {r['run_median_s']:.2f} s | "
            f"{r['runs_total_s']:.0f} s | {r['packings_per_s_ensemble']:.2f} / {r['packings_per_s_runs']:.3f} | "
            f"{r['speedup']:.1f}× | {r['peak_rss_mb']} MB | {r['same_minimum']}/{r['compared']} |")
    return "\n".join(lines)
