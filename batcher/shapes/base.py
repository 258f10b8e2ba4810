"""What every API shape implements: the one interface the runner, the client and the gateway talk to.

A shape is one wire format (legacy completions, chat completions). It owns, for that format and nothing else:
the URL path per `api`, the request body built from a row, the response and stream parsing into an `Answer`,
the output columns it adds, the text that token estimates count, and the cache key material.

    shape = ChatShape(request_fields, api="orq")
    body = shape.body(messages, model="openai/gpt-4o", inputs={"customer": "Ada"})
    record = shape.record(shape.parse(response_bytes))

Errors, raised by `parse`, `stream().result()` and `record`:

    ContractError        the response breaks the wire contract (not JSON, no choices...): a contract failure,
    └── SchemaViolation  the answer is not JSON or breaks the requested json_schema; retried like one
    Refused              the model refused (`message.refusal`) where an answer was required: never retried
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import pyarrow as pa

from ..errors import ContractError
from ..structured import SchemaViolation

__all__ = ["Answer", "Api", "ContractError", "Refused", "SchemaViolation", "Shape", "StreamFolder"]

Api = Literal["orq", "openai"]

# `Prompt` is what a row carries to the shape: a rendered prompt string (completions) or a rendered list of
# messages (chat). The shape refuses the one it cannot send.
Prompt = str | list[dict[str, Any]]


class Refused(Exception):
    """The model refused to answer (`message.refusal`) and the job needs an answer (a json_schema)."""

    kind = "refusal"

    def __init__(self, refusal: str) -> None:
        super().__init__(refusal)
        self.refusal = refusal


@runtime_checkable
class Answer(Protocol):
    """A parsed response: the record fields it contributes to the output row."""

    def to_record(self) -> dict[str, Any]: ...


class StreamFolder(Protocol):
    """Folds an SSE stream, one line at a time, into an Answer. `result()` raises ContractError if the stream
    broke the contract or ended before `data: [DONE]`."""

    done: bool

    def feed_line(self, line: str) -> None: ...

    def result(self) -> Answer: ...


class Shape(Protocol):
    """One API shape, built once per job from the spec's request fields and `api`."""

    name: str
    api: Api

    def path(self) -> str:
        """The URL path this shape posts to for its `api` (appended to the endpoint's base URL)."""
        ...

    @property
    def stream(self) -> bool:
        """Whether bodies ask for a stream (then `stream()` folds the answer, else `parse`)."""
        ...

    @property
    def extra_columns(self) -> Mapping[str, pa.DataType]:
        """Output columns beyond batcher's common ones, in order, with their Arrow types."""
        ...

    def body(
        self,
        prompt: Prompt,
        model: str,
        inputs: Mapping[str, Any] | None = None,
        line: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The request body for one row. `line` is an OpenAI batch line's own body: its fields win."""
        ...

    def parse(self, content: bytes) -> Answer:
        """A non-streamed 200 response body, or ContractError."""
        ...

    def new_stream(self) -> StreamFolder:
        """A fresh folder for one streamed response."""
        ...

    def record(self, answer: Answer) -> dict[str, Any]:
        """The output fields of an answer (the shape's extra columns included), or SchemaViolation/Refused.
        Only the first choice fills a schema's columns."""
        ...

    def prompt_text(self, body: Mapping[str, Any]) -> str:
        """All the text a body sends, for token estimates and the budget."""
        ...

    def cache_key(self, endpoint: str, body: Mapping[str, Any]) -> str:
        """A canonical hash of what in `body` determines the answer, plus the endpoint (never the key)."""
        ...
