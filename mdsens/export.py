"""Exports of an mdsens file for the tools physicists already use.

- :func:`to_extxyz`: extended XYZ (ASE, OVITO) with per-particle species,
  diameter, radius, rattler flag and one ∂x*/∂θ vector column per parameter
  element; observables and their derivatives in the comment line.
- :func:`to_h5md3d`: an H5MD 1.1 file that MDAnalysis reads: particle group
  ``particles/trajectory``, a 3D box (2D systems are embedded at z = 0 in a
  slab one largest diameter thick), time-dependent box edges, and ``unit`` /
  ``time`` attributes MDAnalysis recognises.
- :func:`to_gsd`: one frame of HOOMD's GSD (HOOMD-blue, OVITO, freud) through
  the ``gsd`` package: positions in the centered box [−L/2, L/2), box,
  ``typeid``, ``types``, ``diameter`` and ``dimensions`` (a 2D box has
  Lz = 0). GSD stores float32. A free-space system gets a box that encloses
  it with a margin, marked ``log/mdsens/free_space`` = 1 so that
  ``from_file`` reads it back as free space.

A sheared (triclinic) cell of a fixed-pressure run (``box_dof=shear``; the
record's ``box`` is then the (d, d) matrix of edge vectors as rows) is written
as that cell: extxyz's ``Lattice`` is the 3×3 matrix of rows a, b, c; h5md3d's
``box/edges`` is the (3, 3) matrix of edge vectors as rows (H5MD's triclinic
box); both keep the positions as they are (real space). GSD needs HOOMD's
upper-triangular form, a1 = (Lx, 0, 0), a2 = (xy Ly, Ly, 0),
a3 = (xz Lz, yz Lz, Lz): the cell and the positions are rotated into it (QR
of the cell's transpose, diagonal made positive) and the positions wrapped to
fractional coordinates in [−½, ½). A 2D cell is embedded in 3D with the slab
(or, in GSD, Lz = 0) along z. A rectangular cell is written exactly as a box of
side lengths.

All take the record of :func:`mdsens.io.read`. Lengths stay in reduced units
(the reference length σ); in the H5MD export they are *labelled* ``A``
(Ångström, MDAnalysis's native length, so it converts nothing) because
MDAnalysis refuses reduced unit names — the ``reduced_unit`` attribute beside
says what the numbers really are.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from mdsens import io, names, observables

FORMATS = ("extxyz", "h5md3d", "gsd")

# Placeholder chemical symbols: ASE only accepts element names in the species
# column, so species s is written as the element of atomic number s + 1; the
# true species index is the ``type_id`` column.
_SYMBOLS = ("H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn").split()


def symbol(species: int) -> str:
    """The placeholder element symbol written for species index ``species``."""
    return _SYMBOLS[int(species) % len(_SYMBOLS)]


def _embed(a: np.ndarray) -> np.ndarray:
    """(..., d) → (..., 3), zero-padding the missing components."""
    a = np.asarray(a, dtype=np.float64)
    pad = [(0, 0)] * (a.ndim - 1) + [(0, 3 - a.shape[-1])]
    return np.pad(a, pad)


def _column_name(text: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text).strip("_")


def derivative_fields(record: Mapping[str, Any]) -> Iterator[tuple[str, str, np.ndarray]]:
    """Every ∂x*/∂θ field in the record: (column name, label, (N, d) array).

    ``/sensitivity/diameter/position`` (2, N, d) gives ``dx_ddiameter_0`` and
    ``dx_ddiameter_1``; ``diameter[1]`` (N, d) gives ``dx_ddiameter_1``."""
    for wrt, entry in record.get("sensitivity", {}).items():
        u = np.asarray(entry["values"]["position"])
        lead = u.shape[:-2]
        stored = names.parse(wrt)
        if not lead:
            yield f"dx_d{stored.column}", str(stored), u
            continue
        for element in names.elements(stored.base, lead):
            yield f"dx_d{element.column}", str(element), u[element.index]


def _slab(record: Mapping[str, Any]) -> float:
    return float(np.max(record["diameter"])) if len(record["diameter"]) else 1.0


def _triclinic(box: Any) -> bool:
    return box is not None and np.ndim(box) == 2


def _cell3(record: Mapping[str, Any]) -> np.ndarray:
    """The (3, 3) lattice (edge vectors as rows) of a periodic record: a
    sheared (d, d) cell or the box's side lengths on the diagonal; for 2D the
    third vector is a slab one largest diameter thick along z."""
    box = np.asarray(record["box"], dtype=np.float64)
    cell = box if box.ndim == 2 else np.diag(box)
    d = cell.shape[0]
    out = np.zeros((3, 3))
    out[:d, :d] = cell
    if d == 2:
        out[2, 2] = _slab(record)
    return out


def _info_value(value: Any) -> str:
    v = np.asarray(value)
    if v.dtype == bool:
        return "T" if bool(v) else "F"
    if v.ndim == 0:
        return repr(v.item())
    return '"' + " ".join(repr(x) for x in v.ravel().tolist()) + '"'


def to_extxyz(record: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``record`` as one extended-XYZ frame (atomically)."""
    positions = np.asarray(record["positions"])
    n, d = positions.shape
    periodic = record["box"] is not None
    columns: list[tuple[str, str, int, np.ndarray]] = [
        ("species", "S", 1, np.array([symbol(s) for s in record["species"]])),
        ("pos", "R", 3, _embed(positions)),
        ("type_id", "I", 1, np.asarray(record["species"], dtype=int)),
        ("diameter", "R", 1, np.asarray(record["diameter"])),
        ("radius", "R", 1, np.asarray(record["diameter"]) / 2),
        ("rattler", "L", 1, np.asarray(record["rattler"], dtype=bool)),
    ]
    for name, _, u in derivative_fields(record):
        columns.append((name, "R", 3, _embed(u)))
    header = []
    if periodic:
        lattice = _cell3(record)  # rows a, b, c
        header.append('Lattice="' + " ".join(repr(float(x)) for x in lattice.ravel()) + '"')
        header.append('pbc="' + " ".join(["T"] * d + (["F"] if d == 2 else [])) + '"')
    else:
        header.append('pbc="F F F"')
    header.append("Properties=" + ":".join(f"{name}:{kind}:{width}" for name, kind, width, _ in columns))
    header.append(f"dimension={d}")
    header.append("length_unit=sigma energy_unit=epsilon")
    meta = record.get("meta", {})
    if meta.get("system"):
        header.append(f"system={_column_name(str(meta['system']))}")
    for name, value in record["observables"].items():
        if np.asarray(value).ndim <= 1:
            header.append(f"{_column_name(name)}={_info_value(value)}")
    for wrt, entry in record.get("sensitivity", {}).items():
        for name, value in entry["values"].items():
            if name != "position" and np.asarray(value).ndim <= 1:
                header.append(f"d{_column_name(name)}_d{names.parse(wrt).column}={_info_value(value)}")
    lines = [str(n), " ".join(header)]
    for i in range(n):
        row = []
        for _, kind, width, data in columns:
            cell = data[i]
            if kind == "R":
                row.extend(f"{float(x):.16g}" for x in np.atleast_1d(cell))
            elif kind == "L":
                row.append("T" if bool(cell) else "F")
            else:
                row.append(str(cell))
        lines.append(" ".join(row))
    _atomic_text(path, "\n".join(lines) + "\n")


