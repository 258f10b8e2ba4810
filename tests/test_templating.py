"""templating.py: Jinja2 templates that keep `{{var}}` working, with loops, branches, JSON values and clear errors."""

from __future__ import annotations

import datetime as dt
import json
import re
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.templating import MissingVariable, Template, TemplateError

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: n not in {"true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is", "if"}
)
# No "\r": Jinja normalises a template's own line ends to "\n" (documented in templating.py).
literal = st.text(alphabet=st.characters(blacklist_characters="{}%#\r", blacklist_categories=("Cs",)), max_size=20)
json_scalars = st.one_of(st.text(max_size=10), st.integers(-10**6, 10**6), st.booleans(),
                         st.floats(allow_nan=False, allow_infinity=False))
values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                              st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)
JINJA = "{% if true %}{% endif %}"  # a no-op tag: forces the Jinja path for the same output


def _legacy_render(source: str, row: dict[str, str]) -> str:
    """What batcher's `{{var}}` templates (before Jinja) rendered for string values: each hole replaced."""
    return re.sub(r"\{\{\s*([^{}\s]+)\s*\}\}", lambda m: row[m.group(1)], source)


def _expected(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@given(st.lists(st.tuples(literal, names), max_size=5), literal, st.data())
def test_fast_path_and_jinja_render_the_same(parts, tail, data) -> None:
    source = "".join(f"{lit}{{{{{name}}}}}" for lit, name in parts) + tail
    row = {name: data.draw(values) for _, name in parts}
    fast, jinja = Template(source), Template(source + JINJA)
    assert fast.is_plain and not jinja.is_plain
    expected = "".join(f"{lit}{_expected(row[name])}" for lit, name in parts) + tail
    assert fast.render(row) == jinja.render(row) == expected
    assert fast.variables == [name for _, name in parts]
    assert set(jinja.variables) == {name for _, name in parts}


@given(st.lists(st.tuples(literal, names), max_size=4), literal, st.data())
def test_string_rows_render_as_the_legacy_template_did(parts, tail, data) -> None:
    source = "".join(f"{lit}{{{{ {name} }}}}" for lit, name in parts) + tail
    row = {name: data.draw(st.text(max_size=10)) for _, name in parts}
    assert Template(source).render(row) == _legacy_render(source, row)


@pytest.mark.parametrize("suffix", ["", JINJA])
@given(name=names, lit=literal)
def test_missing_and_null_variables_are_named(suffix, name, lit) -> None:
    t = Template(f"{lit}{{{{ {name} }}}}{suffix}")
    with pytest.raises(MissingVariable, match=f"{{{{{name}}}}} is not a column"):
        t.render({})
    with pytest.raises(MissingVariable, match=f"{{{{{name}}}}} is null"):
        t.render({name: None})
    with pytest.raises(KeyError):  # a KeyError, as the earlier templates raised
        t.render({})


def test_non_strings_render_as_json_not_python() -> None:
    t = Template("{{flag}} {{obj}} {{items}} {{none_inside}}")
    row = {"flag": True, "obj": {"a": 0}, "items": [1, 2], "none_inside": {"x": None}}
    assert t.render(row) == 'true {"a": 0} [1, 2] {"x": null}'


@pytest.mark.parametrize("suffix", ["", JINJA])
def test_dates_render_in_iso_8601_as_template_py_does(suffix: str) -> None:
    row = {"d": dt.date(2026, 11, 23), "t": dt.datetime(2026, 11, 23, 9, 55, tzinfo=dt.UTC),
           "many": [dt.date(2026, 1, 2)], "price": Decimal("1.50")}
    out = Template("{{d}} {{t}} {{many}} {{price}}" + suffix).render(row)
    # UTC as Z and a decimal's exact digits unquoted, as JSONL output writes them (to_text's one mapping)
    assert out == '2026-11-23 2026-11-23T09:55:00Z ["2026-01-02"] 1.50'


def test_few_shot_loop_and_branches() -> None:
    t = Template(
        "Label the review.\n{% for ex in examples %}Review: {{ex.text}}\nLabel: {{ex.label}}\n{% endfor %}"
        "{% if stars >= 4 %}(likely positive)\n{% endif %}Review: {{text}}\nLabel:"
    )
    assert t.variables == ["examples", "stars", "text"]
    row = {"examples": [{"text": "awful", "label": "negative"}, {"text": "ok", "label": "neutral"}],
           "stars": 5, "text": "great"}
    assert t.render(row) == (
        "Label the review.\nReview: awful\nLabel: negative\nReview: ok\nLabel: neutral\n"
        "(likely positive)\nReview: great\nLabel:"
    )
    assert "likely" not in t.render({**row, "stars": 2, "examples": []})


def test_a_null_column_is_false_in_a_branch_but_an_error_when_printed() -> None:
    t = Template("{% if notes %}Notes: {{notes}}{% else %}no notes{% endif %}")
    assert t.render({"notes": None}) == "no notes"
    with pytest.raises(MissingVariable, match="notes"):
        Template("{{notes}}{% if true %}{% endif %}").render({"notes": None})
    with pytest.raises(MissingVariable, match="examples"):
        Template("{% for e in examples %}{{e}}{% endfor %}").render({"examples": None})


def test_trailing_newline_and_no_html_escaping() -> None:
    assert Template("{{a}}\n{% if true %}{% endif %}\n").render({"a": "<b>&"}) == "<b>&\n\n"


def test_syntax_error_names_the_template() -> None:
    with pytest.raises(TemplateError, match=r"template messages\[1\]\.content: line 1: .*endif"):
        Template("{% if x %}open", name="messages[1].content")


def test_render_errors_name_the_template_and_the_sandbox_holds() -> None:
    with pytest.raises(TemplateError, match=r"template prompt: .*has no attribute 'missing'"):
        Template("{{ex.missing}}").render({"ex": {"text": "a"}})
    with pytest.raises(TemplateError, match="sandboxed"):
        Template("{{ ex.__class__.__mro__ }}").render({"ex": {}})
    with pytest.raises(TemplateError):
        Template("{{ items.append(1) }}").render({"items": []})  # immutable sandbox: no mutation of row values


def test_globals_are_not_columns() -> None:
    t = Template("{% for i in range(n) %}{{i}}{% endfor %}")
    assert t.variables == ["n"]
    assert t.render({"n": 3}) == "012"


def test_jinja_normalises_carriage_returns_in_the_template_text_only() -> None:
    assert Template("a\r\nb{{x}}").render({"x": "\r"}) == "a\r\nb\r"  # the fast path keeps the text as is
    assert Template("a\r\nb{{x}}" + JINJA).render({"x": "\r"}) == "a\nb\r"


def test_a_dashed_column_still_works_in_a_plain_template() -> None:
    t = Template("Review: {{review-text}}")
    assert t.is_plain and t.variables == ["review-text"]
    assert t.render({"review-text": "ok"}) == "Review: ok"


def test_values_are_not_re_expanded() -> None:
    assert Template("{{a}}").render({"a": "{{b}}"}) == "{{b}}"
    assert Template("{{a}}" + JINJA).render({"a": "{% if %}"}) == "{% if %}"


# --- templates cannot make unbounded values (fix4) ------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "{{ text * 10**9 }}", "{{ 'ab' * 10**9 }}", "{{ [text] * 10**9 }}", "{{ (999999999999999999|int) ** 99999 }}",
    "{{ text|center(10**9) }}", "{{ text.center(10**9) }}", "{{ text|indent(10**9) }}", "{{ '%0999999999d' % 1 }}",
    "{{ '{:999999999}'.format(1) }}", "{{ range(100000)|join(text * 1000) }}", "{{ text.replace('', 'x' * 100000) }}",
    "{% for i in range(100000) %}{{ text * 1000 }}{% endfor %}", "{{ range(10**9)|list }}",
])
def test_a_template_that_would_make_a_huge_value_is_an_error_naming_it_at_once(source: str) -> None:
    import time

    started = time.perf_counter()
    t = Template(source, "input.prompt")  # compiling never evaluates the constant (validate)
    with pytest.raises(TemplateError, match=r"template input\.prompt"):
        t.render({"text": "hello world " * 10})
    assert time.perf_counter() - started < 2


