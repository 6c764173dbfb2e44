"""Declarations shared by the system families: keys, parameters, validation."""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from mdsens.system import System


class UsageError(ValueError):
    """Bad user input (unknown key, value out of range); the CLI exits with code 2."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text.strip()} is not a finite number")
    return value


def _parse_floats(text: str) -> tuple[float, ...]:
    return tuple(_finite(t) for t in text.split(",") if t.strip())


_PARSERS: dict[str, Callable[[str], Any]] = {"int": int, "float": _finite, "floats": _parse_floats, "str": str}


@dataclass(frozen=True)
class Key:
    """One build key. ``kind`` is "int", "float", "floats" (a comma list) or "str";
    ``check(value)`` returns an error message or None."""

    name: str
    kind: str
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None

    def parse(self, text: str) -> Any:
        try:
            return _PARSERS[self.kind](text)
        except ValueError:
            finite = " (finite)" if self.kind in ("float", "floats") else ""
            raise UsageError(f"{self.name}={text!r}: expected {self.kind}{finite}") from None

    def validate(self, value: Any) -> Any:
        message = None if self.check is None else self.check(value)
        if message:
            raise UsageError(f"{self.name}={value!r}: {message}")
        return value


@dataclass(frozen=True)
class Family:
    """A system family: ``build(**config, seed=...) -> System``.

    parameters: differentiable parameter name -> one-line description
    (shape and meaning), in the order ``mdsens systems`` lists them.
    exclusive: pairs of keys that cannot both be given (e.g. phi and pressure).
    requires: key -> the key it needs given too (e.g. box_dof -> pressure).
    """

    name: str
    description: str
    keys: tuple[Key, ...]
    parameters: Mapping[str, str]
    build_fn: Callable[..., System] = field(repr=False)
    exclusive: tuple[tuple[str, str], ...] = ()
    requires: Mapping[str, str] = field(default_factory=dict)

    def _check_given(self, given: set[str]) -> None:
        for a, b in self.exclusive:
            if a in given and b in given:
                raise UsageError(f"system {self.name!r}: give {a} or {b}, not both")
        for a, b in self.requires.items():
            if a in given and b not in given:
                raise UsageError(f"system {self.name!r}: {a} needs {b} (it only applies with {b}=...)")

    def resolve(self, overrides: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Defaults updated by ``overrides`` (key -> text), parsed and validated."""
        keys = {k.name: k for k in self.keys}
        config = {k.name: k.default for k in self.keys}
        for name, text in (overrides or {}).items():
            if name not in keys:
                raise UsageError(f"system {self.name!r} has no key {name!r}; its keys: {', '.join(keys)}")
            config[name] = keys[name].parse(text)
        self._check_given(set(overrides or {}))
        return {name: keys[name].validate(value) for name, value in config.items()}

    def build(self, seed: int = 0, **overrides: Any) -> System:
        """Build from already-typed values (Python API): ``FAMILY.build(n=64, phi=0.95)``."""
        config = self.resolve({})
        keys = {k.name: k for k in self.keys}
        for name, value in overrides.items():
            if name not in keys:
                raise UsageError(f"system {self.name!r} has no key {name!r}; its keys: {', '.join(keys)}")
            config[name] = keys[name].validate(value)
        self._check_given(set(overrides))
        return self.build_fn(seed=seed, **config)


def positive(value: Any) -> str | None:
    values = value if isinstance(value, tuple) else (value,)
    return None if all(v > 0 for v in values) else "must be positive"


def at_least(minimum: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= minimum else f"must be at least {minimum}"


def positive_or_none(value: Any) -> str | None:
    """For ``pressure``: unset (None) or positive; purely repulsive particles at
    P ≤ 0 would push the box apart forever."""
    if value is None or value > 0:
        return None
    return "must be positive: these particles only repel, so at P <= 0 the box would grow forever"


def one_of(*choices: Any) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"
