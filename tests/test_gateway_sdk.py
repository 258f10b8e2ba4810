"""The official orq SDK (`orq-ai-sdk`) against the simulated gateway, on both event loops: it must read every
answer the gateway gives, plain and streamed, since the gateway stands in for orq in users' offline work.

The SDK validates each answer with its own pydantic models (generated from orq's contract), so these tests
check the gateway from a second, independent side; the texts and usage it reads are compared with the plain
JSON the gateway answers the same request with, over httpx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from orq_ai_sdk import Orq
from orq_ai_sdk.models import APIErrorResponse

from batcher.gateway import Gateway, GatewayConfig, serve_in_thread
from tests import test_gateway
from tests.test_gateway import ORQ, loop_factory

# The gateway tests' fixtures: every test here runs once on asyncio's default loop and once on uvloop.
loop = test_gateway.loop
anyio_backend = test_gateway.anyio_backend

REQUEST: dict[str, Any] = {
    "model": "openai/gpt-4o-mini",
    "prompt": "Write one line about the sea.",
    "max_tokens": 40,
    "temperature": 0.5,
    "seed": 3,
}


def plain_json(base_url: str, **change: Any) -> dict[str, Any]:
    """What the gateway answers the SDK's request with, read as plain JSON over httpx. The SDK also sends its
    defaults (echo, penalties, top_p, n), none of which shapes the text unless set."""
    r = httpx.post(f"{base_url}{ORQ}", json={**REQUEST, **change}, trust_env=False)
    assert r.status_code == 200
    data: dict[str, Any] = r.json()
    return data


def usage_of(usage: Any) -> tuple[int, int, int]:
    return int(usage.prompt_tokens), int(usage.completion_tokens), int(usage.total_tokens)


def test_sdk_reads_a_plain_answer(loop: str) -> None:
    with serve_in_thread(GatewayConfig(), loop_factory=loop_factory(loop)) as gw, Orq(
        api_key="sk-any", server_url=gw.base_url
    ) as orq:
        answer = orq.router.completions.create(**REQUEST, n=2)
        expected = plain_json(gw.base_url, n=2)
    assert [(c.index, c.text, c.finish_reason) for c in answer.choices] == [
        (c["index"], c["text"], c["finish_reason"]) for c in expected["choices"]
    ]
    assert answer.choices[0].text
    assert answer.usage is not None
    u = expected["usage"]
    assert usage_of(answer.usage) == (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])
    assert answer.model == REQUEST["model"]


@pytest.mark.parametrize("n", [1, 2])
def test_sdk_reads_a_streamed_answer(loop: str, n: int) -> None:
    with serve_in_thread(GatewayConfig(), loop_factory=loop_factory(loop)) as gw, Orq(
        api_key="sk-any", server_url=gw.base_url
    ) as orq:
        stream = orq.router.completions.create(**REQUEST, n=n, stream=True)
        with stream as events:  # before the fix, the first chunk (finish_reason null) raised here
            chunks = [event.data for event in events]
        expected = plain_json(gw.base_url, n=n)
    assert len(chunks) > n  # really streamed in pieces
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in chunks:
        assert chunk is not None
        for choice in chunk.choices:
            texts[int(choice.index)] = texts.get(int(choice.index), "") + choice.text
            reasons[int(choice.index)] = choice.finish_reason
    assert texts == {c["index"]: c["text"] for c in expected["choices"]}
    assert reasons == {c["index"]: c["finish_reason"] for c in expected["choices"]}
    last = chunks[-1]
    assert last is not None and last.usage is not None
    u = expected["usage"]
    assert usage_of(last.usage) == (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])


def test_sdk_reads_the_error_of_a_refused_key(loop: str) -> None:
    with serve_in_thread(GatewayConfig(api_key="sk-right"), loop_factory=loop_factory(loop)) as gw, Orq(
        api_key="sk-wrong", server_url=gw.base_url
    ) as orq:
        with pytest.raises(APIErrorResponse) as err:
            orq.router.completions.create(**REQUEST)
    assert err.value.data.error.type == "authentication_error"
    assert err.value.data.error.message == "missing or invalid API key"
    assert "sk-right" not in str(err.value)


@pytest.mark.anyio
async def test_sdk_async_streams_from_a_gateway_on_the_same_loop() -> None:
    """The async SDK and the gateway share one loop (asyncio's or uvloop's), as in an async test of one's own."""
    async with Gateway(GatewayConfig()) as gw:
        async with Orq(api_key="sk-any", server_url=gw.base_url) as orq:
            stream = await orq.router.completions.create_async(**REQUEST, stream=True)
            async with stream as events:
                chunks = [event.data async for event in events]
            plain = await orq.router.completions.create_async(**REQUEST)
    text = "".join(c.choices[0].text for c in chunks if c is not None)
    assert text == plain.choices[0].text
    last = chunks[-1]
    assert last is not None and last.usage is not None and plain.usage is not None
    assert usage_of(last.usage) == usage_of(plain.usage)
