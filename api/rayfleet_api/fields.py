"""The field table's vocabulary, and the three readings every table gets from it.

``desired.py`` lists the desired state's fields once, as ``Field``s (``FIELDS``); from that one list come
the wire form (``encode``/``decode``: the controller API's JSON), the spec mapping (``from_spec``: a
ServeDeployment spec, as the API server defaulted it), the versioned set and the upper bounds, and the
test that holds the CRD's defaults to the dataclasses'.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from rayfleet_api.errors import SpecError

# A reader takes a field's wire value (None: absent or null) and its path; it returns the value, or None
# for the dataclass's default, or raises SpecError naming the path.
Reader = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Field:
    name: str  # camelCase: the spec's, the CRD's and the wire's
    attr: str  # the dataclass attribute
    read: Reader
    versioned: bool = False  # baked into a replica process: changing it rolls the replicas to a new version
    spec_form: Callable[[Any, str], Any] | None = None  # the spec's value -> the wire's, where the two differ
    in_spec: bool = True  # False: the wire's alone (the spec's version is hashed from the spec)
    sent_if_none: bool = True  # False: left out of the wire form while None (older controllers refuse it)


@dataclass(frozen=True)
class Number:
    """A number field's checks: ``minimum`` (excluded if ``exclusive``), ``maximum`` (the CRD's too)."""

    minimum: float
    integer: bool = False
    exclusive: bool = False
    maximum: float | None = None

    def __call__(self, value: Any, path: str) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (self.integer and not isinstance(value, int)):
            raise SpecError(path, f"must be {'an integer' if self.integer else 'a number'}, got {value!r}")
        # Python's JSON parser accepts NaN/Infinity; NaN passes every comparison below, and either would
        # stall timers (a NaN health period never comes due) and make the observed state invalid JSON.
        if not math.isfinite(value):
            raise SpecError(path, f"must be a finite number, got {value!r}")
        if value < self.minimum or (self.exclusive and value == self.minimum):
            raise SpecError(path, f"must be {'>' if self.exclusive else '>='} {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise SpecError(path, f"must be <= {self.maximum}, got {value!r}")
        return value


@dataclass(frozen=True)
class Nested:
    """An object field: a dataclass with a table of its own; ``check`` judges the decoded whole."""

    cls: type
    fields: tuple[Field, ...]
    check: Callable[[Any, str], None] | None = None

    def __call__(self, value: Any, path: str) -> Any:
        if value is None:
            return None
        decoded = decode(self.cls, self.fields, value, path + ".")
        if self.check:
            self.check(decoded, path)
        return decoded


def decode(cls: type, fields: tuple[Field, ...], body: Any, prefix: str = "") -> Any:
    """``cls`` from its wire form, every field read and checked, unknown keys refused."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise SpecError(prefix.rstrip(".") or "<body>", "must be an object")
    left = dict(body)
    values = {}
    for f in fields:
        value = f.read(left.pop(f.name, None), prefix + f.name)
        if value is not None:
            values[f.attr] = value
        elif default_of(cls, f.attr) is dataclasses.MISSING:
            raise SpecError(prefix + f.name, "is required")
    if left:  # a field this controller does not know would otherwise be silently ignored
        raise SpecError(prefix + sorted(left)[0], "unknown field (is the replica image older than the operator?)")
    return cls(**values)


def encode(obj: Any, fields: tuple[Field, ...]) -> dict[str, Any]:
    """The wire form of ``obj``."""
    out = {}
    for f in fields:
        value = getattr(obj, f.attr)
        if value is None and not f.sent_if_none:
            continue
        out[f.name] = encode(value, f.read.fields) if isinstance(f.read, Nested) and value is not None else value
    return out


def from_spec(cls: type, fields: tuple[Field, ...], spec: dict[str, Any], prefix: str = "spec.") -> Any:
    """``cls`` from a spec the API server validated: absent fields take the dataclass's defaults."""
    values = {}
    for f in fields:
        value = spec.get(f.name) if f.in_spec else None
        if value is None:
            continue
        if isinstance(f.read, Nested):
            value = from_spec(f.read.cls, f.read.fields, value, f"{prefix}{f.name}.")
        elif f.spec_form:
            value = f.spec_form(value, prefix + f.name)
        values[f.attr] = value
    return cls(**values)


def walk(cls: type, fields: tuple[Field, ...], prefix: str = "") -> Iterator[tuple[str, type, Field]]:
    """(path, owning dataclass, field) for every field, nested ones after their object's."""
    for f in fields:
        yield prefix + f.name, cls, f
        if isinstance(f.read, Nested):
            yield from walk(f.read.cls, f.read.fields, f"{prefix}{f.name}.")


def default_of(cls: type, attr: str) -> Any:
    """The dataclass's default for ``attr`` (a factory's value), or ``dataclasses.MISSING``: required."""
    f = next(f for f in dataclasses.fields(cls) if f.name == attr)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default
