"""Templates and spec loading: property tests where inputs vary, and the file-level error messages."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from batcher import SpecError, load_spec
from batcher.templating import MissingVariable, Template

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
literal = st.text(alphabet=st.characters(blacklist_characters="{}"), max_size=20)


@given(st.lists(st.tuples(literal, names), max_size=5), literal, st.data())
def test_render_substitutes_every_variable(parts, tail, data) -> None:
    source = "".join(f"{lit}{{{{{name}}}}}" for lit, name in parts) + tail
    values = {name: data.draw(st.one_of(st.text(max_size=10), st.integers())) for _, name in parts}
    expected = "".join(f"{lit}{values[name]}" for lit, name in parts) + tail
    t = Template(source)
    assert t.variables == [name for _, name in parts]
    assert t.render(values) == expected


@given(names, literal)
def test_missing_and_null_variables_are_named(name, lit) -> None:
    t = Template(f"{lit}{{{{ {name} }}}}")
    with pytest.raises(MissingVariable, match=name):
        t.render({})
    with pytest.raises(MissingVariable, match="null"):
        t.render({name: None})


def test_values_are_not_re_expanded() -> None:
    assert Template("{{a}}").render({"a": "{{b}}"}) == "{{b}}"


def _spec(tmp_path: Path, text: str, suffix: str = ".yaml") -> Path:
    p = tmp_path / f"job{suffix}"
    p.write_text(text)
    return p


def test_yaml_and_json_specs_load_the_same(tmp_path: Path) -> None:
    data = {"input": {"path": "in.jsonl", "prompt": "{{q}}"}, "output": {"path": "o.parquet"},
            "request": {"model": "m", "retry": {"count": 2}}}
    a = load_spec(_spec(tmp_path, yaml.safe_dump(data)))
    b = load_spec(_spec(tmp_path, json.dumps(data), ".json"))
    assert a.request == b.request and a.job_name == b.job_name == "job"


@pytest.mark.parametrize(("text", "expected"), [
    ("input: [unclosed", "not valid YAML"),
    ("- just\n- a list\n", "a job spec is a mapping"),
    ("input: {path: x.xlsx, prompt: '{{a}}'}\noutput: {path: o.parquet}\nrequest: {model: m}\n", "cannot tell the format"),
    ("input: {path: x.jsonl, prompt: '{{a}}'}\noutput: {path: o.parquet}\nrequest: {model: m}\nendpoint: {api_key_env: sk-live-123}\n",
     "NAME of an environment variable"),
    ("input: {path: x.jsonl, prompt: '{{a}}'}\noutput: {path: o.parquet}\nrequest: {model: m}\nendpoint: {api: openai}\n"
     "input2: 1\n", "input2: unknown key"),
])
def test_file_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = _spec(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the job spec"):
        load_spec(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("value", "expected"), [
    (True, "true"),
    (False, "false"),
    ({"a": 0, "b": [1, "x"]}, '{"a": 0, "b": [1, "x"]}'),
    ([1, 2.5, None, "é"], '[1, 2.5, null, "é"]'),
    (0.1, "0.1"),
    (3, "3"),
    (datetime.date(2026, 11, 23), "2026-11-23"),
    (datetime.datetime(2026, 11, 23, 9, 30, 5), "2026-11-23T09:30:05"),
    ({"when": datetime.date(2026, 1, 2)}, '{"when": "2026-01-02"}'),
])
def test_non_string_values_render_as_json(value: object, expected: str) -> None:
    assert Template("v={{v}}.").render({"v": value}) == f"v={expected}."
