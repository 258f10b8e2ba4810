"""The simulated gateway over real HTTP on 127.0.0.1 (port 0), through httpx, on asyncio's default event loop
and on uvloop (every test that starts a gateway runs on both; the uvloop leg is skipped when it is missing).

Its answers are checked against the contract's response schemas with jsonschema (the extract shipped in
batcher/_openapi), independently of the gateway's own code: every JSON body and every SSE event."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from batcher.gateway import Fault, Gateway, GatewayConfig, main, serve_in_thread
from batcher.openapi import load_openapi
from batcher.wire import StreamAssembler, parse_completion

ORQ = "/v2/router/completions"
V1 = "/v1/completions"
BODY: dict[str, Any] = {
    "model": "openai/gpt-4o",
    "prompt": "Write one line about the sea.",
    "max_tokens": 200,
}
REPO = Path(__file__).resolve().parents[1]


HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None
LOOPS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(
        "uvloop", id="uvloop", marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop is not installed")
    ),
]


@pytest.fixture(params=LOOPS)
def loop(request: pytest.FixtureRequest) -> str:
    """The event loop the gateway under test runs on: "asyncio" (the default loop) or "uvloop"."""
    return str(request.param)


@pytest.fixture
def anyio_backend(loop: str) -> tuple[str, dict[str, Any]]:
    return "asyncio", {"use_uvloop": loop == "uvloop"}  # aiolimiter (elsewhere) needs asyncio: uvloop is asyncio


def loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if loop == "asyncio":
        return None
    import uvloop

    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


@asynccontextmanager
async def serving(**config: Any) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    async with (
        Gateway(GatewayConfig(**config)) as gw,
        httpx.AsyncClient(base_url=gw.base_url, timeout=5, trust_env=False) as client,
    ):
        yield gw, client


@functools.cache
def response_validator(content_type: str) -> Draft202012Validator:
    pointer = "#/paths/~1v2~1router~1completions/post/responses/200/content/"
    pointer += content_type.replace("/", "~1") + "/schema"
    return Draft202012Validator({**load_openapi(), "$ref": pointer})


# The extract specifies no error responses; this is the body orq answers errors with, as the official SDK
# reads it (orq_ai_sdk.models.APIErrorResponseData: code and param nullable, message and type required).
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "param", "type"],
            "properties": {
                "code": {"type": ["string", "null"]},
                "message": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "type": {"type": "string"},
            },
        }
    },
}


def check_json(data: Any) -> None:
    """A 200 JSON body against the contract's application/json response schema."""
    response_validator("application/json").validate(data)


def check_stream(raw: str) -> list[dict[str, Any]]:
    """Every SSE event of a stream against the contract's text/event-stream schema (which describes an event as
    `{data: <chunk>}`); the events must end with `[DONE]`. Returns the chunks."""
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks
    for chunk in chunks:
        response_validator("text/event-stream").validate({"data": chunk})
    return chunks


def check_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    data = r.json()
    Draft202012Validator(ERROR_SCHEMA).validate(data)
    error: dict[str, Any] = data["error"]
    return error


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n\n") if line.startswith("data: ")]


# ------------------------------------------------------------------------------------------------ answers


