"""The local simulated orq gateway: a small, fast HTTP/1.1 server for the demo, the tests and the benchmarks.

It owns everything the real endpoint would do that batcher's client must cope with: Bearer auth, request
validation against the official OpenAPI extract (plus the ranges the extract omits), deterministic completions
(plain, streamed as SSE, `n`, `echo`, `stop`, `max_tokens`), latency, and scripted faults (statuses with
Retry-After, resets, slow answers, broken bodies). It counts what it saw so tests can assert on it.

    with serve_in_thread(GatewayConfig(latency_s=0.02, faults=[Fault("status", status=429, first=1)])) as gw:
        httpx.post(f"{gw.base_url}/v2/router/completions", json={"model": "m", "prompt": "hi"})
        assert gw.stats.by_status == {429: 1}

It is written on a bare `asyncio.Protocol` with a hand-rolled HTTP/1.1 parser (no framework) because the
benchmarks need it to serve thousands of requests per second on one core. It runs on asyncio's loop and on
uvloop alike (transports are used by their shape: uvloop's are not `asyncio.Transport`s). Its answers follow
the contract's response schemas (checked in tests, not on the hot path), bar the faults that break them on
purpose. Command line: `python -m batcher.gateway --port 8787 --latency-ms 20 --faults faults.yaml`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import hmac
import importlib
import json
import logging
import os
import random
import secrets
import signal
import sys
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import parse_qs

import yaml
from jsonschema import Draft202012Validator

from .openapi import load_openapi, request_error
from .shapes import chat_sim
from .shapes.chat import PATHS as CHAT_PATHS

__all__ = ["Fault", "Gateway", "GatewayConfig", "GatewayStats", "main", "serve_in_thread"]

log = logging.getLogger(__name__)

ORQ_PATH = "/v2/router/completions"
OPENAI_PATH = "/v1/completions"
_REQUEST_SCHEMA_REF = "#/paths/~1v2~1router~1completions/post/requestBody/content/application~1json/schema"

# What a strict OpenAI-compatible /v1/completions server accepts; anything else is a 400 there.
_OPENAI_FIELDS = frozenset(
    "model prompt echo frequency_penalty presence_penalty max_tokens seed stop temperature top_p n user stream "
    "stream_options logprobs best_of suffix logit_bias".split()
)
_MAX_N = 128  # OpenAI's own cap; keeps one request from asking for a million choices
_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024

# 256 words, so one digest byte picks one word. No sentiment cue words in it: generated text never reads as a label.
_WORDS = (
    "the a of and to in is it that for on with as was at by from this be are or an not but have they we you his "
    "her their its our new one all more about which when there can time up out so some what other into only over "
    "also after year years first two most people way may just than then like these could would should make made "
    "very work well even back through where much between world because under life day while last state long still "
    "own here place might since area part down around each system found however both small high light city water "
    "river house country power field early home road line open music group form point name story black white green "
    "blue red sound word land market paper order course rain stone wind snow fire cloud valley forest garden bridge "
    "harbor island mountain ocean desert meadow lake shore station tower village window door table chair lamp clock "
    "letter book page voice song dance game plan idea model answer question number pattern signal message process "
    "result method reason value measure moment season morning evening night summer winter spring autumn journey "
    "path trail track engine wheel machine circuit network server client request response token batch column "
    "record stream buffer packet socket thread queue worker cluster vector matrix graph node edge quiet bright "
    "gentle rapid steady simple careful clever honest patient curious eager calm brave kind silent golden silver "
    "wooden narrow broad distant hidden ancient modern northern southern eastern western often"
).split()
assert len(_WORDS) == 256

_SENTIMENT_ASKS = ("positive, negative or neutral", "positive, negative, or neutral")
_LABELS = ("positive", "negative", "neutral")
_POSITIVE_CUES = frozenset(
    "great love loved loves excellent amazing awesome perfect fantastic wonderful happy best recommend good".split()
)
_NEGATIVE_CUES = frozenset(
    "terrible broken refund awful worst bad disappointed disappointing poor hate waste useless returned".split()
)
# Punctuation to spaces, so "great!" and "broken," still count as cue words.
_WORD_SPLIT = str.maketrans({c: " " for c in '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~'})

_FAULT_KINDS = frozenset(
    {"status", "reset", "slow", "malformed", "html", "missing_choices", "bad_finish_reason",
     "not_json", "schema_violation"}  # the last two: chat answers whose content is not JSON / breaks the schema
)
_CHAT_PATHS = tuple(CHAT_PATHS.values())
_ERROR_KINDS = {  # status -> (error.code, error.type), in the shape orq and OpenAI answer with
    400: ("invalid_value", "invalid_request_error"),
    401: ("invalid_api_key", "authentication_error"),
    403: ("forbidden", "permission_error"),
    404: ("not_found", "not_found_error"),
    405: ("method_not_allowed", "invalid_request_error"),
    408: ("request_timeout", "timeout_error"),
    411: ("length_required", "invalid_request_error"),
    413: ("payload_too_large", "invalid_request_error"),
    429: ("rate_limit_exceeded", "rate_limit_error"),
}
_HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>"
    b"<p>The upstream server returned an invalid response.</p></body></html>"
)
_dumps = functools.partial(json.dumps, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Fault:
    """One scripted failure. Rules are checked in order; the first that matches a request answers it."""

    kind: str  # status | reset | slow | malformed | html | missing_choices | bad_finish_reason | not_json | schema_violation
    status: int = 503
    rate: float = 1.0
    first: int | None = None  # hit only the first `first` matching requests of each distinct prompt
    model: str | None = None
    prompt_contains: str | None = None
    path: str | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    delay_s: float = 0.0  # waited before the fault acts, whatever its kind ("slow" then answers normally)
    echo_auth: bool = False
    # A failure of the model provider behind orq rather than of orq's own edge: on the orq path, the `retry`,
    # `fallbacks` and `fallback_on_codes` sent in the body are applied to it server-side, as orq does.
    upstream: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {sorted(_FAULT_KINDS)}, got {self.kind!r}")
        if not 100 <= self.status <= 599:
            raise ValueError(f"fault status must be in 100..599, got {self.status}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"fault rate must be in 0..1, got {self.rate}")
        if self.first is not None and self.first < 0:
            raise ValueError(f"fault first must be >= 0, got {self.first}")
        if self.delay_s < 0:
            raise ValueError(f"fault delay_s must be >= 0, got {self.delay_s}")
        for name in ("retry_after", "retry_after_ms"):
            value = getattr(self, name)
            if value is not None and not (value.isascii() and value.isprintable()):
                raise ValueError(f"fault {name} must be printable ASCII (it is sent as a header)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        """Build from JSON/YAML; `delay_ms` is accepted for `delay_s`, numbers for the Retry-After values."""
        known = {f.name for f in fields(cls)}
        values = dict(data)
        if "delay_ms" in values:
            values["delay_s"] = float(values.pop("delay_ms")) / 1000
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown fault field(s) {unknown}; known: {sorted(known)}")
        for name in ("retry_after", "retry_after_ms"):
            if values.get(name) is not None:
                values[name] = str(values[name])
        return cls(**values)


def _faults(items: Iterable[Fault | Mapping[str, Any]]) -> tuple[Fault, ...]:
    return tuple(f if isinstance(f, Fault) else Fault.from_dict(f) for f in items)


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 0
    latency_s: float = 0.0
    jitter_s: float = 0.0  # uniform extra latency in [0, jitter_s)
    faults: Sequence[Fault] = ()
    api_key: str | None = field(default=None, repr=False)  # never in a repr or a log line
    validate: bool = True  # False skips jsonschema (the range and field checks stay: they are cheap)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.jitter_s < 0:
            raise ValueError("latency_s and jitter_s must be >= 0")
        object.__setattr__(self, "faults", _faults(self.faults))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GatewayConfig:
        """From `{latency_ms, jitter_ms, faults: [...], api_key, validate, seed, host, port}` (JSON/YAML)."""
        known = {"host", "port", "latency_ms", "jitter_ms", "faults", "api_key", "validate", "seed"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown gateway config key(s) {unknown}; known: {sorted(known)}")
        return cls(
            host=str(data.get("host", "127.0.0.1")),
            port=int(data.get("port", 0)),
            latency_s=float(data.get("latency_ms", 0)) / 1000,
            jitter_s=float(data.get("jitter_ms", 0)) / 1000,
            faults=_faults(data.get("faults") or ()),
            api_key=data.get("api_key"),
            validate=bool(data.get("validate", True)),
            seed=int(data.get("seed", 0)),
        )


# ---------------------------------------------------------------------------------------------------- stats

# What the stats keep of request bodies (the latest ones), and the longest prompt `attempts` keys by its text
BODY_LOG_ROWS = 10_000
BODY_LOG_BYTES = 32 * 1024 * 1024
ATTEMPTS_KEY_CHARS = 1024


def attempts_key(prompt: str) -> str:
    """`GatewayStats.attempts`' key for a prompt: the prompt itself, or for a long one its digest
    (`sha256:<hex>` of its UTF-8), so a run of long documents keeps ~100 bytes per prompt, not the prompt."""
    if len(prompt) <= ATTEMPTS_KEY_CHARS:
        return prompt
    return "sha256:" + hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()


class GatewayStats:
    """What the gateway saw on its completion paths (control endpoints are not counted).

    A status is counted when the gateway decides the answer, before any latency, so a client that times out
    still shows up as served (and billed, as a real provider would bill it). `billed` counts answers that
    deliver a whole generated completion: plain, streamed, slow and `bad_finish_reason` ones.
    """

    def __init__(self) -> None:
        self.in_flight = 0  # survives reset(): requests in flight will still leave
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self.by_path: dict[str, int] = {}
        self.by_status: dict[int, int] = {}
        self.billed = 0
        self.aborted = 0  # connections closed without an answer by a "reset" fault
        self.upstream_retries = 0  # provider retries made server-side for `upstream` faults (orq path)
        self.attempts: dict[str, int] = {}  # attempts_key(prompt) -> requests that carried it
        self.arrivals = array("d")  # time.monotonic() of each request
        # {path, headers (no authorization), body}: the latest, at most BODY_LOG_ROWS of them and BODY_LOG_BYTES of
        # request bytes, so a long run of long documents does not grow the gateway without end
        self.bodies: deque[dict[str, Any]] = deque()
        self._body_sizes: deque[int] = deque()
        self._body_bytes = 0
        self.max_in_flight = self.in_flight

    def snapshot(self, bodies: bool = False) -> dict[str, Any]:
        """A JSON-able copy. Safe to call from another thread: each copy is one C-level operation."""
        snap: dict[str, Any] = {
            "total": self.total,
            "by_path": dict(self.by_path),
            "by_status": {str(k): v for k, v in dict(self.by_status).items()},
            "billed": self.billed,
            "aborted": self.aborted,
            "upstream_retries": self.upstream_retries,
            "attempts": dict(self.attempts),
            "arrivals": self.arrivals.tolist(),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }
        if bodies:
            snap["bodies"] = list(self.bodies)
        return snap

    def _arrive(self, path: str, headers: Mapping[str, str], body: Any, size: int = 0) -> None:
        self.total += 1
        self.by_path[path] = self.by_path.get(path, 0) + 1
        self.arrivals.append(time.monotonic())
        if isinstance(body, dict) and isinstance(prompt := body.get("prompt", _messages_text(body)), str):
            key = attempts_key(prompt)
            self.attempts[key] = self.attempts.get(key, 0) + 1
        safe_headers = {k: v for k, v in headers.items() if k != "authorization"}
        self.bodies.append({"path": path, "headers": safe_headers, "body": body})
        self._body_sizes.append(size)
        self._body_bytes += size
        while len(self.bodies) > 1 and (len(self.bodies) > BODY_LOG_ROWS or self._body_bytes > BODY_LOG_BYTES):
            self.bodies.popleft()
            self._body_bytes -= self._body_sizes.popleft()

    def _answer(self, status: int, billed: bool = False) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if billed:
            self.billed += 1

    def _enter(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight


# ----------------------------------------------------------------------------------------------- validation


class _RequestError(Exception):
    """A 4xx answer in the orq error shape, naming the offending field in `param`."""

    def __init__(
        self, param: str | None, message: str, code: str = "invalid_value", status: int = 400
    ) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code
        self.status = status


@functools.cache
def _orq_validator() -> Draft202012Validator:
    # OpenAPI 3.1 schemas are JSON Schema 2020-12. Validating the whole document through a root $ref keeps the
    # `#/components/...` refs resolvable without rewriting them. A copy: load_openapi's dict is shared.
    return Draft202012Validator({**load_openapi(), "$ref": _REQUEST_SCHEMA_REF})


def _schema_check(body: dict[str, Any]) -> None:
    found = request_error(_orq_validator(), body)
    if found is not None:
        raise _RequestError(*found)


@dataclass(frozen=True, slots=True)
class _Params:
    model: str
    prompt: str
    seed: int | None
    temperature: float | None
    max_tokens: int | None
    stop: tuple[str, ...]
    n: int
    echo: bool
    stream: bool
    reasoning_tokens: int


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _RequestError(name, f"{name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise _RequestError(name, f"{name} must be between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


def _integer(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _RequestError(name, f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise _RequestError(name, f"{name} must be between {lo} and {hi}, got {value!r}")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _RequestError(name, f"{name} must be a boolean, got {value!r}")
    return bool(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _RequestError("stop", "stop must be a string or a list of strings")
    if len(value) > 4:
        raise _RequestError("stop", f"stop takes at most 4 sequences, got {len(value)}")
    return tuple(value)


def _reasoning_tokens(thinking: Any) -> int:
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int | float) and not isinstance(budget, bool):
            return max(0, min(int(budget), 64))
    return 0


def _params(path: str, body: Any, validate: bool) -> _Params:
    """The generation inputs of a request body, or a _RequestError naming the first bad field.

    The type and range checks always run (they also keep generation from crashing on bad input, and the
    ranges are documented but missing from the extract); `validate` only adds the jsonschema pass.
    """
    if not isinstance(body, dict):
        raise _RequestError(None, "the request body must be a JSON object", "invalid_json")
    if path == OPENAI_PATH:
        unknown = [k for k in body if k not in _OPENAI_FIELDS]
        if unknown:
            raise _RequestError(
                unknown[0], f"Unrecognized request argument supplied: {unknown[0]}", "unknown_parameter"
            )
    if validate:
        _schema_check(body)
    for name in ("model", "prompt"):
        if not isinstance(body.get(name), str):
            code = "invalid_value" if name in body else "missing_required_parameter"
            raise _RequestError(name, f"{name} is required and must be a string", code)
    _number(body, "top_p", 0, 1)
    _number(body, "frequency_penalty", -2, 2)
    _number(body, "presence_penalty", -2, 2)
    return _Params(
        model=body["model"],
        prompt=body["prompt"],
        seed=_integer(body, "seed", -(2**63), 2**64 - 1),
        temperature=_number(body, "temperature", 0, 2),
        max_tokens=_integer(body, "max_tokens", 1, 2**31),
        stop=_stop(body.get("stop")),
        n=_integer(body, "n", 1, _MAX_N) or 1,
        echo=_flag(body, "echo"),
        stream=_flag(body, "stream"),
        reasoning_tokens=_reasoning_tokens(body.get("thinking")),
    )


# ----------------------------------------------------------------------------------------------- generation


def _messages_text(body: Mapping[str, Any]) -> Any:
    """A chat body's message text (what faults match and stats count on, as the prompt for completions)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    parts: list[str] = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(parts)



