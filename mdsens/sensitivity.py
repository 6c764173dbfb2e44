"""Relax a system and differentiate its equilibrium: the user-facing engine.

``equilibrium(system)`` is the central object: a function ``q*(q0, θ)`` made
differentiable by :func:`mdsens.implicit.custom_root`, through which any JAX
transformation goes. ``forward`` and ``gradient`` are its two workhorses for
the CLI (they call :func:`mdsens.implicit.tangent` / ``cotangent`` directly so
that each linear solve's iterations and residual can be reported), and
``finite_difference`` is the independent check.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import gauge as _gauge
from mdsens import cache, implicit, linsolve, minimize, observables
from mdsens.system import Params, System, pad_pairs

Array = jax.Array
Observable = Callable[[System, Array, Params], Array]


def minimizer_for(system: System, method: str = "fire") -> minimize.Minimizer:
    """The minimizer ``method`` ("fire" or "gd") on the system's real-space energy."""
    shift = minimize.periodic_shift if system.periodic else minimize.free_shift
    return minimize.make(method, shift, system.energy_real)


def relax(
    system: System,
    params: Params | None = None,
    q0: Array | None = None,
    method: str = "fire",
    ftol: float = 1e-10,
    max_steps: int = 100_000,
    chunk: int | None = None,
    callback: Callable[[int, float, float], None] | None = None,
) -> tuple[Array, minimize.RelaxInfo]:
    """Minimize the energy from ``q0`` (default: the system's initial positions)
    with the relaxation driver (:func:`mdsens.relax.relax`: a neighbor table,
    compiled once per system).

    Returns ``q*`` in solver coordinates and :class:`mdsens.minimize.RelaxInfo`.
    Runs in compiled chunks of ``chunk`` steps (default 2000) and calls
    ``callback(step, max_force, elapsed_s)`` between them.
    """
    from mdsens import relax as _relax

    params = dict(system.params if params is None else params)
    x0 = jnp.asarray(system.positions) if q0 is None else system.to_real(q0, params)
    out = _relax.relax(system, params, x0, method, ftol, max_steps, chunk or 2_000, callback)
    return system.to_solver(out.x, params), out.info


def optimality(system: System) -> Callable[[Array, Params], Array]:
    """The root function ``F(q, θ) = ∇_q E(q, θ)``."""
    return jax.grad(system.energy)


def gauge_for(system: System, rattler: Array | None = None) -> implicit.Gauge:
    """The system's gauge: translations (periodic) or rigid-body modes (free
    space), plus rattlers. With ``rattler`` given, it is used as is; otherwise
    rattlers are detected from contacts at the point the gauge is built at."""

    def build(q: Array, params: Params) -> implicit.Projector:
        mask = observables.rattlers(system, q, params) if rattler is None else rattler
        if system.periodic:
            return _gauge.translations(mask)
        return _gauge.rigid_body(system.to_real(q, params), mask)

    return build


SOLVERS = ("auto", "cg", "dense", "sparse")


#: the fewest particles for which "auto" factors the Hessian (below, CG is cheaper:
#: N = 128, 10 against 32 ms for two forward derivatives; N = 1024, 53 against 41 ms;
#: N = 4096, 341 against 172 ms; ``mdsens run bidisperse --set n=N --solver S``,
#: 2-core CPU, 2026-11-28)
SPARSE_MIN_N = 1024
#: from this many solves (forward tangents plus reverse gradients: a per-particle
#: parameter has N tangents) "auto" factors the Hessian once at any N, in 3D up to
#: SPARSE_MAX_N_3D particles, where a factorization costs ~7 CG solves (N = 8192: 2.0 s
#: against 0.3 s a tangent; the fill grows fast beyond). Polydisperse ``--wrt diameter``,
#: all N tangents, sparse against CG: 2D N = 256 0.038 against 0.35 s; 3D N = 512 0.30
#: against 5.8 s, N = 2048 8.7 against 132 s (session 13, 2-core CPU).
SPARSE_MIN_SOLVES = 8
SPARSE_MAX_N_3D = 8192
#: in 3D "auto" factors for any number of solves from SPARSE_3D[0] to SPARSE_3D[1]
#: particles: a run's two diameters, `mdsens run bidisperse --set dim=3 --set n=N
#: --solver S`, fresh processes, two each (session 14, 2-core CPU): N = 256 9.3–10.4
#: against 10.7–11.1 ms with CG; 512 17–19 against 22–24 ms; 1024 39 against 54–57 ms;
#: with the nested dissection (:data:`mdsens.sparse.NESTED_DISSECTION_MIN_N`) 2048 100
#: against 116–134 ms and 4096 274–307 against 287–325 ms (memory 650 against 410 MB);
#: at 8192 CG is faster (0.59 against 0.87–0.95 s). Session 18 (the two-level
#: preconditioner's coarse inverse by Cholesky, at most 216 cells in 3D): 2048 sparse
#: 0.09 against CG 0.09 s, 4096 0.27 and 0.27 against 0.22 and 0.23 s (two runs each), so
#: CG from 4096 on. Session 20, with the factorization ordered and analysed beside the
#: relaxation (:class:`mdsens.sparse.Ahead`; METIS's ordering alone is ~0.14 s at 4096):
#: 4096 sparse 0.204 and 0.205 s against CG 0.30 and 0.36 s (the previous code's sparse
#: 0.27 s), 8192 sparse 1.52 against CG 0.62 s (one run each); so sparse up to 4096
SPARSE_3D = (512, 4096)
#: "auto" factors only where the pair graph is sparse: at most this many pairs per particle
#: within the cutoff (:func:`neighbors_per_particle`; 2D, 3D). Soft spheres at φ = 0.9 have
#: ~5 (2D) and ~11 (3D), where the figures above were measured; a Lennard-Jones crystal
#: (cutoff 2.5σ) ~18 and ~65, where the factor fills and CG is faster (2D N = 1152: 12.7
#: against 17.6 ms; 3D N = 2048: 0.11 against 0.39 s, session 14); a free Morse cluster
#: interacts through all pairs (2D N = 1100: CG 0.57 against 1.84 s).
SPARSE_MAX_NEIGHBORS = {2: 12.0, 3: 24.0}


