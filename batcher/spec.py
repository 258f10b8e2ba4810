"""The job spec: pydantic models with the orq contract's types and ranges, and `load_spec(path)`.

Everything a run needs is validated here, before any request: unknown keys are errors, and every error names
the file, the field, the value and what is allowed. Request fields are kept exactly as the user wrote them
(`model_dump(exclude_unset=True)`), so what reaches the wire is what the spec says.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from . import storage
from .errors import SpecError
from .paths import expand_path

if TYPE_CHECKING:
    from .shapes.chat_spec import ChatRequestSpec

__all__ = [
    "DEFAULT_FALLBACK_ON_CODES",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_RETRY_ON_CODES",
    "RESULT_COLUMN_NAMES",
    "JobSpec",
    "MaxErrors",
    "batch_file_is_chat",
    "kept_column_name",
    "load_spec",
    "parse_max_errors",
    "parse_spec",
]

DEFAULT_MAX_TOKENS = 256
DEFAULT_RETRY_ON_CODES = (429, 500, 502, 503, 504)
DEFAULT_FALLBACK_ON_CODES = (408, 429, 500, 502, 503, 504, 529)

# The columns batcher writes after the id and the kept input columns (`sinks.RESULT_COLUMNS` gives their types).
RESULT_COLUMN_NAMES = frozenset({
    "text", "finish_reason", "choices", "model", "status", "error", "error_kind", "http_status", "attempts",
    "cached", "latency_ms", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
    "reasoning_tokens", "completion_id", "cost_usd",
})

# The keys of a journal record that are not output columns of their own name: the row's position, its id (the
# id column's value, whatever that column is named), its kept values and the cache hand-off. A json_schema
# property never takes one of these names (nor an output column's): it becomes `answer_<name>`.
RECORD_KEYS = frozenset({"_i", "id", "keep", "_cache", "unconfirmed_usd"})


def kept_column_name(column: str, id_name: str) -> str:
    """A kept input column's name in the output: its own, unless the id or batcher's columns already use it."""
    return f"input_{column}" if column in RESULT_COLUMN_NAMES or column == id_name else column


# Integer fields whose contract sets no upper bound get one that every server and Parquet column can hold (a
# `max_tokens: 999999999999999999999` would overflow the budget's int64 arithmetic and the server's int32).
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

StatusCode = Annotated[int, Field(ge=100, le=599)]
FallbackCode = Annotated[int, Field(ge=400, le=599)]


class _Model(BaseModel):
    # strict: the official spec's types, not Python's coercions (`n: true`, `temperature: "0.5"`, `max_tokens: 3.0`
    # and `echo: 1` are errors naming the field and the type); an int is still a valid float (`temperature: 1`).
    # No number is infinite or NaN (YAML's `.inf`, `1e400`): a limit, a timeout or a cap must be a real figure.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# --- routing (top level, or inside `orq` in the older form) -------------------------------------------------


class Retry(_Model):
    count: int = Field(3, ge=1, le=5)
    on_codes: list[StatusCode] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON_CODES), min_length=1)


class Fallback(_Model):
    model: str = Field(min_length=1)


class Cache(_Model):
    type: Literal["exact_match"]
    ttl: int = Field(1800, ge=1, le=259200)


class WeightedModel(_Model):
    model: str = Field(min_length=1)
    weight: float = Field(0.5, ge=0.001, le=1)


class LoadBalancer(_Model):
    type: Literal["weight_based"]
    models: list[WeightedModel] = Field(min_length=1)


class Timeout(_Model):
    call_timeout: float = Field(ge=1, description="milliseconds")


# --- pass-through fields of the orq block --------------------------------------------------------------------


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class Identity(_Model):
    id: str
    display_name: str | None = None
    email: str | None = None
    metadata: list[dict[str, Any]] | None = None
    logo_url: str | None = None
    tags: list[str] | None = None

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v is not None and not _EMAIL.match(v):
            raise ValueError("must be an email address")
        return v


class Thread(_Model):
    id: str
    tags: list[str] | None = None


class PromptRef(_Model):
    id: str
    version: Literal["latest"]


class InputItem(_Model):
    key: str
    value: Any = None
    is_pii: bool | None = None


class RerankConfig(_Model):
    model: str
    threshold: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=1, le=100)


class AgenticRagConfig(_Model):
    model: str


class SearchOptions(_Model):
    include_vectors: bool | None = None
    include_metadata: bool | None = None
    include_scores: bool | None = None


_FILTER_OPS = {"eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"}


def _check_condition(field: str, cond: Any) -> None:
    if not isinstance(cond, dict) or len(cond) != 1 or next(iter(cond)) not in _FILTER_OPS:
        raise ValueError(f"filter on {field!r} must be one operator of {sorted(_FILTER_OPS)}, got {cond!r}")
    op, value = next(iter(cond.items()))
    if op in ("gt", "gte", "lt", "lte") and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"filter {field}.{op} must be a number, got {value!r}")
    if op in ("in", "nin") and not isinstance(value, list):
        raise ValueError(f"filter {field}.{op} must be a list, got {value!r}")


class KnowledgeBase(_Model):
    knowledge_id: str
    top_k: int | None = Field(None, ge=1, le=100)
    threshold: float | None = Field(None, ge=0, le=1)
    search_type: Literal["vector_search", "keyword_search", "hybrid_search"] | None = None
    filter_by: dict[str, Any] | None = None
    search_options: SearchOptions | None = None
    rerank_config: RerankConfig | None = None
    agentic_rag_config: AgenticRagConfig | None = None
    query: str | None = None

    @field_validator("filter_by")
    @classmethod
    def _filter(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        groups = [v]
        if set(v) in ({"and"}, {"or"}):
            items = next(iter(v.values()))
            if not isinstance(items, list):
                raise ValueError("and/or takes a list of {field: {operator: value}}")
            groups = items
        for group in groups:
            if not isinstance(group, dict):
                raise ValueError(f"filter must map field names to operators, got {group!r}")
            for field, cond in group.items():
                _check_condition(field, cond)
        return v


class Orq(_Model):
    """The `orq` block: routing in its older form, plus the pass-through fields."""

    name: str | None = None
    retry: Retry | None = None
    fallbacks: list[Fallback] | None = None
    fallback_on_codes: list[FallbackCode] | None = Field(None, min_length=1, max_length=20)
    cache: Cache | None = None
    load_balancer: LoadBalancer | None = None
    timeout: Timeout | None = None
    prompt: PromptRef | None = None
    identity: Identity | None = None
    contact: Identity | None = None
    thread: Thread | None = None
    inputs: dict[str, Any] | list[InputItem] | None = None
    knowledge_bases: list[KnowledgeBase] | None = None


class ThinkingDisabled(_Model):
    type: Literal["disabled"]


class ThinkingEnabled(_Model):
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1024, le=INT32_MAX)
    thinking_level: Literal["minimal", "low", "medium", "high"] | None = None


class ThinkingAdaptive(_Model):
    type: Literal["adaptive"]


Thinking = Annotated[ThinkingDisabled | ThinkingEnabled | ThinkingAdaptive, Field(discriminator="type")]


@functools.cache
def _pii_entities() -> dict[str, frozenset[str]]:
    """Entity names per detector language, read from the official spec extract shipped with batcher."""
    from .openapi import load_openapi

    schemas = load_openapi()["components"]["schemas"]
    out = {}
    for lang, name in (("auto", "PIIRedactionPluginAuto"), ("en", "PIIRedactionPluginEn"), ("nl", "PIIRedactionPluginNl")):
        out[lang] = frozenset(schemas[name]["properties"]["entities"]["items"]["enum"])
    return out


class PiiRedactionPlugin(_Model):
    id: Literal["pii_redaction"]
    on_failure: Literal["block", "passthrough"] | None = None
    threshold: float | None = Field(None, ge=0, le=1)
    language: Literal["en", "nl"] | None = None
    entities: list[str] | None = None

    @model_validator(mode="after")
    def _entities(self) -> PiiRedactionPlugin:
        if self.entities:
            allowed = _pii_entities()[self.language or "auto"]
            bad = [e for e in self.entities if e not in allowed]
            if bad:
                raise ValueError(f"unknown entities {bad} for language {self.language or 'auto'}")
        return self


class _HasOrq(Protocol):
    @property
    def orq(self) -> Orq | None: ...


class Routed:
    """`routing()` for a request spec with the older `orq` block: RequestSpec and chat's ChatRequestSpec."""

    def routing(self: _HasOrq, field: str) -> Any:
        """A routing setting wherever the user wrote it: top level, else the older `orq` form."""
        value = getattr(self, field)
        if value is None and self.orq is not None:
            value = getattr(self.orq, field)
        return value


