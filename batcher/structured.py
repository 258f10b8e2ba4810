"""Structured outputs: a response_format json_schema turned into typed output columns, and answers into values.

    out = StructuredOutput.from_response_format(spec_response_format, reserved={"text", "model", "id"})
    out.columns        # {'sentiment': string, 'confidence': double, 'topics': list<string>}
    out.parse('{"sentiment": "positive", "confidence": 0.9, "topics": ["price"]}')
    # {'sentiment': 'positive', 'confidence': 0.9, 'topics': ['price']}

Every top-level property of the schema becomes one column, typed from the schema: string -> string, an enum
(or const) by its values (strings -> string, integers -> int64, numbers -> float64, bools -> bool, mixed -> JSON
text; `type` wins when given), integer -> int64, number -> float64, boolean -> bool, an array of scalars -> a list of that type, anything else
-> a JSON string. A property whose name batcher already uses gets the prefix `answer_`. `parse` raises
SchemaViolation, carrying the validator's message, for an answer that is not JSON or breaks the schema.

Validation is jsonschema's (`validator_for(schema)(schema)`, compiled once per job), but that costs ~30 µs a row
for the demo schema, over the 20 µs target; so a valid answer is recognised by `_fastcheck` (~2 µs, the subset
of JSON Schema that structured outputs use, agreeing with jsonschema) and jsonschema only words the message of an
invalid one. fastjsonschema (~1.5 µs) was measured too: it supports drafts 4-7, not 2020-12, and would be a new
dependency for a gain of half a microsecond. Figures: benchmarks/structured.py.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from ._fastcheck import compile_check
from .errors import ContractError
from .paths import expand_path

__all__ = ["Column", "SchemaViolation", "StructuredOutput", "load_schema"]

class SchemaViolation(ContractError):
    """The answer is not JSON, or breaks the requested schema. The message is the validator's. A contract
    failure: the attempt loop asks again once, then writes an error row of kind `schema`."""

    kind = "schema"


_SCALARS: dict[str, pa.DataType] = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}


def load_schema(value: Mapping[str, Any] | str | Path, base_dir: Path | None = None) -> dict[str, Any]:
    """A schema given inline (a mapping) or as a path to a .json file (relative to `base_dir`).
    Raises ValueError naming the file or the problem."""
    if isinstance(value, Mapping):
        schema = dict(value)
    else:
        path = expand_path(value)  # `~` and `$VAR`, as every path of the spec (an unset variable: ValueError)
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read the schema file {str(path)!r}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ValueError(f"the schema file {str(path)!r} is not JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"the schema file {str(path)!r} holds a {type(schema).__name__}, not a JSON object")
    # jsonschema (and what it imports: ~0.1 s) only for jobs with a schema
    from jsonschema import validators
    from jsonschema.exceptions import SchemaError

    cls = validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ValueError(f"not a valid JSON schema at {where}: {exc.message}") from None
    return schema


def _types(schema: Mapping[str, Any]) -> list[str]:
    t = schema.get("type")
    names = [t] if isinstance(t, str) else list(t) if isinstance(t, list) else []
    return [n for n in names if n != "null"]


def _scalar_type(schema: Any) -> pa.DataType | None:
    """The Arrow type of a scalar property schema, or None when it is not one scalar type."""
    if not isinstance(schema, Mapping):
        return None
    types = _types(schema)
    if len(types) == 1 and types[0] in _SCALARS and not any(k in schema for k in ("anyOf", "oneOf", "allOf",
                                                                                 "$ref", "not")):
        return _SCALARS[types[0]]  # `type` wins when given
    if "enum" in schema or "const" in schema:
        enum = schema.get("enum") if "enum" in schema else [schema["const"]]
        values = [v for v in enum if v is not None] if isinstance(enum, list) else []
        return _values_type(values)
    if any(k in schema for k in ("anyOf", "oneOf", "allOf", "$ref", "not")):
        return None
    return None


def _values_type(values: list[Any]) -> pa.DataType | None:
    """An enum's (or const's) column type, from its values: all strings -> string, all bools -> bool, all
    integers -> int64, numbers -> float64; mixed (or none) -> None (JSON text)."""
    if not values:
        return None
    if all(isinstance(v, str) for v in values):
        return pa.string()
    if all(isinstance(v, bool) for v in values):
        return pa.bool_()
    if any(isinstance(v, bool) for v in values):
        return None
    if all(isinstance(v, int) for v in values):
        return pa.int64()
    if all(isinstance(v, int | float) for v in values):
        return pa.float64()
    return None


@dataclass(frozen=True, slots=True)
class Column:
    name: str  # the output column
    prop: str  # the schema property it holds
    type: pa.DataType
    kind: str  # "scalar", "list" or "json"


def _column(name: str, prop: str, schema: Any) -> Column:
    scalar = _scalar_type(schema)
    if scalar is not None:
        return Column(name, prop, scalar, "scalar")
    if isinstance(schema, Mapping) and _types(schema) == ["array"] and "enum" not in schema:
        item = _scalar_type(schema.get("items"))
        if item is not None:
            return Column(name, prop, pa.list_(item), "list")
    return Column(name, prop, pa.string(), "json")


class StructuredOutput:
    """The columns of one json_schema and the per-row parse into them."""

    __slots__ = ("_is_valid", "_validator", "columns", "name", "schema", "spec")

    def __init__(self, schema: Mapping[str, Any], reserved: Collection[str] = (), name: str = "answer") -> None:
        self.schema = dict(schema)
        self.name = name
        props = self.schema.get("properties")
        if not isinstance(props, Mapping):
            props = {}
        taken = set(reserved)
        spec: list[Column] = []
        for prop, sub in props.items():
            out = prop
            while out in taken:  # "answer_text", and "answer_answer_text" if the schema has that too
                out = "answer_" + out
            taken.add(out)
            spec.append(_column(out, prop, sub))
        self.spec: tuple[Column, ...] = tuple(spec)
        self.columns: dict[str, pa.DataType] = {c.name: c.type for c in spec}
        from jsonschema import validators

        self._validator = validators.validator_for(self.schema)(self.schema)
        self._is_valid = compile_check(self.schema) or self._validator.is_valid

    @classmethod
    def from_response_format(
        cls, response_format: Mapping[str, Any] | None, reserved: Collection[str] = (), base_dir: Path | None = None
    ) -> StructuredOutput | None:
        """The structured output a request's response_format asks for; None unless it is a json_schema one
        with a schema."""
        if not response_format or response_format.get("type") != "json_schema":
            return None
        js = response_format.get("json_schema") or {}
        if js.get("schema") is None:
            return None
        return cls(load_schema(js["schema"], base_dir), reserved, str(js.get("name") or "answer"))

    def parse(self, text: str | None) -> dict[str, Any]:
        """The column values of one answer (null for an absent property), or SchemaViolation."""
        if text is None:
            raise SchemaViolation("the answer has no content to parse as JSON")
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise SchemaViolation(f"the answer is not JSON ({exc}): {text[:80]!r}") from None
        # The fast yes/no first: the common case is valid; jsonschema words the message when it is not.
        if not self._is_valid(value):
            from jsonschema.exceptions import best_match

            error = best_match(self._validator.iter_errors(value))
            where = "/".join(str(p) for p in error.absolute_path) if error is not None else ""
            message = error.message if error is not None else "invalid"
            raise SchemaViolation(f"the answer breaks the schema{f' at {where}' if where else ''}: {message}")
        if not isinstance(value, dict):
            return dict.fromkeys(self.columns)
        out: dict[str, Any] = {}
        for c in self.spec:
            v = value.get(c.prop)
            if v is None:
                out[c.name] = None
            elif c.kind == "json":
                out[c.name] = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
            elif c.type == pa.float64():
                out[c.name] = float(v)  # JSON schema's number takes 1 as well as 1.0
            elif c.kind == "list" and c.type.value_type == pa.float64():
                out[c.name] = [None if x is None else float(x) for x in v]
            elif c.kind == "scalar" and c.type == pa.string() and not isinstance(v, str):
                out[c.name] = json.dumps(v, ensure_ascii=False)  # an untyped enum/const that is not a string
            else:
                out[c.name] = v
        return out
