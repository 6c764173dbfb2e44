"""Memory preflight: the peak memory of a run, estimated before anything big is allocated.

``mdsens run --set n=2000000000`` would otherwise build 32 GB of positions in
NumPy and be ended by the kernel's OOM killer without a word. :func:`estimate`
sums what a run holds at its peak — positions, the minimizer's state, the
neighbor table and the temporaries of its build, the pair-Hessian blocks of
the derivative, the CG vectors, the preconditioner, the observables and the
outputs — from N, d and the table's width, with generous factors for XLA's
temporaries; :func:`check` refuses (a :class:`~mdsens.systems.UsageError`:
one line, exit 2, nothing written) when that exceeds :func:`host_available`
memory. :func:`mdsens.job.prepare` checks twice: from the resolved
configuration before the build, and with the built system's real N, d, box
and cutoff after it.

Calibration (2D bidisperse, φ = 0.9, ``mdsens run --set n=N --json``, default
options: energy and pressure, --wrt diameter (2 tangents); XLA:CPU, float64,
fresh compiles; peak RSS from ``ru_maxrss``, MiB; the bare process — imports,
XLA, compiling the N = 32 run — peaks at 479 MiB)::

    N       peak    peak − bare   estimate (data)   estimate + runtime
    32       479         0              0.2                 600
    4096     583       104             50                   650
    16384    702       223            233                   833

From 4096 to 16384 the peak grows 9.9 KiB a particle, the estimate 15.6 KiB:
the slope is generous. At 4096 the data estimate is half of ``peak − bare``
because the cell-list programs of a large run compile bigger than the
N = 32 ones (the measured line meets N = 0 at 479 + 64 MiB), which
:data:`RUNTIME_BYTES` (600 MiB) covers: the whole-process estimate is
1.11× (4096) and 1.19× (16384) of the measured peak. The dominant terms at
large N are the table build's candidates (40 %) and the pair blocks with
the CG vectors (2 × 19 %). (N = 65536 could not be measured in the time
available on the shared 2-core machine.)
"""

from __future__ import annotations

import math
import os
import resource
import sys
import weakref
from typing import Any, Iterable, Mapping

#: the bare process: Python, NumPy, JAX, XLA and compiling a run's programs
#: (measured 479 MiB peak RSS for ``mdsens run --set n=32`` on XLA:CPU, about
#: 543 MiB extrapolated to N = 0 from the cell-list runs at 4096 and 16384).
RUNTIME_BYTES = 600 * 2**20

#: table width K (entries per particle, ×1.25 headroom, from a random start)
#: and candidate width W (3^d cells × cell capacity) when the box is not known
#: yet (before the build). Measured at N = 4096: 2D bidisperse K = 25, W = 153;
#: 3D bidisperse K = 45, W = 594; 3D polydisperse K = 54, W = 864; 3D LJ
#: crystal (cutoff 2.5σ) K = 109, W = 1674.
DEFAULT_NEIGHBORS = {2: 32, 3: 80}
DEFAULT_CANDIDATES = {2: 160, 3: 900}

#: observables whose value needs d(d+1)/2 further linear solves.
ELASTIC = ("elastic_tensor", "bulk_modulus", "shear_modulus", "poisson_ratio")


def _ball(dim: int, radius: float) -> float:
    return math.pi * radius**2 if dim == 2 else 4.0 / 3.0 * math.pi * radius**3


def _poisson_max(mean: float) -> float:
    """A generous maximum over many particles of a count with this mean (random start)."""
    return mean + 4.0 * math.sqrt(max(mean, 0.0)) + 3.0


