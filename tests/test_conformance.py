"""Every body batcher can build validates against the official OpenAPI extract (an independent validator:
jsonschema over ../shared's spec as shipped in batcher/_openapi, not batcher's own pydantic models)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from batcher import SpecError, parse_spec
from batcher.openapi import load_openapi
from batcher.wire import OPENAI_FIELDS, BodyBuilder

_REQ = "#/paths/~1v2~1router~1completions/post/requestBody/content/application~1json/schema"


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    doc = dict(load_openapi())
    doc["$ref"] = _REQ
    return Draft202012Validator(doc)


codes = st.lists(st.integers(min_value=100, max_value=599), min_size=1, max_size=6)
models = st.sampled_from(["openai/gpt-4o-mini", "openai/gpt-4o", "anthropic/claude-3-5-haiku"])
retry = st.fixed_dictionaries({}, optional={"count": st.integers(1, 5), "on_codes": codes})
cache = st.fixed_dictionaries({"type": st.just("exact_match")}, optional={"ttl": st.integers(1, 259200)})
lb = st.fixed_dictionaries({
    "type": st.just("weight_based"),
    "models": st.lists(st.fixed_dictionaries({"model": models},
                                             optional={"weight": st.floats(0.001, 1, allow_nan=False)}),
                       min_size=1, max_size=3),
})
timeout = st.fixed_dictionaries({"call_timeout": st.integers(1, 120_000)})
fallbacks = st.lists(st.fixed_dictionaries({"model": models}), max_size=3)
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
identity = st.fixed_dictionaries({"id": text}, optional={
    "display_name": text, "email": st.just("jane@example.com"), "tags": st.lists(text, max_size=3),
    "metadata": st.lists(st.dictionaries(st.text(max_size=5), st.integers(), max_size=2), max_size=2),
    "logo_url": st.just("https://example.com/x.png")})
kb = st.fixed_dictionaries({"knowledge_id": text}, optional={
    "top_k": st.integers(1, 100), "threshold": st.floats(0, 1, allow_nan=False),
    "search_type": st.sampled_from(["vector_search", "keyword_search", "hybrid_search"]),
    "filter_by": st.sampled_from([{"lang": {"eq": "en"}}, {"and": [{"year": {"gte": 2020}}, {"tag": {"in": ["a"]}}]}]),
    "search_options": st.fixed_dictionaries({}, optional={"include_scores": st.booleans()}),
    "rerank_config": st.fixed_dictionaries({"model": st.just("cohere/rerank-v3")}, optional={"top_k": st.integers(1, 100)}),
    "agentic_rag_config": st.fixed_dictionaries({"model": models}),
    "query": text})
orq = st.fixed_dictionaries({}, optional={
    "name": text, "retry": retry, "fallbacks": fallbacks, "cache": cache, "timeout": timeout,
    "prompt": st.fixed_dictionaries({"id": text, "version": st.just("latest")}),
    "identity": identity, "contact": identity,
    "thread": st.fixed_dictionaries({"id": text}, optional={"tags": st.lists(text, max_size=3)}),
    "inputs": st.one_of(st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(st.integers(), text), max_size=3),
                        st.lists(st.fixed_dictionaries({"key": text}, optional={"value": text, "is_pii": st.booleans()}),
                                 max_size=2)),
    "knowledge_bases": st.lists(kb, max_size=2),
    "load_balancer": lb})
sampling = {
    "echo": st.booleans(), "frequency_penalty": st.floats(-2, 2, allow_nan=False),
    "presence_penalty": st.floats(-2, 2, allow_nan=False), "max_tokens": st.integers(1, 4096),
    "seed": st.integers(-(2**31), 2**31), "temperature": st.floats(0, 2, allow_nan=False),
    "top_p": st.floats(0, 1, allow_nan=False), "n": st.integers(1, 8), "user": text, "stream": st.booleans(),
    "stop": st.one_of(text, st.lists(text, max_size=4)),
    "thinking": st.sampled_from([{"type": "disabled"}, {"type": "adaptive"},
                                 {"type": "enabled", "budget_tokens": 1024, "thinking_level": "low"}]),
    "plugins": st.sampled_from([[{"id": "pii_redaction"}],
                                [{"id": "pii_redaction", "language": "en", "entities": ["PERSON", "EMAIL_ADDRESS"],
                                  "on_failure": "passthrough", "threshold": 0.5}],
                                [{"id": "pii_redaction", "language": "nl", "entities": ["BSN"]}]]),
}
routing = {"name": text, "retry": retry, "fallbacks": fallbacks, "cache": cache, "timeout": timeout,
           "load_balancer": lb, "fallback_on_codes": st.lists(st.integers(400, 599), min_size=1, max_size=20)}


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    req: dict[str, Any] = {"model": draw(models)}
    req.update(draw(st.fixed_dictionaries({}, optional=sampling)))
    top = draw(st.fixed_dictionaries({}, optional=routing))
    block = draw(orq)
    for k in list(top):
        block.pop(k, None)  # a routing field is written once: top level or inside orq
    req.update(top)
    if block:
        req["orq"] = block
    if "thinking" in req and req["thinking"]["type"] == "enabled":
        req["max_tokens"] = max(req.get("max_tokens", 0), 2048)
    return req


def _spec(request: dict[str, Any], api: str = "orq"):
    return parse_spec({"input": {"path": "in.jsonl", "prompt": "{{q}}"}, "output": {"path": "o.parquet"},
                       "endpoint": {"api": api}, "request": request})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), text, st.dictionaries(st.text(min_size=1, max_size=5), text, max_size=2))
def test_every_orq_body_validates_against_the_official_spec(validator, request, prompt, inputs) -> None:
    spec = _spec(request)
    builder = BodyBuilder(spec.request, "orq")
    body = builder.body(prompt, request["model"], inputs if not isinstance(request.get("orq", {}).get("inputs"), list) else None)
    errors = sorted(validator.iter_errors(body), key=str)
    assert not errors, errors[0].message
    # as written: every field the user set reaches the wire unchanged, and max_tokens is always there
    for k, v in request.items():
        if k != "orq":
            assert body[k] == v or (isinstance(v, float) and body[k] == pytest.approx(v)), k
    assert "max_tokens" in body and body["prompt"] == prompt


@settings(max_examples=100, deadline=None)
@given(requests())
def test_openai_bodies_carry_only_openai_fields(request) -> None:
    request.pop("orq", None)
    for k in ("thinking", "plugins", "name"):
        request.pop(k, None)
    body = BodyBuilder(_spec(request, "openai").request, "openai").body("hi", "m")
    assert set(body) <= set(OPENAI_FIELDS) | {"stream_options"}
    assert body["max_tokens"] == request.get("max_tokens", 256)


@pytest.mark.parametrize(
    ("request_patch", "field", "allowed"),
    [
        ({"retry": {"count": 9}}, "request.retry.count", "must be from 1 to 5 (got 9)"),
        ({"retry": {"count": 0}}, "request.retry.count", "must be from 1 to 5 (got 0)"),
        ({"retry": {"on_codes": []}}, "request.retry.on_codes", "at least 1"),
        ({"retry": {"on_codes": [99]}}, "request.retry.on_codes[0]", "must be from 100 to 599 (got 99)"),
        ({"cache": {"type": "exact_match", "ttl": 259201}}, "request.cache.ttl", "259200"),
        ({"cache": {"type": "semantic"}}, "request.cache.type", "exact_match"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "request.stop", "at most 4"),
        ({"temperature": 2.5}, "request.temperature", "must be from 0 to 2 (got 2.5)"),
        ({"top_p": 1.5}, "request.top_p", "must be from 0 to 1 (got 1.5)"),
        ({"frequency_penalty": -3}, "request.frequency_penalty", "-2"),
        ({"load_balancer": {"type": "weight_based", "models": [{"model": "a", "weight": 0}]}},
         "request.load_balancer.models[0].weight", "0.001"),
        ({"timeout": {"call_timeout": 0}}, "request.timeout.call_timeout", "greater than or equal to 1"),
        ({"orq": {"knowledge_bases": [{"knowledge_id": "k", "top_k": 101}]}}, "request.orq.knowledge_bases[0].top_k", "100"),
        ({"orq": {"prompt": {"id": "p", "version": "v2"}}}, "request.orq.prompt.version", "latest"),
        ({"orq": {"thread": {"tags": ["x"]}}}, "request.orq.thread.id", "required"),
        ({"fallback_on_codes": [200]}, "request.fallback_on_codes[0]", "must be from 400 to 599 (got 200)"),
        ({"fallback_on_codes": [429, 600]}, "request.fallback_on_codes[1]", "must be from 400 to 599 (got 600)"),
        ({"timeout": {"call_timeout": float("inf")}}, "request.timeout.call_timeout", "finite number"),
        ({"temperature": float("nan")}, "request.temperature", "finite number"),
        ({"thinking": {"type": "enabled", "budget_tokens": 512}}, "request.thinking.enabled.budget_tokens", "1024"),
        ({"plugins": [{"id": "pii_redaction", "language": "nl", "entities": ["US_SSN_X"]}]}, "request.plugins[0]", "unknown entities"),
        ({"temprature": 1}, "request.temprature", "unknown key"),
        ({"retry": {"count": 2}, "orq": {"retry": {"count": 3}}}, "request", "both"),
    ],
)
def test_bad_values_name_the_field_value_and_range(request_patch, field, allowed) -> None:
    with pytest.raises(SpecError) as err:
        _spec({"model": "m", **request_patch})
    msg = str(err.value)
    assert field in msg and allowed in msg, msg
