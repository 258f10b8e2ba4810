"""One row's attempts: dedupe of in-flight duplicates, the budget reservation, the 429 pause, the limiter, the
call, and retry/fallback as `routing.decide` says, until the row has its record.

It knows a body, a client and the records it writes, not the wire shape: a client is anything with
`complete(body, stream=..., deadline_s=...)` that returns an answer or raises `AttemptFailed`, and the job's
shape turns the answer into the row's fields (`shape.record`). An answer that breaks the job's json_schema
(`SchemaViolation`) is a failure of kind "schema", asked again once as a contract failure is; a refusal where a
schema needs an answer (`Refused`) is an error row of kind "refusal" at once. Either answer was paid for: its
cost is on the row and in the budget.

Budget: a row's worst case is reserved before its first attempt, and again before an attempt that follows one
that may have been billed (an unknown outcome, charged at its worst case; a paid answer that broke the schema,
charged its cost). A row that does not fit waits for calls in flight to settle; the budget is reached
(`budget_hit`) only when nothing is in flight and it still does not fit.

Stopping: after `stop()` (the first Ctrl-C) no request leaves, neither a row's first attempt nor a retry
waiting out its backoff; such a row returns None (not answered: a rerun asks it). A refused key (401/403)
calls `on_fatal` and every row still to send returns None too.
"""

from __future__ import annotations

import json
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
from .routing import Backoff, Failure, RoutePlan, decide
from .shapes import Refused, SchemaViolation
from .sources import SourceRow

__all__ = ["Answer", "Caller", "Client", "Records", "Work", "encode_body"]


class Answer(Protocol):
    def to_record(self) -> dict[str, Any]: ...


class Recorder(Protocol):
    """What the attempt loop needs of a shape: an answer's output fields, or SchemaViolation / Refused."""

    def record(self, answer: Any) -> dict[str, Any]: ...


class _PlainRecorder:
    def record(self, answer: Any) -> dict[str, Any]:
        rec: dict[str, Any] = answer.to_record()
        return rec


class Client(Protocol):
    async def complete(self, body: dict[str, Any] | bytes, *, stream: bool, deadline_s: float) -> Answer: ...


@dataclass(slots=True)
class Work:
    """A row's call. Once `seal`ed it holds its body as the bytes that are sent and nothing else of the prompt:
    a call in flight of a 500 KB document is ~500 KB, not its row's value, its rendered prompt (a str, up to
    4 bytes a character), the text counted for tokens and the body's bytes besides."""

    row: SourceRow
    body: dict[str, Any]  # the whole body; once sealed, its fields but the prompt or messages (`content` has them)
    key: str | None  # cache key; None when the job has no cache
    est_tokens: float  # what the tokens_per_minute limiter is charged
    prompt_text: str | None = None  # all the text the body sends (shape.prompt_text); None: the row's prompt
    content: bytes | None = None  # the body encoded (`encode_body`), once sealed
    prompt_bound: int | None = None  # once sealed: the prompt's worst-case token bound for the budget

    def seal(self) -> None:
        """Encode the body once, keep what the attempts need (the model, routing and token fields, the worst
        case's prompt bound) and let go of every str of the prompt: the row's, the body's, `prompt_text`'s.
        Done only for a row that will be called: a cache hit never needs its body's bytes."""
        from .attachments import media_tokens

        text = self.prompt_text if self.prompt_text is not None else self.row.prompt
        assert isinstance(text, str)
        self.content = encode_body(self.body)
        # UTF-8 bytes bound a byte-level BPE tokenizer's tokens (`budget.worst_case`); media have their own bound.
        self.prompt_bound = len(text.encode("utf-8", "surrogatepass")) + media_tokens(self.body)[2]
        head = {k: v for k, v in self.body.items() if k not in _PROMPT_FIELDS}
        orq = self.body.get("orq")
        if isinstance(orq, dict) and "inputs" in orq:  # its routing stays (`body_models`), a row's inputs go
            head["orq"] = {k: v for k, v in orq.items() if k != "inputs"}
        self.body = head
        self.prompt_text = None
        row = self.row
        row.prompt = row.inputs = row.body = None

    @property
    def nbytes(self) -> int:
        """What the item holds, for the work buffer's byte budget."""
        return len(self.content) if self.content is not None else self.row.nbytes


# The body fields that carry the prompt (and orq.inputs, below): `seal` keeps them only in the encoded body.
_PROMPT_FIELDS = frozenset({"prompt", "messages"})


