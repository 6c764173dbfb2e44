"""One run, as the CLI does it: build, relax, differentiate, collect.

``Job`` is the whole request (what ``mdsens run`` parses); ``execute(job)``
returns a ``Result`` that knows how to become a file record
(:func:`mdsens.io.write`) and a JSON summary. Everything here is also usable
from Python: ``execute(Job(overrides={"n": "64"}))``, or on a system built in
Python, ``execute(Job(system=my_system))``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import cache, io, linsolve, memory, minimize, names, observables, relax, sensitivity, sparse, systems
from mdsens.minimize import RelaxInfo
from mdsens.system import Params, System, pad_pairs, pair_bucket
from mdsens.systems import UsageError


@dataclass
class Job:
    """Everything a run needs. ``system``: a catalogue name, built from
    ``overrides`` (the ``--set KEY=VALUE`` texts) and ``seed``, or a
    :class:`mdsens.system.System` built in Python (then without overrides;
    ``seed`` is only recorded)."""

    system: str | System = "bidisperse"
    overrides: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    wrt: list[str] | None = None  # default: the system's first parameter (diameter for soft spheres)
    observe: list[str] | None = None  # default: energy, and pressure for periodic systems
    grad: list[str] = field(default_factory=list)
    minimizer: str = "fire"
    max_displacement: float | None = None  # FIRE: no coordinate moves more than this in one step (None: no cap)
    ftol: float = 1e-10
    max_steps: int = 100_000
    solver: str = "auto"  # resolved by prepare (sensitivity.resolve_solver): sparse on the CPU in 2D from N = 1024, in 3D for N = 512 … 4096, or for 8+ solves, else cg
    rtol: float = 1e-10
    chunk: int = 2_000
    command: str = ""
    neighbor_list: bool | None = None  # derivative pairs from the table; None: when N > 64 and the cutoff is finite
    skin: float = relax.DEFAULT_SKIN
    preconditioner: str = "twolevel"
    polish: float | None = None  # hand over from the minimizer to Newton steps at this max|F| (None: never)
    checkpoint: str | None = None  # write the minimizer state here (atomically) every checkpoint_every seconds
    checkpoint_every: float = 60.0
    resume: str | None = None  # continue the relaxation saved in this checkpoint


@dataclass
class Result:
    job: Job
    system: System
    q: jax.Array
    params: dict[str, jax.Array]
    info: RelaxInfo
    rattler: jax.Array
    observables: dict[str, np.ndarray]
    sensitivity: dict[str, sensitivity.Forward]
    gradient: dict[str, tuple[dict[str, jax.Array], linsolve.SolveInfo]]
    timings: dict[str, float]
    meta: dict[str, Any]

    @property
    def converged(self) -> bool:
        return bool(self.info.converged)

    def record(self) -> dict[str, Any]:
        """The mapping :func:`mdsens.io.write` takes."""
        return {
            "positions": self.system.to_real_on_host(self.q, self.params),
            "box": np.asarray(self.params["box"]) if self.system.periodic else None,
            "species": np.asarray(self.system.species),
            "rattler": np.asarray(self.rattler),
            "parameters": {k: np.asarray(v) for k, v in self.params.items()},
            "observables": {**self.observables, "minimizer_steps": np.asarray(int(self.info.steps)),
                            "converged": np.asarray(self.converged)},
            "sensitivity": {k: {"values": {n: np.asarray(v) for n, v in fw.values.items()},
                                "iterations": np.asarray(fw.iterations), "residual": np.asarray(fw.residual)}
                            for k, fw in self.sensitivity.items()},
            "gradient": {k: {"values": {n: np.asarray(v) for n, v in values.items()},
                             "iterations": np.asarray(info.iterations), "residual": np.asarray(info.residual)}
                         for k, (values, info) in self.gradient.items()},
            "meta": self.meta,
        }

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest: what ``mdsens run --json`` prints."""
        out: dict[str, Any] = {
            "system": self.system.name,
            "n": self.system.n,
            "dim": self.system.dim,
            "converged": self.converged,
            "steps": int(self.info.steps),
            "max_force": float(self.info.max_force),
            "rattlers": int(np.sum(np.asarray(self.rattler))),
        }
        for name, value in self.observables.items():
            out[name] = np.asarray(value).tolist()
        out["sensitivity"] = {
            key: {
                "position_norm": np.sqrt(np.sum(np.asarray(fw.values["position"]) ** 2, axis=(-2, -1))).tolist(),
                **{n: np.asarray(v).tolist() for n, v in fw.values.items() if n != "position"},
                "iterations": np.asarray(fw.iterations).tolist(),
                "residual": np.asarray(fw.residual).tolist(),
            }
            for key, fw in self.sensitivity.items()
        }
        out["gradient"] = {
            key: {"values": {n: np.asarray(v).tolist() for n, v in values.items()},
                  "iterations": int(info.iterations), "residual": float(info.residual)}
            for key, (values, info) in self.gradient.items()
        }
        out["timings"] = dict(self.timings)
        out["memory"] = self.memory()
        return out

    def __post_init__(self) -> None:
        # The preflight's estimate beside the peak so far, in the file's attributes too.
        if isinstance(self.meta, dict):
            self.meta.setdefault("memory", self.memory())

    def memory(self) -> dict[str, float]:
        """``estimate_mb``: the preflight's estimated peak of the whole process
        (:func:`mdsens.memory.estimate` plus the bare process,
        :data:`mdsens.memory.RUNTIME_BYTES`); ``peak_rss_mb``: the peak resident
        set size measured so far (``ru_maxrss``). MB = 10^6 bytes."""
        items = memory.recall(self.system)
        if items is None:
            items = memory.job_estimate(self.system, observe=list(self.observables), skin=self.job.skin,
                                        wrt_elements=max(1, len(self.sensitivity)),
                                        neighbor_list=self.job.neighbor_list)
        return {"estimate_mb": round((items["total"] + memory.RUNTIME_BYTES) / 1e6, 1),
                "peak_rss_mb": round(memory.peak_rss() / 1e6, 1)}


