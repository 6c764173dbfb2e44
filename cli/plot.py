"""``mdsens plot``: the paper's figure from a file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mdsens.cli.app import EXIT_USAGE, app, errors, fail, log


@app.command()
def plot(
    file: Path = typer.Argument(..., help="An mdsens HDF5 file."),
    output: Path = typer.Option(Path("mdsens.png"), "-o", "--output", help="Image to write (png, pdf, svg)."),
    wrt: Optional[str] = typer.Option(None, "--wrt", help="Which dx*/dθ to draw: NAME (its first element) or "
                                                          "NAME\\[i]; default the first in the file."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing image."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log line."),
) -> None:
    """Draw the packing to scale with arrows for dx*/dθ, and the distribution of |dx_i*/dθ|;
    for a design file, the observables and the loss against the step and the diameters' changes."""
    from mdsens import io
    from mdsens import plot as _plot

    with errors():
        if output.exists() and not force:
            fail(f"{output} exists; pass --force to overwrite it, or -o another path", EXIT_USAGE)
        from mdsens import ensemble_io

        if ensemble_io.is_ensemble(file):  # observables and derivatives against the swept key
            ensemble_io.plot(ensemble_io.read(file), output)
            log(f"wrote {output}", quiet)
            return
        record = io.read(file)
        try:
            _plot.plot(record, output, wrt)
        except _plot.PlotError as err:
            fail(str(err), EXIT_USAGE)
        log(f"wrote {output}", quiet)
