"""``mdsens export``: the file in formats other programs open."""

from __future__ import annotations

from pathlib import Path

import typer

from mdsens.cli.app import EXIT_USAGE, app, errors, fail, log


@app.command()
def export(
    file: Path = typer.Argument(..., help="An mdsens HDF5 file."),
    fmt: str = typer.Option("", "--format", "-f",
                             help="extxyz (ASE, OVITO), h5md3d (MDAnalysis) or gsd (HOOMD, OVITO); with --member, "
                                  "default an mdsens run file."),
    member: int = typer.Option(None, "--member", metavar="K",
                               help="From an ensemble file (mdsens ensemble): member K (0-based, the row of "
                                    "/ensemble/seed) as a run file that show, plot and check accept."),
    output: Path = typer.Option(..., "-o", "--output", help="File to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log line."),
) -> None:
    """Export to extended XYZ (species, diameter, rattler, one dx*/dθ vector per parameter element),
    to a 3D-embedded H5MD file that MDAnalysis reads, or to one frame of HOOMD's GSD
    (centered box, typeid, diameter, dimensions; float32)."""
    from mdsens import export as _export

    with errors():
        if member is not None:
            from mdsens import ensemble_io, io

            if fmt and fmt != "mdsens":
                fail("--member writes an mdsens run file; export that file with --format afterwards", EXIT_USAGE)
            if output.exists() and not force:
                fail(f"{output} exists; pass --force to overwrite it, or -o another path", EXIT_USAGE)
            io.write(output, ensemble_io.member_record(ensemble_io.read(file), member))
            log(f"wrote {output} (member {member} of {file})", quiet)
            return
        if not fmt:
            fail("--format is required: extxyz, h5md3d or gsd (or --member K for an ensemble file)", EXIT_USAGE)
        if fmt not in _export.FORMATS:
            fail(f"--format {fmt!r}: choose {', '.join(_export.FORMATS)}", EXIT_USAGE)
        if output.exists() and not force:
            fail(f"{output} exists; pass --force to overwrite it, or -o another path", EXIT_USAGE)
        _export.export(file, fmt, output)
        log(f"wrote {output} ({fmt})", quiet)
