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


# What a template may build: no string or list longer than MAX_TEMPLATE_CHARS (and no rendered text either), no
# integer wider than MAX_INT_BITS. A template that would is refused (SecurityError) before it allocates: the row
# becomes an error row naming the template. Jinja's sandbox already caps `range` at 100,000 items.
MAX_TEMPLATE_CHARS = 10_000_000
MAX_INT_BITS = 10_000
_WIDTH = re.compile(r"\d+")


def _too_big(n: int, what: str) -> NoReturn:
    raise SecurityError(f"{what} would make a value of {n:,} characters or items "
                        f"(templates are limited to {MAX_TEMPLATE_CHARS:,})")


def _check_widths(fmt: str, what: str) -> None:
    # A format string's widths and precisions ('%0999999999d', '{:999999999}') size its result.
    for m in _WIDTH.finditer(fmt):
        if len(m.group()) > 8 or int(m.group()) > MAX_TEMPLATE_CHARS:
            _too_big(int(m.group()), what)


def _check_ints(values: Any, what: str) -> None:
    for v in values:
        if isinstance(v, int) and v > MAX_TEMPLATE_CHARS:
            _too_big(v, what)


def _replaced_size(s: str, old: str, new: str, count: Any = -1) -> int:
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


def _joined_size(items: list[Any], sep: str) -> int:
    return sum(len(x) if isinstance(x, str) else 0 for x in items) + len(sep) * max(len(items) - 1, 0)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with `*`, `**` and `%` checked before they run, and the size-multiplying calls too."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_CHARS:
                    _too_big(len(seq) * n, "'*'")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0 \
                    and right * abs(left).bit_length() > MAX_INT_BITS:
                raise SecurityError(f"'**' would make an integer of about {right * abs(left).bit_length():,} "
                                    f"bits (templates are limited to {MAX_INT_BITS:,})")
        elif operator == "%" and isinstance(left, str):
            _check_widths(left, "'%'")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        receiver = getattr(target, "__self__", None)
        if isinstance(receiver, str):
            name = getattr(target, "__name__", "")
            what = f"str.{name}"
            _check_ints([*args, *kwargs.values()], what)
            if name in ("format", "format_map"):
                _check_widths(receiver, what)
            elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                size = _replaced_size(receiver, args[0], args[1], args[2] if len(args) > 2 else -1)
                if size > MAX_TEMPLATE_CHARS:
                    _too_big(size, what)
            elif name == "join" and args:
                items = list(args[0])
                if _joined_size(items, receiver) > MAX_TEMPLATE_CHARS:
                    _too_big(_joined_size(items, receiver), what)
                args = (items, *args[1:])
        return super().call(__context, __obj, *args, **kwargs)


def _bounded_filter(env: jinja2.Environment, name: str) -> None:
    """Wrap a filter so that an integer argument over the limit (a width, a count) is refused, and `join` /
    `replace` / `format` are sized first. Marked pass_context: Jinja never folds it at compile time, so
    `validate` never evaluates a filter on a constant."""
    original = env.filters[name]
    passes = jinja2.utils._PassArg.from_obj(original)

    @jinja2.pass_context
    def bounded(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        what = f"filter {name}"
        _check_ints([*args, *kwargs.values()], what)
        if name == "format" and isinstance(value, str):
            _check_widths(value, what)
        elif name == "replace" and isinstance(value, str) and len(args) >= 2:
            size = _replaced_size(value, str(args[0]), str(args[1]), args[2] if len(args) > 2 else -1)
            if size > MAX_TEMPLATE_CHARS:
                _too_big(size, what)
        elif name == "join":
            value = list(value)
            sep = args[0] if args else kwargs.get("d", "")
            size = _joined_size([to_text(v) if not isinstance(v, str) else v for v in value], str(sep))
            if size > MAX_TEMPLATE_CHARS:
                _too_big(size, what)
        if passes is jinja2.utils._PassArg.context:
            return original(context, value, *args, **kwargs)
        if passes is jinja2.utils._PassArg.eval_context:
            return original(context.eval_ctx, value, *args, **kwargs)
        if passes is jinja2.utils._PassArg.environment:
            return original(context.environment, value, *args, **kwargs)
        return original(value, *args, **kwargs)

    env.filters[name] = bounded


_ENV = _BoundedSandbox(
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    keep_trailing_newline=True,  # "{{text}}\n" must keep its newline, as the {{ }} templates did
    finalize=_finalize,
)
for _name in list(_ENV.filters):
    _bounded_filter(_ENV, _name)


def _describe(node: jinja2.nodes.Node) -> str | None:
    if isinstance(node, jinja2.nodes.Name):
        return node.name
    if isinstance(node, jinja2.nodes.Getattr):
        inner = _describe(node.node)
        return None if inner is None else f"{inner}.{node.attr}"
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const):
        inner = _describe(node.node)
        return None if inner is None else f"{inner}[{node.arg.value!r}]"
    return None


@jinja2.pass_context
def _not_null(context: Any, value: Any, what: str) -> Any:
    if value is None:
        if what.startswith("line "):
            raise ValueError(f"a value printed on {what} is null in this row")
        raise MissingVariable(what, "is null in this row")
    return value


def _null_checked(ast: jinja2.nodes.Template) -> None:
    """Every `{{ ... }}` checked for null, nested values included (`{{ex.a}}` with `a: null`): an error naming
    the expression, as a null column is, never the text `null`."""
    for output in ast.find_all(jinja2.nodes.Output):
        for i, node in enumerate(output.nodes):
            if isinstance(node, jinja2.nodes.TemplateData):
                continue
            what = _describe(node) or f"line {node.lineno}"
            output.nodes[i] = jinja2.nodes.Filter(node, "_not_null", [jinja2.nodes.Const(what)], [], None, None,
                                                  lineno=node.lineno)


_ENV.filters["_not_null"] = _not_null


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
            _null_checked(ast)
            self._compiled = _ENV.from_string(ast)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(name, f"line {exc.lineno}: {exc.message}") from None
        except (SecurityError, TypeError, ValueError, ArithmeticError, LookupError, MemoryError) as exc:
            raise TemplateError(name, f"{type(exc).__name__}: {exc}") from None
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
            pieces: list[str] = []
            size = 0
            for piece in self._compiled.generate(context):
                size += len(piece)
                if size > MAX_TEMPLATE_CHARS:
                    raise SecurityError(f"the rendered text passes {MAX_TEMPLATE_CHARS:,} characters")
                pieces.append(piece)
            return "".join(pieces)
        except MissingVariable:
            raise
        except NotRenderable as exc:
            raise TemplateError(self.name, f"a value {exc}") from None
        except jinja2.UndefinedError as exc:
            raise TemplateError(self.name, exc.message or "undefined value") from None
        except SecurityError as exc:
            raise TemplateError(self.name, f"not allowed in a sandboxed template: {exc}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError, MemoryError) as exc:
            raise TemplateError(self.name, f"{type(exc).__name__}: {exc}") from None

    def __repr__(self) -> str:
        return f"Template({self.source!r}, name={self.name!r})"
