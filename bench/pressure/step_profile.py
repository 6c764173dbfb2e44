"""One FIRE step of the fixed-box and of the fixed-pressure relaxation, and their
parts, timed in isolation on a fixed neighbor table (a microbenchmark).

    python bench/pressure/step_profile.py [N ...] [--steps K] [--repeats R] [--warm S]

Both start from the fixed-pressure start of ``bench/pressure/speed.py``
(`bidisperse`, seed 0, φ = 0.86, P = 0.01, iso), relaxed ``--warm`` steps
(default 1000) by their own relaxations, so that the table is the one of a
relaxation in progress. Then, with the table and pair list built once at
that state, each part runs ``--steps`` times in one compiled ``fori_loop``;
the loops of both relaxations run in turn, ``--repeats`` rounds, and the
per-step cost in µs (the best round, wall clock and process CPU time: the
latter is less sensitive to other load on the machine) is printed:

- ``step``: one FIRE step (``step_x`` then the force),
- ``force``: the force alone, ``step_x``: the FIRE update alone,
- ``running``: the convergence test (fixed box ``max|F| ≥ ftol``; fixed P
  also the stress residual), ``valid``: the table's validity test,
- ``loop``: the inner loop's body as the relaxation runs it (step, valid,
  running),
- ``rebuild``: a table build, its pair list and the force on it (once every
  few tens of steps in a relaxation).

JSON on stdout's last line.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mdsens import barostat, minimize, relax, systems  # noqa: E402
from mdsens.system import System  # noqa: E402


def interleaved(cases, steps, repeats):
    """``cases``: {label: (fn, arg)}, compiled and run in turn ``repeats`` rounds;
    {label: (best wall µs per step, best CPU µs per step)}."""
    for fn, arg in cases.values():
        jax.block_until_ready(fn(arg))  # compile
    wall = {k: [] for k in cases}
    cpu = {k: [] for k in cases}
    for _ in range(repeats):
        for k, (fn, arg) in cases.items():
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(arg))
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: (1e6 * min(wall[k]) / steps, 1e6 * min(cpu[k]) / steps) for k in cases}


def loops(step_x, step_force, running, valid, rebuild, steps):
    """Jitted fori_loops over a FIRE state, each exercising one part. The
    carried state changes each iteration, so nothing is loop-invariant."""

    def nudge(s, k):  # a state-dependent, negligible change of x
        return s._replace(x=jax.tree.map(lambda a: a + 1e-30 * k, s.x))

    def run(body):
        return jax.jit(lambda s: jax.lax.fori_loop(0, steps, body, s))

    return {
        "step": run(lambda k, s: step_force(step_x(s))),
        "force": run(lambda k, s: step_force(nudge(s, k))),
        "step_x": run(lambda k, s: step_x(s)),
        "running": run(lambda k, s: nudge(s, jnp.where(running(s), 1.0, 0.0))),
        "valid": run(lambda k, s: nudge(s, jnp.where(valid(s), 1.0, 0.0))),
        "loop": run(lambda k, s: (lambda s2: nudge(s2, jnp.where(valid(s2) & running(s2), 0.0, 1.0)))(
            step_force(step_x(s)))),
        "rebuild": run(lambda k, s: rebuild(nudge(s, k))),
    }


def fixed_box(system, params, warm, ftol, steps):
    out = relax.relax(system, params, max_steps=warm, ftol=ftol)
    table, programs = relax._programs(system, params, "fire", ftol, relax.DEFAULT_SKIN)
    mini = programs.minimizer
    x = out.x
    capacity, cell_capacity = table.capacities(x)
    nb = table.build(x, capacity, cell_capacity)
    pl = relax.pair_list(nb.idx, system.n, table.pair_capacity(x, cell_capacity))
    env = (params, pl)
    state = mini.init(x, env)
    def rebuild(s):
        nb_ = table.build(s.x, capacity, cell_capacity)
        pl_ = relax.pair_list(nb_.idx, system.n, pl.i.shape[0])
        return mini.step_force(s, (params, pl_))

    parts = loops(lambda s: mini.step_x(s, env), lambda s: mini.step_force(s, env),
                  lambda s: minimize.running(mini, s, ftol, jnp.asarray(10**9, jnp.int32)),
                  lambda s: ~table.moved(s.x, nb), rebuild, steps)
    return {k: (f, state) for k, f in parts.items()}, int(pl.i.shape[0]), capacity


def fixed_pressure(cell, warm, ftol, steps):
    out = barostat.relax(cell, max_steps=warm, ftol=ftol)
    theta, strain = barostat.split(out.params)
    n, d = cell.n, cell.dim
    scale = float(barostat._programs(cell, "fire", ftol, barostat.DEFAULT_SKIN, 1)["scale"](theta))
    f = np.asarray(barostat.deformation(strain, cell.box_dof))
    smallest = float(np.min(np.linalg.svd(f, compute_uv=False)))
    stretch = barostat.GRID_MARGIN ** np.ceil(np.log(smallest) / np.log(barostat.GRID_MARGIN) + 0.5)
    programs = barostat._cell_programs(cell, theta, "fire", ftol, barostat.DEFAULT_SKIN, float(stretch))
    table, mini = programs["table"], programs["mini"]
    y = out.q * theta["box"]
    x = (y, barostat.coordinates(cell, strain) * scale)
    fj = jnp.asarray(f)
    capacity, cell_capacity = table.capacities(y, deform=fj)
    nb = table.build(y, capacity, cell_capacity, deform=fj)
    pl = relax.pair_list(nb.idx, n, table.pair_capacity(y, cell_capacity, deform=fj))
    env = (theta, pl)
    state = mini.init(x, env)
    ref_inverse = jnp.linalg.inv(fj)
    def rebuild(s):
        f_ = programs["deform"](s.x, theta)
        nb_ = table.build(s.x[0], capacity, cell_capacity, deform=f_)
        pl_ = relax.pair_list(nb_.idx, n, pl.i.shape[0])
        return mini.step_force(s, (theta, pl_))

    parts = loops(lambda s: mini.step_x(s, env), lambda s: mini.step_force(s, env),
                  lambda s: programs["running"](s, theta),
                  lambda s: programs["valid"](s.x, theta, nb, ref_inverse), rebuild, steps)
    return {k: (f, state) for k, f in parts.items()}, int(pl.i.shape[0]), capacity


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="*", type=int, default=[1024, 4096])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warm", type=int, default=1000)
    ap.add_argument("--pressure", type=float, default=0.01)
    ap.add_argument("--box-dof", default="iso")
    args = ap.parse_args()
    ftol = 1e-10
    rows = []
    for n in args.n:
        cell = systems.get("bidisperse").build(n=n, dim=2, seed=0, pressure=args.pressure, box_dof=args.box_dof)
        values = {f.name: getattr(cell, f.name) for f in fields(System)}
        values["params"] = barostat.split(cell.params)[0]
        values["params"].pop("pressure")
        fixed = System(**values)
        box, box_pairs, box_k = fixed_box(fixed, fixed.params, args.warm, ftol, args.steps)
        cellp, cell_pairs, cell_k = fixed_pressure(cell, args.warm, ftol, args.steps)
        timed = interleaved({**{("box", k): v for k, v in box.items()}, **{("P", k): v for k, v in cellp.items()}},
                            args.steps, args.repeats)
        parts = list(box)
        row = {"n": n, "box_dof": args.box_dof,
               "fixed_box_us": {k: timed["box", k][0] for k in parts},
               "fixed_pressure_us": {k: timed["P", k][0] for k in parts},
               "fixed_box_cpu_us": {k: timed["box", k][1] for k in parts},
               "fixed_pressure_cpu_us": {k: timed["P", k][1] for k in parts},
               "pairs": [box_pairs, cell_pairs], "table_width": [box_k, cell_k]}
        row["ratio"] = {k: row["fixed_pressure_us"][k] / row["fixed_box_us"][k] for k in parts}
        row["cpu_ratio"] = {k: row["fixed_pressure_cpu_us"][k] / row["fixed_box_cpu_us"][k] for k in parts}
        rows.append(row)
        print(f"N={n}  pair capacity {box_pairs} / {cell_pairs}, table width {box_k} / {cell_k}  (µs per step; "
              "wall, CPU in brackets)")
        for k in parts:
            print(f"  {k:8s} fixed box {timed['box', k][0]:7.1f} ({timed['box', k][1]:7.1f})  "
                  f"fixed P {timed['P', k][0]:7.1f} ({timed['P', k][1]:7.1f})  "
                  f"ratio {row['ratio'][k]:.2f} ({row['cpu_ratio'][k]:.2f})")
    print(json.dumps({"device": jax.devices()[0].device_kind, "steps": args.steps, "repeats": args.repeats,
                      "rows": rows}))


if __name__ == "__main__":
    main()
