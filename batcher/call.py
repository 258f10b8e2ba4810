"""One row's attempts: dedupe of in-flight duplicates, the budget reservation, the 429 pause, the limiter, the
call, and retry/fallback as `routing.decide` says, until the row has its record.

It knows a body, a client and the records it writes, not the wire shape: a client is anything with
`complete(body, stream=..., deadline_s=...)` that returns an answer with `to_record()` or raises `AttemptFailed`.

Budget: a row's worst case is reserved before its first attempt, and again before a retry that follows an attempt
whose outcome is unknown (that one's worst case was charged as spent). A row that does not fit waits for calls in
flight to settle; the budget is reached (`budget_hit`) only when nothing is in flight and it still does not fit.

Stopping: after `stop()` (the first Ctrl-C) no request leaves, neither a row's first attempt nor a retry
waiting out its backoff; such a row returns None (not answered: a rerun asks it). A refused key (401/403)
calls `on_fatal` and every row still to send returns None too.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from .budget import Budget, SpendLog, body_models, worst_case
from .client import AttemptFailed
from .errors import FatalRequestError
from .limits import Cooldown, RateLimits
from .prices import PriceTable
from .routing import Backoff, RoutePlan, decide
from .sources import SourceRow

__all__ = ["Answer", "Caller", "Client", "Records", "Work"]


class Answer(Protocol):
    def to_record(self) -> dict[str, Any]: ...


class Client(Protocol):
    async def complete(self, body: dict[str, Any], *, stream: bool, deadline_s: float) -> Answer: ...


@dataclass(slots=True)
class Work:
    row: SourceRow
    body: dict[str, Any]
    key: str | None  # cache key; None when the job has no cache
    est_tokens: float  # what the tokens_per_minute limiter is charged


class Records:
    """The journal records of a row: ok, error, or an answer from the cache."""

    def __init__(self, prices: PriceTable) -> None:
        self.prices = prices

    @staticmethod
    def record(row: SourceRow, **fields: Any) -> dict[str, Any]:
        # `_i` first: the sink sorts the journal into input order by it without parsing whole lines
        rec: dict[str, Any] = {"_i": row.index, "id": row.id}
        if row.keep:
            rec["keep"] = row.keep
        rec.update(fields)
        return rec

    def error(self, row: SourceRow, kind: str, message: str, **extra: Any) -> dict[str, Any]:
        return self.record(row, **{"status": "error", "error_kind": kind, "error": message, "cached": False,
                                   "attempts": 0, **extra})

    def cost(self, model: str, asked_model: str, comp: dict[str, Any]) -> float | None:
        """The answer's cost at the price of the model that answered; None (unpriced) when it has none. A
        server may name the asked model without its provider prefix (`gpt-4o` for `openai/gpt-4o`): that is
        the asked model, not another one."""
        priced = model
        if self.prices.get(model) is None and "/" not in model and asked_model.rpartition("/")[2] == model:
            priced = asked_model
        return self.prices.cost(priced, comp.get("prompt_tokens"), comp.get("completion_tokens"),
                                comp.get("cached_tokens"))

    def ok(self, row: SourceRow, comp: dict[str, Any], *, cached: bool, attempts: int, latency_ms: float,
           asked_model: str) -> dict[str, Any]:
        model = comp.get("model") or asked_model
        cost = 0.0 if cached else self.cost(model, asked_model, comp)
        rec = self.record(row, status="ok", cached=cached, attempts=attempts, latency_ms=latency_ms,
                          http_status=None if cached else 200, cost_usd=cost)
        rec.update(comp)
        rec["model"] = model
        return rec


class Caller:
    """The attempt loop shared by every worker of a run."""

    def __init__(
        self,
        *,
        plan: RoutePlan,
        records: Records,
        budget: Budget,
        limits: RateLimits,
        on_fatal: Callable[[FatalRequestError], None],
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        cooldown: Cooldown | None = None,
        verbose: bool = False,
        recent_max: int = 1024,
        spend_log: SpendLog | None = None,
    ) -> None:
        self.plan = plan
        self.records = records
        self.budget = budget
        self.limits = limits
        self.on_fatal = on_fatal
        self.backoff = backoff or Backoff()
        self.rng = rng or random.Random()
        self.cooldown = cooldown or Cooldown()
        self.verbose = verbose
        self.fatal: FatalRequestError | None = None
        self.budget_hit = False
        self.needed = 0.0  # the worst case of the row that did not fit, once `budget_hit`
        self.spend_log = spend_log
        self.stopping = anyio.Event()
        self._inflight: dict[str, anyio.Event] = {}
        self._recent: dict[str, dict[str, Any]] = {}
        self._recent_max = recent_max

    @property
    def halted(self) -> bool:
        """No request may leave: stopping, or the key was refused."""
        return self.fatal is not None or self.stopping.is_set()

    def stop(self) -> None:
        """No new request from now on, retries included; calls on the wire finish."""
        self.stopping.set()
        self.budget.wake()

    def _remember(self, key: str, completion: dict[str, Any]) -> None:
        """Answers of this run by cache key, so a duplicate row makes no second call. The feeder looked the
        cache up a batch ahead, so remembering the last few batches' worth closes the gap; older ones are in
        the cache by then."""
        self._recent[key] = completion
        if len(self._recent) > self._recent_max:
            self._recent.pop(next(iter(self._recent)))

    async def work(self, item: Work, client: Client) -> dict[str, Any] | None:
        """The row's record, or None when it was not sent (stopped, budget, refused key)."""
        if self.halted or self.budget_hit:
            return None
        key = item.key
        if key is not None:
            done = self._recent.get(key)
            if done is None and key in self._inflight:
                await self._inflight[key].wait()
                done = self._recent.get(key)
            if done is not None:
                return self.records.ok(item.row, done, cached=True, attempts=0, latency_ms=0.0,
                                       asked_model=item.body["model"])
            self._inflight[key] = anyio.Event()
        try:
            return await self._call(item, client)
        finally:
            if key is not None:
                ev = self._inflight.pop(key, None)
                if ev is not None:
                    ev.set()

    async def _sleep(self, seconds: float) -> bool:
        """Wait, or less if the run is stopping; False when it is."""
        with anyio.move_on_after(seconds):
            await self.stopping.wait()
        return not self.halted

    def _worst(self, item: Work) -> tuple[float, dict[str, Any] | None]:
        """The row's worst case (0 without a cap), or an error row when it cannot be priced. Every model that
        may answer counts: the row's, the plan's, and any routing in an OpenAI Batch line's own body."""
        if not self.budget.enforced:
            return 0.0, None
        row = item.row
        models = list(dict.fromkeys([item.body["model"], *self.plan.may_answer, *body_models(item.body)]))
        worst = worst_case(self.records.prices, models, row.prompt or "", item.body)
        if worst is None:
            missing = [m for m in models if self.records.prices.get(m) is None]
            return 0.0, self.records.error(
                row, "budget", f"no price for {missing[0]!r} (one of {models}, the models that may answer this "
                "row): limits.max_cost_usd cannot be enforced, so the row was not sent")
        return worst, None

    async def _hold(self, worst: float) -> bool:
        """Reserve `worst`, waiting while calls in flight may free enough; False when the run is stopping or
        the budget is reached (nothing in flight, and it still does not fit)."""
        if not self.budget.enforced:
            return not self.halted
        while not self.budget.reserve(worst):
            if self.halted or self.budget_hit:
                return False
            if self.budget.in_flight == 0:
                self.budget_hit = True
                self.needed = worst
                self.budget.wake()  # the rows waiting behind this one stop too
                return False
            await self.budget.changed()
        if self.halted or self.budget_hit:
            self.budget.settle(worst, None, answered=False)
            return False
        return True

    async def _call(self, item: Work, client: Client) -> dict[str, Any] | None:
        row, plan = item.row, self.plan
        models = [item.body["model"], *plan.models[1:]]
        model_i = 0
        body = item.body
        attempts = retries = contract_retries = rate_limited = 0
        waited = 0.0  # told to wait by 429s, this row
        started: float | None = None  # the first attempt's send: queueing at the limiter is not latency
        stream = bool(body.get("stream"))
        worst, refused = self._worst(item)
        if refused is not None:
            return refused
        held = False  # a reservation of `worst` for the next (or current) attempt
        sending = False
        unconfirmed = 0.0  # worst cases charged for this row's attempts of unknown outcome
        enforced = self.budget.enforced
        try:
            while True:
                if not held:
                    if not await self._hold(worst):
                        return None
                    held = True
                await self.cooldown.wait()
                await self.limits.acquire(item.est_tokens)
                # Again: a 429 may have paused the pool while this worker queued at the limiter.
                await self.cooldown.wait()
                if self.halted:  # nothing awaited from here to the send: no request leaves after a stop
                    return None
                attempts += 1
                if started is None:
                    started = time.perf_counter()
                if self.spend_log is not None:
                    self.spend_log.sent(row.id, worst)  # before the send: a kill now still counts it
                sending = True
                try:
                    comp = await client.complete(body, stream=stream, deadline_s=plan.call_timeout_s)
                except AttemptFailed as exc:
                    sending = False
                    failure = exc.failure
                    if failure.maybe_billed and enforced:
                        self.budget.charge(worst)
                        held = False
                        unconfirmed += worst
                    d = decide(plan, failure, retries_used=retries, contract_retries_used=contract_retries,
                               has_next_model=model_i + 1 < len(models), backoff=self.backoff, rng=self.rng,
                               rate_limited=rate_limited, rate_limit_waited_s=waited)
                    if self.verbose:
                        then = f"retry in {d.delay:.2f} s" if d.action == "retry" else d.action
                        if d.pause_pool:
                            then += " (the whole pool waits)"
                        # failure.message was redacted by the client: it cannot carry the key
                        print(f"batcher: row {row.id!r} attempt {attempts} ({body['model']}): {failure.message} -> {then}",
                              file=sys.stderr, flush=True)
                    if d.action == "fatal":
                        if self.fatal is None:
                            self.fatal = FatalRequestError(
                                f"the server refused the API key (HTTP {failure.status}): {failure.message}",
                                failure.status or 401,
                            )
                            self.budget.wake()
                            self.on_fatal(self.fatal)
                        return None
                    if d.action == "retry":
                        if d.pause_pool:
                            rate_limited += 1
                            waited += d.delay
                            self.cooldown.extend(d.delay)
                        elif failure.kind == "contract":
                            contract_retries += 1
                        else:
                            retries += 1
                        if not await self._sleep(d.delay):
                            return None
                        continue
                    if d.action == "fallback":
                        model_i += 1
                        retries = contract_retries = 0
                        body = {**item.body, "model": models[model_i]}
                        continue
                    extra = {"unconfirmed_usd": unconfirmed} if unconfirmed else {}
                    return self.records.error(
                        row, failure.kind, failure.message, http_status=failure.status, attempts=attempts,
                        model=body["model"], latency_ms=(time.perf_counter() - started) * 1000, **extra,
                    )
                sending = False
                answer = comp.to_record()
                rec = self.records.ok(row, answer, cached=False, attempts=attempts,
                                      latency_ms=(time.perf_counter() - started) * 1000, asked_model=body["model"])
                if unconfirmed:
                    rec["unconfirmed_usd"] = unconfirmed
                held = False
                self.budget.settle(worst, rec.get("cost_usd"), answered=True)
                if item.key is not None:
                    self._remember(item.key, answer)
                    rec["_cache"] = (item.key, answer)
                return rec
        finally:
            if held:
                # Cancelled mid-call (second Ctrl-C, grace over, a refused key): the server may bill it.
                if sending:
                    self.budget.charge(worst)
                else:
                    self.budget.settle(worst, None, answered=False)
