"""``NAME`` and ``NAME[i]``: the one parser and formatter of indexed names.

Parameters and observables are named ``diameter``, ``diameter[1]``,
``stress[0,1]``; a derivative is labelled ``d<of>/d<wrt>``
(``denergy/ddiameter[2]``). Every part of mdsens that reads or writes such a
name — ``--wrt`` of ``run``/``check``/``plot``, the ``/sensitivity/<wrt>``
groups of a file, export column names, ``show`` — goes through this module,
so there is one grammar and one set of messages:

    name   := identifier [ "[" int { "," int } "]" ]        (spaces allowed around ints)

:func:`parse` checks the grammar only; :func:`resolve` also checks the name
against the parameters on offer and the index against the shape. Both raise
:class:`NameSyntaxError`, a ``ValueError`` with a one-line message that starts
with the text as given (callers prefix the option, e.g. ``--wrt``, and turn it
into their own usage error).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEXED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\[(.*)\]$")

EXAMPLE = "e.g. diameter or diameter[1]"


class NameSyntaxError(ValueError):
    """A malformed or unknown ``NAME[i]``: ``"'<text>': <reason>"``, one line."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"{text!r}: {reason}")
        self.text, self.reason = text, reason


@dataclass(frozen=True)
class Name:
    """``base`` and the element ``index`` (None: the whole array; ``()``: a scalar's one element)."""

    base: str
    index: tuple[int, ...] | None = None

    def __str__(self) -> str:
        return format_name(self.base, self.index)

    @property
    def column(self) -> str:
        """The name as an identifier, for file columns: ``diameter[0,1]`` → ``diameter_0_1``."""
        return self.base if not self.index else self.base + "_" + "_".join(str(i) for i in self.index)


def format_name(base: str, index: Sequence[int] | None = None) -> str:
    """``base`` or ``base[i,j]`` (no spaces): the canonical text of a name."""
    if not index:
        return base
    return f"{base}[{','.join(str(int(i)) for i in index)}]"


def parse(text: str) -> Name:
    """``NAME`` or ``NAME[i]`` / ``NAME[i,j]`` → :class:`Name`; the grammar only."""
    stripped = str(text).strip()
    if _IDENTIFIER.fullmatch(stripped):
        return Name(stripped)
    match = _INDEXED.match(stripped)
    if not match:
        if "[" in stripped and not stripped.endswith("]"):
            raise NameSyntaxError(text, f"unclosed '[' (expected NAME or NAME[i], {EXAMPLE})")
        raise NameSyntaxError(text, f"expected NAME or NAME[i], {EXAMPLE}")
    base, inside = match.group(1), match.group(2)
    parts = [p.strip() for p in inside.split(",")]
    if parts == [""]:
        raise NameSyntaxError(text, f"empty index (expected NAME or NAME[i], {EXAMPLE})")
    for part in parts:
        if not part.isdigit() or not part.isascii():
            raise NameSyntaxError(text, f"index {part!r} is not a non-negative integer "
                                        f"(expected NAME or NAME[i], {EXAMPLE})")
    return Name(base, tuple(int(p) for p in parts))


def resolve(text: str, shapes: Mapping[str, Sequence[int]]) -> Name:
    """:func:`parse` ``text`` and check it against ``shapes`` ({name: shape}): an
    unknown name or an index that is not one element is a :class:`NameSyntaxError`."""
    name = parse(text)
    if name.base not in shapes:
        offered = ", ".join(shapes) or "none"
        raise NameSyntaxError(text, f"no parameter {name.base!r}; on offer: {offered}")
    shape = tuple(int(s) for s in shapes[name.base])
    if name.index is not None and (len(name.index) != len(shape)
                                   or any(not 0 <= i < s for i, s in zip(name.index, shape))):
        what = "a scalar" if not shape else f"shape {shape}"
        raise NameSyntaxError(text, f"index out of range for {name.base} of {what}")
    return name


def elements(base: str, shape: Sequence[int]) -> Iterator[Name]:
    """One :class:`Name` per element of an array ``base`` of ``shape`` (a scalar: ``base`` itself)."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        yield Name(base, ())
        return
    for index in np.ndindex(*shape):
        yield Name(base, tuple(int(i) for i in index))


def matches(name: Name, element: Name) -> bool:
    """Whether the request ``name`` selects ``element``: the same base, and the
    same index unless ``name`` names the whole array."""
    return name.base == element.base and (name.index is None or name.index == tuple(element.index or ()))


def derivative(of: str, wrt: str | Name) -> str:
    """``d<of>/d<wrt>``, e.g. ``denergy/ddiameter[1]``."""
    return f"d{of}/d{wrt}"