def neighbors_per_particle(system: System) -> float:
    """The expected number of other particles within the cutoff of one, at the periodic
    box's mean density (N/V times the volume of a ball of radius cutoff), at most N − 1;
    N − 1 in free space or without a finite cutoff (every pair may interact). 0 where θ
    is traced (a solver resolved inside a compiled design step: callers that can resolve
    first, such as ``job.prepare``, do)."""
    n = system.n
    if not system.periodic:
        return float(n - 1)
    try:
        cutoff = float(system.cutoff(system.params))
        volume = float(system.volume(system.params))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return 0.0
    if not np.isfinite(cutoff):
        return float(n - 1)
    d = system.dim
    ball = np.pi ** (d / 2) / math.gamma(d / 2 + 1) * cutoff**d
    return float(min(n - 1, n / volume * ball))


def resolve_solver(method: str, system: System, solves: int = 2) -> str:
    """The linear solver that ``method`` names for ``system``: itself, or for
    "auto" the one that pays where the run computes — "sparse" (the Hessian
    factored once, :mod:`mdsens.sparse`) for a fixed box on the CPU in 2D from
    :data:`SPARSE_MIN_N` particles, or wherever the run asks for
    :data:`SPARSE_MIN_SOLVES` or more ``solves`` (tangents and gradients; in 3D up
    to :data:`SPARSE_MAX_N_3D` particles), since one factorization serves them
    all, and in 3D for :data:`SPARSE_3D` particles whatever the solves — each only
    where the pair graph is sparse (:data:`SPARSE_MAX_NEIGHBORS`);
    "cg" otherwise: fewer particles and solves, a dense pair graph (a Lennard-Jones
    crystal, a free cluster), larger 3D (where the factor's fill
    costs more than CG's few solves: N = 8192, 0.9 against 0.6 s for two), an
    accelerator (where CG stays on the device), fixed pressure (no sparse solve
    there). With both measured side by side (README, "Derivatives against the
    relaxation"), the sparse solve takes a third to a quarter of CG's time from
    N = 4096 on in 2D."""
    if method != "auto":
        return method
    from mdsens import barostat

    if jax.default_backend() != "cpu" or barostat.is_fixed_pressure(system):
        return "cg"
    if neighbors_per_particle(system) > SPARSE_MAX_NEIGHBORS.get(system.dim, 0.0):
        return "cg"  # a dense pair graph (long cutoff, all pairs): the factor fills in
    if system.dim == 2 and system.n >= SPARSE_MIN_N:
        return "sparse"
    if system.dim == 3 and SPARSE_3D[0] <= system.n <= SPARSE_3D[1]:
        return "sparse"
    if solves >= SPARSE_MIN_SOLVES and (system.dim == 2 or system.n <= SPARSE_MAX_N_3D):
        return "sparse"
    return "cg"


