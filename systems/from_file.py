"""Start from the positions in an existing file, with a chosen potential.

Reads, by content or file name (key ``format`` to say it when they do not):

- mdsens HDF5 (the last frame, box, species, per-particle diameters and the
  ``/parameters``, via :func:`mdsens.io.read`);
- HOOMD's GSD (the ``gsd`` package): ``particles/position``, ``typeid``,
  ``diameter``, ``configuration/box`` (centered, tilts must be 0) and
  ``configuration/dimensions``; the last frame or ``frame=K``;
- through ASE (:func:`ase.io.read`): extended XYZ, plain XYZ, LAMMPS data
  (``atom_style atomic``, format ``lammps-data``, guessed from ``.data``/``.lmp``)
  and text dumps (``lammps-dump-text``, from ``.dump``/``.lammpstrj``),
  POSCAR (``vasp``), CIF, and any other format ASE reads.

Diameters come from a per-atom ``diameter`` (or ``radius``, doubled) array
when the file has one, else 1; the key ``diameter=D0,D1,...`` sets them per
species instead. Species come from a ``type_id`` (0-based) or LAMMPS ``type``
(1-based) array, else from the distinct chemical symbols in order of atomic
number. A periodic file gives a periodic system with a ``box`` parameter
(positions are wrapped into [0, L)); otherwise free space. Only orthorhombic
(axis-aligned) cells: a triclinic cell is refused. A file whose z coordinates
are all equal and whose third axis is not periodic (as ``mdsens export``
writes 2D, with a ``dimension=2`` entry that is honoured too) gives a 2D
system; ``dim=2`` or ``dim=3`` overrides (LAMMPS 2D files are periodic in z:
pass ``dim=2``).

Potentials (key ``potential``):
- ``harmonic``: soft spheres, parameter ``diameter`` (N,) from the file's
  per-particle diameters (1 where it has none), ``epsilon``, ``alpha``;
- ``lj``: Lennard-Jones with jax-md's smooth cutoff, ``sigma``, ``epsilon``;
- ``morse``: ``sigma`` (r0), ``epsilon``, ``alpha``.
Scalar parameters start from the file's ``/parameters`` when it has them.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mdsens.system import System
from mdsens.systems import lj_crystal, morse_cluster
from mdsens.systems._family import Family, Key, UsageError, one_of, positive
from mdsens.systems.bidisperse import check_minimum_image, soft_sphere_pair, soft_sphere_radius

POTENTIALS = ("harmonic", "lj", "morse")
_DEFAULTS = {"epsilon": 1.0, "alpha": 2.0, "sigma": 1.0}

# Formats read without ASE; file names ASE does not recognise by themselves.
OWN_FORMATS = ("mdsens", "gsd")
_SUFFIXES = {".h5": "mdsens", ".hdf5": "mdsens", ".h5md": "mdsens", ".gsd": "gsd",
             ".data": "lammps-data", ".lmp": "lammps-data", ".lammps": "lammps-data",
             ".dump": "lammps-dump-text", ".lammpstrj": "lammps-dump-text"}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_GSD_MAGIC = b"\xdfe\xdfe\xdfe\xdfe"  # 0x65DF65DF65DF65DF, little-endian


def _check_format(name: str) -> str | None:
    if not name or name in OWN_FORMATS:
        return None
    from ase.io.formats import ioformats

    fmt = ioformats.get(name)
    if fmt is None or not fmt.can_read:
        return "expected mdsens, gsd or a format ASE reads (extxyz, xyz, lammps-data, lammps-dump-text, vasp, cif, ...)"
    return None


def guess_format(file: Path) -> str:
    """mdsens or gsd by content, then by suffix, then ASE's own guess."""
    with open(file, "rb") as handle:
        head = handle.read(8)
    if head == _HDF5_MAGIC:
        return "mdsens"
    if head == _GSD_MAGIC:
        return "gsd"
    if file.suffix.lower() in _SUFFIXES:
        return _SUFFIXES[file.suffix.lower()]
    from ase.io.formats import UnknownFileTypeError, filetype

    try:
        return filetype(str(file))
    except (UnknownFileTypeError, OSError, ValueError):
        raise UsageError(f"from_file: {file}: cannot tell its format; pass format=NAME "
                         "(extxyz, xyz, lammps-data, lammps-dump-text, vasp, cif, gsd or mdsens)") from None


