"""The ensemble file (``mdsens ensemble -o ensemble.h5``) and what reads it.

Layout (H5MD 1.1 header as in a run file, then one group, leading axis M =
members in member order: sweep-major, then seed):

    /ensemble                       attrs: system, configuration, command, seeds, sweep, timings, …
    /ensemble/seed (M,)             each member's seed
    /ensemble/<KEY> (M,)            each swept build key's value
    /ensemble/configuration (M,)    each member's full build configuration (JSON text)
    /ensemble/converged, steps, max_force (M,)
    /ensemble/position (M, N, d)    relaxed positions, real space; box (M, d); diameter, species, rattler (M, N)
                                    (fixed pressure: box is the relaxed cell, (M, d) sides or (M, d, d) edges)
    /ensemble/parameters/<NAME> (M, …)
    /ensemble/observables/<NAME> (M, …)
    /ensemble/sensitivity/<PARAM>/<NAME> (M, k, …), position (M, k, N, d); iterations, residual (M, k)
    /ensemble/gradient/<OBS>/<PARAM> (M, …)

A member that did not converge is kept and flagged (``converged`` False);
its derivatives are NaN. Meanings and units are those of a run file
(:mod:`mdsens.io`); every dataset carries ``description`` and ``unit``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from mdsens import io, names

GROUP = "ensemble"


def write(path: str | os.PathLike, result: Any) -> None:
    """Write an :class:`mdsens.ensemble.EnsembleResult` atomically."""
    meta = result.meta
    system = meta["system"]
    potential = io.potential_of(meta)
    d = result.dim
    with io.atomic_h5(path) as f:
        f.attrs["description"] = ("mdsens ensemble: relaxed packings over seeds and swept build keys, with the "
                                  "exact derivatives of each equilibrium (H5MD 1.1 header; data in /ensemble)")
        h5md = io.h5md_header(f, meta)
        module = h5md.create_group("modules/mdsens")
        module.attrs["version"] = np.array(io.FORMAT_VERSION, dtype=np.int32)
        module.attrs["groups"] = np.array([GROUP], dtype=h5py.string_dtype())
        g = f.create_group(GROUP)
        io._label(g, "one row per member (sweep-major, then seed); meanings and units as in a run file")
        for key, value in meta.items():
            g.attrs[key] = io._attr(value)

        def put(group: h5py.Group, name: str, data: Any, text: str, unit: str | None = None) -> None:
            data = np.asarray(data)
            if data.dtype == object:
                data = data.astype(h5py.string_dtype())
            io._label(group.create_dataset(name, data=data), text, unit)

        put(g, "seed", result.seed, "random seed of each member's initial positions")
        for key, values in result.sweep.items():
            put(g, key, values, f"swept build key {key} of each member")
        put(g, "configuration", np.asarray([json.dumps(c) for c in result.configurations], dtype=object),
            "each member's full build configuration (JSON)")
        put(g, "converged", result.converged, "whether max|F| < ftol was reached (derivatives are NaN if not)")
        put(g, "steps", result.steps, "minimizer steps taken")
        put(g, "max_force", result.max_force, "largest per-particle force at the end of the relaxation",
            io.observable_unit("max_force", d))
        put(g, "position", result.position, "relaxed positions x*, real space (M, N, d)", io.LENGTH)
        if result.box is not None:
            text = ("periodic box side lengths (M, d)" if result.box.ndim == 2 else
                    "periodic triclinic cell of each member: the edge vectors as rows (M, d, d)")
            if "ensemble" in meta:
                text += f"; {meta['ensemble']}: the relaxed cell"
            put(g, "box", result.box, text, io.LENGTH)
        put(g, "diameter", result.diameter, "each particle's diameter (M, N)", io.LENGTH)
        put(g, "species", result.species.astype(np.int32), "species index of each particle (M, N)")
        put(g, "rattler", result.rattler.astype(bool), "rattlers of each member (M, N)")
        params = g.create_group("parameters")
        for name, value in result.parameters.items():
            put(params, name, value, f"parameter {name} of each member", io.parameter_unit(system, name, potential, d))
        obs = g.create_group("observables")
        for name, value in result.observables.items():
            put(obs, name, value, f"{name} of each member at its relaxed state", io.observable_unit(name, d))
        if result.sensitivity:
            sens = g.create_group("sensitivity")
            for wrt, entry in result.sensitivity.items():
                sub = sens.create_group(wrt)
                param = names.parse(wrt).base
                for name, value in entry.items():
                    if name in ("iterations", "residual"):
                        put(sub, name, value, f"linear solve {name} of each member and element")
                        continue
                    what = "position x*" if name == "position" else name
                    put(sub, name, value, f"d{what}/d{wrt} of each member (member axis first)",
                        io.divide_units(io.observable_unit(name, d), io.parameter_unit(system, param, potential, d)))
        if result.gradient:
            grad = g.create_group("gradient")
            for obs_name, entry in result.gradient.items():
                sub = grad.create_group(obs_name)
                for name, value in entry.items():
                    if name in ("iterations", "residual"):
                        put(sub, name, value, f"linear solve {name} of each member")
                        continue
                    put(sub, name, value, f"d{obs_name}/d{name} of each member (reverse mode)",
                        io.divide_units(io.observable_unit(obs_name, d), io.parameter_unit(system, name, potential, d)))


def is_ensemble(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an ensemble file (a readable HDF5 file with /ensemble)."""
    try:
        with h5py.File(path, "r") as f:
            return GROUP in f
    except OSError:
        return False


