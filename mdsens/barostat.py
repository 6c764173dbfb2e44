"""Packings at fixed pressure: the box as a degree of freedom, and the
derivatives of that equilibrium.

At a target pressure P the state is the pair (q, U): fractional positions q
(N, d) in the *reference* box ``L₀ = θ["box"]`` and a symmetric log-strain U
(d, d) of that box, as in ASE's ``FrechetCellFilter``. The deformation is
``F = exp(U)`` and the periodic cell has the edge vectors ``a_k = L₀ₖ F e_k``;
a separation is ``r = F (L₀ ⊙ (Δq − round Δq))``. Which U are allowed is
``box_dof``:

- ``iso``: ``U = s I`` (one scale), ``aniso``: ``U = diag(s)`` (each side),
- ``shear``: any symmetric U (``d(d+1)/2`` values): the full cell up to a
  rotation, so the stress-free ("shear-stabilised") packings.

The relaxed state minimises the enthalpy

    H(q, U; θ) = E(q, U; θ) + P V(U),   V = V₀ exp(tr U),

so the root condition is ``∇_(q,u) H = 0`` (u the box-dof coordinates of U).
Its Jacobian is the Hessian of H, symmetric, so the implicit function
theorem of :mod:`mdsens.implicit` applies to the root variable, the pytree
``z = (q, u)`` (:func:`state`); the gauge removes the translations (and the
rattlers) from q only (:func:`mdsens.gauge.on`), and the Hessian product is
assembled (:func:`hessian_vp`: the pair blocks on q, the strain blocks from k
jvps taken once). The flat vector ``(q.ravel(), u)`` (:func:`pack`) remains
for the dense Newton polish and the design loop. The target pressure is an ordinary
parameter ``θ["pressure"]``: ``dφ/dP`` is a forward derivative like any other.

Convergence: ``max_i |F_i| < ftol`` (real-space forces) and every relaxed
stress component within ``ftol / ℓ^(d−1)`` of −P, ``ℓ = (V/N)^(1/d)`` the mean
spacing: the stress residual ``σ + P I`` (iso: its trace part; aniso: its
diagonal; shear: all of it) times ``ℓ^(d−1)`` is a force, the imbalance on a
typical particle's face, held to the same ``ftol`` as the particles.

The relaxed U lives in ``θ["strain"]`` of a :class:`CellSystem`, so every
observable ``O(system, q, θ)`` (energy, pressure, stress, contacts, moduli)
sees the relaxed cell; :func:`forward_fn` and :func:`gradient_fn` treat it as
state, not as a parameter.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mdsens import gauge as _gauge
from mdsens import driver, implicit, linsolve, minimize
from mdsens.job import Result
from mdsens.system import Model, Params, System, pad_pairs

Array = jax.Array
Observable = Callable[[System, Array, Params], Array]

BOX_DOF = ("iso", "aniso", "shear")
DEFAULT_SKIN = 0.3


# -- the cell ---------------------------------------------------------------------


def strain_basis(dim: int, box_dof: str) -> np.ndarray:
    """The box-dof basis ``B`` (k, d, d) with ``U = Σ_k u_k B_k``: iso ``[I]``,
    aniso ``e_a e_aᵀ``, shear ``e_a e_bᵀ + e_b e_aᵀ`` (``e_a e_aᵀ`` on the
    diagonal) for ``a ≤ b``. Mutually orthogonal (Frobenius)."""
    if box_dof == "iso":
        return np.eye(dim)[None]
    if box_dof == "aniso":
        return np.stack([np.diag(np.eye(dim)[a]) for a in range(dim)])
    if box_dof == "shear":
        out = []
        for a in range(dim):
            for b in range(a, dim):
                m = np.zeros((dim, dim))
                m[a, b] = m[b, a] = 1.0
                out.append(m)
        return np.stack(out)
    raise ValueError(f"box_dof {box_dof!r}: choose {', '.join(BOX_DOF)}")


@jax.jit  # compiled once per shape: called eagerly too (a fresh loop body would recompile at each call)
def _expm(u: Array) -> Array:
    """``exp(U)`` of a small matrix by scaling and squaring a Taylor series:
    plain products, differentiable to any order (no branch on the norm).
    ``U/16`` and 12 terms: truncation below 1e-17 for ``|U| < 4`` (a box
    stretched e⁴-fold)."""
    def mm(a, b):  # a tiny dot_general is several times slower on XLA:CPU
        return jnp.sum(a[:, :, None] * b[None, :, :], axis=1)

    a = u / 16.0

    def add_term(k, carry):
        out, term = carry
        term = mm(term, a) / k.astype(u.dtype)
        return out + term, term

    # Loops, not 16 unrolled products: the same arithmetic, and the several
    # exp(U) of a relaxation step no longer multiply the compiled program (a
    # shear relaxation's chunk at N = 24: 2925 → 1962 StableHLO lines, 9.7 →
    # 7.8 s of compilation on the loaded 2-core machine; the same 828 steps).
    eye = jnp.eye(u.shape[0], dtype=u.dtype)
    out, _ = jax.lax.fori_loop(1, 13, add_term, (eye, eye))
    return jax.lax.fori_loop(0, 4, lambda _, m: mm(m, m), out)


def deformation(strain: Array, box_dof: str) -> Array:
    """``F = exp(U)`` (d, d); exactly ``diag(exp(diag U))`` for iso and aniso."""
    if box_dof in ("iso", "aniso"):
        return jnp.diag(jnp.exp(jnp.diagonal(strain)))
    return _expm(strain)


@dataclass(frozen=True, eq=False)
class CellSystem(System):
    """A periodic :class:`System` whose cell is ``F = exp(θ["strain"])`` applied to
    the reference box ``θ["box"]`` (module docstring); ``θ["pressure"]`` is the
    target pressure. Every pair separation, the volume, the real-space
    coordinates and the pair Hessian blocks follow the deformed cell."""

    box_dof: str = "iso"

    def deformation(self, params: Params) -> Array:
        return deformation(params["strain"], self.box_dof)

    def cell(self, params: Params) -> Array:
        """(d, d) the cell's edge vectors as rows (H5MD's ``box/edges``)."""
        return (self.deformation(params) * params["box"][None, :]).T

    def separation(self, dq: Array, params: Params, strain: Array | None = None) -> Array:
        dr = ((dq - jnp.round(dq)) * params["box"]) @ self.deformation(params).T
        if strain is not None:
            dr = dr @ (jnp.eye(self.dim, dtype=dr.dtype) + strain).T
        return dr

    def volume(self, params: Params) -> Array:
        return jnp.prod(params["box"]) * jnp.exp(jnp.trace(params["strain"]))

    def to_real(self, q: Array, params: Params) -> Array:
        return (q * params["box"]) @ self.deformation(params).T

    def to_real_on_host(self, q: Any, params: Params) -> np.ndarray:
        """:meth:`to_real` in NumPy, the cell's deformation included (the parent's
        twin scales by the box only: a fixed-pressure file's positions were written
        without the deformation before this override)."""
        return (np.asarray(q) * np.asarray(params["box"])) @ np.asarray(self.deformation(params)).T

    def to_solver(self, x: Array, params: Params) -> Array:
        y = x @ jnp.linalg.inv(self.deformation(params)).T
        return jnp.mod(y / params["box"], 1.0)

    def energy_real(self, x: Array, params: Params) -> Array:
        return self.energy(x @ jnp.linalg.inv(self.deformation(params)).T / params["box"], params)

    def pair_hessians(self, q: Array, params: Params) -> tuple[Array, Array, Array]:
        """Blocks ``(F L)ᵀ K (F L)``: the parent's ``L K L`` (K taken at the
        deformed separation) conjugated by ``M = L⁻¹ F L``."""
        k, i, j = super().pair_hessians(q, params)
        box = params["box"]
        m = self.deformation(params) * box[None, :] / box[:, None]
        return jnp.einsum("ba,mbc,cd->mad", m, k, m), i, j

    def interacting_pairs(self, q: Array, params: Params, margin: float = 0.0, block: int = 1024) -> np.ndarray:
        return _pairs_numpy(self, np.asarray(q), params, float(self.cutoff(params)) + margin, block)


def _pairs_numpy(system: CellSystem, q: np.ndarray, params: Params, reach: float, block: int = 1024) -> np.ndarray:
    """(2, M) the pairs ``i < j`` closer than ``reach`` in the deformed cell (minimum image in q)."""
    n = system.n
    h = np.asarray(system.deformation(params)) * np.asarray(params["box"])[None, :]
    found = []
    for start in range(0, n, block):
        dq = q[start:start + block, None, :] - q[None, :, :]
        dr = (dq - np.round(dq)) @ h.T
        a, b = np.nonzero(np.sum(dr**2, axis=-1) < reach**2)
        a = a + start
        keep = a < b
        found.append(np.stack([a[keep], b[keep]]))
    return np.concatenate(found, axis=1).astype(np.int32)


def at_pressure(system: System, pressure: float, box_dof: str = "iso") -> CellSystem:
    """``system`` (periodic) with the box as a degree of freedom at target pressure
    ``pressure``: adds the parameters ``pressure`` () and ``strain`` (d, d) = 0."""
    from mdsens.observables import require_box

    require_box(system, "fixed pressure")
    strain_basis(system.dim, box_dof)  # validates box_dof
    values = {f.name: getattr(system, f.name) for f in fields(System)}
    dtype = jnp.result_type(float)
    values["params"] = {**system.params, "pressure": jnp.asarray(float(pressure), dtype),
                        "strain": jnp.zeros((system.dim, system.dim), dtype)}
    values["config"] = {**system.config, "pressure": pressure, "box_dof": box_dof}
    return CellSystem(**values, box_dof=box_dof)


def is_fixed_pressure(system: System) -> bool:
    return isinstance(system, CellSystem)


def ensemble(system: System) -> str:
    """The ensemble in words, for the file and ``mdsens show``."""
    if isinstance(system, CellSystem):
        return f"fixed pressure, box_dof={system.box_dof}"
    return "fixed box" if system.periodic else "free space"


# -- state vector -------------------------------------------------------------------


def split(params: Params) -> tuple[dict[str, Array], Array]:
    """``(θ, U)``: the parameters without the (relaxed, state) ``strain``, and U."""
    return {k: v for k, v in params.items() if k != "strain"}, params["strain"]


def coordinates(system: CellSystem, strain: Array) -> Array:
    """The box-dof coordinates u (k,) of a log-strain U in :func:`strain_basis`."""
    basis = jnp.asarray(strain_basis(system.dim, system.box_dof), strain.dtype)
    return jnp.tensordot(basis, strain, axes=([1, 2], [0, 1])) / jnp.sum(basis**2, axis=(1, 2))


def state(system: CellSystem, q: Array, params: Params) -> tuple[Array, Array]:
    """``z = (q, u)``, the root variable of the derivatives: positions (N, d)
    and box-dof coordinates (k,), a pytree."""
    return q, coordinates(system, params["strain"])


def pack(system: CellSystem, q: Array, params: Params) -> Array:
    """``z = (q.ravel(), u)``, the root variable as one flat vector (the dense
    Newton polish, the design loop)."""
    return jnp.concatenate([q.ravel(), coordinates(system, params["strain"])])


def unpack(system: CellSystem, z: Array | tuple[Array, Array], theta: Params) -> tuple[Array, dict[str, Array]]:
    """``(q, params)`` from ``z`` (the pair ``(q, u)`` or the flat vector) and
    θ (params = θ plus the strain of z)."""
    n, d = system.n, system.dim
    if isinstance(z, tuple):
        q, u = z
    else:
        q, u = z[:n * d].reshape(n, d), z[n * d:]
    basis = jnp.asarray(strain_basis(d, system.box_dof), u.dtype)
    strain = jnp.tensordot(u, basis, axes=1)
    return q, {**theta, "strain": strain}


def enthalpy(system: CellSystem) -> Callable[[Array, Params], Array]:
    """``H(z, θ) = E + P V`` over the root variable z (pair or flat)."""

    def fn(z: Array, theta: Params) -> Array:
        q, params = unpack(system, z, theta)
        return system.energy(q, params) + theta["pressure"] * system.volume(params)

    return fn


def optimality(system: CellSystem) -> Callable[[Array, Params], Array]:
    """The root function ``∇_z H(z, θ)`` (shaped like z)."""
    return jax.grad(enthalpy(system))


def gauge_for(system: CellSystem, rattler: Array) -> implicit.Gauge:
    """Translations and rattlers removed from the q part of z; the box dofs kept.
    The projector takes z as the pair ``(q, u)`` or as the flat vector."""
    n, d = system.n, system.dim
    translations = _gauge.translations(rattler)
    on_pair = _gauge.on(0, translations)

    def project(z):
        if isinstance(z, tuple):
            return on_pair(z)
        return jnp.concatenate([translations(z[:n * d].reshape(n, d)).ravel(), z[n * d:]])

    return lambda z, theta: project


def strain_columns(system: CellSystem, z: tuple[Array, Array], theta: Params) -> tuple[Array, Array]:
    """The Hessian of H along the box dofs, ``∂(∇_z H)/∂u_k`` for each of the k
    box dofs at ``z = (q, u)``: ``(H_qu (k, N, d), H_uu (k, k))``. k jvps of
    ``∇_z H`` (k ≤ d(d+1)/2), differentiable in z and θ."""
    root_fn = optimality(system)
    q, u = z
    units = jnp.eye(u.size, dtype=u.dtype)
    return jax.vmap(lambda e: jax.jvp(lambda u_: root_fn((q, u_), theta), (u,), (e,))[1])(units)


def hessian_vp(system: CellSystem) -> implicit.HVP:
    """``(z, θ) -> (v ↦ ∇²_z H v)`` for ``z = (q, u)``, assembled: the qq block
    by the pair blocks of :meth:`CellSystem.pair_hessians` (``System.hessian_vp``
    at the relaxed cell; ``P V`` does not depend on q), the qu, uq and uu
    blocks from :func:`strain_columns`, taken once per operator (uq as the
    transpose of qu, uu symmetrised, so the product is exactly symmetric).
    Equal to ``jvp(∇_z H)`` (tested); per product it costs the fixed-box
    assembled product plus O(N d k)."""

    def hvp(z: tuple[Array, Array], theta: Params) -> Callable[[tuple[Array, Array]], tuple[Array, Array]]:
        q, params = unpack(system, z, theta)
        qq = system.hessian_vp(q, params)
        qu, uu = strain_columns(system, z, theta)
        uu = 0.5 * (uu + uu.T)

        def matvec(v: tuple[Array, Array]) -> tuple[Array, Array]:
            vq, vu = v
            return (qq(vq) + jnp.tensordot(vu, qu, axes=1),
                    jnp.tensordot(qu, vq, axes=([1, 2], [0, 1])) + uu @ vu)

        return matvec

    return hvp


def custom_root(system: CellSystem, rattler: Array, solve: implicit.Solve | None = None,
                solve_at: Callable | None = None) -> Callable:
    """:func:`mdsens.implicit.custom_root` at fixed pressure: decorates any
    ``solver(z0, θ) -> z*`` over ``z = (q, u)`` (θ without the strain) with the
    root ``∇_z H``, the gauge :func:`gauge_for` and the assembled
    :func:`hessian_vp`. The energy is the held network's (``rattler``: :meth:`System.held_only`)."""
    system = system.held_only(rattler)
    return implicit.custom_root(optimality(system), solve=solve, gauge=gauge_for(system, rattler),
                                hvp=hessian_vp(system), solve_at=solve_at)