class RequestSpec(Routed, _Model):
    """The completion request body minus `prompt`: every field of the orq contract."""

    model: str | None = Field(None, min_length=1)
    echo: bool | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    user: str | None = None
    stream: bool | None = None
    name: str | None = None
    fallbacks: list[Fallback] | None = None
    fallback_on_codes: list[FallbackCode] | None = Field(None, min_length=1, max_length=20)
    retry: Retry | None = None
    cache: Cache | None = None
    load_balancer: LoadBalancer | None = None
    timeout: Timeout | None = None
    thinking: Thinking | None = None
    plugins: list[PiiRedactionPlugin] | None = None
    orq: Orq | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_chat(cls, data: Any) -> Any:
        # A chat-only field in a prompt job: say which endpoint has it rather than "unknown key".
        if isinstance(data, dict):
            from .shapes.chat_spec import ChatRequestSpec

            for key in data:
                if key not in cls.model_fields and key in ChatRequestSpec.model_fields:
                    raise ValueError(
                        f"@{key}: is a field of the chat completions endpoint; a job sends chat requests when its "
                        "input has messages (input.messages or input.messages_column) instead of a prompt"
                    )
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RequestSpec:
        if self.orq is not None:
            for field in ("name", "retry", "fallbacks", "fallback_on_codes", "cache", "load_balancer", "timeout"):
                if getattr(self, field) is not None and getattr(self.orq, field) is not None:
                    raise ValueError(f"{field} is set both at the top level and in orq: write it once")
        if isinstance(self.thinking, ThinkingEnabled) and self.thinking.budget_tokens >= self.effective_max_tokens:
            raise ValueError(
                f"thinking.budget_tokens ({self.thinking.budget_tokens}) must be less than max_tokens "
                f"({self.effective_max_tokens})"
            )
        return self

    @property
    def effective_max_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS


