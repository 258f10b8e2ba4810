"""Prompt and message templates: Jinja2, sandboxed, compiled once and rendered per row.

`{{text}}` works as it always did; a template can also loop over a list column (few-shot examples) or branch on
a value. Non-string values render by `to_text`: the JSONL output's mapping with a top-level string unquoted
(`true`, `{"a": 0}`, `[1, 2]`, `2024-02-29`, `PT1.5S`, `1234.500`, base64 for bytes), never as Python reprs. Rendering is
sandboxed (`ImmutableSandboxedEnvironment`: no attribute tricks, no mutation of row values), strict (a name
that is not a column is an error) and never HTML-escaped.

    t = Template("Label this: {{text}}{% for ex in examples %}\\n{{ex.q}} -> {{ex.a}}{% endfor %}")
    t.variables            # ['examples', 'text']: the columns the template reads
    t.render({"text": "great", "examples": [{"q": "bad", "a": "negative"}]})

One difference from the `{{var}}` templates batcher had before: Jinja turns a `\r` or `\r\n` in a template's own text into `\n` (values are
untouched). A template that is plain text with `{{name}}` holes skips Jinja: it renders by joining literals, about ten
times faster (benchmarks/templates.py), with the same output and the same errors.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, NoReturn

import jinja2
import jinja2.meta
import jinja2.nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["MissingVariable", "NotRenderable", "Template", "TemplateError", "json_safe", "to_text"]

# Plain `{{ name }}` holes and no other Jinja syntax: the fast path. A dash is part of a name here, as it was for
# template.py (`{{review-text}}` is a column); inside Jinja syntax it is a minus, so such a column cannot be used
# in a template with tags.
_HOLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_-]*)\s*\}\}")
_JINJA_SYNTAX = re.compile(r"\{\{|\{%|\{#")


class MissingVariable(KeyError):
    """A column the template reads is missing from the row, or null, or holds a value a prompt cannot show
    (NaN, ±Infinity)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(name)
        self.name = name
        self.why = why

    def __str__(self) -> str:
        return f"template variable {{{{{self.name}}}}} {self.why}"


class NotRenderable(ValueError):
    """`to_text` was given a value with no text: a NaN or an infinite number (at the top level: inside a list
    or an object it is `null`, as in JSONL output)."""