def _atomic_text(path: str | os.PathLike, text: str) -> None:
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _time_series(group: h5py.Group, name: str, value: np.ndarray, step: int, unit: str | None,
                 description: str) -> h5py.Group:
    element = group.create_group(name)
    ds = element.create_dataset("value", data=np.asarray(value)[None])
    ds.attrs["description"] = description
    if unit is not None:
        ds.attrs["unit"] = unit
    element.create_dataset("step", data=np.array([step], dtype=np.int64))
    time = element.create_dataset("time", data=np.array([0.0]))
    time.attrs["unit"] = "ps"
    time.attrs["reduced_unit"] = io.TIME
    return element


def to_h5md3d(record: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``record`` as a 3D H5MD file MDAnalysis reads (atomically)."""

    positions = np.asarray(record["positions"])
    n, d = positions.shape
    meta = record.get("meta", {})
    step = int(meta.get("steps", 0))
    periodic = record["box"] is not None
    with io.atomic_h5(path) as f:
        h5md = io.h5md_header(f, meta)
        units = h5md["modules/units"]
        units.attrs["description"] = ("lengths are in units of the reference length sigma, labelled 'A' "
                                      "for MDAnalysis (1 A here = 1 sigma); time is 0, labelled 'ps'")
        module = h5md.create_group("modules/mdsens_export")
        module.attrs["version"] = np.array(io.FORMAT_VERSION, dtype=np.int32)
        module.attrs["description"] = (f"3D embedding of a {d}D mdsens file for MDAnalysis; "
                                       "dx_d<param>_<i> elements are the derivatives dx*/dtheta")

        group = f.create_group("particles/trajectory")
        _time_series(group, "position", _embed(positions), step, "A", "relaxed positions x*, z = 0 for 2D")
        group["position/value"].attrs["reduced_unit"] = io.LENGTH
        box = group.create_group("box")
        box.attrs["dimension"] = np.int32(3)
        if periodic:
            box.attrs["boundary"] = np.array(["periodic"] * d + (["none"] if d == 2 else []),
                                             dtype=h5py.string_dtype())
            if _triclinic(record["box"]):  # H5MD: a (3, 3) edges matrix is a triclinic box, rows the edge vectors
                _time_series(box, "edges", _cell3(record), step, "A",
                             "triclinic cell: the edge vectors as rows; for 2D the third is a slab one largest "
                             "diameter thick along z")
            else:
                edges = list(np.asarray(record["box"], dtype=float)) + ([_slab(record)] if d == 2 else [])
                _time_series(box, "edges", np.asarray(edges), step, "A",
                             "box side lengths; for 2D the third is a slab one largest diameter thick")
            box["edges/value"].attrs["reduced_unit"] = io.LENGTH
        else:
            box.attrs["boundary"] = np.array(["none"] * 3, dtype=h5py.string_dtype())
        group.create_dataset("species", data=np.asarray(record["species"], dtype=np.int32))
        ds = group.create_dataset("diameter", data=np.asarray(record["diameter"], dtype=np.float64))
        ds.attrs["unit"] = "A"
        ds.attrs["reduced_unit"] = io.LENGTH
        group.create_dataset("rattler", data=np.asarray(record["rattler"], dtype=bool))
        system = str(meta.get("system", ""))
        for name, label, u in derivative_fields(record):
            param = names.parse(label).base
            unit = io.divide_units(io.LENGTH, io.parameter_unit(system, param, io.potential_of(meta), d))
            element = _time_series(group, name, _embed(u), step, None, f"dx*/d{label}, z = 0 for 2D")
            if unit is not None:
                element["value"].attrs["reduced_unit"] = unit

        obs = f.create_group("observables")
        for name, value in record["observables"].items():
            unit = io.observable_unit(name, d)
            element = _time_series(obs, name, np.asarray(value), step, None, observables.description(name))
            if unit is not None:
                element["value"].attrs["reduced_unit"] = unit
        parameters = f.create_group("parameters")
        for name, value in record["parameters"].items():
            parameters.create_dataset(name, data=np.asarray(value))
        for key, value in meta.items():
            parameters.attrs[key] = io._attr(value)


def _gsd_module():
    try:
        import gsd.hoomd
    except ImportError:
        raise RuntimeError("the gsd export needs the gsd package: pip install gsd") from None
    return gsd.hoomd


def gsd_type_name(species: int) -> str:
    """HOOMD type name of species index ``species``: A, B, ..., Z, then T26, T27, ..."""
    return chr(ord("A") + species) if species < 26 else f"T{species}"


def _hoomd_cell(cell: np.ndarray) -> np.ndarray:
    """A (d, d) cell (edge vectors as rows, right-handed) in HOOMD's
    orientation: ``h`` upper triangular with a positive diagonal, its COLUMNS
    the rotated edge vectors (a1 = (Lx, 0, 0), a2 = (xy Ly, Ly, 0),
    a3 = (xz Lz, yz Lz, Lz)), with ``cell.T = Q h`` for an orthogonal Q
    (positions are placed through their fractional coordinates, so Q itself
    is not needed)."""
    q, r = np.linalg.qr(np.asarray(cell, dtype=np.float64).T)  # cell.T = q r: r's columns, the edges in frame q
    return np.where(np.diag(r) < 0, -1.0, 1.0)[:, None] * r


def _hoomd_box(cell: np.ndarray) -> tuple[list[float], np.ndarray]:
    """HOOMD's [Lx, Ly, Lz, xy, xz, yz] of a (d, d) cell (each as float32
    rounds it) and the (d, d) upper-triangular matrix they stand for."""
    h = _hoomd_cell(cell)
    d = len(h)
    lx, ly = h[0, 0], h[1, 1]
    lz = h[2, 2] if d == 3 else 0.0
    tilts = [h[0, 1] / ly, h[0, 2] / lz if d == 3 else 0.0, h[1, 2] / lz if d == 3 else 0.0]
    box = [float(np.float32(v)) for v in (lx, ly, lz, *tilts)]
    lx, ly, lz, xy, xz, yz = box
    matrix = np.array([[lx, xy * ly, xz * lz], [0.0, ly, yz * lz], [0.0, 0.0, lz]])[:d, :d]
    return box, matrix


def _gsd_triclinic(positions: np.ndarray, cell: np.ndarray) -> tuple[list[float], np.ndarray]:
    """Box and float32 positions (N, d) of a sheared cell in HOOMD's frame:
    fractional coordinates wrapped into [−½, ½) (the rectangular export's
    centring, x − L/2 for x in [0, L)), then placed in the rotated cell as
    stored (float32)."""
    if not np.linalg.det(cell) > 0:
        raise ValueError("HOOMD's box holds right-handed cells only (Lx, Ly, Lz > 0)")
    box, h = _hoomd_box(cell)
    fraction = positions @ np.linalg.inv(cell)  # x = s @ cell
    centered = fraction - np.floor(fraction) - 0.5  # in [-1/2, 1/2)
    inverse = np.linalg.inv(h.T)
    face = 1e-12  # a fractional coordinate this close to -1/2 or 1/2 is on the face
    for _ in range(8):
        stored = (centered @ h.T).astype(np.float32)
        check = stored.astype(np.float64) @ inverse  # the stored positions' own fractions
        high, low = check >= 0.5 - face, check < -0.5 - face
        if not (high.any() or low.any()):
            break
        # float32 rounding onto the +1/2 face wraps to -1/2; past the -1/2 face, step in by 2^-24
        centered = np.where(high, -0.5, np.where(low, centered + 2.0**-24, centered))
    return box, stored


def to_gsd(record: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``record`` as one HOOMD GSD frame (atomically)."""
    import tempfile

    hoomd = _gsd_module()
    positions = np.asarray(record["positions"], dtype=np.float64)
    n, d = positions.shape
    species = np.asarray(record["species"], dtype=np.int64).reshape(-1)
    diameter = np.asarray(record["diameter"], dtype=np.float64).reshape(-1)
    periodic = record["box"] is not None
    if _triclinic(record["box"]):
        box, stored = _gsd_triclinic(positions, np.asarray(record["box"], dtype=np.float64))
    else:
        if periodic:
            edges = np.asarray(record["box"], dtype=np.float64).reshape(-1)
            centered = positions - edges * (np.floor(positions / edges) + 0.5)  # in [-L/2, L/2)
        else:  # a box that holds the cluster with a margin of two diameters on each side
            low, high = positions.min(axis=0), positions.max(axis=0)
            edges = (high - low) + 4 * _slab(record)
            centered = positions - (low + high) / 2
        half = (edges / 2).astype(np.float32)
        stored = centered.astype(np.float32)
        stored = np.where(stored >= half, -half, stored)  # float32 rounding up to +L/2 wraps to -L/2
        box = [float(np.float32(e)) for e in edges] + ([0.0] if d == 2 else []) + [0.0, 0.0, 0.0]

    frame = hoomd.Frame()
    frame.configuration.step = int(record.get("meta", {}).get("steps", 0))
    frame.configuration.dimensions = d
    frame.configuration.box = box
    frame.particles.N = n
    frame.particles.position = _embed(stored).astype(np.float32)
    count = int(species.max()) + 1 if n else 1
    frame.particles.types = [gsd_type_name(k) for k in range(count)]
    frame.particles.typeid = species.astype(np.uint32)
    frame.particles.diameter = diameter.astype(np.float32)
    if not periodic:
        frame.log["mdsens/free_space"] = np.array([1], dtype=np.int8)

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        with hoomd.open(tmp, "w") as trajectory:
            trajectory.append(frame)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_WRITERS = {"extxyz": to_extxyz, "h5md3d": to_h5md3d, "gsd": to_gsd}


def export(source: str | os.PathLike, fmt: str, output: str | os.PathLike) -> None:
    """Read the mdsens file ``source`` and write it to ``output`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose {', '.join(FORMATS)}")
    record = io.read(source)
    box = record["box"]
    if box is not None and np.ndim(box) == 2:
        box = np.asarray(box, dtype=np.float64)
        if np.array_equal(box, np.diag(np.diag(box))):  # rectangular: side lengths, written as before
            record = {**record, "box": np.diag(box)}
        else:
            volume = np.linalg.det(box)
            if not np.all(np.isfinite(box)) or volume == 0:
                raise io.FormatError(f"{source}: the sheared cell is degenerate (determinant {volume:.6g}); "
                                     f"export to {fmt} needs a cell of nonzero volume")
            if fmt == "gsd" and volume < 0:
                raise io.FormatError(f"{source}: the sheared cell is left-handed (determinant {volume:.6g} < 0), "
                                     "which HOOMD's box cannot hold; export to extxyz or h5md3d")
    _WRITERS[fmt](record, output)