def format_of(path: Path, section: str) -> str:
    """A file's format from its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if section == "input" and suffix in (".csv", ".tsv"):
        return suffix[1:]
    known = (".parquet", ".jsonl", ".ndjson", ".csv", ".tsv")
    if section == "input":  # a directory of inputs (or a prefix on a store): the format its files share
        uri = storage.uri_of(path)
        if uri is not None:
            suffixes = storage.folder_suffixes(uri)
        elif path.is_dir():
            suffixes = frozenset(p.suffix.lower() for p in path.iterdir() if p.is_file())
        else:
            suffixes = frozenset()
        found = {format_of(Path(f"x{s}"), section) for s in suffixes if s in known}
        if len(found) == 1:
            return found.pop()
    kinds = ".parquet, .jsonl, .csv or .tsv" if section == "input" else ".parquet or .jsonl"
    raise ValueError(f"cannot tell the format of {storage.shown(path)!r}: use {kinds}, or set {section}.format")


def _expand(v: Any) -> Any:
    """A `before` validator for path fields: `~` and `$VARS` expanded, so `validate` shows the real path."""
    return expand_path(v) if isinstance(v, str | Path) else v


def batch_file_is_chat(path: Path) -> bool:
    """Whether an OpenAI batch file holds chat requests, from its first non-blank line: a `url` ending in
    /chat/completions, or (no url) a body with `messages`. A file that cannot be read or parsed is taken as
    completions: reading it properly is the source's job, which names the problem."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                if raw.strip():
                    line = json.loads(raw)
                    break
            else:
                return False
    except (OSError, ValueError):
        return False
    if not isinstance(line, dict):
        return False
    url = line.get("url")
    if isinstance(url, str):
        return url.rstrip("/").endswith("/chat/completions")
    body = line.get("body")
    return isinstance(body, dict) and "messages" in body