#: the most steps a relaxation can count (its step counter is an int32)
MAX_STEPS_LIMIT = 2**31 - 1


def parse_wrt(text: str, params: dict[str, jax.Array]) -> tuple[str, tuple[int, ...] | None]:
    """``NAME`` or ``NAME[i]`` / ``NAME[i,j]`` → (name, index or None), validated
    against ``params`` (:func:`mdsens.names.resolve`)."""
    try:
        name = names.resolve(text, {k: jnp.shape(v) for k, v in params.items()})
    except names.NameSyntaxError as err:
        raise UsageError(f"--wrt {err}") from None
    return name.base, name.index


def _observables(job: Job, system: System) -> dict[str, Callable]:
    wanted = job.observe
    if wanted is None:
        wanted = ["energy", "pressure"] if system.periodic else ["energy"]
    chosen = {}
    for name in wanted:
        if name not in observables.OBSERVABLES:
            raise UsageError(f"unknown observable {name!r}; choose from: {', '.join(observables.OBSERVABLES)}")
        observables.require(system, name, UsageError)
        chosen[name] = observables.OBSERVABLES[name]
    return chosen


def _solver(job: Job, system: System | None = None, q: jax.Array | None = None, params: Any = None,
            rattler: jax.Array | None = None) -> Any:
    """The linear solve of ``job`` (:func:`mdsens.sensitivity.solver_for`) at a
    relaxed state; without one, only the options are validated."""
    if system is None:
        sensitivity.check_solver(job.solver, job.preconditioner)
        return None
    return sensitivity.solver_for(system, q, params, rattler, job.solver, job.rtol, job.preconditioner)


def solving(job: Job):
    """The job's solver options for the solves inside observables (the moduli)."""
    return sensitivity.solving(job.solver, job.rtol, job.preconditioner)