class TemplateError(ValueError):
    """The template cannot be compiled or rendered; the message names the template."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"template {name}: {message}")
        self.template = name


def _timedelta(value: dt.timedelta) -> str:
    """ISO 8601 seconds, as JSONL output writes a duration: `PT3600S`, `-PT0.000001S`."""
    micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    seconds, fraction = divmod(abs(micros), 1_000_000)
    frac = f".{fraction:06d}".rstrip("0") if fraction else ""
    return f"{'-' if micros < 0 else ''}PT{seconds}{frac}S"


def _datetime(value: dt.datetime) -> str:
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text  # UTC as Z, as JSONL output writes it


def json_safe(value: Any) -> Any:
    """`value` as plain JSON data, by the mapping JSONL output uses (README, "The output"): NaN and ±Infinity
    -> null, bytes -> base64, dates, times and timestamps -> ISO 8601, durations -> ISO 8601 seconds, decimals ->
    their exact digits as strings, tuples -> lists; at any depth. Used for `orq.inputs` and inside `to_text`."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {(k if isinstance(k, str) else to_text(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Decimal):
        return str(value) if value.is_finite() else None
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dt.datetime):
        return _datetime(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return _timedelta(value)
    return str(value)


def to_text(value: Any) -> str:
    """A row value as prompt text: the JSONL output's mapping (`json_safe`), with a top-level string unquoted.

    Strings as they are; `true`/`false`; numbers as JSON spells them (`7`, `0.5`, `1e+300`); a decimal as its
    exact digits (`1234.500`); bytes as base64; dates, times and timestamps in ISO 8601; durations as ISO 8601
    seconds (`PT3600S`); lists and objects as JSON, their values mapped the same way (quoted inside, NaN as
    `null`). A top-level NaN or ±Infinity raises `NotRenderable`: a prompt showing `NaN` or `null` for a number
    is rarely what its author meant, so the row becomes an error row, as for a null value.
    This is the one place that turns a value into prompt text."""
    if isinstance(value, str):
        return value
    if type(value) is int:
        return str(value)
    if isinstance(value, float | Decimal) and not (math.isfinite(value) if isinstance(value, float) else value.is_finite()):
        raise NotRenderable(f"is {value} in this row, a number a prompt cannot show (JSON has no spelling for it)")
    safe = json_safe(value)
    if isinstance(safe, str):
        return safe
    return json.dumps(safe, ensure_ascii=False, allow_nan=False)


def _finalize(value: Any) -> Any:
    # Every `{{ ... }}` output passes here: JSON for non-strings, so a bool is `true`, a struct `{"a": 0}`.
    return value if isinstance(value, str) else to_text(value)


class _Null(jinja2.StrictUndefined):
    """A null column: false in `{% if %}`, an error naming the column when printed or iterated."""

    __slots__ = ()

    def __bool__(self) -> bool:  # type: ignore[override]  # StrictUndefined's raises; a null is just false
        return False

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise MissingVariable(str(self._undefined_name), "is null in this row")

    # StrictUndefined binds these to the failing method at class creation, so rebind them to ours.
    __iter__ = __str__ = __len__ = __contains__ = _fail_with_undefined_error
    __getattr__ = __getitem__ = __call__ = _fail_with_undefined_error


_ENV = ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,  # "{{text}}\n" must keep its newline, as the {{ }} templates did
    finalize=_finalize,
)


class Template:
    """A prompt template, compiled once. `variables` are the row columns it reads, in first-use order."""

    __slots__ = ("_compiled", "_literals", "name", "source", "variables")

    def __init__(self, source: str, name: str = "prompt") -> None:
        self.source = source
        self.name = name
        self._compiled: jinja2.Template | None = None
        self._literals: list[str] = []
        holes = list(_HOLE.finditer(source))
        rest = _HOLE.sub("", source)
        if not _JINJA_SYNTAX.search(rest):
            pos = 0
            for m in holes:
                self._literals.append(source[pos : m.start()])
                pos = m.end()
            self._literals.append(source[pos:])
            self.variables = [m.group(1) for m in holes]
            return
        try:
            ast = _ENV.parse(source)
            self._compiled = _ENV.from_string(ast)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(name, f"line {exc.lineno}: {exc.message}") from None
        undeclared = jinja2.meta.find_undeclared_variables(ast) - set(_ENV.globals)
        # In first-use order (the AST walk is source order), as the {{ }} templates listed them.
        loads = [n.name for n in ast.find_all(jinja2.nodes.Name) if n.ctx == "load"]
        self.variables = sorted(undeclared, key=lambda v: (loads.index(v) if v in loads else len(loads), v))

    @property
    def is_plain(self) -> bool:
        """True when the template has only `{{name}}` holes (rendered without Jinja)."""
        return self._compiled is None

    def render(self, row: Mapping[str, Any]) -> str:
        if self._compiled is None:
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
        context: dict[str, Any] = {}
        for name in self.variables:
            if name not in row:
                raise MissingVariable(name, "is not a column of this row")
            value = row[name]
            context[name] = _Null(name=name) if value is None else value
        try:
            return self._compiled.render(context)
        except MissingVariable:
            raise
        except NotRenderable as exc:
            raise TemplateError(self.name, f"a value {exc}") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(self.name, exc.message or "undefined value") from None
        except SecurityError as exc:
            raise TemplateError(self.name, f"not allowed in a sandboxed template: {exc}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise TemplateError(self.name, f"{type(exc).__name__}: {exc}") from None

    def __repr__(self) -> str:
        return f"Template({self.source!r}, name={self.name!r})"
