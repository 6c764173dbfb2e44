"""The mdsens output file: H5MD 1.1 where H5MD has a place, plus our groups.

Layout (every path, shape and unit is documented in README.md, "The output
file", and in the file itself as ``description`` / ``unit`` attributes):

    /h5md                       version=[1, 1]; author/ (name); creator/ (name, version)
    /h5md/modules/units         version=[1, 0], system="reduced"
    /h5md/modules/mdsens        version of our own groups below; attr groups
    /particles/all/position/{value (1, N, d), step (1,), time (1,)}
    /particles/all/box          attrs dimension, boundary (ensemble at fixed pressure); dataset edges
                                (d,), or (d, d) edge vectors as rows for a sheared cell
    /particles/all/species      (N,) int
    /particles/all/diameter     (N,) float, each particle's diameter (for viewers)
    /particles/all/rattler      (N,) bool
    /parameters/<name>          every differentiable parameter; attrs: system, potential (what the
                                parameter units follow), configuration, seed, command, versions,
                                device, precision, timings
    /observables/<name>         scalars/tensors at the relaxed state; minimizer_steps, converged
    /sensitivity/<wrt>/{position (param.shape + (N, d)), <observable> (param.shape + obs.shape)}
                                attrs iterations, residual (one per element)
    /gradient/<observable>/<param>  reverse-mode dO/dθ, shape param.shape; attrs iterations, residual
    /design/{loss (K,), <param> (K, …), observables/<name> (K,), fd_check/…, gradient/<param>}
                                mdsens design only: the trajectory of K accepted steps; attrs settings, counts

Units are reduced: lengths in units of the reference length ``sigma`` (the
small diameter D₀ for soft spheres, σ for Lennard-Jones and Morse), energies
in ``epsilon``. Unit strings follow the H5MD units module ("epsilon sigma-2").

Writes are atomic: everything goes to a temporary file in the destination
directory, which is renamed over the final name only once complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from mdsens import names, observables

FORMAT_VERSION = (1, 1)

LENGTH, ENERGY, TIME = "sigma", "epsilon", "tau"

# Units of each parameter ("{d}": the dimension); (potential, name) overrides
# the name alone. The unit of a parameter is the potential's, not the
# system's: α is the dimensionless stiffness exponent of soft spheres but the
# Morse width (1/σ), and a from_file system can carry either. (Observables:
# their units and descriptions are in the registry, mdsens.observables.)
_PARAMETER_UNITS: dict[Any, str] = {
    "diameter": LENGTH, "sigma": LENGTH, "box": LENGTH, "epsilon": ENERGY,
    "pressure": f"{ENERGY} {LENGTH}-{{d}}", "strain": "1",
    ("harmonic", "alpha"): "1",
    ("morse", "alpha"): f"{LENGTH}-1",
}
#: the potential of each catalogue system (from_file records its own in its
#: configuration, key "potential": harmonic, lj or morse)
CATALOGUE_POTENTIALS = {
    "bidisperse": "harmonic", "polydisperse": "harmonic", "lj_crystal": "lj", "morse_cluster": "morse",
}
_PARAMETER_DESCRIPTIONS = {
    "diameter": "particle diameters (per species, or per particle)",
    "sigma": "pair length scale σ",
    "box": "periodic box side lengths (at fixed pressure: the reference box that exp(strain) deforms)",
    "pressure": "target pressure P (fixed pressure)",
    "strain": "relaxed log-strain U of the reference box, cell = exp(U) diag(box) (fixed pressure; state, "
              "not a parameter)",
    "epsilon": "interaction strength ε",
    "alpha": "stiffness exponent α (soft spheres) or Morse width parameter a",
}


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


# -- units -------------------------------------------------------------------


def _parse_unit(unit: str) -> tuple[float, Counter]:
    """H5MD unit string → (numeric factor, {symbol: power})."""
    factor, powers = 1.0, Counter()
    for token in unit.split():
        try:
            factor *= float(token)
            continue
        except ValueError:
            pass
        symbol = token.rstrip("+-0123456789")
        power = int(token[len(symbol):] or 1)
        powers[symbol] += power
    return factor, powers


def _format_unit(factor: float, powers: Counter) -> str:
    parts = [f"{s}{'' if p == 1 else f'{p:+d}'}" for s, p in powers.items() if p != 0]
    if factor != 1.0 or not parts:
        parts.insert(0, f"{factor:g}")
    return " ".join(parts)


def divide_units(numerator: str | None, denominator: str | None) -> str | None:
    """The unit of ``dA/dB`` from the units of A and B (None if either is unknown)."""
    if numerator is None or denominator is None:
        return None
    fa, pa = _parse_unit(numerator)
    fb, pb = _parse_unit(denominator)
    pa.subtract(pb)
    return _format_unit(fa / fb, pa)


def model_potential(system: Any) -> str | None:
    """The potential (harmonic, lj, morse) of a built :class:`mdsens.system.System`:
    its configuration's ``potential`` (from_file), else its catalogue family's.
    :func:`mdsens.job.run_meta` records it, so a file's units follow the model."""
    chosen = system.config.get("potential") if isinstance(system.config, Mapping) else None
    return str(chosen) if chosen is not None else CATALOGUE_POTENTIALS.get(system.name)


