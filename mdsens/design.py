"""Inverse design: tune parameters until the relaxed packing does what is asked.

The loss is a function of the varied parameters θ through the equilibrium,

    ℒ(θ) = Σ_targets ((O_t(x*(θ), θ) − t)/|t|)²  + Σ_minimize O − Σ_maximize O

(an absolute error where a target is 0), and its gradient is one reverse-mode
pass: ``∂ℒ/∂θ = ∂θℒ − (∂θF)ᵀ w`` with ``H w = ∂xℒ`` (:func:`mdsens.implicit.cotangent`;
the moduli's own solves are differentiated through, a second-order implicit
derivative). Each step

1. relaxes from the previous x* (a warm start, :func:`mdsens.job.relax_system`),
2. evaluates ℒ, the observables and ∂ℒ/∂θ in one compiled program,
3. updates θ with an optax optimizer and projects it onto the bounds.

Compile once. The relaxation's programs are cached per System, box and
cutoff (:mod:`mdsens.relax`), so the design relaxes a copy of the system whose
cutoff is a fixed ceiling above the largest diameter (its table holds a few
more pairs, each adding an exact zero) and, with ``keep="phi"``, at the
starting box: for a pair energy of r/σ alone (soft spheres) the minimum at
diameters D in a box L is the minimum at D·L₀/L in L₀, in the same
fractional coordinates q. The loss program takes q, θ and the pairs (padded
to a fixed capacity) as arguments. Step 2 onwards compiles nothing unless a
diameter outgrows the ceiling or the pairs their capacity (counted in
``compiles``).

Contact changes make ℒ piecewise smooth. The contact network is compared
between accepted steps and its changes counted. A step whose loss jumps
(rises by more than ``JUMP`` × |ℒ| plus a small floor) within one contact
network, or whose relaxation fails, is rejected and retried with half the
learning rate; a jump across a contact change is the loss's discontinuity
and is accepted (rejecting it pinned designs to the edge of a branch, with
the rate falling to 1e-17), the rate halved. The rate recovers by
``RECOVER`` per smooth step, and never falls below lr·2^−max_retries.
``max_rise`` (``--max-rise R``) makes the rule strict: a step whose loss
rises by more than R × |ℒ| (plus the floor) is rejected whether or not the
contacts changed, and retried at half the rate; the last retry (at
lr·2^−max_retries) is accepted whatever its loss, so a design cannot be
pinned to a branch edge for good.
``stop_at`` (``--stop-at OBS=VALUE``, with ``tol``) ends the loop at the
first step where every such OBS is within tol and writes that step: the loss
is then a guide (e.g. the pressure, continuous across contact changes) while
a discontinuous observable (ν) is only watched.

Correctness is checked as it goes: every ``fd_every``-th step and the last,
the gradient along a random unit direction against central differences of
the whole loss, re-relaxed (and Newton-polished) at θ ± h.

Two more ensembles of the same loop, each a runner: ``keep="pressure"``
(:class:`_PressureRunner`) relaxes the enthalpy E + P V from the previous
positions and cell (:func:`mdsens.barostat.relax`) and differentiates through
the root ∇_(q,u) H = 0 (:func:`pressure_program`); ``seeds``
(:class:`_BatchRunner`) designs one θ for the mean loss of M packings,
relaxed by the batched FIRE chunk of :mod:`mdsens.ensemble` and
differentiated by the loss program vmapped over the members.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import barostat, implicit, job as _job, linsolve, observables, sensitivity
from mdsens.system import Params, System
from mdsens.systems import UsageError

Array = jax.Array

OPTIMIZERS = ("adam", "rmsprop", "sgd")
KEEP = ("phi", "pressure")
#: a step whose loss rises by more than JUMP·|ℒ| + JUMP_FLOOR·|ℒ_start| is rejected (the floor keeps an
#: optimizer's small oscillations about a reached target from counting as jumps)
JUMP, JUMP_FLOOR = 1.0, 1e-3
#: after an accepted step the learning rate recovers by this factor, up to the requested one
RECOVER = 1.25
#: the relaxation's cutoff ceiling, as a multiple of the largest interaction range
CUTOFF_HEADROOM = 1.25
#: the derivative pairs' capacity, as a multiple of the first count
PAIR_HEADROOM = 1.25
#: parameters that must stay positive: their default lower bound is this fraction of their smallest start value
POSITIVE = {"diameter": 1e-3, "epsilon": 1e-3, "sigma": 1e-3, "box": 1e-3, "pressure": 1e-3}
#: the finite-difference check passes within this relative error (see ``fd_check``)
FD_RTOL = 1e-3


@dataclass
class Design:
    """A design request: what ``mdsens design`` parses. ``job`` carries the
    system, ``--set``, seed and the relaxation and solver settings."""

    job: _job.Job = field(default_factory=_job.Job)
    targets: dict[str, float] = field(default_factory=dict)
    minimize: list[str] = field(default_factory=list)
    maximize: list[str] = field(default_factory=list)
    vary: list[str] = field(default_factory=list)
    steps: int = 50
    optimizer: str = "adam"
    lr: float = 0.01
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    keep: str | None = None
    observe: list[str] = field(default_factory=list)  # recorded every step, not in the loss
    tol: float | None = None  # stop once every target is within this relative error
    fd_every: int | None = 10  # None: no finite-difference checks (Python only)
    fd_h: float = 1e-5
    max_retries: int = 6
    max_rise: float | None = None  # reject any step whose loss rises by more than max_rise·|ℒ|, across contact changes too
    stop_at: dict[str, float] = field(default_factory=dict)  # stop (and write that step) once these are within tol
    seeds: Any = None  # a range of seeds: one shared θ for the members' mean loss (None: job.seed alone)


@dataclass
class Plan:
    """A validated design: the system and everything derived from the request."""

    design: Design
    system: System
    names: list[str]  # every observable computed (the loss's first)
    bounds: dict[str, tuple[float, float]]
    base: dict[str, Array]  # the starting parameters
    phi: float | None  # the packing fraction held (keep="phi")
    fixed: bool = False  # a fixed-pressure system (keep="pressure"): the state is (q, cell)
    members: "Members | None" = None  # --seeds: the ensemble whose mean loss is designed


@dataclass
class Members:
    """The members of an ensemble design (``--seeds``): one model, M seeds; the
    starting parameters ``base`` and initial real-space ``positions`` stacked
    along a leading member axis."""

    seeds: list[int]
    base: dict[str, Array]
    positions: Array


@dataclass
class Step:
    """One accepted design step."""

    theta: dict[str, np.ndarray]
    params: dict[str, np.ndarray]
    q: Array
    loss: float
    values: dict[str, np.ndarray]
    grad: dict[str, np.ndarray]
    rattler: np.ndarray
    contacts: set
    info: Any  # RelaxInfo
    solve: linsolve.SolveInfo
    lr: float
    relax_s: float
    loss_s: float
    pairs: Array | None
    members: dict[str, np.ndarray] | None = None  # --seeds: each member's loss and observables (M,)


@dataclass
class DesignResult:
    plan: Plan
    history: list[Step]
    fd_checks: list[dict[str, float]]
    contact_changes: int
    rejections: int
    jumps: int  # accepted steps whose loss jumped (across a contact change, or after every retry)
    compiles: dict[str, int]
    converged: bool  # every relaxation converged
    stopped: str  # why the loop ended
    timings: dict[str, float]
    relax_system: System

    @property
    def final(self) -> Step:
        return self.history[-1]

    @property
    def best(self) -> int:
        """The row written: the lowest loss, or the last row where ``stop_at`` stopped the design."""
        if self.stopped == "stop-at":
            return len(self.history) - 1
        return int(np.nanargmin([s.loss for s in self.history]))

    def record(self) -> dict[str, Any]:
        """The run-file record of the designed packing — the accepted step of
        lowest loss (``best_step``; the last one when a design converges
        smoothly) — for :func:`mdsens.io.write`, plus the ``design`` group: the
        whole trajectory, the gradient at that step and the checks."""
        plan, last = self.plan, self.history[self.best]
        system = plan.system
        params = {k: jnp.asarray(v) for k, v in last.params.items()}
        observed = {name: np.asarray(last.values[name]) for name in plan.names}
        observed["max_force"] = np.asarray(last.info.max_force)
        q, rattler, steps, converged = last.q, last.rattler, int(last.info.steps), bool(last.info.converged)
        h = self.history
        members = None
        if plan.members is not None:
            # The run-file part is the first member's packing (its own observables, so that
            # `mdsens run from_file` reproduces them); /design/members holds every member.
            members = {"seed": np.asarray(plan.members.seeds),
                       **{name: np.stack([s.members[name] for s in h]) for name in ["loss", *plan.names]},
                       "position": np.stack([np.asarray(system.to_real(last.q[m], {k: v[m] for k, v in params.items()}))
                                             for m in range(len(plan.members.seeds))])}
            params = {k: v[0] for k, v in params.items()}
            observed = {name: np.asarray(last.members[name][0]) for name in plan.names}
            observed["max_force"] = np.asarray(last.info.member_max_force[0])
            q, rattler = last.q[0], last.rattler[0]
            steps, converged = int(last.info.member_steps[0]), bool(last.info.member_converged[0])
        design = {
            "loss": np.array([s.loss for s in h]),
            **{name: np.stack([s.theta[name] for s in h]) for name in plan.design.vary},
            "observables": {name: np.array([s.values[name] for s in h]) for name in plan.names},
            "learning_rate": np.array([s.lr for s in h]),
            "relax_steps": np.array([int(s.info.steps) for s in h]),
            "rattlers": np.array([int(np.sum(s.rattler)) for s in h]),
            "gradient": {name: np.asarray(last.grad[name]) for name in plan.design.vary},
            "fd_check": {key: np.array([c[key] for c in self.fd_checks]) for key in _FD_KEYS},
            "attrs": self.attributes(),
        }
        if plan.phi is not None:
            design["box"] = np.stack([s.params["box"] for s in h])
        if plan.fixed:  # the relaxed cell of every step: sides (iso, aniso) or edge vectors as rows (shear)
            cell = jax.jit(lambda p: system.cell(p))
            design["box"] = np.stack([np.asarray(cell({k: jnp.asarray(v) for k, v in s.params.items()}))
                                      for s in h])
            if system.box_dof != "shear":
                design["box"] = np.stack([np.diag(c) for c in design["box"]])
        if members is not None:
            design["members"] = members
        box = None
        if system.periodic:
            box = barostat.record_box(system, params) if plan.fixed else np.asarray(params["box"])
        return {
            "positions": np.asarray(system.to_real(q, params)),
            "box": box,
            "species": np.asarray(system.species),
            "rattler": np.asarray(rattler),
            "parameters": {k: np.asarray(v) for k, v in params.items()},
            "observables": {**observed, "minimizer_steps": np.asarray(steps),
                            "converged": np.asarray(converged)},
            "sensitivity": {},
            "gradient": {},
            "meta": self.meta(),
            "design": design,
        }

    def attributes(self) -> dict[str, Any]:
        d = self.plan.design
        failed = [c for c in self.fd_checks if not c["passed"]]
        return {"targets": dict(d.targets), "minimize": list(d.minimize), "maximize": list(d.maximize),
                "vary": list(d.vary), "optimizer": d.optimizer, "lr": d.lr,
                "bounds": {k: list(v) for k, v in self.plan.bounds.items()}, "keep": d.keep or "",
                "seeds": [] if self.plan.members is None else list(self.plan.members.seeds),
                "phi": self.plan.phi if self.plan.phi is not None else "", "steps": len(self.history),
                "steps_requested": d.steps, "tol": d.tol if d.tol is not None else "",
                "contact_changes": self.contact_changes, "rejections": self.rejections, "jumps": self.jumps,
                "best_step": self.best, "best_loss": self.history[self.best].loss,
                "fd_checks": len(self.fd_checks), "fd_failed": len(failed), "converged": self.converged,
                "stopped": self.stopped, "compiles": dict(self.compiles), "jump": JUMP, "fd_rtol": FD_RTOL,
                "max_rise": d.max_rise if d.max_rise is not None else "", "stop_at": dict(d.stop_at)}

    def meta(self) -> dict[str, Any]:
        job, system, last = self.plan.design.job, self.plan.system, self.history[self.best]
        extra = {}
        if self.plan.members is not None:  # the file's packing is the first member's
            job = replace(job, seed=self.plan.members.seeds[0])
            extra = dict(members=len(self.plan.members.seeds))
        if self.plan.fixed:
            extra = dict(ensemble=barostat.ensemble(system), box_dof=system.box_dof,
                         target_pressure=float(last.params["pressure"]), preconditioner="none")
        return _job.run_meta(job, system, last.info, dict(self.timings), design=self.attributes(),
                             derivatives="the loss gradient of every design step (/design)", **extra)

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest: what ``mdsens design --json`` prints."""
        first, last = self.history[0], self.final
        return {
            "system": self.plan.system.name, "n": self.plan.system.n, "dim": self.plan.system.dim,
            "steps": len(self.history), "converged": self.converged, "stopped": self.stopped,
            "loss": {"start": first.loss, "final": last.loss},
            "observables": {name: {"start": float(first.values[name]), "final": float(last.values[name])}
                            for name in self.plan.names},
            "targets": dict(self.plan.design.targets),
            "contact_changes": self.contact_changes, "rejections": self.rejections, "jumps": self.jumps,
            "best": {"step": self.best, "loss": self.history[self.best].loss,
                     **{name: float(self.history[self.best].values[name]) for name in self.plan.names}},
            "fd_check": [{k: (bool(v) if k == "passed" else float(v)) for k, v in c.items()} for c in self.fd_checks],
            "compiles": dict(self.compiles), "timings": dict(self.timings),
            **({} if self.plan.members is None else {
                "seeds": list(self.plan.members.seeds),
                "members": {name: np.asarray(last.members[name]).tolist() for name in ["loss", *self.plan.names]}}),
        }


