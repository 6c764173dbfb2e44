"""``mdsens show``: what is in a file, for a human or a script."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import typer

from mdsens.cli.app import app, errors


def _jsonable(value: Any) -> Any:
    v = np.asarray(value)
    return v.item() if v.ndim == 0 else v.tolist()


def summarize(record: Mapping[str, Any], top: int = 5) -> dict[str, Any]:
    """A JSON-able digest of a file record (:func:`mdsens.io.read`)."""
    from mdsens import io, names, observables
    from mdsens.export import derivative_fields

    meta = record.get("meta", {})
    x = np.asarray(record["positions"])
    species = np.asarray(record["species"])
    rattler = np.asarray(record["rattler"], dtype=bool)
    obs = record["observables"]
    out: dict[str, Any] = {
        "system": {
            "name": meta.get("system"),
            "n": int(x.shape[0]),
            "dim": int(x.shape[1]),
            "box": None if record["box"] is None else _jsonable(record["box"]),
            "ensemble": meta.get("ensemble") or ("fixed box" if record["box"] is not None else "free space"),
            "species": {str(s): int(np.sum(species == s)) for s in np.unique(species)},
            "rattlers": int(rattler.sum()),
            "parameters": {k: _jsonable(v) for k, v in record["parameters"].items()},
        },
        "convergence": {
            "converged": bool(np.asarray(obs.get("converged", meta.get("converged", False)))),
            "steps": int(np.asarray(obs.get("minimizer_steps", meta.get("steps", 0)))),
            "max_force": float(np.asarray(obs["max_force"])) if "max_force" in obs else None,
            "ftol": meta.get("ftol"),
            "minimizer": meta.get("minimizer"),
        },
        "observables": {k: _jsonable(v) for k, v in obs.items()
                        if k not in ("converged", "minimizer_steps", "max_force")},
        "units": {  # reduced units (H5MD strings; None: a count, a flag, or not known)
            "observables": {k: observables.unit(k, int(x.shape[1])) for k in obs},
            "parameters": {k: io.parameter_unit(str(meta.get("system", "")), k, io.potential_of(meta),
                                                int(x.shape[1])) for k in record["parameters"]},
        },
        "sensitivity": {},
        "gradient": {},
        "provenance": {key: meta.get(key) for key in ("command", "seed", "configuration", "versions", "device",
                                                      "precision", "timings", "linear_solver", "rtol")},
    }
    out["provenance"]["mdsens_version"] = record.get("creator_version")
    out["provenance"]["format_version"] = list(record["format_version"]) if record.get("format_version") else None
    fields = {label: u for _, label, u in derivative_fields(record)}
    for wrt, entry in record.get("sensitivity", {}).items():
        u = np.asarray(entry["values"]["position"])
        item: dict[str, Any] = {
            "position_norm": _jsonable(np.sqrt(np.sum(u**2, axis=(-2, -1)))),
            "iterations": entry["iterations"],
            "residual": entry["residual"],
        }
        item.update({f"d{name}": _jsonable(v) for name, v in entry["values"].items() if name != "position"})
        item["most_sensitive"] = {}
        wanted = names.parse(wrt)
        for label, field in fields.items():
            if not names.matches(wanted, names.parse(label)):
                continue
            magnitude = np.linalg.norm(field, axis=-1)
            order = np.argsort(-magnitude)[:top]
            item["most_sensitive"][label] = [
                {"particle": int(i), "species": int(species[i]), "magnitude": float(magnitude[i]),
                 "vector": field[i].tolist()} for i in order]
        out["sensitivity"][wrt] = item
    for name, entry in record.get("gradient", {}).items():
        out["gradient"][name] = {"values": {k: _jsonable(v) for k, v in entry["values"].items()},
                                 "iterations": entry["iterations"], "residual": entry["residual"]}
    return out


def _fmt(value: Any) -> str:
    v = np.asarray(value)
    if v.dtype == bool or v.dtype.kind in "iu":
        return np.array2string(v) if v.ndim else str(v.item())
    if v.size > 8:
        return f"shape {v.shape}, |·| = {np.linalg.norm(v):.6g}"
    return np.array2string(v, precision=8) if v.ndim else f"{v.item():.10g}"


def render(summary: Mapping[str, Any], path: str) -> str:
    """The human-readable text of :func:`summarize`."""
    from mdsens import names

    s, c, p = summary["system"], summary["convergence"], summary["provenance"]
    lines = [f"{path}: {s['name']}, N = {s['n']}, d = {s['dim']}, "
             + (f"box {_fmt(s['box'])}" if s["box"] is not None else "free space")
             + f", species {s['species']}, rattlers {s['rattlers']}"]
    lines.append(f"ensemble: {s['ensemble']}")
    lines.append("parameters: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in s["parameters"].items()))
    status = "converged" if c["converged"] else "NOT CONVERGED"
    max_force = "?" if c["max_force"] is None else f"{c['max_force']:.2e}"
    lines.append(f"relaxation: {status} in {c['steps']} steps ({c['minimizer']}), max|F| = {max_force} "
                 f"(ftol {c['ftol']})")
    if summary["observables"]:
        lines.append("observables:")
        lines += [f"  {k:<12s} = {_fmt(v)}" for k, v in summary["observables"].items()]
    solver = p.get("linear_solver") or "cg"  # CG counts iterations; the sparse and dense solves have none

    def how(iterations: Any) -> str:
        return f"CG iterations {iterations}" if solver == "cg" else f"{solver} solve"

    for wrt, item in summary["sensitivity"].items():
        lines.append(f"d/d{wrt}:  ({how(item['iterations'])}, residual {_fmt(item['residual'])})")
        lines.append(f"  |dx*/d{wrt}| = {_fmt(item['position_norm'])}")
        lines += [f"  {names.derivative(k[1:], wrt)} = {_fmt(v)}" for k, v in item.items() if k.startswith("d")]
        for label, rows in item["most_sensitive"].items():
            text = ", ".join(f"#{r['particle']} (s{r['species']}) {r['magnitude']:.4g}" for r in rows)
            lines.append(f"  most sensitive to {label}: {text}")
    for name, item in summary["gradient"].items():
        lines.append(f"grad {name}: ({how(item['iterations'])}, residual {_fmt(item['residual'])})")
        lines += [f"  {names.derivative(name, k)} = {_fmt(v)}" for k, v in item["values"].items()]
    lines.append(f"made by: {p['command'] or '(python API)'}")
    versions = p.get("versions") or {}
    timings = p.get("timings") or {}
    lines.append(f"  seed {p['seed']}, {p['precision']} on {p['device']}, mdsens {p['mdsens_version']} "
                 f"(format {p['format_version']}), jax {versions.get('jax', '?')}; solver {p['linear_solver']} "
                 f"rtol {p['rtol']}")
    if timings:
        lines.append("  time: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
    return "\n".join(lines)


@app.command()
def show(
    file: Path = typer.Argument(..., help="An mdsens HDF5 file."),
    top: int = typer.Option(5, "--top", "-k", help="How many of the most sensitive particles to list."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Summarise a file: system, convergence, observables, sensitivities, how it was made."""
    from mdsens import io

    from mdsens import ensemble_io

    with errors():
        if ensemble_io.is_ensemble(file):  # mdsens ensemble: statistics per sweep value
            data = ensemble_io.read(file)
            if as_json:
                print(json.dumps({"ensemble": {"members": int(len(data["seed"])),
                                               "converged": int(data["converged"].sum()),
                                               "groups": ensemble_io.statistics(data)}}))
            else:
                print(ensemble_io.render(data, str(file)))
            return
        summary = summarize(io.read(file), top)
        if as_json:
            print(json.dumps(summary))
        else:
            print(render(summary, str(file)))