def stress_residual(system: CellSystem, q: Array, params: Params) -> Array:
    """The scaled stress residual ``max |(σ + P I)_relaxed| ℓ^(d−1)`` (a force;
    module docstring): the components the box dofs relax."""
    d = system.dim
    zero = jnp.zeros((d, d), jnp.result_type(q))
    volume = system.volume(params)
    sigma = jax.grad(lambda e: system.energy(q, params, strain=e))(zero) / volume
    return _residual(system, sigma + params["pressure"] * jnp.eye(d, dtype=q.dtype), volume)


def _residual(system: CellSystem, r: Array, volume: Array) -> Array:
    d = system.dim
    if system.box_dof == "iso":
        worst = jnp.abs(jnp.trace(r)) / d
    elif system.box_dof == "aniso":
        worst = jnp.max(jnp.abs(jnp.diagonal(r)))
    else:
        worst = jnp.max(jnp.abs(0.5 * (r + r.T)))
    return worst * (volume / system.n) ** ((d - 1) / d)


# -- relaxation: FIRE / gradient descent on the enthalpy -----------------------------


class Relaxed(NamedTuple):
    """``q`` (N, d) fractional; ``params`` with the relaxed ``strain``; ``info``
    (steps, max|F|, E, converged); ``stress_residual`` (the scaled residual,
    a force); ``pairs`` (2, M) every pair closer than the cutoff at the end
    (for the derivatives); ``compile_s``; ``rebuilds`` of the table."""

    q: Array
    params: dict[str, Array]
    info: minimize.RelaxInfo
    stress_residual: float
    pairs: np.ndarray
    compile_s: float
    rebuilds: int


#: the fixed-pressure programs, per model (:attr:`System.model`): a new build
#: of the same model (another seed, θ or start) shares them; least recently
#: used dropped first
_PROGRAMS: "OrderedDict[Model, dict]" = OrderedDict()
PROGRAM_LIMIT = 16


def _model_cache(system: CellSystem) -> tuple[dict, CellSystem]:
    """The program cache of ``system``'s model, and the model's template (what
    the programs close over: the model, no run's numbers)."""
    model = system.model
    cache = _PROGRAMS.get(model)
    if cache is None:
        cache = _PROGRAMS[model] = {}
        while len(_PROGRAMS) > PROGRAM_LIMIT:
            _PROGRAMS.popitem(last=False)
    else:
        _PROGRAMS.move_to_end(model)
    return cache, model.template


def programs_of(system: CellSystem) -> int:
    """How many program sets the fixed-pressure cache holds for ``system``'s model."""
    return len(_PROGRAMS.get(system.model, {}))


