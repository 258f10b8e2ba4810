"""The chat request's spec: pydantic models with the types and ranges of orq's chat completions extract.

`ChatRequestSpec` is the `request:` block of a chat job: every field of POST /v2/router/chat/completions except
`messages`, plus the routing fields and the `orq` block as for completions (their models are spec.py's). Unknown
keys are errors naming them; a field of the legacy endpoint (`echo`, `user`) is named as such; a field the
chosen api cannot send is an error (`check_api`), never silently dropped.

`ChatInput` is the input side: `messages` (a list of `{role, content}` whose strings are templates) or
`messages_column`. `Message` validates one message, rendered or not (the same shapes: a template is a string).

Ranges: the extract's where it enforces one (temperature 0..2, top_p 0..1, n >= 1, stop <= 4, top_logprobs 0..20,
max_completion_tokens > 0); the description's where it only documents one (penalties -2..2, metadata values
<= 512 characters and 16 pairs, json_schema.name). An out-of-range value is refused naming the field and range.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..spec import (
    DEFAULT_MAX_TOKENS,
    INT32_MAX,
    INT64_MAX,
    INT64_MIN,
    Cache,
    Fallback,
    FallbackCode,
    LoadBalancer,
    Orq,
    PiiRedactionPlugin,
    Retry,
    Routed,
    Thinking,
    ThinkingEnabled,
    Timeout,
)

__all__ = [
    "OPENAI_CHAT_FIELDS",
    "ChatInput",
    "ChatRequestSpec",
    "Message",
    "check_api",
]

# What an OpenAI-compatible /v1/chat/completions server takes of the chat contract. The routing fields (retry,
# fallbacks, cache, load_balancer, timeout) are not sent there: batcher enforces them itself.
OPENAI_CHAT_FIELDS = frozenset(
    "model messages frequency_penalty presence_penalty max_tokens max_completion_tokens logprobs top_logprobs n "
    "response_format reasoning_effort verbosity seed stop stream stream_options temperature top_p tools "
    "tool_choice parallel_tool_calls modalities audio metadata prompt_cache_key".split()
)
_ROUTING = ("name", "retry", "fallbacks", "fallback_on_codes", "cache", "load_balancer", "timeout")
_LEGACY_ONLY = {
    "echo": "the chat endpoint has no echo",
    "user": "use prompt_cache_key or metadata instead",
    "prompt": "a chat job sends messages: give input.messages or input.messages_column",
}


def _between(lo: float, hi: float | None = None, *, lo_open: bool = False, cap: int | None = None) -> AfterValidator:
    """A range check whose error names the whole range, not just the bound that failed (NaN fails too). `cap`:
    batcher's own upper bound where the contract has none (`spec.INT32_MAX`), so nothing overflows downstream."""
    def num(x: float) -> str:
        return str(int(x)) if isinstance(x, int) else f"{x:g}"  # 2147483647, not 2.14748e+09

    if hi is None:
        text = f"must be {'greater than' if lo_open else 'at least'} {num(lo)}"
        if cap is not None:
            text += f" and at most {cap}"
            hi = cap
    else:
        text = f"must be between {num(lo)} and {num(hi)}"

    def check(v: Any) -> Any:
        if v is None:
            return v
        ok = (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
        if not ok:
            raise ValueError(text)
        return v

    return AfterValidator(check)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# --- messages ------------------------------------------------------------------------------------------------


class CacheControl(_Model):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextPart(_Model):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


class ImageUrl(_Model):
    url: str = Field(min_length=1)
    detail: Literal["low", "high", "auto"] | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageUrl
    cache_control: CacheControl | None = None


class InputAudio(_Model):
    data: str
    format: Literal["mp3", "wav"]


class AudioPart(_Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileData(_Model):
    file_data: str | None = None
    uri: str | None = None
    mimeType: str | None = None
    filename: str | None = None


class FilePart(_Model):
    type: Literal["file"]
    file: FileData
    cache_control: CacheControl | None = None


class RefusalPart(_Model):
    type: Literal["refusal"]
    refusal: str


class ReasoningPart(_Model):
    type: Literal["reasoning"]
    reasoning: str
    signature: str


class RedactedReasoningPart(_Model):
    type: Literal["redacted_reasoning"]
    data: str


UserPart = Annotated[TextPart | ImagePart | AudioPart | FilePart, Field(discriminator="type")]
AssistantPart = Annotated[TextPart | RefusalPart | ReasoningPart | RedactedReasoningPart, Field(discriminator="type")]


class FunctionCall(_Model):
    name: str
    arguments: str


class ToolCall(_Model):
    id: str
    type: Literal["function"]
    function: FunctionCall
    thought_signature: str | None = None


class SystemMessage(_Model):
    role: Literal["system"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None


class DeveloperMessage(_Model):
    role: Literal["developer"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    name: str | None = None


class UserMessage(_Model):
    role: Literal["user"]
    content: str | list[UserPart]
    name: str | None = None


class AssistantMessage(_Model):
    role: Literal["assistant"]
    content: str | list[AssistantPart] | None = None
    refusal: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Model):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str | None
    cache_control: CacheControl | None = None


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


class ChatInput(_Model):
    """The chat half of `input:`: one of `messages` (templates) or `messages_column`."""

    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    messages_column: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> ChatInput:
        if (self.messages is None) == (self.messages_column is None):
            raise ValueError("give exactly one of messages (a list of {role, content}) or messages_column")
        return self


# --- request fields ------------------------------------------------------------------------------------------


class JsonSchemaFormat(_Model):
    name: str
    description: str | None = None
    # Inline, or a path to a .json file; structured.load_schema reads it when the job starts.
    schema_: dict[str, Any] | str | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v):
            raise ValueError("must be 1 to 64 of a-z, A-Z, 0-9, underscores and dashes")
        return v

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        if isinstance(v, str) and Path(v).suffix.lower() != ".json":
            raise ValueError("a schema given as a path must name a .json file")
        return v


class ResponseFormatText(_Model):
    type: Literal["text"]


class ResponseFormatJsonObject(_Model):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(_Model):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class FunctionParameters(BaseModel):
    """A function's JSON schema: `type: object` and `properties` required; any other schema keyword allowed."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Literal["object"]
    properties: dict[str, Any]
    required: list[str] | None = None
    additionalProperties: bool | None = None


class FunctionDef(_Model):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: FunctionParameters | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"] | None = None
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class ToolChoiceFunction(_Model):
    type: Literal["function"] | None = None
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool | None = None


class Audio(_Model):
    voice: Literal["alloy", "echo", "fable", "onyx", "nova", "shimmer"]
    format: Literal["wav", "mp3", "flac", "opus", "pcm16"]


class Guardrail(_Model):
    id: str = Field(min_length=1)  # orq_pii_detection, orq_secret_detection, ... or an evaluator's key
    execute_on: Literal["input", "output"]


class ResponseHealingPlugin(_Model):
    id: Literal["response_healing"]


class TraceScrubbingPlugin(_Model):
    id: Literal["trace_scrubbing"]
    mask: Annotated[list[Literal["all", "system", "input", "output", "metadata", "variables"]], Field(min_length=1)]


Plugin = Annotated[PiiRedactionPlugin | ResponseHealingPlugin | TraceScrubbingPlugin, Field(discriminator="id")]
MetadataValue = Annotated[str, Field(max_length=512)]

# Fields whose schema does not allow null: an explicit `null` would be a 400, so it is refused here.
_NOT_NULLABLE = (
    "name", "reasoning_effort", "verbosity", "tools", "tool_choice", "parallel_tool_calls", "metadata",
    "prompt_cache_key", "variables", "guardrails", "plugins", "cache_control", "thinking", "stream",
    "response_format", "fallbacks", "retry", "cache", "load_balancer", "timeout", "orq",
)


class ChatRequestSpec(Routed, _Model):
    """The chat completion request body minus `messages`: every field of the orq chat contract."""

    model: str | None = Field(None, min_length=1)
    # sampling
    temperature: Annotated[float | None, _between(0, 2)] = None
    top_p: Annotated[float | None, _between(0, 1)] = None
    top_k: float | None = None
    frequency_penalty: Annotated[float | None, _between(-2, 2)] = None
    presence_penalty: Annotated[float | None, _between(-2, 2)] = None
    seed: Annotated[int | float | None, _between(INT64_MIN, INT64_MAX)] = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: Annotated[int | None, _between(1, 128)] = None
    # output
    max_tokens: Annotated[int | None, _between(1, cap=INT32_MAX)] = None
    max_completion_tokens: Annotated[int | None, _between(0, lo_open=True, cap=INT32_MAX)] = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    verbosity: str | None = None
    thinking: Thinking | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, _between(0, 20)] = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: Audio | None = None
    # tools
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    # streaming
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # orq extras
    metadata: Annotated[dict[str, MetadataValue], Field(max_length=16)] | None = None
    prompt_cache_key: str | None = None
    variables: dict[str, Any] | None = None
    guardrails: list[Guardrail] | None = None
    plugins: list[Plugin] | None = None
    cache_control: CacheControl | None = None
    # routing, as for completions
    name: str | None = None
    fallbacks: list[Fallback] | None = None
    fallback_on_codes: Annotated[list[FallbackCode], Field(min_length=1, max_length=20)] | None = None
    retry: Retry | None = None
    cache: Cache | None = None
    load_balancer: LoadBalancer | None = None
    timeout: Timeout | None = None
    orq: Orq | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_legacy(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, hint in _LEGACY_ONLY.items():
                if key in data:
                    raise ValueError(f"{key} is a field of the completions endpoint, not of chat completions: {hint}")
        return data

    @field_validator(*_NOT_NULLABLE, mode="before")
    @classmethod
    def _no_null(cls, v: Any) -> Any:
        # Runs only for values the user gave: a default None never reaches it.
        if v is None:
            raise ValueError("may not be null in the chat contract: leave it out instead")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ChatRequestSpec:
        if self.orq is not None:
            for field in _ROUTING:
                if getattr(self, field) is not None and getattr(self.orq, field) is not None:
                    raise ValueError(f"{field} is set both at the top level and in orq: write it once")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.effective_max_tokens:
            raise ValueError(
                f"thinking.budget_tokens ({self.thinking.budget_tokens}) must be less than the maximum tokens "
                f"({self.effective_max_tokens})"
            )
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError(f"tool_choice {self._choice_text()} needs tools")
        if isinstance(self.tool_choice, ToolChoiceFunction) and self.tools:
            names = [t.function.name for t in self.tools]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names the function {self.tool_choice.function.name!r}, "
                                 f"which is not among tools ({', '.join(names)})")
        if self.audio is not None and (self.modalities is None or "audio" not in self.modalities):
            raise ValueError("audio output needs modalities: [text, audio]")
        return self

    def _choice_text(self) -> str:
        c = self.tool_choice
        return repr(c) if isinstance(c, str) else f"function {c.function.name!r}" if c is not None else ""

    @property
    def effective_max_tokens(self) -> int:
        """The answer's token bound: max_completion_tokens, else max_tokens, else what batcher sends."""
        for v in (self.max_completion_tokens, self.max_tokens):
            if v is not None:
                return v
        return DEFAULT_MAX_TOKENS

    def wire_fields(self) -> dict[str, Any]:
        """The fields exactly as the user wrote them, in wire form."""
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)


def orq_only_fields(request: ChatRequestSpec, api: str) -> list[str]:
    """Every field `api` cannot send, in the spec's order (routing fields are fine: batcher applies them itself
    on an OpenAI-compatible server; `name`, orq's label for the request, is not one of them)."""
    if api != "openai":
        return []
    bad = [f"request.{f}" for f in request.model_fields_set
           if f not in OPENAI_CHAT_FIELDS and (f not in _ROUTING or f == "name") and f != "orq"]
    if request.orq is not None:
        bad += [f"request.orq.{f}" for f in request.orq.model_fields_set if f not in _ROUTING or f == "name"]
    return bad


def check_api(request: ChatRequestSpec, api: str) -> None:
    """Raise ValueError naming every field `api` cannot send."""
    bad = orq_only_fields(request, api)
    if bad:
        raise ValueError(f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} orq-only and cannot be sent with "
                         "endpoint.api: openai")


