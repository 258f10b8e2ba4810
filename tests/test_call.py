"""One row's attempt loop (call.py) with a scripted client: no HTTP, any answer shape with `to_record()`."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from batcher.budget import Budget
from batcher.call import Caller, Records, Work
from batcher.client import AttemptFailed
from batcher.errors import FatalRequestError
from batcher.limits import RateLimits
from batcher.prices import Price, PriceTable
from batcher.routing import Backoff, Failure, RoutePlan
from batcher.sources import SourceRow

pytestmark = pytest.mark.anyio

PRICES = PriceTable({"cheap": Price(1000, 1000), "dear": Price(10_000, 10_000)})
PLAN = RoutePlan(models=("cheap",), retries=2, fallback_on=frozenset({503}), call_timeout_s=5,
                 status_retry_on=frozenset({503}), may_answer=("cheap",))


class _Answer:
    def __init__(self, model: str, tokens: int = 10) -> None:
        self.model = model
        self.tokens = tokens

    def to_record(self) -> dict[str, Any]:
        return {"text": "hi", "model": self.model, "prompt_tokens": self.tokens, "completion_tokens": 1}


class _Client:
    """Answers from a script: each entry is a Failure (raised) or a model name (answered)."""

    def __init__(self, script: Callable[[int, dict[str, Any]], Failure | str]) -> None:
        self.script = script
        self.sent: list[tuple[float, dict[str, Any]]] = []

    async def complete(self, body: dict[str, Any], *, stream: bool, deadline_s: float) -> _Answer:
        self.sent.append((time.monotonic(), body))
        await anyio.lowlevel.checkpoint()
        step = self.script(len(self.sent), body)
        if isinstance(step, Failure):
            raise AttemptFailed(step)
        return _Answer(step)


def _caller(plan: RoutePlan = PLAN, cap: float | None = None, **kw: Any) -> Caller:
    fatal: list[FatalRequestError] = []
    return Caller(plan=plan, records=Records(PRICES), budget=Budget(cap), limits=RateLimits(None, None, 100),
                  on_fatal=fatal.append, backoff=Backoff(base=0.001, cap=0.002), rng=random.Random(0), **kw)


def _work(i: int = 0, prompt: str = "x" * 20, key: str | None = None) -> Work:
    row = SourceRow(i, f"r{i}", prompt)
    return Work(row, {"model": "cheap", "prompt": prompt, "max_tokens": 5}, key, 10.0)


async def test_retry_then_fallback_then_answer_counts_every_attempt() -> None:
    def script(n: int, body: dict[str, Any]) -> Failure | str:
        return Failure("status", "down", status=503) if body["model"] == "cheap" else "dear"

    plan = RoutePlan(models=("cheap", "dear"), retries=2, fallback_on=frozenset({503}), call_timeout_s=5,
                     status_retry_on=frozenset({503}), may_answer=("cheap", "dear"))
    rec = await _caller(plan).work(_work(), _Client(script))
    assert rec is not None and rec["status"] == "ok" and rec["model"] == "dear" and rec["attempts"] == 4
    assert rec["cost_usd"] == pytest.approx(11 * 10_000 / 1e6)  # the answering model's price


async def test_an_answer_from_a_model_without_a_price_is_unpriced_and_counts_its_worst_case() -> None:
    caller = _caller(cap=10.0, plan=RoutePlan(models=("cheap",), retries=0, fallback_on=frozenset(),
                                              call_timeout_s=5, may_answer=("cheap",)))
    rec = await caller.work(_work(), _Client(lambda n, b: "somebody/else"))
    assert rec is not None and rec["cost_usd"] is None
    assert caller.budget.spent == pytest.approx((20 + 5) * 1000 / 1e6)  # the reservation, not 0
    # a server naming the asked model without its provider prefix answered with the asked model
    records = Records(PriceTable({"prov/model": Price(1e6, 0)}))
    usage = {"prompt_tokens": 2, "completion_tokens": 0}
    assert records.cost("model", "prov/model", usage) == 2.0
    assert records.cost("other", "prov/model", usage) is None


async def test_the_reservation_prices_every_model_that_may_answer() -> None:
    plan = RoutePlan(models=("cheap",), retries=0, fallback_on=frozenset(), call_timeout_s=5,
                     may_answer=("cheap", "dear"))
    caller = _caller(plan, cap=1.0)
    seen: list[float] = []

    def script(n: int, body: dict[str, Any]) -> str:
        seen.append(caller.budget.reserved)
        return "dear"

    await caller.work(_work(), _Client(script))
    assert seen == [pytest.approx((20 + 5) * 10_000 / 1e6)]  # the dear fallback's worst case, not the primary's
    # a row whose worst case does not fit is not sent, and the caller says the budget is hit
    client = _Client(script)
    assert await _caller(plan, cap=0.1).work(_work(), client) is None
    assert client.sent == []


async def test_no_request_after_stop_not_even_a_pending_retry() -> None:
    caller = _caller()

    def script(n: int, body: dict[str, Any]) -> Failure:
        caller.stop()  # the first Ctrl-C arrives while the first attempt is on the wire
        return Failure("status", "down", status=503)

    client = _Client(script)
    assert await caller.work(_work(), client) is None
    assert len(client.sent) == 1
    assert await caller.work(_work(1), client) is None and len(client.sent) == 1


async def test_a_429_pauses_every_worker_even_without_retries() -> None:
    plan = RoutePlan(models=("cheap",), retries=0, fallback_on=frozenset(), call_timeout_s=5, may_answer=("cheap",))
    caller = _caller(plan)
    limited: list[float] = []

    def script(n: int, body: dict[str, Any]) -> Failure | str:
        if body["prompt"] == "first" and not limited:
            limited.append(time.monotonic())
            return Failure("status", "slow down", status=429, retry_after=0.3)
        return "cheap"

    client = _Client(script)
    records: list[dict[str, Any] | None] = []

    async def one(w: Work) -> None:
        records.append(await caller.work(w, client))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, _work(0, "first"))
        await anyio.sleep(0.05)
        for i in range(1, 5):
            tg.start_soon(one, _work(i, f"later {i}"))
    assert all(r is not None and r["status"] == "ok" for r in records) and len(records) == 5
    # the other workers came 50 ms into the pause: nothing was sent until the server's time had passed
    pause_end = limited[0] + 0.3
    assert len(client.sent) == 6 and all(t >= pause_end for t, _ in client.sent[1:])


async def test_in_flight_duplicates_make_one_call() -> None:
    caller = _caller()
    client = _Client(lambda n, b: "cheap")
    records: list[dict[str, Any] | None] = []

    async def one(i: int) -> None:
        records.append(await caller.work(_work(i, key="same"), client))

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
    assert len(client.sent) == 1
    assert sorted(bool(r and r["cached"]) for r in records) == [False, True, True]


async def test_a_refused_key_is_fatal_once_and_nothing_more_is_sent() -> None:
    caller = _caller()
    client = _Client(lambda n, b: Failure("status", "bad key", status=401))
    assert await caller.work(_work(), client) is None
    assert caller.fatal is not None and caller.fatal.status == 401
    assert await caller.work(_work(1), client) is None and len(client.sent) == 1


async def test_no_request_after_stop_even_from_a_row_queued_at_the_limiter() -> None:
    caller = Caller(plan=PLAN, records=Records(PRICES), budget=Budget(None), limits=RateLimits(60, None, 100),
                    on_fatal=lambda exc: None)
    client = _Client(lambda n, b: "cheap")
    assert await caller.work(_work(0), client) is not None  # takes the limiter's one request a second
    records: list[dict[str, Any] | None] = []

    async def second() -> None:
        records.append(await caller.work(_work(1), client))

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(0.1)  # row 1 is waiting at the limiter now
        caller.stop()
    assert records == [None] and len(client.sent) == 1


WORST = (20 + 5) * 1000 / 1e6  # _work()'s worst case at the cheap model's price


async def test_attempts_of_unknown_outcome_are_charged_their_worst_case_and_status_errors_are_not() -> None:
    def script(n: int, body: dict[str, Any]) -> Failure | str:
        if n == 1:
            return Failure("timeout", "no answer", maybe_billed=True)  # cut off after sending: maybe billed
        if n == 2:
            return Failure("status", "down", status=503)  # refused: not billed
        return "cheap"

    caller = _caller(cap=1.0)
    rec = await caller.work(_work(), _Client(script))
    assert rec is not None and rec["status"] == "ok" and rec["attempts"] == 3
    assert rec["unconfirmed_usd"] == pytest.approx(WORST)
    assert caller.budget.spent == pytest.approx(WORST + rec["cost_usd"])
    assert caller.budget.unconfirmed == pytest.approx(WORST) and caller.budget.in_flight == 0
    # a row that only ever timed out: an error row that says what it may have cost
    caller = _caller(cap=1.0)
    rec = await caller.work(_work(), _Client(lambda n, b: Failure("timeout", "no answer", maybe_billed=True)))
    assert rec is not None and rec["status"] == "error" and rec["attempts"] == 3
    assert rec["unconfirmed_usd"] == pytest.approx(3 * WORST) and caller.budget.spent == pytest.approx(3 * WORST)
    # under a cap of 2.5 worst cases, the third attempt is not sent: the cap holds for unknown outcomes too
    caller = _caller(cap=2.5 * WORST)
    client = _Client(lambda n, b: Failure("timeout", "no answer", maybe_billed=True))
    rec = await caller.work(_work(), client)
    assert rec is not None and rec["status"] == "error" and "not asked again" in rec["error"]
    assert rec["unconfirmed_usd"] == pytest.approx(2 * WORST)  # the record keeps what it may have cost
    assert len(client.sent) == 2 and caller.budget_hit and caller.budget.spent <= 2.5 * WORST


async def test_a_row_that_does_not_fit_waits_for_calls_in_flight_instead_of_stopping() -> None:
    # Room for two worst cases: the third row waits for one of the first two to settle (at a tenth of its
    # worst case), then goes; the budget is reached only when nothing is in flight and a row still does not fit.
    release = anyio.Event()

    class Slow(_Client):
        async def complete(self, body: dict[str, Any], *, stream: bool, deadline_s: float) -> _Answer:
            self.sent.append((time.monotonic(), body))
            await release.wait()
            return _Answer("cheap", tokens=1)  # 1 + 1 tokens: far below the worst case

    caller = _caller(cap=2.5 * WORST)
    client = Slow(lambda n, b: "cheap")
    records: list[dict[str, Any] | None] = []

    async def one(i: int) -> None:
        records.append(await caller.work(_work(i), client))

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
        await anyio.wait_all_tasks_blocked()
        assert len(client.sent) == 2 and not caller.budget_hit  # the third waits
        release.set()
    assert len(records) == 3 and all(r is not None and r["status"] == "ok" for r in records)
    assert not caller.budget_hit and caller.budget.in_flight == 0


async def test_routing_in_a_batch_lines_body_counts_in_the_rows_worst_case() -> None:
    plan = RoutePlan(models=("cheap",), retries=0, fallback_on=frozenset(), call_timeout_s=5, may_answer=("cheap",))
    caller = _caller(plan, cap=1.0)
    seen: list[float] = []

    def script(n: int, body: dict[str, Any]) -> str:
        seen.append(caller.budget.reserved)
        return "dear"

    row = SourceRow(0, "r0", "x" * 20)
    body = {"model": "cheap", "prompt": "x" * 20, "max_tokens": 5, "fallbacks": [{"model": "dear"}]}
    await caller.work(Work(row, body, None, 10.0), _Client(script))
    assert seen == [pytest.approx((20 + 5) * 10_000 / 1e6)]  # the body's dear fallback, not the primary
    lb = {**body, "fallbacks": None, "orq": {"load_balancer": {"type": "weight_based", "models": [{"model": "dear"}]}}}
    seen.clear()
    await caller.work(Work(row, lb, None, 10.0), _Client(script))
    assert seen == [pytest.approx((20 + 5) * 10_000 / 1e6)]
    # an unpriced model in the body: a budget error row, no call
    client = _Client(script)
    for routing in ({"fallbacks": [{"model": "nope/x"}]}, {"load_balancer": [{"model": "nope/x", "weight": 1}]},
                    {"fallbacks": [{"modle": "dear"}]}):
        rec = await caller.work(Work(row, {**body, **routing}, None, 10.0), client)
        assert rec is not None and rec["status"] == "error" and rec["error_kind"] == "budget"
    assert client.sent == []