_FD_KEYS = ("step", "h", "directional", "finite_difference", "relative_error", "passed")


# -- validation ------------------------------------------------------------------------------


def parse_target(text: str, option: str = "--target") -> tuple[str, float]:
    """``OBS=VALUE`` → (name, value)."""
    if "=" not in text:
        raise UsageError(f"{option} {text!r}: expected OBS=VALUE, e.g. {option} poisson_ratio=0.3")
    name, value = (t.strip() for t in text.split("=", 1))
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{option} {text!r}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise UsageError(f"{option} {text!r}: the value must be finite")
    return name, number


def parse_bound(text: str) -> tuple[str, tuple[float, float]]:
    """``PARAM=LO,HI`` (either side may be empty for no bound) → (name, (lo, hi))."""
    if "=" not in text or text.split("=", 1)[1].count(",") != 1:
        raise UsageError(f"--bound {text!r}: expected PARAM=LO,HI, e.g. --bound diameter=0.5,2 (LO or HI may be empty)")
    name, rest = (t.strip() for t in text.split("=", 1))
    lo_text, hi_text = (t.strip() for t in rest.split(","))
    try:
        lo = float(lo_text) if lo_text else -math.inf
        hi = float(hi_text) if hi_text else math.inf
    except ValueError:
        raise UsageError(f"--bound {text!r}: LO and HI must be numbers") from None
    if math.isnan(lo) or math.isnan(hi) or not lo < hi:
        raise UsageError(f"--bound {text!r}: needs LO < HI")
    return name, (lo, hi)