def _species_index(values) -> np.ndarray:
    """Arbitrary labels → 0, 1, ... in sorted order."""
    _, index = np.unique(np.asarray(values), return_inverse=True)
    return index.reshape(-1).astype(np.int32)


def _dimensions(positions: np.ndarray, periodic: np.ndarray, dim: int, path: str) -> int:
    """2 or 3: ``dim`` if given, else 2 when z is constant and not periodic."""
    flat = bool(np.ptp(positions[:, 2]) == 0.0) if len(positions) else True
    if dim == 0:
        return 2 if flat and not periodic[2] else 3
    if dim == 2 and not flat:
        raise UsageError(f"from_file: {path}: dim=2 but the z coordinates are not all equal")
    return dim


def _orthorhombic_box(cell: np.ndarray, periodic: np.ndarray, d: int, path: str) -> np.ndarray | None:
    """The (d,) box edges of a periodic cell, None for free space; UsageError
    for a triclinic cell or periodicity along some axes only."""
    periodic = np.asarray(periodic[:d], dtype=bool)
    if not periodic.any():
        return None
    if not periodic.all():
        axes = "".join("xyz"[i] for i in range(d) if periodic[i])
        raise UsageError(f"from_file: {path}: periodic along {axes} only; mdsens needs all {d} axes "
                         "periodic or none (free space)")
    cell = np.asarray(cell, dtype=float)
    scale = float(np.max(np.abs(cell))) or 1.0
    if np.any(np.abs(cell - np.diag(np.diag(cell))) > 1e-12 * scale):
        raise UsageError(f"from_file: {path}: triclinic (tilted) cell; mdsens supports only orthorhombic "
                         "boxes (cell vectors along x, y, z)")
    box = np.diag(cell)[:d].copy()
    if np.any(box <= 0):
        raise UsageError(f"from_file: {path}: periodic box edges {box.tolist()} must be positive")
    return box


def read_ase(path: Path, fmt: str, frame: int, dim: int) -> dict:
    """One frame of a file ASE reads: positions (N, d), box (d,) or None,
    species (N,), diameter (N,) or None, parameters {}."""
    import ase.io

    atoms = ase.io.read(str(path), index=frame, format=fmt)
    if isinstance(atoms, list):  # a format that ignores the index
        atoms = atoms[frame]
    arrays = atoms.arrays
    positions3 = np.asarray(atoms.get_positions(), dtype=float)
    periodic = np.asarray(atoms.pbc, dtype=bool)
    stated = atoms.info.get("dimension")  # written by mdsens's own extended-XYZ export
    if not dim and stated in (2, 3):
        dim = int(stated)
    d = _dimensions(positions3, periodic, dim, str(path))
    box = _orthorhombic_box(atoms.cell.array, periodic, d, str(path))
    if box is not None:
        positions3 = positions3 - np.asarray(atoms.get_celldisp(), dtype=float).reshape(3)
    if "diameter" in arrays:
        diameter = np.asarray(arrays["diameter"], dtype=float).reshape(-1)
    elif "radius" in arrays:
        diameter = 2 * np.asarray(arrays["radius"], dtype=float).reshape(-1)
    else:
        diameter = None
    if "type_id" in arrays:
        species = np.asarray(arrays["type_id"]).reshape(-1).astype(np.int32)
    elif "type" in arrays and np.issubdtype(np.asarray(arrays["type"]).dtype, np.integer):
        types = np.asarray(arrays["type"]).reshape(-1)
        species = (types - 1).astype(np.int32) if len(types) and types.min() >= 1 else _species_index(types)
    else:
        species = _species_index(atoms.numbers)
    return {"positions": positions3[:, :d], "box": box, "species": species, "diameter": diameter,
            "parameters": {}}


