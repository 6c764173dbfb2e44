"""Fixed-pressure against fixed-box relaxation time, side by side in one process.

    python bench/pressure/speed.py [N ...] [--pressure P] [--box-dof iso|aniso|shear] [--repeats R]

Both start from the same fixed-pressure start (`bidisperse`, seed 0, φ = 0.86
in 2D): the fixed-box run relaxes that packing in its own box, the
fixed-pressure run relaxes positions and box together at P. Each relaxation
runs once to compile and then `--repeats` times, the two alternating (so that
other load on the machine falls on both alike); the medians of the wall times
and their ratio are printed and written as JSON to stdout's last line (issue
10's target: fixed pressure ≤ 1.5× fixed box), with the medians of the
process CPU times (``*_cpu_s``, ``cpu_ratio``: less sensitive to other jobs
on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import fields

import jax

jax.config.update("jax_enable_x64", True)

from mdsens import barostat, relax, systems  # noqa: E402
from mdsens.system import System  # noqa: E402


def timed(fns, repeats):
    """Each of ``fns`` once (compiles), then all in turn ``repeats`` times:
    per function (last output, median wall s, all wall s, median CPU s)."""
    outs = [fn() for fn in fns]
    wall = [[] for _ in fns]
    cpu = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t, c = time.perf_counter(), time.process_time()
            outs[k] = fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return [(outs[k], statistics.median(wall[k]), wall[k], statistics.median(cpu[k])) for k in range(len(fns))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="*", type=int, default=[1024, 4096])
    ap.add_argument("--pressure", type=float, default=0.01)
    ap.add_argument("--box-dof", default="iso")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dim", type=int, default=2)
    args = ap.parse_args()
    rows = []
    for n in args.n:
        cell = systems.get("bidisperse").build(n=n, dim=args.dim, seed=0, pressure=args.pressure,
                                               box_dof=args.box_dof)
        # the fixed box: the same start, positions only (the CellSystem's parent fields)
        values = {f.name: getattr(cell, f.name) for f in fields(System)}
        values["params"] = barostat.split(cell.params)[0]
        values["params"].pop("pressure")
        fixed = System(**values)
        (rb, tb, all_b, cb), (rp, tp, all_p, cp) = timed(
            [lambda: relax.relax(fixed, fixed.params), lambda: barostat.relax(cell)], args.repeats)
        row = {"n": n, "dim": args.dim, "pressure": args.pressure, "box_dof": args.box_dof,
               "fixed_box_s": tb, "fixed_box_steps": int(rb.info.steps), "fixed_box_all_s": all_b,
               "fixed_pressure_s": tp, "fixed_pressure_steps": int(rp.info.steps), "fixed_pressure_all_s": all_p,
               "fixed_box_cpu_s": cb, "fixed_pressure_cpu_s": cp,
               "ratio": tp / tb, "cpu_ratio": cp / cb,
               "per_step_ratio": (tp / int(rp.info.steps)) / (tb / int(rb.info.steps)),
               "converged": [bool(rb.info.converged), bool(rp.info.converged)]}
        rows.append(row)
        print(f"N={n:6d} fixed box {tb:7.3f} s ({row['fixed_box_steps']} steps)  fixed P {tp:7.3f} s "
              f"({row['fixed_pressure_steps']} steps)  ratio {row['ratio']:.2f}  per step {row['per_step_ratio']:.2f}  "
              f"(CPU time: ratio {row['cpu_ratio']:.2f})",
              flush=True)
    print(json.dumps({"device": jax.devices()[0].device_kind, "rows": rows}))


if __name__ == "__main__":
    main()
