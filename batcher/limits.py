"""Pacing: requests per minute and tokens per minute (aiolimiter leaky buckets), and the pool-wide pause
after a 429.

aiolimiter's bucket holds `max_rate` units and starts empty, so a bucket sized for a whole minute would let a
minute's worth of calls out in the first second. We size each bucket for a tenth of a second instead (at least
one unit): the long-run rate is the same, and no ten-second window goes more than ~1% over its share.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import anyio
from aiolimiter import AsyncLimiter

__all__ = ["Cooldown", "RateLimits", "limiter_tokens"]

_BURST_S = 0.1


def _bucket(per_minute: float, largest: float = 1.0) -> AsyncLimiter:
    per_second = per_minute / 60.0
    capacity = max(largest, per_second * _BURST_S)
    return AsyncLimiter(capacity, capacity / per_second)


def limiter_tokens(prompt_text: str, body: Mapping[str, Any]) -> float:
    """What the tokens_per_minute limiter is charged for a call: the prompt text / 3 (all the message text for
    chat) and every choice's token bound (max_completion_tokens or max_tokens, whichever the body has)."""
    bound = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return len(prompt_text) / 3.0 + bound * (body.get("n") or 1)


class RateLimits:
    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None, max_call_tokens: float) -> None:
        self._requests = _bucket(requests_per_minute) if requests_per_minute else None
        # A single call may need more tokens than a tenth of a second allows: the bucket must fit the largest.
        self._tokens = _bucket(tokens_per_minute, min(max_call_tokens, tokens_per_minute)) if tokens_per_minute else None
        # aiolimiter refuses (ValueError) an amount over its capacity rather than hang: clamp to it.
        self._token_cap = self._tokens.max_rate if self._tokens is not None else 0.0

    async def acquire(self, tokens: float) -> None:
        if self._tokens is not None:
            await self._tokens.acquire(min(tokens, self._token_cap))
        if self._requests is not None:
            await self._requests.acquire()


class Cooldown:
    """A 429 pauses every worker until the server's time has passed, not just the one that got it."""

    def __init__(self) -> None:
        self.until = 0.0

    def extend(self, seconds: float) -> None:
        self.until = max(self.until, time.monotonic() + seconds)

    async def wait(self) -> None:
        while True:
            left = self.until - time.monotonic()
            if left <= 0:
                return
            await anyio.sleep(left)