def read_gsd(path: Path, frame: int, dim: int) -> dict:
    """One frame of a HOOMD GSD file (positions shifted from the centered box to [0, L))."""
    try:
        import gsd.hoomd
    except ImportError:
        raise UsageError("from_file: reading GSD needs the gsd package: pip install gsd") from None
    with gsd.hoomd.open(str(path), "r") as trajectory:
        count = len(trajectory)
        if not -count <= frame < count:
            raise UsageError(f"from_file: {path}: frame={frame} but the file has {count} frame(s)")
        snap = trajectory[frame]
    positions3 = np.asarray(snap.particles.position, dtype=float).reshape(-1, 3)
    lx, ly, lz, xy, xz, yz = (float(v) for v in snap.configuration.box)
    if any((xy, xz, yz)):
        raise UsageError(f"from_file: {path}: triclinic (tilted) box, xy={xy:g} xz={xz:g} yz={yz:g}; "
                         "mdsens supports only orthorhombic boxes")
    file_dim = int(snap.configuration.dimensions)
    d = dim or file_dim
    if d == 2 and file_dim == 3:
        d = _dimensions(positions3, np.array([True, True, False]), 2, str(path))
    edges = np.array([lx, ly, lz])[:d]
    free_space = bool(np.asarray(snap.log.get("mdsens/free_space", 0)).reshape(-1)[:1].sum())
    if np.any(edges <= 0):
        raise UsageError(f"from_file: {path}: box edges {edges.tolist()} in {d}D must be positive")
    positions = positions3[:, :d] + edges / 2
    types = np.asarray(snap.particles.typeid).reshape(-1).astype(np.int32)
    return {"positions": positions, "box": None if free_space else edges, "species": types,
            "diameter": np.asarray(snap.particles.diameter, dtype=float).reshape(-1), "parameters": {}}


def read_positions(path: str, fmt: str = "", frame: int = -1, dim: int = 0) -> dict:
    """A file as a dict with positions (N, d), box (d,) or None, species (N,),
    diameter (N,) or None, and parameters; UsageError if unreadable."""
    file = Path(path)
    if not path:
        raise UsageError("from_file needs path=FILE (mdsens .h5, GSD, extended XYZ, LAMMPS data/dump, POSCAR, "
                         "CIF, ...)")
    if not file.is_file():
        raise UsageError(f"from_file: {path}: no such file")
    fmt = fmt or guess_format(file)
    try:
        if fmt == "mdsens":
            from mdsens import io

            if frame not in (0, -1):
                raise UsageError(f"from_file: {path}: frame={frame}, but an mdsens file holds one frame")
            data = io.read(file)
            if dim and dim != np.asarray(data["positions"]).shape[1]:
                raise UsageError(f"from_file: {path}: dim={dim}, but the file is "
                                 f"{np.asarray(data['positions']).shape[1]}D")
            return data
        if fmt == "gsd":
            return read_gsd(file, frame, dim)
        return read_ase(file, fmt, frame, dim)
    except UsageError:
        raise
    except Exception as err:  # the readers' own errors: one line, exit code 2
        lines = str(err).strip().splitlines()
        reason = lines[0] if lines else err.__class__.__name__
        raise UsageError(f"from_file: {path}: cannot read as {fmt}: {reason}") from None


def _scalar(parameters: dict, name: str) -> float:
    value = np.asarray(parameters.get(name, _DEFAULTS[name]), dtype=float)
    return float(value) if value.ndim == 0 else _DEFAULTS[name]