def use_neighbor_list(job: Job, system: System) -> bool:
    """Whether the derivatives sum over the neighbor table's pairs (True) or
    over all N(N−1)/2 pairs (False): the table from 65 particles unless the job
    says otherwise; never for an interaction without a finite range. (The
    relaxation itself always runs on the table, see :mod:`mdsens.relax`.)"""
    finite = bool(np.isfinite(float(system.cutoff(system.params))))
    if job.neighbor_list and not finite:
        raise UsageError(f"--neighbor-list: {system.name!r} interacts at every distance (no cutoff); "
                         "use --all-pairs")
    if job.neighbor_list is None:
        return finite and system.n > 64
    return bool(job.neighbor_list)


def compiled(system: System, pairs: jax.Array | None, key: Hashable, make: Callable[[System], Callable],
             *args: Any) -> tuple[Callable, float]:
    """``make(s)`` for ``s`` the system summed over ``pairs`` (None: all pairs),
    compiled ahead of time for ``args`` once per (model, ``key``, shapes)
    (:func:`mdsens.cache.program`); returns ``(fn, compile_s)``, ``fn(*args)``
    the compiled function with the pairs bound. The pairs are an argument of
    the program, data and not a compiled constant; ``make`` is given the
    model's :attr:`~mdsens.system.Model.template`, so it must take θ and the
    state from its arguments, and ``key`` must name everything else it
    depends on (observable, solver options)."""
    model = system.model
    fn, compile_s = cache.program((model, key), lambda: lambda pr_, *a: make(model.template.with_pairs(pr_))(*a),
                                  pairs, *args)
    return (lambda *a: fn(pairs, *a)), compile_s


def run_compiled(system: System, pairs: jax.Array | None, key: Hashable, make: Callable[[System], Callable],
                 *args: Any) -> tuple[Any, float, float]:
    """:func:`compiled`, run on ``args``: ``(output, compile_s, run_s)``."""
    fn, compile_s = compiled(system, pairs, key, make, *args)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, compile_s, time.perf_counter() - start


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def versions() -> dict[str, str]:
    import h5py
    import jaxlib

    from mdsens import __version__

    return {"mdsens": __version__, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "jax_md": _dist_version("jax-md"), "numpy": np.__version__,
            "h5py": h5py.__version__}


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', '')}"


