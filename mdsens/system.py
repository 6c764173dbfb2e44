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
see docs/design.md, "Pitfalls we measured".)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Hashable, Mapping

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
    specialize: names of scalar parameters whose value picks the code path of
        ``pair`` (the soft-sphere exponent α: 2 and 5/2 have closed forms). The
        relaxation compiles its loop for each value, with the value as a
        constant (:mod:`mdsens.relax`): one fused force instead of a run-time
        branch per evaluation (N = 1024: 30% less compile time).
        Derivatives still treat them as parameters.
    radius: None, or ``radius(params) -> (N,)``: per-particle interaction
        radii, every pair's energy being zero beyond ``radius_i + radius_j``
        (at most ``cutoff``): soft spheres, D/2. The relaxation's neighbor
        table then lists each pair within its own range plus the skin, as
        LAMMPS does per type pair, instead of within the largest cutoff
        (bidisperse 1 : 1.4 at N = 16384 near its minimum: 8 % fewer pairs in
        2D, 21 % in 3D).
    held: None (every pair counts), or an (N,) bool mask: the energy and
        everything built on it sum only over pairs of two held particles
        (:meth:`held_only`, what every derivative at x* uses). Data, like
        ``pairs``, not part of the model.
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
    specialize: tuple[str, ...] = ()
    radius: Callable[[Params], Array] | None = None
    held: Array | None = None

    @functools.cached_property
    def model(self) -> "Model":
        """The static part: what a compiled function may depend on (:class:`Model`)."""
        extra = tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name not in _SYSTEM_FIELDS)
        spec = tuple((k, tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in self.params.items())
        return Model(type(self), self.name, (self.n, self.dim), np.asarray(self.species), self.pair, self.cutoff,
                     self.contact, tuple(self.specialize), spec, extra, self.radius)

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

    def to_real_on_host(self, q: Any, params: Params) -> np.ndarray:
        """:meth:`to_real` in NumPy, for concrete arrays (the same products; no
        compiled program per new shape). :meth:`to_solver` has no such twin:
        XLA:CPU divides by the box as a product with its reciprocal, which
        NumPy's division does not reproduce bit for bit."""
        q = np.asarray(q)
        return q * np.asarray(params["box"]) if self.periodic else q

    def volume(self, params: Params) -> Array:
        return jnp.prod(params["box"])

    # -- energy ----------------------------------------------------------------
    def pair_vectors(self, q: Array, params: Params, strain: Array | None = None) -> Array:
        """All-pairs real-space separations ``r_i − r_j`` (N, N, d), minimum image.

        ``strain`` (d, d), if given, deforms every separation affinely:
        ``r → (I + ε) r`` (used for stress and elastic moduli)."""
        return self.separation(q[:, None, :] - q[None, :, :], params, strain)

    def separation(self, dq: Array, params: Params, strain: Array | None = None) -> Array:
        """Real-space separation of solver-coordinate differences ``dq`` (…, d):
        minimum image and times the box if periodic, then ``(I + strain)``."""
        dr = (dq - jnp.round(dq)) * params["box"] if self.periodic else dq
        if strain is not None:
            dr = dr @ (jnp.eye(self.dim, dtype=dr.dtype) + strain).T
        return dr

    def with_pairs(self, pairs: Array | None) -> "System":
        """This system with its energy summed over ``pairs`` only: a (2, M) int
        array of pairs ``(i, j)``, each unordered pair at most once, entries
        equal to N marking padding (jax-md's ``OrderedSparse`` neighbor-list
        ``idx``). Non-differentiable data; may be a tracer inside ``jit``."""
        return replace(self, pairs=pairs)

    def held_only(self, rattler: Array | None) -> "System":
        """This system with every pair that has a rattler end left out (``rattler``
        (N,) bool; None: unchanged). What the derivatives at x* differentiate: a
        rattler is free in its cage, so a contact it happens to touch at x*
        (FIRE leaves it pressed against a neighbour with an overlap of ~ftol/k)
        carries no load and gives no stiffness; summed in, it would pin the
        rattler and act on its held neighbour as a spring to a fixed point.
        Re-relaxed finite differences see the rattler move away instead.
        Its energy at x* is O(ftol²), so values do not change."""
        return self if rattler is None else replace(self, held=~jnp.asarray(rattler, bool))

    def pair_list(self, q: Array, params: Params, strain: Array | None = None):
        """Separations of the enumerated pairs: ``(dr (M, d), i (M,), j (M,), valid (M,))``.

        ``dr = r_i − r_j`` with minimum image (and ``strain`` as in
        :meth:`pair_vectors`); ``valid`` is False on neighbor-list padding,
        whose indices are clamped to 0 so that every entry stays finite, and,
        with :attr:`held`, on pairs with a particle that is not held."""
        if self.pairs is None:
            # Kept as the (N, N) difference then indexed, exactly as before: a
            # different round-off would send FIRE to another minimum (docs/design.md, "Pitfalls we measured").
            i, j = np.triu_indices(self.n, k=1)
            dr = self.pair_vectors(q, params, strain)[i, j]
            i, j, valid = jnp.asarray(i), jnp.asarray(j), jnp.ones(i.shape, bool)
        else:
            pairs = jnp.asarray(self.pairs)
            valid = (pairs[0] < self.n) & (pairs[1] < self.n)
            i, j = jnp.where(valid, pairs[0], 0), jnp.where(valid, pairs[1], 0)
            dr = self.separation(q[i] - q[j], params, strain)
        if self.held is not None:
            held = jnp.asarray(self.held, bool)
            valid = valid & held[i] & held[j]
        return dr, i, j, valid

    def _pairs(self, q: Array, params: Params, strain: Array | None):
        dr, i, j, valid = self.pair_list(q, params, strain)
        d2 = jnp.sum(dr**2, axis=-1)
        # Coincident particles would make grad(sqrt) NaN; they never occur in a
        # packing, and the guard keeps one bad input from poisoning everything
        # (padding pairs (0, 0) of a neighbor list land here too). NaN positions
        # (a failed relaxation, see sensitivity.equilibrium) stay NaN.
        r = jnp.sqrt(jnp.where(d2 == 0, 1.0, d2))
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

    # -- Hessian -----------------------------------------------------------------
    def pair_hessians(self, q: Array, params: Params) -> tuple[Array, Array, Array]:
        """Per enumerated pair, the solver-coordinate block ``L K_ij L`` (M, d, d)
        with ``K_ij = ∂²φ(|r|)/∂r²`` at ``r = r_i − r_j``, and the indices i, j:

            H = Σ_pairs (e_i − e_j)(e_i − e_j)ᵀ ⊗ L K_ij L,   L = diag(box) (I in free space).

        Differentiable in ``q`` and ``params`` (third derivatives of φ), so a
        solve built on it can itself be differentiated."""
        dr, i, j, valid = self.pair_list(q, params)

        def pair_energy(r_vec: Array, a: Array, b: Array) -> Array:
            d2 = jnp.sum(r_vec**2)
            return self.pair(jnp.sqrt(jnp.where(d2 == 0, 1.0, d2)), a, b, params)

        k = jax.vmap(jax.hessian(pair_energy))(dr, i, j)
        k = jnp.where(valid[:, None, None], k, 0.0)
        if self.periodic:
            box = params["box"]
            k = k * box[None, :, None] * box[None, None, :]
        return k, i, j

    def hessian_vp(self, q: Array, params: Params) -> Callable[[Array], Array]:
        """``v ↦ ∇²_q E(q, θ) v`` from the pair blocks, assembled once.

        Equal to ``jvp(grad E)`` (the same sum of pair terms) but each product
        is a gather, a d×d product and a scatter per pair instead of a full
        forward-and-tangent pass through the potential: measured 4–10× cheaper
        per product, which is what makes a derivative cheap next to the
        relaxation. Memory O(M d²) for M enumerated pairs."""
        k, i, j = self.pair_hessians(q, params)

        def matvec(v: Array) -> Array:
            f = jnp.einsum("mab,mb->ma", k, v[i] - v[j])
            return jnp.zeros_like(v).at[i].add(f).at[j].add(-f)

        return matvec

    def interacting_pairs(self, q: Array, params: Params, margin: float = 0.0, block: int = 1024) -> np.ndarray:
        """(2, M) int array of the pairs ``i < j`` closer than ``cutoff(θ) + margin``
        at ``q`` (minimum image), found in NumPy in row blocks: O(N²) time,
        O(N · block) memory. Every pair beyond contributes exactly zero to E and
        its derivatives at ``q``, so ``with_pairs(interacting_pairs(q, θ))``
        differentiates exactly like all pairs, at the cost of the interacting
        ones only. An infinite cutoff returns every pair."""
        n = self.n
        reach = float(self.cutoff(params)) + margin
        if not np.isfinite(reach):
            return np.stack(np.triu_indices(n, k=1)).astype(np.int32)
        qn = np.asarray(q)
        box = np.asarray(params["box"]) if self.periodic else None
        if n > block and (box is None or reach < 0.5 * float(np.min(box))):
            # a k-d tree (minimum image where periodic): O(N log N), not O(N²) blocks of
            # N·block separations (N = 16384: 5 s and gigabytes of page faults a call);
            # the same pairs, in the same order (i, then j)
            from scipy.spatial import cKDTree

            x = np.mod(qn, 1.0) * box if box is not None else qn
            if box is not None:
                x = np.where(x >= box, 0.0, x)  # mod can round up to the side itself
            found = cKDTree(x, boxsize=box).query_pairs(reach, output_type="ndarray")
            a, b = np.minimum(found[:, 0], found[:, 1]), np.maximum(found[:, 0], found[:, 1])
            order = np.lexsort((b, a))
            return np.stack([a[order], b[order]]).astype(np.int32)
        found = []
        for start in range(0, n, block):
            dq = qn[start:start + block, None, :] - qn[None, :, :]
            if box is not None:
                dq = (dq - np.round(dq)) * box
            near = np.sum(dq**2, axis=-1) < reach**2
            a, b = np.nonzero(near)
            a = a + start
            keep = a < b
            found.append(np.stack([a[keep], b[keep]]))
        return np.concatenate(found, axis=1).astype(np.int32)


_SYSTEM_FIELDS = frozenset(f.name for f in fields(System))


@dataclass(frozen=True, eq=False)
class Model:
    """The static part of a :class:`System`, apart from the state (positions)
    and θ (the parameter values): the class (and a subclass's own fields, e.g.
    the fixed-pressure ``box_dof``), name, N and d, species, the pair energy,
    cutoff and contact rule, ``specialize``, the names, shapes and dtypes
    of θ, and the interaction radii. Hashable and compared by value — functions structurally (same code,
    equal closure values: :func:`structure`), arrays elementwise — so two
    builds of one configuration with different seeds or parameter values are
    one model: a jit static argument and the key of compiled programs
    (:mod:`mdsens.cache`). ``system(positions, params)`` builds a System of
    this model; ``template`` is one whose positions and θ are NaN, for code
    that needs the model only (it takes θ and the state as arguments), so a
    compiled program never holds one run's numbers."""

    kind: type
    name: str
    shape: tuple[int, int]
    species: np.ndarray
    pair: PairFn
    cutoff: Callable[[Params], Array]
    contact: PairFn | None
    specialize: tuple[str, ...]
    spec: tuple[tuple[str, tuple[int, ...], str], ...]
    extra: tuple[tuple[str, Any], ...] = ()
    radius: Callable[[Params], Array] | None = None

    @functools.cached_property
    def key(self) -> Hashable:
        return (self.kind, self.name, self.shape, structure(self.species), structure(self.pair),
                structure(self.cutoff), structure(self.contact), self.specialize, self.spec, structure(self.extra),
                structure(self.radius))

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Model) and self.key == other.key)

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def n(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    @property
    def periodic(self) -> bool:
        return any(k == "box" for k, _, _ in self.spec)

    def system(self, positions: Any, params: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> System:
        """A System of this model at real-space ``positions`` (N, d) and θ ``params``."""
        return self.kind(name=self.name, positions=np.asarray(positions), species=self.species, params=dict(params),
                         pair=self.pair, cutoff=self.cutoff, contact=self.contact, config=dict(config or {}),
                         specialize=self.specialize, radius=self.radius, **dict(self.extra))

    @functools.cached_property
    def template(self) -> System:
        # NumPy, not jax arrays: the template may first be made while tracing.
        params = {k: np.full(shape, np.nan, dtype) for k, shape, dtype in self.spec}
        return self.system(np.full(self.shape, np.nan), params)


def structure(value: Any, depth: int = 0) -> Hashable:
    """A hashable key equal for structurally equal values: a function by its
    code, defaults and closure values (recursively), an array by shape, dtype
    and bytes, containers by their items; ``soft_sphere_pair(species)`` of two
    builds with equal species give equal keys, Lennard-Jones pairs of
    different onsets do not. Anything else by its own hash, or its identity."""
    if depth > 8:
        return ("id", id(value))
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, type)):
        return value
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        a = np.asarray(value)
        return ("array", a.shape, a.dtype.str, a.tobytes())
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(structure(v, depth + 1) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, structure(v, depth + 1)) for k, v in value.items()))
    if isinstance(value, functools.partial):
        return ("partial", structure(value.func, depth + 1), structure(value.args, depth + 1),
                structure(value.keywords, depth + 1))
    code = getattr(value, "__code__", None)
    if code is not None:
        cells = tuple(_cell(c, depth + 1) for c in value.__closure__ or ())
        return ("function", code, structure(value.__defaults__, depth + 1), cells)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def _cell(cell: Any, depth: int) -> Hashable:
    try:
        return structure(cell.cell_contents, depth)
    except ValueError:  # an empty cell (a function that refers to itself before it is bound)
        return ("id", id(cell))


def pair_bucket(m: int) -> int:
    """The width :func:`pad_pairs` pads ``m`` pairs to by default."""
    step = max(1, 1 << max(0, m.bit_length() - 4))
    return max(8, -(-m // step) * step)


def pad_pairs(pairs: Any, n: int, width: int | None = None) -> Array:
    """(2, M) pairs padded with N (:meth:`System.with_pairs`) to ``width``
    columns, by default the next of 8 steps per octave (at most 12.5 % more):
    a compiled function taking pairs as data then serves every M in a bucket."""
    pairs = np.asarray(pairs)
    m = pairs.shape[1]
    if width is None:
        width = pair_bucket(m)
    out = np.full((2, max(width, m)), n, np.int32)
    out[:, :m] = pairs
    return jnp.asarray(out)
