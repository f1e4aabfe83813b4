"""The one loader of the data files that ship inside the package: architecture schemas, base-config presets,
quantization schemes, engine rule files and the PEFT layout.

Each file is found with importlib.resources (so a wheel and a checkout read alike), decoded by the one JSON reader
(`small_files.parse_json`), and checked against a declared spec of its fields before its loader turns it into
Python values. One strictness rule holds for every file: every key an object may hold is declared (required or
optional, each with its type); an undeclared key is refused; `_note` (a string: the file's own comments) is allowed
on every object. One error format: a SchemaError reading

    <file>: <where>: <what was expected>, got <what is there>

where <where> is the path of the offending value inside the document (`top level`, `groups[3].slices[0].name`).
Semantic checks (an expression that does not compile, a name that refers to nothing) stay with each loader, run
after the spec, and raise through `fail` in the same format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from lora_convert.errors import SchemaError
from lora_convert.io.small_files import json_type_name, parse_json

__all__ = [
    "ANY",
    "BOOL",
    "EXPRESSION",
    "STRING",
    "TEXT",
    "Choice",
    "ListOf",
    "MapOf",
    "Nullable",
    "Object",
    "Scalar",
    "check",
    "fail",
    "load_shipped",
    "read_resource",
    "read_shipped",
    "shipped_files",
]

NOTE_KEY = "_note"
HINT = (
    "The file ships with lora-convert: fix it there (the test suite loads every shipped data file; "
    "`lora-convert schemas check` checks the schemas and presets)."
)


# ------------------------------------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class Scalar:
    """A JSON scalar of one of `types` (a boolean is never a number); `non_empty` refuses "" for strings."""

    types: tuple[type, ...]
    what: str
    non_empty: bool = False

    def check(self, value: Any, file: str, where: str) -> None:
        ok = isinstance(value, self.types) and (bool in self.types or not isinstance(value, bool))
        if not ok or (self.non_empty and value == ""):
            raise fail(file, where, f"expected {self.what}, got {_shown(value)}")


@dataclass(frozen=True)
class Choice:
    """A string out of a fixed list."""

    values: tuple[str, ...]

    def check(self, value: Any, file: str, where: str) -> None:
        if not isinstance(value, str) or value not in self.values:
            raise fail(file, where, f"expected one of {', '.join(self.values)}, got {_shown(value)}")


@dataclass(frozen=True)
class Nullable:
    """`spec`, or null."""

    spec: Any

    def check(self, value: Any, file: str, where: str) -> None:
        if value is not None:
            self.spec.check(value, file, where)


@dataclass(frozen=True)
class ListOf:
    """A JSON array of `item`s; `non_empty` refuses [], `unique` refuses an item listed twice."""

    item: Any
    non_empty: bool = False
    unique: bool = False

    def check(self, value: Any, file: str, where: str) -> None:
        what = "a non-empty list" if self.non_empty else "a list"
        if not isinstance(value, list) or (self.non_empty and not value):
            raise fail(file, where, f"expected {what}, got {_shown(value)}")
        for i, item in enumerate(value):
            self.item.check(item, file, f"{where}[{i}]")
        if self.unique:
            seen = [json_key(v) for v in value]
            twice = next((v for i, v in enumerate(value) if seen[i] in seen[:i]), None)
            if twice is not None:
                raise fail(file, where, f"expected no item listed twice, got {_shown(twice)} twice")


@dataclass(frozen=True)
class MapOf:
    """A JSON object whose keys are names of the file's own choosing, each mapped to a `value`."""

    value: Any
    non_empty: bool = False

    def check(self, value: Any, file: str, where: str) -> None:
        what = "a non-empty object" if self.non_empty else "an object"
        if not isinstance(value, dict) or (self.non_empty and not value):
            raise fail(file, where, f"expected {what}, got {_shown(value)}")
        for key, item in value.items():
            self.value.check(item, file, _child(where, key))


@dataclass(frozen=True)
class Object:
    """A JSON object with declared keys. `label`: a key whose string value is shown after the object's path in
    messages (`groups[0] (self_attn.qkv_proj)`), to find it in a long list."""

    required: Mapping[str, Any] = field(default_factory=dict)
    optional: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None

    def check(self, value: Any, file: str, where: str) -> None:
        if not isinstance(value, dict):
            raise fail(file, where, f"expected an object, got {_shown(value)}")
        if self.label and isinstance(value.get(self.label), str):
            where = f"{where} ({value[self.label]})"
        allowed = {**self.required, **self.optional, NOTE_KEY: TEXT}
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise fail(file, where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
        missing = sorted(set(self.required) - set(value))
        if missing:
            raise fail(file, where, f"missing required key {missing[0]!r}")
        for key, item in value.items():
            allowed[key].check(item, file, _child(where, key))


class _Any:
    def check(self, value: Any, file: str, where: str) -> None:
        """Any JSON value: the key is declared, its content belongs to someone else (a base config's values)."""


ANY = _Any()
TEXT = Scalar((str,), "a string")
STRING = Scalar((str,), "a non-empty string", non_empty=True)
BOOL = Scalar((bool,), "true or false")
EXPRESSION = Scalar((str, int), "an expression (string or integer)")


# ------------------------------------------------------------------------------------------------ loading
def fail(file: str, where: str, problem: str) -> SchemaError:
    """The one error of a shipped data file: `<file>: <where>: <problem>`."""
    return SchemaError(f"{file}: {where}: {problem}", hint=HINT)


def check(document: Any, spec: Any, file: str) -> Any:
    """`document` itself once it fits `spec`; otherwise a SchemaError naming `file` and the offending value."""
    spec.check(document, file, "top level")
    return document


def shipped_files(package: str, suffix: str = ".json") -> dict[str, Any]:
    """File name -> resource of every file of `package` whose name ends with `suffix`."""
    return {entry.name: entry for entry in resources.files(package).iterdir() if entry.name.endswith(suffix)}


def read_shipped(package: str, name: str, file: str) -> Any:
    """The decoded JSON document `name` of `package`; `file` names it in messages (`schemas/llama.json`)."""
    return read_resource(resources.files(package).joinpath(name), file)


def read_resource(resource: Any, file: str) -> Any:
    """The decoded JSON document of `resource` (an importlib.resources Traversable, or a Path)."""
    try:
        data = resource.read_bytes()
    except OSError as exc:
        raise SchemaError(f"{file} cannot be read ({exc.strerror or exc}).", hint=HINT) from None
    return parse_json(data, file, SchemaError, hint=HINT)


def load_shipped(package: str, name: str, spec: Any, file: str) -> Any:
    """`read_shipped`, then `check` against `spec`."""
    return check(read_shipped(package, name, file), spec, file)


def json_key(value: Any) -> Any:
    """A hashable stand-in of a JSON value, to compare items of a list."""
    if isinstance(value, dict):
        return tuple(sorted((k, json_key(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(json_key(v) for v in value)
    return (type(value).__name__, value)


def _child(where: str, key: str) -> str:
    return key if where == "top level" else f"{where}.{key}"


def _shown(value: Any) -> str:
    """`value` as the message shows it: its JSON type and, for a scalar, the value itself."""
    if isinstance(value, (dict, list)):
        return f"{json_type_name(value)}" + (" (empty)" if not value else "")
    if value is None:
        return "null"
    text = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    return f"{json_type_name(value)} {text}"
