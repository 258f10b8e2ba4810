"""The chat completions shape: POST /v2/router/chat/completions (orq) or /v1/chat/completions (OpenAI-style).

It owns, for chat and nothing else: the body built from a row's rendered messages (`ChatShape.body`), the parse
of a response or an SSE stream into a `ChatAnswer` (content, refusal, tool calls, reasoning, usage), the output
columns chat adds (`refusal`, `tool_calls`, `reasoning`, plus a json_schema's typed columns), and the cache key.
`MessagesTemplate` renders `input.messages` for a row; `messages_from_value` reads `input.messages_column`.

    shape = ChatShape(ChatRequestSpec.model_validate(request), "orq", reserved=RESULT_COLUMNS)
    body = shape.body(MessagesTemplate(spec_messages).render(row), "openai/gpt-4o")
    record = shape.record(shape.parse(response_bytes))   # or fold a stream: shape.new_stream()
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import TypeAdapter, ValidationError

from ..attachments import Attachments, attach
from ..spec import DEFAULT_MAX_TOKENS, RECORD_KEYS, RESULT_COLUMN_NAMES
from ..structured import StructuredOutput, load_schema
from ..templating import Template
from .base import Api, ContractError, Prompt, Refused
from .chat_spec import OPENAI_CHAT_FIELDS, ChatRequestSpec, Message
from .completions import _usage  # one reading of the usage block for both shapes

__all__ = [
    "CHAT_COLUMNS",
    "FINISH_REASONS",
    "ChatAnswer",
    "ChatShape",
    "ChatStreamAssembler",
    "MessagesTemplate",
    "chat_cache_key",
    "messages_from_value",
    "parse_chat",
]

PATHS: dict[str, str] = {"orq": "/v2/router/chat/completions", "openai": "/v1/chat/completions"}
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
# The columns chat adds to batcher's common ones (text, finish_reason, usage...).
CHAT_COLUMNS: dict[str, pa.DataType] = {"refusal": pa.string(), "tool_calls": pa.string(), "reasoning": pa.string()}


# --------------------------------------------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True)
class ChatAnswer:
    text: str | None  # choices[0].message.content: null for a tool call or a refusal
    finish_reason: str | None
    refusal: str | None
    tool_calls: list[dict[str, Any]] | None
    reasoning: str | None
    choices: list[dict[str, Any]]  # {index, text, finish_reason} per choice: the `choices` column's struct
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
            "choices": self.choices if len(self.choices) > 1 else None,  # one choice is text + finish_reason
            "model": self.model,
            "completion_id": self.completion_id,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "refusal": self.refusal,
            "tool_calls": json.dumps(self.tool_calls, ensure_ascii=False, separators=(",", ":"))
            if self.tool_calls else None,
            "reasoning": self.reasoning,
        }


def _opt_str(container: Mapping[str, Any], key: str, what: str) -> str | None:
    v = container.get(key)
    if v is None or isinstance(v, str):
        return v
    raise ContractError(f"{what}.{key} is not a string")


def _reason(v: Any) -> str | None:
    if v is None:
        return None
    if v not in FINISH_REASONS:
        raise ContractError(f"unknown finish_reason {v!r}")
    return str(v)


def _tool_calls(raw: Any) -> list[dict[str, Any]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ContractError("message.tool_calls is not a list")
    out = []
    for call in raw:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments", ""), str):
            raise ContractError("a tool call has no function name and arguments string")
        out.append({"id": call.get("id"), "type": call.get("type") or "function",
                    "function": {"name": fn["name"], "arguments": fn.get("arguments", "")}})
    return out or None


def _answer(choices: list[dict[str, Any]], first: dict[str, Any], usage: Any, data: Mapping[str, Any]) -> ChatAnswer:
    pt, ct, tt, cached, reasoning = _usage(usage)
    model, cid = data.get("model"), data.get("id")
    return ChatAnswer(
        text=first["text"],
        finish_reason=first["finish_reason"],
        refusal=first.get("refusal"),
        tool_calls=first.get("tool_calls"),
        reasoning=first.get("reasoning"),
        choices=[{"index": c["index"], "text": c["text"], "finish_reason": c["finish_reason"]} for c in choices],
        model=model if isinstance(model, str) else None,
        completion_id=cid if isinstance(cid, str) else None,
        prompt_tokens=pt,
        completion_tokens=ct,
        total_tokens=tt,
        cached_tokens=cached,
        reasoning_tokens=reasoning,
    )


def parse_chat(content: bytes) -> ChatAnswer:
    """A chat.completion response body, or ContractError."""
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        snippet = content[:80].decode("utf-8", "replace")
        raise ContractError(f"response is not JSON: {snippet!r}") from None
    if not isinstance(data, dict):
        raise ContractError("response is not a JSON object")
    raw = data.get("choices")
    if not isinstance(raw, list) or not raw:
        raise ContractError("response has no choices")
    choices: list[dict[str, Any]] = []
    for position, c in enumerate(raw):
        message = c.get("message") if isinstance(c, dict) else None
        if not isinstance(message, dict):
            raise ContractError("a choice has no message")
        index = c.get("index", position)
        if isinstance(index, bool) or not isinstance(index, int | float):
            raise ContractError(f"a choice index is not a number: {index!r}")
        choices.append({
            "index": int(index),
            "text": _opt_str(message, "content", "message"),
            "finish_reason": _reason(c.get("finish_reason")),
            "refusal": _opt_str(message, "refusal", "message"),
            "tool_calls": _tool_calls(message.get("tool_calls")),
            "reasoning": _opt_str(message, "reasoning", "message"),
        })
    choices.sort(key=lambda c: c["index"])
    return _answer(choices, choices[0], data.get("usage"), data)


class _Choice:
    __slots__ = ("content", "reason", "reasoning", "refusal", "tools")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.reason: str | None = None


class ChatStreamAssembler:
    """Folds chat.completion.chunk events into one ChatAnswer: content, refusal and reasoning deltas joined per
    choice, tool-call fragments joined by their index, usage from the final chunk, `data: [DONE]` required."""

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None
        self._head: dict[str, Any] = {}
        self.done = False

    def feed_line(self, line: str) -> None:
        if not line.startswith("data:"):
            return  # comments, event names, blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return
        if self.done:
            raise ContractError("stream chunk after data: [DONE]")
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise ContractError(f"stream chunk is not JSON: {payload[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise ContractError("stream chunk is not a JSON object")
        if isinstance(chunk.get("error"), dict):
            raise ContractError(f"error in stream: {chunk['error'].get('message')}")
        for k in ("id", "model"):
            if chunk.get(k):
                self._head[k] = chunk[k]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise ContractError("stream chunk has no choices list")
        for c in choices:
            delta = c.get("delta") if isinstance(c, dict) else None
            if not isinstance(delta, dict):
                raise ContractError("a stream choice has no delta")
            index = c.get("index", 0)
            if isinstance(index, bool) or not isinstance(index, int | float):
                raise ContractError(f"a stream choice index is not a number: {index!r}")
            state = self._choices.setdefault(int(index), _Choice())
            for key, parts in (("content", state.content), ("refusal", state.refusal),
                               ("reasoning", state.reasoning)):
                piece = _opt_str(delta, key, "delta")
                if piece:
                    parts.append(piece)
            if delta.get("tool_calls") is not None:
                self._tool_fragments(state, delta["tool_calls"])
            reason = _reason(c.get("finish_reason"))
            if reason is not None:
                state.reason = reason

    @staticmethod
    def _tool_fragments(state: _Choice, fragments: Any) -> None:
        if not isinstance(fragments, list):
            raise ContractError("delta.tool_calls is not a list")
        for frag in fragments:
            if not isinstance(frag, dict):
                raise ContractError("a tool-call fragment is not an object")
            i = frag.get("index", 0)
            if isinstance(i, bool) or not isinstance(i, int | float):
                raise ContractError(f"a tool-call fragment index is not a number: {i!r}")
            call = state.tools.setdefault(int(i), {"id": None, "type": "function", "name": None, "args": []})
            if frag.get("id"):
                call["id"] = frag["id"]
            if frag.get("type"):
                call["type"] = frag["type"]
            fn = frag.get("function") or {}
            if not isinstance(fn, dict):
                raise ContractError("a tool-call fragment's function is not an object")
            name, args = fn.get("name"), fn.get("arguments")
            if name:
                if not isinstance(name, str):
                    raise ContractError("a tool-call name is not a string")
                call["name"] = name if call["name"] is None else call["name"]
            if args:
                if not isinstance(args, str):
                    raise ContractError("tool-call arguments are not a string")
                call["args"].append(args)

    def result(self) -> ChatAnswer:
        if not self.done:
            raise ContractError("stream ended before data: [DONE]")
        if not self._choices:
            raise ContractError("stream carried no choices")
        choices: list[dict[str, Any]] = []
        for i in sorted(self._choices):
            s = self._choices[i]
            if s.reason is None:
                raise ContractError(f"stream choice {i} has no finish_reason")
            tools = []
            for j in sorted(s.tools):
                t = s.tools[j]
                if t["name"] is None:
                    raise ContractError(f"stream tool call {j} of choice {i} has no function name")
                tools.append({"id": t["id"], "type": t["type"],
                              "function": {"name": t["name"], "arguments": "".join(t["args"])}})
            choices.append({
                "index": i,
                # A tool call or a refusal streams no content: null, as the non-streamed message has it.
                "text": "".join(s.content) if s.content or not (tools or s.refusal) else None,
                "finish_reason": s.reason,
                "refusal": "".join(s.refusal) or None,
                "tool_calls": tools or None,
                "reasoning": "".join(s.reasoning) or None,
            })
        return _answer(choices, choices[0], self._usage, self._head)


# ---------------------------------------------------------------------------------------------------- bodies

# Sampling defaults of the contract: an omitted parameter and the same one at its default hash the same.
_SAMPLING_DEFAULTS: dict[str, Any] = {
    "frequency_penalty": 0, "presence_penalty": 0, "temperature": 1, "top_p": 1, "n": 1, "seed": None,
    "stop": None, "logprobs": False, "top_logprobs": None, "thinking": None, "plugins": None, "tools": None,
    "response_format": None, "parallel_tool_calls": True,
}
# Neither changes the answer: how it travels (stream), where it is routed or cached, what it is labelled with.
_NOT_KEY = frozenset(
    "stream stream_options name retry fallbacks fallback_on_codes cache load_balancer timeout metadata "
    "prompt_cache_key orq".split()
)


def _normalised(key: str, value: Any) -> Any:
    if key == "stop":
        if value in (None, [], ""):
            return None
        return [value] if isinstance(value, str) else list(value)
    if key == "response_format" and value == {"type": "text"}:
        return None
    if value is None:
        return _SAMPLING_DEFAULTS.get(key)
    return value


def chat_cache_key(endpoint: str, body: Mapping[str, Any]) -> str:
    """A canonical hash of what in a chat body determines the answer: the model, the messages, every sampling
    and output field (response_format, tools, reasoning...), and orq's prompt/inputs/knowledge bases; plus the
    endpoint. Parameters at their default hash like omitted ones; routing, streaming and labels do not count."""
    material: dict[str, Any] = {"endpoint": endpoint, "shape": "chat"}
    for k, v in body.items():
        if k in _NOT_KEY:
            continue
        n = _normalised(k, v)
        if k in _SAMPLING_DEFAULTS and n == _SAMPLING_DEFAULTS[k]:
            continue
        material[k] = n
    orq = body.get("orq")
    if isinstance(orq, Mapping):
        for k in ("prompt", "inputs", "knowledge_bases"):
            if orq.get(k) is not None:
                material["orq." + k] = orq[k]
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=20).hexdigest()


def _text_of(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []


class ChatShape:
    """The chat shape for one job: the spec's request fields and `api`, fixed once (a row costs a dict copy)."""

    name = "chat"

    def __init__(
        self,
        request: ChatRequestSpec | Mapping[str, Any],
        api: Api,
        *,
        reserved: Collection[str] = (),
        base_dir: Path | None = None,
    ) -> None:
        self.api: Api = api
        fields = request.wire_fields() if isinstance(request, ChatRequestSpec) else dict(request)
        rf = fields.get("response_format")
        if isinstance(rf, Mapping) and rf.get("type") == "json_schema":
            js = dict(rf.get("json_schema") or {})
            if js.get("schema") is not None:
                js["schema"] = load_schema(js["schema"], base_dir)  # a path in the spec, the schema on the wire
                fields["response_format"] = {**rf, "json_schema": js}
        self.structured = StructuredOutput.from_response_format(
            fields.get("response_format"), {*reserved, *CHAT_COLUMNS, *RECORD_KEYS, *RESULT_COLUMN_NAMES}
        )
        if api == "openai":
            fields = {k: v for k, v in fields.items() if k in OPENAI_CHAT_FIELDS}
        if fields.get("stream"):
            # Usage arrives only if asked for; without it a streamed row has no tokens and no cost.
            fields["stream_options"] = {**(fields.get("stream_options") or {}), "include_usage": True}
        self._base = fields
        orq = fields.get("orq") or {}
        static = orq.get("inputs")
        self._static_inputs: dict[str, Any] = static if isinstance(static, dict) else {}
        self._columns = {**CHAT_COLUMNS, **(self.structured.columns if self.structured else {})}

    def path(self) -> str:
        return PATHS[self.api]

    @property
    def stream(self) -> bool:
        return bool(self._base.get("stream"))

    @property
    def extra_columns(self) -> Mapping[str, pa.DataType]:
        return self._columns

    def body(
        self,
        prompt: Prompt,
        model: str,
        inputs: Mapping[str, Any] | None = None,
        line: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = dict(self._base)
        if line:
            body.update(line if self.api == "orq" else {k: v for k, v in line.items() if k in OPENAI_CHAT_FIELDS})
        body["model"] = model
        body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            # The contract has no default: bound every answer, as the completions shape does, so the budget
            # can reserve for it. max_completion_tokens, the field that counts reasoning tokens too.
            body["max_completion_tokens"] = DEFAULT_MAX_TOKENS
        if inputs:
            orq = dict(body.get("orq") or {})
            orq["inputs"] = {**self._static_inputs, **inputs}
            body["orq"] = orq
        if body.get("stream") and not (body.get("stream_options") or {}).get("include_usage"):
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    def parse(self, content: bytes) -> ChatAnswer:
        return parse_chat(content)

    def new_stream(self) -> ChatStreamAssembler:
        return ChatStreamAssembler()

    def record(self, answer: Any) -> dict[str, Any]:
        rec: dict[str, Any] = answer.to_record()
        if self.structured is not None:
            if rec.get("refusal"):
                raise Refused(rec["refusal"])
            if rec.get("text") is None and rec.get("tool_calls"):
                # A tool call is an answer too (the job asked for tools): it fills tool_calls, not the schema.
                rec.update(dict.fromkeys(self.structured.columns))
            else:
                rec.update(self.structured.parse(rec.get("text")))
        return rec

    def prompt_text(self, body: Mapping[str, Any]) -> str:
        parts: list[str] = []
        for m in body.get("messages") or ():
            if isinstance(m, Mapping):
                parts += _text_of(m.get("content"))
        return "\n".join(parts)

    def cache_key(self, endpoint: str, body: Mapping[str, Any]) -> str:
        return chat_cache_key(endpoint, body)


# ------------------------------------------------------------------------------------------------- messages

_MESSAGES: TypeAdapter[list[Any]] = TypeAdapter(list[Message])
_NOT_TEMPLATES = frozenset({"role", "type"})  # structural keys: never templates, never rendered


def _compile(value: Any, where: str, out: list[Template]) -> Any:
    if isinstance(value, str):
        t = Template(value, where)
        out.append(t)
        return t
    if isinstance(value, list):
        return [_compile(v, f"{where}[{i}]", out) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: v if k in _NOT_TEMPLATES else _compile(v, f"{where}.{k}", out) for k, v in value.items()}
    return value


class MessagesTemplate:
    """`input.messages`: each content a template, or a list of parts whose string values are templates."""

    def __init__(self, messages: Sequence[Mapping[str, Any]], name: str = "messages",
                 attachments: Attachments | None = None) -> None:
        self.name = name
        # Local files in image/audio/file parts are read under these rules (attachments.py).
        self.attachments = attachments or Attachments()
        try:
            checked = _MESSAGES.validate_python(list(messages))
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            where = name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            raise ValueError(f"{where}: {err['msg']}") from None
        self.messages = [m.model_dump(exclude_none=True) for m in checked]
        for m in self.messages:
            if m["role"] == "tool":
                m.setdefault("tool_call_id", None)  # required by the contract even when null
        templates: list[Template] = []
        self._tree = [_compile(m, f"{name}[{i}]", templates) for i, m in enumerate(self.messages)]
        self.variables: list[str] = []
        for t in templates:
            self.variables += [v for v in t.variables if v not in self.variables]

    def render(self, row: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The row's messages; a local file in an image, audio or file part read as data (or AttachmentError)."""
        return attach([self._render(m, row) for m in self._tree], f"template {self.name}", self.attachments)

    def _render(self, node: Any, row: Mapping[str, Any]) -> Any:
        if isinstance(node, Template):
            return node.render(row)
        if isinstance(node, list):
            return [self._render(v, row) for v in node]
        if isinstance(node, dict):
            return {k: self._render(v, row) for k, v in node.items()}
        return node


def _without_nulls(value: Any, keep: str = "") -> Any:
    # A Parquet list of structs fills every field a message lacks with null: drop those, except a tool
    # message's tool_call_id, which the contract requires present even when null.
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None or k == keep}
    if isinstance(value, list):
        return [_without_nulls(v, "tool_call_id" if isinstance(v, dict) and v.get("role") == "tool" else "")
                for v in value]
    return value


def messages_from_value(value: Any) -> list[dict[str, Any]]:
    """A `messages_column` cell (a list of structs, or a JSON list in a string) as checked messages.
    Raises ValueError naming what is wrong and where."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"messages column: not a JSON list of messages ({exc})") from None
    if not isinstance(value, list) or not value:
        raise ValueError(f"messages column: expected a non-empty list of messages, got {type(value).__name__}")
    messages = _without_nulls(value)
    try:
        _MESSAGES.validate_python(messages)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
        raise ValueError(f"messages column{where}: {err['msg']}") from None
    return list(messages)
