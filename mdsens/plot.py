"""The paper's figure: a relaxed packing with its sensitivity field.

Left: particles to scale (disks of their diameter), coloured by species, in
the periodic box (disks crossing a side are drawn at both images), rattlers
pale, and an arrow per particle for ∂x*/∂θ. Right: the distribution of the
per-particle magnitudes |∂x_i*/∂θ| by species. In 3D, the left panel is a
slab projection: the particles whose centres lie within one largest diameter
of the box's mid-plane z = L_z/2, drawn as their cross-sections with the
plane, arrows projected onto (x, y).

Everything reads the record of :func:`mdsens.io.read`; ``matplotlib`` is
imported lazily with whatever backend is configured (Agg when headless).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from mdsens import names
from mdsens.export import derivative_fields

_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


class PlotError(ValueError):
    """The requested field is not in the file (one-line message)."""


def select_field(record: Mapping[str, Any], wrt: str | None = None) -> tuple[str, np.ndarray]:
    """The ∂x*/∂θ field to draw: ``(label, (N, d) array)``.

    ``wrt`` is ``NAME`` (its first element) or ``NAME[i]``; default: the first
    field in the file (``diameter[0]``, the small diameter, for the reference run).
    """
    fields = [(label, u) for _, label, u in derivative_fields(record)]
    if not fields:
        raise PlotError("the file has no position derivatives (/sensitivity/*/position); "
                        "was the relaxation converged, and was --wrt given to `mdsens run`?")
    if wrt is None:
        return fields[0]
    try:
        wanted = names.parse(wrt)
    except names.NameSyntaxError as err:
        raise PlotError(f"--wrt {err}") from None
    for label, u in fields:
        if names.matches(wanted, names.parse(label)):
            return label, u
    raise PlotError(f"--wrt {wrt!r}: not in the file; available: {', '.join(label for label, _ in fields)}")


def _images(x: np.ndarray, r: np.ndarray, box: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Periodic copies of the disks that cross a side: (centres, indices)."""
    if box is None:
        return x, np.arange(len(x))
    centres, index = [x], [np.arange(len(x))]
    for sx in (-1, 0, 1):
        for sy in (-1, 0, 1):
            if sx == sy == 0:
                continue
            shifted = x + np.array([sx, sy]) * box
            keep = np.all((shifted + r[:, None] > 0) & (shifted - r[:, None] < box), axis=1)
            centres.append(shifted[keep])
            index.append(np.nonzero(keep)[0])
    return np.concatenate(centres), np.concatenate(index)