class InputSpec(_Model):
    path: Path
    format: Literal["parquet", "jsonl", "openai_batch", "csv", "tsv"] | None = None
    id_column: str | None = None
    prompt: str | None = None
    prompt_column: str | None = None
    # Chat: a list of {role, content} whose strings are templates, or a column holding each row's messages.
    messages: list[dict[str, Any]] | None = Field(None, min_length=1)
    messages_column: str | None = Field(None, min_length=1)
    inputs_columns: list[str] = Field(default_factory=list)
    batch_size: int = Field(1_000, ge=1, le=1_000_000)
    # The byte budget of a batch, whatever batch_size says: long rows make smaller batches (sources.py).
    batch_bytes: int = Field(4 * 2**20, ge=2**16, le=2**31)
    max_prompt_chars: int = Field(1_000_000, ge=1, le=INT32_MAX)
    # A local image/audio/PDF file a message part names is read only up to this size (attachments.py).
    max_attachment_bytes: int = Field(20 * 1024 * 1024, ge=1, le=2**31 - 1)

    _path = field_validator("path", mode="before")(_expand)

    @model_validator(mode="after")
    def _one_prompt(self) -> InputSpec:
        fmt = self.resolved_format
        given = [k for k in ("prompt", "prompt_column", "messages", "messages_column") if getattr(self, k) is not None]
        if fmt == "openai_batch":
            if given:
                raise ValueError(f"an openai_batch input carries its prompts in each line's body: drop {given[0]}")
            return self
        if len(given) != 1:
            raise ValueError("give exactly one of prompt (a {{column}} template), prompt_column, messages (a list "
                             "of {role, content} templates) or messages_column" +
                             (f"; got {' and '.join(given)}" if given else ""))
        # Templates are compiled here, so a syntax error fails `validate`, naming the template.
        from .templating import Template

        if self.prompt is not None:
            Template(self.prompt, "input.prompt")
        if self.messages is not None:
            from .shapes.chat import MessagesTemplate

            MessagesTemplate(self.messages, "input.messages")
        return self

    @model_validator(mode="after")
    def _csv_is_one_file(self) -> InputSpec:
        # A CSV's header and its record starts are found by one pass over one local file (csv_input.py), and
        # positions, error lines and Ray's shard cuts all come from it: a folder, a glob or an object is refused
        # here, before any request, rather than failing later as a missing file.
        if self.resolved_format in ("csv", "tsv") and (
            storage.is_remote(self.path) or self.path.is_dir() or re.search(r"[*?\[]", self.path.name)
        ):
            raise ValueError(f"{storage.shown(self.path)}: a CSV input is one local file; folders, globs and "
                             f"s3:// or gs:// objects are for Parquet and JSONL files")
        return self

    @property
    def is_chat(self) -> bool:
        """Whether the rows are messages (the chat shape): `messages`, `messages_column`, or an OpenAI batch
        file whose first line is a /v1/chat/completions request."""
        if self.messages is not None or self.messages_column is not None:
            return True
        return self.resolved_format == "openai_batch" and batch_file_is_chat(self.path)

    @property
    def resolved_format(self) -> str:
        return self.format or format_of(self.path, "input")

    @property
    def id_source(self) -> str | None:
        """The input column holding the ids (None: ids are row positions)."""
        return self.id_column or ("custom_id" if self.resolved_format == "openai_batch" else None)

    @property
    def id_name(self) -> str:
        """The id's column name in the output."""
        return self.id_source or "id"