def check_solver(method: str, preconditioner: str) -> None:
    """The one check of the linear-solver options (``--solver``,
    ``--preconditioner``; :func:`solver_for`, :func:`mdsens.job.prepare`): a
    :class:`~mdsens.systems.UsageError` naming the choices."""
    from mdsens import precondition
    from mdsens.systems import UsageError

    if preconditioner not in precondition.PRECONDITIONERS:
        raise UsageError(f"unknown preconditioner {preconditioner!r}: choose "
                         f"{' or '.join(map(repr, precondition.PRECONDITIONERS))}")
    if method not in SOLVERS:
        raise UsageError(f"unknown linear solver {method!r}: choose {' or '.join(map(repr, SOLVERS))}")


def solver_for(
    system: System, q: Array, params: Params, rattler: Array | None = None, method: str = "cg",
    rtol: float = 1e-10, preconditioner: str = "twolevel",
) -> implicit.Solve:
    """The linear solve of the implicit derivatives at the relaxed state ``(q, θ)``:
    ``method`` "cg" (preconditioned by ``preconditioner``: "twolevel" —
    block-Jacobi plus a coarse correction, fewest iterations — "jacobi" or
    "none", assembled here from the pair Hessian blocks), "dense" (exact,
    small N) or "sparse" (exact: the Hessian assembled from the pair blocks and
    factored on the host, :mod:`mdsens.sparse`). ``rattler`` (N,) bool: detected
    from the contacts at ``q`` when None. The sparse solve and the preconditioners are
    built on the held network (:meth:`System.held_only`: no pair with a rattler end), the
    operator :func:`forward_fn` and :func:`gradient_fn` differentiate; a caller with its own
    product should take ``system.held_only(rattler).hessian_vp``.
    The one place that turns solver options into a solve: ``mdsens run``,
    ``ensemble``, ``design``, :func:`equilibrium` and the elastic moduli
    (:func:`solving`) all come here."""
    from mdsens import linsolve, precondition

    check_solver(method, preconditioner)
    method = resolve_solver(method, system)
    if method == "dense":
        return linsolve.dense()
    if method == "sparse" or preconditioner != "none":  # built here, on the held network's Hessian
        q = jax.lax.stop_gradient(q)
        if rattler is None:
            rattler = observables.rattlers(system, q, jax.lax.stop_gradient(params))
        system = system.held_only(rattler)
    if method == "sparse":
        from mdsens import sparse

        return sparse.solver(system, q, params, rattler, gauge_for(system, rattler)(q, params))
    precond = None
    if preconditioner != "none":
        project = gauge_for(system, rattler)(q, params)
        if preconditioner == "jacobi":
            precond = precondition.block_jacobi(system, q, params, project)
        else:
            precond = precondition.two_level(system, q, params, rattler, project)
    return linsolve.cg(rtol=rtol, preconditioner=precond)


@contextlib.contextmanager
def solving(method: str = "cg", rtol: float = 1e-10, preconditioner: str = "twolevel"):
    """Inside this context (while tracing), the solves *inside* observables —
    the elastic moduli's non-affine relaxation — use :func:`solver_for` with
    these options instead of unpreconditioned CG at rtol 1e-10."""
    from mdsens import elasticity

    token = elasticity.SOLVE_AT.set(
        lambda system, q, params, rattler: solver_for(system, q, params, rattler, method, rtol, preconditioner))
    try:
        yield
    finally:
        elasticity.SOLVE_AT.reset(token)


def equilibrium(
    system: System,
    method: str = "fire",
    ftol: float = 1e-10,
    max_steps: int = 100_000,
    solve: implicit.Solve | None = None,
    preconditioner: str | None = "twolevel",
    rtol: float = 1e-10,
) -> Callable[[Array, Params], Array]:
    """``q*(q0, θ)``: relax from ``q0`` at parameters ``θ``, differentiable in θ.

    Starting from an already relaxed ``q0`` costs one force evaluation, so
    ``equilibrium(system)(q_star, params)`` is the cheap way to put a relaxed
    state into a differentiable computation.

    The derivative's linear solve: ``solve`` as given, else CG at ``rtol``
    preconditioned by ``preconditioner`` assembled at the root
    (:func:`solver_for`; None: unpreconditioned).

    No silent failure: when the relaxation does not reach ``ftol`` within
    ``max_steps`` the result is NaN, and a derivative whose linear solve did
    not converge is NaN (:func:`mdsens.implicit.custom_root`); test
    ``jnp.isfinite`` before following a gradient.

    A system with a pair list (:meth:`System.with_pairs`, e.g. the neighbor
    table's pairs at a relaxed state) relaxes and differentiates on those
    pairs only — cheap — and the result is valid only where the list holds
    every pair closer than the cutoff at q*: a contact that forms during the
    relaxation among unlisted particles would be missed. So the result is
    NaN unless the list covers q* (:func:`missing_pairs`, checked at q*, O(N²)
    time in row blocks, once per call): rebuild the list there
    (:meth:`System.interacting_pairs` with a margin, or
    :func:`mdsens.relax.pairs_from_table`) and call again.
    """
    mini = minimizer_for(system, method)
    solve_at = None
    if solve is None:
        def solve_at(q: Array, params: Params) -> implicit.Solve:
            return solver_for(system, q, params, None, "cg", rtol, preconditioner or "none")

    def held(q: Array, params: Params) -> System:  # the held network at the root (System.held_only)
        return system.held_only(observables.rattlers(system, jax.lax.stop_gradient(q),
                                                     jax.lax.stop_gradient(params)))

    @implicit.custom_root(lambda q, params: optimality(held(q, params))(q, params), solve=solve,
                          gauge=gauge_for(system), hvp=lambda q, params: held(q, params).hessian_vp(q, params),
                          solve_at=solve_at)
    def solver(q0: Array, params: Params) -> Array:
        x0 = system.to_real(q0, params)
        x, info = minimize.run(mini, system.energy_real, x0, params, ftol, max_steps)
        q = system.to_solver(x, params)
        ok = info.converged
        if system.pairs is not None:  # a frozen pair list: valid only if it holds every contact at q*
            ok = ok & (missing_pairs(system, q, params) == 0)
        return jnp.where(ok, q, jnp.nan)

    return solver