def _programs(system: CellSystem, method: str, ftol: float, skin: float, capacity: int):
    """The compiled pieces for one model, minimizer, tolerance, skin and pair
    capacity (cached: a re-relaxation at other parameters, or of another
    build of the model, compiles nothing)."""
    cache, system = _model_cache(system)
    key = (method, float(ftol), float(skin), int(capacity))
    if key in cache:
        return cache[key]
    n, d = system.n, system.dim
    basis_np = strain_basis(d, system.box_dof)
    norms = jnp.asarray(np.sum(basis_np**2, axis=(1, 2)))
    off_diagonal = jnp.asarray(~np.eye(n, dtype=bool))

    def scale(theta):  # the cell variable w = c u, c = √N ℓ₀ (module docstring)
        return math.sqrt(n) * (jnp.prod(theta["box"]) / n) ** (1.0 / d)

    def unpack_x(x, theta):
        box = theta["box"]
        q = x[:n * d].reshape(n, d) / box
        basis = jnp.asarray(basis_np, x.dtype)
        strain = jnp.tensordot(x[n * d:] / scale(theta), basis, axes=1)
        return q, {**theta, "strain": strain}

    rows = jnp.arange(n)[:, None]
    diagonal = system.box_dof in ("iso", "aniso")

    def apply(v, f):
        """``v @ fᵀ`` over the last axis as a broadcast multiply-and-sum (a tiny
        dot_general is several times slower on XLA:CPU; docs/design.md)."""
        if diagonal:
            return v * jnp.diagonal(f)
        return jnp.sum(v[..., None, :] * f, axis=-1)

    def force_fn(x, env):
        """Gather-only, as relax.py's table force: each pair is in both rows of the
        table ``idx`` (N, K); real-space forces f_x = −Σ_k φ'(r) r̂ and the virial
        ∂E/∂ε = ½ Σ_ik φ'(r)/r r ⊗ r come from the same terms, no scatter."""
        theta, idx = env
        q, params = unpack_x(x, theta)
        f = system.deformation(params)
        valid_ = idx < n
        j = jnp.where(valid_, idx, rows)
        dq = q[:, None, :] - q[j]
        dr = apply((dq - jnp.round(dq)) * theta["box"], f)
        r2 = jnp.sum(dr * dr, axis=-1)
        r = jnp.sqrt(jnp.where(r2 > 0, r2, 1.0))
        dphi = jax.grad(lambda r_: jnp.sum(system.pair(r_, rows, j, params)))(r)
        terms = jnp.where(valid_ & (r2 > 0), dphi / r, 0.0)[..., None] * dr
        f_x = -jnp.sum(terms, axis=1)
        virial = 0.5 * jnp.sum(terms[..., :, None] * dr[..., None, :], axis=(0, 1))
        volume = system.volume(params)
        res = virial / volume + theta["pressure"] * jnp.eye(d, dtype=x.dtype)
        # −V (σ + P I) : B_k, the "virial in log space": the exact gradient for
        # iso and aniso, a descent direction with the same zero for shear.
        f_u = -volume * jnp.tensordot(jnp.asarray(basis_np, x.dtype), res, axes=([1, 2], [0, 1]))
        return jnp.concatenate([apply(f_x, f.T).ravel(), f_u / scale(theta)])

    def shift(x, dx, env):
        box = env[0]["box"]
        y = minimize.fold(x[:n * d].reshape(n, d) + dx[:n * d].reshape(n, d), box)
        return jnp.concatenate([y.ravel(), x[n * d:] + dx[n * d:]])

    def measure(x, f, theta):
        """(max real |F_i|, scaled stress residual) from the state's force."""
        q, params = unpack_x(x, theta)
        inverse = jnp.linalg.inv(system.deformation(params))
        real = apply(f[:n * d].reshape(n, d), inverse.T)
        volume = system.volume(params)
        coeff = -f[n * d:] * scale(theta) / (volume * norms)
        worst = jnp.max(jnp.abs(coeff)) if system.box_dof != "iso" else jnp.abs(coeff[0])
        return minimize.max_force(real), worst * (volume / n) ** ((d - 1) / d)

    mini = minimize.make(method, shift, force_fn=force_fn)

    def near_fn(x, theta):
        q, params = unpack_x(x, theta)
        reach = system.cutoff(theta) + skin
        dq = q[:, None, :] - q[None, :, :]
        dr = apply((dq - jnp.round(dq)) * theta["box"], system.deformation(params))
        return (jnp.sum(dr**2, axis=-1) < reach**2) & off_diagonal, q, params

    def build(x, theta):
        """The table (N, K = capacity): each row's neighbors within cutoff + skin
        (O(N²) search, a sort of each row), padded with N; and the widest row."""
        near, q, params = near_fn(x, theta)
        count = jnp.max(jnp.sum(near, axis=1))
        idx = jnp.sort(jnp.where(near, jnp.arange(n)[None, :], n), axis=1)[:, :capacity]
        return idx.astype(jnp.int32), count, q, system.deformation(params)

    def valid(x, theta, ref_q, ref_f):
        """No pair outside the list can have come within the cutoff since its build:
        ``(c + skin) s_min(F F_ref⁻¹) − 2 max_i |F L₀ Δq_i| > c``."""
        q, params = unpack_x(x, theta)
        f = system.deformation(params)
        dq = q - ref_q
        moved = jnp.sqrt(jnp.max(jnp.sum(apply((dq - jnp.round(dq)) * theta["box"], f) ** 2, axis=-1)))
        a = f @ jnp.linalg.inv(ref_f)
        s_min = jnp.sqrt(jnp.maximum(jnp.min(jnp.linalg.eigvalsh(a.T @ a)), 0.0))
        c = system.cutoff(theta)
        return (c + skin) * s_min - 2.0 * moved > c

    def running(state, theta):
        fmax, smax = measure(state.x, state.force, theta)
        return ((fmax >= ftol) | (smax >= ftol)) & ~mini.stalled(state)

    def chunk(state, theta, until):
        def inner_cond(c):
            s, pairs, ref_q, ref_f, stale, overflow, rebuilds = c
            return running(s, theta) & (s.step < until) & valid(s.x, theta, ref_q, ref_f)

        def inner_body(c):
            s, pairs, *rest = c
            return (mini.step(s, (theta, pairs)), pairs, *rest)

        def outer_cond(c):
            s, pairs, ref_q, ref_f, stale, overflow, rebuilds = c
            return ~overflow & (stale | (running(s, theta) & (s.step < until)))

        def outer_body(c):
            s, _, _, _, _, _, rebuilds = c
            pairs, count, ref_q, ref_f = build(s.x, theta)
            overflow = count > capacity
            s = mini.step_force(s, (theta, pairs))
            c = jax.lax.while_loop(inner_cond, inner_body, (s, pairs, ref_q, ref_f, False, overflow, rebuilds + 1))
            s, pairs, ref_q, ref_f, _, overflow, rebuilds = c
            return (s, pairs, ref_q, ref_f, ~valid(s.x, theta, ref_q, ref_f), overflow, rebuilds)

        empty = jnp.full((n, capacity), n, jnp.int32)
        eye = jnp.eye(d, dtype=state.x.dtype)
        init = (state, empty, jnp.zeros((n, d), state.x.dtype), eye, jnp.asarray(True), jnp.asarray(False),
                jnp.zeros((), jnp.int32))
        s, pairs, _, _, _, overflow, rebuilds = jax.lax.while_loop(outer_cond, outer_body, init)
        fmax, smax = measure(s.x, s.force, theta)
        return s, overflow, rebuilds, fmax, smax

    def count_fn(x, theta):
        return jnp.max(jnp.sum(near_fn(x, theta)[0], axis=1))

    def table_energy(q, params, idx):
        from mdsens.ensemble import table_pairs

        return system.with_pairs(table_pairs(idx, n)).energy(q, params)

    energy = jax.jit(lambda q, params, pairs: system.with_pairs(pairs).energy(q, params))
    programs = {"mini": mini, "chunk": jax.jit(chunk), "count": jax.jit(count_fn), "scale": scale, "ran": False,
                "energy": energy,
                # relax_batch's, over a leading member axis
                "count_batch": jax.jit(jax.vmap(count_fn)), "energy_batch": jax.jit(jax.vmap(table_energy)),
                # the pieces, for the batched loop of relax_batch (vmapped there)
                "build": build, "valid": valid, "measure": measure, "running": running, "near": near_fn}
    cache[key] = programs
    return programs


#: the fixed-pressure table's grid, in the reference box, spans the listing
#: reach divided by a "stretch": a power of this number 5–15% below the
#: cell's smallest stretch (singular value of F) when the grid is made, so
#: the cell may shrink that much before a new grid (and compile) is needed.
GRID_MARGIN = 0.9


def _smallest_stretch(f: Array) -> Array:
    """The smallest singular value of the deformation ``f`` (d, d)."""
    return jnp.sqrt(jnp.maximum(jnp.min(jnp.linalg.eigvalsh(f.T @ f)), 0.0))


