"""Shared test helpers: small relaxed systems and comparisons.

The finite-difference reference itself is :func:`mdsens.sensitivity.finite_difference`
(re-relax from the relaxed state at θ ± h, Newton-polish to round-off, minimum-image
differences in the implicit derivative's gauge); these helpers only wrap it.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from mdsens import observables, sensitivity, systems


@functools.lru_cache(maxsize=None)
def relaxed(family: str, seed: int = 0, **config):
    """Build and relax a system once per test session: (system, q*, params, rattler).

    ``config`` values must be hashable (tuples for lists)."""
    system = systems.get(family).build(seed=seed, **config)
    q, info = sensitivity.relax(system, ftol=1e-12, max_steps=200_000)
    assert bool(info.converged), f"{family} {config} did not relax: {info}"
    params = {k: jnp.asarray(v) for k, v in system.params.items()}
    q = sensitivity.newton_polish(system, q, params, observables.rattlers(system, q, params))
    return system, q, params, observables.rattlers(system, q, params)


_EQUILIBRIUM_JVP = {}


def equilibrium_jvp(system, **options):
    """``jit((q0, θ, δθ) -> (q*, dq*))`` through ``sensitivity.equilibrium(system, **options)``.

    One jitted function per model and options, with ``q0`` an argument (not a
    constant of the program): tests that differentiate the same model's
    equilibrium share one compiled program (in process, and across the run's
    workers through the shared compilation cache)."""
    import jax

    key = (system.model, tuple(sorted(options.items())))
    if key not in _EQUILIBRIUM_JVP:
        eq = sensitivity.equilibrium(system, **options)
        _EQUILIBRIUM_JVP[key] = jax.jit(lambda q0, p, v: jax.jvp(lambda p_: eq(q0, p_), (p,), (v,)))
    return _EQUILIBRIUM_JVP[key]


def relative_error(a, b) -> float:
    """max|a − b| / max|b| (absolute when b is zero)."""
    a, b = np.asarray(a), np.asarray(b)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))


class Reference:
    """Central finite differences for one relaxed system, compiled once and
    reused for every parameter, direction and sign.

    Same semantics as :func:`mdsens.sensitivity.finite_difference` (re-relax in
    the basin of ``q*`` at ``θ ± h·δθ``, minimum-image differences in solver
    coordinates, projected into the implicit derivative's gauge; positions in
    real space with the affine part of a box change), but the re-relaxation is
    a jitted, gauge-fixed Newton iteration with a dense Hessian started at
    ``q*``: for ``h ≲ 1e-4`` it converges quadratically to round-off in a few
    steps, and compiling it once per system instead of a FIRE run per
    evaluation keeps the test suite fast. ``directional`` accepts any
    direction ``δθ`` (a dict like ``params``), so it also checks reverse-mode
    gradients along random directions.
    """

    def __init__(self, system, q, params, rattler, steps: int = 6):
        import jax

        from mdsens import sensitivity

        # Plain (strongly typed) arrays: one compilation serves every direction.
        params = {k: jnp.array(np.asarray(v)) for k, v in params.items()}
        self.system, self.q, self.params = system, q, params
        root_fn = sensitivity.optimality(system)
        self.project = sensitivity.gauge_for(system, rattler)(q, params)
        n = q.size
        projector = jax.vmap(lambda e: self.project(e.reshape(q.shape)).ravel())(jnp.eye(n, dtype=q.dtype)).T

        def newton(p):
            def step(_, qk):
                g = root_fn(qk, p).ravel()
                hess = jax.jacfwd(lambda y: root_fn(y.reshape(q.shape), p).ravel())(qk.ravel())
                m = projector @ hess @ projector + (jnp.eye(n, dtype=q.dtype) - projector)
                return qk + jnp.linalg.solve(m, -projector @ g).reshape(q.shape)

            return jax.lax.fori_loop(0, steps, step, q)

        self._newton = jax.jit(newton)
        self._observables = {}

    def _observable(self, observe: tuple):
        """One jitted function for a set of observables ``((key, fn), ...)``."""
        import jax

        if observe not in self._observables:
            self._observables[observe] = jax.jit(lambda q_, p_: {k: fn(self.system, q_, p_) for k, fn in observe})
        return self._observables[observe]

    def relaxed_at(self, params):
        """``q*`` re-relaxed (Newton, from ``q*``) at other parameters."""
        return self._newton(params)

    def directional(self, direction, h: float = 1e-5, observe=None) -> dict:
        """``d/dt`` at ``t = 0`` of ``x*(θ + t δθ)`` and of each observable, by central differences."""
        import jax

        observe = {} if observe is None else observe
        system, q, params = self.system, self.q, self.params
        shifted = {}
        for sign in (+1.0, -1.0):
            p = {k: jnp.array(np.asarray(params[k] + sign * h * np.asarray(direction.get(k, 0.0)))) for k in params}
            qs = self._newton(p)
            dq = qs - q
            if system.periodic:
                dq = dq - jnp.round(dq)
            shifted[sign] = (dq, p)
        (dq_plus, p_plus), (dq_minus, p_minus) = shifted[+1.0], shifted[-1.0]
        dq = self.project((dq_plus - dq_minus) / (2 * h))
        tangent = {k: jnp.zeros_like(params[k]) + jnp.asarray(direction.get(k, 0.0)) for k in params}
        out = {"position": np.asarray(jax.jvp(system.to_real, (q, params), (dq, tangent))[1])}
        if observe:
            f = self._observable(tuple(observe.items()))
            plus, minus = f(q + dq_plus, p_plus), f(q + dq_minus, p_minus)
            out.update({key: np.asarray((plus[key] - minus[key]) / (2 * h)) for key in observe})
        return out


def unit(params, name: str, index: tuple[int, ...] = ()) -> dict:
    """The direction ``δθ`` that moves ``params[name][index]`` alone."""
    return {name: jnp.zeros_like(params[name]).at[index].set(1.0)}


def assert_close(actual, expected, rtol: float, atol: float = 0.0, what: str = "") -> None:
    """``max|a − b| ≤ rtol·max|b| + atol``, with a message giving both errors."""
    a, b = np.asarray(actual), np.asarray(expected)
    error = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    assert error <= rtol * scale + atol, f"{what}: max error {error:.3g} vs scale {scale:.3g} (rtol {rtol}, atol {atol})"
