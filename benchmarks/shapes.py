"""Per-row CPU of the wire shapes alone: render, build the body, encode it, parse the answer, make the record.

    python benchmarks/shapes.py

A first look at the issue's "chat rows cost about what completion rows cost" before the runner speaks chat: the
whole-run figure (C=64, L=50 ms, against the gateway) comes with the integration. Prints µs per row, best of 5.
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable

from batcher._demo import DEMO_SCHEMA as SCHEMA
from batcher.shapes import ChatShape, CompletionsShape
from batcher.shapes.chat import MessagesTemplate
from batcher.shapes.chat_sim import chat_completion, sse_lines
from batcher.spec import RequestSpec
from batcher.templating import Template

PROMPT = "Classify the sentiment of this review as positive, negative or neutral.\n\n{{text}}"
ROW = {"text": "Arrived broken, the box was crushed and support never answered. Returned it."}
LEGACY_ANSWER = json.dumps({
    "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "openai/gpt-4o-mini",
    "choices": [{"index": 0, "text": "negative", "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 40, "completion_tokens": 1, "total_tokens": 41,
              "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}},
}).encode()


def per_row_us(fn: Callable[[], object], number: int = 5_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    legacy = CompletionsShape(RequestSpec.model_validate({"model": "openai/gpt-4o-mini"}), "orq")
    template = Template(PROMPT)
    messages = MessagesTemplate([{"role": "system", "content": "You label product reviews."},
                                 {"role": "user", "content": PROMPT}])
    chat = ChatShape({"model": "openai/gpt-4o-mini"}, "orq")
    structured = ChatShape({"model": "openai/gpt-4o-mini", "response_format": {
        "type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA, "strict": True}}}, "orq")
    chat_answer = json.dumps(chat_completion(chat.body(messages.render(ROW), "m"))).encode()
    structured_answer = json.dumps(chat_completion(structured.body(messages.render(ROW), "m"))).encode()
    streamed = [line.decode().rstrip("\n") for line in sse_lines(json.loads(structured_answer), True)]

    def one(shape: ChatShape | CompletionsShape, render: Callable[[], object], answer: bytes) -> Callable[[], object]:
        def row() -> object:
            body = shape.body(render(), "openai/gpt-4o-mini")  # type: ignore[arg-type]
            json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            return shape.record(shape.parse(answer))
        return row

    def stream_row() -> object:
        structured.body(messages.render(ROW), "openai/gpt-4o-mini")
        folder = structured.new_stream()
        for line in streamed:
            folder.feed_line(line)
        return structured.record(folder.result())

    rows = [
        ("completions, prompt template", per_row_us(one(legacy, lambda: template.render(ROW), LEGACY_ANSWER))),
        ("chat, system + user messages", per_row_us(one(chat, lambda: messages.render(ROW), chat_answer))),
        ("chat + json_schema (3 typed columns)",
         per_row_us(one(structured, lambda: messages.render(ROW), structured_answer))),
        (f"chat + json_schema, streamed ({len(streamed)} lines)", per_row_us(stream_row)),
    ]
    for name, us in rows:
        print(f"{name:<45} {us:7.2f} µs/row")


if __name__ == "__main__":
    main()