def _diameters(data: dict, species: np.ndarray, per_species: tuple, path: str) -> np.ndarray:
    """Per-particle diameters: ``diameter=`` per species, else the file's, else 1."""
    n = len(species)
    if per_species:
        if species.max() >= len(per_species):
            raise UsageError(f"from_file: diameter= gives {len(per_species)} value(s) but {path} has "
                             f"species 0..{int(species.max())}")
        return np.asarray(per_species, dtype=float)[species]
    if data.get("diameter") is None:
        return np.ones(n)
    diameter = np.asarray(data["diameter"], dtype=float).reshape(-1)
    if diameter.shape != (n,) or not np.all(np.isfinite(diameter) & (diameter > 0)):
        raise UsageError(f"from_file: {path}: per-particle diameters must be {n} positive numbers")
    return diameter


def build(path: str, potential: str, onset: float, cutoff: float, format: str = "", frame: int = -1,
          dim: int = 0, diameter: tuple = (), seed: int = 0) -> System:
    data = read_positions(path, format, frame, dim)
    positions = np.asarray(data["positions"], dtype=float)
    n, d = positions.shape
    if d not in (2, 3) or n < 2:
        raise UsageError(f"from_file: {path}: need at least 2 particles in 2 or 3 dimensions, got {positions.shape}")
    species = np.asarray(data["species"] if data.get("species") is not None else np.zeros(n)).reshape(-1)
    species = species.astype(np.int32) if species.size == 0 or species.min() >= 0 else _species_index(species)
    if species.shape != (n,):
        raise UsageError(f"from_file: {path}: {species.size} species for {n} particles")
    data = dict(data, diameter=_diameters(data, species, diameter, path))
    file_params = data.get("parameters") or {}
    params: dict = {}
    radius = None
    if potential == "harmonic":
        params["diameter"] = jnp.asarray(np.asarray(data["diameter"], dtype=float))
        params["epsilon"] = jnp.asarray(_scalar(file_params, "epsilon"))
        params["alpha"] = jnp.asarray(_scalar(file_params, "alpha"))
        pair, contact = soft_sphere_pair(np.arange(n))
        radius = soft_sphere_radius(np.arange(n))
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
        if box.shape != (d,):
            raise UsageError(f"from_file: {path}: box {box.tolist()} does not match {d} dimensions")
        check_minimum_image("from_file", box, reach)
        positions = np.mod(positions, box)
        params["box"] = jnp.asarray(box)
    config = {"path": str(path), "potential": potential, "onset": onset, "cutoff": cutoff,
              "format": format, "frame": frame, "dim": dim}
    if diameter:
        config["diameter"] = list(diameter)
    return System("from_file", positions, species, params, pair, cutoff=cutoff_fn, contact=contact, config=config,
                  specialize=("alpha",) if potential == "harmonic" else (), radius=radius)


FAMILY = Family(
    name="from_file",
    description="positions from a file (mdsens HDF5, GSD, extended XYZ, LAMMPS data/dump, POSCAR, CIF, XYZ; "
                "orthorhombic boxes only, triclinic cells are refused), with a chosen potential "
                "(harmonic soft spheres, Lennard-Jones or Morse)",
    keys=(
        Key("path", "str", "", "the file to start from: mdsens .h5, HOOMD .gsd, or anything ASE reads "
                               "(.xyz, LAMMPS .data/.dump, POSCAR, .cif); orthorhombic boxes only "
                               "(a triclinic cell is refused)"),
        Key("format", "str", "", "the file's format when its name does not say: mdsens, gsd, or an ASE format "
                                 "(extxyz, xyz, lammps-data, lammps-dump-text, vasp, cif); default: guessed",
            _check_format),
        Key("frame", "int", -1, "which frame of a trajectory (GSD, XYZ, LAMMPS dump): 0 first, -1 last"),
        Key("dim", "int", 0, "0: from the file (2D if z is constant and not periodic, or GSD dimensions=2); "
                             "2 or 3 to override (LAMMPS 2D files: dim=2)", one_of(0, 2, 3)),
        Key("diameter", "floats", (), "per-species diameters D0,D1,... (default: the file's per-particle "
                                      "diameter/radius, else 1)", positive),
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
