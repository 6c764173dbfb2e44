"""Input from the files physicists have, through the real libraries: every
format ``from_file`` reads (ASE's extended XYZ, plain XYZ, LAMMPS data and
dump, POSCAR, CIF; HOOMD's GSD), written by ASE or gsd and read back with
positions, box, species and diameters intact; triclinic cells refused; the
``format``, ``frame``, ``dim`` and ``diameter`` keys; and ``mdsens export
--format gsd`` read back with ``gsd.hoomd``. No relaxation: small synthetic
packings (N = 12), also in sheared (triclinic) cells as a fixed-pressure run
with ``box_dof=shear`` writes them, exported to all three formats and read
back with ASE, h5py / MDAnalysis and gsd."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mdsens import export, io, systems
from mdsens.systems import UsageError

ase = pytest.importorskip("ase")
ase_io = pytest.importorskip("ase.io")
gsd_hoomd = pytest.importorskip("gsd.hoomd")

SIZES = np.array([1.0, 1.4])  # per-species diameters
N = 12


def packing(dim: int, periodic: bool = True, seed: int = 0) -> dict:
    """An mdsens record: N particles of two species in a box (or free space)."""
    rng = np.random.default_rng(seed)
    box = np.array([5.0, 6.0, 7.0][:dim])
    species = np.arange(N) % 2
    positions = rng.uniform(0, 1, (N, dim)) * box
    return {"positions": positions, "box": box if periodic else None, "species": species,
            "diameter": SIZES[species], "rattler": np.zeros(N, bool), "parameters": {"diameter": SIZES},
            "observables": {}, "sensitivity": {}, "gradient": {}, "meta": {"system": "bidisperse"}}


def atoms_of(record: dict, arrays: bool = True):
    """ASE Atoms: species s as element s + 1 (H, He), z = 0 for 2D."""
    positions = np.asarray(record["positions"])
    dim = positions.shape[1]
    x = np.pad(positions, [(0, 0), (0, 3 - dim)])
    if record["box"] is None:
        atoms = ase.Atoms(numbers=record["species"] + 1, positions=x, pbc=False)
    else:
        edges = list(record["box"]) + [1.0] * (3 - dim)
        atoms = ase.Atoms(numbers=record["species"] + 1, positions=x, cell=np.diag(edges),
                          pbc=[True] * dim + [False] * (3 - dim))
    if arrays:
        atoms.set_array("diameter", np.asarray(record["diameter"], dtype=float))
    return atoms


def load(path, **keys):
    return systems.get("from_file").build(path=str(path), potential="harmonic", **keys)


def assert_same(system, record, atol=1e-12, diameters=True):
    """Positions (modulo the box), box, species and diameters agree."""
    x, x0 = np.asarray(system.positions), np.asarray(record["positions"])
    assert system.dim == x0.shape[1] and system.n == len(x0)
    delta = x - x0
    if record["box"] is None:
        assert not system.periodic
        # free space: a uniform shift is allowed (GSD centers the cluster)
        delta = delta - delta.mean(axis=0)
    else:
        box = np.asarray(system.params["box"])
        np.testing.assert_allclose(box, record["box"], rtol=1e-7 if atol > 1e-9 else 1e-15)
        delta -= box * np.round(delta / box)
    assert np.max(np.abs(delta)) <= atol
    np.testing.assert_array_equal(np.asarray(system.species), record["species"])
    if diameters:
        np.testing.assert_allclose(np.asarray(system.params["diameter"]), record["diameter"],
                                   rtol=1e-7 if atol > 1e-9 else 1e-15)


# -- through ASE ----------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_our_extxyz_export(tmp_path, dim):
    # Our own export (type_id, diameter, radius, rattler; 2D as z = 0, pbc "T T F").
    record = packing(dim)
    path = tmp_path / "run.xyz"
    export.to_extxyz(record, path)
    assert_same(load(path), record)


def test_extxyz_radius_and_2d_free_space(tmp_path):
    record = packing(2, periodic=False)
    atoms = atoms_of(record, arrays=False)
    atoms.set_array("radius", np.asarray(record["diameter"]) / 2)
    path = tmp_path / "cluster.xyz"
    ase_io.write(path, atoms, format="extxyz")
    system = load(path)  # z all 0, not periodic: 2D free space
    assert_same(system, record, atol=1e-7)  # ASE writes 8 decimals
    assert set(system.params) == {"diameter", "epsilon", "alpha"}
    assert load(path, dim=3).dim == 3


def test_plain_xyz_species_from_symbols(tmp_path):
    record = packing(3, periodic=False)
    path = tmp_path / "plain.xyz"
    ase_io.write(path, atoms_of(record, arrays=False), format="xyz")
    assert_same(load(path, diameter=tuple(SIZES)), record, atol=1e-7)
    # no diameters in the file, none given: all 1
    np.testing.assert_array_equal(np.asarray(load(path).params["diameter"]), np.ones(N))


@pytest.mark.parametrize("fmt, name", [("vasp", "POSCAR"), ("cif", "box.cif"), ("lammps-data", "box.data")])
def test_ase_formats_round_trip(tmp_path, fmt, name):
    record = packing(3)
    path = tmp_path / name
    options = {"atom_style": "atomic"} if fmt == "lammps-data" else {}
    ase_io.write(path, atoms_of(record, arrays=False), format=fmt, **options)
    # species from LAMMPS types (1-based) or from the symbols H, He; sizes by species
    assert_same(load(path, diameter=tuple(SIZES)), record, atol=1e-10)


def write_dump(path: Path, frames: list[dict]) -> None:
    """A LAMMPS text dump (``dump atom custom id type x y z``), one block a frame."""
    lines = []
    for step, record in enumerate(frames):
        box = record["box"]
        lines += ["ITEM: TIMESTEP", str(step), "ITEM: NUMBER OF ATOMS", str(N), "ITEM: BOX BOUNDS pp pp pp"]
        lines += [f"0.0 {float(edge)!r}" for edge in box]
        lines.append("ITEM: ATOMS id type x y z")
        for i, (x, s) in enumerate(zip(record["positions"], record["species"])):
            lines.append(f"{i + 1} {s + 1} " + " ".join(repr(float(v)) for v in x))
    path.write_text("\n".join(lines) + "\n")


def test_lammps_dump_frames(tmp_path):
    first, last = packing(3, seed=1), packing(3, seed=2)
    path = tmp_path / "traj.lammpstrj"
    write_dump(path, [first, last])
    assert_same(load(path, diameter=tuple(SIZES)), last)
    assert_same(load(path, diameter=tuple(SIZES), frame=0), first)


def test_lammps_2d_needs_dim(tmp_path):
    # LAMMPS 2D: z = 0 but periodic in z (a thin box): 3D unless dim=2.
    record = packing(2)
    atoms = atoms_of(record, arrays=False)
    atoms.pbc = True
    atoms.cell[2, 2] = 3.0
    path = tmp_path / "flat.data"
    ase_io.write(path, atoms, format="lammps-data", atom_style="atomic")
    assert load(path).dim == 3
    assert_same(load(path, dim=2, diameter=tuple(SIZES)), record, atol=1e-10)
    ase_io.write(path, atoms_of(packing(3), arrays=False), format="lammps-data", atom_style="atomic")
    with pytest.raises(UsageError, match="z coordinates are not all equal"):
        load(path, dim=2)


def test_format_key(tmp_path):
    record = packing(3)
    path = tmp_path / "configuration.txt"  # the name says nothing
    ase_io.write(path, atoms_of(record, arrays=False), format="lammps-data", atom_style="atomic")
    with pytest.raises(UsageError):
        load(path)
    assert_same(load(path, format="lammps-data", diameter=tuple(SIZES)), record, atol=1e-10)
    with pytest.raises(UsageError, match="format='pdf'"):
        load(path, format="pdf")
    with pytest.raises(UsageError, match="cannot read as cif"):
        load(path, format="cif")


def test_diameter_key_must_cover_the_species(tmp_path):
    path = tmp_path / "plain.xyz"
    ase_io.write(path, atoms_of(packing(3, periodic=False), arrays=False), format="xyz")
    with pytest.raises(UsageError, match="species 0..1"):
        load(path, diameter=(1.0,))


# -- triclinic cells are refused --------------------------------------------------


def tilted(tmp_path) -> Path:
    atoms = atoms_of(packing(3))
    atoms.set_cell([[5.0, 0, 0], [1.0, 6.0, 0], [0, 0, 7.0]], scale_atoms=False)
    path = tmp_path / "tilted.xyz"
    ase_io.write(path, atoms, format="extxyz")
    return path


def test_triclinic_refused(tmp_path):
    with pytest.raises(UsageError, match="triclinic") as err:
        load(tilted(tmp_path))
    assert "\n" not in str(err.value) and "orthorhombic" in str(err.value)


def test_triclinic_refused_by_the_cli(tmp_path):
    from mdsens.cli import app

    result = CliRunner().invoke(app, ["run", "from_file", "--set", f"path={tilted(tmp_path)}",
                                      "-o", str(tmp_path / "out.h5"), "--quiet"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "triclinic" in result.stderr
    assert not (tmp_path / "out.h5").exists()


# -- GSD ------------------------------------------------------------------------


def gsd_frame(record: dict, tilt=(0.0, 0.0, 0.0)):
    x = np.asarray(record["positions"])
    n, dim = x.shape
    frame = gsd_hoomd.Frame()
    frame.configuration.dimensions = dim
    frame.configuration.box = list(record["box"]) + [0.0] * (3 - dim) + list(tilt)
    frame.particles.N = n
    frame.particles.position = np.pad(x - record["box"] / 2, [(0, 0), (0, 3 - dim)]).astype(np.float32)
    frame.particles.types = ["A", "B"]
    frame.particles.typeid = np.asarray(record["species"], dtype=np.uint32)
    frame.particles.diameter = np.asarray(record["diameter"], dtype=np.float32)
    return frame


def test_gsd_frames_and_dimensions(tmp_path):
    frames = [packing(3, seed=1), packing(3, seed=2)]
    path = tmp_path / "traj.gsd"
    with gsd_hoomd.open(path, "w") as trajectory:
        for record in frames:
            trajectory.append(gsd_frame(record))
    assert_same(load(path), frames[1], atol=1e-5)  # float32
    assert_same(load(path, frame=0), frames[0], atol=1e-5)
    assert_same(load(path, frame=-2), frames[0], atol=1e-5)
    with pytest.raises(UsageError, match="frame=2 but the file has 2 frame"):
        load(path, frame=2)

    flat = packing(2)
    path = tmp_path / "flat.bin"  # the content says GSD
    with gsd_hoomd.open(path, "w") as trajectory:
        trajectory.append(gsd_frame(flat))
    assert_same(load(path), flat, atol=1e-5)
    assert_same(load(path, format="gsd"), flat, atol=1e-5)


def test_gsd_tilted_box_refused(tmp_path):
    path = tmp_path / "tilted.gsd"
    with gsd_hoomd.open(path, "w") as trajectory:
        trajectory.append(gsd_frame(packing(3), tilt=(0.2, 0.0, 0.0)))
    with pytest.raises(UsageError, match="triclinic") as err:
        load(path)
    assert "\n" not in str(err.value)


# -- mdsens export --format gsd ---------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_export_gsd_reads_back(tmp_path, dim):
    from mdsens.cli import app

    record = packing(dim)
    source, out = tmp_path / "run.h5", tmp_path / "run.gsd"
    io.write(source, record)
    result = CliRunner().invoke(app, ["export", str(source), "--format", "gsd", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with gsd_hoomd.open(out, "r") as trajectory:
        assert len(trajectory) == 1
        frame = trajectory[0]
    box = np.asarray(frame.configuration.box)
    assert frame.configuration.dimensions == dim
    np.testing.assert_allclose(box[:dim], record["box"], rtol=1e-7)
    assert np.all(box[3:] == 0) and (box[2] == 0 if dim == 2 else box[2] > 0)
    x = np.asarray(frame.particles.position, dtype=float)
    half = box[:dim] / 2
    assert np.all(x[:, :dim] >= -half) and np.all(x[:, :dim] < half) and np.all(x[:, dim:] == 0)
    np.testing.assert_allclose(x[:, :dim] + half, record["positions"], atol=1e-5)
    assert list(frame.particles.types) == ["A", "B"]
    np.testing.assert_array_equal(frame.particles.typeid, record["species"])
    np.testing.assert_allclose(frame.particles.diameter, record["diameter"], rtol=1e-7)
    assert_same(load(out), record, atol=1e-5)


def test_export_gsd_free_space(tmp_path):
    record = packing(3, periodic=False)
    source, out = tmp_path / "cluster.h5", tmp_path / "cluster.gsd"
    io.write(source, record)
    export.export(source, "gsd", out)
    with gsd_hoomd.open(out, "r") as trajectory:
        frame = trajectory[0]
    x = np.asarray(frame.particles.position)
    assert np.all(np.abs(x) < np.asarray(frame.configuration.box[:3]) / 2)
    assert_same(load(out), record, atol=1e-5)  # marked free space: read back without a box


# -- sheared (triclinic) cells: mdsens export of a box_dof=shear run -----------------


@pytest.fixture(scope="module")
def sheared(tmp_path_factory) -> dict[str, Path]:
    """mdsens files with a sheared cell (edge vectors as rows, as a
    ``box_dof=shear`` run writes it through :func:`mdsens.io.write`), 2D and
    3D. The cells are not symmetric (a relaxed cell exp(U) L is, when turned it
    is not), so a transposed cell is a different cell. Synthetic: a shear run
    costs over a minute of compilation on 2 cores."""
    folder = tmp_path_factory.mktemp("sheared")
    out = {}
    for d, cell in ((2, np.array([[4.6, 0.7], [-1.1, 5.2]])),
                    (3, np.array([[5.0, 0.3, -0.4], [1.2, 6.0, 0.5], [-0.8, 1.5, 7.0]]))):
        record = packing(d, seed=d)
        fractions = np.random.default_rng(d).uniform(0, 1, (N, d))
        out[f"{d}d"] = folder / f"triclinic{d}d.h5"
        io.write(out[f"{d}d"], {**record, "box": cell, "positions": fractions @ cell})
    return out


def cell_geometry(cell: np.ndarray) -> np.ndarray:
    """Rotation-invariant: the edge lengths, the angles between edges (radians) and the volume."""
    lengths = np.linalg.norm(cell, axis=1)
    pairs = [(i, j) for i in range(len(cell)) for j in range(i + 1, len(cell))]
    angles = [np.arccos(cell[i] @ cell[j] / (lengths[i] * lengths[j])) for i, j in pairs]
    return np.concatenate([lengths, angles, [abs(np.linalg.det(cell))]])


def image_distances(positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Every pair's minimum-image distance (over the 3^d images of the nearest fractional offset)."""
    import itertools

    fractions = positions @ np.linalg.inv(cell)
    delta = fractions[:, None] - fractions[None]
    delta -= np.round(delta)
    shifts = np.array(list(itertools.product((-1, 0, 1), repeat=len(cell))))
    r = np.linalg.norm((delta[:, :, None, :] + shifts) @ cell, axis=-1).min(axis=-1)
    return r[np.triu_indices(len(positions), 1)]


