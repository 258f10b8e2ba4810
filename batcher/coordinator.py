"""Job-wide limits for a job run by several workers: one coordinator hands out leases, each worker paces itself.

    coordinator (one, on the driver's side)            worker × W (each runs one shard's pipeline at a time)
      rate leases: a share of rpm/tpm for `lease_s`  ◀──  LeasedLimits: paces calls locally at its share
      budget: dollars in chunks                      ◀──  LeasedBudget: reserves locally from its chunk
      heartbeat: progress in; 429 pause, stop out    ◀─▶  a long poll: answered when the pause or the stop
                                                           flag changes, else after a second; a worker's own
                                                           429 is sent at once

Why leases and not a permit per call: a round trip per call would put the coordinator on every call's path
(a Ray actor call costs ~0.3 ms of CPU on each side), and its throughput would cap the job's. A rate lease is a
share of the limit for a while: the shares of unexpired leases never add up to more than the limit, so the job's
rate holds however the calls are spread, and a worker asks again only every `lease_s / 2`. A worker's share is
`limit / expected` (`expected`: the workers that still have shards); a lease that is not renewed (a worker that
died or ran out of work) expires and its share goes back. Budget chunks work the same way for dollars: the
chunks granted never add up to more than the cap minus what earlier runs spent, and a worker spends only from
its chunk, so the cap holds without a round trip per call; what is left of a chunk is given back when the
shard ends, or when the worker's next row does not fit it (the ask for more carries it). A worker whose row does
not fit what is left of the cap, with nothing in flight, is *starved*: it asks again every `STARVED_POLL_S`, and
the job's budget is reached only once every worker with work is starved and none of their rows fits, which is
where one process stops (no dollars stranded in another worker's chunk). The 429 pause and the stop flag reach the workers the same way without polling: each worker's
heartbeat waits at the coordinator until one of them changes (`version`), so they arrive within a round trip,
and a worker costs one call a second when there is none (the Ray actor holds the waiting calls).

`Coordination` is plain Python (the tests drive it with a fake clock); the Ray engine wraps it in an actor.
The worker-side classes take `call(method, *args)`, an async function that reaches it, so they do not know Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from .budget import Budget
from .limits import Cooldown, RateLimits

__all__ = ["Coordination", "LeasedBudget", "LeasedCooldown", "LeasedLimits", "Pacer", "RateLease"]

Call = Callable[..., Awaitable[Any]]

# A starved worker asks again this often; one that has not asked for this long is gone (killed, replaced)
STARVED_POLL_S = 0.1
STARVED_FRESH_S = 2.0
PROGRESS_KEYS = ("rows", "ok", "errors", "cached", "skipped", "attempts", "prompt_tokens", "completion_tokens",
                 "cost_usd", "unpriced")


@dataclass(frozen=True, slots=True)
class RateLease:
    rpm: float | None  # this worker's share; None: no such limit
    tpm: float | None
    seconds: float  # valid for this long from when it was granted


@dataclass
class _Held:
    rpm: float = 0.0
    tpm: float = 0.0
    expires: float = 0.0


@dataclass
class Coordination:
    """The job-wide state. All methods are quick and never block: an actor runs them one at a time."""

    requests_per_minute: float | None
    tokens_per_minute: float | None
    max_cost_usd: float | None
    spent_before: float = 0.0
    expected: int = 1  # workers that may hold a share at once
    lease_s: float = 1.0
    clock: Callable[[], float] = time.time
    leases: dict[str, _Held] = field(default_factory=dict)
    granted_usd: dict[str, float] = field(default_factory=dict)
    starving: dict[str, tuple[float, float]] = field(default_factory=dict)  # worker -> (its row's need, when)
    spent_usd: float = 0.0  # reported by workers; informational (the cap is held by the chunks)
    pause_until: float = 0.0  # wall clock: no worker sends before this (a 429's Retry-After)
    stopping: bool = False
    version: int = 0  # bumped when the pause grows or the job stops: what a waiting heartbeat waits for
    budget_exhausted: bool = False
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROGRESS_KEYS, 0.0))
    lease_calls: int = 0
    budget_calls: int = 0
    heartbeats: int = 0
    earlier_rows: dict[int, int] = field(default_factory=dict)  # shard -> rows its journal held as this run began

    # -- rate ---------------------------------------------------------------------------------------------

    def set_expected(self, n: int) -> None:
        self.expected = max(1, n)

    def lease(self, worker: str) -> RateLease:
        """A share of the rate limits for `lease_s`: the fair share, or what the other unexpired leases leave."""
        self.lease_calls += 1
        now = self.clock()
        for w in [w for w, h in self.leases.items() if h.expires <= now or w == worker]:
            del self.leases[w]
        rpm = tpm = None
        held = _Held(expires=now + self.lease_s)
        if self.requests_per_minute is not None:
            others = sum(h.rpm for h in self.leases.values())
            held.rpm = max(0.0, min(self.requests_per_minute / self.expected, self.requests_per_minute - others))
            rpm = held.rpm
        if self.tokens_per_minute is not None:
            others = sum(h.tpm for h in self.leases.values())
            held.tpm = max(0.0, min(self.tokens_per_minute / self.expected, self.tokens_per_minute - others))
            tpm = held.tpm
        self.leases[worker] = held
        return RateLease(rpm, tpm, self.lease_s)

    def release(self, worker: str) -> None:
        self.leases.pop(worker, None)

    # -- budget -------------------------------------------------------------------------------------------

    def budget(self, worker: str, want: float, give_back: float = 0.0, spent: float = 0.0, need: float = 0.0
               ) -> float:
        """Take back `give_back`, then grant up to `want` dollars and at least `need` (the worst case of the row
        that asks), or nothing when less than `need` is left: the worker then waits for its own calls in flight,
        or, with none, says it is `starved`. A grant is never refused for want of a whole chunk: what is left
        of the cap may be less, and a row that fits it is sent, as one process sends it."""
        self.budget_calls += 1
        self.spent_usd += spent
        mine = self.granted_usd.get(worker, 0.0) - give_back
        self.granted_usd[worker] = max(0.0, mine)
        if self.max_cost_usd is None:
            return math.inf
        if want <= 0:
            self.starving.pop(worker, None)  # done with its shard
            return 0.0
        room = self._room()
        if room + 1e-12 < min(need if need > 0 else want, want):
            return 0.0
        got = max(0.0, min(want, room))
        self.granted_usd[worker] += got
        self.starving.pop(worker, None)
        return got

    def starved(self, worker: str, need: float) -> bool:
        """A worker with nothing in flight and no dollars of its own left, whose next row (worst case `need`)
        does not fit what is left of the cap. True once the job's budget is reached: every worker that still
        has work is starved (so none holds dollars a row could use: each gave its rest back before asking) and
        no starved row fits what is left. Until then the worker asks again, as one process waits for its calls
        in flight: another worker may give dollars back."""
        now = self.clock()
        self.starving[worker] = (need, now)
        for w in [w for w, (_, t) in self.starving.items() if now - t > STARVED_FRESH_S]:
            del self.starving[w]  # a worker that stopped asking (killed, replaced)
        if self.max_cost_usd is None:
            return False
        room = self._room()
        if (not self.budget_exhausted and len(self.starving) >= self.expected
                and all(room + 1e-12 < n for n, _ in self.starving.values())):
            self.budget_exhausted = True
        return self.budget_exhausted

    def _room(self) -> float:
        assert self.max_cost_usd is not None
        return self.max_cost_usd - self.spent_before - sum(self.granted_usd.values())

    # -- shards ------------------------------------------------------------------------------------------

    def earlier(self, shard: int, journaled: int) -> int:
        """How many of a shard's journaled rows earlier runs answered: what its first attempt in this run found.
        A shard whose worker died is resumed by another attempt that finds those rows and the first attempt's
        too; only the coordinator, which lives as long as the run, can tell them apart."""
        return self.earlier_rows.setdefault(shard, journaled)

    # -- heartbeat ----------------------------------------------------------------------------------------

    def heartbeat(self, worker: str, progress: dict[str, float] | None = None, pause_until: float = 0.0
                  ) -> tuple[float, bool, int]:
        """Progress and a pause from a worker; the job's pause, stop flag and version back."""
        self.heartbeats += 1
        if progress:
            for k, v in progress.items():
                self.totals[k] = self.totals.get(k, 0.0) + v
        if pause_until > self.pause_until:
            self.pause_until = pause_until
            self.version += 1
        return self.pause_until, self.stopping, self.version

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.version += 1

    def snapshot(self) -> dict[str, Any]:
        return {"totals": dict(self.totals), "lease_calls": self.lease_calls, "budget_calls": self.budget_calls,
                "heartbeats": self.heartbeats, "budget_exhausted": self.budget_exhausted,
                "spent_usd": self.spent_usd, "stopping": self.stopping}


