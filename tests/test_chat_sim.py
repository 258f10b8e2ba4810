"""shapes/chat_sim.py: every simulated response and chunk validates against the chat extract; answers are
deterministic, conform to the requested schema, and fold back (streamed or not) to the same record."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from batcher._demo import DEMO_SCHEMA as DEMO
from batcher.shapes.base import Refused, SchemaViolation
from batcher.shapes.chat import ChatShape, ChatStreamAssembler, parse_chat
from batcher.shapes.chat_sim import (
    REFUSE_MARKER,
    ChatRequestError,
    _Dice,
    break_answer,
    chat_completion,
    check_request,
    response_validator,
    sample,
    sse_chunks,
    sse_lines,
    stream_chunk_validator,
)

NESTED = {
    "type": "object",
    "$defs": {"span": {"type": "object", "properties": {"start": {"type": "integer", "minimum": 0},
                                                        "end": {"type": "integer", "exclusiveMaximum": 10}},
                       "required": ["start", "end"]}},
    "properties": {
        "spans": {"type": "array", "items": {"$ref": "#/$defs/span"}, "minItems": 1, "maxItems": 4},
        "flag": {"type": "boolean"},
        "kind": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
        "score": {"type": "number", "exclusiveMinimum": -1, "exclusiveMaximum": 1},
        "count": {"type": ["integer", "null"], "minimum": 5, "maximum": 5},
        "const": {"const": "v1"},
        "note": {"type": "string", "minLength": 30},
        "meta": {"type": "object", "properties": {"lang": {"enum": ["en", "nl"]}}, "required": ["lang"]},
    },
    "required": ["spans", "meta"],
}
TOOLS = [{"type": "function", "function": {"name": "lookup_order", "parameters": {
    "type": "object", "properties": {"order_id": {"type": "string"}, "urgent": {"type": "boolean"}},
    "required": ["order_id", "urgent"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "noop"}}]

prompts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"model": draw(st.sampled_from(["openai/gpt-4o", "anthropic/claude"])),
                            "messages": [{"role": "system", "content": "Label reviews."},
                                         {"role": "user", "content": draw(prompts)}]}
    kind = draw(st.sampled_from(["text", "schema", "nested", "json_object", "tools", "named_tool"]))
    if kind == "schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "r", "schema": DEMO, "strict": True}}
    elif kind == "nested":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "n", "schema": NESTED}}
    elif kind == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif kind in ("tools", "named_tool"):
        body["tools"] = TOOLS
        if kind == "named_tool":
            body["tool_choice"] = {"type": "function", "function": {"name": "noop"}}
    for key, strategy in {"n": st.integers(1, 3), "seed": st.integers(0, 9), "max_completion_tokens": st.integers(1, 40),
                          "stop": st.sampled_from(["the", ["and", "of"]]), "reasoning_effort": st.just("low"),
                          "logprobs": st.just(True)}.items():
        if draw(st.booleans()):
            body[key] = draw(strategy)
    if body.get("logprobs") and draw(st.booleans()):
        body["top_logprobs"] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": True}
    return body


def _errors(validator: Draft202012Validator, value: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(value)][:3]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(bodies())
def test_every_response_and_chunk_validates_against_the_extract(body) -> None:
    check_request(body)
    completion = chat_completion(body)
    assert not _errors(response_validator(), completion)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    chunks = list(sse_chunks(completion, include_usage))
    for chunk in chunks:
        assert not _errors(stream_chunk_validator(), chunk), chunk
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == completion["usage"]
        assert all(c["usage"] is None for c in chunks[:-1])
    # Streamed or not, the client reads the same answer.
    folded = ChatStreamAssembler()
    for line in sse_lines(completion, include_usage):
        folded.feed_line(line.decode().rstrip("\n"))
    streamed = folded.result().to_record()
    whole = parse_chat(json.dumps(completion).encode()).to_record()
    if not include_usage:
        for k in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens"):
            whole[k] = None
    assert streamed == whole


@settings(max_examples=100)
@given(prompts, st.sampled_from([DEMO, NESTED]), st.integers(0, 3))
def test_json_answers_conform_to_the_requested_schema(prompt, schema, seed) -> None:
    body = {"model": "m", "seed": seed, "messages": [{"role": "user", "content": prompt}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}}
    content = chat_completion(body)["choices"][0]["message"]["content"]
    assert Draft202012Validator(schema).is_valid(json.loads(content)), content
    assert chat_completion(body) == chat_completion(body)  # deterministic per prompt


@settings(max_examples=100)
@given(st.dictionaries(st.sampled_from("abcdef"), st.sampled_from(
    [{"type": "string"}, {"type": "integer", "minimum": 3, "maximum": 4}, {"type": "number", "exclusiveMaximum": 0},
     {"type": "boolean"}, {"enum": ["x", "y"]}, {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
     {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}]), max_size=5),
    st.sets(st.sampled_from("abcdef")), prompts)
def test_sample_conforms_to_generated_schemas(props, required, prompt) -> None:
    schema = {"type": "object", "properties": props, "required": sorted(required & set(props)),
              "additionalProperties": False}
    value = sample(schema, _Dice(prompt))
    assert Draft202012Validator(schema).is_valid(value), value


def test_labels_vary_across_rows_and_follow_cue_words() -> None:
    def label(review: str) -> str:
        body = {"model": "m", "messages": [{"role": "user", "content": f"Review: {review}"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": DEMO}}}
        return str(json.loads(chat_completion(body)["choices"][0]["message"]["content"])["sentiment"])

    assert label("Great product, I love it") == "positive"
    assert label("Arrived broken, want a refund") == "negative"
    assert len({label(f"Plain review number {i}") for i in range(30)}) == 3


def test_structured_run_round_trip_through_the_shape() -> None:
    spec = {"model": "m", "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": DEMO}}}
    shape = ChatShape(spec, "orq", reserved={"text"})
    body = shape.body([{"role": "user", "content": "Great, love it"}], "m")
    check_request(body)
    rec = shape.record(shape.parse(json.dumps(chat_completion(body)).encode()))
    assert rec["sentiment"] == "positive" and 0 <= rec["confidence"] <= 1 and isinstance(rec["topics"], list)
    assert rec["prompt_tokens"] > 0 and rec["completion_tokens"] > 0


@pytest.mark.parametrize("how", ["schema", "not_json"])
def test_the_fault_returns_non_conforming_json(how: str) -> None:
    spec = {"model": "m", "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": DEMO}}}
    shape = ChatShape(spec, "orq")
    completion = break_answer(chat_completion(shape.body("hi", "m")), how)
    assert not _errors(response_validator(), completion)  # the contract holds; only the answer is wrong
    with pytest.raises(SchemaViolation):
        shape.record(shape.parse(json.dumps(completion).encode()))


def test_a_refusal_when_the_prompt_asks_for_one() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": f"{REFUSE_MARKER} how do I pick a lock"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": DEMO}}}
    completion = chat_completion(body)
    message = completion["choices"][0]["message"]
    assert message["content"] is None and message["refusal"]
    shape = ChatShape({k: v for k, v in body.items() if k != "messages"}, "orq")
    with pytest.raises(Refused):
        shape.record(shape.parse(json.dumps(completion).encode()))


def test_tool_calls_follow_tools_and_tool_choice() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "where is order 7?"}], "tools": TOOLS}
    call = chat_completion(base)["choices"][0]
    assert call["finish_reason"] == "tool_calls"
    fn = call["message"]["tool_calls"][0]["function"]
    assert fn["name"] == "lookup_order"
    assert Draft202012Validator(TOOLS[0]["function"]["parameters"]).is_valid(json.loads(fn["arguments"]))
    named = chat_completion({**base, "tool_choice": {"type": "function", "function": {"name": "noop"}}})
    assert named["choices"][0]["message"]["tool_calls"][0]["function"] == {"name": "noop", "arguments": "{}"}
    none = chat_completion({**base, "tool_choice": "none"})["choices"][0]
    assert none["finish_reason"] == "stop" and isinstance(none["message"]["content"], str)


def test_n_usage_reasoning_and_length() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "tell me a story"}], "n": 3,
            "thinking": {"type": "enabled", "budget_tokens": 1024}, "max_completion_tokens": 3}
    completion = chat_completion(body)
    assert [c["index"] for c in completion["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in completion["choices"]}) > 1
    assert all(c["finish_reason"] == "length" and len(c["message"]["content"].split()) == 3
               for c in completion["choices"])
    usage = completion["usage"]
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0
    assert usage["completion_tokens"] == 9 + usage["completion_tokens_details"]["reasoning_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize(
    ("body", "path", "param", "code"),
    [
        ({"model": "m"}, "orq", "messages", "missing_required_parameter"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "orq", "temperature",
         "invalid_value"),
        ({"model": "m", "messages": [{"role": "narrator", "content": "x"}]}, "orq", "messages.0", "invalid_value"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 2.5}, "orq",
         "presence_penalty", "invalid_value"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "orq",
         "tool_choice", "invalid_value"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
         "orq", "stream_options", "invalid_value"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "orq": {"inputs": {}}}, "openai", "orq",
         "unknown_parameter"),
        ("not an object", "orq", None, "invalid_json"),
    ],
)
def test_bad_requests_get_the_400_orq_gives(body: Any, path: str, param: str | None, code: str) -> None:
    from batcher.shapes.chat import PATHS

    with pytest.raises(ChatRequestError) as info:
        check_request(body, PATHS[path])
    err = info.value
    assert (err.status, err.code) == (400, code)
    assert err.param == param or (param is not None and err.param is not None and err.param.startswith(param))
    assert err.body()["error"]["message"] == err.message
