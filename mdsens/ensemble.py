"""Ensembles over disorder: many packings relaxed and differentiated as one program.

An ensemble is ``seeds × sweep values`` of one system (``mdsens ensemble``).
Members that share a model — the same N, d, species and pair function, only
their positions and parameter values differ — form a *batch*: their states,
parameters and neighbor tables are stacked along a leading member axis and

* relaxed by one compiled loop (:func:`relax_batch`): every step moves every
  member still running (FIRE per member, with its own time step, mixing and
  convergence test); a member that converged (or stalled) stops changing
  while the others go on. A member's table is rebuilt when one of its
  particles has moved ``skin / 2``; the rebuild is taken for the whole batch
  (one ``lax.cond`` on "any member needs it") and kept for the members that
  need it. The table's capacity is one for the batch, sized from the member
  with the most neighbors, allocated outside the loop (a compiled loop has
  fixed shapes); an overflow redoes the chunk on a bigger table, as in
  :mod:`mdsens.relax`.
* differentiated by one compiled, vmapped function (:func:`derivatives`):
  rattlers, observables, forward-mode sensitivities and reverse-mode
  gradients per member, exactly the computation of ``mdsens run``
  (:func:`mdsens.job.execute`) on each member's own table pairs.

Members built with ``pressure=P`` (fixed pressure, :mod:`mdsens.barostat`) relax
their cells too: the same design, in :func:`mdsens.barostat.relax_batch` (the
enthalpy's batched loop) and :func:`mdsens.barostat.derivative_fn`; the file's
box is then each member's relaxed cell.

The member axis is sharded over the local devices (``jax.sharding`` with a
1-D mesh; members are padded to a multiple of the device count with copies
of the last one, dropped afterwards). Over several processes
(``jax.distributed``), each process takes a contiguous share of the members
and process 0 gathers the results (:func:`mdsens.ensemble.run`).

The force of a member is bitwise the same whatever the table's build point
and capacity (:func:`mdsens.relax.pair_force_fn`), but FIRE's global sums
(the power ``F·v``, the norms) are reduced by batched kernels whose order
may differ from a single run's: a member can end in a different (equally
valid) minimum from ``mdsens run`` with the same seed. ``mdsens bench
--ensemble`` counts how often.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import barostat, cache, driver, minimize, observables, relax, sensitivity, systems
from mdsens.job import Job, _solver, prepare, solving
from mdsens.system import Params, System
from mdsens.systems import UsageError

Array = jax.Array


# -- members --------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One packing of the ensemble: a seed and the swept build keys (key, text)."""

    seed: int
    sweep: tuple[tuple[str, str], ...] = ()

    def job(self, job: Job) -> Job:
        return replace(job, seed=self.seed, overrides={**job.overrides, **dict(self.sweep)})


def parse_seeds(text: str) -> range:
    """``A:B`` (seeds A … B−1), ``A`` (one seed) → a non-empty range."""
    parts = text.split(":")
    try:
        if len(parts) == 1:
            start = int(parts[0])
            return range(start, start + 1)
        if len(parts) == 2:
            start, stop = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected A:B (seeds A to B−1), e.g. --seeds 0:16") from None
    if stop <= start:
        raise UsageError(f"--seeds {text!r}: empty range (B must exceed A; seeds A:B are A … B−1)")
    if start < 0:
        raise UsageError(f"--seeds {text!r}: seeds are non-negative")
    return range(start, stop)


def parse_sweep(items: Sequence[str]) -> dict[str, list[str]]:
    """``KEY=V1,V2,...`` (repeatable) → {key: [texts]}; validated against the family later."""
    sweeps: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--sweep {item!r}: expected KEY=V1,V2,..., e.g. --sweep phi=0.86,0.88,0.90")
        key, values = item.split("=", 1)
        key = key.strip()
        texts = [v.strip() for v in values.split(",") if v.strip()]
        if not texts:
            raise UsageError(f"--sweep {item!r}: no values")
        if key in sweeps:
            raise UsageError(f"--sweep {key}: given twice")
        sweeps[key] = texts
    return sweeps