def prepare(job: Job) -> tuple[System, dict[str, Callable], list[tuple[str, str, tuple[int, ...] | None]]]:
    """Build the system and validate every request before any expensive work:
    usage errors surface in a second, not after a relaxation."""
    itemsize = jnp.dtype(jnp.result_type(float)).itemsize
    if isinstance(job.system, System):
        if job.overrides:
            raise UsageError(f"--set {', '.join(job.overrides)}: the system is given built; overrides apply to a "
                             "catalogue name only")
        system = job.system
        family = systems.FAMILIES.get(system.name)
    else:
        family = systems.get(job.system)
        config = family.resolve(job.overrides)
        # Memory preflight, before the build allocates anything: N = 2e9 positions
        # alone are 32 GB in NumPy. Checked again below with the built system.
        size = memory.particles(config)
        if size is not None:
            memory.check(memory.job_estimate(n=size[0], dim=size[1], observe=job.observe or ("energy", "pressure"),
                                             neighbor_list=job.neighbor_list, skin=job.skin, itemsize=itemsize),
                         memory.describe(job.system, job.overrides, *size))
        system = family.build_fn(seed=job.seed, **config)
    if job.minimizer not in minimize.METHODS:
        raise UsageError(f"unknown minimizer {job.minimizer!r}: choose {' or '.join(map(repr, minimize.METHODS))}")
    if not job.ftol > 0:
        raise UsageError(f"--ftol must be positive, got {job.ftol}")
    if not 0 <= job.max_steps <= MAX_STEPS_LIMIT:  # the step counter is a 32-bit integer
        raise UsageError(f"--max-steps must be between 0 and {MAX_STEPS_LIMIT}, got {job.max_steps}")
    check_max_displacement(job.max_displacement, job.minimizer)
    if job.polish is not None and (job.checkpoint is not None or job.resume is not None):
        raise UsageError("--checkpoint/--resume and --polish cannot be combined")
    if job.checkpoint is not None and not job.checkpoint_every >= 0:
        raise UsageError(f"--checkpoint-every must be 0 (every chunk) or more seconds, got {job.checkpoint_every}")
    if job.resume is not None:
        import os

        if not os.path.exists(job.resume):
            raise UsageError(f"--resume {job.resume}: no such file")
    if job.polish is not None and not job.polish > job.ftol:
        raise UsageError(f"--polish {job.polish:g} must exceed --ftol {job.ftol:g} (it is the coarser tolerance at "
                         "which Newton steps take over)")
    params = dict(system.params)
    order = [*(family.parameters if family is not None else ()), *params]
    requested = job.wrt if job.wrt else [next(k for k in order if k in params)]
    # Each --wrt in its canonical spelling (names.format_name): the key of its /sensitivity group.
    wrts = [(names.format_name(*parsed), *parsed) for parsed in (parse_wrt(text, params) for text in requested)]
    observe = _observables(job, system)
    for name in job.grad:
        if name not in observables.OBSERVABLES:
            raise UsageError(f"--grad {name!r}: unknown observable; choose from: {', '.join(observables.OBSERVABLES)}")
        observables.require(system, name, UsageError)
        shape = observables.OBSERVABLES[name].shape(system.dim)
        if shape != ():
            raise UsageError(f"--grad {name!r}: reverse mode needs a scalar observable, {name} has shape {shape}")
    _solver(job)
    # "auto" becomes the solver it means for this system, here, so that every
    # later step (the programs, the file's linear_solver) sees the one used.
    elements = sum(1 if index is not None else int(np.size(params[name])) for _, name, index in wrts)
    job.solver = sensitivity.resolve_solver(job.solver, system, elements + len(job.grad))
    # The preflight with the real N, d, box and cutoff, and every tangent asked for.
    estimated = memory.job_estimate(system, observe=[*observe, *job.grad], wrt_elements=elements,
                                    neighbor_list=job.neighbor_list, skin=job.skin, itemsize=itemsize,
                                    sparse=job.solver == "sparse")
    memory.check(estimated, memory.describe(system.name, job.overrides, system.n, system.dim))
    memory.remember(system, estimated)
    return system, observe, wrts


def check_max_displacement(value: float | None, minimizer: str = "fire") -> None:
    """``--max-displacement``: None, or a positive finite length, and FIRE's only
    (UsageError otherwise); :func:`prepare` and ``mdsens bench`` check here."""
    if value is None:
        return
    if minimizer != "fire":
        raise UsageError(f"--max-displacement caps FIRE's steps; --minimizer {minimizer} takes none")
    if not (value > 0 and np.isfinite(value)):
        raise UsageError(f"--max-displacement must be a positive length, got {value}")


def relax_system(
    job: Job, system: System, params: dict[str, jax.Array],
    progress: Callable[[int, float, float], None] | None = None,
    x0: jax.Array | None = None,
    snapshot: Callable[[np.ndarray, float], None] | None = None,
) -> tuple[jax.Array, RelaxInfo, float, jax.Array | None, dict[str, Any]]:
    """Relax ``system`` as ``job`` says from real-space ``x0`` (default: the
    system's initial positions; :func:`mdsens.relax.relax`), and choose the
    pairs the derivatives will use.

    Returns ``(q*, info, compile_s, pairs, meta)``: ``pairs`` are the pairs of
    the neighbor table at x* (:func:`use_neighbor_list`; every pair closer than
    the cutoff is among them, the rest contribute exactly zero to E and every
    derivative there, so a Hessian product costs the contacts, not N²/2
    pairs); None means all pairs. ``snapshot``: :func:`mdsens.relax.relax`'s.
    """
    x0 = jnp.asarray(system.positions if x0 is None else x0)
    saver = None if job.checkpoint is None else lambda state: save_checkpoint(job.checkpoint, job, state)
    resume = None if job.resume is None else load_checkpoint(job.resume, job)
    out = relax.relax(system, params, x0, job.minimizer, job.ftol, job.max_steps, job.chunk, progress, job.skin,
                      job.polish, saver, job.checkpoint_every, resume, job.max_displacement, snapshot)
    q = system.to_solver(jax.block_until_ready(out.x), params)
    meta = {"cell_list": out.stats.cell_list, "skin": job.skin, "capacity": out.stats.capacity,
            "reallocations": out.stats.reallocations, "rebuilds": out.stats.rebuilds}
    if job.polish is not None:
        meta.update(polish=job.polish, newton_steps=out.stats.newton_steps, cg_iterations=out.stats.cg_iterations,
                    newton_s=out.stats.newton_s, fallback=out.stats.fallback)
    if use_neighbor_list(job, system):
        # Every pair closer than the cutoff at x* is in the table (no particle
        # moved more than skin/2 since its build): the others contribute exactly
        # zero to E and to every derivative there.
        pairs = jnp.asarray(relax.pairs_from_table(out.idx, system.n))
        meta["pairs"] = int(pairs.shape[1])
        return q, out.info, out.compile_s, pairs, meta
    return q, out.info, out.compile_s, None, meta