def _cell_programs(system: CellSystem, theta: Params, method: str, ftol: float, skin: float, stretch: float):
    """The fixed-pressure relaxation on a cell list and a pair list (the machinery
    of :mod:`mdsens.relax`), cached per system, minimizer, tolerance, skin,
    reference box, cutoff and grid stretch.

    The table is built over the reference-box coordinates ``y = L₀ ⊙ q`` on a
    grid whose cells span ``(c + skin) / stretch``; a pair is listed when its
    *deformed* separation ``F Δy`` is within ``c + skin`` (``c`` the cutoff
    ×1.01), which the grid finds as long as the cell's smallest stretch stays
    above ``stretch`` (else the chunk stops and :func:`relax` makes a new grid).
    Each pair's force is computed once (:func:`mdsens.relax.pair_list_force_fn`'s
    scheme) and gives the particles' forces and the virial together."""
    from mdsens import relax as _relax

    cutoff = float(system.cutoff(theta))
    box = tuple(np.asarray(theta["box"]).tolist())
    # The model's code-path parameters (the soft-sphere α) are constants of the
    # compiled loop, as in mdsens.relax (System.specialize).
    constants = {name: float(theta[name]) for name in system.specialize
                 if name in theta and np.ndim(theta[name]) == 0}
    key = ("cell-list", method, float(ftol), float(skin), box, tuple(sorted(constants.items())))
    model_cache, system = _model_cache(system)
    cache = model_cache.setdefault(key, [])
    for programs in cache:
        # A cached program serves a slightly smaller cutoff (a finite difference,
        # a design step) and a cell stretched a little more than its grid's.
        # A table without a grid (all pairs) finds every pair in any cell: it
        # serves every stretch.
        if cutoff <= programs["cutoff"] <= _relax.CUTOFF_SLACK**2 * cutoff and (
                programs["table"].grid is None or stretch * GRID_MARGIN <= programs["stretch"] <= stretch):
            return programs
    cutoff *= _relax.CUTOFF_SLACK
    # The cell variable's factor c = √N ℓ₀ is a constant of the program (the
    # reference box is part of the cache key).
    c_scale = float(_programs(system, method, ftol, skin, 1)["scale"](theta))

    def scale(theta):
        return c_scale
    n, d = system.n, system.dim
    reach = cutoff + skin
    table = _relax.Table(system, theta, skin=0.0, cutoff=reach / stretch, metric_reach=reach)
    basis_np = strain_basis(d, system.box_dof)
    diagonal = system.box_dof in ("iso", "aniso")

    def apply(v, f):
        if diagonal:
            return v * jnp.diagonal(f)
        return jnp.sum(v[..., None, :] * f, axis=-1)

    def unpack(x, theta):
        """``x = (y, w)``: reference-box positions (N, d) and the cell variable (k,)."""
        y, w = x
        strain = jnp.tensordot(w / scale(theta), jnp.asarray(basis_np, w.dtype), axes=1)
        return y, {**theta, "strain": strain}

    traces = jnp.asarray(np.trace(basis_np, axis1=1, axis2=2))
    pairs_ab = [(a, b) for a in range(d) for b in range(a, d)]

    def force_fn(x, env):
        """Real-space pair terms ``t = φ'(r) r̂`` once per pair, gathered back into
        each particle's force in table order (as
        :func:`mdsens.relax.pair_list_force_fn`), and the virial projections
        ``B_k : Σ t ⊗ r`` summed over the pair list.

        The cell enters through the pair coefficient, not through a deformed
        copy of the separations: for iso and aniso ``t = (c_p F) Δy_p`` with
        ``Δy`` the wrapped reference-box separation and ``c = φ'(r)/r``, so
        the separations stay the one array that the fixed-box force also
        keeps. Formed as ``F Δy`` (P, d), XLA:CPU recomputed the wrap of every
        separation inside the gather, once per table entry: the force cost
        1.9× the fixed box's at N = 1024 (bench/pressure/step_profile.py)."""
        theta, pairs = env
        y, params = unpack(x, theta)
        f = system.deformation(params)
        dy = y[pairs.i] - y[pairs.j]
        dy = dy - theta["box"] * jnp.round(dy / theta["box"])
        if system.box_dof == "iso":
            stretch_ = jnp.exp(x[1][0] / c_scale)  # F = e^u I (as deformation(): exp of U's diagonal)
            r2 = stretch_ * stretch_ * jnp.sum(dy * dy, axis=-1)
        elif system.box_dof == "aniso":
            stretch_ = jnp.exp(x[1] / c_scale)
            r2 = jnp.sum(dy * dy * (stretch_ * stretch_), axis=-1)
        else:
            dr = apply(dy, f)
            r2 = jnp.sum(dr * dr, axis=-1)
        r = jnp.sqrt(jnp.where(r2 > 0, r2, 1.0))
        mi, mj = pairs.model_pairs()
        dphi = jax.grad(lambda r_: jnp.sum(system.pair(r_, mi, mj, params)))(r)
        coeff = jnp.where(r2 > 0, dphi / r, 0.0)
        if system.box_dof == "iso":
            terms = (coeff * stretch_)[:, None] * dy
            projected = jnp.sum(coeff * r2)[None]
        elif system.box_dof == "aniso":
            terms = (coeff[:, None] * stretch_) * dy
            projected = jnp.sum(coeff[:, None] * (dy * dy), axis=0) * (stretch_ * stretch_)
        else:
            terms = coeff[:, None] * dr
            projected = jnp.stack([(1.0 if a == b else 2.0) * jnp.sum(terms[:, a] * dr[:, b])
                                   for a, b in pairs_ab])
        stacked = jnp.concatenate([terms, -terms, jnp.zeros((1, d), terms.dtype)])[pairs.gather]
        total = stacked[:, 0]
        for k in range(1, pairs.gather.shape[1]):
            total = total + stacked[:, k]
        volume = system.volume(params)
        f_u = -projected - volume * theta["pressure"] * traces
        return apply(-total, f.T), f_u / scale(theta)

    def shift(x, dx, env):
        return minimize.fold(x[0] + dx[0], env[0]["box"]), x[1] + dx[1]

    mini = minimize.make(method, shift, force_fn=force_fn)

    norms = jnp.asarray(np.sum(basis_np**2, axis=(1, 2)))

    def deform(x, theta):
        return system.deformation(unpack(x, theta)[1])

    def inverse(x, theta):
        """``F⁻¹ = exp(−U)``: no LAPACK call in the loop."""
        return system.deformation({"strain": -unpack(x, theta)[1]["strain"]})

    def measure(x, f, theta):
        """(max real |F_i|, scaled stress residual) from the state's force (as
        :func:`_programs`' ``measure``)."""
        _, params = unpack(x, theta)
        real = apply(f[0], inverse(x, theta).T)
        volume = system.volume(params)
        coeff = -f[1] * scale(theta) / (volume * norms)
        worst = jnp.max(jnp.abs(coeff)) if system.box_dof != "iso" else jnp.abs(coeff[0])
        return minimize.max_force(real), worst * (volume / n) ** ((d - 1) / d)

    def running(state, theta):
        fmax, smax = measure(state.x, state.force, theta)
        return ((fmax >= ftol) | (smax >= ftol)) & ~mini.stalled(state)

    def valid(x, theta, nb, ref_inverse):
        """No pair outside the list can have come within the cutoff since its
        build: ``(c + skin) s − (|F Δy_a| + |F Δy_b|) > c``, with ``a, b`` the
        two particles that moved most and ``s`` a lower bound on the smallest
        stretch of ``A = F F_ref⁻¹`` (exact for a diagonal cell, ``1 − |A − I|``
        otherwise): an unlisted pair was at least ``c + skin`` apart in the
        cell of the build."""
        y, _ = unpack(x, theta)
        f = deform(x, theta)
        dy = y - nb.reference
        moved = jnp.sum(apply(dy - theta["box"] * jnp.round(dy / theta["box"]), f) ** 2, axis=-1)
        first = jnp.max(moved)
        second = jnp.max(jnp.where(jnp.arange(n) == jnp.argmax(moved), 0.0, moved))
        a = jnp.sum(f[:, :, None] * ref_inverse[None, :, :], axis=1)
        if diagonal:
            least = jnp.min(jnp.diagonal(a))
        else:
            least = 1.0 - jnp.sqrt(jnp.sum((a - jnp.eye(d, dtype=a.dtype)) ** 2))
        return reach * least - jnp.sqrt(first) - jnp.sqrt(second) > system.cutoff(theta)

    def advance(state, nbrs, pairs, ref_f, theta, until, stale):
        """Steps until converged, ``until``, stalled, or the table overflows or
        its grid no longer spans the reach; returns ``(state, table, pairs,
        F⁻¹ at the build, rebuilds, regrid, max|F|, stress residual, stalled)``.
        Two loops as in :mod:`mdsens.relax`."""
        theta = {**theta, **constants}

        def go(s, nb, regrid):
            return running(s, theta) & (s.step < until) & ~nb.overflow & ~regrid

        def inner(c):
            def body(c):
                s, nb, pl, ref_f, _, rebuilds, regrid = c
                s = mini.step(s, (theta, pl))
                return s, nb, pl, ref_f, ~valid(s.x, theta, nb, ref_f), rebuilds, regrid

            return jax.lax.while_loop(lambda c: go(c[0], c[1], c[6]) & ~c[4], body, c)

        def rebuild(s, nb, pl, ref_f, rebuilds, regrid):
            f = deform(s.x, theta)
            nb = table.build(s.x[0], nb.idx.shape[1], nb.cells.shape[1], deform=f)
            pl = _relax.pair_list(nb.idx, n, pl.i.shape[0], pl.order)
            nb = nb._replace(overflow=nb.overflow | pl.overflow)
            # Only a grid can stop spanning the reach (all pairs: never a new
            # grid, and no second compile, however far the cell shrinks).
            regrid = _smallest_stretch(f) < stretch if table.grid is not None else jnp.zeros((), bool)
            return mini.step_force(s, (theta, pl)), nb, pl, inverse(s.x, theta), rebuilds + 1, regrid

        def outer(c):
            s, nb, pl, ref_f, stale_, rebuilds, regrid = c
            s, nb, pl, ref_f, rebuilds, regrid = jax.lax.cond(
                stale_, rebuild, lambda *a: a, s, nb, pl, ref_f, rebuilds, regrid)
            return inner((s, nb, pl, ref_f, jnp.zeros((), bool), rebuilds, regrid))

        first = (state, nbrs, pairs, ref_f, stale | ~valid(state.x, theta, nbrs, ref_f),
                 jnp.zeros((), jnp.int32), jnp.zeros((), bool))
        s, nb, pl, ref_f, _, rebuilds, regrid = jax.lax.while_loop(
            lambda c: go(c[0], c[1], c[6]) | (c[4] & ~c[1].overflow & ~c[6]), outer, first)
        fmax, smax = measure(s.x, s.force, theta)
        return s, nb, pl, ref_f, rebuilds, regrid, fmax, smax, mini.stalled(s)

    programs = {"table": table, "mini": mini, "advance": jax.jit(advance), "deform": jax.jit(deform),
                "compiled": {}, "cutoff": cutoff, "stretch": float(stretch),
                # the loop's parts, for bench/pressure/step_profile.py
                "running": running, "valid": valid, "measure": measure}
    cache.append(programs)
    return programs


