"""orq's routing settings as pure decisions: which model a row starts with, whether a failed attempt is retried,
falls back to the next model or fails, and how long to wait first.

Nothing here does I/O or sleeps, so every rule is testable with plain values and a fixed random source.
"""

from __future__ import annotations

import email.utils
import hashlib
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .spec import DEFAULT_FALLBACK_ON_CODES, DEFAULT_RETRY_ON_CODES, LoadBalancer, RequestSpec

if TYPE_CHECKING:
    from .shapes.chat_spec import ChatRequestSpec

__all__ = [
    "Backoff",
    "Decision",
    "Failure",
    "RoutePlan",
    "decide",
    "parse_retry_after",
    "pick_weighted",
    "plan_for",
]

MAX_RETRY_AFTER_S = 120.0
FATAL_CODES = frozenset({401, 403})


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter (AWS's "full jitter": uniform in [0, min(cap, base·2^n)])."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, retry_number: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.cap, self.base * (2 ** max(0, retry_number - 1))))


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """The client-side routing of one job, resolved from the spec once."""

    # The models batcher itself tries, in order: primary first (it may be drawn per row), then fallbacks.
    # Against orq only the primary: orq falls back server-side.
    models: tuple[str, ...]
    retries: int  # extra attempts per model
    fallback_on: frozenset[int]
    call_timeout_s: float
    load_balancer: tuple[tuple[str, float], ...] = ()
    # The statuses batcher retries. Against orq, orq itself retries upstream failures (it is sent `retry`),
    # so none: batcher retries only what orq cannot see (transport, deadline; a 429 always, see `decide`).
    status_retry_on: frozenset[int] = field(default_factory=frozenset)
    # Every model that may answer a row besides the row's own: fallbacks and load-balancer models, on both
    # APIs (orq applies them server-side). What the budget must price.
    may_answer: tuple[str, ...] = ()
    # A 429 is waited out and the row asked again, whatever the retry settings, until the row has waited
    # this long in total for rate limits; then the 429 is handled like any failed status.
    max_rate_limit_wait_s: float = 300.0

    def primary_for(self, row_id: object) -> str:
        if self.load_balancer:
            return pick_weighted(self.load_balancer, row_id)
        return self.models[0]


DEFAULT_CALL_TIMEOUT_S = 600.0


def plan_for(request: RequestSpec | ChatRequestSpec, api: str, max_rate_limit_wait_s: float = 300.0) -> RoutePlan:
    retry = request.routing("retry")
    fallbacks = request.routing("fallbacks") or []
    fb_codes = request.routing("fallback_on_codes")
    timeout = request.routing("timeout")
    lb: LoadBalancer | None = request.routing("load_balancer")
    retries = retry.count if retry is not None else 0
    retry_on = frozenset(retry.on_codes) if retry is not None else frozenset(DEFAULT_RETRY_ON_CODES)
    server_routes = api == "orq"
    call_timeout_s = timeout.call_timeout / 1000.0 if timeout is not None else DEFAULT_CALL_TIMEOUT_S
    if server_routes and timeout is not None:
        # orq's call_timeout bounds each upstream call, and orq may retry and fall back inside one of our
        # attempts: our deadline must cover all of that or we would cut off answers orq is still producing.
        call_timeout_s *= (1 + (retries or 0)) * (1 + len(fallbacks))
    # Against orq, codes in on_codes were already retried server-side (a 429 is handled apart, in `decide`).
    status_retry_on = frozenset() if server_routes else retry_on
    primary = request.model or (lb.models[0].model if lb else "")
    fallback_models = tuple(f.model for f in fallbacks)
    models = (primary, *fallback_models) if not server_routes else (primary,)
    lb_models = tuple(m.model for m in lb.models) if lb else ()
    return RoutePlan(
        models=models,
        retries=retries,
        fallback_on=frozenset(fb_codes) if fb_codes else frozenset(DEFAULT_FALLBACK_ON_CODES),
        call_timeout_s=call_timeout_s,
        load_balancer=tuple((m.model, m.weight) for m in lb.models) if lb else (),
        status_retry_on=status_retry_on,
        may_answer=tuple(dict.fromkeys(m for m in (primary, *lb_models, *fallback_models) if m)),
        max_rate_limit_wait_s=max_rate_limit_wait_s,
    )


def _unit_interval(key: object) -> float:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick_weighted(models: Sequence[tuple[str, float]], row_id: object) -> str:
    """Draw a model by weight, deterministically from the row id: a rerun picks the same model (and hits the
    cache), and over many rows the shares match the weights (normalised: orq's weights need not sum to 1)."""
    total = math.fsum(w for _, w in models)
    point = _unit_interval(("lb", row_id)) * total
    acc = 0.0
    for model, weight in models:
        acc += weight
        if point < acc:
            return model
    return models[-1][0]


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The server's wait in seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), capped;
    None when absent or unparseable (the caller falls back to backoff)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value) and value >= 0:
                return min(value, MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
        if math.isfinite(value) and value >= 0:
            return min(value, MAX_RETRY_AFTER_S)
        return None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, min(when.timestamp() - now, MAX_RETRY_AFTER_S))


FailureKind = Literal["status", "transport", "timeout", "contract", "schema"]


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    message: str
    status: int | None = None
    retry_after: float | None = None
    # The request may have reached the server and been billed (a deadline or a dropped connection after
    # sending, a 200 whose body broke the contract): the budget charges such an attempt its worst case.
    maybe_billed: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["retry", "fallback", "fail", "fatal"]
    delay: float = 0.0
    pause_pool: bool = False  # a 429: every worker waits, not just this one


def decide(
    plan: RoutePlan,
    failure: Failure,
    *,
    retries_used: int,
    contract_retries_used: int,
    has_next_model: bool,
    backoff: Backoff,
    rng: random.Random,
    rate_limited: int = 0,
    rate_limit_waited_s: float = 0.0,
) -> Decision:
    """What to do after a failed attempt. `rate_limited` and `rate_limit_waited_s`: the row's 429s so far and
    the time it was told to wait for them."""
    if failure.kind == "status" and failure.status in FATAL_CODES:
        return Decision("fatal")
    rate_limit = failure.kind == "status" and failure.status == 429
    if rate_limit:
        # The server asking to slow down, not the row failing: the whole pool waits the server's time (or a
        # backoff, never next to nothing) and the row is asked again, whatever the retry settings, until the
        # row has waited `max_rate_limit_wait_s` in all; then the 429 is the row's failure (or a fallback).
        delay = failure.retry_after
        if delay is None:
            delay = max(backoff.base, backoff.delay(rate_limited + 1, rng))
        if rate_limit_waited_s + delay <= plan.max_rate_limit_wait_s:
            return Decision("retry", delay=delay, pause_pool=True)
    if rate_limit:
        retry = False
    elif failure.kind in ("contract", "schema"):
        # A body that breaks the contract (or an answer that breaks the job's json_schema) is likely to break
        # again: one more try, never more.
        retry = contract_retries_used < 1
    elif failure.kind in ("transport", "timeout"):
        retry = retries_used < plan.retries
    else:
        retry = failure.status in plan.status_retry_on and retries_used < plan.retries
    if retry:
        delay = backoff.delay(retries_used + 1, rng)
        if failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        return Decision("retry", delay=delay)
    if has_next_model:
        worthy = failure.kind in ("transport", "timeout") or (
            failure.status is not None and failure.status in plan.fallback_on
        )
        if worthy:
            return Decision("fallback")
    return Decision("fail")