def members(job: Job, seeds: Sequence[int], sweeps: Mapping[str, Sequence[str]]) -> list[Member]:
    """Every (sweep combination, seed), sweep-major; each value checked against the family."""
    family = systems.get(job.system)
    keys = {k.name: k for k in family.keys}
    for key, texts in sweeps.items():
        if key not in keys:
            raise UsageError(f"--sweep {key}: system {family.name!r} has no key {key!r}; its keys: {', '.join(keys)}")
        if key in job.overrides:
            raise UsageError(f"--sweep {key} and --set {key}: give the key one way")
        for text in texts:
            keys[key].validate(keys[key].parse(text))
    combos = itertools.product(*[[(k, t) for t in texts] for k, texts in sweeps.items()]) if sweeps else [()]
    return [Member(seed, tuple(combo)) for combo in combos for seed in seeds]


# -- batches of one model ---------------------------------------------------------------------


def _same_model(a: System, b: System) -> bool:
    """Whether ``b`` differs from ``a`` only in positions and parameter values:
    one :class:`mdsens.system.Model` (same class, name, N, d, species, parameter
    names and shapes, and structurally the same pair energy, cutoff and contact
    rule)."""
    return a.model == b.model


def group(built: Sequence[System]) -> list[list[int]]:
    """Member indices grouped into batches of one model (first-seen order)."""
    groups: list[list[int]] = []
    for k, s in enumerate(built):
        for g in groups:
            if _same_model(built[g[0]], s):
                g.append(k)
                break
        else:
            groups.append([k])
    return groups