def test_ordinary_uses_of_the_bounded_operators_still_work() -> None:
    t = Template("{{ text * 2 }} {{ 2**10 }} {{ [1,2]|join(',') }} {{ 'a-%s' % 'b' }} {{ '{}!'.format(text) }} "
                 "{{ text|center(7) }} {{ text.replace('a', 'b') }}")
    assert t.render({"text": "ab"}) == "abab 1024 1,2 a-b ab!    ab   bb"


def test_a_nested_null_printed_is_an_error_naming_the_expression_never_the_text_null() -> None:
    t = Template("{% for ex in examples %}{{ex.q}}->{{ex.a}}; {% endfor %}{{ d['k'] }}")
    assert t.render({"examples": [{"q": "a", "a": "b"}], "d": {"k": 1}}) == "a->b; 1"
    with pytest.raises(MissingVariable, match=r"\{\{ex\.a\}\} is null"):
        t.render({"examples": [{"q": "a", "a": None}], "d": {"k": 1}})
    with pytest.raises(MissingVariable, match=r"\{\{d\['k'\]\}\} is null"):
        t.render({"examples": [], "d": {"k": None}})
    with pytest.raises(TemplateError, match=r"template prompt: .*printed on line 1 is null"):
        Template("{{ (d.values()|list)[0] }}").render({"d": {"k": None}})
    # a null is still false in a test, and JSON inside a printed list or object
    assert Template("{% if ex.a %}x{% else %}none{% endif %} {{ ex }}").render({"ex": {"a": None}}) == \
        'none {"a": null}'