def parse_check_every(k: int) -> int | None:
    """``--check-every K`` → the finite-difference check interval (None for K = 0: no checks)."""
    if k < 0:
        raise UsageError(f"--check-every must be 0 (no checks) or positive, got {k}")
    return None if k == 0 else int(k)


def particle_diameters(system: System, params: Params) -> Array:
    """(N,) each particle's diameter: ``diameter`` per particle, or per species."""
    d = params["diameter"]
    return d if d.shape == (system.n,) else d[jnp.asarray(system.species)]


def packing_fraction(system: System, params: Params) -> Array:
    """φ = Σ particle volumes / box volume (disks in 2D, spheres in 3D)."""
    r = particle_diameters(system, params) / 2
    volumes = math.pi * r**2 if system.dim == 2 else 4.0 / 3.0 * math.pi * r**3
    return jnp.sum(volumes) / system.volume(params)


def prepare(design: Design) -> Plan:
    """Build the system and validate the request before any relaxation:
    every usage error surfaces here (one line, exit 2 in the CLI)."""
    d = design
    if not d.targets and not d.minimize and not d.maximize:
        raise UsageError("nothing to design for: give --target OBS=VALUE, --minimize OBS or --maximize OBS")
    if not d.vary:
        raise UsageError("give the parameters to vary: --vary PARAM (e.g. --vary diameter)")
    if d.steps <= 0:
        raise UsageError(f"--steps must be positive, got {d.steps}")
    if not (d.lr > 0 and math.isfinite(d.lr)):
        raise UsageError(f"--lr must be positive, got {d.lr}")
    if d.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {d.optimizer!r}: choose {', '.join(OPTIMIZERS)}")
    if d.keep is not None and d.keep not in KEEP:
        raise UsageError(f"--keep {d.keep!r}: choose {' or '.join(KEEP)}")
    if d.max_rise is not None and not (d.max_rise >= 0 and math.isfinite(d.max_rise)):
        raise UsageError(f"--max-rise must be a finite number >= 0, got {d.max_rise}")
    if d.tol is not None and not d.tol > 0:
        raise UsageError(f"--tol must be positive, got {d.tol}")
    if d.fd_every is not None and d.fd_every <= 0:
        raise UsageError(f"the finite-difference check interval must be positive, got {d.fd_every}")
    loss_names = [*d.targets, *d.minimize, *d.maximize]
    if len(set(loss_names)) != len(loss_names):
        raise UsageError("an observable appears twice among --target, --minimize and --maximize")
    if d.stop_at and d.tol is None:
        raise UsageError("--stop-at needs --tol: the relative distance from its value at which the design stops")
    names = loss_names + [n for n in [*d.observe, *d.stop_at] if n not in loss_names]
    names = list(dict.fromkeys(names))
    job = replace(d.job, observe=names, wrt=None, grad=[])
    if d.seeds is not None:
        if len(d.seeds) == 0:
            raise UsageError("--seeds: no seeds")
        job = replace(job, seed=int(d.seeds[0]))
    system, _, _ = _job.prepare(job)
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    q0 = jnp.asarray(system.to_solver(jnp.asarray(system.positions), params))
    for name in [*loss_names, *(n for n in d.stop_at if n not in loss_names)]:
        try:
            shape = jax.eval_shape(lambda q, p: observables.OBSERVABLES[name](system, q, p), q0, params).shape
        except ValueError as err:
            raise UsageError(f"{name}: {err}") from None
        if shape != ():
            raise UsageError(f"{name} has shape {shape}: a design loss or --stop-at needs a scalar observable")
    fixed = barostat.is_fixed_pressure(system)
    if d.keep == "pressure" and not fixed:
        raise UsageError("--keep pressure needs a system built at fixed pressure: add --set pressure=P "
                         "(and --set box_dof=iso, aniso or shear; iso by default)")
    if fixed and d.keep == "phi":
        raise UsageError("--keep phi holds the packing fraction in a fixed box, but this system relaxes its box at "
                         "fixed pressure (--set pressure=...): use --keep pressure")
    if fixed and d.keep is None:  # built at fixed pressure: the box relaxes whatever --keep says
        design = d = replace(d, keep="pressure")
    if fixed and job.solver not in ("cg", "dense"):
        raise UsageError(f"--solver {job.solver!r} is not available at fixed pressure: choose 'cg' or 'dense'")
    if len(set(d.vary)) != len(d.vary):
        raise UsageError("a parameter is given twice to --vary")
    for name in d.vary:
        if fixed and name in ("strain", "box"):
            raise UsageError(f"--vary {name}: at fixed pressure the cell relaxes to the pressure (it is state, not a "
                             "design parameter); vary pressure or the diameters instead")
        if name not in params:
            raise UsageError(f"--vary {name!r}: no parameter {name!r}; this system's parameters: {', '.join(params)}")
        if not jnp.issubdtype(params[name].dtype, jnp.floating):
            raise UsageError(f"--vary {name!r}: not a floating-point parameter")
    bounds = {}
    for name in d.vary:
        start = float(jnp.min(params[name]))
        if name in POSITIVE:
            bounds[name] = (POSITIVE[name] * start, math.inf)
    for name, bound in d.bounds.items():
        if name not in d.vary:
            raise UsageError(f"--bound {name}: {name!r} is not varied (--vary {name})")
        bounds[name] = bound
    for name, (lo, hi) in bounds.items():
        v = np.asarray(params[name])
        if np.any(v < lo) or np.any(v > hi):
            raise UsageError(f"--bound {name}={lo:g},{hi:g} excludes the starting value "
                             f"({np.min(v):g} to {np.max(v):g})")
    phi = None
    if d.keep == "phi":
        observables.require(system, "packing_fraction", UsageError, what="--keep phi")
        if "box" in d.vary:
            raise UsageError("--keep phi sets the box from the diameters: do not --vary box")
        _check_scale_free(system, params)
        phi = float(jax.jit(lambda p: packing_fraction(system, p))(params))
    members = None
    if d.seeds is not None:
        if fixed:
            raise UsageError("--seeds at fixed pressure is not available: the batched relaxation holds each box "
                             "fixed; design at fixed pressure one seed at a time")
        members = _members(d, job, system)
    return Plan(design, system, names, bounds, params, phi, fixed, members)


