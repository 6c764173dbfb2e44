"""``mdsens check``: re-verify a file's derivatives against finite differences.

The system is rebuilt from the file's recorded family, configuration and seed
(``/parameters`` attributes), at the file's parameters and relaxed positions.
For each parameter element, :func:`mdsens.sensitivity.finite_difference`
re-relaxes at θ ± h from the stored state, Newton-polishes to round-off, and
differences with minimum image in the same gauge as the implicit derivative.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import typer

from mdsens.cli.app import EXIT_ERROR, EXIT_USAGE, app, errors, fail, log


#: the differences resolve a derivative of O to about RESOLUTION · eps · max|O| / h: below
#: that, stored and differenced derivatives agree when they differ by less (a zero by
#: symmetry is round-off on both sides)
RESOLUTION = 16


def rebuild(record: Mapping[str, Any]):
    """The :class:`mdsens.system.System` a file was made from, and its parameters."""
    import jax.numpy as jnp

    from mdsens import io, systems

    meta = record.get("meta", {})
    name, config = meta.get("system"), meta.get("configuration")
    if not name or not isinstance(config, dict):
        raise io.FormatError("the file does not record its system and configuration (/parameters attrs "
                             "'system', 'configuration'); cannot rebuild it")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k != "seed"}
    family = systems.get(name)
    system = family.build_fn(seed=int(meta.get("seed", 0)), **config)
    params = {k: jnp.asarray(v) for k, v in record["parameters"].items()}
    if set(params) != set(system.params):
        raise io.FormatError(f"the file's parameters {sorted(params)} differ from the rebuilt system's "
                             f"{sorted(system.params)}")
    return system, params


def _elements(key: str, shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...], tuple[int, ...]]]:
    """(label, parameter name, parameter index, index into the stored array) for
    each element of the stored derivative ``key`` (``NAME`` or ``NAME[i]``)."""
    from mdsens import names

    stored = names.parse(key)
    if stored.index is not None:
        return [(str(stored), stored.base, stored.index, ())]
    return [(str(e), e.base, e.index, e.index) for e in names.elements(stored.base, shape)]


def verify(record: Mapping[str, Any], wrt: str | None = None, h: float = 1e-5, tol: float = 1e-4,
           ftol: float = 1e-12, stencil: int = 4) -> dict[str, Any]:
    """Compare every stored forward derivative (or those of ``wrt``) with central
    differences (``stencil`` 4: the five-point formula; 2: θ ± h). Returns
    {"elements": {label: {quantity: relative error}}, "max_error", "ok", ...}."""
    import jax.numpy as jnp

    from mdsens import barostat, names, observables, sensitivity

    system, params = rebuild(record)
    if barostat.is_fixed_pressure(system) and system.n * system.dim > sensitivity.DENSE_POLISH_LIMIT:
        # its differences polish positions and cell together, densely (a fixed box: CG above the limit)
        from mdsens.systems import UsageError

        raise UsageError(f"N·d = {system.n * system.dim} is too large for the dense Newton polish of a "
                         f"fixed-pressure finite-difference check (limit {sensitivity.DENSE_POLISH_LIMIT})")
    q = system.to_solver(jnp.asarray(record["positions"]), params)
    entries = record.get("sensitivity", {})
    if not entries:
        raise ValueError("the file has no forward derivatives to check (/sensitivity is empty: "
                         "the relaxation did not converge, or no --wrt was given)")
    wanted = None
    if wrt is not None:
        try:
            wanted = names.parse(wrt)
        except names.NameSyntaxError as err:
            raise KeyError(f"--wrt {wrt!r}: no stored derivative element matches ({err.reason}); "
                           f"stored: {', '.join(entries)}") from None
        matches = [k for k in entries if names.parse(k).base == wanted.base]
        if not matches:
            raise KeyError(f"--wrt {wrt!r}: not in the file; stored: {', '.join(entries)}")
    else:
        matches = list(entries)
    results: dict[str, dict[str, float]] = {}
    unchecked: dict[str, str] = {}
    for key in matches:
        values = entries[key]["values"]
        observe = {n: observables.OBSERVABLES[n] for n in values if n in observables.OBSERVABLES}
        shape = np.shape(record["parameters"][names.parse(key).base])
        for label, name, index, at in _elements(key, shape):
            if wanted is not None and not names.matches(wanted, names.Name(name, index)):
                continue
            changed: list[bool] = []  # the fixed-box differences say whether the contacts changed
            if barostat.is_fixed_pressure(system):  # re-minimise the enthalpy, the box relaxing too
                fd = barostat.finite_difference(system, q, params, name, index, h=h, observe=observe,
                                                stencil=stencil)
            else:
                fd = sensitivity.finite_difference(system, q, params, name, index, h=h, observe=observe, ftol=ftol,
                                                   stencil=stencil, contacts_changed=changed)
            errors_ = {}
            for quantity, reference in fd.items():
                stored = np.asarray(values[quantity])[at] if at else np.asarray(values[quantity])
                scale = float(np.max(np.abs(reference)))
                # The differences resolve a derivative only to ~RESOLUTION eps |O| / h (each
                # re-relaxed O is exact to round-off): a derivative that vanishes (a perfect
                # crystal's positions under σ, by symmetry) is round-off on both sides, and
                # agreement within that counts as agreement, not as a relative error between
                # two noises. An observable held fixed by the ensemble (the pressure at fixed
                # pressure) is resolved only to ~1e-8 |O| / h (its round-off over the step).
                value = record["positions"] if quantity == "position" else record["observables"].get(quantity)
                if value is not None:
                    resolution = RESOLUTION * np.finfo(np.float64).eps / tol
                    if barostat.is_fixed_pressure(system) and quantity != "position":
                        resolution = max(resolution, 1e-8)
                    scale = max(scale, resolution * float(np.max(np.abs(value), initial=0.0)) / h)
                diff = float(np.max(np.abs(stored - reference)))
                errors_[quantity] = diff / scale if scale > 0 else diff
            if changed[-1:] == [True] and max(errors_.values(), default=0.0) > tol:
                # Near jamming some contact is nearly always about to open or close; where the
                # differences still agree that kink is too small to matter. Where they do not,
                # it, not the derivative, may be why: the element is reported, not judged.
                reach = "2h" if stencil == 4 else "h"
                unchecked[label] = (f"relative error {max(errors_.values()):.1e}, but a contact opens or closes "
                                    f"within θ ± {reach}: x*(θ) has a kink there that the differences straddle "
                                    "(try a smaller --h)")
                continue
            results[label] = errors_
    if not results and not unchecked:
        # e.g. --wrt diameter[1] where only diameter[0] is stored, or diameter[x]: nothing was compared.
        raise KeyError(f"--wrt {wrt!r}: no stored derivative element matches; stored: {', '.join(entries)}")
    worst = max((e for r in results.values() for e in r.values()), default=0.0)
    # An element that disagrees while its contacts change inside the stencil is reported,
    # not judged; a check that could judge nothing is not a pass.
    return {"file_ftol": record.get("meta", {}).get("ftol"), "h": h, "stencil": stencil, "tolerance": tol,
            "elements": results, "unchecked": unchecked,
            "max_error": worst, "ok": bool(results) and bool(worst <= tol)}


@app.command()
def check(
    file: Path = typer.Argument(..., help="An mdsens HDF5 file."),
    wrt: Optional[str] = typer.Option(None, "--wrt", help="Check only NAME or NAME\\[i] (default: every stored "
                                                          "derivative)."),
    h: float = typer.Option(1e-5, "--h", help="Finite-difference step."),
    stencil: int = typer.Option(4, "--stencil", help="Points of the difference formula: 4 (θ ± h and θ ± 2h, "
                                                     "error O(h⁴)) or 2 (θ ± h, error O(h²), half the "
                                                     "relaxations; near jamming its error at h = 1e-5 can "
                                                     "exceed 1e-4)."),
    tol: float = typer.Option(1e-4, "--tol", help="Largest accepted relative error max|a−b|/max|b|."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the verdict."),
) -> None:
    """Re-verify the file's derivatives against central finite differences (exit 1 if they disagree).

    Each parameter element costs four re-relaxations (two with --stencil 2), each followed by a few
    Newton steps: dense up to N·d = 6000, by CG above (2D N = 16384: ~35 s an element, 32768:
    ~80 s; fixed pressure: N·d up to 6000). Pick elements with --wrt on a large file: a
    per-particle diameter has N of them."""
    from mdsens import io
    from mdsens.systems import UsageError

    with errors():
        if not (np.isfinite(h) and h > 0):
            fail(f"--h {h}: the finite-difference step must be a positive number, e.g. 1e-5", EXIT_USAGE)
        if not (np.isfinite(tol) and tol > 0):
            # (0 would make the differences' resolution infinite, and every derivative agree)
            fail(f"--tol {tol}: the accepted relative error must be a positive number, e.g. 1e-4", EXIT_USAGE)
        from mdsens.sensitivity import STENCILS

        if stencil not in STENCILS:
            fail(f"--stencil {stencil}: choose 4 (θ ± h, θ ± 2h) or 2 (θ ± h)", EXIT_USAGE)
        record = io.read(file)
        log(f"checking {file} against central differences (h = {h:g}, {stencil} points) ...", quiet or as_json)
        try:
            report = verify(record, wrt, h, tol, stencil=stencil)
        except KeyError as err:
            fail(str(err.args[0]), EXIT_USAGE)
        except UsageError as err:
            fail(f"{file}: {err}", EXIT_USAGE)
        if as_json:
            print(json.dumps(report))
        else:
            if not quiet:
                for label, errs in report["elements"].items():
                    text = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
                    print(f"  d/d{label}: relative error {text}")
                for label, why in report["unchecked"].items():
                    print(f"  d/d{label}: not checked: {why}")
            skipped = f"; {len(report['unchecked'])} element(s) not checked" if report["unchecked"] else ""
            if not report["elements"]:
                print(f"{file}: nothing could be checked{skipped}")
            else:
                verdict = "agree" if report["ok"] else "DISAGREE"
                print(f"{file}: derivatives {verdict} with finite differences: max relative error "
                      f"{report['max_error']:.1e} (tolerance {tol:.0e}){skipped}")
        if not report["ok"]:
            raise typer.Exit(EXIT_ERROR)
