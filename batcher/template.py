"""`{{column}}` prompt templates, compiled once and rendered per row."""

from __future__ import annotations

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
            out.append(value if isinstance(value, str) else str(value))
            out.append(literal)
        return "".join(out)