def table_shape(n: int, dim: int, box: Iterable[float] | None, cutoff: float, skin: float = 0.3) -> tuple[int, int]:
    """``(K, W)``: the neighbor table's width and the candidate width of its
    build, as :class:`mdsens.relax.Table` will size them (from a random start).

    ``W = 3^d × cell capacity`` with a cell list (a periodic box at least
    three cells of side ``cutoff + skin`` wide, from 512 particles): a bound
    on the packed rows' width (the most particles in 3^d cells, ×1.2 + 2);
    otherwise every particle is a candidate (``W = N``); an infinite cutoff
    gives the static table of all other particles (``K = W = N − 1``)."""
    from mdsens import relax

    if not math.isfinite(cutoff):
        return max(n - 1, 1), max(n - 1, 1)
    reach = cutoff * relax.CUTOFF_SLACK + skin
    if box is None:  # free space: the density is not known; the table is built from all pairs
        return min(n, DEFAULT_NEIGHBORS[dim]), n
    box = [float(b) for b in box]
    density = n / math.prod(box)
    k = min(n, int(math.ceil(1.25 * _poisson_max(density * _ball(dim, reach)))) + 1)
    grid = [int(math.floor(b / reach)) for b in box]
    if n < relax.CELL_LIST_THRESHOLD or min(grid) < 3:
        return k, n
    cell = density * math.prod(b / g for b, g in zip(box, grid))
    capacity = int(math.ceil(1.5 * _poisson_max(cell))) + 2
    return k, min(n, 3**dim * capacity)


def _coarse_cells(n: int, dim: int, per_cell: int = 32, max_cells: int | None = None) -> int:
    """Cells of the two-level preconditioner's coarse space (:func:`mdsens.precondition.two_level`)."""
    from mdsens import precondition

    max_cells = precondition.MAX_CELLS.get(dim, 1024) if max_cells is None else max_cells
    side = max(1, int(round(min(n / per_cell, max_cells) ** (1.0 / dim))))
    return side**dim


def estimate(
    n: int,
    dim: int,
    *,
    observables: int | Iterable[str] = 2,
    wrt_elements: int = 1,
    elastic: bool = False,
    neighbors: int | None = None,
    candidates: int | None = None,
    all_pairs: bool = False,
    batched: bool = False,
    itemsize: int = 8,
    sparse: bool = False,
) -> dict[str, int]:
    """Estimated peak memory of one run, in bytes, by item, and ``total``
    (the run's data, without the bare process's :data:`RUNTIME_BYTES`).

    n, dim: particles and dimension. observables: how many (or their names;
    elastic moduli imply ``elastic``). wrt_elements: tangents solved (the
    elements of every ``--wrt``). elastic: d(d+1)/2 further solves.
    neighbors, candidates: the table's width K and its build's candidate
    width W (:func:`table_shape`; defaults: typical soft spheres at φ ≈ 0.9).
    all_pairs: the derivatives sum over all N(N−1)/2 pairs (N ≤ 64, an
    interaction without cutoff, ``--all-pairs``). batched: the tangents are
    one batched CG (``vmap``, accelerators) rather than one after another.
    itemsize: 8 in float64, 4 in float32. sparse: the derivatives factor the
    Hessian on the host (:mod:`mdsens.sparse`, 2D): :func:`sparse_fill` entries.

    Every term is linear in N (quadratic for all pairs) and grows with d; the
    factors are generous (XLA keeps a loop's state and its next value, and
    temporaries of a gather or a sort, alive together)."""
    n, dim = int(n), int(dim)
    if not isinstance(observables, int):
        names = list(observables)
        elastic = elastic or any(name in ELASTIC for name in names)
        observables = len(names)
    f = itemsize
    k = int(neighbors if neighbors is not None else min(n, DEFAULT_NEIGHBORS.get(dim, 80)))
    w = int(candidates if candidates is not None else min(n, DEFAULT_CANDIDATES.get(dim, 900)))
    nd = n * dim * f  # one (N, d) vector
    # derivative pairs: all pairs, or the table's pairs i < j (about half its width, generous)
    m = n * (n - 1) // 2 if all_pairs else n * k // 2
    tangents = max(1, int(wrt_elements))
    solves = tangents if batched else 1
    coarse = (_coarse_cells(n, dim) * dim) ** 2 * f
    items = {
        # the build's NumPy array, x0, x*, q*, the record's positions, rattler mask
        "positions": 6 * nd,
        # FIRE's x, v, F for the running state and the next one, the table's reference positions
        "minimizer": 8 * nd,
        # idx (N, K) int32: the table in use, its successor (a chunk's output, a reallocation)
        # and the host copy that pairs_from_table turns into (2, M) pairs via int64 rows
        "neighbor_table": 3 * n * k * 4 + n * k * (8 + 4 + 1) + 2 * m * 4,
        # a table build: candidates and their sort key (int32), |dr|² and dr (float), the mask
        "table_build": n * w * (4 + 4 + f + dim * f + 1),
        # a force: dr (N, K, d), r, φ'(r) and the scale per entry
        "forces": n * k * (dim * f + 3 * f),
        # the (M, d, d) pair blocks, built twice (preconditioner and Hessian product) with
        # the vmapped hessian's temporaries, and (M, d) separations and gathers
        "pair_hessians": 4 * m * dim * dim * f + 4 * m * dim * f + 2 * m * 4,
        # CG: x, r, p, Ap, z, b, the gauge's projections; block-Jacobi's (N, d, d)
        # inverse and its eigh; the coarse matrix, its eigenvectors and pseudo-inverse
        "cg": solves * 8 * nd + 4 * n * dim * dim * f + 5 * coarse,
        # each observable, and its tangent, over the pair list
        "observables": max(0, int(observables)) * 2 * m * dim * f,
        # d(d+1)/2 more solves, one after another, on their own pair blocks
        "elastic": (8 * nd + 2 * m * dim * dim * f) if elastic else 0,
        # dx*/dθ (N, d) per tangent: stacked on the device (the host shares it on the CPU),
        # squared for the summary, one tangent's jvp in flight
        "outputs": 3 * tangents * nd,
        # SuperLU's factors (a value and an index per entry, 1.5× for the assembly's and
        # the solve's copies), and the assembled matrix; CHOLMOD's (the default backend)
        # keep only L, so for it this is an upper bound
        "sparse_factor": (int(1.5 * 12 * sparse_fill(n * dim)) + 12 * 4 * m * dim * dim) if sparse else 0,
    }
    items["total"] = sum(items.values())
    return items