def relax(
    system: CellSystem,
    params: Params | None = None,
    q0: Array | None = None,
    method: str = "fire",
    ftol: float = 1e-10,
    max_steps: int = 100_000,
    chunk: int = 2_000,
    callback: Callable[[int, float, float], None] | None = None,
    skin: float = DEFAULT_SKIN,
) -> Relaxed:
    """Minimise the enthalpy from ``(q0, params["strain"])`` (default: the system's
    initial positions and strain) with FIRE ("fire") or gradient descent ("gd")
    over the pair ``(L₀ ⊙ q, c u)``, ``c = √N ℓ₀``, until the module's convergence test
    holds or ``max_steps``; ``callback(step, max_force, elapsed_s)`` between
    compiled chunks of ``chunk`` steps.

    Forces come from a pair list of the particles within cutoff + ``skin``
    in the deformed cell, found from a cell list in the reference box
    (:func:`_cell_programs`) and rebuilt inside the compiled loop when a
    particle's move or the cell's change could bring an unlisted pair within
    the cutoff; a table that overflows is widened and the chunk redone, a
    cell that shrinks past its grid gets a new grid. Raises RuntimeError if the cell ends up narrower than
    twice the interaction range (the minimum image would miss pairs)."""
    from mdsens import relax as _relax

    params = {k: jnp.asarray(v) for k, v in (system.params if params is None else params).items()}
    theta, strain = split(params)
    n, d = system.n, system.dim
    q = system.to_solver(jnp.asarray(system.positions), params) if q0 is None else jnp.asarray(q0)
    scale = float(_programs(system, method, ftol, skin, 1)["scale"](theta))
    x = (jnp.mod(q, 1.0) * theta["box"], coordinates(system, strain) * scale)
    programs = table = order = None
    grow = 1.0

    def new_grid(at):
        """Programs on a grid for the cell's current stretch (a new compile)."""
        nonlocal programs, table
        f = np.asarray(deformation(jnp.tensordot(at[1] / scale, jnp.asarray(
            strain_basis(d, system.box_dof), at[1].dtype), axes=1), system.box_dof))
        # The grid's stretch a power of GRID_MARGIN, so that nearby cells share a program.
        smallest = float(np.min(np.linalg.svd(f, compute_uv=False)))
        stretch = GRID_MARGIN ** math.ceil(math.log(smallest) / math.log(GRID_MARGIN) + 0.5)
        programs = _cell_programs(system, theta, method, ftol, skin, stretch)
        table = programs["table"]

    def sized(state, grow, shrink=False):
        """An empty table and pair list sized at ``state`` (built in the chunk)."""
        y = state.x[0]
        f = programs["deform"](state.x, theta)
        capacity, cell_capacity = table.capacities(y, grow, shrink, deform=f)
        return (table.placeholder(y, capacity, cell_capacity),
                table.pair_placeholder(table.pair_capacity(y, cell_capacity, grow, shrink, deform=f), capacity,
                                       order))

    new_grid(x)
    # As in mdsens.relax: large systems relax renumbered in cell order (set with
    # the first grid); positions and table leave in the model's numbering.
    if table.cell_list and n >= _relax.SORT_THRESHOLD:
        order = _relax.spatial_order(table, x[0])
        x = (x[0][order], x[1])
    state = programs["mini"].blank(x)
    # the table: (Neighbors, PairList, F⁻¹ at the build), empty at first
    tables = (*sized(state, grow), jnp.eye(d, dtype=x[0].dtype))

    def program(state, tables, until, stale):
        args = (state, *tables, theta, jnp.asarray(until, jnp.int32), jnp.asarray(stale))
        leaves, tree = jax.tree.flatten(args)
        executable, seconds = driver.compiled(programs["compiled"], (tree, tuple(jax.typeof(a) for a in leaves)),
                                              lambda: programs["advance"].lower(*args))

        def run(state, tables, until, stale):
            out, nb, pl, rf, count, regrid, fmax, smax, stalled = executable(
                state, *tables, theta, jnp.asarray(until, jnp.int32), jnp.asarray(stale))
            return driver.Chunk(out, (nb, pl, rf), int(out.step), bool(nb.overflow),
                                bool((fmax < ftol) & (smax < ftol)), bool(stalled),
                                not math.isfinite(float(max(fmax, smax))), bool(regrid), int(count), (fmax, smax))

        return run, seconds

    def widen(state, tables, report, attempt):
        nonlocal grow
        grow = 1.5 ** attempt  # kept for later grids
        return (*sized(state, grow), tables[2])

    def regrid(report):
        # The cell shrank below the grid's stretch at the last rebuild: a new
        # grid from there (its first rebuild re-evaluates the force).
        new_grid(report.state.x)
        return (*sized(report.state, grow), jnp.eye(d, dtype=x[0].dtype))

    def resize(state, tables):
        # As in mdsens.relax: a large system's table is sized afresh once the
        # random start's overlapping clusters have spread (a narrower table, one
        # more compile).
        nbrs, _, ref_f = tables
        width = nbrs.idx.shape[1]
        smaller = sized(state, 1.0, shrink=True)
        if smaller[0].idx.shape[1] < 0.75 * width:
            return (*smaller, ref_f)
        table._sticky = (width, nbrs.cells.shape[1])
        return None

    def report(chunk, elapsed):
        fmax, smax = chunk.out
        callback(chunk.step, float(max(fmax, smax)), elapsed)

    done = driver.drive(state, tables, program, widen, chunk=chunk, max_steps=max_steps,
                        settle=_relax.SETTLE_STEPS if n >= _relax.RESIZE_THRESHOLD else 0, resize=resize,
                        regrid=regrid, callback=None if callback is None else report)
    state, (nbrs, _, _), (fmax, smax), compile_s, rebuilds = \
        done.state, done.table, done.last.out, done.compile_s, done.rebuilds
    energy_fn = _programs(system, method, ftol, skin, 1)["energy"]
    y = jnp.asarray(_relax.renumbered(state.x[0], order, inverse=True))
    q = jnp.mod(y / theta["box"], 1.0)
    basis = jnp.asarray(strain_basis(d, system.box_dof), y.dtype)
    relaxed = {**theta, "strain": jnp.tensordot(state.x[1] / scale, basis, axes=1)}
    cutoff = float(system.cutoff(relaxed))
    widths = 1.0 / np.linalg.norm(np.linalg.inv(np.asarray(system.cell(relaxed))), axis=0)
    if cutoff >= 0.5 * float(widths.min()):
        raise RuntimeError(f"the relaxed cell is {float(widths.min()):.3g} wide, less than twice the interaction "
                           f"range {cutoff:.3g} (the minimum image would miss pairs); use more particles")
    # The pairs within the cutoff, from the final table (valid at the end state:
    # every such pair is listed).
    from mdsens.relax import pairs_from_table

    listed = pairs_from_table(_relax.table_in_model_numbering(nbrs.idx, order), n)
    q_np = np.asarray(q)
    dq = q_np[listed[0]] - q_np[listed[1]]
    dr = (dq - np.round(dq)) @ np.asarray(system.cell(relaxed))
    pairs = listed[:, np.sum(dr**2, axis=-1) < (cutoff * (1 + 1e-9)) ** 2]
    # Jitted on the pairs padded (with N) to a power of two: an eager sum compiled per pair count (0.45 s a call).
    padded = np.full((2, 1 << max(pairs.shape[1], 1).bit_length()), n, np.int32)
    padded[:, :pairs.shape[1]] = pairs
    energy = energy_fn(q, relaxed, jnp.asarray(padded))
    info = minimize.RelaxInfo(state.step, fmax, energy, (fmax < ftol) & (smax < ftol))
    return Relaxed(q, relaxed, info, float(smax), pairs, compile_s, rebuilds)


