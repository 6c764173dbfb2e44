"""``mdsens run`` and ``mdsens systems``."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from mdsens.cli import progress as _progress
from mdsens.cli.app import EXIT_NOT_CONVERGED, app, errors, fail, log, EXIT_USAGE


def _parse_sets(items: list[str]) -> dict[str, str]:
    from mdsens.systems import UsageError

    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set n=256")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _configure(precision: str, device: Optional[str]) -> None:
    import jax

    from mdsens.systems import UsageError

    if precision not in ("float64", "float32"):
        raise UsageError(f"--precision {precision!r}: choose float64 or float32")
    jax.config.update("jax_enable_x64", precision == "float64")
    if precision == "float32":
        log("warning: float32 limits forces to ~1e-6 and derivatives to a few digits; ftol is raised to 1e-5")
    if device is not None:
        platforms = {"cpu": "cpu", "gpu": "cuda"}
        if device not in platforms:
            raise UsageError(f"--device {device!r}: choose cpu or gpu")
        jax.config.update("jax_platforms", platforms[device])
        if device == "gpu":
            _require_gpu()


def require_writable(output: Path, force: bool) -> None:
    """Exit 2 before any work unless ``output`` may be written (absent, or --force; its directory exists)."""
    if output.exists() and not force:
        fail(f"{output} exists; pass --force to overwrite it, or -o another path", EXIT_USAGE)
    if not output.resolve().parent.is_dir():
        fail(f"cannot write {output}: directory {output.parent} does not exist", EXIT_USAGE)


def configure(precision: str, device: Optional[str], no_cache: bool, ftol: float) -> float:
    """Precision, device and the compilation cache of a computing verb; returns
    the force tolerance (raised to 1e-5 in float32)."""
    _configure(precision, device)
    from mdsens import cache

    cache.enable(not no_cache)
    return max(ftol, 1e-5) if precision == "float32" else ftol


def _cuda_plugin_installed() -> bool:
    """Whether this JAX has CUDA support (the ``jax[cuda12]`` plugin), GPU or not."""
    import importlib.util
    from importlib.metadata import entry_points

    if any("cuda" in ep.name for ep in entry_points(group="jax_plugins")):
        return True
    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


def _require_gpu() -> None:
    """Fail in one line (exit 2, before any work) unless JAX sees a GPU.

    Without the CUDA plugin, JAX's first operation on ``jax_platforms=cuda``
    dies in a bare AssertionError; with the plugin but no usable GPU, in a
    RuntimeError from the backend. Ask for the devices now instead."""
    import jax

    from mdsens.systems import UsageError

    try:
        platform = jax.devices()[0].platform
    except Exception as err:  # AssertionError (no plugin) or RuntimeError (no device)
        if not _cuda_plugin_installed():
            raise UsageError('--device gpu: this JAX has no CUDA support; install it with '
                             'pip install -e ".[cuda12]" (or run on the CPU: --device cpu)') from None
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise UsageError(f"--device gpu: no GPU is visible to JAX ({reason}); "
                         "use --device cpu") from None
    if platform != "gpu":
        # The backend was already started on another platform (e.g. in a Python session).
        raise UsageError(f"--device gpu: JAX is already running on {platform}; no GPU is in use")


def _human_summary(result) -> str:
    from mdsens import names

    s = result.summary()
    t = result.timings
    # the solver that ran (--solver auto is resolved before the run): CG counts iterations, the others none
    solver = result.meta.get("linear_solver", "cg") if isinstance(result.meta, dict) else "cg"
    lines = [
        f"{s['system']}: N={s['n']} d={s['dim']}  "
        f"{'converged' if s['converged'] else 'NOT CONVERGED'} in {s['steps']} steps, "
        f"max|F| = {s['max_force']:.2e}, rattlers {s['rattlers']}",
        f"time: compile {t['compile_s']:.2f} s, relax {t['relax_s']:.2f} s, derivatives {t['derivative_s']:.2f} s",
    ]
    if isinstance(result.meta, dict) and result.meta.get("ensemble"):  # fixed pressure: which box dof relaxed
        lines.append(f"ensemble: {result.meta['ensemble']}")
    for name in result.observables:
        if name != "max_force":
            lines.append(f"  {name:<10s} = {np.array2string(np.asarray(result.observables[name]), precision=8)}")
    for key, fw in result.sensitivity.items():
        norm = np.sqrt(np.sum(np.asarray(fw.values["position"]) ** 2, axis=(-2, -1)))
        lines.append(f"d/d{key}:")
        lines.append(f"  |dx*/d{key}| = {np.array2string(norm, precision=6)}")
        for name, value in fw.values.items():
            if name != "position":
                lines.append(f"  {names.derivative(name, key)} = {np.array2string(np.asarray(value), precision=8)}")
        how = f"CG iterations {np.asarray(fw.iterations).tolist()}" if solver == "cg" else f"{solver} solve"
        lines.append(f"  {how}, residual {np.array2string(np.asarray(fw.residual), precision=2)}")
    for key, (values, info) in result.gradient.items():
        how = f"{int(info.iterations)} CG iterations" if solver == "cg" else f"{solver} solve"
        lines.append(f"grad {key}: ({how}, residual {float(info.residual):.1e})")
        for name, value in values.items():
            v = np.asarray(value)
            text = np.array2string(v, precision=6) if v.size <= 6 else f"shape {v.shape}, |·| = {np.linalg.norm(v):.6g}"
            lines.append(f"  {names.derivative(key, name)} = {text}")
    return "\n".join(lines)


@app.command()
def run(
    system: str = typer.Argument("bidisperse", help="System family (see `mdsens systems`)."),
    set_: List[str] = typer.Option([], "--set", help="Build key, KEY=VALUE (repeatable), e.g. --set n=256 --set phi=0.95."),
    wrt: List[str] = typer.Option([], "--wrt", help="Parameter to differentiate by, NAME or NAME\\[i] (repeatable; default: the system's first parameter, diameter for soft spheres)."),
    observe: Optional[List[str]] = typer.Option(None, "--observe", help="Observable to compute and differentiate (repeatable; default energy and, in a box, pressure)."),
    grad: List[str] = typer.Option([], "--grad", help="Scalar observable whose gradient w.r.t. every parameter element is computed in one reverse-mode pass (repeatable)."),
    minimizer: str = typer.Option("fire", help="Minimizer: fire (FIRE 2.0) or gd (gradient descent)."),
    max_displacement: Optional[float] = typer.Option(None, "--max-displacement", metavar="D", help="FIRE: shorten a step so that no coordinate moves more than D (LAMMPS's dmax; LAMMPS's default is 0.1). Off by default. From a random start it removes FIRE's long runs (2D, N = 131072: 29834 and 29230 steps became 22067 and 22455 with D = 0.1), but not every start takes fewer steps, and it leads to other minima."),
    ftol: float = typer.Option(1e-10, help="Converged when the largest per-particle force is below this."),
    max_steps: int = typer.Option(100_000, help="Give up (exit 3, state still written) after this many steps."),
    solver: str = typer.Option("auto", help="Linear solver for derivatives: auto (sparse on the CPU at fixed box in 2D from N = 1024, in 3D from N = 512 to 2048, or for 8 or more solves, e.g. a per-particle --wrt, in 2D or in 3D up to N = 8192, each where the pair graph is sparse (soft spheres; not a Lennard-Jones crystal's 2.5σ cutoff or a free cluster's all pairs); else cg; the file records which); cg (preconditioned conjugate gradients, --rtol); sparse (exact: the Hessian assembled from the pair terms and factored on the CPU, once per state; pays in 2D, in 3D up to N ≈ 2048-4096, and in 3D for many solves); or dense (exact, small N only). Fixed pressure: auto, cg or dense."),
    rtol: float = typer.Option(1e-10, help="CG relative residual tolerance."),
    seed: int = typer.Option(0, help="Random seed of the initial positions."),
    output: Path = typer.Option(Path("mdsens.h5"), "-o", "--output", help="HDF5 file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    precision: str = typer.Option("float64", help="float64 (default) or float32 (warned: few digits)."),
    device: Optional[str] = typer.Option(None, help="cpu or gpu (default: JAX's choice, or JAX_PLATFORMS)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout; logs go to stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display and no summary."),
    neighbor_list: Optional[bool] = typer.Option(None, "--neighbor-list/--all-pairs", help="Derivatives over the pairs of the relaxation's neighbor table (O(N)) or over all pairs (O(N²), same result); default: the table above 64 particles. The relaxation always uses the table."),
    polish: Optional[float] = typer.Option(None, "--polish", metavar="FTOL", help="Newton polish: the minimizer stops at this coarser max|F| and damped Newton steps (CG on the pair Hessian; a step never climbs) finish to --ftol; the minimizer takes over again if a step fails. Off by default: measured to pay only for some large packings (see README, Scale)."),
    preconditioner: str = typer.Option("twolevel", help="CG preconditioner: twolevel (block-Jacobi plus a coarse correction on cell translations; fewest iterations), jacobi (block-Jacobi from the pair terms) or none."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", metavar="PATH", help="Save the minimizer state (positions, velocities, FIRE's dt/α/counters, the step) to PATH, atomically, between relaxation chunks at least every --checkpoint-every seconds; continue with --resume PATH."),
    checkpoint_every: float = typer.Option(60.0, "--checkpoint-every", metavar="SECONDS", help="Seconds between checkpoints (0: at every chunk of steps)."),
    resume: Optional[Path] = typer.Option(None, "--resume", metavar="PATH", help="Continue the relaxation saved in a checkpoint (same system, --set, --seed, --minimizer, --ftol; --max-steps counts the steps before the checkpoint too): the same minimum in the same total steps as an uninterrupted run."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not use the persistent compilation cache (~/.cache/mdsens/jax; also MDSENS_NO_CACHE=1)."),
) -> None:
    """Relax a system, differentiate its equilibrium, write an HDF5 file.

    With no arguments: the reference case (128 bidisperse disks at φ = 0.9),
    derivatives w.r.t. both diameters, written to ./mdsens.h5.
    """
    from mdsens import io
    from mdsens.job import Job, execute

    state = {"existed": output.exists(), "written": False}

    def on_interrupt() -> str:
        if state["written"]:
            return f"{output} was written"
        return f"no file written, {output} untouched" if state["existed"] else "no file written"

    with errors(on_interrupt):
        require_writable(output, force)
        ftol = configure(precision, device, no_cache, ftol)
        job = Job(system=system, overrides=_parse_sets(set_), seed=seed, wrt=list(wrt),
                  observe=list(observe) if observe else None, grad=list(grad), minimizer=minimizer,
                  max_displacement=max_displacement, ftol=ftol, max_steps=max_steps, solver=solver, rtol=rtol,
                  neighbor_list=neighbor_list, preconditioner=preconditioner, polish=polish,
                  checkpoint=None if checkpoint is None else str(checkpoint), checkpoint_every=checkpoint_every,
                  resume=None if resume is None else str(resume),
                  command=shlex.join(["mdsens", *sys.argv[1:]]))
        callback = _progress.relaxation_progress(ftol, quiet)
        try:
            result = execute(job, callback)
        finally:
            _progress.finish(callback)
        io.write(output, result.record())
        state["written"] = True
        summary = result.summary()
        summary["output"] = str(output)
        if as_json:
            print(json.dumps(summary))
        elif not quiet:
            print(_human_summary(result))
            print(f"wrote {output}")
        if not result.converged:
            fail(f"relaxation did not converge in {int(result.info.steps)} steps "
                 f"(max|F| = {float(result.info.max_force):.2e} > ftol {ftol:.0e}); the state was written to "
                 f"{output}, flagged, without derivatives", EXIT_NOT_CONVERGED)


@app.command("systems")
def list_systems(as_json: bool = typer.Option(False, "--json", help="Print the catalogue as JSON.")) -> None:
    """List every system with its keys, parameters and defaults."""
    from mdsens.systems import FAMILIES

    catalogue = {
        name: {"description": f.description,
               "keys": {k.name: {"type": k.kind, "default": k.default, "help": k.help} for k in f.keys},
               "parameters": dict(f.parameters)}
        for name, f in FAMILIES.items()
    }
    if as_json:
        print(json.dumps(catalogue))
        return
    for name, entry in catalogue.items():
        print(f"{name}: {entry['description']}")
        for key, k in entry["keys"].items():
            print(f"    --set {key}=<{k['type']}>  (default {k['default']})  {k['help']}")
        for param, text in entry["parameters"].items():
            print(f"    --wrt {param:<10s} {text}")
