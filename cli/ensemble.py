"""``mdsens ensemble``: many packings (seeds × swept keys) as one batched run."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mdsens.cli.app import EXIT_NOT_CONVERGED, EXIT_USAGE, app, errors, fail, log
from mdsens.cli.run import _parse_sets, configure, require_writable


class BatchProgress:
    """``callback(step, converged, worst max|F|, elapsed_s)``: one live line on a terminal."""

    def __init__(self, members: int) -> None:
        self.members = members

    def __call__(self, step: int, converged: int, worst: float, elapsed: float) -> None:
        print(f"\rrelaxing {self.members} members: step {step:>8,d}, converged {converged}/{self.members}, "
              f"worst max|F| {worst:9.2e}, {elapsed:7.1f} s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


@app.command()
def ensemble(
    system: str = typer.Argument("bidisperse", help="System family (see `mdsens systems`)."),
    seeds: str = typer.Option("0:4", "--seeds", help="Seeds A:B (members A … B−1) of the initial positions (and, for polydisperse, of the diameters)."),
    sweep: List[str] = typer.Option([], "--sweep", help="Build key swept over values, KEY=V1,V2,... (repeatable; members are every combination × every seed), e.g. --sweep phi=0.86,0.88,0.90."),
    set_: List[str] = typer.Option([], "--set", help="Build key shared by every member, KEY=VALUE (repeatable)."),
    wrt: List[str] = typer.Option([], "--wrt", help="Parameter to differentiate by, NAME or NAME\\[i] (repeatable; default: the system's first parameter)."),
    observe: Optional[List[str]] = typer.Option(None, "--observe", help="Observable to compute and differentiate (repeatable; default energy and, in a box, pressure)."),
    grad: List[str] = typer.Option([], "--grad", help="Scalar observable whose gradient w.r.t. every parameter element is computed in reverse mode (repeatable)."),
    minimizer: str = typer.Option("fire", help="Minimizer: fire (FIRE 2.0) or gd (gradient descent)."),
    ftol: float = typer.Option(1e-10, help="A member converged when its largest per-particle force is below this (at fixed pressure, and its scaled stress residual too)."),
    max_steps: int = typer.Option(100_000, help="Members still unconverged after this many steps are kept, flagged, without derivatives (exit 3)."),
    solver: str = typer.Option("cg", help="Linear solver for derivatives: cg; sparse (exact, the Hessian factored on the CPU, one factorization per member; pays in 2D); or dense (small N only)."),
    rtol: float = typer.Option(1e-10, help="CG relative residual tolerance."),
    preconditioner: str = typer.Option("twolevel", help="CG preconditioner: twolevel, jacobi or none."),
    output: Path = typer.Option(Path("ensemble.h5"), "-o", "--output", help="HDF5 file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
    precision: str = typer.Option("float64", help="float64 (default) or float32."),
    device: Optional[str] = typer.Option(None, help="cpu or gpu (default: JAX's choice, or JAX_PLATFORMS)."),
    devices: Optional[int] = typer.Option(None, "--devices", metavar="K", help="Shard the members over the first K local devices (default: all; simulate CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=K)."),
    coordinator: Optional[str] = typer.Option(None, "--coordinator", metavar="HOST:PORT", help="Several processes (hosts): the address of process 0 for jax.distributed; each process relaxes a contiguous share of the members and process 0 writes the file."),
    num_processes: Optional[int] = typer.Option(None, "--num-processes", metavar="P", help="Number of processes (with --coordinator)."),
    process_id: Optional[int] = typer.Option(None, "--process-id", metavar="I", help="This process's index 0 … P−1 (with --coordinator)."),
    timeout: int = typer.Option(300, "--timeout", metavar="SECONDS", help="How long processes wait for the coordinator and for each other."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout; logs go to stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress line and no summary."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not use the persistent compilation cache."),
) -> None:
    """Relax and differentiate an ensemble of packings as one batched program.

    Members are every combination of the --sweep values times every seed of
    --seeds. Members of one shape are relaxed together (FIRE per member,
    each stopping at its own convergence) and differentiated together,
    sharded over the local devices. Example: 16 seeds at three packing
    fractions, dP/dD for each:

        mdsens ensemble bidisperse --seeds 0:16 --sweep phi=0.86,0.88,0.90 -o phi.h5

    `mdsens show phi.h5` prints mean ± standard error per φ; `mdsens export
    phi.h5 --member 3 -o m3.h5` writes one member as a run file.

    At fixed pressure (the box relaxes too; box_dof=shear: stress-free cells),
    shear moduli and dφ/dP of 64 packings at two pressures:

        mdsens ensemble bidisperse --set box_dof=shear --sweep pressure=0.01,0.001 --seeds 0:64 --observe shear_modulus --wrt pressure -o shear.h5
    """
    from mdsens import ensemble as ens
    from mdsens import ensemble_io
    from mdsens.job import Job
    from mdsens.systems import UsageError

    state = {"existed": output.exists()}

    def on_interrupt() -> str:
        return f"no file written, {output} untouched" if state["existed"] else "no file written"

    with errors(on_interrupt):
        require_writable(output, force)
        share = _distributed(coordinator, num_processes, process_id, timeout)
        ftol = configure(precision, device, no_cache, ftol)
        job = Job(system=system, overrides=_parse_sets(set_), wrt=list(wrt),
                  observe=list(observe) if observe else None, grad=list(grad), minimizer=minimizer,
                  ftol=ftol, max_steps=max_steps, solver=solver, rtol=rtol, preconditioner=preconditioner,
                  command=shlex.join(["mdsens", *sys.argv[1:]]))
        ej = ens.EnsembleJob(job, seeds=ens.parse_seeds(seeds), sweeps=ens.parse_sweep(sweep), devices=devices)
        count = len(ens.members(job, ej.seeds, ej.sweeps))
        callback = None if quiet or not sys.stderr.isatty() or share[0] != 0 else BatchProgress(count)
        try:
            result = ens.run(ej, callback, share=share, timeout=timeout, exchange=str(output))
        finally:
            if callback is not None:
                callback.close()
        if share[0] != 0:
            return  # process 0 writes the file
        ensemble_io.write(output, result)
        summary = result.summary()
        summary["output"] = str(output)
        if as_json:
            print(json.dumps(summary))
        elif not quiet:
            print(ensemble_io.render(ensemble_io.read(output), str(output)))
            print(f"wrote {output}")
        bad = int(result.m - result.converged.sum())
        if bad:
            fail(f"{bad} of {result.m} members did not converge (kept in {output}, flagged, derivatives NaN)",
                 EXIT_NOT_CONVERGED)


def _distributed(coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int],
                 timeout: int) -> tuple[int, int]:
    """``(process index, process count)``: (0, 1) alone; with --coordinator, after
    ``jax.distributed.initialize`` (bounded by ``timeout``)."""
    from mdsens.systems import UsageError

    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise UsageError("--num-processes/--process-id need --coordinator HOST:PORT")
        return 0, 1
    if num_processes is None or process_id is None:
        raise UsageError("--coordinator needs --num-processes P and --process-id I")
    if num_processes < 1:
        raise UsageError(f"--num-processes {num_processes}: must be at least 1")
    if not 0 <= process_id < num_processes:
        raise UsageError(f"--process-id {process_id}: must be in 0 … {num_processes - 1}")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. 127.0.0.1:12345")
    import jax

    # JAX aborts the whole process (a C++ check failure, no Python exception)
    # when the coordinator cannot be reached: probe it first, for a one-line error.
    _wait_for_coordinator(host, int(port), process_id, timeout)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout)
    except Exception as err:  # the coordinator never answered, or refused
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise RuntimeError(f"--coordinator {coordinator}: could not join the other processes within {timeout} s "
                           f"({first[:200]})") from None
    return jax.process_index(), jax.process_count()


def _wait_for_coordinator(host: str, port: int, process_id: int, timeout: float) -> None:
    """Process 0 checks it can listen on the port; the others wait until it does
    (up to ``timeout`` seconds), else a one-line RuntimeError (exit 1)."""
    import socket
    import time

    if process_id == 0:
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
        except OSError as err:
            raise RuntimeError(f"--coordinator {host}:{port}: process 0 cannot listen there ({err.strerror})") from None
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"--coordinator {host}:{port}: no coordinator answered within {timeout:g} s "
                                   "(start process 0 there, or check the address)") from None
            time.sleep(0.25)