def _members(d: Design, job: _job.Job, system: System) -> Members:
    """Build every seed's packing and check that one θ can be shared: the same
    model (:func:`mdsens.ensemble.group`) and, for each varied parameter, the
    same shape and the same starting value in every member."""
    from mdsens import ensemble, systems

    family = systems.get(job.system)
    config = family.resolve(job.overrides)
    built = [system] + [family.build_fn(seed=int(seed), **config) for seed in list(d.seeds)[1:]]
    for name in d.vary:
        shapes = sorted({tuple(np.shape(b.params[name])) for b in built})
        if len(shapes) > 1:
            raise UsageError(f"--seeds with --vary {name}: {name} differs in size between members ({shapes}); "
                             "one shared parameter set needs the same shape in every member")
        first = np.asarray(built[0].params[name])
        if any(not np.array_equal(np.asarray(b.params[name]), first) for b in built[1:]):
            raise UsageError(f"--seeds with --vary {name}: its starting value differs between members (drawn per "
                             f"seed, as {system.name}'s per-particle diameters are); a shared design needs a "
                             "parameter every member starts from, e.g. bidisperse's per-species diameter")
    if len(ensemble.group(built)) > 1:
        raise UsageError("--seeds: the members are not one model (N, d, species, parameter shapes or pair "
                         "function differ), so they cannot share one batched program")
    base = ensemble.stack([{k: jnp.asarray(v) for k, v in b.params.items()} for b in built])
    positions = jnp.stack([jnp.asarray(b.positions) for b in built])
    return Members([int(seed) for seed in d.seeds], base, positions)


def _check_scale_free(system: System, params: Params) -> None:
    """--keep phi relaxes at the starting box (see the module docstring): the
    energy must be unchanged when every length (diameters, box) scales."""
    q = system.to_solver(jnp.asarray(system.positions), params)
    scaled = {**params, "diameter": 1.1 * params["diameter"], "box": 1.1 * params["box"]}
    energy = jax.jit(system.energy)
    e0, e1 = float(energy(q, params)), float(energy(q, scaled))
    if not abs(e1 - e0) <= 1e-10 * max(abs(e0), 1e-300):
        raise UsageError(f"--keep phi: {system.name!r}'s energy is not a function of r/diameter alone")


# -- the compiled pieces --------------------------------------------------------------------


def physical_fn(plan: Plan) -> Callable[..., Params]:
    """``physical(θ, base=plan.base)``: θ (the varied parameters) → every
    parameter, the others from ``base`` (one member's starting parameters);
    with ``keep="phi"`` the box is scaled isotropically to hold the base's φ:
    ``L = L₀ (Σv(D) / Σv(D₀))^(1/d)``."""
    system, keep_phi = plan.system, plan.phi is not None

    def volumes(p: Params) -> Array:
        r = particle_diameters(system, p) / 2
        return jnp.sum(math.pi * r**2 if system.dim == 2 else 4.0 / 3.0 * math.pi * r**3)

    def physical(theta: dict[str, Array], base: Params | None = None) -> Params:
        base = plan.base if base is None else base
        p = {**base, **theta}
        if keep_phi:
            p["box"] = base["box"] * (volumes(p) / volumes(base)) ** (1.0 / system.dim)
        return p

    return physical


def _loss_of(design: Design, values: dict[str, Array]) -> Array:
    total = jnp.zeros((), jnp.result_type(float))
    for name, t in design.targets.items():
        err = (values[name] - t) / abs(t) if t != 0 else values[name]
        total = total + err**2
    for name in design.minimize:
        total = total + values[name]
    for name in design.maximize:
        total = total - values[name]
    return total


def loss_program(plan: Plan) -> Callable:
    """``(q*, θ, pairs, base=None) -> (ℒ, observables, ∂ℒ/∂θ, solve info, rattler, contact flags)``:
    one reverse-mode solve for the whole loss (plus the solves inside the
    moduli, differentiated through). ``pairs`` is None (all pairs) or a
    padded (2, M) array: data, not a compiled constant; ``base`` the
    parameters that θ does not set (default: the plan's), an argument so that
    one program serves every member of an ensemble (``vmap``)."""
    design, system, names = plan.design, plan.system, plan.names
    physical = physical_fn(plan)
    job = design.job

    def program(q: Array, theta: dict[str, Array], pairs: Array | None, base: Params | None = None):
        s = system if pairs is None else system.with_pairs(pairs)
        params = physical(theta, base)
        rattler = observables.rattlers(s, jax.lax.stop_gradient(q), jax.lax.stop_gradient(params))
        held = s.held_only(rattler)  # rattlers' contacts carry no load (System.held_only)

        def f(q_, theta_):
            p = physical(theta_, base)
            values = {name: observables.OBSERVABLES[name](held, q_, p) for name in names}
            return _loss_of(design, values), values

        (loss, values), (g_q, g_theta) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(q, theta)
        solve = _job._solver(job, held, q, params, rattler)
        w, info = implicit.cotangent(sensitivity.optimality(held), q, params, g_q, solve,
                                     sensitivity.gauge_for(held, rattler), hvp=held.hessian_vp)
        _, pull = jax.vjp(lambda t: physical(t, base), theta)
        (g_implicit,) = pull(w)
        grad = jax.tree_util.tree_map(jnp.add, g_theta, g_implicit)
        contacts, i, j = s.contact_list(q, params)
        return loss, values, grad, info, rattler, (contacts, i, j)

    return program