def missing_pairs(system: System, q: Array, params: Params, block: int = 1024) -> Array:
    """How many interacting pairs at ``q`` — closer than ``cutoff(θ)``, or than
    the sum of their radii where the system gives radii (:attr:`System.radius`,
    as the relaxation's tables list them) — are not among the system's pair
    list (:meth:`System.with_pairs`; 0 without one): jittable, all pairs
    compared in row blocks (O(N²) time, O(N · block) memory). Zero means the
    listed energy equals the full one near ``q``, with all its derivatives
    there."""
    if system.pairs is None:
        return jnp.zeros((), jnp.int32)
    n = system.n
    cutoff = jnp.asarray(system.cutoff(params))
    radius = None if system.radius is None else jnp.asarray(system.radius(params))

    def reach2(a: Array, b: Array) -> Array:  # the squared range of the pairs (a, b)
        if radius is None:
            return cutoff**2
        return jnp.minimum(radius[a] + radius[b], cutoff) ** 2

    cols = jnp.arange(n)
    width = min(block, n)

    def rows_within(start: Array) -> Array:
        rows = start + jnp.arange(width)
        real = rows < n
        rows = jnp.where(real, rows, 0)
        dr = system.separation(q[rows][:, None, :] - q[None, :, :], params)
        near = (jnp.sum(dr**2, axis=-1) < reach2(rows[:, None], cols[None, :])) & (cols[None, :] > rows[:, None]) \
            & real[:, None]
        return jnp.sum(near, dtype=jnp.int32)

    starts = jnp.arange(0, n, width)
    total = jnp.sum(jax.lax.map(rows_within, starts))
    dr, i, j, valid = system.pair_list(q, params)
    listed = jnp.sum(valid & (i != j) & (jnp.sum(dr**2, axis=-1) < reach2(i, j)), dtype=jnp.int32)
    return total - listed


def unit_tangents(params: Params, name: str, index: tuple[int, ...] | None = None) -> tuple[Params, tuple[int, ...]]:
    """A batch of parameter tangents: one per element of ``params[name]``, or
    only element ``index``. Returns a pytree like ``params`` with a leading
    batch axis, and the shape the batch reshapes to (``param.shape``, or ``()``)."""
    if name not in params:
        raise KeyError(f"no parameter {name!r}; parameters: {', '.join(params)}")
    leaf = jnp.asarray(params[name])
    k = leaf.size
    basis = jnp.eye(k, dtype=leaf.dtype).reshape((k,) + leaf.shape)
    shape = leaf.shape
    if index is not None:
        flat = int(np.ravel_multi_index(index, leaf.shape)) if leaf.shape else 0
        basis, shape, k = basis[flat:flat + 1], (), 1
    batch = {key: jnp.zeros((k,) + jnp.shape(v), jnp.result_type(v)) for key, v in params.items()}
    batch[name] = basis
    return batch, shape


class Forward(NamedTuple):
    """Forward-mode derivatives w.r.t. the elements of one parameter.

    values: {"position": shape + (N, d), observable: shape + obs.shape}
    iterations, residual: one per element, shape ``shape`` (``param.shape``,
    or ``()`` for a single element).
    """

    values: dict[str, Array]
    iterations: Array
    residual: Array