def _tree(group: h5py.Group) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, item in group.items():
        if isinstance(item, h5py.Group):
            out[name] = _tree(item)
        else:
            value = item[()]
            if item.dtype.kind == "O" or item.dtype.kind == "S":
                value = np.asarray([v.decode() if isinstance(v, bytes) else v for v in np.atleast_1d(value)],
                                   dtype=object)
            out[name] = np.asarray(value)
    return out


def read(path: str | os.PathLike) -> dict[str, Any]:
    """The /ensemble group as nested dicts of arrays, plus ``meta`` (its attributes)."""
    path = Path(path)
    if not path.exists():
        raise io.FormatError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            if GROUP not in f:
                raise io.FormatError(f"{path}: not an mdsens ensemble file (no /{GROUP})")
            data = _tree(f[GROUP])
            data["meta"] = io._attrs(f[GROUP])
            data["creator_version"] = f["h5md/creator"].attrs.get("version")
    except OSError as err:
        raise io.FormatError(f"{path}: not a readable HDF5 file ({str(err).splitlines()[0]})") from None
    return data


# -- statistics --------------------------------------------------------------------------------


def _mean_sem(values: np.ndarray) -> dict[str, Any]:
    """Mean and standard error over the first axis (NaN rows dropped)."""
    values = np.asarray(values, dtype=float)
    keep = ~np.any(np.isnan(values.reshape(values.shape[0], -1)), axis=1) if values.size else np.zeros(0, bool)
    v = values[keep]
    count = int(v.shape[0])
    mean = v.mean(axis=0) if count else np.full(values.shape[1:], np.nan)
    sem = v.std(axis=0, ddof=1) / np.sqrt(count) if count > 1 else np.full(values.shape[1:], np.nan)
    return {"mean": mean.tolist(), "sem": sem.tolist(), "count": count}


def sweep_keys(data: Mapping[str, Any]) -> list[str]:
    return list((data["meta"].get("sweep") or {}).keys())


