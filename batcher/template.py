"""`{{column}}` prompt templates, compiled once and rendered per row.

A value that is not a string is written as JSON, as a model reads it best and the user most likely meant:
`true`, `{"a": 0}`, `[1, 2]`, `0.5`; dates and times in ISO 8601 (quoted inside lists and objects).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["MissingVariable", "Template"]

_VAR = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")


class MissingVariable(KeyError):
    def __init__(self, name: str, why: str) -> None:
        super().__init__(name)
        self.name = name
        self.why = why

    def __str__(self) -> str:
        return f"template variable {{{{{self.name}}}}} {self.why}"


class Template:
    """A prompt template: literal text with `{{column}}` holes (whitespace inside the braces is allowed)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._literals: list[str] = []
        self.variables: list[str] = []
        pos = 0
        for m in _VAR.finditer(source):
            self._literals.append(source[pos : m.start()])
            self.variables.append(m.group(1))
            pos = m.end()
        self._literals.append(source[pos:])

    def render(self, row: Mapping[str, Any]) -> str:
        out = [self._literals[0]]
        for name, literal in zip(self.variables, self._literals[1:], strict=True):
            if name not in row:
                raise MissingVariable(name, "is not a column of this row")
            value = row[name]
            if value is None:
                raise MissingVariable(name, "is null in this row")
            out.append(value if isinstance(value, str) else _text(value))
            out.append(literal)
        return "".join(out)


def _iso(value: Any) -> Any:
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return str(value)  # Decimal, timedelta, bytes...: their own text


def _text(value: Any) -> str:
    if type(value) is int:
        return str(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return json.dumps(value, ensure_ascii=False, default=_iso)