def forward_fn(
    system: System,
    name: str,
    observe: Mapping[str, Observable],
    rattler: Array,
    solve: implicit.Solve | None = None,
    index: tuple[int, ...] | None = None,
    batch: str | None = None,
) -> Callable[[Array, Params], Forward]:
    """The pure function ``(q*, θ) -> Forward`` behind :func:`forward` (jit it,
    or compile it ahead of time to time compilation separately).

    ``index=None`` (the default) differentiates by each element of
    ``params[name]`` separately; a full index (one entry per axis, ``()`` for a
    scalar) by that element alone.

    ``batch`` says how the tangents (one per element) are solved together:
    "vmap" (one batched CG; the default on accelerators) or "map" (one CG after
    another inside the same compiled function; the default on CPU, where the
    batched scatter-adds of the Hessian product were measured slower than
    sequential solves; the sparse direct solve, whose host call takes a batch as one
    multi-column solve, maps over vmapped batches of its ``batch_size``)."""
    # A solve that takes a batch in one call (the sparse one: one factorization, one
    # multi-column triangular solve) gets the tangents in batches of up to its
    # ``batch_size`` on the CPU (``lax.map`` over vmapped batches: a per-particle
    # parameter has N tangents, and vmapping them all holds N copies of every per-pair
    # array); CG on the CPU goes tangent by tangent.
    batch_size = getattr(solve, "batch_size", None)
    if batch is None:
        batch = "map" if jax.default_backend() == "cpu" else "vmap"
    if batch not in ("map", "vmap"):
        raise ValueError(f"batch must be 'map' or 'vmap', got {batch!r}")
    shape = jnp.shape(system.params[name]) if name in system.params else None
    if index is not None and shape is not None and (
            len(index) != len(shape) or any(not 0 <= i < n for i, n in zip(index, shape))):
        raise ValueError(f"index {tuple(index)} of {name!r} (shape {tuple(shape)}): give one entry per axis, "
                         "or index=None for each element separately")
    system = system.held_only(rattler)  # rattlers' contacts carry no load (System.held_only)
    root_fn = optimality(system)
    gauge = gauge_for(system, rattler)

    def outputs(q_: Array, p_: Params) -> dict[str, Array]:
        out = {"position": system.to_real(q_, p_)}
        out.update({key: fn(system, q_, p_) for key, fn in observe.items()})
        return out

    def run(q: Array, params: Params) -> Forward:
        params = dict(params)
        tangents, shape = unit_tangents(params, name, index)

        def one(dparams: Params):
            dq, info = implicit.tangent(root_fn, q, params, dparams, solve, gauge, hvp=system.hessian_vp)
            _, d = jax.jvp(outputs, (q, params), (dq, dparams))
            return d, info

        values, info = (jax.lax.map(one, tangents, batch_size=batch_size) if batch == "map"
                        else jax.vmap(one)(tangents))
        values = {key: v.reshape(shape + v.shape[1:]) for key, v in values.items()}
        return Forward(values, info.iterations.reshape(shape), info.residual.reshape(shape))

    return run


def forward(
    system: System,
    q: Array,
    params: Params,
    name: str,
    observe: Mapping[str, Observable],
    rattler: Array,
    solve: implicit.Solve | None = None,
    index: tuple[int, ...] | None = None,
    batch: str | None = None,
) -> Forward:
    """``∂x*/∂θ`` and ``dO/dθ`` for every element of ``params[name]``, each
    separately (``index=None``, the default: values of shape ``param.shape +
    …``), or for element ``index`` alone (a full index, shape ``()`` + …), at
    the relaxed ``q``.

    One linear solve per element, inside one compiled function: one after
    another with ``lax.map`` (``batch="map"``, the default on CPU) or as one
    batched CG with ``vmap`` (``batch="vmap"``, the default on accelerators);
    see :func:`forward_fn`. ``x*`` is the real-space position (includes the
    affine part ``q* ⊙ ∂L/∂θ`` for the box).

    Compiled once per model, options and shapes (:func:`mdsens.cache.program`;
    the system's pairs are an argument, :func:`mdsens.system.pad_pairs` makes
    their count repeat): a second call with new θ, q*, rattlers or a new build
    of the same model compiles nothing. ``solve`` is part of the key by
    identity: pass the same one.
    """
    model = system.model
    fn, _ = cache.program(
        ("forward", model, name, tuple(observe.items()), solve, index, batch),
        lambda: lambda q_, p_, r_, pr_: forward_fn(model.template.with_pairs(pr_), name, observe, r_, solve, index,
                                                   batch)(q_, p_),
        q, dict(params), jnp.asarray(rattler), system.pairs)
    return fn(q, dict(params), jnp.asarray(rattler), system.pairs)


