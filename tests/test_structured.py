"""structured.py: schema -> typed columns, answer -> values or SchemaViolation; _fastcheck agrees with jsonschema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from batcher._demo import DEMO_SCHEMA as DEMO
from batcher._fastcheck import compile_check
from batcher.shapes.base import ContractError
from batcher.structured import SchemaViolation, StructuredOutput, load_schema


def test_columns_are_typed_from_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "label": {"enum": ["a", "b"]},
            "name": {"type": ["string", "null"]},
            "count": {"type": "integer"},
            "score": {"type": "number"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "ids": {"type": "array", "items": {"type": "integer"}},
            "nested": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            "levels": {"enum": [1, 2, 3]},  # an enum of integers: int64 (fix4)
        },
    }
    out = StructuredOutput(schema)
    assert out.columns == {
        "label": pa.string(), "name": pa.string(), "count": pa.int64(), "score": pa.float64(), "ok": pa.bool_(),
        "tags": pa.list_(pa.string()), "ids": pa.list_(pa.int64()), "nested": pa.string(), "either": pa.string(),
        "matrix": pa.string(), "levels": pa.int64(),
    }


def test_names_batcher_uses_get_the_answer_prefix() -> None:
    schema = {"type": "object", "properties": {"text": {"type": "string"}, "answer_text": {"type": "string"},
                                               "topic": {"type": "string"}}}
    out = StructuredOutput(schema, reserved={"text", "model", "id"})
    assert list(out.columns) == ["answer_text", "answer_answer_text", "topic"]
    assert out.parse('{"text": "a", "answer_text": "b"}') == {"answer_text": "a", "answer_answer_text": "b",
                                                               "topic": None}


def test_parse_gives_typed_values_and_nulls_for_absent_properties() -> None:
    schema = {"type": "object", "properties": {
        "score": {"type": "number"}, "tags": {"type": "array", "items": {"type": "number"}},
        "meta": {"type": "object"}, "n": {"type": "integer"}}}
    out = StructuredOutput(schema)
    values = out.parse('{"score": 1, "tags": [1, 2.5], "meta": {"a": [1]}}')
    assert values == {"score": 1.0, "tags": [1.0, 2.5], "meta": '{"a":[1]}', "n": None}
    assert isinstance(values["score"], float) and all(isinstance(x, float) for x in values["tags"])
    # The values fit the columns' Arrow types.
    table = pa.Table.from_pylist([values], schema=pa.schema(list(out.columns.items())))
    assert table.column("tags").to_pylist() == [[1.0, 2.5]]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("Sure! {sentiment: positive}", "not JSON"),
        ('{"sentiment": "happy", "confidence": 0.5, "topics": []}', "at sentiment: 'happy' is not one of"),
        ('{"sentiment": "positive", "confidence": 1.5, "topics": []}', "at confidence: 1.5 is greater than"),
        ('{"sentiment": "positive", "topics": []}', "'confidence' is a required property"),
        ('{"sentiment": "positive", "confidence": 0.5, "topics": [1]}', "at topics/0: 1 is not of type 'string'"),
        ('{"sentiment": "positive", "confidence": 0.5, "topics": [], "x": 1}', "Additional properties"),
        ('["positive"]', "is not of type 'object'"),
    ],
)
def test_violations_carry_the_validators_message(answer: str, message: str) -> None:
    with pytest.raises(SchemaViolation, match=message) as info:
        StructuredOutput(DEMO).parse(answer)
    assert isinstance(info.value, ContractError)  # a contract failure: asked again once by the attempt loop
    assert info.value.kind == "schema"


def test_no_content_is_a_violation() -> None:
    with pytest.raises(SchemaViolation, match="no content"):
        StructuredOutput(DEMO).parse(None)


def test_from_response_format_inline_and_from_a_file(tmp_path: Path) -> None:
    assert StructuredOutput.from_response_format({"type": "json_object"}) is None
    assert StructuredOutput.from_response_format(None) is None
    rf = {"type": "json_schema", "json_schema": {"name": "review", "schema": DEMO, "strict": True}}
    inline = StructuredOutput.from_response_format(rf)
    assert inline is not None and inline.name == "review"
    (tmp_path / "review.json").write_text(json.dumps(DEMO))
    rf_file = {"type": "json_schema", "json_schema": {"name": "review", "schema": "review.json"}}
    from_file = StructuredOutput.from_response_format(rf_file, base_dir=tmp_path)
    assert from_file is not None and from_file.columns == inline.columns


def test_load_schema_errors_name_the_file_or_the_place(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read the schema file .*missing\.json"):
        load_schema("missing.json", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json' is not JSON"):
        load_schema(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not a valid JSON schema at properties/x/type"):
        load_schema({"type": "object", "properties": {"x": {"type": "strnig"}}})


def test_demo_schema_takes_the_fast_check() -> None:
    assert compile_check(DEMO) is not None
    assert compile_check({"type": "object", "uniqueItems": True}) is None  # outside the subset: jsonschema alone


# --- _fastcheck agrees with jsonschema -------------------------------------------------------------------------

scalar_schemas = st.one_of(
    st.builds(lambda t: {"type": t}, st.sampled_from(["string", "integer", "number", "boolean", "null"])),
    st.builds(lambda e: {"enum": e}, st.lists(st.one_of(st.text(max_size=3), st.booleans(), st.none()),
                                              min_size=1, max_size=4)),
    st.builds(lambda lo, hi: {"type": "number", "minimum": lo, "maximum": hi}, st.integers(-5, 5), st.integers(-5, 5)),
    st.builds(lambda lo: {"type": "integer", "exclusiveMinimum": lo}, st.integers(-5, 5)),
    st.builds(lambda lo, hi: {"type": "string", "minLength": lo, "maxLength": hi},
              st.integers(0, 3), st.integers(0, 5)),
    st.just({"type": "string", "pattern": "^[a-c]+$"}),
    st.just({"type": ["string", "null"]}),
)
schemas = st.recursive(
    scalar_schemas,
    lambda inner: st.one_of(
        st.builds(lambda items, lo: {"type": "array", "items": items, "minItems": lo}, inner, st.integers(0, 2)),
        st.builds(
            lambda props, req, extra: {"type": "object", "properties": props,
                                       "required": [k for k in props if k in req], "additionalProperties": extra},
            st.dictionaries(st.sampled_from("abcd"), inner, max_size=3), st.sets(st.sampled_from("abcd")),
            st.booleans(),
        ),
        st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner),
    ),
    max_leaves=6,
)
instances = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-6, 6), st.floats(-6, 6, allow_nan=False),
              st.sampled_from([1.0, 0.0, -2.0]), st.text(alphabet="abcxyz", max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from("abcde"), inner, max_size=4)),
    max_leaves=8,
)


@settings(max_examples=400)
@given(schemas, st.lists(instances, min_size=1, max_size=5))
def test_fastcheck_agrees_with_jsonschema(schema, values) -> None:
    check = compile_check(schema)
    assert check is not None
    validator = Draft202012Validator(schema)
    for value in values:
        assert check(value) == validator.is_valid(value), (schema, value)


def test_fastcheck_handles_refs_and_recursion() -> None:
    schema = {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array",
                                                                           "items": {"$ref": "#/$defs/node"}}},
                                 "required": ["kids"]}},
              "$ref": "#/$defs/node"}
    check = compile_check(schema)
    assert check is not None
    validator = Draft202012Validator(schema)
    for value in ({"kids": []}, {"kids": [{"kids": []}]}, {"kids": [{}]}, {}, []):
        assert check(value) == validator.is_valid(value)


@pytest.mark.parametrize(("prop", "answer", "arrow", "value"), [
    ({"type": "integer", "enum": [1, 2, 3]}, 2, pa.int64(), 2),
    ({"enum": [1, 2, 3]}, 2, pa.int64(), 2),
    ({"enum": [1, 2.5, 3]}, 2.5, pa.float64(), 2.5),
    ({"enum": [1, 2.5, 3]}, 1, pa.float64(), 1.0),
    ({"enum": [True, False]}, False, pa.bool_(), False),
    ({"enum": ["a", "b", None]}, "b", pa.string(), "b"),
    ({"enum": [1, "a"]}, "a", pa.string(), '"a"'),  # mixed: JSON text
    ({"const": 7}, 7, pa.int64(), 7),
    ({"type": "number", "enum": [1, 2]}, 2, pa.float64(), 2.0),  # type wins
])
def test_an_enum_takes_the_type_of_its_values(prop: dict[str, Any], answer: Any, arrow: pa.DataType,
                                              value: Any) -> None:
    out = StructuredOutput({"type": "object", "properties": {"x": prop}})
    assert out.columns["x"] == arrow
    got = out.parse(json.dumps({"x": answer}))["x"]
    assert got == value and type(got) is type(value)
    pa.table({"x": pa.array([got], type=arrow)})  # it fits its column