# -- the worker's side --------------------------------------------------------------------------------------


class Pacer:
    """A leaky bucket whose rate may change without a new burst (GCRA: the theoretical arrival time carries
    over). Holds at most `burst_s` of the rate ahead, as `limits.RateLimits` does."""

    def __init__(self, per_minute: float, burst_s: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second = per_minute / 60.0
        self.burst_s = burst_s
        self.clock = clock
        self.tat = 0.0  # when the bucket is empty again

    def set_rate(self, per_minute: float) -> None:
        self.per_second = per_minute / 60.0

    def wait_time(self, units: float) -> float:
        """Seconds to wait before `units` may go (0: now); inf while the rate is 0."""
        if self.per_second <= 0:
            return math.inf
        now = self.clock()
        tat = max(self.tat, now)
        # up to `burst_s` of the rate (and at least this call) may go at once
        allowed = max(self.burst_s, units / self.per_second)
        return max(0.0, tat + units / self.per_second - allowed - now)

    def take(self, units: float) -> None:
        if self.per_second > 0:
            self.tat = max(self.tat, self.clock()) + units / self.per_second


class LeasedLimits(RateLimits):
    """`RateLimits` for one worker of a job: paced at its lease's share, renewed every half lease."""

    def __init__(self, call: Call, worker: str, requests_per_minute: float | None, tokens_per_minute: float | None,
                 max_call_tokens: float) -> None:
        super().__init__(None, None, max_call_tokens)
        self._call = call
        self._worker = worker
        self._has_rpm = requests_per_minute is not None
        self._has_tpm = tokens_per_minute is not None
        self._max_call = min(max_call_tokens, tokens_per_minute) if tokens_per_minute else max_call_tokens
        self._requests_p = Pacer(0.0)
        self._tokens_p = Pacer(0.0)
        self._renew_at = 0.0
        self._expires = 0.0
        self._lock = anyio.Lock()

    @property
    def active(self) -> bool:
        return self._has_rpm or self._has_tpm

    async def _lease(self) -> None:
        async with self._lock:
            now = time.monotonic()
            if now < self._renew_at:
                return
            lease: RateLease = await self._call("lease", self._worker)
            # Counted from before the call: the coordinator's clock started no later than that.
            self._expires = now + lease.seconds * 0.9
            self._renew_at = now + lease.seconds / 2
            if lease.rpm is not None:
                self._requests_p.set_rate(lease.rpm)
            if lease.tpm is not None:
                self._tokens_p.set_rate(lease.tpm)

    async def acquire(self, tokens: float) -> None:
        if not self.active:
            return
        units = min(tokens, self._max_call)
        while True:
            now = time.monotonic()
            if now >= self._renew_at:
                await self._lease()
                continue
            wait = 0.0
            if self._has_tpm:
                wait = self._tokens_p.wait_time(units)
            if self._has_rpm:
                wait = max(wait, self._requests_p.wait_time(1))
            if wait == 0:
                if now >= self._expires:
                    self._renew_at = 0.0  # the lease ran out while waiting: renew before sending
                    continue
                if self._has_tpm:
                    self._tokens_p.take(units)
                if self._has_rpm:
                    self._requests_p.take(1)
                return
            # a zero share waits for the others to shrink at their renewal; never past the lease's renewal
            await anyio.sleep(min(wait, 0.25, max(0.01, self._renew_at - now)))

    async def close(self) -> None:
        if self.active:
            await self._call("release", self._worker)


class LeasedCooldown(Cooldown):
    """The 429 pause for the whole job: a worker's pause goes to the coordinator at once; the others learn it at
    their next heartbeat (every `heartbeat_s`) and hold their sends as this worker does."""

    def __init__(self, notify: Callable[[float], None]) -> None:
        super().__init__()
        self._notify = notify

    def extend(self, seconds: float) -> None:
        super().extend(seconds)
        self._notify(time.time() + seconds)

    def pause_until_wall(self, wall: float) -> None:
        left = wall - time.time()
        if left > 0:
            self.until = max(self.until, time.monotonic() + left)


class LeasedBudget(Budget):
    """`Budget` for one worker: reserves from a chunk of the job's cap granted by the coordinator."""

    def __init__(self, call: Call, worker: str, cap: float | None, chunk: float, spent_before: float = 0.0) -> None:
        super().__init__(cap, spent_before)
        self._call = call
        self._worker = worker
        self.chunk = chunk
        self.granted = 0.0  # this worker's chunks so far, less what was given back
        self.used = 0.0  # reserved + spent from them
        self._unreported = 0.0
        self._lock = anyio.Lock()
        # True once the worker stops sending (a stop, a refused key): a row waiting for dollars gives up
        self.give_up: Callable[[], bool] = lambda: False

    def reserve(self, worst: float) -> bool:
        if self.cap is None:
            return True
        if self.used + worst > self.granted + 1e-12:
            return False
        self.used += worst
        self.reserved += worst
        self.in_flight += 1
        return True

    async def areserve(self, worst: float) -> bool:
        """Reserve `worst`, from this worker's dollars or new ones. False while this worker's own calls in flight
        may free enough (the caller waits for them), or once the job's budget is reached. With nothing in flight
        here it waits for the other workers instead: a row that fits the job's cap is not refused because
        another worker holds the dollars (that one gives them back when its own next row does not fit)."""
        if self.cap is None:
            return True
        async with self._lock:
            while not self.reserve(worst):
                # what is left here goes back with the ask: kept, it could strand a row another worker can send
                free = max(0.0, self.granted - self.used)
                self.granted -= free
                got: float = await self._call("budget", self._worker, max(self.chunk, worst), free,
                                              self._take_unreported(), worst)
                self.granted += got
                if got:
                    continue
                if self.in_flight or self.give_up():
                    return False
                if self.granted - self.used > 1e-12:
                    # a call settled while we asked and left dollars here: they fit this row, or go back first
                    # (a starved worker holding dollars would stop the job while a row still fits)
                    continue
                if await self._call("starved", self._worker, worst):
                    return False
                with anyio.move_on_after(STARVED_POLL_S):
                    await self.changed()
            return True

    def settle(self, worst: float, actual: float | None, *, answered: bool) -> None:
        if self.cap is None:
            return
        spent = (worst if actual is None else actual) if answered else 0.0
        self.used -= worst - spent
        self.spent += spent
        self._unreported += spent
        self._release(worst)

    def charge(self, worst: float) -> None:
        """An attempt of unknown outcome: its worst case counts as spent (and stays used from the chunk)."""
        if self.cap is None:
            return
        self.spent += worst
        self.unconfirmed += worst
        self._unreported += worst
        self._release(worst)

    def _take_unreported(self) -> float:
        spent, self._unreported = self._unreported, 0.0
        return spent

    async def close(self) -> None:
        """Give back what this worker did not spend or reserve."""
        if self.cap is None:
            return
        back = max(0.0, self.granted - self.used)
        if back or self._unreported:
            await self._call("budget", self._worker, 0.0, back, self._take_unreported())
            self.granted -= back
