"""shapes/chat.py: bodies, response and stream parsing, records, the cache key, and message templates."""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.shapes.base import ContractError, Refused, SchemaViolation, Shape
from batcher.shapes.chat import (
    CHAT_COLUMNS,
    ChatShape,
    ChatStreamAssembler,
    MessagesTemplate,
    chat_cache_key,
    messages_from_value,
    parse_chat,
)
from batcher.shapes.chat_spec import ChatRequestSpec
from batcher.templating import MissingVariable, TemplateError

# A response as the extract shapes it (OpenAI's documented example, plus orq's reasoning and usage details).
RESPONSE = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "The image shows a wooden boardwalk.", "refusal": None,
                    "reasoning": "Looking at the picture first."},
        "logprobs": None,
        "finish_reason": "stop",
    }],
    "usage": {
        "prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 12, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    },
    "system_fingerprint": "fp_fc9f1d7035",
}
TOOL_RESPONSE = {
    "id": "chatcmpl-abc123", "object": "chat.completion", "created": 1699896916, "model": "gpt-4o-mini",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None,
        "tool_calls": [{"id": "call_abc123", "type": "function",
                        "function": {"name": "get_current_weather", "arguments": "{\n\"location\": \"Boston, MA\"\n}"}}],
    }}],
    "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99},
}
# OpenAI's documented streamed tool call, as chunks (usage on the last one, with choices: []).
TOOL_STREAM = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\""}}]},
                  "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "location"}}]},
                  "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\":\"Paris\"}"}}]},
                  "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50,
                              "completion_tokens_details": {"reasoning_tokens": 5}}},
]
HEAD = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
SCHEMA = {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]},
                                           "text": {"type": "string"}}, "required": ["sentiment"]}


def _lines(chunks: list[dict[str, Any]], done: bool = True) -> list[str]:
    out = [f"data: {json.dumps({**HEAD, **c})}" for c in chunks]
    return [*out, ": keep-alive", "", "data: [DONE]"] if done else out


def _fold(lines: list[str]) -> Any:
    a = ChatStreamAssembler()
    for line in lines:
        a.feed_line(line)
    return a.result()


def test_chat_shape_implements_the_shape_interface() -> None:
    shape: Shape = ChatShape({"model": "m"}, "orq")
    assert shape.path() == "/v2/router/chat/completions"
    assert ChatShape({}, "openai").path() == "/v1/chat/completions"
    assert dict(shape.extra_columns) == CHAT_COLUMNS


def test_parse_reads_content_reasoning_and_usage() -> None:
    rec = parse_chat(json.dumps(RESPONSE).encode()).to_record()
    assert rec["text"] == "The image shows a wooden boardwalk."
    assert rec["finish_reason"] == "stop" and rec["refusal"] is None and rec["tool_calls"] is None
    assert rec["reasoning"] == "Looking at the picture first."
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]) == (1117, 46, 1163)
    assert (rec["cached_tokens"], rec["reasoning_tokens"]) == (1024, 12)
    assert rec["model"] == "gpt-4o-2024-08-06" and rec["completion_id"] == RESPONSE["id"]
    assert rec["choices"] is None  # one choice: text and finish_reason already say it


def test_parse_reads_tool_calls_as_a_json_string() -> None:
    rec = parse_chat(json.dumps(TOOL_RESPONSE).encode()).to_record()
    assert rec["text"] is None and rec["finish_reason"] == "tool_calls"
    calls = json.loads(rec["tool_calls"])
    assert calls == [{"id": "call_abc123", "type": "function", "function": {
        "name": "get_current_weather", "arguments": "{\n\"location\": \"Boston, MA\"\n}"}}]


