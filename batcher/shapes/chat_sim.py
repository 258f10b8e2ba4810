"""The simulated gateway's chat handler, as pure functions (no sockets): request in, response or chunks out.

    check_request(body, path)                 # ChatRequestError (status, param, message, code) for a bad body
    completion = chat_completion(body)        # a deterministic chat.completion dict
    events = sse_chunks(completion, include_usage=True)   # chat.completion.chunk dicts, then "[DONE]"
    broken = break_answer(completion, "schema")           # a fault: non-conforming JSON in the content

Answers are a pure function of (model, messages, seed, temperature, choice index), so reruns, caches and tests see
the same text. With a json_schema response format the content is JSON generated from the schema (enums picked by
hash, numbers in range, arrays of strings, nested objects): it conforms, and labels vary across rows. With tools
(and a tool_choice other than "none") the answer is a call of the chosen (or first) function whose arguments
conform to its parameters. A user message containing "[refuse]" gets a refusal. Every response and chunk
validates against the official chat extract (tests/test_chat_sim.py); request bodies are validated against it
too, plus the ranges it documents without enforcing, with the 400 orq gives.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from typing import Any

from jsonschema import Draft202012Validator

from ..openapi import load_openapi, request_error
from .chat import PATHS
from .chat_spec import OPENAI_CHAT_FIELDS

__all__ = [
    "REFUSE_MARKER",
    "ChatRequestError",
    "break_answer",
    "chat_completion",
    "check_request",
    "load_chat_openapi",
    "response_validator",
    "sample",
    "sse_chunks",
    "sse_lines",
    "stream_chunk_validator",
]

REFUSE_MARKER = "[refuse]"
REFUSAL = "I'm sorry, but I can't help with that request."
_CHAT = "#/paths/~1v2~1router~1chat~1completions/post"
_REQUEST_REF = _CHAT + "/requestBody/content/application~1json/schema"
_RESPONSE_REF = _CHAT + "/responses/200/content/application~1json/schema"
_CHUNK_REF = _CHAT + "/responses/200/content/text~1event-stream/schema/properties/data"
_MAX_N = 128
_OPENAI_EXTRA = frozenset({"user", "logit_bias", "store", "service_tier"})  # OpenAI's own fields beyond the contract

# 64 plain words: no sentiment cue in them, so generated text never reads as a label.
_WORDS = (
    "the a of and to in is it that for on with as at by from this be are or an not but have they we you all "
    "more about which when there can time up out so some what other into only over also after year first two "
    "most people way may just than then like these could would make very work well even back"
).split()
_LABEL_CUES = {
    "positive": frozenset("great love loved excellent amazing awesome perfect fantastic wonderful happy best good".split()),
    "negative": frozenset("terrible broken refund awful worst bad disappointed poor hate waste useless returned".split()),
}
_PUNCT = str.maketrans({c: " " for c in '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~'})


def load_chat_openapi() -> dict[str, Any]:
    """The chat extract (openapi.load_openapi("chat"): one loader for both shapes)."""
    return load_openapi("chat")


def _validator(ref: str) -> Draft202012Validator:
    # OpenAPI 3.1 schemas are JSON Schema 2020-12; a root $ref keeps `#/components/...` refs resolvable.
    return Draft202012Validator({**load_chat_openapi(), "$ref": ref})


@functools.cache
def request_validator() -> Draft202012Validator:
    return _validator(_REQUEST_REF)


@functools.cache
def response_validator() -> Draft202012Validator:
    return _validator(_RESPONSE_REF)


@functools.cache
def stream_chunk_validator() -> Draft202012Validator:
    return _validator(_CHUNK_REF)


# --------------------------------------------------------------------------------------------------- requests


class ChatRequestError(Exception):
    """A 4xx answer in the orq error shape, naming the offending field in `param`."""

    def __init__(self, param: str | None, message: str, code: str = "invalid_value", status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code
        self.status = status

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error"
        return {"error": {"code": self.code, "message": self.message, "param": self.param, "type": kind}}


def _range(body: Mapping[str, Any], name: str, lo: float, hi: float) -> None:
    v = body.get(name)
    if v is not None and not (isinstance(v, int | float) and not isinstance(v, bool) and lo <= v <= hi):
        raise ChatRequestError(name, f"{name} must be between {lo:g} and {hi:g}, got {v!r}")


def check_request(body: Any, path: str = PATHS["orq"], validate: bool = True) -> None:
    """Raise ChatRequestError for a body orq (or a strict OpenAI-style server, by `path`) would refuse."""
    if not isinstance(body, dict):
        raise ChatRequestError(None, "the request body must be a JSON object", "invalid_json")
    if path == PATHS["openai"]:
        unknown = [k for k in body if k not in OPENAI_CHAT_FIELDS and k not in _OPENAI_EXTRA]
        if unknown:
            raise ChatRequestError(unknown[0], f"Unrecognized request argument supplied: {unknown[0]}",
                                   "unknown_parameter")
    if validate:
        found = request_error(request_validator(), body)
        if found is not None:
            raise ChatRequestError(*found)
    for name in ("model", "messages"):
        if name not in body:
            raise ChatRequestError(name, f"{name} is required", "missing_required_parameter")
    if not isinstance(body["messages"], list) or not body["messages"]:
        raise ChatRequestError("messages", "messages must be a non-empty array")
    # Ranges the extract documents but does not enforce, and the cross-field rules the providers apply.
    _range(body, "frequency_penalty", -2, 2)
    _range(body, "presence_penalty", -2, 2)
    n = body.get("n")
    if isinstance(n, int) and n > _MAX_N:
        raise ChatRequestError("n", f"n must be at most {_MAX_N}, got {n}")
    if body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise ChatRequestError("top_logprobs", "top_logprobs needs logprobs: true")
    if body.get("stream_options") is not None and not body.get("stream"):
        raise ChatRequestError("stream_options", "stream_options is only allowed when stream is true")
    choice = body.get("tool_choice")
    if choice not in (None, "none") and not body.get("tools"):
        raise ChatRequestError("tool_choice", "tool_choice is only allowed when tools are specified")
    if isinstance(choice, dict):
        names = [t.get("function", {}).get("name") for t in body.get("tools") or ()]
        if choice.get("function", {}).get("name") not in names:
            raise ChatRequestError("tool_choice", "tool_choice names a function that is not among tools")
    rf = body.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        schema = rf.get("json_schema", {}).get("schema")
        if schema is not None and not isinstance(schema, dict):
            raise ChatRequestError("response_format.json_schema.schema", "the schema must be a JSON object")


# ------------------------------------------------------------------------------------------------- generation


class _Dice:
    """Deterministic bytes for one answer: a hash chain seeded by the request's key."""

    def __init__(self, key: str) -> None:
        # Hashed once: the key holds the whole messages' text, and each draw would hash all of it again (a
        # 50 KB document cost the simulator ~5 ms a call, most of a chat run's time on 2 cores).
        self._seed = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        self._counter = 0

    def draw(self, what: str) -> int:
        self._counter += 1
        h = hashlib.blake2b(self._seed + b"\x1f" + what.encode() + b"%d" % self._counter, digest_size=8)
        return int.from_bytes(h.digest(), "big")

    def words(self, what: str, lo: int, hi: int) -> str:
        n = lo + self.draw(what) % (hi - lo + 1)
        return " ".join(_WORDS[self.draw(what) % len(_WORDS)] for _ in range(n))