def gradient_fn(
    system: System,
    observable: Observable,
    rattler: Array,
    solve: implicit.Solve | None = None,
) -> Callable[[Array, Params], tuple[Params, linsolve.SolveInfo]]:
    """The pure function ``(q*, θ) -> (dO/dθ, info)`` behind :func:`gradient`."""
    system = system.held_only(rattler)  # rattlers' contacts carry no load (System.held_only)
    root_fn = optimality(system)
    gauge = gauge_for(system, rattler)

    def run(q: Array, params: Params):
        params = dict(params)
        g_q, g_p = jax.grad(lambda a, b: observable(system, a, b), argnums=(0, 1))(q, params)
        implicit_part, info = implicit.cotangent(root_fn, q, params, g_q, solve, gauge, hvp=system.hessian_vp)
        return jax.tree_util.tree_map(jnp.add, g_p, implicit_part), info

    return run


def derivatives_fn(
    system: System,
    observe: Mapping[str, Observable],
    wrts: Sequence[tuple[str, str, tuple[int, ...] | None]],
    grads: Sequence[str],
    rattler: Array,
    solve: implicit.Solve | None = None,
) -> Callable[[Array, Params], tuple[dict[str, Forward], dict[str, tuple[Params, linsolve.SolveInfo]]]]:
    """Every derivative of a run as one pure function ``(q*, θ) -> (forwards,
    gradients)``: :func:`forward_fn` for each ``(text, name, index)`` of ``wrts``
    (keyed by ``text``) and :func:`gradient_fn` for each observable named in
    ``grads``, all on the one ``solve``. Compiled as one program, the solve's
    set-up is paid once: the sparse solve's pair blocks and factorization (the
    reverse solve finds the forward one's factor, :mod:`mdsens.sparse`), CG's
    preconditioner, one dispatch instead of one per derivative."""
    forward_fns = [(text, forward_fn(system, name, observe, rattler, solve, index)) for text, name, index in wrts]
    gradient_fns = [(name, gradient_fn(system, observables.OBSERVABLES[name], rattler, solve)) for name in grads]

    def run(q: Array, params: Params):
        return ({text: f(q, params) for text, f in forward_fns},
                {name: g(q, params) for name, g in gradient_fns})

    return run


def gradient(
    system: System,
    q: Array,
    params: Params,
    observable: Observable,
    rattler: Array,
    solve: implicit.Solve | None = None,
) -> tuple[Params, linsolve.SolveInfo]:
    """Reverse mode: ``dO/dθ`` for every element of every parameter, one solve.

    ``dO/dθ = ∂θO + (∂q*/∂θ)ᵀ ∂qO``. ``observable`` must return a scalar
    (``jax.grad`` raises a TypeError otherwise). Compiled once per model,
    observable, ``solve`` and shapes, as :func:`forward`.
    """
    model = system.model
    fn, _ = cache.program(
        ("gradient", model, observable, solve),
        lambda: lambda q_, p_, r_, pr_: gradient_fn(model.template.with_pairs(pr_), observable, r_, solve)(q_, p_),
        q, dict(params), jnp.asarray(rattler), system.pairs)
    return fn(q, dict(params), jnp.asarray(rattler), system.pairs)


# -- finite differences: the independent check ----------------------------------


#: The Newton polish of the finite-difference reference sums over the pairs closer than
#: the cutoff plus this fraction of it at its start, not over all N(N−1)/2: its dense
#: matrix is N·d products, and over all pairs those took 77 GB at 2D N = 1024.
POLISH_MARGIN = 0.1


def listed_pairs(system: System, q: Array, params: Params) -> Array | None:
    """The pairs within ``cutoff · (1 + POLISH_MARGIN)`` of each other at ``q``, padded
    (:func:`mdsens.system.pad_pairs`), for a system summed over all pairs with a finite
    cutoff; ``None`` otherwise (a pair list already given, or every pair interacting)."""
    if system.pairs is not None:
        return None
    cutoff = float(system.cutoff(params))
    if not np.isfinite(cutoff):
        return None
    return pad_pairs(system.interacting_pairs(q, params, POLISH_MARGIN * cutoff), system.n)


def polish_over_listed_pairs(system: System, q: Array, params: Params,
                             polish: Callable[[Array | None], tuple[Array, Params]]) -> tuple[Array, Params]:
    """``polish(pairs)`` (returning the polished ``(q, params)``) over :func:`listed_pairs`;
    where another pair came within the cutoff of the polished state
    (:func:`missing_pairs`), redone over the pairs listed there (twice at most), then
    with ``polish(None)`` (the system's own pairs: all N(N−1)/2 for a system without a
    list, which a large N cannot afford, hence the relisting first)."""
    pairs = listed_pairs(system, q, params)
    if pairs is None:
        return polish(None)
    for _ in range(3):
        polished, polished_params = polish(pairs)
        if not _gained_pairs(system, pairs, polished, polished_params):
            return polished, polished_params
        pairs = listed_pairs(system, polished, polished_params)
    return polish(None)


