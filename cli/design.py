"""``mdsens design``: tune parameters until the relaxed packing does what is asked."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mdsens.cli.app import EXIT_NOT_CONVERGED, EXIT_USAGE, app, errors, fail, log
from mdsens.cli.run import _parse_sets, configure, require_writable


def _progress_line(design, quiet: bool):
    def progress(step, k: int, note: str) -> None:
        if quiet:
            return
        shown = " ".join(
            f"{name}={float(step.values[name]):.6g}" + (f" (target {design.targets[name]:g})"
                                                       if name in design.targets else "")
            for name in [*design.targets, *design.minimize, *design.maximize])
        shown += "".join(f" {name}={float(step.values[name]):.6g} (stop at {value:g})"
                         for name, value in design.stop_at.items() if name not in design.targets)
        extra = f"  [{note}]" if note else ""
        log(f"step {k:>4d}/{design.steps - 1}  loss {step.loss:.6e}  {shown}  lr {step.lr:.3g}  "
            f"relax {int(step.info.steps)} steps{extra}")

    return progress


def _human_summary(result, output: Path) -> str:
    s = result.summary()
    lines = [f"{s['system']}: N={s['n']} d={s['dim']}  {s['steps']} steps ({s['stopped']}), "
             f"loss {s['loss']['start']:.6g} -> {s['loss']['final']:.6g}"]
    for name, v in s["observables"].items():
        target = f"  (target {s['targets'][name]:g})" if name in s["targets"] else ""
        lines.append(f"  {name:<14s} {v['start']:.8g} -> {v['final']:.8g}{target}")
    lines.append(f"contact changes {s['contact_changes']}, rejected steps {s['rejections']}, "
                 f"loss jumps {s['jumps']}, compiles {s['compiles']}")
    best = s["best"]
    lines.append(f"{'written' if s['stopped'] == 'stop-at' else 'lowest loss'} {best['loss']:.6g} at step {best['step']}: "
                 + ", ".join(f"{n} {best[n]:.8g}" for n in s["observables"]))
    for c in s["fd_check"]:
        lines.append(f"  fd check step {int(c['step'])}: gradient·v {c['directional']:.8e}, "
                     f"finite difference {c['finite_difference']:.8e}, relative error {c['relative_error']:.1e}"
                     f" {'ok' if c['passed'] else 'FAILED'}")
    t = s["timings"]
    lines.append(f"time: relax {t['relax_s']:.2f} s, loss and gradient {t['loss_s']:.2f} s "
                 f"(compile {t.get('compile_s', 0.0):.2f} s), checks {t['fd_check_s']:.2f} s, total {t['total_s']:.2f} s")
    why = "where --stop-at was met" if s["stopped"] == "stop-at" else "the lowest loss"
    lines.append(f"wrote {output} (the packing of step {best['step']}, {why})")
    return "\n".join(lines)


@app.command()
def design(
    system: str = typer.Argument("polydisperse", help="System family (see `mdsens systems`)."),
    target: List[str] = typer.Option([], "--target", help="OBS=VALUE: drive a scalar observable to a value (repeatable); the loss sums the squared relative errors."),
    minimize: List[str] = typer.Option([], "--minimize", help="Scalar observable to minimise (added to the loss)."),
    maximize: List[str] = typer.Option([], "--maximize", help="Scalar observable to maximise (subtracted from the loss)."),
    vary: List[str] = typer.Option([], "--vary", help="Parameter to tune (repeatable), e.g. diameter: every element."),
    steps: int = typer.Option(50, "--steps", help="Design steps K: the start and K-1 updates."),
    optimizer: str = typer.Option("adam", help="optax optimizer: adam, rmsprop or sgd."),
    lr: float = typer.Option(0.01, "--lr", help="Learning rate (halved on every rejected step)."),
    bound: List[str] = typer.Option([], "--bound", help="PARAM=LO,HI: keep a varied parameter in [LO, HI] by projection (LO or HI may be empty). Diameters, ε, σ stay positive by default."),
    keep: Optional[str] = typer.Option(None, "--keep", help="What the design holds while parameters change. phi: the box is scaled with the diameters to hold the packing fraction. pressure: every step relaxes positions and cell at the target pressure, and the gradient carries the cell's response (build the system with --set pressure=P [--set box_dof=iso|aniso|shear]; such a system implies it; --vary pressure tunes P itself)."),
    max_rise: Optional[float] = typer.Option(None, "--max-rise", help="Step-size control: reject a step whose loss rises by more than R·|loss| (plus 1e-3 of the starting loss), across a contact change too, and retry it at half the rate (the last of the retries is accepted). 0: every step must lower the loss. Default: only a rise above the loss itself within one contact network is rejected; jumps across contact changes are accepted and halve the rate."),
    stop_at: List[str] = typer.Option([], "--stop-at", help="OBS=VALUE: stop as soon as the observable OBS is within --tol (relative) of VALUE, and write that step, whatever the loss (repeatable: all of them). The loss then serves as a guide: e.g. a smooth --target pressure=P while ν, discontinuous at every contact change, is watched (see the README's design section)."),
    tol: Optional[float] = typer.Option(None, "--tol", help="Stop once every target (or every --stop-at observable) is within this relative error."),
    check_every: int = typer.Option(10, "--check-every", help="Check the gradient against central differences of the re-relaxed loss every K-th step and at the last (0: no checks). Each check costs two relaxations plus, up to 512 particles, a dense Newton polish: at N = 256 one check took as long as ~200 design steps (28 s on a loaded 2-core CPU)."),
    observe: List[str] = typer.Option([], "--observe", help="Observable recorded at every step, outside the loss (repeatable)."),
    set_: List[str] = typer.Option([], "--set", help="Build key, KEY=VALUE (repeatable), e.g. --set n=64."),
    seed: int = typer.Option(0, help="Random seed of the initial positions (and of the check directions)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="A:B (seeds A … B−1): design one shared parameter set for the mean loss over their packings, relaxed and differentiated as one batch (as `mdsens ensemble`). The varied parameters must start equal in every member (bidisperse's per-species diameter, epsilon, alpha), not drawn per seed. The file's packing is seed A's; /design/members holds every member's loss and observables."),
    minimizer: str = typer.Option("fire", help="Minimizer: fire (FIRE 2.0) or gd."),
    ftol: float = typer.Option(1e-10, help="Each relaxation converges when the largest force is below this."),
    max_steps: int = typer.Option(100_000, help="Steps allowed to each relaxation."),
    solver: str = typer.Option("cg", help="Linear solver: cg; sparse (exact, the Hessian factored on the CPU; fixed box, pays in 2D); or dense (small N only)."),
    rtol: float = typer.Option(1e-10, help="CG relative residual tolerance."),
    preconditioner: str = typer.Option("twolevel", help="CG preconditioner: twolevel, jacobi or none."),
    neighbor_list: Optional[bool] = typer.Option(None, "--neighbor-list/--all-pairs", help="Derivatives over the relaxation table's pairs or over all pairs; default: the table above 64 particles."),
    output: Path = typer.Option(Path("design.h5"), "-o", "--output", help="HDF5 file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    precision: str = typer.Option("float64", help="float64 (default) or float32."),
    device: Optional[str] = typer.Option(None, help="cpu or gpu (default: JAX's choice)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout; logs go to stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines and no summary."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not use the persistent compilation cache."),
) -> None:
    """Inverse design: relax, take the exact gradient of the loss, update with optax, repeat.

    Examples:

      mdsens design polydisperse --set n=64 --target poisson_ratio=0.3 --vary diameter --keep phi -o nu.h5

      mdsens design bidisperse --set pressure=0.01 --keep pressure --maximize shear_modulus --vary diameter -o g.h5
    """
    from mdsens import design as _design
    from mdsens import io
    from mdsens.ensemble import parse_seeds
    from mdsens.job import Job

    state = {"existed": output.exists(), "written": False}

    def on_interrupt() -> str:
        if state["written"]:
            return f"{output} was written"
        return f"no file written, {output} untouched" if state["existed"] else "no file written"

    with errors(on_interrupt):
        require_writable(output, force)
        ftol = configure(precision, device, no_cache, ftol)
        job = Job(system=system, overrides=_parse_sets(set_), seed=seed, minimizer=minimizer, ftol=ftol,
                  max_steps=max_steps, solver=solver, rtol=rtol, preconditioner=preconditioner,
                  neighbor_list=neighbor_list, command=shlex.join(["mdsens", *sys.argv[1:]]))
        request = _design.Design(
            job=job, targets=dict(_design.parse_target(t) for t in target), minimize=list(minimize),
            maximize=list(maximize), vary=list(vary), steps=steps, optimizer=optimizer, lr=lr,
            bounds=dict(_design.parse_bound(b) for b in bound), keep=keep, observe=list(observe), tol=tol,
            fd_every=_design.parse_check_every(check_every), max_rise=max_rise,
            stop_at=dict(_design.parse_target(t, "--stop-at") for t in stop_at), seeds=None if seeds is None else parse_seeds(seeds))
        if len(request.targets) != len(target):
            fail("an observable is given twice to --target", EXIT_USAGE)
        if len(request.stop_at) != len(stop_at):
            fail("an observable is given twice to --stop-at", EXIT_USAGE)
        plan = _design.prepare(request)
        result = _design.run(plan, _progress_line(request, quiet))
        io.write(output, result.record())
        state["written"] = True
        summary = result.summary()
        summary["output"] = str(output)
        if as_json:
            print(json.dumps(summary))
        elif not quiet:
            print(_human_summary(result, output))
        failed = [c for c in result.fd_checks if not c["passed"]]
        if failed:
            log(f"warning: {len(failed)} of {len(result.fd_checks)} gradient checks failed "
                f"(worst relative error {max(c['relative_error'] for c in failed):.1e}); see /design/fd_check")
        if not result.converged:
            fail(f"design stopped: {result.stopped}; the steps so far were written to {output}, flagged",
                 EXIT_NOT_CONVERGED)
