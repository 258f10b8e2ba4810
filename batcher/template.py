"""`{{column}}` prompt templates, compiled once and rendered per row.

A value that is not a string is rendered by `templating.to_text` (the one copy of that rule): the JSONL output's
mapping with a top-level string unquoted (`true`, `{"a": 0}`, `[1, 2]`, `0.5`, `2024-02-29`, `PT1.5S`,
`1234.500`, base64 for bytes); a null, NaN or infinite value raises `MissingVariable` naming the column.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .templating import MissingVariable, NotRenderable, to_text

__all__ = ["MissingVariable", "Template"]

_VAR = re.compile(r"\{\{\s*([^{}\s]+)\s*\}\}")


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
            if isinstance(value, str):
                out.append(value)
            else:
                try:
                    out.append(to_text(value))
                except NotRenderable as exc:
                    raise MissingVariable(name, str(exc)) from None
            out.append(literal)
        return "".join(out)