def _without_strain(params: Params) -> Params:
    return {k: v for k, v in params.items() if k != "strain"}


def pressure_program(plan: Plan) -> Callable:
    """The loss program at fixed pressure: ``(z*, θ, pairs) -> (ℒ, observables,
    ∂ℒ/∂θ, solve info, rattler, contact flags)`` with ``z = (q, u)`` the pair of
    positions and the cell's box-dof coordinates (:func:`mdsens.barostat.state`).
    The gradient goes through the root ``∇_z (E + P V) = 0``: one reverse solve
    with the Hessian of the enthalpy in (q, u), so it carries both the
    particles' and the cell's response to θ — the engine's pytree solve, as
    ``mdsens run`` at fixed pressure does it: the assembled product
    (:func:`mdsens.barostat.hessian_vp`) and the job's solver and
    preconditioner (:func:`mdsens.barostat.solver_for`)."""
    design, system, names = plan.design, plan.system, plan.names
    physical = physical_fn(plan)
    job = design.job

    def program(z: Array, theta: dict[str, Array], pairs: Array | None):
        s = system if pairs is None else system.with_pairs(pairs)
        fixed = _without_strain(physical(theta))
        q, params = barostat.unpack(s, z, fixed)
        rattler = observables.rattlers(s, jax.lax.stop_gradient(q), jax.lax.stop_gradient(params))
        held = s.held_only(rattler)  # rattlers' contacts carry no load (System.held_only)

        def f(z_, theta_):
            q_, p_ = barostat.unpack(held, z_, _without_strain(physical(theta_)))
            values = {name: observables.OBSERVABLES[name](held, q_, p_) for name in names}
            return _loss_of(design, values), values

        (loss, values), (g_z, g_theta) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(z, theta)
        solve = barostat.solver_for(held, q, params, rattler, job.solver, job.rtol, job.preconditioner)
        w, info = implicit.cotangent(barostat.optimality(held), z, fixed, g_z, solve,
                                     barostat.gauge_for(held, rattler), barostat.hessian_vp(held))
        _, pull = jax.vjp(lambda t: _without_strain(physical(t)), theta)
        (g_implicit,) = pull(w)
        grad = jax.tree_util.tree_map(jnp.add, g_theta, g_implicit)
        contacts, i, j = s.contact_list(q, params)
        return loss, values, grad, info, rattler, (contacts, i, j)

    return program


_POLISH: "weakref.WeakKeyDictionary[System, Callable]" = weakref.WeakKeyDictionary()
_POLISH_PRESSURE: "weakref.WeakKeyDictionary[System, Callable]" = weakref.WeakKeyDictionary()


def _newton(root: Callable, project: Callable, z: Any, theta: Params, steps: int) -> Any:
    """``steps`` gauge-fixed Newton steps on ``root(z, θ) = 0`` with a dense solve
    (z an array or a pytree, e.g. the fixed-pressure pair (q, u)); kept only if
    they lowered max|root| (near a contact change the Hessian is discontinuous
    and a Newton step can leave the basin)."""
    dense = linsolve.dense()
    tree = jax.tree_util.tree_map

    def step(_, zk):
        def matvec(v):
            pv = project(v)
            return tree(lambda a, b, c: a + b - c, project(jax.jvp(lambda y: root(y, theta), (zk,), (pv,))[1]), v, pv)

        delta, _ = dense(matvec, tree(jnp.negative, project(root(zk, theta))))
        return tree(jnp.add, zk, delta)

    def worst(zk):
        return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in jax.tree_util.tree_leaves(root(zk, theta))]))

    polished = jax.lax.fori_loop(0, steps, step, z)
    better = worst(polished) <= worst(z)
    return tree(lambda a, b: jnp.where(better, a, b), polished, z)


def _polish_pressure_program(system: System, steps: int = 4) -> Callable:
    """:func:`_polish_program` at fixed pressure: Newton on ``∇_z (E + P V)``,
    positions and cell together, all pairs, compiled once per system."""
    if system not in _POLISH_PRESSURE:
        root = barostat.optimality(system)

        def polish(z, theta, rattler):
            return _newton(root, barostat.gauge_for(system, rattler)(z, theta), z, theta, steps)

        _POLISH_PRESSURE[system] = jax.jit(polish)
    return _POLISH_PRESSURE[system]


def _polish_program(system: System, steps: int = 4) -> Callable:
    """A few gauge-fixed Newton steps with a dense solve, all pairs, compiled
    once per system (:func:`mdsens.sensitivity.newton_polish` compiles per call):
    the finite-difference check's re-relaxations to round-off."""
    if system not in _POLISH:
        root = sensitivity.optimality(system)

        def polish(q, params, rattler):
            return _newton(root, sensitivity.gauge_for(system, rattler)(q, params), q, params, steps)

        _POLISH[system] = jax.jit(polish)
    return _POLISH[system]


#: the finite-difference check polishes with dense Newton steps up to this many particles
POLISH_MAX_N = 512


# -- the loop ----------------------------------------------------------------------------------


