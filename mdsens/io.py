"""The mdsens output file: H5MD 1.1 where H5MD has a place, plus our groups.

Layout (every path is documented in README.md, "The output file"):

    /h5md                       version=[1, 1]; author/ (name); creator/ (name, version)
    /h5md/modules/mdsens        version of our own groups below
    /particles/all/position/{value (1, N, d), step (1,), time (1,)}
    /particles/all/box          attrs dimension, boundary; dataset edges (d,)
    /particles/all/species      (N,) int
    /particles/all/rattler      (N,) bool
    /parameters/<name>          every differentiable parameter; attrs: configuration,
                                seed, command, versions, device, precision, timings
    /observables/<name>         scalars/tensors at the relaxed state; minimizer_steps, converged
    /sensitivity/<wrt>/{position (param.shape + (N, d)), <observable> (param.shape + obs.shape)}
                                attrs iterations, residual (one per element)
    /gradient/<observable>/<param>  reverse-mode dO/dθ, shape param.shape; attrs iterations, residual

Writes are atomic: everything goes to a temporary file in the destination
directory, which is renamed over the final name only once complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

FORMAT_VERSION = (1, 0)


class FormatError(ValueError):
    """A file that is not a readable mdsens file (one-line message)."""


@contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open a temporary HDF5 file beside ``path``; rename it to ``path`` on
    success, delete it on any exception (an existing ``path`` is untouched)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _attr(value: Any) -> Any:
    """An HDF5-storable attribute: JSON text for dicts/lists of mixed type."""
    if isinstance(value, (dict, list, tuple)) and not _is_numeric_sequence(value):
        return json.dumps(value, default=_json_default)
    if value is None:
        return "null"
    return value


def _is_numeric_sequence(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write a run record (see :func:`mdsens.job.Result.record`) atomically.

    ``record`` keys: positions (N, d), box (d,) or None, species, rattler,
    parameters {name: array}, observables {name: array}, sensitivity
    {wrt: {"values": {...}, "iterations", "residual"}}, gradient {obs:
    {"values": {param: array}, "iterations", "residual"}}, meta {...}.
    """
    from mdsens import __version__

    positions = np.asarray(record["positions"])
    n, d = positions.shape
    with atomic_h5(path) as f:
        h5md = f.create_group("h5md")
        h5md.attrs["version"] = np.array([1, 1], dtype=np.int32)
        author = h5md.create_group("author")
        author.attrs["name"] = record.get("meta", {}).get("author", os.environ.get("USER", "unknown") or "unknown")
        creator = h5md.create_group("creator")
        creator.attrs["name"] = "mdsens"
        creator.attrs["version"] = __version__
        module = h5md.create_group("modules/mdsens")
        module.attrs["version"] = np.array(FORMAT_VERSION, dtype=np.int32)

        particles = f.create_group("particles/all")
        position = particles.create_group("position")
        position.create_dataset("value", data=positions[None])
        position.create_dataset("step", data=np.array([int(record.get("meta", {}).get("steps", 0))]))
        position.create_dataset("time", data=np.array([0.0]))
        box = particles.create_group("box")
        box.attrs["dimension"] = np.int32(d)
        periodic = record.get("box") is not None
        box.attrs["boundary"] = np.array(["periodic" if periodic else "none"] * d, dtype=h5py.string_dtype())
        if periodic:
            edges = np.asarray(record["box"], dtype=np.float64)
        else:  # free space: the extent of the cluster, for viewers
            edges = positions.max(axis=0) - positions.min(axis=0)
        box.create_dataset("edges", data=edges)
        particles.create_dataset("species", data=np.asarray(record["species"], dtype=np.int32))
        particles.create_dataset("rattler", data=np.asarray(record["rattler"], dtype=bool))

        parameters = f.create_group("parameters")
        for name, value in record["parameters"].items():
            parameters.create_dataset(name, data=np.asarray(value))
        for key, value in record.get("meta", {}).items():
            parameters.attrs[key] = _attr(value)

        obs = f.create_group("observables")
        for name, value in record.get("observables", {}).items():
            obs.create_dataset(name, data=np.asarray(value))

        for group_name in ("sensitivity", "gradient"):
            entries = record.get(group_name, {})
            if not entries:
                continue
            group = f.create_group(group_name)
            for key, entry in entries.items():
                sub = group.create_group(key)
                for name, value in entry["values"].items():
                    sub.create_dataset(name, data=np.asarray(value))
                sub.attrs["iterations"] = np.asarray(entry["iterations"])
                sub.attrs["residual"] = np.asarray(entry["residual"])


def _load(group: h5py.Group) -> dict[str, Any]:
    return {name: np.asarray(group[name][()]) for name in group if isinstance(group[name], h5py.Dataset)}


def _attrs(obj: h5py.HLObject) -> dict[str, Any]:
    out = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def read(path: str | os.PathLike) -> dict[str, Any]:
    """Read an mdsens file back into the record shape :func:`write` takes.

    Raises :class:`FormatError` (one line) for a missing, truncated or foreign file.
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise FormatError(f"{path}: not an HDF5 file or truncated ({err.__class__.__name__})") from None
    with f:
        creator = f.get("h5md/creator")
        if creator is None or creator.attrs.get("name") != "mdsens":
            raise FormatError(f"{path}: not an mdsens file (no /h5md/creator with name 'mdsens')")
        missing = [g for g in ("particles/all/position/value", "particles/all/box", "parameters", "observables")
                   if g not in f]
        if missing:
            raise FormatError(f"{path}: incomplete mdsens file, missing {', '.join('/' + m for m in missing)}")
        box = f["particles/all/box"]
        boundary = [b.decode() if isinstance(b, bytes) else str(b) for b in box.attrs["boundary"]]
        record: dict[str, Any] = {
            "positions": np.asarray(f["particles/all/position/value"][-1]),
            "box": np.asarray(box["edges"][()]) if boundary[0] == "periodic" else None,
            "species": np.asarray(f["particles/all/species"][()]),
            "rattler": np.asarray(f["particles/all/rattler"][()]),
            "parameters": _load(f["parameters"]),
            "observables": _load(f["observables"]),
            "meta": _attrs(f["parameters"]),
            "creator_version": str(f["h5md/creator"].attrs.get("version", "")),
        }
        for group_name in ("sensitivity", "gradient"):
            record[group_name] = {}
            if group_name in f:
                for key, sub in f[group_name].items():
                    attrs = _attrs(sub)
                    record[group_name][key] = {"values": _load(sub), "iterations": attrs.get("iterations"),
                                               "residual": attrs.get("residual")}
    return record
