"""The output file: H5MD 1.1 conformance (checked with pyh5md), units and
descriptions, round trip, atomic writes, one-line errors for bad files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from mdsens import io
from mdsens.job import Job, execute

pyh5md = pytest.importorskip("pyh5md")


@pytest.fixture(scope="module")
def record():
    # The smallest reference-like run: 16 disks, derivatives w.r.t. both diameters.
    result = execute(Job(overrides={"n": "16"}, command="test"))
    assert result.converged
    return result.record()


@pytest.fixture
def written(record, tmp_path) -> Path:
    path = tmp_path / "run.h5"
    io.write(path, record)
    return path


def test_pyh5md_reads_the_file(written, record):
    n, d = np.shape(record["positions"])
    with pyh5md.File(str(written), "r") as f:
        assert list(f["h5md"].attrs["version"]) == [1, 1]
        assert f["h5md/author"].attrs["name"]
        assert f["h5md/creator"].attrs["name"] == "mdsens"
        assert f["h5md/creator"].attrs["version"]
        assert list(f["h5md/modules/mdsens"].attrs["version"]) == list(io.FORMAT_VERSION)
        assert f["h5md/modules/units"].attrs["system"] == "reduced"
        group = f.particles_group("all")
        position = pyh5md.element(group, "position")
        assert position.element_type == "TimeElement"
        assert position.value.shape == (1, n, d)
        assert position.step.shape == (1,) and position.step.dtype.kind == "i"
        assert position.time.shape == (1,) and position.time.dtype.kind == "f"
        np.testing.assert_array_equal(position.value[0], record["positions"])
        box = group["box"]
        assert box.attrs["dimension"] == d
        assert [b.decode() if isinstance(b, bytes) else b for b in box.attrs["boundary"]] == ["periodic"] * d
        edges = pyh5md.element(box, "edges")
        assert edges.element_type == "FixedElement"
        np.testing.assert_array_equal(edges[()], record["box"])
        for name in ("species", "diameter", "rattler"):
            element = pyh5md.element(group, name)
            assert element.element_type == "FixedElement" and element.shape == (n,)
        # Our own top-level groups are declared by the module.
        declared = set(f["h5md/modules/mdsens"].attrs["groups"])
        assert {"parameters", "observables", "sensitivity"} <= {str(g) for g in declared}


# H5MD units module: factors "symbol[±power]" separated by spaces, at most one leading number.
_UNIT = re.compile(r"^(\d+(\.\d+)?( |$))?([A-Za-z_]+([+-]\d+)?( |$))*$")


def test_every_dataset_is_described_and_has_a_valid_unit(written):
    unitless = {"/particles/all/species", "/particles/all/rattler", "/particles/all/position/step",
                "/observables/minimizer_steps", "/observables/converged"}
    seen = []
    with h5py.File(written, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and not name.startswith("h5md"):
                path = "/" + name
                seen.append(path)
                assert obj.attrs.get("description"), f"{path} has no description"
                if path not in unitless:
                    assert "unit" in obj.attrs, f"{path} has no unit"
                if "unit" in obj.attrs:
                    assert _UNIT.match(obj.attrs["unit"]), f"{path}: bad unit {obj.attrs['unit']!r}"
        f.visititems(visit)
    assert "/sensitivity/diameter/position" in seen
    units = io.units_of(written)
    assert units["/particles/all/position/value"] == "sigma"
    assert units["/observables/pressure"] == "epsilon sigma-2"
    assert units["/sensitivity/diameter/position"] == "1"  # a length per length
    assert units["/sensitivity/diameter/energy"] == "epsilon sigma-1"
    assert units["/sensitivity/diameter/pressure"] == "epsilon sigma-3"


def test_unit_algebra():
    assert io.divide_units("sigma", "epsilon") == "sigma epsilon-1"
    assert io.divide_units("epsilon sigma-3", "sigma-1") == "epsilon sigma-2"
    assert io.divide_units("1", "sigma") == "sigma-1"
    assert io.divide_units("sigma", None) is None


def test_round_trip(written, record):
    back = io.read(written)
    np.testing.assert_array_equal(back["positions"], record["positions"])
    np.testing.assert_array_equal(back["species"], record["species"])
    np.testing.assert_array_equal(back["diameter"], np.asarray(record["parameters"]["diameter"])[record["species"]])
    for key, entry in record["sensitivity"].items():
        for name, value in entry["values"].items():
            np.testing.assert_array_equal(back["sensitivity"][key]["values"][name], value)
    assert back["meta"]["configuration"]["n"] == 16
    assert back["format_version"] == io.FORMAT_VERSION


# -- never lose or corrupt a file ------------------------------------------------


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_failed_write_leaves_no_file(record, tmp_path):
    bad = dict(record, observables={**record["observables"], "bad": object()})  # HDF5 cannot store it
    with pytest.raises(TypeError):
        io.write(tmp_path / "new.h5", bad)
    assert _listing(tmp_path) == []  # neither the final name nor a temporary file


def test_failed_write_keeps_the_existing_file(record, written):
    before = written.read_bytes()
    bad = dict(record, observables={**record["observables"], "bad": object()})
    with pytest.raises(TypeError):
        io.write(written, bad)
    assert written.read_bytes() == before
    assert _listing(written.parent) == [written.name]


def test_interrupt_mid_write_keeps_the_existing_file(written):
    before = written.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_h5(written) as f:
            f.create_dataset("half", data=np.zeros(10))
            raise KeyboardInterrupt
    assert written.read_bytes() == before
    assert _listing(written.parent) == [written.name]


def _truncated(written: Path) -> Path:
    data = written.read_bytes()
    path = written.with_name("truncated.h5")
    path.write_bytes(data[: len(data) // 2])
    return path


def _foreign(written: Path) -> Path:
    path = written.with_name("foreign.h5")
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    return path


def _lacking(written: Path) -> Path:
    path = written.with_name("lacking.h5")
    path.write_bytes(written.read_bytes())
    with h5py.File(path, "a") as f:
        del f["observables"]
    return path


def _text(written: Path) -> Path:
    path = written.with_name("notes.h5")
    path.write_text("not hdf5\n")
    return path


def _broken_box(written: Path) -> Path:
    path = written.with_name("broken.h5")
    path.write_bytes(written.read_bytes())
    with h5py.File(path, "a") as f:
        del f["particles/all/box"].attrs["boundary"]
    return path


@pytest.mark.parametrize("make, words", [
    (_truncated, "truncated"), (_foreign, "not an mdsens file"), (_lacking, "missing /observables"),
    (_text, "not an HDF5 file"), (_broken_box, "unreadable"),
    (lambda w: w.with_name("absent.h5"), "no such file"), (lambda w: w.parent, "directory"),
])
def test_bad_files_give_one_line_errors(written, make, words):
    path = make(written)
    with pytest.raises(io.FormatError) as info:
        io.read(path)
    message = str(info.value)
    assert words in message and "\n" not in message and str(path) in message