def statistics(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per combination of swept values (one entry without a sweep): members,
    converged count, and mean ± standard error over the converged members of
    every observable and derivative (position derivatives as their norm per
    element, ``position_norm``)."""
    keys = sweep_keys(data)
    m = len(data["seed"])
    labels = [tuple(str(data[k][i]) if data[k].dtype == object else float(data[k][i]) for k in keys)
              for i in range(m)]
    converged = np.asarray(data["converged"], dtype=bool)
    out = []
    for label in dict.fromkeys(labels):
        rows = np.asarray([i for i in range(m) if labels[i] == label])
        ok = rows[converged[rows]]
        entry: dict[str, Any] = {"sweep": dict(zip(keys, label)), "members": int(rows.size),
                                 "converged": int(ok.size), "observables": {}, "sensitivity": {}, "gradient": {}}
        for name, value in data.get("observables", {}).items():
            entry["observables"][name] = _mean_sem(np.asarray(value)[ok])
        for wrt, fields in data.get("sensitivity", {}).items():
            item = {}
            for name, value in fields.items():
                if name in ("iterations", "residual"):
                    continue
                value = np.asarray(value)[ok]
                if name == "position":
                    item["position_norm"] = _mean_sem(np.sqrt(np.sum(value**2, axis=(-2, -1))))
                else:
                    item[name] = _mean_sem(value)
            entry["sensitivity"][wrt] = item
        for obs, fields in data.get("gradient", {}).items():
            entry["gradient"][obs] = {name: _mean_sem(np.asarray(v)[ok]) for name, v in fields.items()
                                      if name not in ("iterations", "residual")}
        out.append(entry)
    return out


def _fmt(stat: Mapping[str, Any]) -> str:
    mean, sem = np.asarray(stat["mean"]), np.asarray(stat["sem"])
    if mean.size > 4:
        return f"shape {mean.shape}, |mean| = {np.linalg.norm(mean):.6g}"
    if mean.ndim == 0:
        return f"{float(mean):.8g} ± {float(sem):.2g}"
    return ", ".join(f"{a:.8g} ± {b:.2g}" for a, b in zip(mean.ravel(), sem.ravel()))


def render(data: Mapping[str, Any], path: str) -> str:
    """Human-readable text of :func:`statistics`."""
    meta = data["meta"]
    m = len(data["seed"])
    n, d = np.asarray(data["position"]).shape[1:]
    lines = [f"{path}: ensemble of {m} {meta.get('system')} packings, N = {n}, d = {d}, seeds "
             f"{meta.get('seeds', [None])[0]}…{meta.get('seeds', [None])[-1]}; "
             f"{int(np.sum(data['converged']))}/{m} converged"]
    if meta.get("ensemble"):
        lines.append(f"ensemble: {meta['ensemble']}")
    for entry in statistics(data):
        label = ", ".join(f"{k} = {v}" for k, v in entry["sweep"].items()) or "all members"
        lines.append(f"{label}: {entry['converged']}/{entry['members']} converged (mean ± standard error)")
        for name, stat in entry["observables"].items():
            lines.append(f"  {name:<12s} = {_fmt(stat)}")
        for wrt, item in entry["sensitivity"].items():
            for name, stat in item.items():
                label = f"|dx*/d{wrt}|" if name == "position_norm" else f"d{name}/d{wrt}"
                lines.append(f"  {label} = {_fmt(stat)}")
        for obs, item in entry["gradient"].items():
            for name, stat in item.items():
                lines.append(f"  grad d{obs}/d{name} = {_fmt(stat)}")
    lines.append(f"made by: {meta.get('command') or '(python API)'}")
    timings = meta.get("timings") or {}
    if timings:
        lines.append("  time: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return "\n".join(lines)


# -- one member as a run file ------------------------------------------------------------------


def member_record(data: Mapping[str, Any], k: int) -> dict[str, Any]:
    """Member ``k`` as a run record (:func:`mdsens.io.write`), which ``show``,
    ``plot`` and ``check`` accept like the file of ``mdsens run``."""
    m = len(data["seed"])
    if not 0 <= k < m:
        from mdsens.systems import UsageError

        raise UsageError(f"--member {k}: the ensemble has members 0 … {m - 1}")
    meta = dict(data["meta"])
    config = json.loads(str(data["configuration"][k]))
    converged = bool(data["converged"][k])
    sensitivity = {}
    for wrt, fields in data.get("sensitivity", {}).items():
        values = {name: np.asarray(v[k]) for name, v in fields.items() if name not in ("iterations", "residual")}
        sensitivity[wrt] = {"values": values, "iterations": np.asarray(fields["iterations"][k]),
                            "residual": np.asarray(fields["residual"][k])}
    gradient = {obs: {"values": {name: np.asarray(v[k]) for name, v in fields.items()
                                 if name not in ("iterations", "residual")},
                      "iterations": np.asarray(fields["iterations"][k]), "residual": np.asarray(fields["residual"][k])}
                for obs, fields in data.get("gradient", {}).items()}
    run_meta = {key: meta[key] for key in ("system", "command", "minimizer", "ftol", "max_steps", "linear_solver",
                                           "rtol", "preconditioner", "versions", "device", "precision",
                                           "ensemble", "box_dof")
                if key in meta}
    run_meta.update(configuration={**config, "seed": int(data["seed"][k])}, seed=int(data["seed"][k]),
                    steps=int(data["steps"][k]), converged=converged,
                    derivatives="computed" if converged else "skipped: relaxation did not converge",
                    member=k)
    return {
        "positions": np.asarray(data["position"][k]),
        "box": np.asarray(data["box"][k]) if "box" in data else None,
        "species": np.asarray(data["species"][k]),
        "rattler": np.asarray(data["rattler"][k]),
        "parameters": {name: np.asarray(v[k]) for name, v in data["parameters"].items()},
        "observables": {**{name: np.asarray(v[k]) for name, v in data["observables"].items()},
                        "minimizer_steps": np.asarray(int(data["steps"][k])), "converged": np.asarray(converged)},
        "sensitivity": sensitivity if converged else {},
        "gradient": gradient if converged else {},
        "meta": run_meta,
    }


# -- figure ---------------------------------------------------------------------------------------


def plot(data: Mapping[str, Any], output: str | os.PathLike, dpi: int = 150) -> None:
    """Every scalar observable and scalar-per-element derivative against the
    first swept key, mean ± standard error over the converged members (a
    bar per derivative element); without a sweep, histograms over members."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = statistics(data)
    keys = sweep_keys(data)
    panels: list[tuple[str, list]] = []
    for name in stats[0]["observables"]:
        if name != "max_force" and np.asarray(stats[0]["observables"][name]["mean"]).size <= 4:
            panels.append((name, [e["observables"][name] for e in stats]))
    for wrt in stats[0]["sensitivity"]:
        for name in stats[0]["sensitivity"][wrt]:
            if np.asarray(stats[0]["sensitivity"][wrt][name]["mean"]).size <= 4:
                label = f"|dx*/d{wrt}|" if name == "position_norm" else f"d{name}/d{wrt}"
                panels.append((label, [e["sensitivity"][wrt][name] for e in stats]))
    if not panels:
        raise io.FormatError("nothing to plot: no scalar observable or derivative in the file")
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (label, entries) in zip(axes.ravel(), panels):
        if keys:
            xs = [e["sweep"][keys[0]] for e in stats]
            numeric = all(isinstance(x, (int, float)) for x in xs)
            pos = np.asarray(xs, dtype=float) if numeric else np.arange(len(xs))
            means = [np.atleast_1d(e["mean"]) for e in entries]
            sems = [np.atleast_1d(e["sem"]) for e in entries]
            for c in range(means[0].size):
                ax.errorbar(pos, [m[c] for m in means], yerr=[s[c] for s in sems], marker="o", capsize=3,
                            label=f"[{c}]" if means[0].size > 1 else None)
            if not numeric:
                ax.set_xticks(pos, [str(x) for x in xs])
            ax.set_xlabel(keys[0])
            if means[0].size > 1:
                ax.legend(fontsize=7)
        else:
            ax.bar(range(np.atleast_1d(entries[0]["mean"]).size), np.atleast_1d(entries[0]["mean"]),
                   yerr=np.atleast_1d(entries[0]["sem"]), capsize=3)
            ax.set_xlabel("element")
        ax.set_title(label, fontsize=9)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    meta = data["meta"]
    fig.suptitle(f"{meta.get('system')} ensemble, {len(data['seed'])} members "
                 f"({int(np.sum(data['converged']))} converged); mean ± standard error", fontsize=10)
    fig.tight_layout()
    fig.savefig(output, dpi=dpi)
    plt.close(fig)
