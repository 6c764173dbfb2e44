"""Start from the positions in an existing file, with a chosen potential.

Reads the last frame of an mdsens HDF5 file (``/particles/all/position/value``,
the box edges, species and per-particle diameters, via :func:`mdsens.io.read`)
or an extended-XYZ file (``Lattice`` diagonal, ``pbc``, ``Properties`` with a
``pos`` column and optionally ``diameter``/``radius``; a ``dimension=2`` entry,
as mdsens writes it, keeps the first two coordinates). A periodic file gives a
periodic system with a ``box`` parameter; otherwise free space.

Potentials (key ``potential``):
- ``harmonic``: soft spheres, parameter ``diameter`` (N,) from the file's
  per-particle diameters (1 where it has none), ``epsilon``, ``alpha``;
- ``lj``: Lennard-Jones with jax-md's smooth cutoff, ``sigma``, ``epsilon``;
- ``morse``: ``sigma`` (r0), ``epsilon``, ``alpha``.
Scalar parameters start from the file's ``/parameters`` when it has them.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mdsens.system import System
from mdsens.systems import lj_crystal, morse_cluster
from mdsens.systems._family import Family, Key, UsageError, one_of, positive
from mdsens.systems.bidisperse import check_minimum_image, soft_sphere_pair

POTENTIALS = ("harmonic", "lj", "morse")
_DEFAULTS = {"epsilon": 1.0, "alpha": 2.0, "sigma": 1.0}


def read_extxyz(path: Path) -> dict:
    """Last frame of an extended-XYZ file: positions (N, d), box (d,) or None,
    species (N,) int, diameter (N,) (ones when absent), parameters {}."""
    lines = path.read_text().splitlines()
    frames, k = [], 0
    while k < len(lines) and lines[k].strip():
        n = int(lines[k].split()[0])
        frames.append((lines[k + 1], lines[k + 2:k + 2 + n]))
        k += 2 + n
    if not frames:
        raise ValueError("no frame")
    comment, rows = frames[-1]
    info = dict(item.split("=", 1) for item in shlex.split(comment) if "=" in item)
    spec = info.get("Properties", "species:S:1:pos:R:3").split(":")
    columns, start = {}, 0
    for name, _, width in zip(spec[0::3], spec[1::3], spec[2::3]):
        columns[name.lower()] = (start, int(width))
        start += int(width)
    table = [row.split() for row in rows]
    dim = int(info.get("dimension", 3))

    def column(name, cast=float):
        first, width = columns[name]
        return np.array([[cast(t) for t in row[first:first + width]] for row in table])

    positions = column("pos")[:, :dim]
    pbc = info.get("pbc", "F F F").split()
    box = None
    if "Lattice" in info and all(p.upper().startswith("T") for p in pbc[:dim]):
        lattice = np.array([float(x) for x in info["Lattice"].split()]).reshape(3, 3)
        if np.any(np.abs(lattice - np.diag(np.diag(lattice))) > 1e-12):
            raise ValueError("only orthorhombic (diagonal) lattices are supported")
        box = np.diag(lattice)[:dim]
    if "diameter" in columns:
        diameter = column("diameter")[:, 0]
    elif "radius" in columns:
        diameter = 2 * column("radius")[:, 0]
    else:
        diameter = np.ones(len(table))
    species = column("type_id", int)[:, 0] if "type_id" in columns else np.zeros(len(table), int)
    return {"positions": positions, "box": box, "species": species, "diameter": diameter, "parameters": {}}


def read_positions(path: str) -> dict:
    """An mdsens HDF5 file or an extended-XYZ file (by content), as a dict with
    positions, box, species, diameter and parameters; UsageError if unreadable."""
    file = Path(path)
    if not path:
        raise UsageError("from_file needs path=FILE (an mdsens .h5 file or extended XYZ)")
    if not file.is_file():
        raise UsageError(f"from_file: {path}: no such file")
    with open(file, "rb") as handle:
        is_hdf5 = handle.read(8) == b"\x89HDF\r\n\x1a\n"
    try:
        if is_hdf5:
            from mdsens import io

            return io.read(file)
        return read_extxyz(file)
    except (ValueError, KeyError, IndexError, OSError) as err:
        kind = "mdsens HDF5" if is_hdf5 else "extended XYZ"
        raise UsageError(f"from_file: {path}: cannot read as {kind}: {err}") from None


def _scalar(parameters: dict, name: str) -> float:
    value = np.asarray(parameters.get(name, _DEFAULTS[name]), dtype=float)
    return float(value) if value.ndim == 0 else _DEFAULTS[name]


def build(path: str, potential: str, onset: float, cutoff: float, seed: int = 0) -> System:
    data = read_positions(path)
    positions = np.asarray(data["positions"], dtype=float)
    n, dim = positions.shape
    if dim not in (2, 3) or n < 2:
        raise UsageError(f"from_file: {path}: need at least 2 particles in 2 or 3 dimensions, got {positions.shape}")
    file_params = data.get("parameters") or {}
    params: dict = {}
    if potential == "harmonic":
        params["diameter"] = jnp.asarray(np.asarray(data["diameter"], dtype=float))
        params["epsilon"] = jnp.asarray(_scalar(file_params, "epsilon"))
        params["alpha"] = jnp.asarray(_scalar(file_params, "alpha"))
        pair, contact = soft_sphere_pair(np.arange(n))
        reach, cutoff_fn = float(np.max(data["diameter"])), lambda p: jnp.max(p["diameter"])
    elif potential == "lj":
        if onset >= cutoff:
            raise UsageError(f"from_file: onset={onset} must be below cutoff={cutoff}")
        params["sigma"] = jnp.asarray(_scalar(file_params, "sigma"))
        params["epsilon"] = jnp.asarray(_scalar(file_params, "epsilon"))
        pair, contact = lj_crystal.lj_pair(onset, cutoff), None
        reach, cutoff_fn = cutoff * float(params["sigma"]), lambda p: cutoff * p["sigma"]
    else:
        params["sigma"] = jnp.asarray(_scalar(file_params, "sigma"))
        params["epsilon"] = jnp.asarray(_scalar(file_params, "epsilon"))
        alpha = np.asarray(file_params.get("alpha", 6.0), dtype=float)
        params["alpha"] = jnp.asarray(float(alpha) if alpha.ndim == 0 else 6.0)
        pair, contact = morse_cluster.morse_pair, None
        reach, cutoff_fn = np.inf, lambda p: jnp.inf
    if data.get("box") is not None:
        box = np.asarray(data["box"], dtype=float).reshape(-1)
        if box.shape != (dim,):
            raise UsageError(f"from_file: {path}: box {box.tolist()} does not match {dim} dimensions")
        check_minimum_image("from_file", box, reach)
        positions = np.mod(positions, box)
        params["box"] = jnp.asarray(box)
    config = {"path": str(path), "potential": potential, "onset": onset, "cutoff": cutoff}
    species = np.asarray(data.get("species", np.zeros(n)), dtype=np.int32)
    return System("from_file", positions, species, params, pair, cutoff=cutoff_fn, contact=contact, config=config)


FAMILY = Family(
    name="from_file",
    description="positions from an mdsens HDF5 or extended-XYZ file, with a chosen potential "
                "(harmonic soft spheres, Lennard-Jones or Morse)",
    keys=(
        Key("path", "str", "", "the file to start from (mdsens .h5, or extended XYZ)"),
        Key("potential", "str", "harmonic", "harmonic, lj or morse", one_of(*POTENTIALS)),
        Key("onset", "float", 2.0, "lj only: smooth cutoff starts at onset·σ", positive),
        Key("cutoff", "float", 2.5, "lj only: interaction vanishes beyond cutoff·σ", positive),
    ),
    parameters={
        "diameter": "(N,) per-particle diameters (harmonic)",
        "sigma": "() length σ: LJ σ or Morse r0 (lj, morse)",
        "epsilon": "() interaction strength ε",
        "alpha": "() harmonic stiffness exponent or Morse width (harmonic, morse)",
        "box": "(d,) periodic box side lengths (periodic files)",
    },
    build_fn=build,
)
