"""shapes/chat_spec.py: the chat request's fields, types and ranges; bodies built from them validate against the
official chat extract; out-of-range and other-endpoint fields are refused naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from batcher.shapes.chat import ChatShape, MessagesTemplate
from batcher.shapes.chat_sim import request_validator
from batcher.shapes.chat_spec import OPENAI_CHAT_FIELDS, ChatInput, ChatRequestSpec, check_api

# No "{" or "}": "{%" or "{{" in generated text is Jinja syntax (a compile error), not text to send.
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="{}"), max_size=12)
ident = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
unit = st.floats(0, 1, allow_nan=False)


def opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(...), strategy)  # ... = the key is left out


tool = st.builds(
    lambda name, props: {"type": "function", "function": {
        "name": name, "description": "a function",
        "parameters": {"type": "object", "properties": {p: {"type": "string"} for p in props},
                       "required": sorted(props)}}},
    ident, st.sets(ident, max_size=3),
)
schema = st.builds(
    lambda props: {"type": "object", "properties": {p: {"type": t} for p, t in props.items()},
                   "required": sorted(props), "additionalProperties": False},
    st.dictionaries(ident, st.sampled_from(["string", "number", "integer", "boolean"]), max_size=4),
)
response_format = st.one_of(
    st.just({"type": "text"}),
    st.just({"type": "json_object"}),
    st.builds(lambda n, s, strict: {"type": "json_schema", "json_schema": {"name": n, "schema": s, "strict": strict}},
              ident, schema, st.booleans()),
)
routing = {
    "retry": st.builds(lambda c, codes: {"count": c, "on_codes": codes}, st.integers(1, 5),
                       st.lists(st.integers(100, 599), min_size=1, max_size=3)),
    "fallbacks": st.lists(st.builds(lambda m: {"model": m}, ident), max_size=2),
    "cache": st.builds(lambda ttl: {"type": "exact_match", "ttl": ttl}, st.integers(1, 259200)),
    "timeout": st.builds(lambda ms: {"call_timeout": ms}, st.integers(1, 600_000)),
}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model": draw(ident),
        "temperature": draw(opt(st.one_of(st.none(), st.floats(0, 2, allow_nan=False)))),
        "top_p": draw(opt(st.one_of(st.none(), unit))),
        "top_k": draw(opt(st.integers(1, 100))),
        "frequency_penalty": draw(opt(st.floats(-2, 2, allow_nan=False))),
        "presence_penalty": draw(opt(st.floats(-2, 2, allow_nan=False))),
        "seed": draw(opt(st.one_of(st.integers(0, 2**31), st.floats(0, 1e6, allow_nan=False)))),
        "stop": draw(opt(st.one_of(text, st.lists(text, max_size=4), st.none()))),
        "n": draw(opt(st.integers(1, 8))),
        "max_completion_tokens": draw(opt(st.integers(2048, 100_000))),
        "response_format": draw(opt(response_format)),
        "reasoning_effort": draw(opt(st.sampled_from(["none", "minimal", "low", "medium", "high", "xhigh"]))),
        "verbosity": draw(opt(st.sampled_from(["low", "medium", "high"]))),
        "metadata": draw(opt(st.dictionaries(ident, text, max_size=16))),
        "prompt_cache_key": draw(opt(ident)),
        "variables": draw(opt(st.dictionaries(ident, text, max_size=3))),
        "modalities": draw(opt(st.just(["text"]))),
        "guardrails": draw(opt(st.lists(st.builds(lambda i, on: {"id": i, "execute_on": on},
                                                  st.sampled_from(["orq_pii_detection", "my_eval"]),
                                                  st.sampled_from(["input", "output"])), max_size=2))),
        "plugins": draw(opt(st.lists(st.sampled_from([{"id": "response_healing"},
                                                      {"id": "trace_scrubbing", "mask": ["input", "output"]},
                                                      {"id": "pii_redaction", "threshold": 0.5}]), max_size=2))),
        "cache_control": draw(opt(st.just({"type": "ephemeral", "ttl": "1h"}))),
        "thinking": draw(opt(st.one_of(st.just({"type": "disabled"}), st.just({"type": "adaptive"}),
                                       st.builds(lambda b: {"type": "enabled", "budget_tokens": b},
                                                 st.integers(1024, 2000))))),
        "stream": draw(opt(st.booleans())),
        "name": draw(opt(ident)),
    }
    if draw(st.booleans()):
        fields["logprobs"] = True
        fields["top_logprobs"] = draw(opt(st.integers(0, 20)))
    tools = draw(opt(st.lists(tool, min_size=1, max_size=3)))
    if tools is not ...:
        fields["tools"] = tools
        fields["tool_choice"] = draw(st.one_of(
            st.sampled_from(["none", "auto", "required"]),
            st.just({"type": "function", "function": {"name": tools[0]["function"]["name"]}})))
        fields["parallel_tool_calls"] = draw(st.booleans())
    for key, strategy in routing.items():
        fields[key] = draw(opt(strategy))
    if fields["thinking"] is not ... and fields["thinking"].get("type") == "enabled":
        fields["max_completion_tokens"] = 4096
    return {k: v for k, v in fields.items() if v is not ...}


messages = st.lists(
    st.one_of(
        st.builds(lambda t: {"role": "system", "content": t}, text),
        st.builds(lambda t: {"role": "developer", "content": [{"type": "text", "text": t}]}, text),
        st.builds(lambda t: {"role": "user", "content": t + " {{review}}"}, text),
        st.builds(lambda t: {"role": "user", "content": [
            {"type": "text", "text": t}, {"type": "image_url", "image_url": {"url": "{{image}}", "detail": "low"}}]},
            text),
        st.builds(lambda t: {"role": "assistant", "content": t}, text),
    ),
    min_size=1, max_size=4,
)
ROW = {"review": "Great value, arrived broken", "image": "https://example.com/a.png"}


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), messages, st.sampled_from(["orq", "openai"]), st.booleans())
def test_generated_chat_bodies_validate_against_the_official_extract(fields, msgs, api, with_inputs) -> None:
    if api == "openai":  # orq-only fields are refused for it (tested below): generate without them
        fields = {k: v for k, v in fields.items() if k in OPENAI_CHAT_FIELDS or k in routing}
        with_inputs = False
    spec = ChatRequestSpec.model_validate(fields)
    check_api(spec, api)
    shape = ChatShape(spec, api)
    rendered = MessagesTemplate(msgs).render(ROW)
    body = shape.body(rendered, fields["model"], {"customer": "Ada"} if with_inputs else None)
    if api == "openai":
        assert set(body) <= OPENAI_CHAT_FIELDS, set(body) - OPENAI_CHAT_FIELDS
    errors = sorted(request_validator().iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:3]]
    for key, value in spec.wire_fields().items():  # every field reaches the wire as written
        if api == "orq" or key in body:
            assert body[key] == value or key == "stream_options"
    if body.get("stream"):
        assert body["stream_options"]["include_usage"] is True


def test_the_extract_validator_does_refuse_bad_bodies() -> None:
    # The property test above is only as good as its validator: make sure it says no.
    good = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert request_validator().is_valid(good)
    for bad in ({**good, "temperature": 3}, {**good, "messages": [{"role": "narrator", "content": "x"}]},
                {**good, "top_logprobs": 21}, {"model": "m"}, {**good, "stop": ["a"] * 5},
                {**good, "response_format": {"type": "json_schema"}}):
        assert not request_validator().is_valid(bad), bad


@pytest.mark.parametrize(
    ("fields", "where", "message"),
    [
        ({"temperature": 2.5}, "temperature", "between 0 and 2"),
        ({"temperature": -0.1}, "temperature", "between 0 and 2"),
        ({"top_p": 1.01}, "top_p", "between 0 and 1"),
        ({"frequency_penalty": -3}, "frequency_penalty", "between -2 and 2"),
        ({"presence_penalty": float("nan")}, "presence_penalty", "finite number"),
        ({"n": 0}, "n", "between 1 and 128"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "between 0 and 20"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "greater than 0"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"metadata": {"k": "x" * 513}}, "metadata", "at most 512"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort", "'none', 'minimal'"),
        ({"cache": {"type": "exact_match", "ttl": 0}}, "cache.ttl", "greater than or equal to 1"),
        ({"retry": {"count": 6}}, "retry.count", "less than or equal to 5"),
        ({"thinking": {"type": "enabled", "budget_tokens": 512}}, "thinking", "greater than or equal to 1024"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "has space"}}},
         "response_format.json_schema.json_schema.name", "1 to 64 of a-z"),
        ({"plugins": [{"id": "trace_scrubbing", "mask": []}]}, "plugins", "at least 1"),
        ({"guardrails": [{"id": "orq_pii_detection", "execute_on": "both"}]}, "guardrails", "'input' or 'output'"),
    ],
)
def test_out_of_range_values_are_refused_naming_field_and_range(fields, where, message) -> None:
    with pytest.raises(ValidationError) as info:
        ChatRequestSpec.model_validate({"model": "m", **fields})
    errors = info.value.errors(include_url=False)
    located = [".".join(str(p) for p in e["loc"]) for e in errors]
    assert any(loc.startswith(where.split(".")[0]) for loc in located), located
    assert any(message in e["msg"] for e in errors), [e["msg"] for e in errors]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"echo": True}, "echo is a field of the completions endpoint"),
        ({"user": "u1"}, "user is a field of the completions endpoint"),
        ({"prompt": "hi"}, "give input.messages"),
        ({"best_of": 2}, "Extra inputs are not permitted"),
        ({"thinking": None}, "may not be null"),
        ({"parallel_tool_calls": None}, "may not be null"),
        ({"top_logprobs": 3}, "top_logprobs needs logprobs: true"),
        ({"stream_options": {"include_usage": True}}, "stream_options needs stream: true"),
        ({"tool_choice": "required"}, "tool_choice 'required' needs tools"),
        ({"tools": [{"function": {"name": "a"}}], "tool_choice": {"function": {"name": "b"}}},
         "names the function 'b', which is not among tools (a)"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}, "max_completion_tokens": 1024},
         "must be less than the maximum tokens (1024)"),
        ({"retry": {"count": 2}, "orq": {"retry": {"count": 3}}}, "retry is set both"),
        ({"audio": {"voice": "alloy", "format": "mp3"}}, "needs modalities"),
        ({"tools": [{"function": {"name": "f", "parameters": {"type": "array"}}}]}, "'object'"),
    ],
)
def test_fields_of_other_endpoints_and_inconsistent_requests_are_refused(fields, message) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ChatRequestSpec.model_validate({"model": "m", **fields})


def test_openai_api_refuses_orq_only_fields_by_name() -> None:
    for fields, name in [({"thinking": {"type": "adaptive"}}, "request.thinking"), ({"top_k": 5}, "request.top_k"),
                         ({"guardrails": []}, "request.guardrails"),
                         ({"orq": {"thread": {"id": "t"}}}, "request.orq.thread")]:
        spec = ChatRequestSpec.model_validate({"model": "m", **fields})
        with pytest.raises(ValueError, match=f"{name} is orq-only"):
            check_api(spec, "openai")
        check_api(spec, "orq")
    # Routing fields are fine: batcher applies them itself, and does not send them.
    spec = ChatRequestSpec.model_validate({"model": "m", "retry": {"count": 2}, "orq": {"timeout": {"call_timeout": 5}}})
    check_api(spec, "openai")
    assert "retry" not in ChatShape(spec, "openai").body("hi", "m")


def test_routing_reads_either_place_and_a_schema_can_be_a_path() -> None:
    spec = ChatRequestSpec.model_validate({"model": "m", "orq": {"retry": {"count": 2}}})
    assert spec.routing("retry").count == 2 and spec.routing("cache") is None
    rf = ChatRequestSpec.model_validate({"response_format": {"type": "json_schema", "json_schema": {
        "name": "r", "schema": "schemas/review.json"}}}).response_format
    assert rf is not None and rf.json_schema.schema_ == "schemas/review.json"
    with pytest.raises(ValidationError, match=r"\.json file"):
        ChatRequestSpec.model_validate({"response_format": {"type": "json_schema", "json_schema": {
            "name": "r", "schema": "review.yaml"}}})


def test_chat_input_takes_exactly_one_source_and_checks_messages() -> None:
    ChatInput.model_validate({"messages": [{"role": "user", "content": "{{text}}"}]})
    ChatInput.model_validate({"messages_column": "conversation"})
    for bad in ({}, {"messages": [{"role": "user", "content": "x"}], "messages_column": "c"}):
        with pytest.raises(ValidationError, match="exactly one of messages"):
            ChatInput.model_validate(bad)
    with pytest.raises(ValidationError, match="role"):
        ChatInput.model_validate({"messages": [{"role": "narrator", "content": "x"}]})
    with pytest.raises(ValidationError):
        ChatInput.model_validate({"messages": [{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]})  # system messages take text parts only


RANGES = {  # field: (low, high, the range as the error words it)
    "temperature": (0, 2, "between 0 and 2"),
    "top_p": (0, 1, "between 0 and 1"),
    "frequency_penalty": (-2, 2, "between -2 and 2"),
    "presence_penalty": (-2, 2, "between -2 and 2"),
    "n": (1, 128, "between 1 and 128"),
    "top_logprobs": (0, 20, "between 0 and 20"),
    "max_completion_tokens": (1, None, "greater than 0"),
    "max_tokens": (1, None, "at least 1"),
}


@st.composite
def out_of_range(draw: st.DrawFn) -> tuple[str, float, str]:
    field = draw(st.sampled_from(sorted(RANGES)))
    lo, hi, words = RANGES[field]
    integer = field in ("n", "top_logprobs", "max_completion_tokens", "max_tokens")
    below = st.integers(-10**6, lo - 1) if integer else st.floats(-1e6, lo, exclude_max=True)
    above = st.integers(hi + 1, 10**6) if integer and hi is not None else st.floats(hi, 1e6, exclude_min=True) \
        if hi is not None else st.nothing()
    return field, draw(st.one_of(below, above)), words


@given(out_of_range())
def test_any_out_of_range_value_is_refused_naming_the_field_and_the_range(case) -> None:
    field, value, words = case
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(ValidationError) as info:
        ChatRequestSpec.model_validate({"model": "m", field: value, **extra})
    errors = info.value.errors(include_url=False)
    assert [e["loc"] for e in errors] == [(field,)]
    assert words in errors[0]["msg"]
