"""Energy minimizers run to a force tolerance: FIRE and gradient descent.

A minimizer is a pair of pure functions (``init(x, params) -> state``,
``step(state, params) -> state``) over a state holding at least ``x`` (positions),
``force`` and ``step`` (the count). :func:`run` iterates one inside a single
``lax.while_loop`` until the largest per-particle force ``max_i |F_i| < ftol``
or ``max_steps``; it is jittable and vmappable, which is what
:func:`mdsens.implicit.custom_root` wraps. The CLI's relaxation runs the
same steps in compiled chunks over a neighbor table (:mod:`mdsens.relax`).

Which FIRE. jax-md's ``fire_descent`` normalises the force as
``F / sqrt(|F|² + 1e-6)`` and its own comment warns this is wrong below
|F| ~ 1e-8. Measured on the reference case (2D bidisperse, φ = 0.9), it
nevertheless reaches max|F| < 1e-10, 1e-12 and 1e-13 reliably: the skewed
mixing only damps the velocity a little while α is small. mdsens still runs
its own FIRE, because (a) the parameters, the box included, flow through
``step(state, params)`` explicitly, so the periodic wrap follows a box that
is a traced, differentiable parameter, and (b) FIRE 2.0 (Guénolé et al.,
Comput. Mater. Sci. 175, 109584 (2020)) took a median 0.90× jax-md's steps
over nine runs (range 0.74–1.13×; N = 128 and 512, seeds 0–2, ftol 1e-10 to
1e-13; e.g. 1141 vs 1011 and 822 vs 1026 steps at N = 128, 1989 vs 2705 at
N = 512). It is FIRE 2.0 as published (Algorithm 2 of the paper, with its
stop after ``n_neg_max`` consecutive uphill steps): semi-implicit Euler,
mixing after the velocity update, a half-step back-off when the power turns
non-positive, the time step shrunk only while it stays above ``dt_min``, and
an exactly normalised force direction. The paper's initial delay is an
option, off by default (see :func:`fire`).

States. ``x`` (and with it the velocity and force) is an array or a pytree
of arrays — the fixed-pressure relaxation moves the pair (positions, cell
variable) without packing them into one vector (:mod:`mdsens.barostat`).
FIRE's power ``F·v`` and norms are then sums over the leaves (as
:func:`mdsens.linsolve.cg`'s inner products); on a plain array they are the
same operations as before, bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = Any
EnergyFn = Callable[[Array, Params], Array]
ShiftFn = Callable[[Array, Array, Params], Array]
ForceFn = Callable[[Array, Params], Array]


class FireState(NamedTuple):
    x: Array
    v: Array
    force: Array
    dt: Array
    alpha: Array
    n_pos: Array
    n_neg: Array
    step: Array


class DescentState(NamedTuple):
    x: Array
    force: Array
    step: Array


class Minimizer(NamedTuple):
    """``init(x, env)``; ``step(state, env)`` = ``step_force(step_x(state, env), env)``:
    ``step_x`` moves the positions (the force field of its result is stale),
    ``step_force`` evaluates the force there — a driver may refresh a neighbor
    table in between. ``stalled(state)`` is True when the minimizer gave up."""

    init: Callable[[Array, Params], Any]
    step: Callable[[Any, Params], Any]
    step_x: Callable[[Any, Params], Any] | None = None
    step_force: Callable[[Any, Params], Any] | None = None
    stalled: Callable[[Any], Array] | None = None
    blank: Callable[[Array], Any] | None = None  # the initial state with a zero force: init = step_force(blank)


class RelaxInfo(NamedTuple):
    """steps taken, final ``max_i |F_i|``, final energy, and ``max_force < ftol``."""

    steps: Array
    max_force: Array
    energy: Array
    converged: Array


def free_shift(x: Array, dx: Array, params: Params) -> Array:
    return x + dx


def fold(y: Array, box: Array) -> Array:
    """``y`` folded into ``[0, box)``: ``jnp.mod(y, box)``, bit for bit wherever
    ``-box < y < 2 box`` (a step never moves a particle a box length; the
    exceptions are ``y = −box``, +0 here and −0 there, and negative subnormals,
    which ``jnp.mod`` leaves negative), but
    vectorised: XLA:CPU lowers ``jnp.mod`` to a scalar ``fmod`` call per
    element, which made it a third of a FIRE step's vector work (2D, N = 131072:
    3.8 → 2.6 ms per ``step_x``, loaded machine).

    Why bit for bit: ``floor(y / box)`` is −1, 0 or 1 there, or off by one
    where ``y / box`` rounds to an integer; ``y − k·box`` is then exact (Sterbenz)
    or the same rounded ``y + box`` that ``jnp.mod`` computes, and the two
    ``where`` put a result off by one box back, exactly."""
    y = y - box * jnp.floor(y / box)
    return jnp.where(y >= box, y - box, jnp.where(y < 0, y + box, y))


def periodic_shift(x: Array, dx: Array, params: Params) -> Array:
    return fold(x + dx, params["box"])


def _tree_map(fn: Callable, *trees: Any) -> Any:
    return jax.tree_util.tree_map(fn, *trees)


def _zeros(x: Any) -> Any:
    """Zeros shaped like ``x`` (a pytree), as NumPy constants: a minimizer's
    blank state costs no compiled program when it is made outside ``jit``
    (three small ones per new shape otherwise), and is a constant inside."""
    return _tree_map(lambda a: np.zeros(np.shape(a), a.dtype), x)


def _dot(a: Any, b: Any) -> Array:
    """``a·b`` as ``sum(a * b)`` (over the leaves of a pytree). FIRE uses it only for the
    sign of the power, which a change of summation order leaves alone but at round-off;
    XLA:CPU's ``jnp.vdot`` of the same arrays took 3-7x as long (N = 131072, 2D:
    314-398 against 45-115 µs)."""
    if isinstance(a, (jax.Array, np.ndarray)):
        return jnp.sum(a * b)
    return sum(jnp.sum(u * w) for u, w in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _norm(a: Any) -> Array:
    """``|a|``: ``jnp.linalg.norm`` of an array, over all leaves of a pytree."""
    if isinstance(a, (jax.Array, np.ndarray)):
        return jnp.linalg.norm(a)
    return jnp.sqrt(sum(jnp.sum(u * u) for u in jax.tree_util.tree_leaves(a)))


def _max_abs(a: Any) -> Array:
    """The largest ``|component|`` over all leaves."""
    return jnp.max(jnp.stack([jnp.max(jnp.abs(u)) for u in jax.tree_util.tree_leaves(a)]))


def squared_length(v: Array) -> Array:
    """``jnp.sum(v * v, axis=-1)`` written out over the last axis's d components,
    summed in the same order: as elementwise operations XLA fuses it into its consumer,
    where a reduce would first write the whole float array (a 3D table build, N = 16384,
    181 candidates a row: 20.9 → 11.5 ms, the same table). XLA:CPU contracts both forms
    into the same fused multiply-adds, so the bits are the reduce's (tested compiled; every
    relaxation measured took the same steps to the same energy); another order of the
    terms is not (it contracts differently)."""
    out = v[..., 0] * v[..., 0]
    for c in range(1, v.shape[-1]):
        out = out + v[..., c] * v[..., c]
    return out


def max_force(force: Array) -> Array:
    """Largest per-particle force magnitude ``max_i |F_i|`` (the square root of the
    largest square: the same number, one square root)."""
    return jnp.sqrt(jnp.max(squared_length(force)))


def _force_fn(energy_fn: EnergyFn | None, force_fn: ForceFn | None) -> ForceFn:
    if force_fn is not None:
        return force_fn
    if energy_fn is None:
        raise ValueError("give energy_fn or force_fn")
    return jax.grad(lambda x, p: -energy_fn(x, p))


def fire(
    energy_fn: EnergyFn | None = None,
    shift_fn: ShiftFn = free_shift,
    dt_start: float = 0.1,
    dt_max: float = 0.4,
    dt_min: float = 1e-3,
    n_delay: int = 5,
    f_inc: float = 1.1,
    f_dec: float = 0.5,
    alpha_start: float = 0.1,
    f_alpha: float = 0.99,
    n_neg_max: int = 2000,
    force_fn: ForceFn | None = None,
    initial_delay: bool = False,
    max_displacement: float | None = None,
) -> Minimizer:
    """FIRE 2.0 (Guénolé et al. 2020, Algorithm 2) with unit masses: semi-implicit
    Euler, mixing after the velocity update, a half step back and zero
    velocity when the power ``F·v`` is not positive, and a stop after
    ``n_neg_max`` consecutive such steps (``stalled``). Time in units where
    ``dt ~ 0.1`` suits σ ~ 1, ε ~ 1. Forces from ``force_fn(x, env)``, or
    ``−∇energy_fn``.

    ``initial_delay`` (the paper's option, LAMMPS's default): no time-step
    decrease during the first ``n_delay`` steps. Off by default here: with
    ``dt_start = 0.1`` it let a displaced Lennard-Jones crystal (``lj_crystal``,
    2D) blow up to max|F| ~ 1e14 before the time step could shrink; without
    it the same start relaxes.

    ``max_displacement`` (LAMMPS's ``dmax``, there 0.1 by default; None here:
    off): the step's time ``dt`` is shortened, for that step only, so that no
    coordinate of ``dt·v`` (v after the force kick) exceeds it; the state's
    ``dt`` is unchanged. 2D bidisperse φ = 0.9, ftol 1e-10, 0.1 against none,
    steps for seeds 0–3 (2026-11-28): N = 1024 2085/2238/2973/2524 against
    2490/2988/4886/2462; N = 16384 10894/7561/8929/8459 against
    6605/7917/8454/17708; N = 131072 22546/26336/22067/22455 against
    22394/23802/29834/29230. It removes the long runs, but not every start
    takes fewer steps (the medians fell at N = 1024 and 131072, rose at 128 and
    16384), and it moves FIRE to other minima (the packing's energy differs),
    so it is an option."""
    force_of = _force_fn(energy_fn, force_fn)

    def blank(x: Array) -> FireState:
        dtype = jax.tree_util.tree_leaves(x)[0].dtype
        count = np.zeros((), np.int32)
        return FireState(x, _zeros(x), _zeros(x), np.asarray(dt_start, dtype), np.asarray(alpha_start, dtype),
                         count, count, count)

    def init(x: Array, params: Params) -> FireState:
        return blank(x)._replace(force=force_of(x, params))

    def step_x(state: FireState, params: Params) -> FireState:
        x, v, f, dt, alpha, n_pos, n_neg, count = state
        downhill = _dot(f, v) > 0
        n_pos = jnp.where(downhill, n_pos + 1, 0)
        n_neg = jnp.where(downhill, 0, n_neg + 1)
        grow = downhill & (n_pos > n_delay)
        dt = jnp.where(grow, jnp.minimum(dt * f_inc, dt_max), dt)
        alpha = jnp.where(grow, alpha * f_alpha, alpha)
        shrink = ~downhill
        if initial_delay:  # no decrease in the first steps
            shrink = shrink & (count >= n_delay)
        dt = jnp.where(shrink & (dt * f_dec >= dt_min), dt * f_dec, dt)
        alpha = jnp.where(shrink, alpha_start, alpha)
        # Uphill: step half back along the velocity that overshot, then stop.
        back = shift_fn(x, _tree_map(lambda v_: -0.5 * dt * v_, v), params)
        x = _tree_map(lambda x_, b: jnp.where(downhill, x_, b), x, back)
        step_dt = dt
        if max_displacement is not None:  # this step's dt: no coordinate moves more than max_displacement
            v = _tree_map(lambda v_: jnp.where(downhill, v_, jnp.zeros_like(v_)), v)
            fastest = _max_abs(_tree_map(lambda v_, f_: v_ + dt * f_, v, f))
            step_dt = jnp.where(dt * fastest > max_displacement,
                                max_displacement / jnp.where(fastest > 0, fastest, 1.0), dt)
            v = _tree_map(lambda v_, f_: v_ + step_dt * f_, v, f)
        else:
            v = _tree_map(lambda v_, f_: jnp.where(downhill, v_, jnp.zeros_like(v_)) + dt * f_, v, f)
        f_norm = _norm(f)
        v_norm = _norm(v)
        f_scale = jnp.where(f_norm > 0, f_norm, 1.0)
        direction = _tree_map(lambda f_: f_ / f_scale, f)
        v = _tree_map(lambda v_, e: (1.0 - alpha) * v_ + alpha * v_norm * e, v, direction)
        x = shift_fn(x, _tree_map(lambda v_: step_dt * v_, v), params)
        return FireState(x, v, f, dt, alpha, n_pos, n_neg, count + 1)

    def step_force(state: FireState, params: Params) -> FireState:
        return state._replace(force=force_of(state.x, params))

    def step(state: FireState, params: Params) -> FireState:
        return step_force(step_x(state, params), params)

    def stalled(state: FireState) -> Array:
        return state.n_neg > n_neg_max

    return Minimizer(init, step, step_x, step_force, stalled, blank)


def gradient_descent(energy_fn: EnergyFn | None = None, shift_fn: ShiftFn = free_shift, step_size: float = 0.05,
                     force_fn: ForceFn | None = None) -> Minimizer:
    """Fixed-step gradient descent ``x ← x − η ∇E``; stable for ``η < 2/λ_max(H)``."""
    force_of = _force_fn(energy_fn, force_fn)

    def blank(x: Array) -> DescentState:
        return DescentState(x, _zeros(x), np.zeros((), np.int32))

    def init(x: Array, params: Params) -> DescentState:
        return blank(x)._replace(force=force_of(x, params))

    def step_x(state: DescentState, params: Params) -> DescentState:
        return DescentState(shift_fn(state.x, _tree_map(lambda f_: step_size * f_, state.force), params),
                            state.force, state.step + 1)

    def step_force(state: DescentState, params: Params) -> DescentState:
        return state._replace(force=force_of(state.x, params))

    def step(state: DescentState, params: Params) -> DescentState:
        return step_force(step_x(state, params), params)

    return Minimizer(init, step, step_x, step_force, lambda state: jnp.zeros((), bool), blank)


#: the minimizers by name (``--minimizer``)
METHODS = ("fire", "gd")


def make(method: str, shift_fn: ShiftFn = free_shift, energy_fn: EnergyFn | None = None,
         force_fn: ForceFn | None = None, max_displacement: float | None = None) -> Minimizer:
    """The one place a name becomes a minimizer: ``method`` "fire" (:func:`fire`)
    or "gd" (:func:`gradient_descent`) on ``energy_fn`` or ``force_fn``, moved by
    ``shift_fn``; any other name is a ValueError. ``max_displacement``: FIRE's
    per-step cap (:func:`fire`); gradient descent refuses one."""
    if max_displacement is not None and method != "fire":
        raise ValueError(f"max_displacement is a FIRE option, not {method!r}'s")
    if method == "fire":
        return fire(energy_fn, shift_fn, force_fn=force_fn, max_displacement=max_displacement)
    if method == "gd":
        return gradient_descent(energy_fn, shift_fn, force_fn=force_fn)
    raise ValueError(f"unknown minimizer {method!r}: choose {' or '.join(repr(m) for m in METHODS)}")


def running(minimizer: Minimizer, state: Any, ftol: float, until: Array) -> Array:
    """Whether a relaxation goes on: not converged, below ``until``, not stalled."""
    go = (max_force(state.force) >= ftol) & (state.step < until)
    if minimizer.stalled is not None:
        go = go & ~minimizer.stalled(state)
    return go


def advance(minimizer: Minimizer, state: Any, params: Params, ftol: float, until: Array) -> Any:
    """Step ``state`` inside one ``while_loop`` until ``max|F| < ftol`` or ``step == until``."""

    return jax.lax.while_loop(lambda s: running(minimizer, s, ftol, until),
                              lambda s: minimizer.step(s, params), state)


def _info(state: Any, energy_fn: EnergyFn, params: Params, ftol: float) -> RelaxInfo:
    fmax = max_force(state.force)
    return RelaxInfo(state.step, fmax, energy_fn(state.x, params), fmax < ftol)


def run(
    minimizer: Minimizer, energy_fn: EnergyFn, x0: Array, params: Params, ftol: float = 1e-10,
    max_steps: int = 100_000,
) -> tuple[Array, RelaxInfo]:
    """Relax from ``x0``: pure, jittable, vmappable. Returns ``x*`` and :class:`RelaxInfo`."""
    state = advance(minimizer, minimizer.init(x0, params), params, ftol, jnp.asarray(max_steps, jnp.int32))
    return state.x, _info(state, energy_fn, params, ftol)
