"""Projectors onto the complement of a particle system's known zero modes.

The Hessian of a translation-invariant energy has ``d`` zero modes (uniform
shifts), a free cluster also has rotations, and each rattler (a particle with
too few contacts to be held) contributes ``d`` more. mdsens fixes the gauge by
giving derivatives no component along these modes: the center of mass of the
held particles stays put, rattlers stay put, a free cluster does not rotate.
Each function returns ``P``: an orthogonal (symmetric, idempotent) projector on
``(N, d)`` arrays, the ``gauge`` that :mod:`mdsens.implicit` expects;
:func:`on` lifts one to a root variable that is a pytree with the positions
as one entry.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def translations(rattler: Array) -> Callable[[Array], Array]:
    """Remove uniform shifts of the held particles and every rattler coordinate.

    ``rattler``: (N,) bool. The null space is spanned by ``e_{i,k}`` for each
    rattler ``i`` and by ``1_held ⊗ e_k``; these are mutually orthogonal, so
    ``P v`` zeroes the rattler rows and subtracts the held particles' mean.
    """
    held = (~rattler).astype(jnp.result_type(float))[:, None]
    count = jnp.maximum(jnp.sum(held), 1.0)

    def project(v: Array) -> Array:
        mean = jnp.sum(held * v, axis=0) / count
        return held * (v - mean)

    return project


def rigid_body(x: Array, rattler: Array) -> Callable[[Array], Array]:
    """Remove translations and rotations of the held particles (free space).

    Rotations are the infinitesimal generators ``(x_i − x̄) A`` for the
    ``d(d−1)/2`` antisymmetric ``A``; with the translations they are
    orthonormalised (SVD) over the held particles. ``x``: (N, d) positions at
    the minimum (treated as data: the gauge itself is not differentiated).
    """
    n, d = x.shape
    held = (~rattler).astype(x.dtype)[:, None]
    count = jnp.maximum(jnp.sum(held), 1.0)
    centered = held * (x - jnp.sum(held * x, axis=0) / count)
    modes = []
    for k in range(d):
        modes.append(held * jnp.zeros((n, d), x.dtype).at[:, k].set(1.0))
    for a in range(d):
        for b in range(a + 1, d):
            generator = jnp.zeros((n, d), x.dtype)
            generator = generator.at[:, a].set(-centered[:, b]).at[:, b].set(centered[:, a])
            modes.append(generator)
    basis = jnp.stack([m.ravel() for m in modes], axis=1)
    # Orthonormalise by a thin SVD of the unit-normalised modes, not by QR: a
    # degenerate mode (all particles on a line have one rotation fewer in 3D, a
    # single held particle has none) gives a zero singular value, and the left
    # singular vectors of the others span exactly the modes' span. (With
    # Householder QR a zero column that is not the last one, e.g. the rotation
    # about the axis of a chain along z, gets an arbitrary Q column that the
    # later, genuine columns have components along: dropping it loses part of
    # those rotations and keeps them in the derivative.)
    norms = jnp.linalg.norm(basis, axis=0)
    unit = basis / jnp.where(norms > 0, norms, 1.0)
    u, s, _ = jnp.linalg.svd(unit, full_matrices=False)
    # The "zero" singular value is round-off, ~eps (1e-7 in float32, 1e-16 in
    # float64), so the threshold must scale with the dtype: an absolute 1e-10
    # keeps float32 noise as a spurious, arbitrary direction, and the gauge then
    # projects a real displacement away (the float32 Morse dimer's dx*/dσ came
    # out 1e-12 instead of 1/√2). The cut is sqrt(eps) relative to the largest
    # (1.5e-8 in float64, 3.5e-4 in float32): far above round-off (eps times a
    # modest factor), and the errors are one-sided: a kept spurious mode
    # silently corrupts every derivative, while dropping a genuine but nearly
    # degenerate rotation (a cluster collinear to within sqrt(eps), whose
    # direction round-off could not resolve anyway) only leaves an exact zero
    # mode of H that the right-hand side does not excite.
    keep = (s > jnp.sqrt(jnp.finfo(x.dtype).eps) * jnp.max(s)).astype(x.dtype)
    q = u * keep[None, :]

    def project(v: Array) -> Array:
        flat = (held * v).ravel()
        flat = flat - q @ (q.T @ flat)
        return flat.reshape(v.shape)

    return project


def on(part, project: Callable[[Array], Array]) -> Callable:
    """``project`` applied to entry ``part`` of a pytree root variable, the
    identity on every other entry: the gauge of a root over more than the
    positions (at fixed pressure ``(q, u)``, the translations act on ``q``
    only). The root is a tuple or list (``part`` an index) or a dict (a key);
    a projector on one entry and the identity on the others is again an
    orthogonal projector."""

    def apply(tree):
        if isinstance(tree, dict):
            return {**tree, part: project(tree[part])}
        out = list(tree)
        out[part] = project(tree[part])
        if isinstance(tree, list):
            return out
        return type(tree)(*out) if hasattr(tree, "_fields") else type(tree)(out)

    return apply