class OutputSpec(_Model):
    path: Path
    # parquet_dataset: a folder of Parquet parts read as one dataset (what a path ending with "/" means)
    format: Literal["parquet", "jsonl", "openai_batch", "parquet_dataset"] | None = None
    keep_columns: list[str] = Field(default_factory=list)
    row_group_size: int = Field(10_000, ge=1, le=1_000_000)

    _path = field_validator("path", mode="before")(_expand)

    @model_validator(mode="before")
    @classmethod
    def _folder(cls, data: Any) -> Any:
        path = data.get("path") if isinstance(data, dict) else None
        if isinstance(path, str) and path.endswith("/") and data.get("format") is None:
            return {**data, "format": "parquet_dataset"}
        return data

    @property
    def resolved_format(self) -> str:
        return self.format or format_of(self.path, "output")

    @model_validator(mode="after")
    def _fmt(self) -> OutputSpec:
        self.resolved_format  # noqa: B018 - raises on an unknown suffix
        return self


_PY_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
                                          "None": (type(None),)}


def _check_fault(item: dict[str, Any]) -> dict[str, Any]:
    """One `endpoint.local.faults` entry, checked as the gateway will build it (`gateway.Fault.from_dict`), so
    a typo fails `validate` rather than `run`. Errors start with `@field:` for `_format_errors` to place."""
    # imported only when faults are set: the gateway module takes 0.25 s to import
    from .gateway import _FAULT_KINDS, Fault

    types = {f.name: str(f.type) for f in dataclasses.fields(Fault)}
    types["delay_ms"] = "float"
    for name, value in item.items():
        if name not in types:
            raise ValueError(f"@{name}: unknown fault field; allowed: {', '.join(sorted(types))}")
        allowed = tuple(t for part in types[name].split("|") for t in _PY_TYPES.get(part.strip(), (object,)))
        if name in ("retry_after", "retry_after_ms"):
            allowed += (int, float)  # sent as header text; from_dict turns numbers into it
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ValueError(f"@{name}: must be {types[name].replace('|', 'or')}, got {value!r}")
    if "kind" not in item:
        raise ValueError(f"@kind: is required, one of {', '.join(sorted(_FAULT_KINDS))}")
    try:
        Fault.from_dict(item)
    except (ValueError, TypeError) as exc:
        m = re.match(r"fault (\w+) ", str(exc))
        raise ValueError(f"@{m.group(1)}: {exc}" if m else str(exc)) from None
    return item


class LocalGateway(_Model):
    """Settings of the simulated gateway started for `base_url: local`."""

    latency_ms: float = Field(20, ge=0, le=600_000)
    jitter_ms: float = Field(0, ge=0, le=600_000)
    faults: list[Annotated[dict[str, Any], AfterValidator(_check_fault)]] = Field(default_factory=list)
    seed: int = Field(0, ge=INT64_MIN, le=INT64_MAX)


class EndpointSpec(_Model):
    base_url: str = "local"
    api: Literal["orq", "openai"] = "orq"
    api_key_env: str | None = "ORQ_API_KEY"
    headers: dict[str, str] = Field(default_factory=dict)
    local: LocalGateway = Field(default_factory=lambda: LocalGateway())

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v != "local" and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError("must be 'local' or an http(s):// URL")
        return v.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must be the NAME of an environment variable holding the key, not the key itself")
        return v

    @field_validator("headers")
    @classmethod
    def _no_auth_header(cls, v: dict[str, str]) -> dict[str, str]:
        if any(k.lower() == "authorization" for k in v):
            raise ValueError("put the key in the variable named by api_key_env, never in the spec")
        return v


@dataclasses.dataclass(frozen=True)
class MaxErrors:
    """How many error rows a finished run may have and still succeed (exit 0): a count, or a percentage of the
    run's rows. Over it, the run exits 9 (`runner.ERRORS_EXIT_CODE`)."""

    count: int | None = 0
    percent: float | None = None

    def allows(self, errors: int, rows: int) -> bool:
        if self.percent is not None:
            return errors * 100 <= self.percent * rows
        return errors <= (self.count or 0)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else str(self.count)


