"""Perfect lattices for the crystal and cluster families (plain numpy)."""

from __future__ import annotations

import math

import numpy as np


def triangular(cells: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """A periodic triangular lattice of ``cells × cells`` rectangular cells
    (``a × a√3``, two sites each): positions (2·cells², 2) and box (2,)."""
    a = spacing
    basis = np.array([[0.0, 0.0], [0.5 * a, 0.5 * math.sqrt(3.0) * a]])
    cell = np.array([a, math.sqrt(3.0) * a])
    return _tile(basis, cell, cells, 2)


def fcc(cells: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """A periodic FCC lattice with nearest-neighbour distance ``spacing``:
    ``cells³`` cubic cells of side ``spacing·√2``, four sites each;
    positions (4·cells³, 3) and box (3,)."""
    side = spacing * math.sqrt(2.0)
    basis = side * np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])
    return _tile(basis, np.full(3, side), cells, 3)


def close_packed(dim: int, cells: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Triangular (2D) or FCC (3D) lattice: positions and periodic box."""
    return triangular(cells, spacing) if dim == 2 else fcc(cells, spacing)


def _tile(basis: np.ndarray, cell: np.ndarray, cells: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    grid = np.stack(np.meshgrid(*([np.arange(cells)] * dim), indexing="ij"), axis=-1).reshape(-1, dim)
    positions = (grid[:, None, :] * cell + basis[None, :, :]).reshape(-1, dim)
    return positions, cells * cell


def cluster(dim: int, n: int, spacing: float) -> np.ndarray:
    """The ``n`` close-packed lattice sites nearest to a site at the origin
    (a compact cluster, nearest-neighbour distance ``spacing``), centred."""
    cells = 2 * math.ceil(n ** (1.0 / dim)) + 2
    positions, box = close_packed(dim, cells, spacing)
    centre = positions[np.argmin(np.sum((positions - box / 2) ** 2, axis=1))]
    distance = np.sum((positions - centre) ** 2, axis=1)
    # Stable sort on rounded distances: a deterministic choice among equidistant shells.
    chosen = positions[np.argsort(np.round(distance, 9), kind="stable")[:n]]
    return chosen - chosen.mean(axis=0)