def potential_of(meta: Mapping[str, Any]) -> str | None:
    """The potential a run used (harmonic, lj, morse), from its metadata: the
    recorded ``potential`` (:func:`model_potential`), else the configuration's
    (from_file files written before it was recorded), else the catalogue system's."""
    if meta.get("potential") is not None:
        return str(meta["potential"])
    config = meta.get("configuration")
    if isinstance(config, Mapping) and config.get("potential") is not None:
        return str(config["potential"])
    return CATALOGUE_POTENTIALS.get(str(meta.get("system", "")))


def parameter_unit(system: str, name: str, potential: str | None = None, dim: int | None = None) -> str | None:
    """Unit string of parameter ``name`` (None when not known).

    The unit depends on the potential (``alpha``: dimensionless for soft
    spheres, ``sigma-1`` for Morse); ``potential`` defaults to the catalogue
    ``system``'s. A name whose unit depends on an unknown potential (``alpha``
    of a from_file system without its configuration), or on the dimension
    when ``dim`` is not given (``pressure``), has no known unit."""
    if potential is None:
        potential = CATALOGUE_POTENTIALS.get(system)
    unit = _PARAMETER_UNITS.get((potential, name), _PARAMETER_UNITS.get(name))
    if unit is None or ("{d}" in unit and dim is None):
        return None
    return unit.format(d=dim)


def observable_unit(name: str, dim: int) -> str | None:
    """Unit string of observable ``name`` in ``dim`` dimensions (None: a count, a flag, or not known);
    from the registry (:func:`mdsens.observables.unit`)."""
    return observables.unit(name, dim)


def _label(obj: h5py.HLObject, description: str, unit: str | None = None) -> None:
    obj.attrs["description"] = description
    if unit is not None:
        obj.attrs["unit"] = unit


# -- writing -------------------------------------------------------------------


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


def particle_diameters(record: Mapping[str, Any]) -> np.ndarray:
    """Each particle's diameter (N,), from the parameters: ``diameter`` per
    particle or per species, else ``sigma``, else 1 (the reference length)."""
    species = np.asarray(record["species"])
    n = species.shape[0]
    params = record["parameters"]
    if "diameter" in params:
        d = np.asarray(params["diameter"], dtype=np.float64)
        if d.shape == (n,):
            return d
        if d.ndim == 1 and d.size > int(species.max(initial=0)):
            return d[species]
        if d.ndim == 0:
            return np.full(n, float(d))
    if "sigma" in params and np.ndim(params["sigma"]) == 0:
        return np.full(n, float(np.asarray(params["sigma"])))
    return np.ones(n)