#: what a checkpoint must share with the run that resumes it
_CHECKPOINT_KEYS = ("system", "overrides", "seed", "minimizer", "ftol", "skin", "max_displacement")


def _checkpoint_settings(job: Job) -> dict[str, Any]:
    settings = {k: getattr(job, k) for k in _CHECKPOINT_KEYS}
    if isinstance(job.system, System):
        settings["system"] = job.system.name
    return settings


def save_checkpoint(path: str, job: Job, state: dict[str, np.ndarray]) -> None:
    """The minimizer state and the job that made it, as ``.npz``, written to a
    temporary file and renamed: a crash mid-write leaves the previous one."""
    import json
    import os

    settings = json.dumps(_checkpoint_settings(job))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        np.savez(fh, _job=np.asarray(settings), **state)
    os.replace(tmp, path)


def load_checkpoint(path: str, job: Job) -> dict[str, np.ndarray]:
    """A checkpoint's minimizer state, after checking it belongs to this job."""
    import json

    try:
        with np.load(path) as data:
            state = {k: data[k] for k in data.files if k != "_job"}
            saved = json.loads(str(data["_job"]))
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"--resume {path}: not a readable mdsens checkpoint ({err})") from None
    current = json.loads(json.dumps(_checkpoint_settings(job)))
    differ = [f"{k} {saved.get(k)!r} there, {current[k]!r} here" for k in _CHECKPOINT_KEYS if saved.get(k) != current[k]]
    if differ:
        raise UsageError(f"--resume {path}: the checkpoint is of another run ({'; '.join(differ)})")
    if job.polish is not None:
        raise UsageError("--resume and --polish cannot be combined")
    return state


def run_meta(job: Job, system: System, info: RelaxInfo, timings: dict[str, float], **extra: Any) -> dict[str, Any]:
    """The provenance a run file records (``/parameters`` attributes): the
    system and its configuration, the job's options, convergence, versions,
    device, precision and timings; ``extra`` adds or overrides keys (e.g. the
    neighbor list, a fixed-pressure ensemble, a design's settings)."""
    converged = bool(info.converged)
    meta = {
        "system": system.name,
        "potential": io.model_potential(system),  # what the file's parameter units follow
        "configuration": {**system.config, "seed": job.seed},
        "seed": job.seed,
        "command": job.command,
        "minimizer": job.minimizer,
        "ftol": job.ftol,
        "max_steps": job.max_steps,
        "linear_solver": job.solver,
        "rtol": job.rtol,
        "preconditioner": job.preconditioner if job.solver == "cg" else "none",
        "steps": int(info.steps),
        "converged": converged,
        "derivatives": "computed" if converged else "skipped: relaxation did not converge",
        "versions": versions(),
        "device": device_name(),
        "precision": str(jnp.result_type(float)),
        "timings": timings,
    }
    if job.max_displacement is not None:
        meta["max_displacement"] = job.max_displacement
    meta.update(extra)
    return meta


