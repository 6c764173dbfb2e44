"""Implicit differentiation of a root: the implicit function theorem, once.

At a root ``F(x*, θ) = 0`` (for us ``F = ∇ₓE``), with ``A = ∂ₓF`` (the
Hessian, symmetric):

    A · ∂x*/∂θ = −∂θF(x*, θ)

``custom_root`` turns any ``solver(init, params) -> x*`` into a function that
``jax.jvp``, ``jax.vjp``, ``jax.grad``, ``jax.jacfwd``, ``jax.jacrev`` and
``jax.vmap`` go through, including second derivatives. It is one
``jax.custom_jvp`` rule whose tangent is a symmetric
``jax.lax.custom_linear_solve``; JAX transposes that solve for reverse mode, so
forward and reverse mode share one rule and stay exact transposes of each
other. The solver's own iterations are never differentiated.

Gauge. ``A`` is singular (translations, rotations, rattlers). A ``gauge(x,
params)`` returns ``P``, the orthogonal projector onto the complement of the
known null space. The engine solves with ``M = P A P + (I − P)``
(non-singular, symmetric) on ``b = P(−∂θF·δθ)``: the derivative has no
null-space component, and a cotangent along a zero mode can no longer make the
reverse system inconsistent.

Pytrees. The root variable ``x`` may be an array or any pytree of arrays:
the fixed-pressure root is over ``(q, u)``, positions and cell strain
(:mod:`mdsens.barostat`). Everything here (the operator, the projector, the
right-hand side, ``custom_linear_solve``) maps pytrees to pytrees of the same
structure, and :mod:`mdsens.linsolve` solves on them without flattening. A
gauge on a pytree projects the leaves it concerns and leaves the others as
they are (:func:`mdsens.gauge.on`); a single array costs what it always did.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import tree_util

from mdsens import linsolve

Array = jax.Array
Params = Any  # a pytree of arrays
Root = Any  # the root variable: an array or a pytree of arrays
Projector = Callable[[Root], Root]
Gauge = Callable[[Root, Params], Projector]
OptimalityFn = Callable[[Root, Params], Root]
# hvp(x, params) -> (v -> ∂ₓF(x, params) v): an assembled Jacobian-vector product.
HVP = Callable[[Root, Params], Callable[[Root], Root]]
Solve = Callable[[Callable[[Root], Root], Root], tuple[Root, linsolve.SolveInfo]]


def _identity(v: Root) -> Root:
    return v


def _add(a: Root, b: Root) -> Root:
    return tree_util.tree_map(jnp.add, a, b)


def _sub(a: Root, b: Root) -> Root:
    return tree_util.tree_map(jnp.subtract, a, b)


def _neg(a: Root) -> Root:
    return tree_util.tree_map(jnp.negative, a)


def _operator(
    optimality_fn: OptimalityFn, x: Root, params: Params, gauge: Gauge | None, hvp: HVP | None = None,
) -> tuple[Callable[[Root], Root], Projector]:
    """The gauge-fixed operator ``M v = P A P v + (I − P) v`` and ``P``, on
    values shaped like ``x`` (an array or a pytree).

    ``A v`` is ``jvp(F)`` by default, or ``hvp(x, params)(v)`` when the caller
    has a cheaper assembled product (it must equal ∂ₓF exactly)."""
    project = _identity if gauge is None else gauge(jax.lax.stop_gradient(x), params)

    if hvp is not None:
        jacobian_vp = hvp(x, params)
    else:
        def jacobian_vp(v: Root) -> Root:
            return jax.jvp(lambda y: optimality_fn(y, params), (x,), (v,))[1]

    def matvec(v: Root) -> Root:
        pv = project(v)
        return _add(project(jacobian_vp(pv)), _sub(v, pv))

    return matvec, project


def tangent(
    optimality_fn: OptimalityFn,
    x: Root,
    params: Params,
    dparams: Params,
    solve: Solve | None = None,
    gauge: Gauge | None = None,
    hvp: HVP | None = None,
) -> tuple[Root, linsolve.SolveInfo]:
    """Forward mode: ``u = ∂x*/∂θ · δθ``, solving ``M u = −P ∂θF·δθ``.

    Returns the displacement field ``u`` (shaped like ``x``: an array or a
    pytree) and the solve's info. Differentiable (the solve is a
    ``custom_linear_solve``).
    """
    solve = linsolve.cg() if solve is None else solve
    matvec, project = _operator(optimality_fn, x, params, gauge, hvp)
    _, dF = jax.jvp(lambda p: optimality_fn(x, p), (params,), (dparams,))
    b = _neg(project(dF))
    u, info = jax.lax.custom_linear_solve(matvec, b, solve, symmetric=True, has_aux=True)
    return project(u), info


def cotangent(
    optimality_fn: OptimalityFn,
    x: Root,
    params: Params,
    x_bar: Root,
    solve: Solve | None = None,
    gauge: Gauge | None = None,
    hvp: HVP | None = None,
) -> tuple[Params, linsolve.SolveInfo]:
    """Reverse mode: ``θ̄ = (∂x*/∂θ)ᵀ x̄ = −(∂θF)ᵀ w`` with ``M w = P x̄``.

    One solve for any number of parameters. ``x_bar`` is shaped like ``x``.
    Returns ``θ̄`` (a pytree like ``params``) and the solve's info.
    """
    solve = linsolve.cg() if solve is None else solve
    matvec, project = _operator(optimality_fn, x, params, gauge, hvp)
    w, info = solve(matvec, project(x_bar))
    _, vjp = jax.vjp(lambda p: optimality_fn(x, p), params)
    (params_bar,) = vjp(_neg(project(w)))
    return params_bar, info


def custom_root(
    optimality_fn: OptimalityFn,
    solve: Solve | None = None,
    gauge: Gauge | None = None,
    hvp: HVP | None = None,
    solve_at: Callable[[Root, Params], Solve] | None = None,
) -> Callable[[Callable[[Root, Params], Root]], Callable[[Root, Params], Root]]:
    """Decorator: make ``solver(init, params) -> x*`` differentiable in ``params``.

    ``x*`` (and ``init``) may be an array or a pytree of arrays; the gauge,
    ``hvp`` and the solve then act on that pytree.

    ``optimality_fn(x, params)`` vanishes at the solver's output and has a
    symmetric Jacobian in ``x`` (a gradient); ``hvp``, if given, is an
    assembled product with that Jacobian. ``solve`` defaults to
    :func:`mdsens.linsolve.cg`; ``solve_at(x*, params) -> solve``, if given,
    builds the solve at the root instead (a preconditioner assembled there,
    :func:`mdsens.sensitivity.solver_for`). The returned function has zero
    derivative with respect to ``init`` (the root does not depend on where the
    search started, within one basin).

    No silent failure: a tangent whose linear solve did not reach its
    tolerance (CG at its iteration cap, ``SolveInfo.converged`` False) is NaN,
    and so is every derivative computed from it; a solver that failed can
    return NaN itself (:func:`mdsens.sensitivity.equilibrium` does). Check
    ``jnp.isfinite`` on a derivative before following it.
    """
    default = linsolve.cg() if solve is None else solve

    def poisoned(solve_fn):
        def solution_only(matvec, b):
            u, info = solve_fn(matvec, b)
            return tree_util.tree_map(lambda leaf: jnp.where(info.converged, leaf, jnp.nan), u)

        return solution_only

    def decorator(solver: Callable[[Root, Params], Root]) -> Callable[[Root, Params], Root]:
        @jax.custom_jvp
        def root(init: Root, params: Params) -> Root:
            return solver(init, params)

        @root.defjvp
        def root_jvp(primals, tangents):
            init, params = primals
            _, dparams = tangents
            x = root(init, params)
            matvec, project = _operator(optimality_fn, x, params, gauge, hvp)
            _, dF = jax.jvp(lambda p: optimality_fn(x, p), (params,), (dparams,))
            solve_fn = default if solve_at is None else solve_at(jax.lax.stop_gradient(x), params)
            u = jax.lax.custom_linear_solve(matvec, _neg(project(dF)), poisoned(solve_fn), symmetric=True)
            return x, project(u)

        return root

    return decorator


def custom_fixed_point(
    fixed_point_fn: Callable[[Root, Params], Root],
    solve: Solve | None = None,
    gauge: Gauge | None = None,
    hvp: HVP | None = None,
) -> Callable[[Callable[[Root, Params], Root]], Callable[[Root, Params], Root]]:
    """Differentiate a fixed point ``x* = T(x*, θ)``: ``custom_root(x − T(x, θ))``.

    The root is written ``x − T``, not ``T − x``: for gradient descent
    ``T(x) = x − η∇ₓE`` its Jacobian ``I − ∂T/∂x = ηH`` is positive
    semidefinite, so CG sees ``η P H P + (I − P)``, symmetric positive
    definite. (With ``T − x`` it would see ``−η P H P + (I − P)``: indefinite,
    since the ``I − P`` block stays +1.) The derivative is the same either way:
    flipping the sign of ``F`` flips both sides of ``A ∂x* = −∂θF``. ``T`` must
    have a symmetric Jacobian with ``I − ∂T/∂x`` positive semidefinite on the
    gauge's complement (for gradient descent: at a minimum, for any η > 0).

    ``hvp(x, params)``, if given, returns ``v ↦ (∂T/∂x) v``, an assembled
    product with the Jacobian of ``T`` (e.g. ``v − η H v``); the engine uses
    ``v ↦ v − hvp(x, params)(v)``.
    """
    root_hvp = None
    if hvp is not None:
        def root_hvp(x: Root, params: Params) -> Callable[[Root], Root]:
            jacobian_t = hvp(x, params)
            return lambda v: _sub(v, jacobian_t(v))

    return custom_root(lambda x, p: _sub(x, fixed_point_fn(x, p)), solve=solve, gauge=gauge, hvp=root_hvp)