def test_parse_reads_a_refusal_and_several_choices() -> None:
    data = {**RESPONSE, "choices": [
        {"index": 1, "finish_reason": "stop", "message": {"content": "b"}},
        {"index": 0, "finish_reason": "stop", "message": {"content": None, "refusal": "I can't help with that."}},
    ]}
    rec = parse_chat(json.dumps(data).encode()).to_record()
    assert rec["refusal"] == "I can't help with that." and rec["text"] is None
    assert rec["choices"] == [{"index": 0, "text": None, "finish_reason": "stop"},
                              {"index": 1, "text": "b", "finish_reason": "stop"}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>502</html>", "not JSON"),
        (b"[1]", "not a JSON object"),
        (json.dumps({**RESPONSE, "choices": []}).encode(), "no choices"),
        (json.dumps({**RESPONSE, "choices": [{"finish_reason": "stop", "text": "legacy"}]}).encode(), "no message"),
        (json.dumps({**RESPONSE, "choices": [{"finish_reason": "weird", "message": {}}]}).encode(), "weird"),
        (json.dumps({**RESPONSE, "choices": [{"finish_reason": "stop", "message": {"content": 5}}]}).encode(),
         "content is not a string"),
        (json.dumps({**RESPONSE, "usage": {"prompt_tokens": "many"}}).encode(), "not a number"),
        (json.dumps({**TOOL_RESPONSE, "choices": [{"finish_reason": "tool_calls", "message": {
            "tool_calls": [{"id": "x", "function": {"arguments": "{}"}}]}}]}).encode(), "no function name"),
    ],
)
def test_malformed_responses_are_contract_errors(body: bytes, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        parse_chat(body)


def test_stream_joins_tool_call_fragments_by_index_and_takes_usage_from_the_last_chunk() -> None:
    rec = _fold(_lines(TOOL_STREAM)).to_record()
    assert rec["finish_reason"] == "tool_calls" and rec["text"] is None
    assert json.loads(rec["tool_calls"]) == [
        {"id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["reasoning_tokens"]) == (30, 20, 5)


def test_stream_joins_content_refusal_and_reasoning_per_choice() -> None:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
         "usage": None},
        {"choices": [{"index": 0, "delta": {"reasoning": "think "}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"reasoning": "hard"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
        {"choices": [{"index": 1, "delta": {"refusal": "I can't "}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]},
        {"choices": [{"index": 1, "delta": {"refusal": "do that."}, "finish_reason": "stop"}]},
    ]
    answer = _fold(_lines(chunks))
    assert answer.text == "Hello" and answer.reasoning == "think hard" and answer.refusal is None
    assert answer.choices == [{"index": 0, "text": "Hello", "finish_reason": "stop"},
                              {"index": 1, "text": None, "finish_reason": "stop"}]
    assert answer.prompt_tokens is None  # no usage chunk: no tokens, not an error


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (_lines([{"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]}], done=False),
         r"before data: \[DONE\]"),
        (_lines([{"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}]), "no finish_reason"),
        (_lines([{"choices": []}]), "no choices"),
        (["data: {not json", "data: [DONE]"], "not JSON"),
        (_lines([{"error": {"message": "upstream died"}}]), "upstream died"),
        (_lines([{"choices": [{"index": 0, "text": "legacy chunk", "finish_reason": "stop"}]}]), "no delta"),
        (_lines([{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},
                               "finish_reason": "tool_calls"}]}]), "no function name"),
    ],
)
def test_broken_streams_are_contract_errors(lines: list[str], message: str) -> None:
    with pytest.raises(ContractError, match=message):
        _fold(lines)


def test_body_keeps_fields_as_written_and_adds_model_messages_inputs() -> None:
    spec = ChatRequestSpec.model_validate(
        {"model": "spec-model", "temperature": 0.2, "orq": {"inputs": {"team": "support"}, "thread": {"id": "t1"}}})
    shape = ChatShape(spec, "orq")
    msgs = [{"role": "user", "content": "hi"}]
    body = shape.body(msgs, "row-model", {"customer": "Ada"})
    assert body == {"model": "row-model", "temperature": 0.2, "messages": msgs, "max_completion_tokens": 256,
                    "orq": {"inputs": {"team": "support", "customer": "Ada"}, "thread": {"id": "t1"}}}
    assert shape.body("plain prompt", "m")["messages"] == [{"role": "user", "content": "plain prompt"}]
    # A batch line's own fields win, and its own max_tokens means no default is added.
    line = {"temperature": 0.9, "max_tokens": 10, "messages": msgs}
    body = shape.body(msgs, "m", None, line)
    assert body["temperature"] == 0.9 and body["max_tokens"] == 10 and "max_completion_tokens" not in body


def test_openai_bodies_carry_only_openai_fields_and_streams_ask_for_usage() -> None:
    spec = ChatRequestSpec.model_validate({"model": "m", "stream": True, "retry": {"count": 2},
                                           "cache": {"type": "exact_match"}, "max_tokens": 50})
    body = ChatShape(spec, "openai").body("hi", "m", None, {"store": True, "seed": 3})
    assert body == {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 50,
                    "seed": 3, "messages": [{"role": "user", "content": "hi"}]}
    orq = ChatShape(spec, "orq").body("hi", "m", None, {"stream_options": {"include_usage": False}})
    assert orq["stream_options"] == {"include_usage": True}  # a streamed row without usage would cost nothing


def test_record_with_a_schema_adds_typed_columns_and_refuses_refusals() -> None:
    spec = {"model": "m", "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}}
    shape = ChatShape(spec, "orq", reserved={"text", "model"})
    assert list(shape.extra_columns) == ["refusal", "tool_calls", "reasoning", "sentiment", "answer_text"]
    assert shape.extra_columns["sentiment"] == pa.string()

    def answer(message: dict[str, Any]) -> Any:
        return parse_chat(json.dumps({**RESPONSE, "choices": [{"finish_reason": "stop", "message": message}]}).encode())

    rec = shape.record(answer({"content": '{"sentiment": "negative", "text": "meh"}'}))
    assert rec["sentiment"] == "negative" and rec["answer_text"] == "meh"
    assert rec["text"] == '{"sentiment": "negative", "text": "meh"}'  # the raw answer stays in text
    with pytest.raises(Refused) as info:
        shape.record(answer({"content": None, "refusal": "No."}))
    assert info.value.kind == "refusal" and info.value.refusal == "No."
    with pytest.raises(SchemaViolation, match="not one of"):
        shape.record(answer({"content": '{"sentiment": "meh"}'}))
    with pytest.raises(SchemaViolation, match="not JSON"):
        shape.record(answer({"content": "positive"}))
    with pytest.raises(SchemaViolation, match="no content"):
        shape.record(answer({"content": None}))
    # A tool call is an answer: tool_calls filled, the schema's columns null.
    call = shape.record(answer({"content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                 "function": {"name": "f", "arguments": "{}"}}]}))
    assert call["sentiment"] is None and call["answer_text"] is None and json.loads(call["tool_calls"])
    # Without a schema a refusal is just a column.
    assert ChatShape({}, "orq").record(answer({"content": None, "refusal": "No."}))["refusal"] == "No."


def test_a_schema_path_is_read_and_sent_inline(tmp_path: Path) -> None:
    (tmp_path / "review.json").write_text(json.dumps(SCHEMA))
    spec = ChatRequestSpec.model_validate(
        {"model": "m", "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": "review.json"}}})
    body = ChatShape(spec, "orq", base_dir=tmp_path).body("hi", "m")
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA


def test_prompt_text_counts_every_messages_text() -> None:
    body = {"messages": [{"role": "system", "content": "Be terse."},
                         {"role": "user", "content": [{"type": "text", "text": "Label:"},
                                                      {"type": "image_url", "image_url": {"url": "https://x"}}]},
                         {"role": "assistant", "content": None}]}
    assert ChatShape({}, "orq").prompt_text(body) == "Be terse.\nLabel:"


bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["a", "b"]), "messages": st.lists(
        st.builds(lambda t: {"role": "user", "content": t}, st.text(max_size=5)), min_size=1, max_size=2)},
    # No value at its default here: a default and an omission are the same request (the next test).
    optional={"temperature": st.floats(0, 2).filter(lambda t: t != 1), "seed": st.integers(0, 5),
              "n": st.integers(2, 3),
              "response_format": st.just({"type": "json_object"}), "tools": st.just([{"function": {"name": "f"}}])},
)


@given(bodies, bodies)
def test_cache_key_is_equal_exactly_when_the_answer_would_be(a, b) -> None:
    assert (chat_cache_key("e", a) == chat_cache_key("e", b)) == (a == b)


@given(bodies)
def test_cache_key_ignores_defaults_routing_and_streaming(body) -> None:
    key = chat_cache_key("e", body)
    noise = {"stream": True, "stream_options": {"include_usage": True}, "retry": {"count": 2}, "name": "trace",
             "metadata": {"k": "v"}, "fallbacks": [{"model": "z"}], "orq": {"thread": {"id": "t"}}}
    assert chat_cache_key("e", {**body, **noise}) == key
    defaults = {"temperature": 1, "top_p": 1, "n": 1, "stop": [], "seed": None, "frequency_penalty": 0}
    assert chat_cache_key("e", {**defaults, **body}) == key
    assert chat_cache_key("other-endpoint", body) != key
    assert chat_cache_key("e", {**body, "orq": {"inputs": {"x": 1}}}) != key


def test_messages_template_renders_strings_in_every_part(tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n fake")
    mt = MessagesTemplate([
        {"role": "system", "content": "You label {{kind}}."},
        {"role": "user", "content": [{"type": "text", "text": "{% for e in examples %}{{e}}; {% endfor %}{{text}}"},
                                     {"type": "image_url", "image_url": {"url": "{{image}}", "detail": "low"}}]},
    ])
    assert mt.variables == ["kind", "examples", "text", "image"]
    row = {"kind": "reviews", "examples": ["a", "b"], "text": "great", "image": str(image)}
    rendered = mt.render(row)
    assert rendered[0] == {"role": "system", "content": "You label reviews."}
    assert rendered[1]["content"][0] == {"type": "text", "text": "a; b; great"}
    url = rendered[1]["content"][1]["image_url"]["url"]
    assert url == "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n fake").decode()  # a local file is inlined
    assert mt.render({**row, "image": "https://cdn/x.png"})[1]["content"][1]["image_url"]["url"] == "https://cdn/x.png"
    with pytest.raises(TemplateError, match=r"messages\[1\]\.content\[1\]\.image_url\.url: .*not-here.png"):
        mt.render({**row, "image": str(tmp_path / "not-here.png")})
    with pytest.raises(MissingVariable, match="kind"):
        mt.render({k: v for k, v in row.items() if k != "kind"})


def test_messages_template_errors_name_the_message() -> None:
    with pytest.raises(ValueError, match=r"messages\[1\]\.role|messages\[1\]"):
        MessagesTemplate([{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}])
    with pytest.raises(TemplateError, match=r"template messages\[0\]\.content"):
        MessagesTemplate([{"role": "user", "content": "{% if x %}"}])


def test_messages_from_a_column() -> None:
    # A Parquet list of structs: every field a message lacks is null.
    cell = [{"role": "system", "content": "Be terse.", "tool_call_id": None, "name": None},
            {"role": "user", "content": "Hi", "tool_call_id": None, "name": None},
            {"role": "tool", "content": "42", "tool_call_id": None, "name": None}]
    assert messages_from_value(cell) == [{"role": "system", "content": "Be terse."},
                                         {"role": "user", "content": "Hi"},
                                         {"role": "tool", "content": "42", "tool_call_id": None}]
    assert messages_from_value('[{"role": "user", "content": "Hi"}]') == [{"role": "user", "content": "Hi"}]
    for bad, message in [("not json", "not a JSON list"), ([], "non-empty list"), ({"role": "user"}, "list"),
                         ([{"role": "user"}], r"\[0\]\.user\.content"), ([{"content": "x"}], "role")]:
        with pytest.raises(ValueError, match=message):
            messages_from_value(bad)


def _split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@given(st.text(max_size=40), st.text(min_size=1, max_size=40), st.lists(st.integers(0, 100), max_size=6),
       st.lists(st.integers(0, 100), max_size=6), st.booleans())
def test_stream_folds_any_split_of_content_and_tool_arguments(content, args, cuts, arg_cuts, interleave) -> None:
    """However a server cuts the deltas (and however two choices interleave), the fold is the same."""
    calls = [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                   "function": {"name": "f", "arguments": ""}}]},
              "finish_reason": None}]
    calls += [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
               "finish_reason": None} for piece in _split(args, arg_cuts)]
    texts = [{"index": 1, "delta": {"content": piece}, "finish_reason": None} for piece in _split(content, cuts)]
    if interleave:
        events = [e for pair in zip(calls, texts, strict=False) for e in pair]
        events += calls[len(texts):] + texts[len(calls):]
    else:
        events = [*texts, *calls]
    events += [{"index": 1, "delta": {}, "finish_reason": "stop"},
               {"index": 0, "delta": {}, "finish_reason": "tool_calls"}]
    answer = _fold(_lines([{"choices": [e]} for e in events]))
    assert answer.text is None and answer.finish_reason == "tool_calls"
    assert answer.tool_calls == [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": args}}]
    assert answer.choices[1] == {"index": 1, "text": content, "finish_reason": "stop"}
