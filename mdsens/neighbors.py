"""Cell-list neighbor lists for large systems: O(N) forces, Hessian-vector products, memory.

The energy stays mdsens's own (fractional coordinates, minimum image on Δq,
the box a differentiable parameter; see :mod:`mdsens.system`): jax-md only
*enumerates* the pairs. Its ``OrderedSparse`` list (each pair ``i < j`` once,
padded with N) is handed to :meth:`mdsens.system.System.with_pairs` as
non-differentiable data.

Relaxation (:func:`relax`) runs the minimizer in jitted chunks. Inside a chunk
the list is updated after every step (jax-md rebuilds it when a particle has
moved more than half the skin since the last build; the force is then
recomputed on the rebuilt list, so every force is taken on a list valid at its
positions); a chunk stops early when the list overflows. On overflow the chunk
is redone from its start with a list reallocated there with at least 1.5× the
capacity: the run never continues on a truncated list. The derivative uses a
list built afresh at ``x*`` (:func:`build`).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import minimize
from mdsens.system import Params, System

Array = jax.Array

#: ``mdsens run`` switches to neighbor lists at this many particles (all pairs below).
AUTO_THRESHOLD = 768
DEFAULT_SKIN = 0.3


class NeighborStats(NamedTuple):
    """capacity: pairs the final list can hold; reallocations: overflows recovered;
    pairs: pairs within cutoff + skin at x*."""

    capacity: int
    reallocations: int
    pairs: int


def overflowed(nbrs: Any) -> bool:
    """``did_buffer_overflow`` is a uint8 bitmask, not a bool: test ``!= 0``."""
    return bool(np.asarray(nbrs.did_buffer_overflow) != 0)


def neighbor_fns(system: System, params: Params, skin: float = DEFAULT_SKIN, capacity_multiplier: float = 1.25):
    """jax-md ``NeighborListFns`` over real-space positions: pairs within
    ``cutoff(θ) + skin``, rebuilt when a particle moved more than ``skin / 2``."""
    from jax_md import partition, space

    cutoff = float(system.cutoff(params))
    if system.periodic:
        box = np.asarray(params["box"], dtype=float)
        displacement, _ = space.periodic(jnp.asarray(box))
        return partition.neighbor_list(displacement, jnp.asarray(box), cutoff, dr_threshold=skin,
                                       capacity_multiplier=capacity_multiplier,
                                       format=partition.OrderedSparse)
    displacement, _ = space.free()
    return partition.neighbor_list(displacement, 1.0, cutoff, dr_threshold=skin,
                                   capacity_multiplier=capacity_multiplier, disable_cell_list=True,
                                   format=partition.OrderedSparse)


def allocate(fns: Any, x: Array, extra: int = 0, attempts: int = 8) -> Any:
    """A list built at ``x``; grows ``extra`` (pairs per particle) until it fits."""
    n = x.shape[0]
    for _ in range(attempts):
        nbrs = fns.allocate(x, extra_capacity=extra)
        if not overflowed(nbrs):
            return nbrs
        extra = max(2 * extra, 1 + math.ceil(nbrs.idx.shape[1] / n))
    raise RuntimeError(f"neighbor list still overflows after {attempts} reallocations")


def build(system: System, x: Array, params: Params, skin: float = DEFAULT_SKIN) -> Any:
    """A list built at real-space positions ``x`` (e.g. at ``x*``, for the derivative)."""
    return allocate(neighbor_fns(system, params, skin), x)


def pair_count(nbrs: Any, n: int) -> int:
    return int(jnp.sum(nbrs.idx[0] < n))


def relax(
    system: System,
    x0: Array,
    params: Params,
    method: str = "fire",
    ftol: float = 1e-10,
    max_steps: int = 100_000,
    chunk: int = 2_000,
    callback: Callable[[int, float, float], None] | None = None,
    skin: float = DEFAULT_SKIN,
) -> tuple[Array, minimize.RelaxInfo, float, Any, NeighborStats]:
    """Relax from real-space ``x0`` on neighbor lists.

    Returns ``(x*, info, compile_s, nbrs, stats)`` with ``nbrs`` built at ``x*``.
    """
    fns = neighbor_fns(system, params, skin)

    def energy(x: Array, pp: tuple[Params, Array]) -> Array:
        return system.with_pairs(pp[1]).energy_real(x, pp[0])

    base_shift = minimize.periodic_shift if system.periodic else minimize.free_shift

    def shift(x: Array, dx: Array, pp: tuple[Params, Array]) -> Array:
        return base_shift(x, dx, pp[0])

    if method == "fire":
        mini = minimize.fire(energy, shift)
    elif method == "gd":
        mini = minimize.gradient_descent(energy, shift)
    else:
        raise ValueError(f"unknown minimizer {method!r}: choose 'fire' or 'gd'")
    force_fn = jax.grad(lambda x, pp: -energy(x, pp))

    def advance(state, nbrs, p, until):
        def cond(c):
            s, nb = c
            return (minimize.max_force(s.force) >= ftol) & (s.step < until) & (nb.did_buffer_overflow == 0)

        def body(c):
            s, nb = c
            s = mini.step(s, (p, nb.idx))
            new = nb.update(s.x)
            rebuilt = jnp.any(new.reference_position != nb.reference_position)
            force = jax.lax.cond(rebuilt, lambda: force_fn(s.x, (p, new.idx)), lambda: s.force)
            return s._replace(force=force), new

        return jax.lax.while_loop(cond, body, (state, nbrs))

    start = time.perf_counter()
    nbrs = allocate(fns, x0)
    init = jax.jit(mini.init)
    state = init(x0, (params, nbrs.idx))
    until = jnp.asarray(0, jnp.int32)
    step_chunk = jax.jit(advance).lower(state, nbrs, params, until).compile()
    compile_s = time.perf_counter() - start
    reallocations = 0
    start = time.perf_counter()
    while True:
        until = jnp.minimum(state.step + chunk, max_steps).astype(jnp.int32)
        new_state, new_nbrs = step_chunk(state, nbrs, params, until)
        if overflowed(new_nbrs):
            # Redo this chunk from its start on a bigger list built there.
            reallocations += 1
            if reallocations > 20:
                raise RuntimeError("neighbor list overflowed 20 times; giving up")
            t = time.perf_counter()
            extra = 1 + math.ceil(0.5 * nbrs.idx.shape[1] / system.n)
            nbrs = allocate(fns, state.x, extra=extra)
            state = state._replace(force=jax.jit(force_fn)(state.x, (params, nbrs.idx)))
            step_chunk = jax.jit(advance).lower(state, nbrs, params, until).compile()
            compile_s += time.perf_counter() - t
            continue
        state, nbrs = new_state, new_nbrs
        fmax = float(minimize.max_force(state.force))
        steps = int(state.step)
        if callback is not None:
            callback(steps, fmax, time.perf_counter() - start)
        if fmax < ftol or steps >= max_steps:
            break
    x = state.x
    final = allocate(fns, x)
    fmax = minimize.max_force(state.force)
    e = jax.jit(energy)(x, (params, final.idx))
    info = minimize.RelaxInfo(state.step, fmax, e, fmax < ftol)
    jax.block_until_ready(x)
    stats = NeighborStats(int(final.idx.shape[1]), reallocations, pair_count(final, system.n))
    return x, info, compile_s, final, stats