#: from this many particles a polish's coverage test runs on the host (a k-d tree) instead of
#: :func:`missing_pairs` (O(N²) in JAX)
HOST_COVERAGE_N = 4097


def _gained_pairs(system: System, pairs: Array, q: Array, params: Params) -> bool:
    """Whether a pair not in ``pairs`` is interacting at ``q``: :func:`missing_pairs`, or,
    from :data:`HOST_COVERAGE_N` particles, every pair closer than the cutoff (a k-d tree,
    :meth:`System.interacting_pairs`; a superset of the interacting ones) looked up in
    ``pairs``."""
    n = system.n
    if n < HOST_COVERAGE_N:
        return int(missing_pairs(system.with_pairs(pairs), q, params)) > 0
    listed = np.asarray(pairs).astype(np.int64)
    listed = listed[:, (listed[0] < n) & (listed[1] < n)]
    within = system.interacting_pairs(q, params, 0.0).astype(np.int64)
    codes = np.minimum(listed[0], listed[1]) * n + np.maximum(listed[0], listed[1])
    return not bool(np.all(np.isin(within[0] * n + within[1], codes)))


#: the largest N·d whose Newton polish solves densely (:func:`newton_polish`); above it, CG
DENSE_POLISH_LIMIT = 6000


def newton_polish(system: System, q: Array, params: Params, rattler: Array, steps: int = 4) -> Array:
    """A few gauge-fixed Newton steps: drives ``max|F|`` to round-off (FIRE alone
    stalls near 1e-13). Each step solves densely up to N·d = :data:`DENSE_POLISH_LIMIT`,
    by block-Jacobi-preconditioned CG to 1e-12 above (the products are jvp's of the
    gradient either way; the blocks only precondition).

    A system without a pair list is polished over the pairs within ``cutoff ·
    (1 + POLISH_MARGIN)`` of each other at ``q`` (the same energy and derivatives
    while no other pair comes within the cutoff, which is checked at the end; where
    one did, the polish is redone over all pairs; :func:`polish_over_listed_pairs`).
    The steps are one program per model, step count and padded pair count
    (:mod:`mdsens.cache`), so the many polishes of a finite-difference check compile once."""
    params = {k: jnp.asarray(v) for k, v in params.items()}
    q, rattler = jnp.asarray(q), jnp.asarray(rattler)

    def polish(pairs):
        return _newton_steps(system, q, params, rattler, steps, system.pairs if pairs is None else pairs), params

    return polish_over_listed_pairs(system, q, params, polish)[0]


def _newton_steps(system: System, q: Array, params: Params, rattler: Array, steps: int,
                  pairs: Array | None) -> Array:
    dense = system.n * system.dim <= DENSE_POLISH_LIMIT

    def make():
        template = system.model.template

        def polish(q0, params_, rattler_, pairs_):
            listed = template.with_pairs(pairs_)
            root_fn = optimality(listed)
            project = gauge_for(listed, rattler_)(q0, params_)
            if dense:
                solve = linsolve.dense()
            else:
                from mdsens import precondition

                solve = linsolve.cg(rtol=1e-12, preconditioner=precondition.block_jacobi(
                    listed, q0, params_, project))

            def step(_, q_):
                g = root_fn(q_, params_)

                def matvec(v):
                    pv = project(v)
                    # jvp of the gradient, not System.hessian_vp: the finite-difference
                    # reference stays independent of the engine's assembled Hessian.
                    return project(jax.jvp(lambda y: root_fn(y, params_), (q_,), (pv,))[1]) + (v - pv)

                delta, _ = solve(matvec, -project(g))
                return q_ + delta

            return jax.lax.fori_loop(0, steps, step, q0)

        return polish

    fn, _ = cache.program(("newton_polish", system.model, steps, dense), make, q, params, rattler, pairs)
    return fn(q, params, rattler, pairs)


#: finite-difference stencils: (step in units of h, weight) pairs, the derivative being
#: Σ weight · (f(θ + step · h) − f(θ − step · h)) / h (differences first, so that an f that
#: does not move, such as anything of a rattler's diameter, gives exactly 0)
STENCILS = {2: ((1.0, 0.5),), 4: ((1.0, 2.0 / 3.0), (2.0, -1.0 / 12.0))}


