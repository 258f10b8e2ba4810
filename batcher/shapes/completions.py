"""The legacy completions shape (POST /v2/router/completions, /v1/completions) behind the Shape interface.

For now a thin adapter over wire.py, which holds the code (BodyBuilder, parse_completion, StreamAssembler,
cache_key) and is being hardened in parallel. When that lands, wire.py's code moves here unchanged and wire.py
re-exports it; the tests in tests/test_shapes.py pin that this adapter behaves exactly as wire.py does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from ..spec import RequestSpec
from ..wire import BodyBuilder, Completion, StreamAssembler, cache_key, parse_completion
from .base import Answer, Api, Prompt

__all__ = ["PATHS", "CompletionsShape"]

PATHS: dict[str, str] = {"orq": "/v2/router/completions", "openai": "/v1/completions"}


class CompletionsShape:
    name = "completions"

    def __init__(self, request: RequestSpec, api: Api) -> None:
        self.api: Api = api
        self._builder = BodyBuilder(request, api)

    def path(self) -> str:
        return PATHS[self.api]

    @property
    def stream(self) -> bool:
        return self._builder.stream

    @property
    def extra_columns(self) -> Mapping[str, pa.DataType]:
        return {}

    def body(
        self,
        prompt: Prompt,
        model: str,
        inputs: Mapping[str, Any] | None = None,
        line: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        if not isinstance(prompt, str):
            raise TypeError("the completions endpoint takes a prompt string, not messages")
        return self._builder.body(prompt, model, dict(inputs) if inputs else None, dict(line) if line else None)

    def parse(self, content: bytes) -> Completion:
        return parse_completion(content)

    def new_stream(self) -> StreamAssembler:
        return StreamAssembler()

    def record(self, answer: Answer) -> dict[str, Any]:
        return answer.to_record()

    def prompt_text(self, body: Mapping[str, Any]) -> str:
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else ""

    def cache_key(self, endpoint: str, body: Mapping[str, Any]) -> str:
        return cache_key(endpoint, dict(body))