def sparse_fill(size: int) -> int:
    """Entries of the LU factors of a 2D packing's Hessian with ``size`` rows
    (N d), as measured (2D bidisperse φ = 0.9, SuperLU with the
    ``MMD_AT_PLUS_A`` ordering, :mod:`mdsens.sparse`): 65 per row at N = 1024,
    114 at 16384, 163 at 131072, about 14 more per doubling."""
    per_row = 65 + 14 * max(0.0, math.log2(max(size, 1)) - 11)
    return int(per_row * size)


def particles(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(N, d)`` from a resolved build configuration, before the build: the
    ``n`` key, or a lattice's ``cells`` (2D: 2 sites a cell, 3D: 4; less
    ``vacancies``); None when the size is only known after the build (a file)."""
    dim = int(config.get("dim") or 0)
    if dim not in (2, 3):
        return None
    if "n" in config:
        return int(config["n"]), dim
    if "cells" in config:
        cells = int(config["cells"])
        return max(0, (2 * cells**2 if dim == 2 else 4 * cells**3) - int(config.get("vacancies", 0))), dim
    return None


def job_estimate(system: Any = None, *, n: int | None = None, dim: int | None = None,
                 observe: Iterable[str] = ("energy", "pressure"), wrt_elements: int = 1,
                 neighbor_list: bool | None = None, skin: float = 0.3, itemsize: int = 8,
                 sparse: bool = False) -> dict[str, int]:
    """:func:`estimate` for a run: from a built ``system`` (its N, d, box and
    cutoff size the table), or from ``n`` and ``dim`` alone (before the
    build: typical table widths). ``neighbor_list`` as in
    :class:`mdsens.job.Job`: the derivatives use all pairs for an infinite
    cutoff, for ``False``, and for ``None`` up to 64 particles."""
    import jax

    batched = jax.default_backend() != "cpu"
    if system is None:
        n, dim = int(n), int(dim)
        cutoff, box = None, None
    else:
        import numpy as np

        n, dim = system.n, system.dim
        cutoff = float(system.cutoff(system.params))
        box = np.asarray(system.params["box"]).tolist() if system.periodic else None
    finite = cutoff is None or math.isfinite(cutoff)
    all_pairs = not finite or neighbor_list is False or (neighbor_list is None and n <= 64)
    k = w = None
    if system is not None:
        k, w = table_shape(n, dim, box, cutoff, skin)
    return estimate(n, dim, observables=list(observe), wrt_elements=wrt_elements, neighbors=k,
                    candidates=w, all_pairs=all_pairs, batched=batched, itemsize=itemsize, sparse=sparse)


def describe(system: str, overrides: Mapping[str, str], n: int, dim: int) -> str:
    """What the error message names: the ``--set`` options that size the run
    (``--set n=2000000000``), else the system with its N and d."""
    sizing = [f"--set {k}={overrides[k]}" for k in ("n", "cells", "dim") if k in overrides]
    if sizing and ("n" in overrides or "cells" in overrides):
        return " ".join(sizing)
    return f"{system} (N = {n}, d = {dim})"


#: the estimate :func:`mdsens.job.prepare` made for each system it built
_ESTIMATES: "weakref.WeakKeyDictionary[Any, dict[str, int]]" = weakref.WeakKeyDictionary()


def remember(system: Any, items: dict[str, int]) -> None:
    _ESTIMATES[system] = items


def recall(system: Any) -> dict[str, int] | None:
    return _ESTIMATES.get(system)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """A cgroup v2 limit less its usage (containers), or None."""
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as fh:
            current = int(fh.read().strip())
        return max(0, int(limit) - current)
    except (OSError, ValueError):
        return None


def host_available() -> tuple[int | None, str]:
    """Bytes this process may still allocate on the host, and where that number came from:
    /proc/meminfo ``MemAvailable`` (capped by a cgroup limit), else the total
    physical memory from ``os.sysconf``."""
    available = _meminfo_available()
    source = "available"
    if available is None:
        try:
            available = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
            source = "in total"
        except (ValueError, OSError, AttributeError):
            return None, ""
    limited = _cgroup_available()
    if limited is not None and limited < available:
        return limited, "available to this container"
    return available, source


def device_available() -> int | None:
    """The accelerator's memory limit as JAX reports it (``memory_stats()``), or
    None (the CPU, or a backend that reports nothing)."""
    try:
        import jax

        device = jax.devices()[0]
        if device.platform == "cpu":
            return None
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        if not limit:
            return None
        return int(limit) - int(stats.get("bytes_in_use", 0))
    except Exception:  # a backend without memory_stats, or none at all
        return None


def human(nbytes: float) -> str:
    """``410 GB``, ``21 GB``, ``1.3 GB``, ``640 MB`` (powers of 1000; PB above 1000 TB)."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{nbytes / 1e6:.1f} MB"


def check(items: Mapping[str, int], what: str) -> None:
    """Raise :class:`~mdsens.systems.UsageError` (one line, exit 2) when the
    estimated peak (``items["total"]`` plus the bare process) exceeds the
    host's available memory, or the run's data exceeds the accelerator's."""
    from mdsens.systems import UsageError

    need = int(items["total"]) + RUNTIME_BYTES
    host, source = host_available()
    if host is not None and need > host:
        raise UsageError(f"{what} needs an estimated {human(need)}; this machine has {human(host)} {source} "
                         "(use fewer particles)")
    device = device_available()
    if device is not None and int(items["total"]) > device:
        raise UsageError(f"{what} needs an estimated {human(items['total'])} of accelerator memory; the device "
                         f"has {human(device)} (use fewer particles, or --device cpu)")


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