def encode_body(body: dict[str, Any]) -> bytes:
    """A body as it goes on the wire. allow_nan=False: a body must be strict JSON (RFC 8259); sources map NaN
    and ±Infinity to null first."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _with_model(content: bytes, model: str) -> bytes:
    """A sealed body asking `model` instead (a fallback): decoded and encoded again, rare enough to pay for."""
    body = json.loads(content)
    body["model"] = model
    return encode_body(body)


# The token counts of a billed answer that add up on its row (with the row's other answers).
PAID_TOKENS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


# A cache hit's fields between its id and its answer's, as `Records.ok` sets them (in `cached_line`).
_CACHED_FIELDS = '"status":"ok","cached":true,"attempts":0,"latency_ms":0.0,"http_status":null,"cost_usd":0.0,'


class Records:
    """The journal records of a row: ok, error, or an answer from the cache."""

    def __init__(self, prices: PriceTable) -> None:
        self.prices = prices

    @staticmethod
    def record(row: SourceRow, **fields: Any) -> dict[str, Any]:
        # `_i` first: the sink sorts the journal into input order by it without parsing whole lines
        rec: dict[str, Any] = {"_i": row.index, "id": row.id}
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

    @staticmethod
    def for_cache(answer: dict[str, Any], model: str) -> dict[str, Any]:
        """What the cache keeps of an answer: its fields, led by the model that answered (the asked one when
        the server named none), which `cached_line` relies on."""
        stored: dict[str, Any] = {"model": model}
        stored.update((k, v) for k, v in answer.items() if k != "model")
        return stored

    def cached_line(self, row: SourceRow, text: str) -> bytes | None:
        """The journal line of `row` answered from the cache, whose record is the JSON `text`: the line
        `ok(row, json.loads(text), cached=True, attempts=0, latency_ms=0.0, ...)` would encode, spliced from the
        text instead of decoded and encoded again (that was most of a cached rerun's CPU). None for a text
        that `for_cache` did not write (an older cache's): that takes the long way."""
        if not (text.startswith('{"model":"') and text.endswith("}")):
            return None
        try:
            ident = str(row.id) if type(row.id) is int else json.dumps(row.id, ensure_ascii=False)
            return f'{{"_i":{row.index},"id":{ident},{_CACHED_FIELDS}{text[1:]}\n'.encode()
        except (TypeError, ValueError, UnicodeEncodeError):  # an id JSON cannot hold as it is: the long way
            return None

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
        shape: Recorder | None = None,
        spend_log: SpendLog | None = None,
    ) -> None:
        self.plan = plan
        self.shape: Recorder = shape or _PlainRecorder()
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
        if item.prompt_bound is not None:
            worst = worst_case(self.records.prices, models, item.prompt_bound, item.body)
        else:
            text = item.prompt_text if item.prompt_text is not None else row.prompt if isinstance(row.prompt, str) \
                else ""
            worst = worst_case(self.records.prices, models, text, item.body)
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
        while not await self.budget.areserve(worst):
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

    def _paid(self, paid: dict[str, Any], answer: Any, asked_model: str) -> dict[str, Any]:
        """`paid` plus one billed answer that did not become the row's: its tokens and cost (None: unpriced)."""
        fields = answer.to_record()
        model = fields.get("model") or asked_model
        cost = self.records.cost(model, asked_model, fields)
        out = dict(paid)
        for k in PAID_TOKENS:
            if fields.get(k) is not None:
                out[k] = (out.get(k) or 0) + fields[k]
        out["cost_usd"] = None if cost is None or ("cost_usd" in paid and paid["cost_usd"] is None) \
            else (paid.get("cost_usd") or 0.0) + cost
        out["text"] = fields.get("text")  # the last refused answer, as it came
        return out

    def _charge_paid(self, paid: dict[str, Any], comp: Any, model: str) -> tuple[dict[str, Any], float | None]:
        """`paid` with one more billed answer that did not become the row's, and that answer's cost."""
        before = paid.get("cost_usd") or 0.0
        paid = self._paid(paid, comp, model)
        return paid, None if paid["cost_usd"] is None else paid["cost_usd"] - before

    async def _call(self, item: Work, client: Client) -> dict[str, Any] | None:
        row, plan = item.row, self.plan
        models = [item.body["model"], *plan.models[1:]]
        model_i = 0
        body = item.body
        payload: dict[str, Any] | bytes = item.content if item.content is not None else body
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
        paid: dict[str, Any] = {}  # tokens and cost of answers refused by the shape (schema, refusal)
        failure: Failure | None = None
        enforced = self.budget.enforced

        def spent() -> dict[str, Any]:
            """What this row may have cost besides its answer, for its record."""
            return {**paid, **({"unconfirmed_usd": unconfirmed} if unconfirmed else {})}

        try:
            while True:
                if not held:
                    if not await self._hold(worst):
                        if failure is not None and not self.halted and (paid or unconfirmed):
                            # Asked before, and paid (or maybe paid) for: its record keeps what it cost.
                            return self.records.error(
                                row, failure.kind, f"{failure.message}; not asked again: another attempt might "
                                "pass limits.max_cost_usd", http_status=failure.status, attempts=attempts,
                                model=body["model"], latency_ms=(time.perf_counter() - (started or 0.0)) * 1000,
                                **spent())
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
                failure = None
                answer: dict[str, Any] | None = None
                sending = True
                try:
                    comp = await client.complete(payload, stream=stream, deadline_s=plan.call_timeout_s)
                except AttemptFailed as exc:
                    sending = False
                    failure = exc.failure
                    if failure.maybe_billed and enforced:
                        self.budget.charge(worst)
                        held = False
                        unconfirmed += worst
                else:
                    sending = False
                    try:
                        answer = self.shape.record(comp)
                    except SchemaViolation as exc:
                        # The broken answer was billed: charge it now; the next attempt is reserved anew, so
                        # that asking again cannot take the spend past the cap.
                        paid, cost = self._charge_paid(paid, comp, body["model"])
                        held = False
                        self.budget.settle(worst, cost, answered=True)
                        failure = Failure("schema", f"the answer breaks the response format: {exc}", status=200)
                    except Refused as exc:
                        paid, cost = self._charge_paid(paid, comp, body["model"])
                        held = False
                        self.budget.settle(worst, cost, answered=True)
                        return self.records.error(
                            row, "refusal", f"the model refused: {exc.refusal}", http_status=200, attempts=attempts,
                            model=body["model"], latency_ms=(time.perf_counter() - started) * 1000,
                            refusal=exc.refusal, **spent())
                if failure is not None:
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
                        elif failure.kind in ("contract", "schema"):
                            contract_retries += 1
                        else:
                            retries += 1
                        if not await self._sleep(d.delay):
                            if paid:  # a billed answer is on a row, even when the run stops before asking again
                                return self.records.error(
                                    row, failure.kind, f"{failure.message}; not asked again: the run stopped",
                                    http_status=failure.status, attempts=attempts, model=body["model"],
                                    latency_ms=(time.perf_counter() - started) * 1000, **spent())
                            return None
                        continue
                    if d.action == "fallback":
                        model_i += 1
                        retries = contract_retries = 0
                        body = {**item.body, "model": models[model_i]}
                        payload = body if item.content is None else _with_model(item.content, models[model_i])
                        continue
                    return self.records.error(
                        row, failure.kind, failure.message, http_status=failure.status, attempts=attempts,
                        model=body["model"], latency_ms=(time.perf_counter() - started) * 1000, **spent(),
                    )
                assert answer is not None
                rec = self.records.ok(row, answer, cached=False, attempts=attempts,
                                      latency_ms=(time.perf_counter() - started) * 1000, asked_model=body["model"])
                actual = rec.get("cost_usd")
                held = False
                self.budget.settle(worst, actual, answered=True)
                if paid:  # the row cost its refused answers too: their tokens and cost are on it
                    rec["cost_usd"] = None if actual is None or paid.get("cost_usd") is None \
                        else actual + paid["cost_usd"]
                    for k in PAID_TOKENS:
                        if paid.get(k) is not None:
                            rec[k] = (rec.get(k) or 0) + paid[k]
                if unconfirmed:
                    rec["unconfirmed_usd"] = unconfirmed
                if item.key is not None:
                    self._remember(item.key, answer)
                    rec["_cache"] = (item.key, self.records.for_cache(answer, rec["model"]))
                return rec
        finally:
            if held:
                # Cancelled mid-call (second Ctrl-C, grace over, a refused key): the server may bill it.
                if sending:
                    self.budget.charge(worst)
                else:
                    self.budget.settle(worst, None, answered=False)