def figure(record: Mapping[str, Any], wrt: str | None = None, slab: float | None = None):
    """Build the figure (a :class:`matplotlib.figure.Figure`)."""
    import matplotlib

    if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle, Rectangle
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

    label, u = select_field(record, wrt)
    x = np.asarray(record["positions"], dtype=float)
    n, d = x.shape
    if "diameter" in record:
        diameter = np.asarray(record["diameter"], dtype=float)
    else:  # a record straight from mdsens.job.Result.record(), not read back from a file
        from mdsens.io import particle_diameters

        diameter = particle_diameters(record)
    species = np.asarray(record["species"])
    rattler = np.asarray(record["rattler"], dtype=bool)
    box = None if record["box"] is None else np.asarray(record["box"], dtype=float)
    magnitude = np.linalg.norm(u, axis=-1)

    radius = diameter / 2
    shown = np.ones(n, bool)
    note = ""
    if d == 3:
        thickness = float(np.max(diameter)) if slab is None else float(slab)
        centre = box[2] / 2 if box is not None else float(np.median(x[:, 2]))
        dz = x[:, 2] - centre
        if box is not None:
            dz -= box[2] * np.round(dz / box[2])
        shown = np.abs(dz) < thickness / 2
        radius = np.sqrt(np.clip(radius**2 - dz**2, 0, None))
        shown &= radius > 0.05 * diameter
        note = f"slab |z − {centre:.2f}| < {thickness / 2:.2f}: {int(shown.sum())} of {n} particles"
        box = None if box is None else box[:2]
    x2, u2 = x[:, :2], u[:, :2]

    fig, (ax, hist) = plt.subplots(1, 2, figsize=(12.5, 6), gridspec_kw={"width_ratios": [1.15, 1]})
    centres, index = _images(x2[shown], radius[shown], box)
    index = np.nonzero(shown)[0][index]
    colours = [_COLOURS[int(species[i]) % len(_COLOURS)] for i in index]
    alpha = np.where(rattler[index], 0.25, 0.75)
    patches = [Circle(c, radius[i]) for c, i in zip(centres, index)]
    disks = ax.add_collection(PatchCollection(patches, facecolor=colours, edgecolor="k", linewidth=0.4))
    disks.set_alpha(alpha)
    if box is not None:
        frame = ax.add_patch(Rectangle((0, 0), box[0], box[1], fill=False, edgecolor="k", linewidth=1.2))
        disks.set_clip_path(frame)
        ax.set_xlim(-0.05 * box[0], 1.05 * box[0])
        ax.set_ylim(-0.05 * box[1], 1.05 * box[1])
    else:
        pad = float(np.max(diameter))
        ax.set_xlim(x2[:, 0].min() - pad, x2[:, 0].max() + pad)
        ax.set_ylim(x2[:, 1].min() - pad, x2[:, 1].max() + pad)
    # Longest arrows ≈ one largest diameter: the field's shape, not its size, is what the eye reads.
    held = shown & ~rattler
    top = float(np.percentile(magnitude[held], 98)) if held.any() else 0.0
    scale = (float(np.max(diameter)) / top) if top > 0 else 1.0
    arrows = ax.quiver(x2[shown, 0], x2[shown, 1], u2[shown, 0] * scale, u2[shown, 1] * scale, angles="xy",
              scale_units="xy", scale=1.0, width=0.0035, color="k", zorder=3)
    if box is not None:
        arrows.set_clip_path(frame)
    ax.set_aspect("equal")
    ax.set_xlabel("x / σ")
    ax.set_ylabel("y / σ")
    title = f"∂x*/∂{label}   (arrows ×{scale:.2g})"
    ax.set_title(title if not note else f"{title}\n{note}", fontsize=11)
    kinds = np.unique(species)

    def name(s: int) -> str:
        sizes = diameter[species == s]
        size = f"D = {sizes[0]:.3g}" if np.ptp(sizes) == 0 else f"D {sizes.min():.3g}–{sizes.max():.3g}"
        return f"species {s} ({size})"

    values = magnitude[~rattler]
    positive = values[values > 0]
    if positive.size:
        bins = np.logspace(np.log10(positive.min()) - 0.05, np.log10(positive.max()) + 0.05, 30)
        groups = [magnitude[(species == s) & ~rattler & (magnitude > 0)] for s in kinds]
        hist.hist(groups, bins=bins, stacked=True, color=[_COLOURS[s % len(_COLOURS)] for s in kinds],
                  edgecolor="k", linewidth=0.4, label=[name(s) for s in kinds])
        hist.set_xscale("log")
        hist.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        hist.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        hist.xaxis.set_minor_formatter(NullFormatter())
        mean = float(np.mean(values))
        hist.axvline(mean, color="k", linestyle="--", linewidth=1, label=f"mean {mean:.3g}")
        if rattler.any():
            hist.plot([], [], marker="o", linestyle="", color="0.85", markeredgecolor="k",
                      label=f"rattlers: {int(rattler.sum())} (pale, excluded)")
        hist.legend(fontsize=8, loc="upper left")
    hist.set_xlabel(f"|∂x_i*/∂{label}|")
    hist.set_ylabel("particles")
    hist.yaxis.set_major_locator(MaxNLocator(integer=True))
    total = float(np.linalg.norm(u))
    meta = record.get("meta", {})
    hist.set_title(f"distribution over {int((~rattler).sum())} held particles;  ‖∂x*/∂{label}‖ = {total:.4g}",
                   fontsize=11)
    obs = record.get("observables", {})
    bits = [f"{meta.get('system', '')}: N = {n}, d = {d}"]
    for name in ("energy", "pressure"):
        if name in obs:
            bits.append(f"{name} {float(np.asarray(obs[name])):.4g}")
    fig.suptitle(",  ".join(bits), fontsize=12)
    fig.tight_layout()
    return fig