_MAX_ERRORS = re.compile(r"(?P<count>[0-9]+)|(?P<percent>[0-9]+(\.[0-9]*)?|\.[0-9]+)%")
MAX_ERRORS_FORMS = 'a count of error rows >= 0 (like 10) or a percentage of the rows from 0% to 100% (like "2.5%")'


def parse_max_errors(value: int | str) -> MaxErrors:
    """`10` or `"10"`: at most 10 error rows; `"2.5%"`: at most 2.5% of the rows. ValueError otherwise (a bool,
    a float, a negative count, a percentage over 100%), saying what is allowed; the caller names the value."""
    m = _MAX_ERRORS.fullmatch(value.strip()) if isinstance(value, str) else None
    if type(value) is int and value >= 0:
        return MaxErrors(count=value)
    if m and m["count"] is not None:
        return MaxErrors(count=int(m["count"]))
    if m and float(m["percent"]) <= 100:
        return MaxErrors(count=None, percent=float(m["percent"]))
    raise ValueError(f"must be {MAX_ERRORS_FORMS}")


class Limits(_Model):
    concurrency: int = Field(32, ge=1, le=4096)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    max_cost_usd: float | None = Field(None, gt=0)
    # total time one row may be paused by 429s before the 429 becomes its error (or a fallback)
    max_rate_limit_wait_s: float = Field(300, ge=0, le=86_400)
    grace_seconds: float = Field(30, ge=0, le=3600)
    # error rows a finished run may have and still exit 0: a count (10) or a share of the rows ("2.5%")
    max_errors: int | str = 0

    @field_validator("max_errors", mode="before")  # before: one message, not one per branch of `int | str`
    @classmethod
    def _max_errors(cls, v: Any) -> Any:
        parse_max_errors(v)
        return v

    @property
    def error_allowance(self) -> MaxErrors:
        return parse_max_errors(self.max_errors)


class Price(_Model):
    # strict: a price is a number, never "1" or true (which lax parsing would read as 1.0)
    prompt: float = Field(ge=0, allow_inf_nan=False, strict=True, description="USD per million prompt tokens")
    completion: float = Field(ge=0, allow_inf_nan=False, strict=True, description="USD per million completion tokens")
    cached_prompt: float | None = Field(None, ge=0, allow_inf_nan=False, strict=True,
                                        description="USD per million cached prompt tokens")


class _ChatRequest(dict[str, Any]):
    """A request block marked by `JobSpec._shape` as a chat job's (its input has messages)."""


def _request_shape(value: Any) -> str:
    if isinstance(value, _ChatRequest | ChatRequestSpec):  # ChatRequestSpec: imported at the end of the module
        return "chat"
    return "completions"


def _input_is_chat(raw: Any) -> bool:
    """From the raw `input:` section, before validation: whether the job speaks chat."""
    if not isinstance(raw, dict):
        return False
    if raw.get("messages") is not None or raw.get("messages_column") is not None:
        return True
    if raw.get("format") == "openai_batch" and isinstance(raw.get("path"), str | Path):
        return batch_file_is_chat(Path(expand_path(raw["path"])))
    return False