class _Programs:
    """The programs of a run after its relaxation, as ``(key, make)`` for
    :func:`run_compiled`: the rattlers and every observable (one program),
    and every forward and reverse derivative (one program)."""

    def __init__(self, observe: dict[str, Callable], options: tuple):
        self.observe, self.options = observe, options

    def values(self) -> tuple[Hashable, Callable]:
        observe = self.observe

        def make(s_):
            return lambda q_, p_: (observables.rattlers(s_, q_, p_), {k: f(s_, q_, p_) for k, f in observe.items()})
        return ("values", tuple(observe.items()), self.options), make

    def derivatives(self, wrts: list, grads: list[str]) -> tuple[Hashable, Callable]:
        """Every forward (``wrts``: ``(text, name, index)``) and reverse (``grads``)
        derivative in one program on one solve (:func:`mdsens.sensitivity.derivatives_fn`)."""
        observe, options = self.observe, self.options
        wrts, grads = tuple(tuple(w) for w in wrts), tuple(grads)

        def make(s_):
            def fn_(q_, p_, r_):
                solve = sensitivity.solver_for(s_, q_, p_, r_, *options)
                return sensitivity.derivatives_fn(s_, observe, wrts, grads, r_, solve)(q_, p_)
            return fn_
        return ("derivatives", wrts, grads, tuple(observe.items()), options), make


#: the fewest particles for which :class:`_Ahead` compiles in a second thread
def switched_off(variable: str) -> bool:
    """Whether the environment sets ``variable`` to 0, false or no (a default-on switch)."""
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no")


AHEAD_MIN_N = 256


class _Ahead:
    """The programs a run needs after its relaxation, compiled in a second
    thread while the relaxation compiles and runs: XLA compiles on one core
    and, at the sizes where compiling dominates, the relaxation's step runs on
    one (XLA:CPU splits only large fusions), so on a machine with two the
    first run's two largest compiles (the relaxation's chunk and the forward
    derivative) overlap instead of following each other.

    Their shapes are known before the relaxation except the pairs' (the
    table's pairs at x*): the pairs within reach at the start, counted on the
    host, set the width (a relaxed packing has fewer: N = 1024, φ = 0.9,
    3577 at the random start, 3186 at x*); pairs that fit are padded to it,
    more pairs compile anew after the relaxation (the thread's work is then
    only wasted). ``MDSENS_COMPILE_AHEAD=0`` switches it off; it is off on one
    core and below :data:`AHEAD_MIN_N` particles, where the compiles are short."""

    def __init__(self, job: Job, system: System, params: Params, programs: _Programs, wrts: list, width: int | None):
        self.width = width
        self._stop = False
        self._args = (job, system, params, programs, wrts)
        self._thread = threading.Thread(target=self._compile, name="mdsens-compile-ahead", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, job: Job, system: System, params: Params, programs: _Programs, wrts: list) -> "_Ahead | None":
        if switched_off("MDSENS_COMPILE_AHEAD"):
            return None
        if (os.cpu_count() or 1) < 2 or system.n < AHEAD_MIN_N or job.resume is not None:
            return None
        width = None
        if use_neighbor_list(job, system):
            table = relax.Table(system, params, job.skin)
            if table.static:
                return None
            width = pair_bucket(table.counts_on_host(np.asarray(system.positions))[1])
        return cls(job, system, params, programs, wrts, width)

    def _compile(self) -> None:
        job, system, params, programs, wrts = self._args
        n = system.n
        try:
            pairs = None if self.width is None else jnp.full((2, self.width), n, jnp.int32)
            q = jnp.zeros(np.shape(system.positions), np.asarray(system.positions).dtype)
            rattler = jnp.zeros(n, bool)
            with solving(job):
                compiled(system, pairs, *programs.values(), q, params)
                if (wrts or job.grad) and not self._stop:
                    compiled(system, pairs, *programs.derivatives(wrts, job.grad), q, params, rattler)
        except Exception:  # noqa: BLE001 -- the main thread compiles whatever is missing itself
            return

    def wait(self) -> float:
        """Wait for the thread; the seconds waited (compile time the run did not overlap)."""
        start = time.perf_counter()
        try:
            self._thread.join()
        except BaseException:  # Ctrl-C while waiting: the program compiling now, then on
            self._stop = True
            self._thread.join()
            raise
        return time.perf_counter() - start

    def abandon(self) -> None:
        """No more programs after the one compiling now (the relaxation failed)."""
        self._stop = True