def design_figure(record: Mapping[str, Any]):
    """A design file (``mdsens design``): the observables and the loss against the
    step (targets dashed, steps where the contact network changed marked on the
    loss), and the final packing coloured by each diameter's relative change."""
    import matplotlib

    if os.environ.get("MPLBACKEND") is None and not os.environ.get("DISPLAY"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle, Rectangle

    design = record["design"]
    attrs = design.get("attrs", {})
    targets = attrs.get("targets", {}) or {}
    loss = np.asarray(design["loss"], dtype=float)
    steps = np.arange(loss.size)
    has_diameters = "diameter" in design and np.ndim(design["diameter"]) == 2 \
        and np.shape(design["diameter"])[1] == np.shape(record["positions"])[0]
    panels = 3 if has_diameters and np.shape(record["positions"])[1] == 2 else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.6))
    for k, (name, values) in enumerate(design.get("observables", {}).items()):
        colour = _COLOURS[k % len(_COLOURS)]
        axes[0].plot(steps, np.asarray(values, dtype=float), color=colour, label=name)
        if name in targets:
            axes[0].axhline(float(targets[name]), color=colour, linestyle="--", linewidth=1,
                            label=f"target {float(targets[name]):g}")
    axes[0].set_xlabel("design step")
    axes[0].set_ylabel("observable")
    axes[0].legend(fontsize=8)
    if np.all(loss > 0):
        axes[1].semilogy(steps, loss, color="k")
    else:
        axes[1].plot(steps, loss, color="k")
    axes[1].set_xlabel("design step")
    axes[1].set_ylabel("loss")
    checks = design.get("fd_check", {})
    passed = np.asarray(checks.get("passed", []), dtype=bool)
    axes[1].set_title(f"contact changes {attrs.get('contact_changes', '?')}, gradient checks passed "
                      f"{int(passed.sum())}/{passed.size}", fontsize=10)
    if panels == 3:
        ax = axes[2]
        d0 = np.asarray(design["diameter"][0], dtype=float)
        d1 = np.asarray(design["diameter"][-1], dtype=float)
        change = d1 / d0 - 1
        x = np.asarray(record["positions"], dtype=float)
        box = None if record["box"] is None else np.asarray(record["box"], dtype=float)
        centres, index = _images(x, d1 / 2, box)
        limit = float(np.max(np.abs(change))) or 1.0
        disks = PatchCollection([Circle(c, d1[i] / 2) for c, i in zip(centres, index)], cmap="coolwarm",
                                edgecolor="k", linewidth=0.4)
        disks.set_array(change[index])
        disks.set_clim(-limit, limit)
        ax.add_collection(disks)
        if box is not None:
            frame = ax.add_patch(Rectangle((0, 0), box[0], box[1], fill=False, edgecolor="k", linewidth=1.2))
            disks.set_clip_path(frame)
            ax.set_xlim(-0.05 * box[0], 1.05 * box[0])
            ax.set_ylim(-0.05 * box[1], 1.05 * box[1])
        else:
            ax.set_xlim(x[:, 0].min() - 1, x[:, 0].max() + 1)
            ax.set_ylim(x[:, 1].min() - 1, x[:, 1].max() + 1)
        ax.set_aspect("equal")
        fig.colorbar(disks, ax=ax, label="D_final / D_start − 1", shrink=0.8)
        ax.set_title("final packing", fontsize=10)
    meta = record.get("meta", {})
    fig.suptitle(f"{meta.get('system', '')}: design, {loss.size} steps, loss {loss[0]:.3g} → {loss[-1]:.3g}",
                 fontsize=12)
    fig.tight_layout()
    return fig


def plot(record: Mapping[str, Any], output: str | os.PathLike, wrt: str | None = None, dpi: int = 150) -> None:
    """Draw :func:`figure` (or :func:`design_figure` for a design file, unless
    ``wrt`` asks for a sensitivity field) and save it to ``output``."""
    import matplotlib.pyplot as plt

    fig = design_figure(record) if record.get("design") and wrt is None else figure(record, wrt)
    try:
        fig.savefig(output, dpi=dpi)
    finally:
        plt.close(fig)