class JobSpec(_Model):
    name: str | None = None
    input: InputSpec
    output: OutputSpec
    endpoint: EndpointSpec = Field(default_factory=lambda: EndpointSpec())
    # The chat shape's request fields when the input has messages (`_shape` decides), else the legacy ones.
    request: Annotated[
        Annotated[RequestSpec, Tag("completions")] | Annotated[ChatRequestSpec, Tag("chat")],
        Discriminator(_request_shape),
    ]
    limits: Limits = Field(default_factory=lambda: Limits())
    cache_dir: Path | None = None
    prices: dict[str, Price] | None = None

    _cache_dir = field_validator("cache_dir", mode="before")(_expand)

    @model_validator(mode="before")
    @classmethod
    def _shape(cls, data: Any) -> Any:
        # The request block's fields depend on the input: messages make a chat job. Chosen here, once, so the
        # request is validated against the one endpoint it will be sent to.
        if isinstance(data, dict) and isinstance(data.get("request"), dict) and _input_is_chat(data.get("input")):
            data = {**data, "request": _ChatRequest(data["request"])}
        return data

    @property
    def is_chat(self) -> bool:
        return _request_shape(self.request) == "chat"

    @model_validator(mode="after")
    def _cross(self) -> JobSpec:
        batch_input = self.input.format == "openai_batch"
        if self.request.model is None and self.request.routing("load_balancer") is None and not batch_input:
            raise ValueError("request.model is required (or a load_balancer to draw it from)")
        orq_only: list[str] = []
        if self.is_chat:
            from .shapes.chat_spec import orq_only_fields

            orq_only = orq_only_fields(self.request, self.endpoint.api)  # type: ignore[arg-type]
            rf = self.request.response_format  # type: ignore[union-attr]
            schema = getattr(getattr(rf, "json_schema", None), "schema_", None)
            if schema is not None:
                from .structured import StructuredOutput, load_schema

                try:  # a schema file that is missing or not a JSON schema fails `validate`, not the run
                    StructuredOutput(load_schema(schema))
                except ValueError as exc:
                    raise ValueError(f"request.response_format.json_schema.schema: {exc}") from None
        elif self.endpoint.api == "openai":
            orq_only = [f"request.{f}" for f in ("name", "thinking", "plugins") if getattr(self.request, f) is not None]
            if self.request.orq is not None:
                orq_only += [
                    f"request.orq.{f}"
                    for f in ("name", "prompt", "identity", "contact", "thread", "inputs", "knowledge_bases")
                    if getattr(self.request.orq, f) is not None
                ]
        if self.input.inputs_columns and self.endpoint.api == "openai":
            orq_only.append("input.inputs_columns (it fills orq.inputs)")
        if orq_only:
            # Every one named at once: a spec moved to api: openai is fixed in one pass.
            raise ValueError(
                f"{', '.join(orq_only)}: {'is' if len(orq_only) == 1 else 'are'} orq-only and cannot be sent with "
                "endpoint.api: openai (routing fields like retry and cache still apply: batcher enforces them "
                "itself)"
            )
        self._kept_names()
        if self.input.inputs_columns and self.request.orq is not None and isinstance(self.request.orq.inputs, list):
            raise ValueError("input.inputs_columns needs request.orq.inputs as a mapping (or unset), not a list")
        return self

    def _kept_names(self) -> None:
        """Two kept columns written under one output name would crash the Parquet write after every call was
        paid (or overwrite each other in JSONL): refuse them here, before any call."""
        id_source, id_name = self.input.id_source, self.input.id_name
        if id_name in RESULT_COLUMN_NAMES:
            # The id is written under its own name (resume matches it, openai_batch output carries it as
            # custom_id): renaming it would break both, so the clash is refused rather than every call paid for
            # an output that cannot be written.
            raise ValueError(
                f"input.id_column: {id_name!r} is the name of one of batcher's output columns "
                f"({', '.join(sorted(RESULT_COLUMN_NAMES))}); rename that column in the input"
            )
        by_name: dict[str, str] = {}
        for column in self.output.keep_columns:
            if column == id_source:
                continue  # it is the output's id column already
            name = kept_column_name(column, id_name)
            if name == id_name:
                raise ValueError(
                    f"output.keep_columns: {column!r} would be written as the output column {name!r}, which is "
                    "the id column (input.id_column); keep it under another name or choose another id_column"
                )
            if name in by_name:
                other = by_name[name]
                raise ValueError(
                    f"output.keep_columns: {column!r} is listed twice"
                    if other == column
                    else f"output.keep_columns: {other!r} and {column!r} would both be written as the output "
                    f"column {name!r} (a kept column named like the id or one of batcher's columns gets an "
                    "input_ prefix); keep only one"
                )
            by_name[name] = column

    @property
    def job_name(self) -> str:
        return self.name or self.output.path.stem


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out == "request" and part in ("chat", "completions"):
            continue  # the request's shape, a tag of the union: not a key the user wrote
        elif part.startswith(("function-", "tagged-union")) or part in (
            "list[InputItem]",
            "dict[str,any]",
            "str",
            "list[str]",
        ):
            continue
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _range_of(loc: tuple[Any, ...]) -> str | None:
    """Both ends of a numeric field's range ("from 65536 to 2147483648"), found by walking the models along an
    error's `loc`; None when the field has one bound or cannot be found (pydantic's message names the one)."""
    models: list[Any] = [JobSpec]
    info = None
    for part in loc:
        found = [m.model_fields[part] for m in models if isinstance(part, str) and part in m.model_fields]
        if not found:
            continue  # a list index, a union's tag, a type's name
        info, models, todo = found[0], [], [found[0].annotation]
        while todo:
            t = todo.pop(0)
            if isinstance(t, type) and issubclass(t, BaseModel):
                models.append(t)
            else:
                todo.extend(typing.get_args(t))
    if info is None:
        return None
    metadata = list(info.metadata)
    if isinstance(loc[-1], int):  # an item of a list: its bounds are on the item type (`FallbackCode`)
        todo = [info.annotation]
        while todo:
            t = todo.pop(0)
            if typing.get_origin(t) is Annotated:
                metadata += [m for a in t.__metadata__ for m in getattr(a, "metadata", [a])]
            todo.extend(a for a in typing.get_args(t) if typing.get_origin(t) is not Annotated)
    lo = hi = None
    for m in metadata:
        for name, sign in (("ge", ">="), ("gt", ">")):
            if getattr(m, name, None) is not None:
                lo = (sign, getattr(m, name))
        for name, sign in (("le", "<="), ("lt", "<")):
            if getattr(m, name, None) is not None:
                hi = (sign, getattr(m, name))
    if lo is None or hi is None:
        return None
    if lo[0] == ">=" and hi[0] == "<=":
        return f"must be from {lo[1]} to {hi[1]}"
    return f"must be {lo[0]} {lo[1]} and {hi[0]} {hi[1]}"


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid job spec"]
    seen = set()
    for err in exc.errors(include_url=False):
        field = _loc(tuple(err["loc"]))
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; unknown keys are errors)"
        elif err["type"] == "missing":
            msg = "is required"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] in _RANGE_ERRORS:
                msg = _range_of(tuple(err["loc"])) or msg
            if msg.startswith("@"):  # a nested key named by the validator (see `_check_fault`)
                name, msg = msg[1:].split(": ", 1)
                field += f".{name}"
        value = err.get("input")
        shown = "" if err["type"] in ("missing",) or isinstance(value, dict) else f" (got {json.dumps(value, default=str)})"
        line = f"  {field}: {msg}{shown}"
        if field == "(top level)" and re.match(r"[a-z_]+(\.[a-z_]+)+: ", msg):
            line = f"  {msg}"  # a check across sections that names its field itself
        if line not in seen:
            seen.add(line)
            lines.append(line)
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "<spec>") -> JobSpec:
    """Validate a spec already loaded into Python objects."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a job spec is a mapping of keys (name, input, output, ...), got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_errors(source, exc)) from None


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, minus two surprises: a key written twice is an error (PyYAML keeps the last one
    silently), and `1e-3` is a number as in YAML 1.2 and JSON (PyYAML 1.1 reads it as a string, which the strict
    spec types would then refuse)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: keys written here override the merged ones, as YAML means
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: construct_mapping names it below
            line = key_node.start_mark.line + 1
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice (lines {first} and {line}); write it once",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a YAML (or JSON) job spec file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the job spec: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {exc}") from None
    spec = parse_spec(data, str(path))
    if spec.name is None:
        spec = spec.model_copy(update={"name": path.stem})
    return spec


# The chat request model imports this module's routing models, so it is imported once they exist, and the job
# spec, which refers to it, is completed then.
from .shapes.chat_spec import ChatRequestSpec  # noqa: E402

JobSpec.model_rebuild()