def _label(text: str, enum: list[Any]) -> Any | None:
    """The enum value the cue words of `text` point at (for a sentiment-like enum), else None."""
    words = set(text.lower().translate(_PUNCT).split())
    scores = {label: len(words & cues) for label, cues in _LABEL_CUES.items() if label in enum}
    if not scores or (len(set(scores.values())) == 1 and len(scores) > 1) or max(scores.values()) == 0:
        return None
    return max(scores, key=lambda k: scores[k])


def _resolve(schema: Any, root: Mapping[str, Any]) -> Any:
    while isinstance(schema, Mapping) and isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#/"):
        node: Any = root
        for part in schema["$ref"][2:].split("/"):
            node = node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, Mapping) else None
        if node is None:
            return {}
        schema = node
    return schema


def sample(schema: Any, dice: _Dice, root: Mapping[str, Any] | None = None, where: str = "", text: str = "",
           depth: int = 0) -> Any:
    """A value that conforms to `schema` (the structured-output subset of JSON Schema), drawn from `dice`.
    Not honoured: `pattern` and `format` on strings, `uniqueItems`, `not`; `oneOf` takes its first branch."""
    root = root if root is not None else (schema if isinstance(schema, Mapping) else {})
    schema = _resolve(schema, root)
    if not isinstance(schema, Mapping) or not schema:
        return dice.words(where, 1, 3)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        enum = schema["enum"]
        hinted = _label(text, enum)
        return hinted if hinted is not None else enum[dice.draw(where) % len(enum)]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            branches = [b for b in schema[key] if _resolve(b, root).get("type") != "null"] or schema[key]
            return sample(branches[0], dice, root, where, text, depth + 1)
    if isinstance(schema.get("allOf"), list) and schema["allOf"]:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(_resolve(part, root))
        return sample(merged, dice, root, where, text, depth + 1)
    t = schema.get("type")
    types = [t] if isinstance(t, str) else [x for x in t if x != "null"] if isinstance(t, list) else []
    kind = types[0] if types else ("object" if "properties" in schema else "array" if "items" in schema else "string")
    if kind == "object":
        props = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        out: dict[str, Any] = {}
        for name, sub in props.items():
            # Optional properties: present two times in three, so absent ones (null columns) occur too.
            if name in required or depth > 3 or dice.draw(f"{where}/{name}?") % 3:
                if name in required or depth <= 3:
                    out[name] = sample(sub, dice, root, f"{where}/{name}", text, depth + 1)
        return out
    if kind == "array":
        lo = int(schema.get("minItems", 1))
        hi = int(schema.get("maxItems", max(lo, 3)))
        n = lo + dice.draw(where + "#") % (hi - lo + 1) if hi >= lo else lo
        return [sample(schema.get("items", {}), dice, root, f"{where}/{i}", text, depth + 1) for i in range(n)]
    if kind in ("integer", "number"):
        return _number(schema, dice, where, kind == "integer")
    if kind == "boolean":
        return dice.draw(where) % 2 == 0
    if kind == "null":
        return None
    lo = int(schema.get("minLength", 0))
    hi = int(schema.get("maxLength", max(lo, 40)))
    s = dice.words(where, 1, 4)
    while len(s) < lo:
        s += " " + dice.words(where, 1, 2)
    return s[:hi]