class _Runner:
    """The state shared by the design steps: the relaxation system, the
    compiled loss programs, the pair capacity, the compile counts."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.job = plan.design.job
        self.physical = physical_fn(plan)
        self.parameters = jax.jit(self._parameters)
        self.program = jax.jit(loss_program(plan))
        self.executables: dict[Any, Callable] = {}
        self.capacity = 0
        self.compiles = {"loss": 0, "relax_system": 0}
        self.compile_s = 0.0  # loss programs and relaxations
        self.relax_sys = None
        self.ceiling = 0.0

    def _parameters(self, theta: dict[str, Array], base: Params | None = None) -> tuple[Params, Params, Array, Array]:
        """θ → (every parameter, the parameters the relaxation sees, the
        latter's interaction range, whether the range fits the minimum image).
        With keep="phi" the relaxation sees the starting box and the diameters
        scaled by L₀/L: the same minimum in the same q. One compiled program,
        not a dozen small ones."""
        system = self.plan.system
        base = self.plan.base if base is None else base
        params = self.physical(theta, base)
        frame = params
        if self.plan.phi is not None:
            scale = params["box"][0] / base["box"][0]
            frame = {**params, "diameter": params["diameter"] / scale, "box": base["box"]}
        fits = system.cutoff(params) < 0.5 * jnp.min(params["box"]) if system.periodic else jnp.asarray(True)
        return params, frame, system.cutoff(frame), fits

    def _relax_system(self, cutoff: float) -> System:
        if self.relax_sys is None or (math.isfinite(cutoff) and cutoff > self.ceiling):
            ceiling = CUTOFF_HEADROOM * cutoff if math.isfinite(cutoff) else cutoff
            self.ceiling = ceiling
            # A new System object: its own cache of compiled relaxations (see module docstring).
            self.relax_sys = replace(self.plan.system, cutoff=lambda p, c=ceiling: c)
            self.compiles["relax_system"] += 1
        return self.relax_sys

    def relax(self, theta: dict[str, Array], start: "Step | None"):
        """Relax at θ from the state of ``start`` (None: the initial positions).
        Returns ``(params, q*, info, pairs, relax_s)``, or None where the
        interaction range would exceed half the box (the minimum image)."""
        params, frame, cutoff, fits = self.parameters(theta)
        if not bool(fits):
            return None
        system = self._relax_system(float(cutoff))
        q0 = None if start is None else start.q
        x0 = None if q0 is None else q0 * frame["box"] if system.periodic else q0
        t = time.perf_counter()
        q, info, compile_s, pairs, _ = _job.relax_system(self.job, system, frame, x0=x0)
        self.compile_s += compile_s
        if pairs is not None:
            pairs = self._pad(np.asarray(pairs))
        return params, q, info, pairs, time.perf_counter() - t - compile_s

    def _pad(self, pairs: np.ndarray) -> Array:
        m = pairs.shape[1]
        if m > self.capacity:
            self.capacity = int(math.ceil(PAIR_HEADROOM * m))
        out = np.full((2, self.capacity), self.plan.system.n, dtype=np.int32)
        out[:, :m] = pairs
        return jnp.asarray(out)

    def state(self, q: Array, params: Params) -> Array:
        """The loss program's state argument: q (fixed box)."""
        return q

    def evaluate(self, q: Array, params: Params, theta: dict[str, Array], pairs: Array | None):
        state = self.state(q, params)
        key = None if pairs is None else pairs.shape
        if key not in self.executables:
            t = time.perf_counter()
            self.executables[key] = self.program.lower(state, theta, pairs).compile()
            self.compiles["loss"] += 1
            self.compile_s += time.perf_counter() - t
        return self.executables[key](state, theta, pairs)

    def polish(self, q: Array, params: Params, rattler: Array) -> tuple[Array, Params]:
        if self.plan.system.n > POLISH_MAX_N:
            return q, params
        return _polish_program(self.plan.system)(q, params, rattler), params

    def programs(self) -> int:
        """Compiled relaxation programs so far (chunks, table builds)."""
        return self.compiles["relax_system"]

    def reduce(self, out):
        """The loss program's outputs, plus per-member values (None: one packing)."""
        return (*out, None)

    def unjammed(self, rattler: np.ndarray) -> bool:
        """Every particle a rattler: no moduli (ν came out as the affine Cauchy value 1/3 just before)."""
        return bool(np.all(rattler))

    def contacts(self, flags) -> set:
        return _contact_set(flags, self.plan.system.n)


class _BatchRunner(_Runner):
    """The design steps of an ensemble (``--seeds``): every member relaxes from
    its previous state in one batched FIRE program (the chunk of
    :func:`mdsens.ensemble.relax_batch`, kept with its table across the steps
    so that it compiles once: ``relax_batch`` itself builds a new table and
    compiles on every call), and one vmapped loss program gives every member's
    loss and gradient; the design follows their mean.

    State per member along a leading axis M: ``q`` (M, N, d), ``params``
    (M, …); ``pairs`` (M, 2, N·K) from each member's table."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.members = plan.members
        self.parameters = jax.jit(jax.vmap(self._parameters, in_axes=(None, 0)))
        program = loss_program(plan)
        self.program = jax.jit(jax.vmap(lambda q, t, pr, b: program(q, t, pr, b), in_axes=(0, None, 0, 0)))
        self.table = None
        self.shapes: set = set()
        self.capacities = (0, 0)

    def _table(self, model: System, frame: Params):
        from mdsens import ensemble

        smallest = float(np.min(np.asarray(frame["box"]))) if model.periodic else 0.0
        if self.table is None or self.table[0] is not model or smallest < self.table[1]:
            table = ensemble._table(model, frame, self.job.skin)
            mini, advance = ensemble._program(model, table, self.job.minimizer, self.job.ftol)
            self.table = (model, smallest, table, mini, advance)
            self.capacities = (0, 0)
        return self.table[2:]

    def relax(self, theta: dict[str, Array], start: "Step | None"):
        from mdsens import ensemble

        job = self.job
        params, frame, cutoff, fits = self.parameters(theta, self.members.base)
        if not bool(jnp.all(fits)):
            return None
        model = self._relax_system(float(jnp.max(cutoff)))
        table, mini, advance = self._table(model, frame)
        box = frame["box"][:, None, :] if model.periodic else None
        x = self.members.positions if start is None else start.q * box if model.periodic else start.q
        if model.periodic:
            x = jnp.mod(x, box)
        t = time.perf_counter()
        compile_s = 0.0
        state = jax.vmap(mini.blank)(x)
        if self.capacities == (0, 0):
            self.capacities = ensemble._capacities(table, model, state.x, frame)

        def placeholder():
            k, c = self.capacities
            return ensemble.stack([table.placeholder(state.x[m], k, c) for m in range(state.x.shape[0])])

        nbrs, stale, done = placeholder(), jnp.asarray(True), 0
        while True:
            until = jnp.asarray(min(job.max_steps, done + job.chunk), jnp.int32)
            key = (nbrs.idx.shape, nbrs.cells.shape)
            t0 = time.perf_counter()
            out = jax.block_until_ready(advance(state, nbrs, frame, until, stale))
            if key not in self.shapes:  # the first call of a shape is mostly its compilation
                self.shapes.add(key)
                compile_s += time.perf_counter() - t0
            out_state, out_nbrs, _, fmax, stalled, energy = out
            if bool(np.any(np.asarray(out_nbrs.overflow))):  # redo the chunk on a bigger table
                k, c = ensemble._capacities(table, model, out_state.x, frame, grow=1.5)
                self.capacities = (max(k, self.capacities[0] + 1), max(c, self.capacities[1]))
                nbrs, stale = placeholder(), jnp.asarray(True)
                continue
            state, nbrs, stale = out_state, out_nbrs, jnp.asarray(False)
            fmax = np.asarray(fmax)
            done = int(np.max(np.asarray(state.step)))
            if np.all((fmax < job.ftol) | np.asarray(stalled)) or done >= job.max_steps:
                break
        self.compile_s += compile_s
        info = _BatchInfo(np.asarray(state.step), fmax, np.asarray(energy), fmax < job.ftol)
        q = state.x / box if model.periodic else state.x
        pairs = jax.vmap(lambda i_: ensemble.table_pairs(i_, model.n))(nbrs.idx)
        return params, q, info, pairs, time.perf_counter() - t - compile_s

    def evaluate(self, q: Array, params: Params, theta: dict[str, Array], pairs: Array | None):
        key = pairs.shape
        if key not in self.executables:
            t = time.perf_counter()
            self.executables[key] = self.program.lower(q, theta, pairs, self.members.base).compile()
            self.compiles["loss"] += 1
            self.compile_s += time.perf_counter() - t
        return self.executables[key](q, theta, pairs, self.members.base)

    def reduce(self, out):
        """The members' outputs → (mean ℒ, mean observables, mean ∂ℒ/∂θ, the
        worst solve, rattlers (M, N), contact flags, per-member observables)."""
        loss, values, grad, info, rattler, flags = out
        worst = linsolve.SolveInfo(*(jnp.max(a) for a in info))
        return (jnp.mean(loss), {k: jnp.mean(v, axis=0) for k, v in values.items()},
                {k: jnp.mean(v, axis=0) for k, v in grad.items()}, worst, rattler, flags,
                {"loss": loss, **values})

    def unjammed(self, rattler: np.ndarray) -> bool:
        return bool(np.any(np.all(rattler, axis=-1)))

    def contacts(self, flags) -> set:
        n = self.plan.system.n
        out: set = set()
        for m in range(np.shape(flags[0])[0]):
            out |= {m * n * n + key for key in _contact_set(tuple(a[m] for a in flags), n)}
        return out

    def polish(self, q: Array, params: Params, rattler: Array) -> tuple[Array, Params]:
        if self.plan.system.n > POLISH_MAX_N:
            return q, params
        program = _polish_program(self.plan.system)
        rows = [program(q[m], {k: v[m] for k, v in params.items()}, rattler[m]) for m in range(q.shape[0])]
        return jnp.stack(rows), params

    def programs(self) -> int:
        return len(self.shapes)


class _BatchInfo(NamedTuple):
    """A batched relaxation's outcome, per member (M,) and as one: the most
    steps, the worst force, converged only if every member converged."""

    member_steps: np.ndarray
    member_max_force: np.ndarray
    member_energy: np.ndarray
    member_converged: np.ndarray

    @property
    def steps(self):
        return int(np.max(self.member_steps))

    @property
    def max_force(self):
        return float(np.max(self.member_max_force))

    @property
    def energy(self):
        return float(np.mean(self.member_energy))

    @property
    def converged(self):
        return bool(np.all(self.member_converged))


class _PressureRunner(_Runner):
    """The design steps at fixed pressure: each relaxation minimises the enthalpy
    from the previous step's positions *and cell* (:func:`mdsens.barostat.relax`,
    whose programs are cached per system, tolerance and table capacity; the
    interaction range is a traced parameter there, so no cutoff ceiling is
    needed), and the loss program differentiates through the root in (q, cell)
    (:func:`pressure_program`)."""

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.program = jax.jit(pressure_program(plan))
        self.listed = _job.use_neighbor_list(self.job, plan.system)
        self.relax_sys = plan.system

    def _parameters(self, theta):
        params = _without_strain(self.physical(theta))
        return params, params, self.plan.system.cutoff(params), jnp.asarray(True)

    def relax(self, theta: dict[str, Array], start: "Step | None"):
        params, _, _, _ = self.parameters(theta)
        strain = self.plan.base["strain"] if start is None else jnp.asarray(start.params["strain"])
        q0 = None if start is None else start.q
        job = self.job
        t = time.perf_counter()
        try:
            out = barostat.relax(self.plan.system, {**params, "strain": strain}, q0, job.minimizer, job.ftol,
                                 job.max_steps, job.chunk, None, job.skin)
        except RuntimeError:  # the cell became narrower than twice the interaction range
            return None
        self.compile_s += out.compile_s
        pairs = self._pad(out.pairs) if self.listed else None
        return out.params, out.q, out.info, pairs, time.perf_counter() - t - out.compile_s

    def state(self, q: Array, params: Params) -> tuple[Array, Array]:
        return barostat.state(self.plan.system, q, {"strain": jnp.asarray(params["strain"])})

    def polish(self, q: Array, params: Params, rattler: Array) -> tuple[Array, Params]:
        system = self.plan.system
        if system.n > POLISH_MAX_N:
            return q, params
        params = {k: jnp.asarray(v) for k, v in params.items()}
        theta = _without_strain(params)
        z = _polish_pressure_program(system)(self.state(q, params), theta, rattler)
        q, params = barostat.unpack(system, z, theta)
        return jnp.mod(q, 1.0), params

    def programs(self) -> int:
        return barostat.programs_of(self.plan.system)


def _contact_set(flags, n: int) -> set:
    c, i, j = (np.asarray(a) for a in flags)
    a, b = np.minimum(i[c], j[c]), np.maximum(i[c], j[c])
    return set((a * n + b).tolist())


def _project(theta: dict[str, Array], bounds: dict[str, tuple[float, float]]) -> dict[str, Array]:
    return {k: jnp.clip(v, *bounds[k]) if k in bounds else v for k, v in theta.items()}


def _reached(design: Design, values: dict[str, Any]) -> bool:
    """Every ``stop_at`` observable (or, without any, every target) within ``tol`` relative."""
    goals = design.stop_at or design.targets
    if design.tol is None or not goals:
        return False
    return all(abs(float(values[n]) - t) <= design.tol * (abs(t) if t != 0 else 1.0)
               for n, t in goals.items())


def run(design: Design | Plan, progress: Callable[[Step, int, str], None] | None = None) -> DesignResult:
    """Run the design loop (module docstring). ``progress(step, k, note)`` is
    called after every accepted step. Returns the whole trajectory; a
    relaxation that fails even at the smallest step ends the loop with
    ``converged=False`` and what was done so far."""
    import optax

    wall = time.perf_counter()
    plan = design if isinstance(design, Plan) else prepare(design)
    design = plan.design
    runner = _PressureRunner(plan) if plan.fixed else _BatchRunner(plan) if plan.members else _Runner(plan)
    theta = {name: jnp.asarray(plan.base[name]) for name in design.vary}
    factory = getattr(optax, design.optimizer)
    optimizer = optax.inject_hyperparams(factory)(learning_rate=design.lr)
    opt_state = optimizer.init(theta)

    @jax.jit
    def update(grads, state, theta_, lr_):
        state = state._replace(hyperparams={**state.hyperparams, "learning_rate": lr_})
        updates, state = optimizer.update(grads, state, theta_)
        return _project(optax.apply_updates(theta_, updates), plan.bounds), state

    rng = np.random.default_rng(design.job.seed)
    timings = {"relax_s": 0.0, "loss_s": 0.0, "fd_check_s": 0.0}

    def attempt(theta_: dict[str, Array], start: Step | None, lr: float) -> Step | None:
        relaxed = runner.relax(theta_, start)
        if relaxed is None:
            return None
        params, q, info, pairs, relax_s = relaxed
        timings["relax_s"] += relax_s
        if not bool(info.converged):
            return Step({}, {}, q, math.nan, {}, {}, np.zeros(0), set(), info, None, lr, relax_s, 0.0, pairs)
        t, compiled = time.perf_counter(), runner.compile_s
        loss, values, grad, solve_info, rattler, flags, each = runner.reduce(
            jax.block_until_ready(runner.evaluate(q, params, theta_, pairs)))
        loss_s = time.perf_counter() - t - (runner.compile_s - compiled)
        timings["loss_s"] += loss_s
        return Step({k: np.asarray(v) for k, v in theta_.items()}, {k: np.asarray(v) for k, v in params.items()},
                    q, float(loss), {k: np.asarray(v) for k, v in values.items()},
                    {k: np.asarray(v) for k, v in grad.items()}, np.asarray(rattler),
                    runner.contacts(flags), info, solve_info, lr, relax_s, loss_s, pairs,
                    None if each is None else {k: np.asarray(v) for k, v in each.items()})

    history: list[Step] = []
    checks: list[dict[str, float]] = []
    contact_changes = rejections = jumps = 0
    lr = design.lr
    first = attempt(theta, None, lr)
    if first is None or first.solve is None or not math.isfinite(first.loss):
        raise RuntimeError("the starting packing did not relax (max|F| = "
                           f"{float(first.info.max_force) if first else float('nan'):.2e} > ftol {design.job.ftol:g}); "
                           "nothing to design from")
    history.append(first)
    floor = JUMP_FLOOR * abs(first.loss) + 1e-14
    previous_best = 0
    stopped, converged = "steps", True
    if progress is not None:
        progress(first, 0, "")

    def check(k: int) -> None:
        t = time.perf_counter()
        checks.append(fd_check(runner, history[-1], rng, design.fd_h, k))
        timings["fd_check_s"] += time.perf_counter() - t

    for k in range(1, design.steps):
        if _reached(design, history[-1].values):
            stopped = "stop-at" if design.stop_at else "tol"
            break
        current = history[-1]
        if design.fd_every is not None and (k - 1) % design.fd_every == 0:
            check(k - 1)
        grads = {name: jnp.asarray(current.grad[name]) for name in design.vary}
        theta_now = {name: jnp.asarray(current.theta[name]) for name in design.vary}
        note, accepted = "", None
        lowest = design.lr * 0.5**design.max_retries
        for retry in range(design.max_retries + 1):
            trial, new_state = update(grads, opt_state, theta_now, jnp.asarray(lr, jnp.result_type(float)))
            step = attempt(trial, current, lr)
            # A non-finite loss (a diverged relaxation or solve) counts as a failed
            # relaxation, and so does an unjammed packing (every particle a rattler:
            # no moduli; ν came out as the affine Cauchy value 1/3 just before).
            failed = (step is None or step.solve is None or not math.isfinite(step.loss)
                      or runner.unjammed(step.rattler))
            rise = JUMP if design.max_rise is None else design.max_rise
            jumped = not failed and step.loss - current.loss > rise * abs(current.loss) + floor
            crossed = not failed and step.contacts != current.contacts
            # --max-rise: a rise across a contact change is rejected too (retried smaller).
            tolerated = crossed and design.max_rise is None
            # A jump across a contact change is the loss's discontinuity, not too
            # long a step: rejecting it would pin the design to the edge of the
            # branch it is on. Accept it and slow down; reject a jump within one
            # branch (or a failed relaxation) and retry with half the step.
            if not failed and (not jumped or tolerated or retry == design.max_retries or lr <= lowest):
                accepted, opt_state = step, new_state
                if jumped:
                    jumps += 1
                    note = "loss jumped across a contact change" if crossed else "jump accepted after retries"
                break
            rejections += 1
            lr = max(lr * 0.5, lowest) if not failed else lr * 0.5
        if accepted is None:
            stopped, converged = (f"no acceptable step {k} (a relaxation that failed or unjammed, a non-finite loss, "
                                  f"or a range over half the box) down to learning rate {lr:g}"), False
            break
        lr = max(lr * 0.5, lowest) if jumped else min(lr * RECOVER, design.lr)
        if accepted.contacts != current.contacts:
            contact_changes += 1
            note = (note + "; " if note else "") + "contacts changed"
        history.append(accepted)
        # Keep the states (q, pairs) of the last and the best step only: O(1) memory in K.
        best = int(np.nanargmin([s.loss for s in history]))
        for i in {previous_best, len(history) - 2} - {best, len(history) - 1}:
            history[i].q, history[i].pairs = None, None
        previous_best = best
        if progress is not None:
            progress(accepted, k, note)
    else:
        if _reached(design, history[-1].values):
            stopped = "stop-at" if design.stop_at else "tol"
    if design.fd_every is not None and converged and not (checks and int(checks[-1]["step"]) == len(history) - 1):
        check(len(history) - 1)
    timings["compile_s"] = runner.compile_s
    if plan.fixed or plan.members:
        runner.compiles["relax_programs"] = runner.programs()
    timings["total_s"] = time.perf_counter() - wall
    return DesignResult(plan, history, checks, contact_changes, rejections, jumps, dict(runner.compiles), converged,
                        stopped, timings, runner.relax_sys)


def fd_check(runner: _Runner, step: Step, rng: np.random.Generator, h: float, k: int) -> dict[str, float]:
    """The gradient along a random unit direction v against the central
    difference ``(ℒ(θ + hv) − ℒ(θ − hv)) / 2h``, each re-relaxed from x* (and
    Newton-polished to round-off for N ≤ :data:`POLISH_MAX_N`). Passes within
    :data:`FD_RTOL` relative: the moduli carry the CG tolerance (~1e-10), which
    the difference amplifies by 1/h."""
    names = runner.plan.design.vary
    v = {name: rng.normal(size=np.shape(step.theta[name])) for name in names}
    norm = math.sqrt(sum(float(np.sum(a**2)) for a in v.values()))
    v = {name: a / norm for name, a in v.items()}
    directional = sum(float(np.sum(step.grad[name] * v[name])) for name in names)
    losses = []
    for sign in (+1.0, -1.0):
        theta = {name: jnp.asarray(step.theta[name] + sign * h * v[name]) for name in names}
        relaxed = runner.relax(theta, step)
        if relaxed is None:
            return {"step": k, "h": h, "directional": directional, "finite_difference": math.nan,
                    "relative_error": math.inf, "passed": False}
        params, q, info, pairs, _ = relaxed
        q, params = runner.polish(q, params, jnp.asarray(step.rattler))
        losses.append(float(runner.reduce(runner.evaluate(q, params, theta, pairs))[0]))
    fd = (losses[0] - losses[1]) / (2 * h)
    error = abs(directional - fd) / max(abs(fd), abs(directional), 1e-300)
    return {"step": k, "h": h, "directional": directional, "finite_difference": fd,
            "relative_error": error, "passed": bool(error <= FD_RTOL)}
