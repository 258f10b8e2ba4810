"""shapes/: both shapes implement one interface; the completions adapter behaves exactly as wire.py does."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher.shapes import ChatShape, CompletionsShape, Shape, shape_for
from batcher.shapes.chat_spec import ChatRequestSpec
from batcher.spec import RequestSpec
from batcher.wire import BodyBuilder, StreamAssembler, cache_key, parse_completion

LEGACY = RequestSpec.model_validate({"model": "m", "temperature": 0.3, "stream": True, "retry": {"count": 2}})


def test_shape_for_picks_the_shape_from_the_request_block() -> None:
    chat: Shape = shape_for(ChatRequestSpec.model_validate({"model": "m"}), "openai")
    legacy: Shape = shape_for(LEGACY, "orq")
    assert isinstance(chat, ChatShape) and chat.path() == "/v1/chat/completions"
    assert isinstance(legacy, CompletionsShape) and legacy.path() == "/v2/router/completions"
    assert CompletionsShape(LEGACY, "openai").path() == "/v1/completions"
    assert dict(legacy.extra_columns) == {}


@given(st.text(max_size=30), st.sampled_from(["orq", "openai"]),
       st.one_of(st.none(), st.dictionaries(st.sampled_from("abc"), st.text(max_size=3), max_size=2)),
       st.one_of(st.none(), st.fixed_dictionaries({}, optional={"temperature": st.floats(0, 2), "n": st.integers(1, 3)})))
def test_completions_adapter_builds_the_bodies_wire_py_builds(prompt, api, inputs, line) -> None:
    shape = CompletionsShape(LEGACY, api)
    body = shape.body(prompt, "m2", inputs, line)
    assert body == BodyBuilder(LEGACY, api).body(prompt, "m2", inputs, line)
    assert shape.prompt_text(body) == prompt
    assert shape.cache_key("e", body) == cache_key("e", body)
    assert shape.stream is True


def test_completions_adapter_parses_as_wire_py_does() -> None:
    shape = CompletionsShape(LEGACY, "orq")
    raw = {"id": "c", "model": "m", "choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    content = json.dumps(raw).encode()
    assert shape.record(shape.parse(content)) == parse_completion(content).to_record()
    folder = shape.new_stream()
    assert isinstance(folder, StreamAssembler)
    with pytest.raises(TypeError, match="prompt string"):
        shape.body([{"role": "user", "content": "x"}], "m")