def _number(schema: Mapping[str, Any], dice: _Dice, where: str, integer: bool) -> int | float:
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    if lo is None and hi is None:
        lo, hi = (0, 100) if integer else (0.0, 1.0)
    elif lo is None:
        lo = hi - 100
    elif hi is None:
        hi = lo + 100
    if integer:
        lo_i = math.ceil(lo) + (1 if "exclusiveMinimum" in schema and math.ceil(lo) == lo else 0)
        hi_i = math.floor(hi) - (1 if "exclusiveMaximum" in schema and math.floor(hi) == hi else 0)
        return int(lo_i + dice.draw(where) % max(1, hi_i - lo_i + 1))
    frac = (dice.draw(where) % 9999 + 1) / 10000  # strictly inside (0, 1): exclusive bounds hold
    return round(lo + (hi - lo) * frac, 4) if hi > lo else float(lo)


def _message_text(messages: Any, role: str | None = "user") -> str:
    parts: list[str] = []
    for m in messages if isinstance(messages, list) else ():
        if not isinstance(m, dict) or (role is not None and m.get("role") != role):
            continue
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts += [p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(parts)


def _tokens(text: str) -> int:
    return max(1, (len(text.split()) * 4 + 2) // 3)  # ~4/3 tokens a word, rounded up


def _tool_call(body: Mapping[str, Any], dice: _Dice, index: int, text: str) -> dict[str, Any] | None:
    tools = [t for t in body.get("tools") or () if isinstance(t, dict)]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    fn = tools[0]["function"]
    if isinstance(choice, dict):
        fn = next(t["function"] for t in tools if t["function"].get("name") == choice["function"]["name"])
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    args = sample(params, dice, params, "args", text)
    return {
        "id": f"call_{dice.draw('call'):016x}"[:29],
        "type": "function",
        "function": {"name": fn["name"], "arguments": json.dumps(args, separators=(",", ":"))},
    }


def _content(body: Mapping[str, Any], dice: _Dice, text: str) -> str:
    rf = body.get("response_format") or {}
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "json_schema":
        schema = rf["json_schema"].get("schema") or {"type": "object", "properties": {}}
        return json.dumps(sample(schema, dice, schema, "", text), ensure_ascii=False)
    if kind == "json_object":
        return json.dumps({"answer": dice.words("answer", 3, 12)})
    label = _label(text, ["positive", "negative", "neutral"]) if "positive" in text.lower() else None
    return label or dice.words("text", 5, 60)


def _cut(content: str, body: Mapping[str, Any], limit: int | None) -> tuple[str, str, int]:
    """(content, finish_reason, tokens): stop sequences applied, then the token bound."""
    finish = "stop"
    stops = body.get("stop")
    for s in [stops] if isinstance(stops, str) else stops or ():
        i = content.find(s) if s else -1
        if i >= 0:
            content = content[:i]
    words = content.split(" ")
    if limit is not None and len(words) > limit:
        content, finish = " ".join(words[:limit]), "length"
    return content, finish, len(content.split())


def _logprobs(content: str, dice: _Dice, top: int) -> dict[str, Any]:
    entries = []
    for i, token in enumerate(content.split(" ")[:64]):
        alts = [{"token": f"{token}{j}", "logprob": -1.0 - j, "bytes": None} for j in range(top)]
        lp = -(dice.draw(f"lp{i}") % 1000) / 1000
        entries.append({"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": alts})
    return {"content": entries, "refusal": None}


def chat_completion(body: Mapping[str, Any], *, created: int = 1_767_225_600, completion_id: str | None = None,
                    reasoning: bool | None = None) -> dict[str, Any]:
    """The deterministic chat.completion for a (checked) request body."""
    messages = body["messages"]
    text = _message_text(messages)
    everything = _message_text(messages, None)
    key = json.dumps([body.get("model"), messages, body.get("seed"), body.get("temperature")],
                     sort_keys=True, default=str)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    raw_thinking = body.get("thinking")
    thinking: dict[str, Any] = raw_thinking if isinstance(raw_thinking, dict) else {}
    think = reasoning if reasoning is not None else thinking.get("type") == "enabled" or \
        body.get("reasoning_effort") not in (None, "none")
    choices, completion_tokens, reasoning_tokens = [], 0, 0
    for index in range(int(body.get("n") or 1)):
        dice = _Dice(f"{key}\x1f{index}")
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if REFUSE_MARKER in text:
            message["refusal"] = REFUSAL
            finish, tokens = "stop", _tokens(REFUSAL)
        elif (call := _tool_call(body, dice, index, text)) is not None:
            message["tool_calls"] = [call]
            finish, tokens = "tool_calls", _tokens(call["function"]["arguments"].replace(",", " "))
        else:
            content, finish, tokens = _cut(_content(body, dice, text), body, limit)
            message["content"] = content
        if think:
            message["reasoning"] = "Considering the request: " + dice.words("why", 4, 12) + "."
            reasoning_tokens += _tokens(message["reasoning"])
        choice: dict[str, Any] = {"index": index, "message": message, "finish_reason": finish}
        if body.get("logprobs") and message["content"] is not None:
            choice["logprobs"] = _logprobs(message["content"], dice, int(body.get("top_logprobs") or 0))
        choices.append(choice)
        completion_tokens += tokens
    completion_tokens += reasoning_tokens
    prompt_tokens = _tokens(everything) + 3 * len(messages)  # a few tokens of framing per message
    digest = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
    return {
        "id": completion_id or f"chatcmpl-{digest}",
        "object": "chat.completion",
        "created": created,
        "model": body["model"],
        "system_fingerprint": "fp_batcher_sim",
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, reasoning_tokens),
    }


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
    """A simulated answer's usage block (nothing cached); the completions simulator in gateway.py uses it too."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def break_answer(completion: dict[str, Any], how: str = "schema") -> dict[str, Any]:
    """A fault: the same completion with content that is not JSON (`how="not_json"`) or JSON that breaks any
    useful schema (`how="schema"`: an object whose values are all of the wrong type)."""
    out: dict[str, Any] = json.loads(json.dumps(completion))
    for choice in out["choices"]:
        message = choice["message"]
        if how == "not_json":
            message["content"] = "Sure! Here is the JSON you asked for: {sentiment: positive"
        else:
            try:
                value = json.loads(message.get("content") or "{}")
            except ValueError:
                value = {}
            keys = list(value) if isinstance(value, dict) and value else ["answer"]
            message["content"] = json.dumps({k: [{"unexpected": True}] for k in keys})
        message.pop("tool_calls", None)
        choice["finish_reason"] = "stop"
    return out


# ---------------------------------------------------------------------------------------------------- streams


def pieces(text: str) -> list[str]:
    """About three pieces cut at spaces, which concatenate back to `text` (none for empty text); the
    completions stream in gateway.py cuts its texts the same way."""
    step = max(1, len(text) // 3)
    out, start = [], 0
    while start < len(text):
        end = text.find(" ", start + step)
        end = len(text) if end < 0 else end
        out.append(text[start:end])
        start = end
    return out


def sse_chunks(completion: Mapping[str, Any], include_usage: bool = False) -> Iterator[dict[str, Any]]:
    """The completion as chat.completion.chunk events, as OpenAI streams them: a role delta, content (or
    refusal, or tool-call fragments: the id and name first, then the arguments in pieces), a last chunk with the
    finish_reason per choice, and with `include_usage` a final chunk with no choices and the usage (earlier
    chunks then carry `usage: null`)."""
    head = {k: completion[k] for k in ("id", "object", "created", "model", "system_fingerprint")}
    head["object"] = "chat.completion.chunk"
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": index, "delta": delta, "finish_reason": reason}], **extra}

    for choice in completion["choices"]:
        i, message = choice["index"], choice["message"]
        yield chunk(i, {"role": "assistant", "content": ""})
        if message.get("reasoning"):
            for piece in pieces(message["reasoning"]):
                yield chunk(i, {"reasoning": piece})
        if message.get("refusal"):
            for piece in pieces(message["refusal"]):
                yield chunk(i, {"refusal": piece})
        for t, call in enumerate(message.get("tool_calls") or ()):
            fn = call["function"]
            yield chunk(i, {"tool_calls": [{"index": t, "id": call["id"], "type": "function",
                                            "function": {"name": fn["name"], "arguments": ""}}]})
            for piece in pieces(fn["arguments"]):
                yield chunk(i, {"tool_calls": [{"index": t, "function": {"arguments": piece}}]})
        for piece in pieces(message.get("content") or ""):
            yield chunk(i, {"content": piece})
        yield chunk(i, {}, choice["finish_reason"])
    if include_usage:
        yield {**head, "choices": [], "usage": completion["usage"]}


def sse_lines(completion: Mapping[str, Any], include_usage: bool = False) -> list[bytes]:
    """The SSE event lines of the stream, `data: [DONE]` last (the gateway adds the HTTP chunk framing)."""
    dumps = json.dumps
    lines = [b"data: " + dumps(e, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
             for e in sse_chunks(completion, include_usage)]
    return [*lines, b"data: [DONE]\n\n"]