def assert_same_cell(cell, positions, record, atol, shift=0.0):
    """An exported (d, d) cell and (N, d) positions hold the record's packing:
    cell lengths, angles and volume, each particle's fractional coordinates
    (mod 1, after adding ``shift``) and every minimum-image distance."""
    ref_cell, ref_x = np.asarray(record["box"]), np.asarray(record["positions"])
    np.testing.assert_allclose(cell_geometry(cell), cell_geometry(ref_cell), rtol=atol, atol=atol)
    delta = positions @ np.linalg.inv(cell) + shift - ref_x @ np.linalg.inv(ref_cell)
    assert np.max(np.abs(delta - np.round(delta))) <= atol
    np.testing.assert_allclose(image_distances(positions, cell), image_distances(ref_x, ref_cell), rtol=0, atol=atol)


@pytest.mark.parametrize("fmt", ["extxyz", "h5md3d", "gsd"])
def test_export_sheared_cell(sheared, tmp_path, fmt):
    import warnings

    import h5py

    mda = pytest.importorskip("MDAnalysis") if fmt == "h5md3d" else None
    from mdsens.cli import app

    for name, source in sheared.items():
        record = io.read(source)
        d = record["positions"].shape[1]
        out = tmp_path / f"{name}.{dict(extxyz='xyz', h5md3d='h5md', gsd='gsd')[fmt]}"
        result = CliRunner().invoke(app, ["export", str(source), "--format", fmt, "-o", str(out)])
        assert result.exit_code == 0, result.output
        if fmt == "extxyz":  # float64 text; Lattice="a b c" as rows; 2D: the slab along z
            atoms = ase_io.read(out, format="extxyz")
            cell = np.asarray(atoms.cell)
            assert list(atoms.pbc) == [True] * d + [False] * (3 - d)
            np.testing.assert_allclose(atoms.positions[:, :d], record["positions"], rtol=0, atol=1e-14)
            np.testing.assert_array_equal(cell[d:, :d], 0.0)
            assert_same_cell(cell[:d, :d], atoms.positions[:, :d], record, atol=1e-12)
            scaled = atoms.get_scaled_positions()[:, :d] - record["positions"] @ np.linalg.inv(record["box"])
            assert np.max(np.abs(scaled - np.round(scaled))) <= 1e-12
        elif fmt == "h5md3d":  # float64 (3, 3) edges, rows the edge vectors; MDAnalysis keeps float32
            with h5py.File(out) as f:
                edges = f["particles/trajectory/box/edges/value"][()]
                x = f["particles/trajectory/position/value"][0]
            assert edges.shape == (1, 3, 3)
            cell = edges[0]
            assert_same_cell(cell[:d, :d], x[:, :d], record, atol=1e-12)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # masses of unnamed particles
                universe = mda.Universe(str(out))
            dims = universe.trajectory.ts.dimensions
            np.testing.assert_allclose(dims[:3], np.linalg.norm(cell, axis=1), rtol=1e-6)
            np.testing.assert_allclose(np.deg2rad(dims[3:]), cell_geometry(cell)[[5, 4, 3]], atol=1e-6)
            np.testing.assert_allclose(universe.atoms.positions, x, rtol=1e-6, atol=1e-6)
        else:  # HOOMD: [Lx, Ly, Lz, xy, xz, yz], a1 = (Lx,0,0), a2 = (xy Ly, Ly, 0), a3 = (xz Lz, yz Lz, Lz); float32
            with gsd_hoomd.open(out, "r") as trajectory:
                frame = trajectory[0]
            lx, ly, lz, xy, xz, yz = (float(v) for v in frame.configuration.box)
            assert frame.configuration.dimensions == d
            if d == 2:
                assert lz == 0 and xz == 0 and yz == 0
            cell = np.array([[lx, 0, 0], [xy * ly, ly, 0], [xz * lz, yz * lz, lz]])[:d, :d]  # rows a1, a2, a3
            x = np.asarray(frame.particles.position, dtype=np.float64)
            assert np.all(x[:, d:] == 0)
            fractions = x[:, :d] @ np.linalg.inv(cell)
            assert np.all(fractions >= -0.5) and np.all(fractions < 0.5)  # HOOMD's box, centred
            assert_same_cell(cell, x[:, :d], record, atol=2e-6, shift=0.5)


def test_export_left_handed_cell_to_gsd_refused(sheared, tmp_path):
    # HOOMD's cell is right-handed (Lx, Ly, Lz > 0): a mirrored cell is one line, exit 1, no file;
    # extxyz takes it as it is.
    from mdsens.cli import app

    record = io.read(sheared["3d"])
    mirrored = tmp_path / "mirrored.h5"
    io.write(mirrored, {**record, "box": record["box"][[1, 0, 2]]})
    out = tmp_path / "mirrored.gsd"
    result = CliRunner().invoke(app, ["export", str(mirrored), "--format", "gsd", "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and "left-handed" in result.stderr
    assert not out.exists()
    result = CliRunner().invoke(app, ["export", str(mirrored), "--format", "extxyz", "-o", str(tmp_path / "m.xyz")])
    assert result.exit_code == 0, result.output