@pytest.mark.anyio
@pytest.mark.parametrize("path", [ORQ, V1])
async def test_both_paths_answer_with_a_schema_valid_completion(path: str) -> None:
    async with serving() as (_, client):
        r = await client.post(path, json=BODY, headers={"Authorization": "Bearer anything"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    data = r.json()
    response_validator("application/json").validate(data)
    assert data["id"].startswith("cmpl-")
    assert data["object"] == "text_completion"
    assert isinstance(data["created"], int)
    assert data["model"] == BODY["model"]
    [choice] = data["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert 5 <= len(choice["text"].split()) <= 60
    usage = data["usage"]
    assert usage["prompt_tokens"] == 8  # 6 words * 4/3
    assert usage["completion_tokens"] == len(choice["text"].split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}


@pytest.mark.anyio
async def test_the_same_request_gives_the_same_text_and_other_inputs_another() -> None:
    async with serving() as (_, client):

        async def text(**change: Any) -> str:
            r = await client.post(ORQ, json={**BODY, "seed": 7, "temperature": 0.5, **change})
            return str(r.json()["choices"][0]["text"])

        first = await text()
        assert await text() == first
        assert await text(stream=False, user="u") == first  # fields that do not shape the output
        assert await text(seed=8) != first
        assert await text(temperature=0.7) != first
        assert await text(model="other/model") != first
        assert await text(prompt="Another prompt.") != first
    async with serving() as (_, client):  # and across gateways (no process-randomized hash)
        r = await client.post(ORQ, json={**BODY, "seed": 7, "temperature": 0.5})
        assert r.json()["choices"][0]["text"] == first


@pytest.mark.anyio
async def test_max_tokens_truncates_with_finish_reason_length() -> None:
    async with serving() as (_, client):
        full = (await client.post(ORQ, json=BODY)).json()["choices"][0]["text"]
        data = (await client.post(ORQ, json={**BODY, "max_tokens": 3})).json()
    assert data["choices"][0] == {"index": 0, "text": " ".join(full.split()[:3]), "finish_reason": "length"}
    assert data["usage"]["completion_tokens"] == 3


@pytest.mark.anyio
async def test_stop_cuts_before_the_first_stop_sequence() -> None:
    async with serving() as (_, client):
        words = (await client.post(ORQ, json=BODY)).json()["choices"][0]["text"].split()
        stop = [f" {words[3]} ", "never-there"]
        data = (await client.post(ORQ, json={**BODY, "stop": stop, "max_tokens": 200})).json()
    text = data["choices"][0]["text"]
    assert data["choices"][0]["finish_reason"] == "stop"
    assert stop[0] not in text
    assert text == " ".join(words)[: " ".join(words).find(stop[0])]
    assert data["usage"]["completion_tokens"] == len(text.split())


@pytest.mark.anyio
async def test_echo_prepends_the_prompt() -> None:
    async with serving() as (_, client):
        plain = (await client.post(ORQ, json=BODY)).json()
        echoed = (await client.post(ORQ, json={**BODY, "echo": True})).json()
    assert echoed["choices"][0]["text"] == f"{BODY['prompt']} {plain['choices'][0]['text']}"
    assert echoed["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]


@pytest.mark.anyio
async def test_n_gives_distinct_indexed_choices_and_sums_their_tokens() -> None:
    async with serving() as (_, client):
        data = (await client.post(V1, json={**BODY, "n": 3})).json()
    choices = data["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert len({c["text"] for c in choices}) == 3
    assert data["usage"]["completion_tokens"] == sum(len(c["text"].split()) for c in choices)


@pytest.mark.anyio
async def test_sentiment_prompts_get_exactly_one_label() -> None:
    ask = "Is this review positive, negative or neutral? Answer with one word.\n\nReview: "
    async with serving() as (_, client):

        async def label(review: str) -> str:
            r = await client.post(ORQ, json={**BODY, "prompt": ask + review, "max_tokens": 5})
            return str(r.json()["choices"][0]["text"])

        assert await label("I love it, excellent sound!") == "positive"
        assert await label("Arrived broken. I want a refund.") == "negative"
        assert await label("It is a lamp. It has a switch.") in {"positive", "negative", "neutral"}


@pytest.mark.anyio
async def test_thinking_reports_reasoning_tokens() -> None:
    thinking = {"type": "enabled", "budget_tokens": 2048}
    async with serving() as (_, client):
        data = (await client.post(ORQ, json={**BODY, "thinking": thinking})).json()
    usage = data["usage"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 64}
    assert usage["completion_tokens"] == len(data["choices"][0]["text"].split()) + 64


@pytest.mark.anyio
async def test_stream_sends_sse_chunks_then_done_with_usage_on_the_last() -> None:
    body = {**BODY, "n": 2, "max_tokens": 9}
    async with serving() as (gw, client):
        plain = (await client.post(ORQ, json=body)).json()
        async with client.stream("POST", ORQ, json={**body, "stream": True}) as r:
            raw = (await r.aread()).decode()
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["transfer-encoding"] == "chunked"
    chunks = check_stream(raw)
    assert len(chunks) > 2
    assert all("usage" not in c for c in chunks[:-1])
    assert chunks[-1]["usage"] == plain["usage"]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert len(mine) > 1
        assert "".join(c["text"] for c in mine) == plain["choices"][index]["text"]
        # orq's contract wants a finish_reason in every chunk (never OpenAI's null): the choice's own, throughout
        assert {c["finish_reason"] for c in mine} == {plain["choices"][index]["finish_reason"]}
    assert gw.stats.billed == 2


CASES = {
    "plain": {},
    "n": {"n": 3},
    "echo": {"echo": True},
    "stop": {"stop": [" the ", " a "]},
    "length": {"max_tokens": 2},
    "thinking": {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048},
    "empty": {"prompt": "Is it positive, negative or neutral? I love it.", "stop": "pos"},  # "positive" cut at 0
}


@pytest.mark.anyio
@pytest.mark.parametrize("path", [ORQ, V1])
@pytest.mark.parametrize("change", list(CASES.values()), ids=list(CASES))
async def test_every_answer_validates_against_the_contract(path: str, change: dict[str, Any]) -> None:
    body = {**BODY, **change}
    if path == V1:
        body.pop("thinking", None)  # not an OpenAI field: a 400 there
    async with serving() as (_, client):
        r = await client.post(path, json=body)
        assert r.status_code == 200
        plain = r.json()
        check_json(plain)
        async with client.stream("POST", path, json={**body, "stream": True}) as r:
            assert r.status_code == 200
            chunks = check_stream((await r.aread()).decode())
    # the stream says what the plain answer says
    assert (plain["choices"][0]["text"] == "") == (change is CASES["empty"])
    assert chunks[-1]["usage"] == plain["usage"]
    for choice in plain["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]


@pytest.mark.anyio
@pytest.mark.parametrize("max_tokens", [200, 4])  # finish_reason "stop", then "length", in every chunk
async def test_batchers_stream_assembler_reads_the_same_completion_as_the_plain_answer(max_tokens: int) -> None:
    """Every chunk now carries its choice's finish_reason; batcher's client must still assemble the plain answer."""
    body = {**BODY, "n": 2, "max_tokens": max_tokens}
    async with serving() as (_, client):
        plain = parse_completion((await client.post(ORQ, json=body)).content)
        async with client.stream("POST", ORQ, json={**body, "stream": True}) as r:
            assembler = StreamAssembler()
            async for line in r.aiter_lines():
                assembler.feed_line(line)
    streamed = assembler.result()
    assert {c["finish_reason"] for c in plain.choices} == {"stop" if max_tokens == 200 else "length"}
    assert streamed.choices == plain.choices
    assert (streamed.text, streamed.finish_reason) == (plain.text, plain.finish_reason)
    assert streamed.completion_tokens == plain.completion_tokens


@pytest.mark.anyio
async def test_error_answers_have_the_orq_error_shape() -> None:
    faults = [
        Fault("status", status=429, retry_after="1", prompt_contains="limit"),
        Fault("status", status=503, prompt_contains="down"),
        Fault("status", status=529, prompt_contains="overloaded"),
    ]
    async with serving(api_key="sk-1", faults=faults) as (_, client):
        client.headers["authorization"] = "Bearer sk-1"
        assert check_error(await client.post(ORQ, json={**BODY, "temperature": 3}), 400)["param"] == "temperature"
        assert check_error(await client.post(ORQ, json={"model": "m"}), 400)["param"] == "prompt"
        check_error(await client.post(ORQ, content=b"{nope"), 400)
        check_error(await client.post(V1, json={**BODY, "orq": {}}), 400)
        check_error(await client.post(ORQ, json=BODY, headers={"authorization": "Bearer no"}), 401)
        check_error(await client.post("/v2/nowhere", json=BODY), 404)
        check_error(await client.get(ORQ), 405)
        assert check_error(await client.post(ORQ, json={**BODY, "prompt": "limit"}), 429)["type"] == (
            "rate_limit_error"
        )
        assert check_error(await client.post(ORQ, json={**BODY, "prompt": "down"}), 503)["type"] == "server_error"
        check_error(await client.post(ORQ, json={**BODY, "prompt": "overloaded"}), 529)
        check_error(await client.post("/_faults", json=[{"kind": "nope"}]), 400)


@pytest.mark.anyio
async def test_health_names_the_loop_it_runs_on(loop: str) -> None:
    async with serving() as (_, client):  # this module's tests run once per loop: show that they do
        assert (await client.get("/health")).json() == {"status": "ok", "loop": loop}


# ----------------------------------------------------------------------------------- auth and validation


@pytest.mark.anyio
async def test_api_key_is_required_when_configured() -> None:
    async with serving(api_key="sk-test-123") as (gw, client):
        missing = await client.post(ORQ, json=BODY)
        wrong = await client.post(ORQ, json=BODY, headers={"Authorization": "Bearer sk-nope"})
        right = await client.post(ORQ, json=BODY, headers={"Authorization": "Bearer sk-test-123"})
    assert missing.status_code == wrong.status_code == 401
    error = wrong.json()["error"]
    assert set(error) == {"code", "message", "param", "type"}
    assert error["type"] == "authentication_error"
    assert "sk-test-123" not in wrong.text
    assert right.status_code == 200
    assert gw.stats.by_status == {401: 2, 200: 1}
    assert gw.stats.billed == 1
    assert "sk-test-123" not in repr(gw.config)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "change", "param"),
    [
        (ORQ, {"temperature": 3}, "temperature"),
        (ORQ, {"top_p": 1.5}, "top_p"),
        (ORQ, {"frequency_penalty": -2.5}, "frequency_penalty"),
        (ORQ, {"presence_penalty": 9}, "presence_penalty"),
        (ORQ, {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (ORQ, {"max_tokens": 0}, "max_tokens"),
        (ORQ, {"n": 0}, "n"),
        (ORQ, {"retry": {"count": 9, "on_codes": [429]}}, "retry.count"),
        (ORQ, {"orq": {"retry": {"count": 2, "on_codes": []}}}, "orq.retry.on_codes"),
        (ORQ, {"cache": {"type": "x", "ttl": 60}}, "cache.type"),
        (ORQ, {"cache": {"type": "exact_match", "ttl": 0}}, "cache.ttl"),
        (ORQ, {"prompt": None}, "prompt"),
        (ORQ, {"model": 5}, "model"),
        (V1, {"temperature": -0.1}, "temperature"),
        (V1, {"retry": {"count": 2, "on_codes": [429]}}, "retry"),
        (V1, {"orq": {}}, "orq"),
    ],
)
async def test_invalid_bodies_get_a_4xx_naming_the_field(
    path: str, change: dict[str, Any], param: str
) -> None:
    async with serving() as (gw, client):
        r = await client.post(path, json={**BODY, **change})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["code"], str)
    assert param.split(".")[-1] in error["message"] or param in error["message"]
    assert gw.stats.billed == 0


@pytest.mark.anyio
async def test_a_missing_prompt_or_a_non_object_body_is_a_400() -> None:
    async with serving() as (_, client):
        missing = await client.post(ORQ, json={"model": "m"})
        not_json = await client.post(ORQ, content=b"{nope", headers={"content-type": "application/json"})
        a_list = await client.post(ORQ, json=[BODY])
    assert missing.status_code == not_json.status_code == a_list.status_code == 400
    assert missing.json()["error"]["param"] == "prompt"
    assert missing.json()["error"]["code"] == "missing_required_parameter"


@pytest.mark.anyio
async def test_no_validate_skips_the_schema_but_not_the_basics() -> None:
    async with serving(validate=False) as (_, client):
        lax = await client.post(ORQ, json={**BODY, "retry": {"count": 9}, "cache": {"type": "x"}})
        no_prompt = await client.post(ORQ, json={"model": "m"})
        unknown_on_v1 = await client.post(V1, json={**BODY, "orq": {}})
    assert lax.status_code == 200
    assert no_prompt.status_code == 400
    assert unknown_on_v1.status_code == 400


# --------------------------------------------------------------------------------------------------- faults


@pytest.mark.anyio
async def test_status_fault_answers_the_orq_error_shape_with_retry_after() -> None:
    fault = Fault("status", status=429, retry_after="2", retry_after_ms="1500")
    async with serving(faults=[fault]) as (gw, client):
        r = await client.post(ORQ, json=BODY)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert r.headers["retry-after-ms"] == "1500"
    error = r.json()["error"]
    assert set(error) == {"code", "message", "param", "type"}
    assert error["type"] == "rate_limit_error"
    assert gw.stats.by_status == {429: 1}
    assert gw.stats.billed == 0


@pytest.mark.anyio
async def test_first_fails_each_prompt_that_many_times_then_succeeds() -> None:
    async with serving(faults=[Fault("status", status=503, first=2)]) as (gw, client):
        statuses = {}
        for prompt in ("one", "two"):
            statuses[prompt] = [
                (await client.post(ORQ, json={**BODY, "prompt": prompt})).status_code for _ in range(4)
            ]
    assert statuses == {"one": [503, 503, 200, 200], "two": [503, 503, 200, 200]}
    assert gw.stats.attempts == {"one": 4, "two": 4}
    assert gw.stats.billed == 4


@pytest.mark.anyio
async def test_model_prompt_and_path_filters_and_first_match_wins() -> None:
    faults = [
        Fault("status", status=500, model="bad/model"),
        Fault("status", status=502, prompt_contains="flaky"),
        Fault("status", status=504, path=V1),
        Fault("status", status=503),  # never reached for what the rules above catch
    ]
    async with serving(faults=faults) as (_, client):

        async def status(path: str = ORQ, **change: Any) -> int:
            return (await client.post(path, json={**BODY, **change})).status_code

        assert await status(model="bad/model", prompt="a flaky one") == 500
        assert await status(prompt="a flaky one") == 502
        assert await status(V1) == 504
        assert await status() == 503


@pytest.mark.anyio
async def test_rate_is_seeded_and_deterministic() -> None:
    async def pattern(seed: int) -> list[int]:
        async with serving(faults=[Fault("status", rate=0.5)], seed=seed) as (_, client):
            return [(await client.post(ORQ, json=BODY)).status_code for _ in range(24)]

    first = await pattern(1)
    assert {200, 503} == set(first)
    assert await pattern(1) == first
    assert await pattern(2) != first


@pytest.mark.anyio
async def test_reset_closes_the_connection_without_an_answer() -> None:
    async with serving(faults=[Fault("reset", first=1)]) as (gw, client):
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await client.post(ORQ, json=BODY)
        assert (await client.post(ORQ, json=BODY)).status_code == 200
    assert gw.stats.aborted == 1
    assert gw.stats.by_status == {200: 1}


@pytest.mark.anyio
async def test_slow_fault_and_latency_wait_without_blocking_the_loop() -> None:
    async with serving(latency_s=0.05, faults=[Fault("slow", delay_s=0.2, prompt_contains="slow")]) as (
        gw,
        client,
    ):
        started = time.monotonic()
        fast = await client.post(ORQ, json=BODY)
        assert 0.05 <= time.monotonic() - started < 0.25  # not the slow fault
        started = time.monotonic()
        answers = await asyncio.gather(
            *(client.post(ORQ, json={**BODY, "prompt": f"slow {i}"}) for i in range(8))
        )
        elapsed = time.monotonic() - started
    assert fast.status_code == 200
    assert [r.status_code for r in answers] == [200] * 8
    assert 0.25 <= elapsed < 0.6  # 8 concurrent waits of 0.25 s overlap
    assert gw.stats.max_in_flight == 8
    assert gw.stats.in_flight == 0
    assert gw.stats.billed == 9


@pytest.mark.anyio
async def test_closing_drops_the_waiting_requests_and_their_in_flight_count() -> None:
    async with serving(latency_s=30) as (gw, client):
        waiting = [asyncio.ensure_future(client.post(ORQ, json=BODY)) for _ in range(3)]
        while gw.stats.in_flight < 3:  # noqa: ASYNC110 - the gateway exposes no event to await
            await asyncio.sleep(0.005)
        await gw.aclose()
        for request in waiting:
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await request
    assert gw.stats.in_flight == 0
    assert gw.stats.max_in_flight == 3


@pytest.mark.anyio
async def test_broken_body_faults() -> None:
    faults = [
        Fault("malformed", prompt_contains="malformed"),
        Fault("html", prompt_contains="html"),
        Fault("missing_choices", prompt_contains="missing"),
        Fault("bad_finish_reason", prompt_contains="weird"),
    ]
    async with serving(faults=faults) as (gw, client):

        async def post(prompt: str) -> httpx.Response:
            r = await client.post(ORQ, json={**BODY, "prompt": prompt})
            assert r.status_code == 200
            return r

        malformed = await post("malformed")
        with pytest.raises(json.JSONDecodeError):
            malformed.json()
        assert malformed.headers["content-type"] == "application/json"
        html = await post("html")
        assert html.headers["content-type"].startswith("text/html")
        assert html.text.startswith("<!DOCTYPE html>")
        missing = (await post("missing")).json()
        assert "choices" not in missing
        assert "usage" in missing
        weird = (await post("weird")).json()
        assert weird["choices"][0]["finish_reason"] == "weird"
    assert gw.stats.billed == 1  # only bad_finish_reason delivered a whole generated completion


@pytest.mark.anyio
async def test_echo_auth_leaks_the_header_into_the_error_but_not_into_the_stats() -> None:
    async with serving(faults=[Fault("status", status=500, echo_auth=True)]) as (gw, client):
        r = await client.post(ORQ, json=BODY, headers={"Authorization": "Bearer sk-secret-1"})
    assert "Bearer sk-secret-1" in r.json()["error"]["message"]
    snapshot = json.dumps(gw.stats.snapshot(bodies=True))
    assert "sk-secret-1" not in snapshot
    assert gw.stats.bodies[0]["body"] == BODY


# ----------------------------------------------------------------------------------- stats and control


@pytest.mark.anyio
async def test_stats_count_paths_statuses_attempts_and_billing() -> None:
    async with serving(faults=[Fault("status", status=503, first=1)]) as (gw, client):
        before = time.monotonic()
        await client.post(ORQ, json=BODY)
        await client.post(ORQ, json=BODY)
        await client.post(V1, json={**BODY, "prompt": "other"})
        await client.post(ORQ, json={**BODY, "temperature": 9})
        await client.post("/v2/nowhere", json=BODY)
        stats = gw.stats
        assert stats.total == 5
        assert stats.by_path == {ORQ: 3, V1: 1, "/v2/nowhere": 1}
        assert stats.by_status == {503: 2, 200: 1, 400: 1, 404: 1}
        assert stats.billed == 1
        assert stats.attempts == {BODY["prompt"]: 3, "other": 1}
        assert len(stats.arrivals) == 5
        assert all(before <= t <= time.monotonic() for t in stats.arrivals)
        assert [b["path"] for b in stats.bodies][:3] == [ORQ, ORQ, V1]
        assert "authorization" not in stats.bodies[0]["headers"]

        over_http = (await client.get("/_stats")).json()
        assert over_http["total"] == 5
        assert over_http["by_status"] == {"503": 2, "200": 1, "400": 1, "404": 1}
        assert "bodies" not in over_http
        with_bodies = (await client.get("/_stats", params={"bodies": "1"})).json()
        assert with_bodies["bodies"][0]["body"] == BODY
        assert (await client.get("/health")).json()["status"] == "ok"
        assert stats.total == 5  # control endpoints are not counted

        assert (await client.post("/_reset")).status_code == 200
        assert gw.stats.snapshot()["total"] == 0
        assert (await client.post(ORQ, json=BODY)).status_code == 503  # `first` counters were reset too

        faults = [{"kind": "status", "status": 418}]
        assert (await client.post("/_faults", json=faults)).json() == {"faults": 1}
        assert (await client.post(ORQ, json=BODY)).status_code == 418
        assert (await client.post("/_faults", json=[{"kind": "nope"}])).status_code == 400
        assert (await client.post("/_faults", json=[])).status_code == 200
        assert (await client.post(ORQ, json=BODY)).status_code == 200
        assert (await client.get(ORQ)).status_code == 405


@pytest.mark.anyio
async def test_raw_http_body_in_a_later_packet_keep_alive_and_connection_close() -> None:
    async with serving() as (gw, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        body = json.dumps(BODY).encode()
        head = f"POST {ORQ} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
        for last in (False, True):
            writer.write(head + (b"Connection: close\r\n" if last else b"") + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)  # the body arrives in its own segment
            writer.write(body)
            status = await reader.readline()
            assert status == b"HTTP/1.1 200 OK\r\n"
            headers = {}
            while (line := await reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            assert json.loads(await reader.readexactly(int(headers["content-length"])))["choices"]
        assert await reader.read() == b""  # the server closed after `Connection: close`
        writer.close()
        await writer.wait_closed()
        assert gw.stats.total == 2

        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"NONSENSE\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
        writer.close()
        await writer.wait_closed()


# ------------------------------------------------------------------------------------- config, thread, CLI


def test_config_and_faults_from_dicts() -> None:
    config = GatewayConfig.from_dict(
        {
            "latency_ms": 20,
            "jitter_ms": 5,
            "seed": 3,
            "faults": [{"kind": "status", "status": 429, "retry_after": 2}],
        }
    )
    assert (config.latency_s, config.jitter_s, config.seed) == (0.02, 0.005, 3)
    assert config.faults == (Fault("status", status=429, retry_after="2"),)
    assert Fault.from_dict({"kind": "slow", "delay_ms": 250}).delay_s == 0.25
    with pytest.raises(ValueError, match="unknown fault field"):
        Fault.from_dict({"kind": "status", "code": 500})
    with pytest.raises(ValueError, match="fault kind"):
        Fault("explode")
    with pytest.raises(ValueError, match="unknown gateway config"):
        GatewayConfig.from_dict({"latency": 1})


def test_serve_in_thread_serves_sync_clients_and_takes_new_faults(loop: str) -> None:
    with (
        serve_in_thread(GatewayConfig(latency_s=0.01), loop_factory=loop_factory(loop)) as gw,
        httpx.Client(base_url=gw.base_url, trust_env=False) as client,
    ):
        assert client.get("/health").json()["loop"] == loop
        assert client.post(ORQ, json=BODY).status_code == 200
        gw.set_faults([Fault("status", status=529)])
        r = client.post(ORQ, json=BODY)
        assert r.status_code == 529
        assert r.json()["error"]["type"] == "server_error"
        assert gw.stats.by_status == {200: 1, 529: 1}
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{gw.base_url}/health", trust_env=False)


def test_cli_serves_until_sigterm(tmp_path: Path, loop: str) -> None:
    faults = tmp_path / "faults.yaml"
    faults.write_text("- kind: status\n  status: 503\n  first: 1\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "GW_TEST_KEY": "sk-cli"}
    args = ["--port", "0", "--faults", str(faults), "--api-key-env", "GW_TEST_KEY", "--loop", loop]
    command = [sys.executable, "-m", "batcher.gateway", *args]
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("batcher gateway listening on http://127.0.0.1:")
            base_url = line.rsplit(" ", 1)[1].strip()
            auth = {"Authorization": "Bearer sk-cli"}
            with httpx.Client(base_url=base_url, trust_env=False, headers=auth) as client:
                assert client.get("/health").json()["loop"] == loop
                assert client.post(ORQ, json=BODY).status_code == 503
                assert client.post(ORQ, json=BODY).status_code == 200
                assert client.post(ORQ, json=BODY, headers={"Authorization": "Bearer x"}).status_code == 401
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()


def test_cli_rejects_bad_faults_and_a_missing_key_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--faults", '[{"kind": "explode"}]'])
    assert exit_info.value.code == 2
    assert "fault kind" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--api-key-env", "BATCHER_GATEWAY_TEST_SURELY_UNSET"])
    assert "BATCHER_GATEWAY_TEST_SURELY_UNSET" in capsys.readouterr().err


def test_batcher_gateway_as_users_start_it_serves_on_uvloop_when_installed() -> None:
    """`batcher gateway --port 0`, no loop named: uvloop is picked when it is installed (as it often is), and
    every answer must still arrive (its transports are not `asyncio.Transport`s)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "batcher", "gateway", "--port", "0"]
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            base_url = process.stdout.readline().rsplit(" ", 1)[1].strip()
            with httpx.Client(base_url=base_url, trust_env=False, timeout=10) as client:
                assert client.get("/health").json() == {"status": "ok", "loop": "uvloop" if HAVE_UVLOOP else "asyncio"}
                plain = client.post(ORQ, json=BODY)
                assert plain.status_code == 200
                check_json(plain.json())
                with client.stream("POST", ORQ, json={**BODY, "stream": True}) as r:
                    chunks = check_stream(r.read().decode())
                assert "".join(c["choices"][0]["text"] for c in chunks) == plain.json()["choices"][0]["text"]
                assert client.get("/_stats").json()["by_status"] == {"200": 2}
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()


def test_cli_loop_uvloop_without_uvloop_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["--loop", "uvloop"])
    assert exit_info.value.code == 2
    assert "uvloop is not installed" in capsys.readouterr().err


@pytest.mark.anyio
async def test_what_the_stats_keep_of_long_bodies_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long run of long documents must not grow the gateway without end (an outside run reached 22 GB): the
    body log keeps the latest bodies up to a byte budget, and `attempts` keys a long prompt by its digest."""
    import hashlib

    import batcher.gateway as gateway_mod

    monkeypatch.setattr(gateway_mod, "BODY_LOG_BYTES", 300_000)
    long = [f"{i}:" + "é東🙂" * 20_000 for i in range(8)]  # ~200 KB of UTF-8 each
    async with serving() as (gw, client):
        for prompt in [*long, "short"]:
            assert (await client.post(ORQ, json={**BODY, "prompt": prompt})).status_code == 200
        stats = (await client.get("/_stats")).json()
    kept = [b["body"]["prompt"] for b in gw.stats.bodies]
    assert kept == [long[-1], "short"]  # the newest ones that fit 300 KB of requests
    digest = "sha256:" + hashlib.sha256(long[0].encode()).hexdigest()
    assert stats["attempts"][digest] == 1 and stats["attempts"]["short"] == 1
    assert max(len(k) for k in gw.stats.attempts) < 100 and len(gw.stats.attempts) == 9