# -- a batch of members: mdsens ensemble at fixed pressure ------------------------------

#: how many members' tables one rebuild pass of :func:`relax_batch` builds together
REBUILD_GROUP = 4


class BatchRelaxed(NamedTuple):
    """Per member (leading axis M): ``q`` (M, N, d) fractional; ``params`` stacked,
    with each member's relaxed ``strain``; ``steps``, ``max_force``,
    ``stress_residual``, ``energy``, ``converged``, ``stalled`` (NumPy, (M,));
    ``idx`` (M, N, K), each member's table at its end state (it lists every pair
    within the cutoff: :func:`mdsens.ensemble.table_pairs` turns it into the
    derivatives' pairs); the batch's ``compile_s``, ``reallocations`` (chunks
    redone on a wider table), ``rebuilds`` (loop iterations on which some member
    rebuilt its table) and table ``capacity`` K."""

    q: Array
    params: dict[str, Array]
    steps: np.ndarray
    max_force: np.ndarray
    stress_residual: np.ndarray
    energy: np.ndarray
    converged: np.ndarray
    stalled: np.ndarray
    idx: Array
    compile_s: float
    reallocations: int
    rebuilds: int
    capacity: int


def _where(mask: Array, new: Any, old: Any) -> Any:
    """Per member: ``new`` where ``mask`` (M,), else ``old``."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b), new, old)


def _batch_program(system: CellSystem, method: str, ftol: float, skin: float, capacity: int) -> Callable:
    """The batched chunk ``(state, θ, until) -> (state, idx, overflow, rebuilds,
    max|F|, stress residual, stalled)`` over a leading member axis, jitted;
    cached with the single-member programs of the same capacity.

    One flat ``while_loop``: every member still running takes one step
    (``vmap`` of the single run's ``step_x``); the members whose table can no
    longer be trusted (the single run's ``valid`` test) rebuild it,
    ``REBUILD_GROUP`` at a time (gathered, built, scattered back, so a step on
    which one member of 64 rebuilds pays for a few O(N²) searches, not 64);
    then every member's force on its own table; a member that converged or
    stalled stops changing. Each chunk starts from fresh tables, as
    :func:`relax`'s chunks do, so a member takes the steps of its single run."""
    programs = _programs(system, method, ftol, skin, capacity)
    if "batch" in programs:
        return programs["batch"]
    mini, build, valid = programs["mini"], programs["build"], programs["valid"]
    running, measure = programs["running"], programs["measure"]
    build_all = jax.vmap(build)
    force_all = jax.vmap(lambda s, t, i: mini.step_force(s, (t, i)))
    step_all = jax.vmap(lambda s, t, i: mini.step_x(s, (t, i)))

    def advance(state, theta, until):
        members = state.step.shape[0]
        group = min(members, REBUILD_GROUP)

        def go(s):
            return jax.vmap(running)(s, theta) & (s.step < until)

        # Fresh tables for every member; the force is re-evaluated on them for the
        # members still running (and for the blank states of the first chunk).
        idx, count, ref_q, ref_f = build_all(state.x, theta)
        state = _where(go(state) | (state.step == 0), force_all(state, theta, idx), state)
        tables = (idx, count, ref_q, ref_f)

        def rebuild(x, tables, need):
            def more(c):
                return jnp.any(c[1])

            def one_group(c):
                tables, pending = c
                pick = jnp.argsort(~pending, stable=True)[:group]
                fresh = build_all(x[pick], jax.tree.map(lambda a: a[pick], theta))
                old = jax.tree.map(lambda a: a[pick], tables)
                tables = jax.tree.map(lambda a, f: a.at[pick].set(f), tables, _where(pending[pick], fresh, old))
                return tables, pending.at[pick].set(False)

            return jax.lax.while_loop(more, one_group, (tables, need))[0]

        def body(c):
            s, tables, rebuilds = c
            active = go(s)
            moved = step_all(s, theta, tables[0])
            need = active & ~jax.vmap(valid)(moved.x, theta, tables[2], tables[3])
            tables = jax.lax.cond(jnp.any(need), lambda t: rebuild(moved.x, t, need), lambda t: t, tables)
            moved = force_all(moved, theta, tables[0])
            return _where(active, moved, s), tables, rebuilds + jnp.any(need).astype(jnp.int32)

        def cond(c):
            s, tables, _ = c
            return jnp.any(go(s)) & ~jnp.any(tables[1] > capacity)

        s, tables, rebuilds = jax.lax.while_loop(cond, body, (state, tables, jnp.zeros((), jnp.int32)))
        fmax, smax = jax.vmap(measure)(s.x, s.force, theta)
        return s, tables[0], jnp.any(tables[1] > capacity), rebuilds, fmax, smax, jax.vmap(mini.stalled)(s)

    programs["batch"] = {"advance": jax.jit(advance), "compiled": {}}
    return programs["batch"]


def relax_batch(
    model: CellSystem, params: Params, x0: Array, method: str = "fire", ftol: float = 1e-10,
    max_steps: int = 100_000, chunk: int = 2_000, skin: float = DEFAULT_SKIN,
    callback: Callable[[int, int, float, float], None] | None = None, sharding: Any = None,
) -> BatchRelaxed:
    """Minimise the enthalpy of M members of one model together (the fixed-pressure
    counterpart of :func:`mdsens.ensemble.relax_batch`): ``params`` stacked
    (leading axis M, with each member's starting ``strain``), ``x0`` (M, N, d)
    real space in the starting cells. Each member takes the steps of
    :func:`relax` (the same FIRE/GD on ``(L₀ ⊙ q, c u)``, the same table
    validity test, fresh tables at each chunk) and stops at its own
    convergence (forces and stress, module docstring). ``callback(step,
    converged, worst residual, elapsed_s)`` between chunks; ``sharding`` a
    ``jax.sharding`` for arrays with a leading member axis (None: one device).
    Raises RuntimeError if a relaxed cell is narrower than twice the
    interaction range."""
    params = {k: jnp.asarray(v) for k, v in params.items()}
    theta, strain = split(params)
    n, d = model.n, model.dim
    place = (lambda a: a) if sharding is None else (lambda a: jax.device_put(a, sharding))
    q = jnp.mod(jax.vmap(model.to_solver)(jnp.asarray(x0), params), 1.0)
    single = _programs(model, method, ftol, skin, 1)  # the capacity-free pieces, vmapped here
    scale = jax.vmap(single["scale"])(theta)
    u = jax.vmap(lambda s: coordinates(model, s))(strain)
    members = q.shape[0]
    x = jnp.concatenate([(q * theta["box"][:, None, :]).reshape(members, n * d), u * scale[:, None]], axis=1)
    theta = jax.tree.map(place, theta)
    capacity = min(int(int(jnp.max(single["count_batch"](x, theta))) * 1.25) + 2, n)
    state = jax.tree.map(place, jax.vmap(_programs(model, method, ftol, skin, capacity)["mini"].blank)(place(x)))
    key = (members, None if sharding is None else repr(sharding))

    def program(state, capacity, until, stale):
        # the chunk builds fresh tables for every member itself (stale unused)
        batch = _batch_program(model, method, ftol, skin, capacity)
        until_ = jnp.asarray(until, jnp.int32)
        executable, seconds = driver.compiled(batch["compiled"], key,
                                              lambda: batch["advance"].lower(state, theta, until_))

        def run(state, capacity, until, stale):
            s, idx, overflow, k, fmax, smax, stalled = executable(state, theta, jnp.asarray(until, jnp.int32))
            fmax, smax, stalled = np.asarray(fmax), np.asarray(smax), np.asarray(stalled)
            converged = (fmax < ftol) & (smax < ftol)
            # each member stops at its own convergence; the batch when every member has
            return driver.Chunk(s, capacity, int(np.max(np.asarray(s.step))), bool(overflow),
                                bool(np.all(converged | stalled)), rebuilds=int(k),
                                out=(idx, fmax, smax, converged, stalled))

        return run, seconds

    def widen(state, capacity, report, attempt):
        return min(int(capacity * 1.5) + 2, n)

    def report(chunk, elapsed):
        _, fmax, smax, converged, _ = chunk.out
        worst = np.where(converged, 0.0, np.maximum(fmax, smax))
        callback(chunk.step, int(np.sum(converged)), float(np.max(worst)), elapsed)

    done = driver.drive(state, capacity, program, widen, chunk=chunk, max_steps=max_steps,
                        callback=None if callback is None else report)
    state, capacity, (idx, fmax, smax, converged, stalled) = done.state, done.table, done.last.out
    y = state.x[:, :n * d].reshape(members, n, d)
    q = jnp.mod(y / theta["box"][:, None, :], 1.0)
    basis = jnp.asarray(strain_basis(d, model.box_dof), y.dtype)
    relaxed = {**theta, "strain": jnp.tensordot(state.x[:, n * d:] / scale[:, None], basis, axes=1)}
    cutoff = np.asarray(jax.vmap(model.cutoff)(relaxed))
    cells = np.asarray(jax.vmap(model.cell)(relaxed))
    widths = 1.0 / np.linalg.norm(np.linalg.inv(cells), axis=1)
    narrow = np.nonzero(cutoff >= 0.5 * widths.min(axis=-1))[0]
    if narrow.size:
        raise RuntimeError(f"{narrow.size} relaxed cell(s) (member {int(narrow[0])} first) are narrower than twice "
                           "the interaction range (the minimum image would miss pairs); use more particles")
    energy = single["energy_batch"](q, relaxed, idx)
    return BatchRelaxed(q, relaxed, np.asarray(state.step), fmax, smax, np.asarray(energy), converged, stalled, idx,
                        done.compile_s, done.reallocations, done.rebuilds, capacity)


def derivative_fn(job, model: CellSystem, observe: Mapping[str, Observable],
                  wrts, grads) -> Callable:
    """``(q, params, pairs) -> (rattler, observables, {wrt: Forward}, {obs: (gradient, SolveInfo)})``
    for one member at fixed pressure (``params`` with its relaxed strain):
    what :func:`execute` computes, on the member's table pairs (the
    counterpart of :func:`mdsens.ensemble.derivative_fn`; vmap it over members).
    The observables include ``stress_residual``."""
    from mdsens import observables

    def one(q: Array, params: Params, pairs: Array):
        s = model.with_pairs(pairs)
        rattler = observables.rattlers(s, q, params)
        solve = solver_for(s, q, params, rattler, job.solver, job.rtol, job.preconditioner)
        values = {name: fn(s, q, params) for name, fn in observe.items()}
        values["stress_residual"] = stress_residual(s, q, params)
        forwards = {text: forward_fn(s, name, observe, rattler, solve, index)(q, params)
                    for text, name, index in wrts}
        gradients = {name: gradient_fn(s, observables.OBSERVABLES[name], rattler, solve)(q, params)
                     for name in grads}
        return rattler, values, forwards, gradients

    return one


def default_observables(job, system: CellSystem, observe: dict) -> dict:
    """``observe`` plus, when the job names none, enthalpy, volume and (with
    diameters) packing_fraction: what a fixed-pressure run records by default."""
    from mdsens import observables

    if job.observe is not None:
        return observe
    extra = ["enthalpy", "volume"] + (["packing_fraction"] if "diameter" in system.params else [])
    return {**observe, **{k: observables.OBSERVABLES[k] for k in extra}}


def newton_polish(system: CellSystem, q: Array, params: Params, rattler: Array, steps: int = 4,
                  pairs: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Gauge-fixed Newton steps on ``∇_z H`` with a dense solve (small N only):
    drives forces and stress to round-off. Returns ``(q, params)``."""
    from mdsens import cache

    theta, _ = split({k: jnp.asarray(v) for k, v in params.items()})
    z = pack(system, jnp.asarray(q), params)
    pairs = None if pairs is None else jnp.asarray(pairs)

    def make():  # one program per model and step count (the many polishes of a check compile once)
        template = system.model.template

        def polish(z0, theta_, rattler_, pairs_):
            listed = template if pairs_ is None else template.with_pairs(pairs_)
            root_fn = optimality(listed)
            project = gauge_for(template, rattler_)(z0, theta_)

            def step(_, z_):
                g = root_fn(z_, theta_)

                def matvec(v):
                    pv = project(v)
                    return project(jax.jvp(lambda y: root_fn(y, theta_), (z_,), (pv,))[1]) + (v - pv)

                delta, _ = linsolve.dense()(matvec, -project(g))
                return z_ + delta

            return jax.lax.fori_loop(0, steps, step, z0)

        return polish

    fn, _ = cache.program(("barostat.newton_polish", system.model, steps), make, z, theta, jnp.asarray(rattler), pairs)
    q, params = unpack(system, fn(z, theta, jnp.asarray(rattler), pairs), theta)
    return jnp.mod(q, 1.0), params


# -- the linear solve ---------------------------------------------------------------


def preconditioner_for(system: CellSystem, q: Array, params: Params, rattler: Array,
                       kind: str = "twolevel") -> Callable[[tuple[Array, Array]], tuple[Array, Array]]:
    """A preconditioner for the gauge-fixed Hessian of H over ``z = (q, u)``
    (the pair, :func:`state`): block-diagonal, ``blockdiag(B_q, H_uu⁻¹)``. ``B_q`` is the fixed-box
    preconditioner (:mod:`mdsens.precondition`, ``kind`` "jacobi" or
    "twolevel") on the position block, whose Hessian ∂²E/∂q² at the relaxed cell
    is the one :meth:`CellSystem.pair_hessians` assembles, in the translations'
    gauge; ``H_uu`` is the exact box-dof block (k × k, k ≤ d(d+1)/2: k
    Hessian-vector products), its eigenvalues floored like the particle blocks.
    Both blocks are symmetric positive definite, so B is; the position–strain
    coupling ``H_qu`` is left to CG. ``q`` and ``params`` are data (not
    differentiated)."""
    from mdsens import precondition

    q, params = jax.lax.stop_gradient(q), jax.lax.stop_gradient(params)
    system = system.held_only(rattler)
    project_q = _gauge.translations(rattler)
    if kind == "jacobi":
        position = precondition.block_jacobi(system, q, params, project_q)
    elif kind == "twolevel":
        position = precondition.two_level(system, q, params, rattler, project_q)
    else:
        raise ValueError(f"unknown preconditioner {kind!r}: choose jacobi or twolevel (or none: no preconditioner)")
    theta, _ = split(params)
    _, block = strain_columns(system, state(system, q, params), theta)
    strain_inverse = precondition.block_inverse(0.5 * (block + block.T)[None])[0]

    def apply(r: tuple[Array, Array]) -> tuple[Array, Array]:
        rq, ru = r
        return position(rq), strain_inverse @ ru

    return apply


def solver_for(system: CellSystem, q: Array, params: Params, rattler: Array, method: str = "cg",
               rtol: float = 1e-10, preconditioner: str = "twolevel") -> implicit.Solve:
    """The linear solve of the fixed-pressure derivatives at ``(q*, θ)``, on the
    pair ``z = (q, u)``: CG preconditioned by :func:`preconditioner_for`
    ("twolevel", "jacobi"), plain CG ("none"), or the dense reference ("dense",
    small N); "auto" is CG here (:func:`mdsens.sensitivity.resolve_solver`)."""
    from mdsens.sensitivity import resolve_solver

    method = resolve_solver(method, system)
    if method == "dense":
        return linsolve.dense()
    if method != "cg":
        raise ValueError(f"unknown linear solver {method!r}: choose 'cg' or 'dense'")
    precond = None if preconditioner == "none" else preconditioner_for(system, q, params, rattler, preconditioner)
    return linsolve.cg(rtol=rtol, preconditioner=precond)


# -- derivatives ------------------------------------------------------------------


def _outputs(system: CellSystem, observe: Mapping[str, Observable]):
    def outputs(z: Array, theta: Params) -> dict[str, Array]:
        q, params = unpack(system, z, theta)
        out = {"position": system.to_real(q, params)}
        out.update({key: fn(system, q, params) for key, fn in observe.items()})
        return out

    return outputs


def forward_fn(
    system: CellSystem,
    name: str,
    observe: Mapping[str, Observable],
    rattler: Array,
    solve: implicit.Solve | None = None,
    index: tuple[int, ...] | None = None,
):
    """``(q*, params) -> sensitivity.Forward`` at fixed pressure: one solve with
    the gauge-fixed Hessian of H per element of ``params[name]`` (``index``: that
    element alone). ``position`` is real space, the affine part of the box
    change included; ``name`` may be ``pressure``."""
    from mdsens.sensitivity import Forward, unit_tangents

    if name == "strain":
        raise ValueError("strain is the relaxed state at fixed pressure, not a parameter")
    system = system.held_only(rattler)  # rattlers' contacts carry no load (System.held_only)
    root_fn = optimality(system)
    gauge = gauge_for(system, rattler)
    hvp = hessian_vp(system)
    outputs = _outputs(system, observe)

    def run(q: Array, params: Params):
        theta, _ = split(dict(params))
        z = state(system, q, params)
        tangents, shape = unit_tangents(theta, name, index)

        def one(dtheta):
            dz, info = implicit.tangent(root_fn, z, theta, dtheta, solve, gauge, hvp)
            _, out = jax.jvp(outputs, (z, theta), (dz, dtheta))
            return out, info

        values, info = jax.lax.map(one, tangents)
        values = {key: v.reshape(shape + v.shape[1:]) for key, v in values.items()}
        return Forward(values, info.iterations.reshape(shape), info.residual.reshape(shape))

    return run


def gradient_fn(system: CellSystem, observable: Observable, rattler: Array, solve: implicit.Solve | None = None):
    """``(q*, params) -> (dO/dθ, info)`` at fixed pressure (reverse mode, one solve);
    θ excludes the state ``strain``."""
    system = system.held_only(rattler)  # rattlers' contacts carry no load (System.held_only)
    root_fn = optimality(system)
    gauge = gauge_for(system, rattler)
    hvp = hessian_vp(system)

    def run(q: Array, params: Params):
        theta, _ = split(dict(params))
        z = state(system, q, params)

        def value(z_, theta_):
            q_, p_ = unpack(system, z_, theta_)
            return observable(system, q_, p_)

        g_z, g_theta = jax.grad(value, argnums=(0, 1))(z, theta)
        implicit_part, info = implicit.cotangent(root_fn, z, theta, g_z, solve, gauge, hvp)
        return jax.tree_util.tree_map(jnp.add, g_theta, implicit_part), info

    return run


def _polish_listed(system: CellSystem, q: Array, params: Params, rattler: Array, steps: int):
    """:func:`newton_polish` over the pairs within 1.1 × cutoff of each other at its start,
    redone over all pairs where another came within the cutoff of the polished, possibly
    deformed, cell (:func:`mdsens.sensitivity.polish_over_listed_pairs`; all N(N−1)/2
    pairs made a fixed-pressure check of N = 256 take 45 s, listed 12 s)."""
    from mdsens import sensitivity

    return sensitivity.polish_over_listed_pairs(
        system, q, params, lambda pairs: newton_polish(system, q, params, rattler, steps, pairs))


def finite_difference(
    system: CellSystem,
    q: Array,
    params: Params,
    name: str,
    index: tuple[int, ...] | None = None,
    h: float = 1e-5,
    observe: Mapping[str, Observable] | None = None,
    ftol: float = 1e-11,
    polish: int = 6,
    stencil: int = 2,
) -> dict[str, np.ndarray]:
    """Central differences at fixed pressure: re-minimise H at ``θ ± h`` from the
    relaxed ``(q, strain)`` (FIRE, then ``polish`` dense Newton steps), difference
    z with minimum image, project into the implicit derivative's gauge; positions
    in real space with the affine part of the box change. Small N only.
    ``stencil=4``: also ``θ ± 2h``, the five-point formula
    (:func:`mdsens.sensitivity.finite_difference`)."""
    from mdsens import observables, sensitivity

    if stencil not in sensitivity.STENCILS:
        raise ValueError(f"stencil must be one of {sorted(sensitivity.STENCILS)}, got {stencil!r}")
    theta, _ = split({k: jnp.asarray(v) for k, v in params.items()})
    shape = jnp.shape(theta[name])
    if index is None:
        each = [finite_difference(system, q, params, name, i, h, observe, ftol, polish, stencil)
                for i in np.ndindex(*shape)]
        return {key: np.stack([e[key] for e in each]).reshape(shape + each[0][key].shape) for key in each[0]}
    index = tuple(int(i) for i in index)
    observe = {} if observe is None else observe
    params = {k: jnp.asarray(v) for k, v in params.items()}
    rattler = observables.rattlers(system, q, params)
    z = pack(system, q, params)
    project = gauge_for(system, rattler)(z, theta)
    n, d = system.n, system.dim
    outputs = jax.jit(_outputs(system, observe))  # eagerly, each op (the cell's expm) compiled alone: 3 s a call
    dz_sum = jnp.zeros_like(z)
    dtheta = jnp.zeros_like(theta[name])
    values = {key: 0.0 for key in observe}

    def state(step: float):
        t = dict(theta)
        t[name] = theta[name].at[index].add(step * h)
        out = relax(system, {**t, "strain": params["strain"]}, q0=q, ftol=ftol, max_steps=200_000)
        qs, ps = out.q, out.params
        if polish:
            qs, ps = _polish_listed(system, qs, ps, rattler, polish)
        dz = pack(system, qs, ps) - z
        return dz.at[:n * d].add(-jnp.round(dz[:n * d])), t

    for step, weight in sensitivity.STENCILS[stencil]:  # differences first (sensitivity.STENCILS)
        (dz_plus, t_plus), (dz_minus, t_minus) = state(step), state(-step)
        dz_sum = dz_sum + weight * (dz_plus - dz_minus)
        dtheta = dtheta + weight * (t_plus[name] - t_minus[name])
        plus, minus = outputs(z + dz_plus, t_plus), outputs(z + dz_minus, t_minus)
        for key in observe:
            values[key] = values[key] + weight * (plus[key] - minus[key])
    dz = project(dz_sum / h)
    tangent = {k: jnp.zeros_like(v) for k, v in theta.items()}
    tangent[name] = dtheta / h
    result = {"position": np.asarray(jax.jvp(lambda z_, t_: outputs(z_, t_)["position"], (z, theta),
                                             (dz, tangent))[1])}
    for key in observe:
        result[key] = np.asarray(values[key] / h)
    return result


# -- mdsens run at fixed pressure -------------------------------------------------------


def record_box(system: CellSystem, params: Params) -> np.ndarray:
    """The box for the file: side lengths (d,) when the cell is diagonal (iso,
    aniso), else the (d, d) edge vectors as rows (shear)."""
    cell = np.asarray(system.cell(params))
    return np.diag(cell).copy() if system.box_dof in ("iso", "aniso") else cell


def execute(job, system: CellSystem, observe: dict, wrts: list, progress=None, wall: float | None = None):
    """``mdsens run`` for a system built with ``pressure``: relax the enthalpy
    (:func:`relax`), then every requested derivative at fixed pressure
    (:func:`forward_fn`, :func:`gradient_fn`; CG preconditioned by :func:`solver_for`, or
    dense). Called by :func:`mdsens.job.execute` after :func:`mdsens.job.prepare`."""
    from mdsens import job as _job
    from mdsens import observables
    from mdsens.systems import UsageError

    wall = time.perf_counter() if wall is None else wall
    for text, name, _ in wrts:
        if name == "strain":
            raise UsageError(f"--wrt {text!r}: at fixed pressure the strain is the relaxed state, not a parameter; "
                             "differentiate the observable cell or volume instead")
    if job.polish is not None or job.checkpoint is not None or job.resume is not None:
        raise UsageError("--polish, --checkpoint and --resume are not available at fixed pressure yet")
    if job.solver not in ("auto", "cg", "dense"):
        raise UsageError(f"--solver {job.solver!r} is not available at fixed pressure: choose 'auto', 'cg' or 'dense'")
    observe = default_observables(job, system, observe)
    timings = {"compile_s": 0.0, "relax_s": 0.0, "derivative_s": 0.0}

    start = time.perf_counter()
    out = relax(system, system.params, None, job.minimizer, job.ftol, job.max_steps, job.chunk, progress, job.skin)
    timings["compile_s"] += out.compile_s
    timings["relax_s"] = time.perf_counter() - start - out.compile_s
    q, params, info = out.q, out.params, out.info
    listed = _job.use_neighbor_list(job, system)
    pairs = pad_pairs(out.pairs, system.n) if listed else None
    rattler, c, _ = _job.run_compiled(system, pairs, "rattlers",
                                      lambda s_: lambda q_, p_: observables.rattlers(s_, q_, p_), q, params)
    timings["compile_s"] += c
    options = (job.solver, job.rtol, job.preconditioner)

    def solved(s_, q_, p_, r_):  # built while tracing, at the relaxed state, on the listed pairs
        return solver_for(s_, q_, p_, r_, *options)

    forwards, gradients, values = {}, {}, {}
    # The moduli's own solves (inside observables) follow --solver/--rtol/--preconditioner too.
    with _job.solving(job):
        for name, fn in observe.items():
            value, c, _ = _job.run_compiled(system, pairs, (fn, options), lambda s_, f=fn: lambda q_, p_: f(s_, q_, p_),
                                            q, params)
            values[name] = np.asarray(value)
            timings["compile_s"] += c
        values["max_force"] = np.asarray(info.max_force)
        values["stress_residual"] = np.asarray(out.stress_residual)
        for text, name, index in wrts if bool(info.converged) else ():
            forwards[text], c, r = _job.run_compiled(
                system, pairs, ("forward", name, index, tuple(observe.items()), options),
                lambda s_, name=name, index=index: lambda q_, p_, r_: forward_fn(
                    s_, name, observe, r_, solved(s_, q_, p_, r_), index)(q_, p_), q, params, rattler)
            timings["compile_s"] += c
            timings["derivative_s"] += r
        for name in job.grad if bool(info.converged) else ():
            gradients[name], c, r = _job.run_compiled(
                system, pairs, ("gradient", name, options),
                lambda s_, name=name: lambda q_, p_, r_: gradient_fn(
                    s_, observables.OBSERVABLES[name], r_, solved(s_, q_, p_, r_))(q_, p_), q, params, rattler)
            timings["compile_s"] += c
            timings["derivative_s"] += r
    timings["total_s"] = time.perf_counter() - wall
    meta = _job.run_meta(
        job, system, info, timings, ensemble=ensemble(system), box_dof=system.box_dof,
        target_pressure=float(params["pressure"]), stress_residual=out.stress_residual,
        neighbor_list={"pairs": int(out.pairs.shape[1]) if listed else None, "skin": job.skin,
                       "rebuilds": out.rebuilds})
    return PressureResult(job, system, q, params, info, rattler, values, forwards, gradients, timings, meta)


class PressureResult(Result):
    """A :class:`mdsens.job.Result` at fixed pressure: the file's box is the relaxed cell."""

    def record(self) -> dict[str, Any]:
        out = super().record()
        out["box"] = record_box(self.system, self.params)
        return out

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out["ensemble"] = ensemble(self.system)
        out["box"] = record_box(self.system, self.params).tolist()
        return out
