"""The particle system: positions, box, species, parameters and the energy.

Coordinates. The minimizer moves real-space positions ``x`` (N, d). The
implicit derivative is taken in *solver coordinates* ``q``: fractional
``q = x / L`` (each component in [0, 1)) in a periodic box, ``q = x`` in free
space. The energy ``E(q, θ)`` is built from plain array operations
(``Δq − round(Δq)``, then times ``L``), so the box side ``L = θ["box"]`` is an
ordinary differentiable parameter and ``x*(θ) = L ⊙ q*(θ)`` carries the affine
part of a box change. (jax-md's ``space.periodic_general`` has a custom JVP
that passes fractional tangents through unscaled, which makes a
Hessian-vector product in fractional coordinates wrong by the box factor;
see DESIGN.md §6.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Params = dict[str, Array]
# pair(r, i, j, params) -> pair energy; i, j are particle-index arrays broadcast with r.
PairFn = Callable[[Array, Array, Array, Params], Array]


@dataclass(frozen=True, eq=False)
class System:
    """An N-particle system in d dimensions with a pairwise energy.

    name: the catalogue name (``mdsens systems``).
    positions: (N, d) initial real-space positions (before relaxation).
    species: (N,) int, reported in the output file.
    params: the differentiable parameters, a flat dict of float arrays;
        periodic systems hold ``box`` (d,) here.
    pair: pair energy ``pair(r, i, j, params)``.
    cutoff: the largest interaction range, ``cutoff(params) -> float``.
    contact: ``contact(r, i, j, params) -> bool`` (load-bearing contact, for
        rattler detection), or None when every particle is held.
    config: the resolved build configuration (keys and values), for the record.
    pairs: None (all pairs, ``i < j``), or a (2, M) int array of pairs ``(i, j)``
        from a neighbor list, padded with the index N (see :meth:`with_pairs`).
    """

    name: str
    positions: np.ndarray
    species: np.ndarray
    params: Mapping[str, Array]
    pair: PairFn
    cutoff: Callable[[Params], Array]
    contact: PairFn | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    pairs: Array | None = None

    @property
    def n(self) -> int:
        return int(self.positions.shape[0])

    @property
    def dim(self) -> int:
        return int(self.positions.shape[1])

    @property
    def periodic(self) -> bool:
        return "box" in self.params

    # -- coordinates ---------------------------------------------------------
    def to_real(self, q: Array, params: Params) -> Array:
        return q * params["box"] if self.periodic else q

    def to_solver(self, x: Array, params: Params) -> Array:
        return jnp.mod(x / params["box"], 1.0) if self.periodic else x

    def volume(self, params: Params) -> Array:
        return jnp.prod(params["box"])

    # -- energy ----------------------------------------------------------------
    def pair_vectors(self, q: Array, params: Params, strain: Array | None = None) -> Array:
        """All-pairs real-space separations ``r_i − r_j`` (N, N, d), minimum image.

        ``strain`` (d, d), if given, deforms every separation affinely:
        ``r → (I + ε) r`` (used for stress and elastic moduli)."""
        dq = q[:, None, :] - q[None, :, :]
        if self.periodic:
            dq = dq - jnp.round(dq)
            dr = dq * params["box"]
        else:
            dr = dq
        if strain is not None:
            dr = dr @ (jnp.eye(self.dim, dtype=dr.dtype) + strain).T
        return dr

    def with_pairs(self, pairs: Array | None) -> "System":
        """This system with its energy summed over ``pairs`` only: a (2, M) int
        array of pairs ``(i, j)``, each unordered pair at most once, entries
        equal to N marking padding (jax-md's ``OrderedSparse`` neighbor-list
        ``idx``). Non-differentiable data; may be a tracer inside ``jit``."""
        return replace(self, pairs=pairs)

    def pair_list(self, q: Array, params: Params, strain: Array | None = None):
        """Separations of the enumerated pairs: ``(dr (M, d), i (M,), j (M,), valid (M,))``.

        ``dr = r_i − r_j`` with minimum image (and ``strain`` as in
        :meth:`pair_vectors`); ``valid`` is False on neighbor-list padding,
        whose indices are clamped to 0 so that every entry stays finite."""
        if self.pairs is None:
            # Kept as the (N, N) difference then indexed, exactly as before: a
            # different round-off would send FIRE to another minimum (DESIGN §6).
            i, j = np.triu_indices(self.n, k=1)
            dr = self.pair_vectors(q, params, strain)[i, j]
            return dr, jnp.asarray(i), jnp.asarray(j), jnp.ones(i.shape, bool)
        else:
            pairs = jnp.asarray(self.pairs)
            valid = (pairs[0] < self.n) & (pairs[1] < self.n)
            i, j = jnp.where(valid, pairs[0], 0), jnp.where(valid, pairs[1], 0)
        dq = q[i] - q[j]
        if self.periodic:
            dq = dq - jnp.round(dq)
            dr = dq * params["box"]
        else:
            dr = dq
        if strain is not None:
            dr = dr @ (jnp.eye(self.dim, dtype=dr.dtype) + strain).T
        return dr, i, j, valid

    def _pairs(self, q: Array, params: Params, strain: Array | None):
        dr, i, j, valid = self.pair_list(q, params, strain)
        d2 = jnp.sum(dr**2, axis=-1)
        # Coincident particles would make grad(sqrt) NaN; they never occur in a
        # packing, and the guard keeps one bad input from poisoning everything
        # (padding pairs (0, 0) of a neighbor list land here too).
        r = jnp.sqrt(jnp.where(d2 > 0, d2, 1.0))
        return r, i, j, valid

    def energy(self, q: Array, params: Params, strain: Array | None = None) -> Array:
        """Total energy ``E(q, θ) = Σ_{i<j} φ(r_ij)`` in solver coordinates."""
        r, i, j, valid = self._pairs(q, params, strain)
        return jnp.sum(jnp.where(valid, self.pair(r, i, j, params), 0.0))

    def energy_real(self, x: Array, params: Params) -> Array:
        """Energy as a function of real-space positions (what the minimizer sees)."""
        q = x / params["box"] if self.periodic else x
        return self.energy(q, params)

    def contacts(self, q: Array, params: Params) -> Array:
        """(N, N) bool contact matrix (symmetric, empty diagonal)."""
        n = self.n
        if self.contact is None:
            return jnp.zeros((n, n), bool)
        c, i, j = self.contact_list(q, params)
        m = jnp.zeros((n, n), bool).at[i, j].max(c)
        return m | m.T

    def contact_list(self, q: Array, params: Params) -> tuple[Array, Array, Array]:
        """Contacts per enumerated pair, O(M) memory: ``(c (M,) bool, i, j)``."""
        r, i, j, valid = self._pairs(q, params, None)
        if self.contact is None:
            return jnp.zeros(r.shape, bool), i, j
        return valid & self.contact(r, i, j, params), i, j