def finite_difference(
    system: System,
    q: Array,
    params: Params,
    name: str,
    index: tuple[int, ...] | None = None,
    h: float = 1e-5,
    observe: Mapping[str, Observable] | None = None,
    ftol: float = 1e-12,
    polish: bool = True,
    stencil: int = 2,
    contacts_changed: list | None = None,
) -> dict[str, np.ndarray]:
    """Central differences of ``x*`` and observables in the elements of ``params[name]``.

    Like :func:`forward`: ``index=None`` (the default) differences each element
    separately (values of shape ``param.shape + …``; a scalar gives shape
    ``()`` + …); a full index (one entry per axis, ``()`` for a scalar) only
    that element. A partial index is refused (it would move several elements
    at once).

    Re-relaxes from the relaxed ``q`` at ``θ ± h`` (same basin), polishes with
    Newton steps, and differences in solver coordinates with minimum image, so
    ``∂x*/∂θ = L ⊙ P(∂q/∂θ) + q* ⊙ ∂L/∂θ`` in the same gauge ``P`` as the
    implicit derivative. ``stencil=4`` adds the points ``θ ± 2h`` (the five-point
    formula, truncation error O(h⁴) instead of O(h²); twice the relaxations): near
    jamming, where x*(θ) bends sharply, the two-point error at h = 1e-5 can exceed 1e-4.

    ``contacts_changed``: a list to which each element appends whether the contact
    network (the system's contact rule) at any of the re-relaxed states differs from
    that at ``q``. Then x*(θ) has a kink inside the stencil (a contact opens or closes
    within ``2h``), and the differences do not estimate the derivative at θ.
    """
    weights = STENCILS.get(stencil)
    if weights is None:
        raise ValueError(f"stencil must be one of {sorted(STENCILS)}, got {stencil!r}")
    shape = jnp.shape(params[name])
    if index is None:
        each = [finite_difference(system, q, params, name, i, h, observe, ftol, polish, stencil, contacts_changed)
                for i in np.ndindex(*shape)]
        return {key: np.stack([e[key] for e in each]).reshape(shape + each[0][key].shape) for key in each[0]}
    index = tuple(int(i) for i in index)
    if len(index) != len(shape) or any(not 0 <= i < n for i, n in zip(index, shape)):
        raise ValueError(f"index {index} of {name!r} (shape {tuple(shape)}): give one entry per axis, "
                         "or index=None for each element separately")
    observe = {} if observe is None else observe
    params = {k: jnp.asarray(v) for k, v in params.items()}
    # the pairs within 1.1 × cutoff at q: the rattlers, the contacts and the observables
    # of every re-relaxed state are sums over them (they hold every interacting pair while
    # nothing moves 0.1 cutoff), not over all N(N−1)/2 (a check at N = 16384 ran out of memory)
    pairs = listed_pairs(system, q, params)
    near = system if pairs is None else system.with_pairs(pairs)
    rattler = observables.rattlers(near, q, params)
    project = gauge_for(system, rattler)(q, params)
    dq = jnp.zeros_like(q)
    dtheta = jnp.zeros_like(params[name])
    values = {key: 0.0 for key in observe}
    touching = near.contact_list(q, params)[0]
    changed = False

    def state(step: float):
        """The shift of x* (minimum image) at θ + step·h, θ there, and whether the contacts changed."""
        p = dict(params)
        p[name] = params[name].at[index].add(step * h)
        qs, _ = relax(system, p, q0=q, ftol=ftol, max_steps=200_000)
        if polish:
            qs = newton_polish(system, qs, p, rattler)
        shift = qs - q
        return (shift - jnp.round(shift) if system.periodic else shift), p, \
            bool(jnp.any(near.contact_list(qs, p)[0] != touching))

    for step, weight in weights:  # weight · (f(θ + step h) − f(θ − step h)): exactly 0 where f does not change
        (s_plus, p_plus, c_plus), (s_minus, p_minus, c_minus) = state(step), state(-step)
        changed = changed or c_plus or c_minus
        dq = dq + weight * (s_plus - s_minus)
        dtheta = dtheta + weight * (p_plus[name] - p_minus[name])
        for key, fn in observe.items():
            values[key] = values[key] + weight * (fn(near, q + s_plus, p_plus) - fn(near, q + s_minus, p_minus))
    dq = project(dq / h)
    tangent = {k: jnp.zeros_like(v) for k, v in params.items()}
    tangent[name] = dtheta / h
    out = {"position": np.asarray(jax.jvp(system.to_real, (q, params), (dq, tangent))[1])}
    for key in observe:
        out[key] = np.asarray(values[key] / h)
    if contacts_changed is not None:
        contacts_changed.append(changed)
    return out