def _sentiment(prompt: str) -> str | None:
    """The label the cue words point at, "" when the prompt asks for a label without a clear cue, else None."""
    lowered = prompt.lower()
    if not any(ask in lowered for ask in _SENTIMENT_ASKS):
        return None
    words = set(lowered.translate(_WORD_SPLIT).split())
    positive, negative = len(words & _POSITIVE_CUES), len(words & _NEGATIVE_CUES)
    if positive == negative:
        return ""
    return "positive" if positive > negative else "negative"


def _choice(p: _Params, index: int, label: str | None) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of choice `index`: a pure function of the request."""
    key = f"{p.model}\x1f{p.prompt}\x1f{p.seed}\x1f{p.temperature}\x1f{index}".encode()
    digest = hashlib.blake2b(key, digest_size=64).digest()
    if label is not None:
        words = [label or _LABELS[digest[0] % 3]]
    else:
        words = [_WORDS[b] for b in digest[1 : 6 + digest[0] % 56]]  # 5..60 words, one byte each
    finish = "stop"
    if p.max_tokens is not None and len(words) > p.max_tokens:
        words = words[: p.max_tokens]
        finish = "length"
    text = " ".join(words)
    tokens = len(words)
    cuts = [i for i in (text.find(s) for s in p.stop if s) if i >= 0]
    if cuts:
        text = text[: min(cuts)]
        finish = "stop"
        tokens = len(text.split())
    if p.echo:
        text = f"{p.prompt} {text}" if text else p.prompt
    return text, finish, tokens


def _completion(p: _Params) -> dict[str, Any]:
    label = _sentiment(p.prompt)
    choices = []
    completion_tokens = p.reasoning_tokens  # reasoning is output the provider bills, as OpenAI counts it
    for index in range(p.n):
        text, finish, tokens = _choice(p, index, label)
        choices.append({"index": index, "text": text, "finish_reason": finish})
        completion_tokens += tokens
    prompt_tokens = max(1, (len(p.prompt.split()) * 4 + 2) // 3)  # ~4/3 tokens a word, rounded up
    return {
        "id": f"cmpl-{secrets.token_hex(12)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": p.model,
        "choices": choices,
        "usage": chat_sim.usage(prompt_tokens, completion_tokens, p.reasoning_tokens),
    }


def _sse_chunks(completion: dict[str, Any]) -> list[bytes]:
    """The completion as SSE events: partial texts per choice, usage only on the very last chunk.

    Every chunk carries its choice's finish_reason. OpenAI sends null before a choice's last chunk, but orq's
    contract requires one of its enum values in every chunk (the official SDK rejects a null), so a client
    must take a choice's last finish_reason as the answer, as batcher's StreamAssembler does."""
    head = {k: completion[k] for k in ("id", "object", "created", "model")}
    events: list[dict[str, Any]] = []
    for choice in completion["choices"]:
        reason = choice["finish_reason"]
        for piece in chat_sim.pieces(choice["text"]) or [""]:
            events.append(
                {**head, "choices": [{"index": choice["index"], "text": piece, "finish_reason": reason}]}
            )
    events[-1]["usage"] = completion["usage"]
    return [_chunk(b"data: " + _dumps(e).encode() + b"\n\n") for e in events] + [
        _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    ]


# ------------------------------------------------------------------------------------------------------ HTTP


@functools.cache
def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # 529 is Anthropic's (and orq's) "overloaded", unknown to http.HTTPStatus
        return "Site Overloaded" if status == 529 else "Unknown Status"


@functools.cache
def _status_line(status: int) -> bytes:
    return f"HTTP/1.1 {status} {_phrase(status)}\r\n".encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _response(
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    headers: Iterable[tuple[str, str]] = (),
    close: bool = False,
) -> bytes:
    parts = [_status_line(status), b"content-type: ", content_type, b"\r\ncontent-length: %d\r\n" % len(body)]
    parts += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers]
    if close:
        parts.append(b"connection: close\r\n")
    parts += [b"\r\n", body]
    return b"".join(parts)


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    default_code, kind = _ERROR_KINDS.get(status) or (
        _phrase(status).lower().replace("'", "").replace(" ", "_"),  # 503 -> "service_unavailable"
        "server_error" if status >= 500 else "invalid_request_error",
    )
    error = {"code": code or default_code, "message": message, "param": param, "type": kind}
    return _dumps({"error": error}).encode()


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class _Reply:
    parts: list[bytes]  # written in order; each a separate write so SSE events leave as separate segments
    delay: float = 0.0
    close: bool = False
    abort: bool = False  # close the socket without an answer
    tracked: bool = False  # counted in stats.in_flight until written


class _Transport(Protocol):
    """What the gateway uses of a transport. asyncio's own and uvloop's (which do not subclass
    `asyncio.Transport`) both have it, so the check is by shape, never by `isinstance`."""

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class _HttpProtocol(asyncio.Protocol):
    """One connection: parse requests one at a time (no pipelining), answer in order, keep-alive by default."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._transport: _Transport | None = None
        self._buffer = bytearray()
        # A parsed head whose body has not fully arrived: (method, target, headers, keep_alive, length).
        self._pending: tuple[str, str, dict[str, str], bool, int] | None = None
        self._task: asyncio.Task[None] | None = None  # the delayed reply this connection waits on
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(_Transport, transport)
        self._gateway._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._gateway._connections.discard(self)
        if self._task is not None:
            self._task.cancel()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None:
            self._serve_buffered()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _serve_buffered(self) -> None:
        while self._task is None and not self._closed:
            request = self._next_request()
            if request is None:
                return
            reply = self._gateway._handle(request)
            reply.close = reply.close or not request.keep_alive
            if reply.delay > 0:
                # Latency is awaited in a task so the loop keeps serving other connections meanwhile.
                self._task = task = asyncio.get_running_loop().create_task(self._reply_later(reply))
                self._gateway._tasks.add(task)
                task.add_done_callback(functools.partial(self._gateway._reply_done, reply))
                return
            self._send(reply)

    async def _reply_later(self, reply: _Reply) -> None:
        await asyncio.sleep(reply.delay)
        self._task = None
        self._send(reply)
        self._serve_buffered()

    def _send(self, reply: _Reply) -> None:
        if reply.tracked:
            self._gateway.stats.in_flight -= 1
        transport = self._transport
        if transport is None or self._closed:
            return
        if reply.abort:
            self._closed = True
            transport.abort()
            return
        for part in reply.parts:
            transport.write(part)
        if reply.close:
            self._closed = True
            transport.close()

    def _fail(self, status: int, message: str) -> None:
        self._send(_Reply([_response(status, _error_body(status, message), close=True)], close=True))

    def _next_request(self) -> _Request | None:
        """The next whole request in the buffer, or None (incomplete, or answered with an error and closed)."""
        buffer = self._buffer
        if self._pending is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    self._fail(431, "request head too large")
                return None
            head = self._parse_head(bytes(buffer[:end]))
            del buffer[: end + 4]
            if head is None:
                return None
            self._pending = head
        method, target, headers, keep_alive, length = self._pending
        if len(buffer) < length:
            if headers.get("expect", "").lower() == "100-continue" and self._transport is not None:
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                headers.pop("expect")
            return None
        self._pending = None
        body = bytes(buffer[:length])
        del buffer[:length]
        path, _, query = target.partition("?")
        return _Request(method, path, query, headers, body, keep_alive)

    def _parse_head(self, raw: bytes) -> tuple[str, str, dict[str, str], bool, int] | None:
        lines = raw.decode("latin-1").split("\r\n")
        request_line = lines[0].split(" ")
        if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
            self._fail(400, "malformed request line")
            return None
        method, target, version = request_line
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._fail(400, "malformed header line")
                return None
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            self._fail(411, "chunked request bodies are not supported: send Content-Length")
            return None
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_BODY:
            self._fail(413 if length > _MAX_BODY else 400, "bad Content-Length")
            return None
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        return method, target, headers, keep_alive, length


