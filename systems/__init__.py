"""The catalogue of particle systems (installed as ``mdsens.systems``).

One module per family; each declares a :class:`Family`: its keys (with types,
defaults, valid ranges and help), its differentiable parameters and a
``build(**config) -> System``. ``mdsens systems`` and ``mdsens run --set`` read
these declarations, so nothing is listed twice.
"""

from __future__ import annotations

from mdsens.systems._family import Family, Key, UsageError
from mdsens.systems import bidisperse, from_file, lj_crystal, morse_cluster, polydisperse

FAMILIES: dict[str, Family] = {f.name: f for f in (
    bidisperse.FAMILY, polydisperse.FAMILY, lj_crystal.FAMILY, morse_cluster.FAMILY, from_file.FAMILY
)}


def get(name: str) -> Family:
    """The family called ``name``; a :class:`UsageError` listing the choices otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UsageError(f"unknown system {name!r}; choose from: {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "Key", "UsageError", "get"]
