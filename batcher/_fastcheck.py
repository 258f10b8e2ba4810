"""A compiled yes/no check for the JSON Schema subset that structured outputs use, agreeing with jsonschema.

jsonschema's compiled validator costs about 30 µs for the demo schema; this costs about 2. It answers only "valid
or not": structured.py asks jsonschema for the message when the answer is no (rare: one row in a hundred, and
then a second call costs far more). `compile_check` returns None for a schema using anything outside the subset,
so that schema goes to jsonschema alone; tests/test_structured.py checks the two agree on generated instances.

Subset: type (one or a list), enum and const of strings/booleans/null, properties, required,
additionalProperties (bool or schema), items (one schema), minItems, maxItems, minimum, maximum,
exclusiveMinimum, exclusiveMaximum, minLength, maxLength, pattern, anyOf, local $ref into $defs/definitions,
and the annotations (title, description, default, examples, format, $schema, $comment).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["compile_check"]

Check = Callable[[Any], bool]

_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "format", "$schema", "$comment", "$defs", "definitions",
     "deprecated", "readOnly", "writeOnly"}
)
_KNOWN = _ANNOTATIONS | {
    "type", "enum", "const", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern", "anyOf",
    "$ref",
}


class _Unsupported(Exception):
    pass


def _is_integer(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, float) and math.isfinite(v) and v.is_integer()


_TYPES: dict[str, Check] = {
    "string": lambda v: isinstance(v, str),
    "integer": _is_integer,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _one_of(strings: frozenset[str], others: list[Any]) -> Check:
    def check(v: Any) -> bool:
        # True, False and None by identity, so that 1 is not True (jsonschema's equality agrees).
        return (isinstance(v, str) and v in strings) or any(v is x for x in others)

    return check


def _bound(key: str, b: float) -> Check:
    def check(v: Any) -> bool:
        if not _is_number(v):
            return True
        if key == "minimum":
            return bool(v >= b)
        if key == "maximum":
            return bool(v <= b)
        if key == "exclusiveMinimum":
            return bool(v > b)
        return bool(v < b)

    return check


def _length(kind: type, lo: int | None, hi: int | None) -> Check:
    def check(v: Any) -> bool:
        if not isinstance(v, kind):
            return True
        n = len(v)  # type: ignore[arg-type]  # a str or a list, by the isinstance above
        return (lo is None or n >= lo) and (hi is None or n <= hi)

    return check


class _Compiler:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.refs: dict[str, Check] = {}

    def ref(self, ref: str) -> Check:
        if ref in self.refs:
            return self.refs[ref]
        parts = ref.split("/")
        if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
            raise _Unsupported(ref)
        target = (self.root.get(parts[1]) or {}).get(parts[2].replace("~1", "/").replace("~0", "~"))
        if target is None:
            raise _Unsupported(ref)
        slot: list[Check] = []
        self.refs[ref] = lambda v: slot[0](v)  # recursive schemas: the name exists before its body compiles
        slot.append(self.compile(target))
        return self.refs[ref]

    def compile(self, schema: Any) -> Check:
        if schema is True or schema == {}:
            return lambda v: True
        if schema is False:
            return lambda v: False
        if not isinstance(schema, Mapping) or not set(schema) <= _KNOWN:
            raise _Unsupported(schema)
        checks: list[Check] = []
        if "$ref" in schema:
            if len(set(schema) - _ANNOTATIONS) > 1:
                raise _Unsupported("$ref beside other keywords")
            return self.ref(schema["$ref"])
        t = schema.get("type")
        if t is not None:
            names = [t] if isinstance(t, str) else list(t)
            if not all(n in _TYPES for n in names):
                raise _Unsupported(t)
            fns = [_TYPES[n] for n in names]
            checks.append(fns[0] if len(fns) == 1 else (lambda v: any(f(v) for f in fns)))
        for key in ("enum", "const"):
            if key in schema:
                values = schema[key] if key == "enum" else [schema[key]]
                if not isinstance(values, list) or not all(v is None or isinstance(v, str | bool) for v in values):
                    raise _Unsupported(key)
                strings = frozenset(v for v in values if isinstance(v, str))
                others = [v for v in values if not isinstance(v, str)]
                checks.append(_one_of(strings, others))
        checks += self._numbers(schema) + self._strings(schema) + self._arrays(schema) + self._objects(schema)
        if "anyOf" in schema:
            branches = [self.compile(s) for s in schema["anyOf"]]
            checks.append(lambda v: any(b(v) for b in branches))
        if not checks:
            return lambda v: True
        if len(checks) == 1:
            return checks[0]
        return lambda v: all(c(v) for c in checks)

    def _numbers(self, schema: Mapping[str, Any]) -> list[Check]:
        out: list[Check] = []
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in schema:
                bound = schema[key]
                if not _is_number(bound):
                    raise _Unsupported(key)
                out.append(_bound(key, bound))
        return out

    def _strings(self, schema: Mapping[str, Any]) -> list[Check]:
        out: list[Check] = []
        if "minLength" in schema or "maxLength" in schema:
            out.append(_length(str, schema.get("minLength"), schema.get("maxLength")))
        if "pattern" in schema:
            rx = re.compile(schema["pattern"])
            out.append(lambda v: not isinstance(v, str) or rx.search(v) is not None)
        return out

    def _arrays(self, schema: Mapping[str, Any]) -> list[Check]:
        out: list[Check] = []
        if "items" in schema:
            if not isinstance(schema["items"], Mapping | bool):
                raise _Unsupported("items")
            item = self.compile(schema["items"])
            out.append(lambda v: not isinstance(v, list) or all(item(x) for x in v))
        if "minItems" in schema or "maxItems" in schema:
            out.append(_length(list, schema.get("minItems"), schema.get("maxItems")))
        return out

    def _objects(self, schema: Mapping[str, Any]) -> list[Check]:
        props = {k: self.compile(s) for k, s in (schema.get("properties") or {}).items()}
        required = tuple(schema.get("required") or ())
        extra = schema.get("additionalProperties", True)
        extra_check = None if extra is True else self.compile(extra)
        if not props and not required and extra_check is None:
            return []

        def check(v: Any) -> bool:
            if not isinstance(v, dict):
                return True
            for k in required:
                if k not in v:
                    return False
            for k, x in v.items():
                c = props.get(k)
                if c is not None:
                    if not c(x):
                        return False
                elif extra_check is not None and not extra_check(x):
                    return False
            return True

        return [check]


def compile_check(schema: Mapping[str, Any]) -> Check | None:
    """A fast validity check for `schema`, or None if it uses a keyword outside the subset."""
    try:
        return _Compiler(schema).compile(schema)
    except (_Unsupported, re.error, TypeError):
        return None