def execute(job: Job, progress: Callable[[int, float, float], None] | None = None) -> Result:
    """Run ``job``: relax, then (if converged) every requested derivative."""
    wall = time.perf_counter()
    system, observe, wrts = prepare(job)
    from mdsens import barostat

    if barostat.is_fixed_pressure(system):  # built with pressure=P: the box relaxes too
        return barostat.execute(job, system, observe, wrts, progress, wall)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    timings = {"compile_s": 0.0, "relax_s": 0.0, "derivative_s": 0.0}

    programs = _Programs(observe, (job.solver, job.rtol, job.preconditioner))
    ahead = _Ahead.start(job, system, params, programs, wrts)
    # the sparse solve's host side (SciPy, CHOLMOD) imported beside the relaxation
    warm = sparse.warm_up_beside() if job.solver == "sparse" and (wrts or job.grad) else None
    # ... and the factorization's ordering and analysis, from the relaxation's last positions
    # (MDSENS_FACTOR_AHEAD=0 switches it off)
    factor_ahead = (sparse.Ahead(system, params) if warm is not None and use_neighbor_list(job, system)
                    and sparse.ahead_pays(system)
                    and not switched_off("MDSENS_FACTOR_AHEAD") else None)
    start = time.perf_counter()
    try:
        q, info, compile_s, pairs, nl_meta = relax_system(job, system, params, progress,
                                                          snapshot=None if factor_ahead is None else factor_ahead.offer)
    except BaseException:
        # (Ctrl-C, SIGTERM, an error): the thread finishes the program it is
        # compiling before the exception goes on — a process that exits while
        # XLA compiles in another thread aborts (SIGABRT) instead of exiting 130/143
        if ahead is not None:
            ahead.abandon()
            ahead.wait()
        if factor_ahead is not None:
            factor_ahead.wait()
            sparse.clear_prepared()
        raise
    timings["compile_s"] += compile_s
    timings["relax_s"] = time.perf_counter() - start - compile_s
    width = None  # padded to a bucket of sizes, so that the next run's pair count reuses the programs
    if ahead is not None:
        if not bool(info.converged):  # no derivatives: the one compiling now is the last
            ahead.abandon()
        timings["compile_s"] += ahead.wait()
        if pairs is not None and ahead.width is not None and pairs.shape[1] <= ahead.width:
            width = ahead.width  # the programs compiled meanwhile serve these pairs
    pairs = None if pairs is None else pad_pairs(pairs, system.n, width)
    if warm is not None:
        warm.join()
    if factor_ahead is not None:  # its last analysis (before any factorization at x*), counted as derivative time
        timings["derivative_s"] += factor_ahead.wait()
    # The moduli's own solves (inside observables) follow --solver/--rtol/--preconditioner too.
    try:
        with solving(job):
            (rattler, outs), c, _ = run_compiled(system, pairs, *programs.values(), q, params)
            timings["compile_s"] += c
            values = {name: np.asarray(outs[name]) for name in observe}
            values["max_force"] = np.asarray(info.max_force)

            forwards: dict[str, sensitivity.Forward] = {}
            gradients: dict[str, tuple[dict[str, jax.Array], linsolve.SolveInfo]] = {}
            if bool(info.converged) and (wrts or job.grad):
                (forwards, gradients), c, r = run_compiled(system, pairs, *programs.derivatives(wrts, job.grad), q,
                                                           params, rattler)
                timings["compile_s"] += c
                timings["derivative_s"] += r
    finally:
        if factor_ahead is not None:
            sparse.clear_prepared()  # a prediction that missed: its factor's memory
    timings["total_s"] = time.perf_counter() - wall

    meta = run_meta(job, system, info, timings, neighbor_list=nl_meta)
    return Result(job, system, q, params, info, rattler, values, forwards, gradients, timings, meta)