def h5md_header(f: h5py.File, meta: Mapping[str, Any]) -> h5py.Group:
    """The H5MD 1.1 ``/h5md`` group: version, author, creator and the reduced-units module."""
    from mdsens import __version__

    h5md = f.create_group("h5md")
    h5md.attrs["version"] = np.array([1, 1], dtype=np.int32)
    h5md.create_group("author").attrs["name"] = str(meta.get("author", os.environ.get("USER", "unknown")
                                                             or "unknown"))
    creator = h5md.create_group("creator")
    creator.attrs["name"] = "mdsens"
    creator.attrs["version"] = __version__
    units = h5md.create_group("modules/units")
    units.attrs["version"] = np.array([1, 0], dtype=np.int32)
    units.attrs["system"] = "reduced"
    return h5md


def write(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Write a run record (see :func:`mdsens.job.Result.record`) atomically.

    ``record`` keys: positions (N, d), box (d,) or None, species, rattler,
    parameters {name: array}, observables {name: array}, sensitivity
    {wrt: {"values": {...}, "iterations", "residual"}}, gradient {obs:
    {"values": {param: array}, "iterations", "residual"}}, meta {...}.
    """

    positions = np.asarray(record["positions"])
    n, d = positions.shape
    meta = record.get("meta", {})
    system = str(meta.get("system", ""))
    potential = potential_of(meta)
    with atomic_h5(path) as f:
        f.attrs["description"] = ("mdsens: a relaxed particle packing and the exact derivatives of its "
                                  "equilibrium (H5MD 1.1; see /h5md/modules/mdsens)")
        h5md = h5md_header(f, meta)
        units = h5md["modules/units"]
        _label(units, f"reduced units: length {LENGTH} = the reference length (the small diameter D0 for "
                      f"soft spheres, sigma for Lennard-Jones/Morse), energy {ENERGY} = the interaction "
                      f"strength, {TIME} = the minimizer's fictitious time unit")
        module = h5md.create_group("modules/mdsens")
        module.attrs["version"] = np.array(FORMAT_VERSION, dtype=np.int32)
        module.attrs["groups"] = np.array(["parameters", "observables", "sensitivity", "gradient"],
                                          dtype=h5py.string_dtype())
        _label(module, "mdsens's own data: /sensitivity (forward-mode dx*/dtheta and dO/dtheta), /gradient "
                       "(reverse-mode dO/dtheta), /particles/all/{rattler,diameter}; see the mdsens README")

        particles = f.create_group("particles/all")
        _label(particles, "all particles of the system, at the relaxed state")
        position = particles.create_group("position")
        _label(position, "relaxed positions x* (one frame), real space, wrapped into the box")
        value = position.create_dataset("value", data=positions[None])
        _label(value, "relaxed positions x*, shape (1, N, d)", LENGTH)
        step = position.create_dataset("step", data=np.array([int(meta.get("steps", 0))]))
        _label(step, "minimizer steps taken to reach this state")
        time = position.create_dataset("time", data=np.array([0.0]))
        _label(time, "time (the relaxed state is stored at 0)", TIME)
        box = particles.create_group("box")
        box.attrs["dimension"] = np.int32(d)
        periodic = record.get("box") is not None
        box.attrs["boundary"] = np.array(["periodic" if periodic else "none"] * d, dtype=h5py.string_dtype())
        if periodic:
            edges = np.asarray(record["box"], dtype=np.float64)
            text = ("periodic box side lengths" if edges.ndim == 1 else
                    "periodic triclinic cell: the edge vectors as rows (d, d)")
        else:  # free space: the extent of the cluster, for viewers
            edges = positions.max(axis=0) - positions.min(axis=0)
            text = "free space: the extent of the cluster (max - min of the positions), for viewers"
        _label(box.create_dataset("edges", data=edges), text, LENGTH)
        if "ensemble" in meta:  # fixed-box files keep their layout
            box.attrs["ensemble"] = str(meta["ensemble"])
        _label(particles.create_dataset("species", data=np.asarray(record["species"], dtype=np.int32)),
               "species index of each particle")
        _label(particles.create_dataset("diameter", data=particle_diameters(record)),
               "each particle's diameter (from /parameters/diameter or sigma), for drawing", LENGTH)
        _label(particles.create_dataset("rattler", data=np.asarray(record["rattler"], dtype=bool)),
               "rattlers: particles with fewer than d+1 load-bearing contacts (held fixed by the gauge)")

        parameters = f.create_group("parameters")
        _label(parameters, "the differentiable parameters theta; attributes record how the file was made")
        for name, value in record["parameters"].items():
            ds = parameters.create_dataset(name, data=np.asarray(value))
            _label(ds, _PARAMETER_DESCRIPTIONS.get(name, f"parameter {name}"),
                   parameter_unit(system, name, potential, d))
        for key, value in meta.items():
            parameters.attrs[key] = _attr(value)

        obs = f.create_group("observables")
        _label(obs, "observables O(x*, theta) at the relaxed state (time-independent)")
        for name, value in record.get("observables", {}).items():
            ds = obs.create_dataset(name, data=np.asarray(value))
            _label(ds, observables.description(name), observable_unit(name, d))

        for group_name in ("sensitivity", "gradient"):
            entries = record.get(group_name, {})
            if not entries:
                continue
            group = f.create_group(group_name)
            if group_name == "sensitivity":
                _label(group, "forward mode, one linear solve per parameter element: H u = -d_theta grad_x E; "
                              "/sensitivity/<wrt>/position is dx*/dtheta, shape param.shape + (N, d)")
            else:
                _label(group, "reverse mode, one linear solve per observable: dO/dtheta for every element of "
                              "every parameter")
            for key, entry in entries.items():
                sub = group.create_group(key)
                for name, value in entry["values"].items():
                    ds = sub.create_dataset(name, data=np.asarray(value))
                    if group_name == "sensitivity":
                        param = names.parse(key).base
                        what = "position x*" if name == "position" else name
                        _label(ds, f"{names.derivative(what, key)} along the equilibrium",
                               divide_units(observable_unit(name, d), parameter_unit(system, param, potential, d)))
                    else:
                        _label(ds, f"{names.derivative(key, name)} along the equilibrium (reverse mode)",
                               divide_units(observable_unit(key, d), parameter_unit(system, name, potential, d)))
                sub.attrs["iterations"] = np.asarray(entry["iterations"])
                sub.attrs["residual"] = np.asarray(entry["residual"])
                _label(sub, "linear solves: iterations and true residual |H u - b| of each")

        if record.get("design"):
            _write_design(f.create_group("design"), record["design"], d)


# What /design holds (mdsens design); every other entry is a varied parameter's trajectory.
_DESIGN_DESCRIPTIONS = {
    "loss": "design loss at each accepted step (row 0: the start)",
    "observables": "observables at each accepted step",
    "learning_rate": "learning rate of the step that reached each row (halved on every rejected step)",
    "relax_steps": "minimizer steps of each step's warm-started relaxation",
    "rattlers": "number of rattlers at each step",
    "gradient": "d(loss)/d(parameter) at the final state (reverse mode)",
    "fd_check": "gradient along a random unit direction vs central differences of the loss re-relaxed "
                "at theta +- h (step, h, directional, finite_difference, relative_error, passed)",
    "box": "box side lengths at each step (set from the diameters to hold phi)",
}


def _write_design(group: h5py.Group, design: Mapping[str, Any], d: int) -> None:
    """The design trajectory (:mod:`mdsens.design`): arrays and nested groups; ``attrs`` become attributes."""
    _label(group, "inverse design (mdsens design): trajectory, checks and settings; the final packing is the "
                  "rest of this file")
    for key, value in design.items():
        if key == "attrs":
            for name, attr in value.items():
                group.attrs[name] = _attr(attr)
        elif isinstance(value, Mapping):
            sub = group.create_group(key)
            _label(sub, _DESIGN_DESCRIPTIONS.get(key, key))
            for name, array in value.items():
                ds = sub.create_dataset(name, data=np.asarray(array))
                if key == "observables":
                    _label(ds, f"{name} at each step", observable_unit(name, d))
        else:
            _label(group.create_dataset(key, data=np.asarray(value)),
                   _DESIGN_DESCRIPTIONS.get(key, f"parameter {key} at each step (row 0: the start)"))


# -- reading -------------------------------------------------------------------


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


_REQUIRED = ("particles/all/position/value", "particles/all/box/edges", "particles/all/species",
             "particles/all/rattler", "parameters", "observables")


def read(path: str | os.PathLike) -> dict[str, Any]:
    """Read an mdsens file back into the record shape :func:`write` takes.

    Raises :class:`FormatError` (one line) for a missing, truncated, foreign
    or incomplete file.
    """
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if path.is_dir():
        raise FormatError(f"{path}: is a directory, not an mdsens file")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise FormatError(f"{path}: not an HDF5 file, or truncated ({_first_line(err)})") from None
    try:
        with f:
            return _read_open(path, f)
    except FormatError:
        raise
    except (OSError, KeyError, ValueError, TypeError, IndexError) as err:
        raise FormatError(f"{path}: unreadable mdsens file ({err.__class__.__name__}: {_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else err.__class__.__name__


def _read_open(path: Path, f: h5py.File) -> dict[str, Any]:
    creator = f.get("h5md/creator")
    if creator is None or creator.attrs.get("name") != "mdsens":
        raise FormatError(f"{path}: not an mdsens file (no /h5md/creator with name 'mdsens')")
    missing = [g for g in _REQUIRED if g not in f]
    if missing:
        raise FormatError(f"{path}: incomplete mdsens file, missing {', '.join('/' + m for m in missing)}")
    box = f["particles/all/box"]
    boundary = [b.decode() if isinstance(b, bytes) else str(b) for b in box.attrs["boundary"]]
    module = f.get("h5md/modules/mdsens")
    record: dict[str, Any] = {
        "positions": np.asarray(f["particles/all/position/value"][-1]),
        "box": np.asarray(box["edges"][()]) if boundary[0] == "periodic" else None,
        "species": np.asarray(f["particles/all/species"][()]),
        "rattler": np.asarray(f["particles/all/rattler"][()]),
        "parameters": _load(f["parameters"]),
        "observables": _load(f["observables"]),
        "meta": _attrs(f["parameters"]),
        "creator_version": str(creator.attrs.get("version", "")),
        "format_version": tuple(int(v) for v in module.attrs["version"]) if module is not None else None,
    }
    record["diameter"] = (np.asarray(f["particles/all/diameter"][()]) if "particles/all/diameter" in f
                          else particle_diameters(record))
    for group_name in ("sensitivity", "gradient"):
        record[group_name] = {}
        if group_name in f:
            for key, sub in f[group_name].items():
                if group_name == "sensitivity":  # named NAME or NAME[i] (mdsens.names)
                    try:
                        names.parse(key)
                    except names.NameSyntaxError as err:
                        raise FormatError(f"{path}: /sensitivity/{key}: not a parameter name ({err.reason})") from None
                attrs = _attrs(sub)
                record[group_name][key] = {"values": _load(sub), "iterations": attrs.get("iterations"),
                                           "residual": attrs.get("residual")}
    if "design" in f:
        group = f["design"]
        record["design"] = {name: (_load(item) if isinstance(item, h5py.Group) else np.asarray(item[()]))
                            for name, item in group.items()}
        record["design"]["attrs"] = _attrs(group)
    return record


def units_of(path: str | os.PathLike) -> dict[str, str]:
    """Every dataset path in the file that has a ``unit`` attribute → its unit."""
    out: dict[str, str] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__("/" + name, str(obj.attrs["unit"]))
                     if isinstance(obj, h5py.Dataset) and "unit" in obj.attrs else None)
    return out
