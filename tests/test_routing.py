"""Routing decisions as pure functions: backoff, Retry-After, retry/fallback/fail, weighted draws."""

from __future__ import annotations

import dataclasses
import email.utils
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher import parse_spec
from batcher.routing import (
    Backoff,
    Decision,
    Failure,
    RoutePlan,
    decide,
    parse_retry_after,
    pick_weighted,
    plan_for,
)

PLAN = RoutePlan(
    models=("a", "b"),
    retries=2,
    fallback_on=frozenset({429, 500, 502, 503, 504}),
    call_timeout_s=5,
    status_retry_on=frozenset({429, 500, 502, 503, 504}),
)


def _decide(failure: Failure, retries: int = 0, contract: int = 0, has_next: bool = True, plan: RoutePlan = PLAN):
    return decide(plan, failure, retries_used=retries, contract_retries_used=contract, has_next_model=has_next,
                  backoff=Backoff(base=0.5, cap=4), rng=random.Random(1))


def test_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25  # the precise one wins
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(7, abs=1)
    assert parse_retry_after({"retry-after": "99999"}) == 120.0  # capped
    for garbage in ("soon", "-1", "nan", "inf", ""):
        assert parse_retry_after({"retry-after": garbage}) is None
    assert parse_retry_after({"retry-after-ms": "x"}) is None
    assert parse_retry_after({}) is None


@given(st.integers(min_value=1, max_value=30), st.integers(min_value=0, max_value=2**32))
def test_backoff_is_full_jitter_and_capped(n: int, seed: int) -> None:
    b = Backoff(base=0.5, cap=8)
    d = b.delay(n, random.Random(seed))
    assert 0 <= d <= min(8, 0.5 * 2 ** (n - 1))


def test_decisions() -> None:
    assert _decide(Failure("status", "x", status=503)).action == "retry"
    assert _decide(Failure("status", "x", status=503), retries=2).action == "fallback"
    assert _decide(Failure("status", "x", status=503), retries=2, has_next=False).action == "fail"
    for code in (400, 404, 422):
        assert _decide(Failure("status", "x", status=code)).action == "fail"
    assert _decide(Failure("status", "x", status=401)).action == "fatal"
    assert _decide(Failure("status", "x", status=403)).action == "fatal"
    assert _decide(Failure("transport", "reset")).action == "retry"
    assert _decide(Failure("timeout", "slow"), retries=2).action == "fallback"
    # a contract break is retried once, then it is a failure (and not a fallback trigger)
    assert _decide(Failure("contract", "no choices", status=200)).action == "retry"
    assert _decide(Failure("contract", "no choices", status=200), contract=1, has_next=False).action == "fail"


def test_429_pauses_the_pool_for_at_least_retry_after() -> None:
    d = _decide(Failure("status", "slow down", status=429, retry_after=2.0))
    assert d.action == "retry" and d.pause_pool and d.delay >= 2.0
    d = _decide(Failure("status", "boom", status=503, retry_after=1.0))
    assert not d.pause_pool and d.delay >= 1.0


@pytest.mark.parametrize("status_retry_on", [frozenset(), frozenset({500, 503})])
def test_every_429_pauses_the_pool_whatever_the_retry_settings(status_retry_on: frozenset[int]) -> None:
    plan = dataclasses.replace(PLAN, retries=0, status_retry_on=status_retry_on, max_rate_limit_wait_s=10.0)
    # retries used up, or none configured: a 429 is still waited out and asked again
    d = _decide(Failure("status", "slow down", status=429, retry_after=3.0), retries=2, plan=plan)
    assert d == Decision("retry", delay=3.0, pause_pool=True)
    # without Retry-After: a backoff, never next to nothing
    d = _decide(Failure("status", "slow down", status=429), plan=plan)
    assert d.action == "retry" and d.pause_pool and d.delay >= 0.5
    # up to the cap on the row's total wait; then the 429 is the row's failure (or a fallback)
    assert _decide(Failure("status", "x", status=429, retry_after=3.0), plan=plan).action == "retry"
    over = decide(plan, Failure("status", "x", status=429, retry_after=3.0), retries_used=0, contract_retries_used=0,
                  has_next_model=False, backoff=Backoff(), rng=random.Random(1), rate_limited=3,
                  rate_limit_waited_s=9.0)
    assert over.action == "fail"
    over = decide(plan, Failure("status", "x", status=429, retry_after=3.0), retries_used=0, contract_retries_used=0,
                  has_next_model=True, backoff=Backoff(), rng=random.Random(1), rate_limited=3,
                  rate_limit_waited_s=9.0)
    assert over.action == "fallback"


def _plan(api: str, **request: object) -> RoutePlan:
    spec = parse_spec({
        "input": {"path": "x.jsonl", "prompt": "{{a}}"},
        "output": {"path": "o.parquet"},
        "endpoint": {"api": api, "base_url": "local"},
        "request": {"model": "m", **request},
    })
    return plan_for(spec.request, spec.endpoint.api)


def test_plan_against_orq_leaves_upstream_retries_to_orq() -> None:
    routing = {"retry": {"count": 3, "on_codes": [429, 503]}, "fallbacks": [{"model": "f"}],
               "timeout": {"call_timeout": 1000}}
    orq = _plan("orq", **routing)
    assert orq.status_retry_on == frozenset() and orq.models == ("m",)  # a 429 is waited out apart (decide)
    assert orq.call_timeout_s == pytest.approx(1.0 * 4 * 2)  # covers orq's own retries and fallback
    oa = _plan("openai", **routing)
    assert oa.status_retry_on == {429, 503} and oa.models == ("m", "f") and oa.call_timeout_s == 1.0
    # every model that may answer, whoever routes: what the budget prices
    assert orq.may_answer == oa.may_answer == ("m", "f")
    lb = {"load_balancer": {"type": "weight_based", "models": [{"model": "a", "weight": 0.5}, {"model": "b"}]}}
    assert _plan("orq", **lb, fallbacks=[{"model": "f"}]).may_answer == ("m", "a", "b", "f")
    # the older form inside `orq` means the same
    assert _plan("openai", orq={"retry": {"count": 3, "on_codes": [429, 503]}}).retries == 3


def test_load_balancer_shares_match_weights_and_are_stable() -> None:
    models = (("a", 0.7), ("b", 0.2), ("c", 0.1))
    counts = Counter(pick_weighted(models, i) for i in range(10_000))
    for m, w in models:
        assert abs(counts[m] / 10_000 - w) < 0.02
    assert [pick_weighted(models, f"id-{i}") for i in range(50)] == [pick_weighted(models, f"id-{i}") for i in range(50)]
    # weights need not sum to 1
    counts = Counter(pick_weighted((("a", 0.3), ("b", 0.3)), i) for i in range(10_000))
    assert abs(counts["a"] / 10_000 - 0.5) < 0.02