# --------------------------------------------------------------------------------------------------- gateway


@dataclass(slots=True)
class _Rule:
    fault: Fault
    hits: dict[str, int]  # prompt -> matching requests seen, for `first`


def _reply(
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    *,
    headers: Iterable[tuple[str, str]] = (),
    delay: float = 0.0,
) -> _Reply:
    return _Reply([_response(status, body, content_type, headers)], delay)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_reply(data: Any, status: int = 200) -> _Reply:
    return _reply(status, _dumps(data).encode())


class Gateway:
    """The simulated gateway on the running event loop: `async with Gateway(config) as gw: ... gw.base_url`."""

    def __init__(self, config: GatewayConfig | None = None) -> None:
        self.config = config or GatewayConfig()
        self._stats = GatewayStats()
        self._expected_auth = (
            f"Bearer {self.config.api_key}".encode() if self.config.api_key is not None else None
        )
        self._rules: tuple[_Rule, ...] = ()
        self._fault_rng = random.Random(self.config.seed)
        self._jitter_rng = random.Random(f"{self.config.seed}:jitter")  # apart, so jitter never shifts faults
        self._server: asyncio.Server | None = None
        self._port = 0
        self._connections: set[_HttpProtocol] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # The API shapes served: path -> handler (a request in, the reply out); the control endpoints are
        # answered apart and never counted.
        self._routes: dict[str, Callable[[_Request], _Reply]] = {
            ORQ_PATH: self._complete,
            OPENAI_PATH: self._complete,
            **dict.fromkeys(_CHAT_PATHS, self._chat),  # shapes/chat_sim.py's handler
        }
        self.set_faults(self.config.faults)

    # -- lifecycle

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the gateway is already started")
        if self.config.validate:
            # Parse the schema now and off the loop, not on the first request's clock.
            await asyncio.to_thread(_orq_validator)
            await asyncio.to_thread(chat_sim.request_validator)  # the chat extract too (once per process)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HttpProtocol(self), self.config.host, self.config.port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for connection in list(self._connections):
            connection.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the aborted transports run connection_lost before the loop may close
        await server.wait_closed()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        host = self.config.host
        return f"http://[{host}]:{self._port}" if ":" in host else f"http://{host}:{self._port}"

    @property
    def stats(self) -> GatewayStats:
        return self._stats

    @property
    def faults(self) -> tuple[Fault, ...]:
        return tuple(rule.fault for rule in self._rules)

    def set_faults(self, faults: Iterable[Fault | Mapping[str, Any]]) -> None:
        """Replace the fault rules (and their `first` counters). One assignment, so safe from another thread."""
        self._rules = tuple(_Rule(fault, {}) for fault in _faults(faults))

    def reset(self) -> None:
        """Forget the stats and the `first` counters and reseed, as if freshly started with the same faults."""
        self._stats.reset()
        self.set_faults(self.faults)
        self._fault_rng.seed(self.config.seed)
        self._jitter_rng.seed(f"{self.config.seed}:jitter")

    # -- request handling (called by _HttpProtocol)

    def _reply_done(self, reply: _Reply, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        # A delayed reply cancelled (client gone, gateway closing) never reached _send, which would have
        # counted it out; a done callback also sees tasks cancelled before they ever ran.
        if task.cancelled() and reply.tracked:
            self._stats.in_flight -= 1

    def _handle(self, request: _Request) -> _Reply:
        try:
            handler = self._routes.get(request.path)
            return self._control(request) if handler is None else handler(request)
        except Exception:  # a bug here must still answer, or the client would hang until its timeout
            log.exception("gateway failed on %s %s", request.method, request.path)
            return _reply(500, _error_body(500, "internal gateway error"))

    def _admit(self, request: _Request) -> tuple[Any, _Reply | None]:
        """What both generation paths do first: parse the body (kept as text if it is not JSON), count the
        arrival, and refuse a method other than POST or a wrong API key. Returns (body, refusal or None)."""
        body: Any
        try:
            # Strict JSON (RFC 8259), as a real server parses it: NaN and Infinity are not JSON, so a body that
            # spells them is not a JSON body at all (a 400 below), and a client that sends them is caught here.
            body = json.loads(request.body, parse_constant=_no_constant)
        except ValueError:
            body = request.body.decode("utf-8", "replace")
        self._stats._arrive(request.path, request.headers, body, len(request.body))
        if request.method != "POST":
            return body, self._refuse(405, f"{request.method} is not allowed here; use POST")
        expected = self._expected_auth
        if expected is not None:
            sent = request.headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(sent, expected):
                return body, self._refuse(401, "missing or invalid API key", code="invalid_api_key")
        return body, None

    def _delay(self) -> float:
        """The configured latency plus this request's jitter (drawn only for requests that passed their checks)."""
        delay = self.config.latency_s
        if self.config.jitter_s:
            delay += self._jitter_rng.uniform(0, self.config.jitter_s)
        return delay

    def _track(self, reply: _Reply) -> _Reply:
        """Count an answered request in flight until _send (or its task's cancellation) counts it out."""
        self._stats._enter()
        reply.tracked = True
        return reply

    def _complete(self, request: _Request) -> _Reply:
        body, refusal = self._admit(request)
        if refusal is not None:
            return refusal
        try:
            params = _params(request.path, body, self.config.validate)
        except _RequestError as exc:
            return self._refuse(exc.status, exc.message, exc.param, exc.code)
        delay = self._delay()
        fault = self._match(request.path, params)
        if fault is not None and fault.upstream and request.path == ORQ_PATH and isinstance(body, dict):
            fault, params = self._route_upstream(body, params, fault)
        return self._track(self._ok(params, delay) if fault is None else self._fault(fault, params, request, delay))

    def _chat(self, request: _Request) -> _Reply:
        """The chat paths: the same auth, latency and fault rules as completions; the body checked, answered
        and streamed by `shapes/chat_sim.py`. Faults match on the messages' text."""
        body, refusal = self._admit(request)
        if refusal is not None:
            return refusal
        try:
            chat_sim.check_request(body, request.path, self.config.validate)
        except chat_sim.ChatRequestError as exc:
            return self._refuse(exc.status, exc.message, exc.param, exc.code)
        delay = self._delay()
        stream = body.get("stream") is True
        params = _Params(model=body["model"], prompt=_messages_text(body), seed=None, temperature=None,
                         max_tokens=None, stop=(), n=1, echo=False, stream=stream, reasoning_tokens=0)
        fault = self._match(request.path, params)
        if fault is None or fault.kind == "slow":
            reply = self._chat_ok(body, delay + (fault.delay_s if fault else 0.0))
        elif fault.kind in ("status", "reset", "html"):
            reply = self._fault(fault, params, request, delay)
        else:
            reply = self._chat_broken(body, fault, delay + fault.delay_s)
        return self._track(reply)

    def _chat_ok(self, body: dict[str, Any], delay: float, completion: dict[str, Any] | None = None) -> _Reply:
        completion = completion or chat_sim.chat_completion(body, created=int(time.time()))
        self._stats._answer(200, billed=True)
        if body.get("stream") is True:
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            lines = chat_sim.sse_lines(completion, include_usage=usage)
            return _Reply([_STREAM_HEAD, *(_chunk(line) for line in lines[:-1]), _chunk(lines[-1]) + b"0\r\n\r\n"],
                          delay)
        return _reply(200, _dumps(completion).encode(), delay=delay)

    def _chat_broken(self, body: dict[str, Any], fault: Fault, delay: float) -> _Reply:
        """A chat answer that breaks the contract (malformed, missing_choices, bad_finish_reason) or the job's
        response format (not_json, schema_violation: billed, as a real answer would be)."""
        completion = chat_sim.chat_completion(body, created=int(time.time()))
        if fault.kind in ("not_json", "schema_violation"):
            broken = chat_sim.break_answer(completion, "not_json" if fault.kind == "not_json" else "schema")
            return self._chat_ok(body, delay, broken)
        if fault.kind == "malformed":
            raw = _dumps(completion).encode()
            content = raw[: len(raw) // 2]
        elif fault.kind == "missing_choices":
            del completion["choices"]
            content = _dumps(completion).encode()
        else:  # bad_finish_reason
            for choice in completion["choices"]:
                choice["finish_reason"] = "weird"
            content = _dumps(completion).encode()
        self._stats._answer(200, billed=fault.kind == "bad_finish_reason")
        return _reply(200, content, delay=delay)

    def _refuse(self, status: int, message: str, param: str | None = None, code: str | None = None) -> _Reply:
        self._stats._answer(status)
        return _reply(status, _error_body(status, message, param, code))

    def _ok(self, params: _Params, delay: float) -> _Reply:
        completion = _completion(params)
        self._stats._answer(200, billed=True)
        if params.stream:
            return _Reply([_STREAM_HEAD, *_sse_chunks(completion)], delay)
        return _reply(200, _dumps(completion).encode(), delay=delay)

    def _route_upstream(self, body: dict[str, Any], params: _Params, fault: Fault) -> tuple[Fault | None, _Params]:
        """orq's server-side routing of an upstream failure: retry the provider `retry.count` times on
        `retry.on_codes`, then fall back through `fallbacks` on `fallback_on_codes`. Returns the fault the client
        finally sees (None: a model answered) and the parameters of the model that answered."""
        raw_orq = body.get("orq")
        orq: dict[str, Any] = raw_orq if isinstance(raw_orq, dict) else {}

        def setting(name: str) -> Any:
            return body.get(name, orq.get(name))

        retry = setting("retry") or {}
        count = int(retry.get("count", 3)) if retry else 0
        on_codes = set(retry.get("on_codes", ())) if retry else set()
        fb_codes = set(setting("fallback_on_codes") or (408, 429, 500, 502, 503, 504, 529))
        models = [params.model, *(f.get("model") for f in setting("fallbacks") or () if isinstance(f, dict))]
        current: Fault | None = fault
        for i, model in enumerate(models):
            p = params if i == 0 else dataclasses.replace(params, model=str(model))
            if i > 0:
                current = self._match(ORQ_PATH, p)
            tries = 0
            while current is not None and current.upstream and current.kind == "status" \
                    and current.status in on_codes and tries < count:
                tries += 1
                self._stats.upstream_retries += 1
                current = self._match(ORQ_PATH, p)
            if current is None:
                return None, p
            if not (current.upstream and current.kind == "status" and current.status in fb_codes):
                return current, p
        return current, params

    def _match(self, path: str, params: _Params) -> Fault | None:
        for rule in self._rules:
            fault = rule.fault
            if (
                (fault.path is not None and fault.path != path)
                or (fault.model is not None and fault.model != params.model)
                or (fault.prompt_contains is not None and fault.prompt_contains not in params.prompt)
            ):
                continue
            if fault.first is not None:
                key = attempts_key(params.prompt)
                seen = rule.hits[key] = rule.hits.get(key, 0) + 1
                if seen > fault.first:
                    continue
            # Draw only for partial rates, so adding an always-on rule does not shift the others' dice.
            if fault.rate < 1.0 and self._fault_rng.random() >= fault.rate:
                continue
            return fault
        return None

    def _fault(self, fault: Fault, params: _Params, request: _Request, delay: float) -> _Reply:
        """The answer a matched fault gives. `delay_s` applies to every kind (a reset after 2 s is a drop
        mid-request); for "slow" it is the whole point."""
        delay += fault.delay_s
        kind = fault.kind
        if kind == "slow":
            return self._ok(params, delay)
        if kind == "reset":
            self._stats.aborted += 1
            return _Reply([], delay, abort=True)
        if kind == "status":
            message = f"simulated upstream failure ({fault.status})"
            if fault.echo_auth:
                message += f"; request authorization: {request.headers.get('authorization', '')}"
            headers = [("retry-after", fault.retry_after)] if fault.retry_after is not None else []
            if fault.retry_after_ms is not None:
                headers.append(("retry-after-ms", fault.retry_after_ms))
            self._stats._answer(fault.status)
            return _reply(fault.status, _error_body(fault.status, message), headers=headers, delay=delay)
        if kind == "html":
            self._stats._answer(200)
            return _reply(200, _HTML_PAGE, b"text/html; charset=utf-8", delay=delay)
        completion = _completion(params)
        if kind == "malformed":
            raw = _dumps(completion).encode()
            body = raw[: len(raw) // 2]
        elif kind == "missing_choices":
            del completion["choices"]
            body = _dumps(completion).encode()
        else:  # bad_finish_reason: the text was generated (and billed); only the contract is broken
            for choice in completion["choices"]:
                choice["finish_reason"] = "weird"
            body = _dumps(completion).encode()
        self._stats._answer(200, billed=kind == "bad_finish_reason")
        return _reply(200, body, delay=delay)

    def _control(self, request: _Request) -> _Reply:
        route = (request.method, request.path)
        if route == ("GET", "/health"):
            return _json_reply({"status": "ok", "loop": _loop_name(asyncio.get_running_loop())})
        if route == ("GET", "/_stats"):
            flag = parse_qs(request.query).get("bodies", ["0"])[-1].lower()
            return _json_reply(self._stats.snapshot(bodies=flag in ("1", "true", "yes")))
        if route == ("POST", "/_reset"):
            self.reset()
            return _json_reply({"ok": True})
        if route == ("POST", "/_faults"):
            try:
                data = json.loads(request.body)
                self.set_faults(data["faults"] if isinstance(data, dict) else data)
            except (ValueError, TypeError, KeyError) as exc:
                return _reply(400, _error_body(400, f"bad fault list: {exc}", "faults"))
            return _json_reply({"faults": len(self._rules)})
        if request.path in ("/health", "/_stats", "/_reset", "/_faults"):
            return _reply(405, _error_body(405, f"{request.method} is not allowed on {request.path}"))
        self._stats._arrive(request.path, request.headers, None)  # a wrong base_url shows up in the stats
        return self._refuse(404, f"no route for {request.path}; use {' or '.join(self._routes)}")


# ---------------------------------------------------------------------------------------- threads and CLI


@contextlib.contextmanager
def serve_in_thread(
    config: GatewayConfig | None = None,
    *,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> Iterator[Gateway]:
    """A started Gateway on its own event loop in a daemon thread, closed on exit.

    For sync code, and for async code that must not share its loop with the server (whose CPU time would
    otherwise count against the code under test). Read `gateway.stats` freely; change faults with
    `set_faults`, which is thread-safe. `loop_factory` (e.g. `uvloop.new_event_loop`) replaces asyncio's
    default loop.
    """
    loop = (loop_factory or asyncio.new_event_loop)()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="batcher-gateway", daemon=True)
    thread.start()
    gateway = Gateway(config)
    try:
        asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(timeout=60)
        yield gateway
    finally:
        try:
            asyncio.run_coroutine_threadsafe(gateway.aclose(), loop).result(timeout=60)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=60)


def _load_faults(source: str) -> tuple[Fault, ...]:
    """Faults from a JSON/YAML file or an inline JSON string: a list, or a mapping with a `faults` list."""
    try:
        is_file = Path(source).is_file()
    except OSError:  # an inline JSON string may be too long to be a file name
        is_file = False
    data = yaml.safe_load(Path(source).read_text("utf-8") if is_file else source)  # YAML reads JSON too
    if isinstance(data, dict) and "faults" in data:
        data = data["faults"]
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError("expected a list of fault objects (or a mapping with a 'faults' list)")
    return _faults(data)


_LOOPS = ("auto", "asyncio", "uvloop")


def _loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `main` serves on: uvloop when asked, or for "auto" when it is installed (an optional
    speed-up, never a dependency); None is asyncio's default loop. The gateway works on both."""
    if choice not in _LOOPS:
        raise ValueError(f"loop must be one of {_LOOPS}, got {choice!r}")
    if choice == "asyncio":
        return None
    try:
        uvloop = importlib.import_module("uvloop")
    except Exception as exc:  # found but broken (built for another Python...): not usable either
        if choice == "uvloop":
            why = "is not installed" if isinstance(exc, ModuleNotFoundError) else \
                f"cannot be used ({type(exc).__name__}: {exc})"
            raise ValueError(f"--loop uvloop: uvloop {why} (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """"uvloop" or "asyncio": which implementation `loop` is (shown by GET /health)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


async def _serve_until_signalled(config: GatewayConfig) -> None:
    async with Gateway(config) as gateway:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C still ends asyncio.run
                loop.add_signal_handler(signum, stop.set)
        # Only now: whoever waits for this line may signal us at once.
        print(f"batcher gateway listening on {gateway.base_url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batcher.gateway", description="Serve batcher's simulated orq gateway."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="uniform extra latency in [0, jitter)")
    parser.add_argument(
        "--faults", metavar="FILE_OR_JSON", help="fault rules: a JSON/YAML file or inline JSON list"
    )
    parser.add_argument(
        "--api-key-env", metavar="NAME", help="require 'Bearer $NAME' (by default any key is accepted)"
    )
    parser.add_argument("--no-validate", action="store_true", help="skip the jsonschema check (faster)")
    parser.add_argument("--seed", type=int, default=0, help="seeds fault rates and jitter")
    parser.add_argument(
        "--loop", choices=_LOOPS, default="auto",
        help="event loop: auto picks uvloop when it is installed (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env: the environment variable {args.api_key_env} is not set")
    try:
        loop_factory = _loop_factory(args.loop)
        faults = _load_faults(args.faults) if args.faults else ()
        config = GatewayConfig(
            host=args.host,
            port=args.port,
            latency_s=args.latency_ms / 1000,
            jitter_s=args.jitter_ms / 1000,
            faults=faults,
            api_key=api_key,
            validate=not args.no_validate,
            seed=args.seed,
        )
    except (OSError, ValueError, TypeError, yaml.YAMLError) as exc:
        parser.error(str(exc))
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve_until_signalled(config))
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # the port is taken, the host does not resolve...
        print(f"batcher gateway: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
