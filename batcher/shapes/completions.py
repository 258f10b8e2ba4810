"""The legacy completions shape: POST /v2/router/completions (orq) or /v1/completions (OpenAI-style).

It owns, for completions and nothing else: the body built from a row's prompt (`BodyBuilder`), the parse of a
response or an SSE stream into a `Completion` (`parse_completion`, `StreamAssembler`; `ContractError` when it
breaks the contract), the cache key, and `CompletionsShape`, the `Shape` interface over them. No I/O.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring  # json.dumps(str, ensure_ascii=False), without the call around it
from typing import Any

import pyarrow as pa

from ..errors import ContractError
from ..spec import DEFAULT_MAX_TOKENS, RequestSpec
from .base import Answer, Api, Prompt

__all__ = [
    "FINISH_REASONS",
    "OPENAI_FIELDS",
    "PATHS",
    "BodyBuilder",
    "Completion",
    "CompletionsShape",
    "ContractError",
    "StreamAssembler",
    "cache_key",
    "parse_completion",
]

PATHS: dict[str, str] = {"orq": "/v2/router/completions", "openai": "/v1/completions"}
# What an OpenAI-compatible /v1/completions server (OpenAI, vLLM, llama.cpp) accepts from our spec.
OPENAI_FIELDS = (
    "model",
    "prompt",
    "echo",
    "frequency_penalty",
    "max_tokens",
    "presence_penalty",
    "seed",
    "stop",
    "temperature",
    "top_p",
    "n",
    "user",
    "stream",
)
FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls"})

# Sampling defaults of the contract: an omitted parameter and the same parameter at its default are the
# same request, so they must hash the same.
_SAMPLING_DEFAULTS: dict[str, Any] = {
    "echo": False,
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "seed": None,
    "stop": None,
    "temperature": 1,
    "top_p": 1,
    "n": 1,
    "thinking": None,
    "plugins": None,
}


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    finish_reason: str
    choices: list[dict[str, Any]]
    model: str | None
    completion_id: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None

    def to_record(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            # One choice is `text` and `finish_reason` already: null here halves what a row weighs
            # in the journal, the cache and the output.
            "choices": self.choices if len(self.choices) > 1 else None,
            "model": self.model,
            "completion_id": self.completion_id,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
        }


class BodyBuilder:
    """Builds each row's body from a template made once per job (the per-row work is a dict copy)."""

    def __init__(self, request: RequestSpec, api: str) -> None:
        self.api = api
        fields = request.model_dump(mode="json", exclude_unset=True, by_alias=True)
        # The API's default max_tokens is 16, which silently truncates: always send it.
        fields.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        if api == "openai":
            fields = {k: v for k, v in fields.items() if k in OPENAI_FIELDS}
            if fields.get("stream"):
                # Usage arrives only if asked for (OpenAI and vLLM); without it a streamed row has no tokens.
                fields["stream_options"] = {"include_usage": True}
        self._base = fields
        self._static_inputs = (fields.get("orq") or {}).get("inputs") or {}

    @property
    def stream(self) -> bool:
        return bool(self._base.get("stream"))

    def body(
        self, prompt: str, model: str, inputs: dict[str, Any] | None = None, line: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The body for one row. `line` is an OpenAI batch line's own body: its fields win over the spec's."""
        body = dict(self._base)
        if line:
            extra = line if self.api == "orq" else {k: v for k, v in line.items() if k in OPENAI_FIELDS}
            body.update(extra)
        body["model"] = model
        body["prompt"] = prompt
        body.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
        if inputs:
            orq = dict(body.get("orq") or {})
            merged = dict(self._static_inputs) if isinstance(self._static_inputs, dict) else {}
            merged.update(inputs)
            orq["inputs"] = merged
            body["orq"] = orq
        return body


_KEY_FIELDS = frozenset(_SAMPLING_DEFAULTS) | {"max_tokens"}


def _normalised(key: str, value: Any) -> Any:
    if key == "stop":
        if value in (None, [], ""):
            return None
        return [value] if isinstance(value, str) else list(value)
    if value is None:
        return _SAMPLING_DEFAULTS.get(key)
    return value


def cache_key(endpoint: str, body: dict[str, Any]) -> str:
    """A canonical hash of everything in `body` that determines the output (model, prompt, every sampling
    parameter, stop, n, seed, and orq's prompt/inputs/knowledge bases), plus the endpoint. Parameters at their
    default hash like omitted ones. Headers are not part of it, so neither is the API key."""
    material: dict[str, Any] = {"endpoint": endpoint, "model": body.get("model")}
    for k in _KEY_FIELDS:
        if k in body:
            v = _normalised(k, body[k])
            if k == "max_tokens" or v != _SAMPLING_DEFAULTS.get(k):
                material[k] = v
    orq = body.get("orq")
    if orq:
        for k in ("prompt", "inputs", "knowledge_bases"):
            if orq.get(k) is not None:
                material["orq." + k] = orq[k]
    prompt = body.get("prompt")
    if type(prompt) is str:
        # The rows of a job mostly differ in their prompt alone: the text around it is made once per distinct
        # rest (with the values' types: 0 and 0.0 are equal but print differently). Same text, same key.
        try:
            frame_key = tuple((k, type(v), v) for k, v in material.items())
            frame = _FRAMES.get(frame_key)
        except TypeError:  # an unhashable value (a stop list, orq inputs): the whole text each time
            pass
        else:
            if frame is None:
                if len(_FRAMES) >= 256:
                    _FRAMES.clear()
                frame = _FRAMES[frame_key] = _frame(material)
            return _digest(frame[0] + encode_basestring(prompt) + frame[1])
    material["prompt"] = prompt
    return _digest(_canonical(material))


def _canonical(material: dict[str, Any]) -> str:
    return json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _digest(blob: str) -> str:
    return hashlib.blake2b(blob.encode(), digest_size=20).hexdigest()


def _frame(material: dict[str, Any]) -> tuple[str, str]:
    """The canonical text of `material` with a prompt, split where the prompt's JSON string goes (keys sort:
    the ones before "prompt", then it, then the rest)."""
    before = _canonical({k: v for k, v in material.items() if k < "prompt"})
    after = {k: v for k, v in material.items() if k > "prompt"}
    return before[:-1] + ',"prompt":', "," + _canonical(after)[1:] if after else "}"


_FRAMES: dict[tuple[Any, ...], tuple[str, str]] = {}


def _int(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ContractError(f"token count is not a number: {v!r}")
    return int(v)


def _usage(usage: Any) -> tuple[int | None, ...]:
    if usage is None:
        return (None, None, None, None, None)
    if not isinstance(usage, dict):
        raise ContractError("usage is not an object")
    ptd = usage.get("prompt_tokens_details") or {}
    ctd = usage.get("completion_tokens_details") or {}
    if not isinstance(ptd, dict) or not isinstance(ctd, dict):
        raise ContractError("usage details are not objects")
    return (
        _int(usage.get("prompt_tokens")),
        _int(usage.get("completion_tokens")),
        _int(usage.get("total_tokens")),
        _int(ptd.get("cached_tokens")),
        _int(ctd.get("reasoning_tokens")),
    )


def _choices(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or not raw:
        raise ContractError("response has no choices")
    out: list[dict[str, Any]] = []
    for c in raw:
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise ContractError("a choice has no text")
        reason = c.get("finish_reason")
        if reason not in FINISH_REASONS:
            raise ContractError(f"unknown finish_reason {reason!r}")
        index = c.get("index", len(out))
        out.append({"index": int(index) if isinstance(index, int | float) else len(out), "text": c["text"], "finish_reason": reason})
    out.sort(key=lambda c: c["index"])
    return out


def _completion(choices: list[dict[str, Any]], usage: Any, model: str | None, cid: str | None) -> Completion:
    pt, ct, tt, cached, reasoning = _usage(usage)
    return Completion(
        text=choices[0]["text"],
        finish_reason=choices[0]["finish_reason"],
        choices=choices,
        model=model,
        completion_id=cid,
        prompt_tokens=pt,
        completion_tokens=ct,
        total_tokens=tt,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
    )


def parse_completion(content: bytes) -> Completion:
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        snippet = content[:80].decode("utf-8", "replace")
        raise ContractError(f"response is not JSON: {snippet!r}") from None
    if not isinstance(data, dict):
        raise ContractError("response is not a JSON object")
    choices = _choices(data.get("choices"))
    model, cid = data.get("model"), data.get("id")
    return _completion(choices, data.get("usage"), model if isinstance(model, str) else None,
                       cid if isinstance(cid, str) else None)


class StreamAssembler:
    """Folds SSE `data:` chunks into one Completion: text per choice index, usage from the last chunk."""

    def __init__(self) -> None:
        self._texts: dict[int, list[str]] = {}
        self._reasons: dict[int, str] = {}
        self._usage: Any = None
        self._model: str | None = None
        self._id: str | None = None
        self.done = False

    def feed_line(self, line: str) -> None:
        if not line.startswith("data:"):
            return  # comments, event names, blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise ContractError(f"stream chunk is not JSON: {payload[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise ContractError("stream chunk is not a JSON object")
        if isinstance(chunk.get("error"), dict):
            raise ContractError(f"error in stream: {chunk['error'].get('message')}")
        self._model = chunk.get("model") or self._model
        self._id = chunk.get("id") or self._id
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        for c in chunk.get("choices") or []:
            if not isinstance(c, dict):
                raise ContractError("a stream choice is not an object")
            i = int(c.get("index", 0))
            self._texts.setdefault(i, []).append(c.get("text") or "")
            reason = c.get("finish_reason")
            if reason is not None:
                if reason not in FINISH_REASONS:
                    raise ContractError(f"unknown finish_reason {reason!r}")
                self._reasons[i] = reason

    def result(self) -> Completion:
        if not self.done:
            raise ContractError("stream ended before data: [DONE]")
        if not self._texts:
            raise ContractError("stream carried no choices")
        choices: list[dict[str, Any]] = []
        for i in sorted(self._texts):
            if i not in self._reasons:
                raise ContractError(f"stream choice {i} has no finish_reason")
            choices.append({"index": i, "text": "".join(self._texts[i]), "finish_reason": self._reasons[i]})
        return _completion(choices, self._usage, self._model, self._id)


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