def stack(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


# -- batched relaxation -----------------------------------------------------------------------


class BatchRelaxed(NamedTuple):
    """Per member (leading axis M): real-space ``x`` (M, N, d), ``steps``,
    ``max_force``, ``energy``, ``converged``, ``stalled``, and the tables
    ``idx`` (M, N, K) at x*; plus the batch's compile time, reallocations,
    table rebuilds (steps on which some member rebuilt) and capacity K."""

    x: Array
    steps: np.ndarray
    max_force: np.ndarray
    energy: np.ndarray
    converged: np.ndarray
    stalled: np.ndarray
    idx: Array
    compile_s: float
    reallocations: int
    rebuilds: int
    capacity: int


def _box_of(model: System, params: Params) -> Array | None:
    return params["box"] if model.periodic else None


def _table(model: System, params: Params, skin: float) -> relax.Table:
    """One table for the batch: built for the largest member cutoff, with cells
    sized by the smallest box, so that every member's cells span cutoff + skin.
    Cached per model, skin and box: as :func:`mdsens.relax.relax`'s, a table
    serves cutoffs down to ``1 / CUTOFF_SLACK`` of its own, so a batch whose
    cutoff moved a little (a diameter sweep, a finite difference) reuses the
    table and with it the compiled chunk (:func:`_batch_program`)."""
    cutoffs = np.asarray(jax.vmap(model.cutoff)(params))
    cutoff = float(np.max(cutoffs))
    smallest = dict(model.params)
    if model.periodic:
        smallest["box"] = jnp.asarray(np.min(np.asarray(params["box"]), axis=0))
    box = tuple(np.asarray(smallest["box"]).tolist()) if model.periodic else None
    key = (model.model, float(skin), box)
    tables = _TABLES.get(key)
    if tables is None:
        tables = _TABLES[key] = []
        while len(_TABLES) > PROGRAM_LIMIT:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    for table in tables:
        if cutoff <= table.cutoff <= relax.CUTOFF_SLACK**2 * cutoff or (math.isinf(cutoff) and table.static):
            return table
    table = relax.Table(model, smallest, skin, cutoff * relax.CUTOFF_SLACK if math.isfinite(cutoff) else None)
    tables.append(table)
    return table


def _capacities(table: relax.Table, model: System, x: Array, params: Params, grow: float = 1.0) -> tuple[int, int]:
    """(K, C) for the batch: the largest member's neighbor count (×1.25) and
    cell capacity (:meth:`relax.Table.cell_capacity`)."""
    if table.static:
        return table.n - 1, 0
    cell_capacity = 0
    if table.grid is not None:
        cells = np.asarray(jax.vmap(lambda x_, p_: table._cell_of(x_, _box_of(model, p_)))(x, params))
        cell_capacity = table.cell_capacity(cells, grow)
    count = int(np.max(np.asarray(jax.vmap(lambda x_, p_: table.count(x_, cell_capacity, _box_of(model, p_)))(
        x, params))))
    capacity = int(math.ceil(count * 1.25 * grow)) + 1
    if table.grid is None:
        capacity = min(capacity, table.n)
    return capacity, cell_capacity


def _where(mask: Array, new: Any, old: Any) -> Any:
    """Per member: ``new`` where ``mask`` (M,), else ``old`` (pytrees of (M, …) arrays)."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b), new, old)


#: how many members' tables one rebuild pass builds together (see ``_program``)
REBUILD_GROUP = 4

#: batched relaxation programs kept in process, keyed by model, table and
#: options (least recently used dropped first)
PROGRAM_LIMIT = 16
_PROGRAMS: "OrderedDict[Any, _Batch]" = OrderedDict()
#: the batches' tables, per model, skin and box (:func:`_table`)
_TABLES: "OrderedDict[Any, list[relax.Table]]" = OrderedDict()


class _Batch(NamedTuple):
    """A cached batched relaxation: the minimizer, the jitted chunk, its
    executables per argument shapes, and the capacities ``[K, C]`` the batches
    of this model have needed so far (they only grow, as a
    :class:`mdsens.relax.Table`'s do: the next batch reuses the compiled
    chunk, and the derivatives, whose pairs have the table's shape, theirs)."""

    mini: minimize.Minimizer
    advance: Callable
    executables: dict
    sticky: list


def _table_key(table: relax.Table) -> tuple:
    """What a table's build and displacement test depend on (its capacities are arguments)."""
    box = None if table.box is None else tuple(np.asarray(table.box).tolist())
    return (table.n, table.dim, table.skin, table.cutoff, table.metric_reach, box)


def _program(model: System, table: relax.Table, method: str, ftol: float) -> tuple[minimize.Minimizer, Callable]:
    """The batched chunk ``(state, nbrs, params, until, stale) -> (state, nbrs,
    rebuilds, max|F|, stalled, E)``, jitted; cached per model (:attr:`System.model`),
    table (by what defines it, :func:`_table_key`), minimizer and tolerance."""
    batch = _batch_program(model, table, method, ftol)
    return batch.mini, batch.advance


def _batch_program(model: System, table: relax.Table, method: str, ftol: float) -> _Batch:
    key = (model.model, _table_key(table), method, float(ftol))
    found = _PROGRAMS.get(key)
    if found is not None:
        _PROGRAMS.move_to_end(key)
        return found
    model = model.model.template  # what the program closes over: the model, no member's numbers
    mini = relax._minimizer(model, table, method)

    def advance(state, nbrs, params, until, stale):
        capacity, cell_capacity = nbrs.idx.shape[-1], nbrs.cells.shape[-1]

        def build_all(x):
            return jax.vmap(lambda x_, p_: table.build(x_, capacity, cell_capacity, _box_of(model, p_)))(x, params)

        members = state.x.shape[0]
        group = min(members, REBUILD_GROUP)

        def rebuild(x, nb, need):
            """Rebuild the tables of the members that ``need`` it, ``group`` at a
            time (the members needing a rebuild are gathered, built, scattered
            back): a step on which one member of 64 needs a rebuild pays for a
            few builds, not 64."""

            def more(c):
                return jnp.any(c[1])

            def one_group(c):
                nb, pending = c
                pick = jnp.argsort(~pending, stable=True)[:group]
                take = pending[pick]
                fresh = jax.vmap(lambda x_, p_: table.build(x_, capacity, cell_capacity, _box_of(model, p_)))(
                    x[pick], jax.tree.map(lambda a: a[pick], params))
                old = jax.tree.map(lambda a: a[pick], nb)
                nb = jax.tree.map(lambda a, f: a.at[pick].set(f), nb, _where(take, fresh, old))
                return nb, pending.at[pick].set(False)

            return jax.lax.while_loop(more, one_group, (nb, need))[0]

        def forces(s, nb):
            return jax.vmap(lambda s_, p_, i_: mini.step_force(s_, (p_, i_)))(s, params, nb.idx)

        def running(s, nb):
            return jax.vmap(lambda s_: minimize.running(mini, s_, ftol, until))(s) & ~nb.overflow

        def fresh(s, nb):
            nb = build_all(s.x)
            return forces(s, nb), nb

        state, nbrs = jax.lax.cond(stale, fresh, lambda s, nb: (s, nb), state, nbrs)

        def body(c):
            s, nb, rebuilds = c
            active = running(s, nb)
            moved = jax.vmap(lambda s_, p_, i_: mini.step_x(s_, (p_, i_)))(s, params, nb.idx)
            need = active & jax.vmap(lambda x_, nb_, p_: table.moved(x_, nb_, _box_of(model, p_)))(
                moved.x, nb, params)
            nb = jax.lax.cond(jnp.any(need), lambda nb: rebuild(moved.x, nb, need), lambda nb: nb, nb)
            moved = forces(moved, nb)
            return _where(active, moved, s), nb, rebuilds + jnp.any(need).astype(jnp.int32)

        def cond(c):
            s, nb, _ = c
            return jnp.any(running(s, nb)) & ~jnp.any(nb.overflow)

        s, nb, rebuilds = jax.lax.while_loop(cond, body, (state, nbrs, jnp.zeros((), jnp.int32)))
        fmax = jax.vmap(minimize.max_force)(s.force)
        energy = jax.vmap(lambda x_, i_, p_: relax.table_energy(model, x_, i_, p_))(s.x, nb.idx, params)
        return s, nb, rebuilds, fmax, jax.vmap(mini.stalled)(s), energy

    _PROGRAMS[key] = _Batch(mini, jax.jit(advance), {}, [0, 0])
    while len(_PROGRAMS) > PROGRAM_LIMIT:
        _PROGRAMS.popitem(last=False)
    return _PROGRAMS[key]


def relax_batch(
    model: System, params: Params, x0: Array, method: str = "fire", ftol: float = 1e-10,
    max_steps: int = 100_000, chunk: int = 2_000, skin: float = relax.DEFAULT_SKIN,
    callback: Callable[[int, int, float, float], None] | None = None, sharding: Any = None,
) -> BatchRelaxed:
    """Relax M members of one model together: ``params`` are stacked (leading
    axis M), ``x0`` is (M, N, d) real space. ``callback(step, converged, worst
    max|F|, elapsed_s)`` between chunks. ``sharding``: a ``jax.sharding``
    for arrays with a leading member axis (None: one device)."""
    params = {k: jnp.asarray(v) for k, v in params.items()}
    x = jnp.asarray(x0)
    if model.periodic:
        x = jnp.mod(x, params["box"][:, None, :])
    table = _table(model, params, skin)
    batch = _batch_program(model, table, method, ftol)
    mini, advance = batch.mini, batch.advance
    place = (lambda a: a) if sharding is None else (lambda a: jax.device_put(a, sharding))
    params = jax.tree.map(place, params)
    state = jax.tree.map(place, jax.vmap(mini.blank)(x))
    capacity, cell_capacity = _capacities(table, model, state.x, params)
    if not table.static:  # at least what earlier batches of this model needed: their compiled chunk
        capacity = min(max(capacity, batch.sticky[0]), table.n) if table.grid is None else \
            max(capacity, batch.sticky[0])
        cell_capacity = max(cell_capacity, batch.sticky[1])

    def placeholder(x_, capacity, cell_capacity):
        tables = [table.placeholder(x_[m], capacity, cell_capacity) for m in range(x_.shape[0])]
        return jax.tree.map(place, stack(tables))

    nbrs = placeholder(state.x, capacity, cell_capacity)
    compiled = batch.executables

    def program(state, nbrs, until, stale):
        args = (state, nbrs, params, jnp.asarray(until, jnp.int32), jnp.asarray(stale))
        leaves, tree = jax.tree.flatten(args[:3])
        executable, seconds = driver.compiled(compiled, (tree, tuple(jax.typeof(a) for a in leaves), sharding),
                                              lambda: advance.lower(*args))

        def run(state, nbrs, until, stale):
            out_state, out_nbrs, k, fmax, stalled, energy = executable(
                state, nbrs, params, jnp.asarray(until, jnp.int32), jnp.asarray(stale))
            fmax, stalled = np.asarray(fmax), np.asarray(stalled)
            converged = fmax < ftol
            # each member stops at its own convergence; the batch when every member has
            return driver.Chunk(out_state, out_nbrs, int(np.asarray(out_state.step).max()),
                                bool(np.any(np.asarray(out_nbrs.overflow))), bool(np.all(converged | stalled)),
                                rebuilds=int(k), out=(fmax, converged, stalled, energy))

        return run, seconds

    def widen(state, nbrs, report, attempt):
        # sized at the chunk's end, where the table overflowed; at least one entry wider
        capacity, cell_capacity = _capacities(table, model, report.state.x, params, grow=1.5)
        capacity, cell_capacity = max(capacity, nbrs.idx.shape[-1] + 1), max(cell_capacity, nbrs.cells.shape[-1])
        return placeholder(state.x, capacity, cell_capacity)

    def report(chunk, elapsed):
        fmax, converged = chunk.out[:2]
        callback(chunk.step, int(np.sum(converged)), float(np.max(np.where(converged, 0.0, fmax))), elapsed)

    done = driver.drive(state, nbrs, program, widen, chunk=chunk, max_steps=max_steps,
                        callback=None if callback is None else report)
    state, nbrs, (fmax_np, converged, stalled, energy) = done.state, done.table, done.last.out
    batch.sticky[:] = [max(batch.sticky[0], int(nbrs.idx.shape[-1])), max(batch.sticky[1], int(nbrs.cells.shape[-1]))]
    return BatchRelaxed(state.x, np.asarray(state.step), fmax_np, np.asarray(energy), converged, stalled, nbrs.idx,
                        done.compile_s, done.reallocations, done.rebuilds, int(nbrs.idx.shape[-1]))


# -- batched derivatives ------------------------------------------------------------------------


def table_pairs(idx: Array, n: int) -> Array:
    """(2, N·K) pairs ``i < j`` of a table, padded with N (jittable, fixed size:
    the format of :meth:`System.with_pairs`)."""
    rows = jnp.broadcast_to(jnp.arange(n, dtype=idx.dtype)[:, None], idx.shape)
    keep = (idx < n) & (rows < idx)
    return jnp.stack([jnp.where(keep, rows, n).ravel(), jnp.where(keep, idx, n).ravel()])


def derivative_fn(job: Job, model: System, observe: Mapping[str, Callable],
                  wrts: Sequence[tuple[str, str, tuple[int, ...] | None]], grads: Sequence[str]) -> Callable:
    """``(q, θ, pairs) -> (rattler, observables, {wrt: Forward}, {obs: (gradient, SolveInfo)})``
    for one member: what :func:`mdsens.job.execute` computes, on the member's table pairs."""

    def one(q: Array, params: Params, pairs: Array):
        s = model.with_pairs(pairs)
        rattler = observables.rattlers(s, q, params)
        values = {name: fn(s, q, params) for name, fn in observe.items()}
        forwards, gradients = {}, {}
        if wrts or grads:
            solve = _solver(job, s, q, params, rattler)
            forwards, gradients = sensitivity.derivatives_fn(s, observe, wrts, grads, rattler, solve)(q, params)
        return rattler, values, forwards, gradients

    return one


# -- the whole ensemble ----------------------------------------------------------------------------


@dataclass
class EnsembleJob:
    """``mdsens ensemble``: a :class:`~mdsens.job.Job` (everything but the seed)
    over ``seeds`` × ``sweeps``; ``devices``: how many local devices to shard
    over (None: all)."""

    job: Job
    seeds: Sequence[int] = range(0, 4)
    sweeps: Mapping[str, Sequence[str]] = field(default_factory=dict)
    devices: int | None = None


@dataclass
class EnsembleResult:
    """Per-member arrays in member order (leading axis M), as the file stores them."""

    job: EnsembleJob
    members: list[Member]
    n: int
    dim: int
    periodic: bool
    seed: np.ndarray
    sweep: dict[str, np.ndarray]
    configurations: list[dict[str, Any]]
    converged: np.ndarray
    steps: np.ndarray
    max_force: np.ndarray
    position: np.ndarray
    box: np.ndarray | None
    diameter: np.ndarray
    species: np.ndarray
    rattler: np.ndarray
    parameters: dict[str, np.ndarray]
    observables: dict[str, np.ndarray]
    sensitivity: dict[str, dict[str, np.ndarray]]
    gradient: dict[str, dict[str, np.ndarray]]
    timings: dict[str, float]
    meta: dict[str, Any]

    @property
    def m(self) -> int:
        return len(self.members)

    def summary(self) -> dict[str, Any]:
        """JSON digest: counts, timings, and per sweep value the mean ± standard error."""
        return {"system": self.job.job.system, "members": self.m, "n": self.n, "dim": self.dim,
                "converged": int(np.sum(self.converged)), "steps_max": int(np.max(self.steps)),
                "worst_max_force": float(np.max(self.max_force)), "peak_rss_mb": round(_peak_rss() / 1e6, 1),
                "timings": dict(self.timings), "devices": self.meta.get("devices")}


def _peak_rss() -> float:
    from mdsens import memory

    return memory.peak_rss()


def _devices(count: int | None) -> list:
    local = jax.local_devices()
    if count is None:
        return local
    if not 1 <= count <= len(local):
        raise UsageError(f"--devices {count}: this process sees {len(local)} local device(s)")
    return local[:count]


def _sharding(devices: list) -> Any:
    if len(devices) == 1:
        return None
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    return NamedSharding(Mesh(np.asarray(devices), ("member",)), PartitionSpec("member"))


def _diameters(system: System, params: Mapping[str, Any]) -> np.ndarray:
    """Each particle's diameter for the record (soft spheres), else the pair length scale."""
    from mdsens.io import particle_diameters

    return particle_diameters({"parameters": {k: np.asarray(v) for k, v in params.items()},
                               "species": np.asarray(system.species), "positions": system.positions})


def run(ej: EnsembleJob, progress: Callable[[int, int, float, float], None] | None = None,
        share: tuple[int, int] = (0, 1), timeout: float = 300.0, exchange: str | None = None) -> EnsembleResult:
    """Relax and differentiate every member.

    ``share = (p, P)`` (several processes, see ``mdsens ensemble --coordinator``):
    this process computes the p-th of P contiguous shares of the members.
    Process p > 0 hands its share to process 0 as the file
    ``{exchange}.part{p}`` (written atomically beside the output, so the
    processes need a shared directory, as on a cluster); process 0 waits for
    them (up to ``timeout`` seconds), merges and deletes them, and returns the
    whole ensemble. The other processes return their own share only."""
    wall = time.perf_counter()
    job = ej.job
    everyone = members(job, ej.seeds, ej.sweeps)
    devices = _devices(ej.devices)
    sharding = _sharding(devices)
    first_job = everyone[0].job(job)
    # Validates every option (observables, --wrt, --grad, solver) on the first member.
    prepare(first_job)
    built = [systems.get(job.system).build_fn(seed=mb.seed, **systems.get(job.system).resolve(mb.job(job).overrides))
             for mb in everyone]
    if len({(s.n, s.dim) for s in built}) > 1:
        raise UsageError("--sweep over a key that changes N or d: the members would not fit one file's arrays; "
                         "run one ensemble per size")
    if len({getattr(s, "box_dof", None) for s in built}) > 1:
        raise UsageError("--sweep box_dof: members with different box degrees of freedom store different boxes "
                         "(sides or a cell); run one ensemble per box_dof")
    batches = group(built)
    p, count = share
    mine = set(np.array_split(np.arange(len(everyone)), count)[p].tolist())
    timings = {"compile_s": 0.0, "relax_s": 0.0, "derivative_s": 0.0}
    per_member: dict[int, dict[str, Any]] = {}
    stats = {"reallocations": 0, "rebuilds": 0, "capacity": [], "batches": 0}
    for batch in batches:
        batch = [k for k in batch if k in mine]
        if not batch:
            continue
        stats["batches"] += 1
        model = built[batch[0]]
        member_job = everyone[batch[0]].job(job)
        _, observe, wrts = prepare(member_job)
        pad = (-len(batch)) % len(devices)
        padded = batch + [batch[-1]] * pad
        params = stack([built[k].params for k in padded])
        x0 = jnp.stack([jnp.asarray(built[k].positions) for k in padded])
        t0 = time.perf_counter()
        if barostat.is_fixed_pressure(model):
            # The box relaxes too: the enthalpy's own batched loop and derivatives.
            out = barostat.relax_batch(model, params, x0, job.minimizer, job.ftol, job.max_steps, job.chunk,
                                       job.skin, progress, sharding)
            q, params = out.q, out.params
            observe = barostat.default_observables(member_job, model, observe)
            derivatives = barostat.derivative_fn
            positions = jax.vmap(model.to_real)(q, params)
            # the relaxed cell: sides (iso, aniso) or the (d, d) edge vectors (shear), as in a run file
            boxes = np.stack([barostat.record_box(model, jax.tree.map(lambda a, r=r: a[r], params))
                              for r in range(len(padded))])
        else:
            out = relax_batch(model, params, x0, job.minimizer, job.ftol, job.max_steps, job.chunk, job.skin,
                              progress, sharding)
            q = out.x / params["box"][:, None, :] if model.periodic else out.x
            derivatives = derivative_fn
            positions = out.x
            boxes = np.asarray(params["box"]) if model.periodic else None
        timings["compile_s"] += out.compile_s
        timings["relax_s"] += time.perf_counter() - t0 - out.compile_s
        stats["reallocations"] += out.reallocations
        stats["rebuilds"] += out.rebuilds
        stats["capacity"].append(out.capacity)
        place = (lambda a: a) if sharding is None else (lambda a: jax.device_put(a, sharding))
        pairs = jax.vmap(lambda i_: table_pairs(i_, model.n))(out.idx)
        # Derivatives are computed for every member (one program) and kept for
        # the converged ones only (NaN for the others, so every file has the
        # same datasets).
        # Compiled once per model, options and shapes (mdsens.cache.program): a
        # second ensemble of the same model (new seeds, new θ) compiles nothing here.
        options = (member_job.solver, member_job.rtol, member_job.preconditioner)
        with solving(member_job):
            compiled, c = cache.program(
                ("ensemble.derivatives", derivatives, model.model, tuple(observe.items()), tuple(wrts),
                 tuple(member_job.grad), options, sharding),
                lambda d=derivatives, o=observe, j=member_job, w=wrts, m=model.model:
                    jax.vmap(d(j, m.template, o, w, j.grad)),
                place(q), params, place(pairs))
        t1 = time.perf_counter()
        rattler, values, forwards, gradients = jax.block_until_ready(compiled(place(q), params, place(pairs)))
        timings["compile_s"] += c
        timings["derivative_s"] += time.perf_counter() - t1
        for row, k in enumerate(batch):
            ok = bool(out.converged[row])
            nan = lambda a: np.full(np.shape(a), np.nan)  # noqa: E731
            per_member[k] = {
                "x": np.asarray(positions[row]), "box": None if boxes is None else np.asarray(boxes[row]),
                "steps": int(out.steps[row]), "max_force": float(out.max_force[row]),
                "converged": ok, "rattler": np.asarray(rattler[row]),
                "params": {name: np.asarray(v[row]) for name, v in params.items()},
                "observables": {name: np.asarray(v[row]) for name, v in values.items()},
                "sensitivity": {text: {**{name: (np.asarray(v[row]) if ok else nan(v[row]))
                                          for name, v in fw.values.items()},
                                       "iterations": np.asarray(fw.iterations[row]),
                                       "residual": np.asarray(fw.residual[row])}
                                for text, fw in forwards.items()},
                "gradient": {name: {**{pname: (np.asarray(v[row]) if ok else nan(v[row])) for pname, v in g[0].items()},
                                    "iterations": np.asarray(g[1].iterations[row]),
                                    "residual": np.asarray(g[1].residual[row])}
                             for name, g in gradients.items()},
            }
    if share[1] > 1:
        per_member = _exchange(per_member, share, timeout, exchange)
        if share[0] != 0:
            return None  # type: ignore[return-value]
    timings["total_s"] = time.perf_counter() - wall
    return _assemble(ej, everyone, built, per_member, timings, stats, devices)


def _exchange(per_member: dict[int, dict], share: tuple[int, int], timeout: float,
              exchange: str | None) -> dict[int, dict]:
    """Hand the shares of processes 1 … P−1 to process 0 through files (see :func:`run`)."""
    import os
    import pickle

    if exchange is None:
        raise ValueError("several processes need an exchange path (the output file)")
    p, count = share
    if p != 0:
        tmp = f"{exchange}.part{p}.tmp"
        with open(tmp, "wb") as fh:
            pickle.dump(per_member, fh)
        os.replace(tmp, f"{exchange}.part{p}")
        return per_member
    merged = dict(per_member)
    deadline = time.monotonic() + timeout
    for other in range(1, count):
        path = f"{exchange}.part{other}"
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f"process {other} did not deliver its share of the members within "
                                   f"{timeout:g} s (expected {path})")
            time.sleep(0.2)
        with open(path, "rb") as fh:
            merged.update(pickle.load(fh))
        os.remove(path)
    return merged


def _assemble(ej: EnsembleJob, everyone: list[Member], built: list[System], per_member: dict[int, dict],
              timings: dict[str, float], stats: dict[str, Any], devices: list) -> EnsembleResult:
    """Stack the members' records in member order (members of other processes: NaN)."""
    from mdsens.job import versions

    ref = built[0]
    template = next(iter(per_member.values()))
    m = len(everyone)

    def collect(get: Callable[[dict], Any], like: Any, fill: Any) -> np.ndarray:
        rows = []
        for k in range(m):
            rows.append(np.asarray(get(per_member[k])) if k in per_member
                        else np.full(np.shape(like), fill, dtype=np.asarray(like).dtype))
        return np.stack(rows)

    def nested(section: str) -> dict[str, dict[str, np.ndarray]]:
        return {key: {name: collect(lambda r, key=key, name=name: r[section][key][name], v, np.nan)
                      for name, v in entry.items()}
                for key, entry in template[section].items()}

    sweep = {key: np.asarray([built[k].config.get(key, np.nan) if not isinstance(built[k].config.get(key), (list, tuple))
                              else np.nan for k in range(m)], dtype=float)
             for key in (ej.sweeps or {})}
    for key in sweep:
        # Keys whose value is a list (e.g. diameter=1.0,1.4) are stored as the member's text.
        if np.any(np.isnan(sweep[key])):
            sweep[key] = np.asarray([dict(mb.sweep)[key] for mb in everyone], dtype=object)
    meta = {"system": ref.name, "configuration": {**ref.config}, "command": ej.job.command,
            "minimizer": ej.job.minimizer, "ftol": ej.job.ftol, "max_steps": ej.job.max_steps,
            "linear_solver": ej.job.solver, "rtol": ej.job.rtol, "preconditioner": ej.job.preconditioner,
            "seeds": [int(s) for s in ej.seeds], "sweep": {k: list(v) for k, v in (ej.sweeps or {}).items()},
            "batches": stats["batches"], "table_capacity": stats["capacity"], "rebuilds": stats["rebuilds"],
            "reallocations": stats["reallocations"], "devices": [str(d) for d in devices],
            "versions": versions(), "device": f"{devices[0].platform}:{getattr(devices[0], 'device_kind', '')}",
            "precision": str(jnp.result_type(float)), "timings": timings}
    if barostat.is_fixed_pressure(ref):  # which ensemble, as a run file records it (fixed-box files unchanged)
        meta.update(ensemble=barostat.ensemble(ref), box_dof=ref.box_dof)
    return EnsembleResult(
        job=ej, members=everyone, n=ref.n, dim=ref.dim, periodic=ref.periodic,
        seed=np.asarray([mb.seed for mb in everyone]), sweep=sweep,
        configurations=[dict(built[k].config) for k in range(m)],
        converged=collect(lambda r: r["converged"], False, False),
        steps=collect(lambda r: r["steps"], 0, -1),
        max_force=collect(lambda r: r["max_force"], 0.0, np.nan),
        position=collect(lambda r: r["x"], template["x"], np.nan),
        box=collect(lambda r: r["box"], template["box"], np.nan) if ref.periodic else None,
        diameter=np.stack([_diameters(built[k], built[k].params) for k in range(m)]),
        species=np.stack([np.asarray(built[k].species) for k in range(m)]),
        rattler=collect(lambda r: r["rattler"], template["rattler"], False),
        parameters={name: collect(lambda r, name=name: r["params"][name], v, np.nan)
                    for name, v in template["params"].items()},
        observables={**{name: collect(lambda r, name=name: r["observables"][name], v, np.nan)
                        for name, v in template["observables"].items()},
                     "max_force": collect(lambda r: r["max_force"], 0.0, np.nan)},
        sensitivity=nested("sensitivity"),
        gradient=nested("gradient"),
        timings=timings, meta=meta)
