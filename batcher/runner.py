"""Wires the steps of a job together: spec -> source -> request -> [cache] -> limiter -> call -> journal -> output.

`run_job` (and its async twin `arun_job`) is the Python API; the CLI is a thin layer over it. Everything that
can be checked is checked before the first request: the spec, the input (ids, columns), the output path, the
key, the resume state. A row's failure becomes an error row; only a refused key (401/403), a sink failure or
a signal stops the run early, and each leaves it resumable.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
from anyio.abc import ObjectSendStream

from .cache import ResponseCache
from .client import AttemptFailed, Endpoint, WorkerClient
from .errors import FatalRequestError, OutputError, ResumeError, SpecError
from .limits import Cooldown, RateLimits
from .pool import Pool, WorkSender
from .prices import Price, PriceTable
from .progress import Progress
from .routing import Backoff, RoutePlan, decide, plan_for
from .sinks import (
    JobLock,
    Journal,
    RunState,
    compact_journal,
    finalize,
    fingerprint,
    input_identity,
    output_schema,
    state_dir_for,
)
from .sources import Source, SourceInfo, SourceRow
from .spec import JobSpec, format_of, load_spec
from .wire import BodyBuilder, cache_key

__all__ = ["RunOptions", "RunResult", "arun_job", "run_job"]


@dataclass(frozen=True)
class RunOptions:
    output: Path | None = None
    limit: int | None = None
    quiet: bool = False
    fresh: bool = False
    prices: PriceTable | None = None
    backoff: Backoff = field(default_factory=Backoff)
    handle_signals: bool = True
    progress: bool | None = None  # None: only when stderr is a terminal
    base_url: str | None = None  # overrides endpoint.base_url (tests, benchmarks)
    seed: int | None = None  # backoff jitter; None = random
    verbose: bool = False  # one stderr line per failed attempt and what batcher does about it
    wait: bool = False  # another run of the job holds its lock: wait for it instead of refusing (exit 8)


@dataclass
class RunResult:
    output: Path
    status: str  # finished | nothing_to_do | interrupted | budget | fatal | failed
    rows: int = 0
    ok: int = 0
    errors: int = 0
    cached: int = 0
    skipped: int = 0  # already done by an earlier run
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    wall_s: float = 0.0
    message: str = ""
    signal: int | None = None

    @property
    def exit_code(self) -> int:
        if self.status in ("finished", "nothing_to_do"):
            return 0
        if self.status == "interrupted":
            return 128 + (self.signal or signal.SIGINT)
        if self.status == "budget":
            return 7
        if self.status == "fatal":
            return FatalRequestError.exit_code
        return 1

    def summary(self) -> str:
        parts = [
            f"{self.ok} ok",
            f"{self.errors} error",
            f"{self.cached} cached",
        ]
        if self.skipped:
            parts.append(f"{self.skipped} done earlier")
        tokens = f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion tokens"
        cost = f", ${self.cost_usd:.4f}" if self.cost_usd else ""
        return f"{', '.join(parts)}; {tokens}{cost}; {self.attempts} calls in {self.wall_s:.1f} s -> {self.output}"


# What the writer receives: a worker's row (None when the row was not sent: budget, fatal stop), or a list of
# rows the feeder settled without a call.
_Result = dict[str, Any] | list[dict[str, Any]] | None


@dataclass(slots=True)
class _Work:
    row: SourceRow
    body: dict[str, Any]
    key: str | None
    est_tokens: float


class _Budget:
    """Spend so far plus the worst case of every call in flight never passes the cap."""

    def __init__(self, cap: float | None) -> None:
        self.cap = cap
        self.spent = 0.0
        self.reserved = 0.0

    def reserve(self, worst: float) -> bool:
        if self.cap is None:
            return True
        if self.spent + self.reserved + worst > self.cap:
            return False
        self.reserved += worst
        return True

    def settle(self, worst: float, actual: float | None) -> None:
        if self.cap is None:
            return
        self.reserved -= worst
        self.spent += actual or 0.0


def _api_key(spec: JobSpec, base_url: str) -> str | None:
    env = spec.endpoint.api_key_env
    key = os.environ.get(env) if env else None
    host = urllib.parse.urlsplit(base_url).hostname if base_url != "local" else "local"
    # orq itself always needs a key; a gateway on this machine (ours, or a test double) may not.
    if not key and spec.endpoint.api == "orq" and host not in ("local", "127.0.0.1", "localhost", "::1"):
        raise SpecError(
            f"endpoint.api_key_env: the variable {env!r} is not set; export your orq API key in it"
            if env
            else "endpoint.api_key_env: an orq endpoint needs an API key variable"
        )
    return key or None


def _probe_output(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write the output {path}: {exc.strerror or exc}") from None
    if path.exists() and path.is_dir():
        raise OutputError(f"the output path {path} is a folder")


def run_fingerprint(spec: JobSpec) -> str:
    """The settings a partial run must share with its rerun. The input is named by its resolved path (`./f`,
    `/abs/f` and a symlink to it are one input), not by its content: with `id_column` the ids name the rows, so
    rows may be appended or edited between runs. Without one, rows are positions and `input_identity` (size,
    mtime, a hash of the ends) is checked as well, in `_preflight`."""
    return fingerprint(
        {
            "input": spec.input.model_dump(mode="json", exclude={"path", "batch_size", "max_prompt_chars"}),
            "input_path": str(spec.input.path.resolve()),
            "keep": spec.output.keep_columns,
            "format": spec.output.resolved_format,
            "request": spec.request.model_dump(mode="json", exclude_unset=True),
            "api": spec.endpoint.api,  # not base_url: moving to another replica of a server is not a new job
        }
    )


class _Job:
    """One run's state and steps; built by `arun_job`."""

    def __init__(self, spec: JobSpec, options: RunOptions) -> None:
        self.spec = spec
        self.options = options
        self.output = options.output or spec.output.path
        self.fmt = spec.output.resolved_format if options.output is None else _fmt_of(options.output, spec)
        self.source = Source(spec.input, spec.output.keep_columns)
        self.builder = BodyBuilder(spec.request, spec.endpoint.api)
        self.plan: RoutePlan = plan_for(spec.request, spec.endpoint.api)
        self.prices = PriceTable.default().overridden(
            {m: Price(p.prompt, p.completion, p.cached_prompt) for m, p in (spec.prices or {}).items()}
        ).overridden(options.prices)
        cache_cfg = spec.request.routing("cache")
        self.cache_ttl: float | None = cache_cfg.ttl if cache_cfg is not None else None
        self.cache: ResponseCache | None = None
        self.cooldown = Cooldown()
        self.rng = random.Random(options.seed)
        self.budget = _Budget(spec.limits.max_cost_usd)
        self.inflight: dict[str, anyio.Event] = {}
        self.recent: dict[str, dict[str, Any]] = {}
        self._recent_max = 3 * spec.input.batch_size + 16 * spec.limits.concurrency
        self.result = RunResult(output=self.output, status="failed")
        self.fatal: FatalRequestError | None = None
        self.budget_hit = False
        n = spec.request.n or 1
        self.completion_bound = spec.request.effective_max_tokens * n
        self.limits = RateLimits(
            spec.limits.requests_per_minute,
            spec.limits.tokens_per_minute,
            max_call_tokens=self.completion_bound + 4096,
        )
        self.endpoint: Endpoint | None = None
        self.endpoint_id = ""
        self.progress: Progress | None = None
        self.lock: JobLock | None = None

    # -- one row --------------------------------------------------------------------------------------------

    def _record(self, row: SourceRow, **fields: Any) -> dict[str, Any]:
        # `_i` first: the sink sorts the journal into input order by it without parsing whole lines
        rec: dict[str, Any] = {"_i": row.index, "id": row.id}
        if row.keep:
            rec["keep"] = row.keep
        rec.update(fields)
        return rec

    def _error(self, row: SourceRow, kind: str, message: str, **extra: Any) -> dict[str, Any]:
        return self._record(row, **{"status": "error", "error_kind": kind, "error": message, "cached": False,
                                    "attempts": 0, **extra})

    def _ok(self, row: SourceRow, comp: dict[str, Any], *, cached: bool, attempts: int, latency_ms: float,
            asked_model: str) -> dict[str, Any]:
        model = comp.get("model") or asked_model
        price_model = model if self.prices.get(model) is not None else asked_model
        cost = 0.0 if cached else self.prices.cost(
            price_model, comp.get("prompt_tokens"), comp.get("completion_tokens"), comp.get("cached_tokens")
        )
        rec = self._record(row, status="ok", cached=cached, attempts=attempts, latency_ms=latency_ms,
                           http_status=None if cached else 200, cost_usd=cost)
        rec.update(comp)
        rec["model"] = model
        return rec

    def prepare(self, row: SourceRow) -> _Work | dict[str, Any]:
        """A row becomes work for a worker, or directly a result (an error row)."""
        if row.error is not None:
            return self._error(row, "input", row.error)
        assert row.prompt is not None
        model = row.model or self.plan.primary_for(row.id)
        if not model:
            return self._error(row, "input", "no model: the line's body names none and request.model is unset")
        body = self.builder.body(row.prompt, model, row.inputs, row.body)
        key = cache_key(self.endpoint_id, body) if self.cache_ttl is not None else None
        n = body.get("n") or 1
        est = len(row.prompt) / 3.0 + (body.get("max_tokens") or 0) * n
        return _Work(row, body, key, est)

    def _remember(self, key: str, completion: dict[str, Any]) -> None:
        """Answers of this run by cache key, so a duplicate row makes no second call. The feeder looked the
        cache up a batch ahead, so remembering the last few batches' worth closes the gap; older ones are in
        the cache by then."""
        self.recent[key] = completion
        if len(self.recent) > self._recent_max:
            self.recent.pop(next(iter(self.recent)))

    async def work(self, item: _Work, client: WorkerClient) -> dict[str, Any] | None:
        if self.fatal is not None or self.budget_hit:
            return None
        key = item.key
        if key is not None:
            done = self.recent.get(key)
            if done is None and key in self.inflight:
                await self.inflight[key].wait()
                done = self.recent.get(key)
            if done is not None:
                return self._ok(item.row, done, cached=True, attempts=0, latency_ms=0.0,
                                asked_model=item.body["model"])
            self.inflight[key] = anyio.Event()
        try:
            rec = await self._call(item, client)
        finally:
            if key is not None:
                ev = self.inflight.pop(key, None)
                if ev is not None:
                    ev.set()
        return rec

    async def _call(self, item: _Work, client: WorkerClient) -> dict[str, Any] | None:
        row, plan = item.row, self.plan
        models = [item.body["model"], *plan.models[1:]]
        model_i = 0
        body = item.body
        attempts = retries = contract_retries = 0
        started: float | None = None  # the first attempt's send: queueing at the limiter is not latency
        stream = bool(body.get("stream"))
        worst = 0.0
        if self.budget.cap is not None:
            # UTF-8 bytes bound the prompt's tokens from above for byte-level BPE tokenizers: the cap holds
            # even for text that tokenizes badly (emoji, CJK), at the price of stopping a little early.
            prompt_bound = len((row.prompt or "").encode())
            completion_bound = (body.get("max_tokens") or 0) * (body.get("n") or 1)
            bounds = [self.prices.worst_case(m, prompt_bound, completion_bound) for m in models]
            if any(b is None for b in bounds):
                return self._error(row, "budget", f"no price for one of {models}: limits.max_cost_usd cannot be enforced")
            worst = max(b for b in bounds if b is not None)
            if not self.budget.reserve(worst):
                self.budget_hit = True
                return None
        actual: float | None = None
        try:
            while True:
                await self.cooldown.wait()
                await self.limits.acquire(item.est_tokens)
                if self.fatal is not None:
                    return None
                attempts += 1
                if started is None:
                    started = time.perf_counter()
                try:
                    comp = await client.complete(body, stream=stream, deadline_s=plan.call_timeout_s)
                except AttemptFailed as exc:
                    failure = exc.failure
                    d = decide(plan, failure, retries_used=retries, contract_retries_used=contract_retries,
                               has_next_model=model_i + 1 < len(models), backoff=self.options.backoff, rng=self.rng)
                    if self.options.verbose:
                        then = f"retry in {d.delay:.2f} s" if d.action == "retry" else d.action
                        # failure.message was redacted by the client: it cannot carry the key
                        print(f"batcher: row {row.id!r} attempt {attempts} ({body['model']}): {failure.message} -> {then}",
                              file=sys.stderr, flush=True)
                    if d.action == "fatal":
                        self.fatal = FatalRequestError(
                            f"the server refused the API key (HTTP {failure.status}): {failure.message}",
                            failure.status or 401,
                        )
                        self.pool.fail(self.fatal)
                        return None
                    if d.action == "retry":
                        if failure.kind == "contract":
                            contract_retries += 1
                        else:
                            retries += 1
                        if d.pause_pool:
                            self.cooldown.extend(d.delay)
                        await anyio.sleep(d.delay)
                        continue
                    if d.action == "fallback":
                        model_i += 1
                        retries = contract_retries = 0
                        body = {**item.body, "model": models[model_i]}
                        continue
                    return self._error(
                        row, failure.kind, failure.message, http_status=failure.status, attempts=attempts,
                        model=body["model"], latency_ms=(time.perf_counter() - started) * 1000,
                    )
                rec = self._ok(row, comp.to_record(), cached=False, attempts=attempts,
                               latency_ms=(time.perf_counter() - started) * 1000, asked_model=body["model"])
                actual = rec.get("cost_usd")
                if item.key is not None:
                    self._remember(item.key, comp.to_record())
                    rec["_cache"] = (item.key, self.recent[item.key])
                return rec
        finally:
            self.budget.settle(worst, actual)

    # -- the pipeline ---------------------------------------------------------------------------------------

    def _next_batch(self, batches: Iterator[list[SourceRow]]) -> tuple[list[_Work], list[dict[str, Any]]] | None:
        """Read, render and look up one input batch (in a worker thread: it is the bulk of the per-row
        Python work before the call, and would otherwise stall the event loop for a whole batch).
        Returns the rows that need a call, and those settled without one (cache hits, input errors)."""
        batch = next(batches, None)
        limit = self.options.limit
        if batch is not None and limit is not None:
            batch = [r for r in batch if r.index < limit] or None
        if batch is None:
            return None
        prepared = [self.prepare(r) for r in batch]
        hits: dict[str, dict[str, Any]] = {}
        if self.cache is not None:
            hits = self.cache.get_many([p.key for p in prepared if isinstance(p, _Work) and p.key is not None])
        work: list[_Work] = []
        done: list[dict[str, Any]] = []
        for p in prepared:
            if isinstance(p, dict):
                done.append(p)
            elif p.key is not None and p.key in hits:
                done.append(self._ok(p.row, hits[p.key], cached=True, attempts=0, latency_ms=0.0,
                                     asked_model=p.body["model"]))
            else:
                work.append(p)
        return work, done

    async def feed(self, work: WorkSender[_Work], results: ObjectSendStream[_Result]) -> None:
        batches = iter(self.source.batches(self.done_ids))
        while (step := await anyio.to_thread.run_sync(self._next_batch, batches)) is not None:
            to_send, done = step
            # Settled rows go to the writer as one list: the result buffer is kept small for answers that
            # were paid for, and these must not queue one by one behind it.
            if done:
                await results.send(done)
            for w in to_send:
                if self.budget_hit or self.fatal is not None:
                    return
                await work.send(w)

    async def write(self, batch: list[_Result]) -> None:
        records: list[dict[str, Any]] = []
        for r in batch:
            if isinstance(r, list):
                records.extend(r)
            elif r is not None:
                records.append(r)
        if not records:
            return
        to_cache = [c for c in (r.pop("_cache", None) for r in records) if c is not None]
        await anyio.to_thread.run_sync(self.journal.append, records)
        if self.cache is not None and self.cache_ttl is not None:
            ttl = self.cache_ttl
            items = [(k, c, ttl) for k, c in to_cache]
            if items:
                await anyio.to_thread.run_sync(self.cache.put_many, items)
        res = self.result
        for r in records:
            if r["status"] == "ok":
                res.ok += 1
                if r.get("cached"):
                    res.cached += 1
                else:  # tokens of billed calls only, as in `batcher report`
                    res.prompt_tokens += r.get("prompt_tokens") or 0
                    res.completion_tokens += r.get("completion_tokens") or 0
                res.cost_usd += r.get("cost_usd") or 0.0
            else:
                res.errors += 1
            res.attempts += r.get("attempts") or 0
        if self.progress is not None:
            self.progress.advance(len(records), res)

    async def _watch_signals(self) -> None:
        """First SIGINT/SIGTERM: no new calls, in-flight calls get the grace period. Second: stop now."""
        try:
            receiver = anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
            signals = receiver.__enter__()
        except (ValueError, RuntimeError, NotImplementedError):
            return  # not the main thread: whoever owns the thread owns its signals
        try:
            async with anyio.create_task_group() as tg:
                async for signum in signals:
                    if self.result.signal is None:
                        self.result.signal = int(signum)
                        grace = self.spec.limits.grace_seconds
                        _say(f"\nbatcher: stopping: no new calls; waiting up to {grace:g} s for the calls in flight "
                             "(Ctrl-C again stops now)", self.options.quiet)
                        self.pool.stop_feeding()
                        tg.start_soon(self._grace, grace)
                    else:
                        _say("batcher: stopping now", self.options.quiet)
                        self.pool.cancel_work()
        finally:
            receiver.__exit__(None, None, None)

    async def _grace(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        self.pool.cancel_work()

    async def run(self) -> RunResult:
        spec, opts = self.spec, self.options
        t0 = time.perf_counter()
        info = self._preflight()
        await self._lock_job()
        self._resume_state(info)
        base_url = opts.base_url or spec.endpoint.base_url
        api_key = _api_key(spec, base_url)
        async with contextlib.AsyncExitStack() as stack:
            if base_url == "local":
                from .gateway import Gateway, GatewayConfig

                gw_cfg = GatewayConfig.from_dict(spec.endpoint.local.model_dump())
                gw = await stack.enter_async_context(Gateway(gw_cfg))
                base_url = gw.base_url
                self.endpoint_id = f"local:{spec.endpoint.api}"
            else:
                self.endpoint_id = f"{base_url}:{spec.endpoint.api}"
            self.endpoint = Endpoint.make(base_url, spec.endpoint.api, api_key, spec.endpoint.headers)
            if self.cache_ttl is not None:
                self.cache = ResponseCache(spec.cache_dir)
                stack.callback(self.cache.close)
                if not self.cache.enabled:
                    self.cache = None
            self.journal = Journal(self.state.directory)
            stack.callback(self.journal.close)
            total = info.rows if opts.limit is None else min(opts.limit, info.rows)
            todo = max(0, total - self.result.skipped)
            self.progress = Progress(todo, enabled=_progress_enabled(opts), job=spec.job_name)
            stack.callback(self.progress.close)
            endpoint = self.endpoint
            self.pool: Pool[_Work, _Result, WorkerClient] = Pool(
                concurrency=spec.limits.concurrency,
                feed=self.feed,
                work=self.work,
                open_worker=lambda: WorkerClient(endpoint),
                close_worker=lambda c: c.aclose(),
                write=self.write,
            )
            error: BaseException | None = None
            async with anyio.create_task_group() as tg:
                if opts.handle_signals:
                    tg.start_soon(self._watch_signals)
                try:
                    await self.pool.run()
                except (FatalRequestError, OutputError) as exc:
                    error = exc
                finally:
                    tg.cancel_scope.cancel()
        self.result.rows = self.result.skipped + self.result.ok + self.result.errors
        self.result.wall_s = time.perf_counter() - t0
        if isinstance(error, OutputError):
            # Nothing more is written: run.json already says the run is unfinished, and on a full disk a state
            # write here would fail too and hide the error that matters.
            raise error
        # Whatever stopped the run, the output shows everything answered so far; the state stays resumable.
        # The pool's sessions, tasks and streams are garbage now: free them before the final write's peak.
        gc.collect()
        self._finish(info)
        res = self.result
        if isinstance(error, FatalRequestError):
            res.status = "fatal"
            res.message = f"{error}. Nothing answered was lost: fix the key and rerun the same command to resume"
        elif self.pool.feeding_stopped and res.signal is not None:
            res.status = "interrupted"
            res.message = (f"interrupted: {res.skipped + res.ok + res.errors} rows saved in {self.output}; "
                           "rerun the same command to finish the rest")
        elif self.budget_hit:
            res.status = "budget"
            res.message = (
                f"stopped before passing limits.max_cost_usd (${spec.limits.max_cost_usd:g}): spent "
                f"${self.budget.spent:.4f}; raise the budget and rerun the same command to finish the rest"
            )
        else:
            res.status = "finished"
        return res

    def _preflight(self) -> SourceInfo:
        spec = self.spec
        info = self.source.check()
        if spec.limits.max_cost_usd is not None:
            models = set(self.plan.models) | {m for m, _ in self.plan.load_balancer}
            unpriced = sorted(m for m in models if m and self.prices.get(m) is None)
            if unpriced:
                raise SpecError(
                    f"limits.max_cost_usd: no price for {unpriced[0]!r}, so the budget cannot be enforced; "
                    "add it under prices: (USD per million prompt/completion tokens)"
                )
        _probe_output(self.output)
        self.schema = output_schema(self.source.id_name, info.id_type, info.keep_types)
        self.info = info
        return info

    async def _lock_job(self) -> None:
        """Locked before the state is read and held until the output's final write (released by `arun_job`):
        a second run would otherwise pay for every row again, and its start-up (or --fresh) would replace the
        journal the first one is appending to. The wait polls, with an await between tries, so that Ctrl-C
        (which asyncio turns into a cancellation) stops it at once."""
        self.lock = JobLock(state_dir_for(self.output))
        if self.lock.try_acquire():
            return
        if not self.options.wait:
            raise self.lock.refusal()
        _say(f"batcher: waiting for the other run of this job to end ({self.lock.holder()})", False)
        while not self.lock.try_acquire():  # noqa: ASYNC110 - a lock of another process sets no Event of ours
            await anyio.sleep(0.2)

    def _resume_state(self, info: SourceInfo) -> None:
        spec, opts = self.spec, self.options
        fp = run_fingerprint(spec)
        state_dir = state_dir_for(self.output)
        state = RunState.load(state_dir)
        self.done_ids: pa.Array | None = None
        if state is not None and opts.fresh:
            _remove_state(state_dir)
            state = None
        if state is not None and state.fingerprint != fp:
            raise ResumeError(
                f"{state_dir} holds a partial run of a different spec (the request, input or output settings "
                "changed). Rerun with --fresh to start over, or restore the old spec to finish it"
            )
        positional = spec.input.id_column is None and self.source.format != "openai_batch"
        identity = input_identity(spec.input.path) if positional else None
        if state is not None and state.input != identity:
            raise ResumeError(
                f"the input {spec.input.path} changed since the run in {state_dir} (size, modification time or "
                "content), and its rows are known by position (no input.id_column): resuming would put answers "
                "on the wrong rows. Restore the file, or rerun with --fresh to start over (with an id_column, "
                "rows may be edited or appended between runs)"
            )
        if state is not None:
            if state.status == "finished" and state.rows == info.rows and self.output.exists() and opts.limit is None:
                self.result.status = "nothing_to_do"
                self.result.skipped = info.rows
                raise _NothingToDo()
            ids = compact_journal(state_dir)
            self.result.skipped = len(ids)
            if ids:
                self.done_ids = pa.array(ids, type=info.id_type)
        else:
            state = RunState(state_dir, fp, input=identity)
            state.save()
        self.state = state

    def _finish(self, info: SourceInfo) -> None:
        spec = self.spec
        written = finalize(
            self.state.directory / "journal.jsonl",
            self.output,
            self.fmt,
            self.schema,
            self.source.id_name,
            spec.output.keep_columns,
            spec.output.row_group_size,
        )
        all_ok = written == info.rows and self.result.errors == 0 and self.result.skipped + self.result.ok == info.rows
        # "finished" makes the next rerun a no-op; anything else (error rows, a --limit run) resumes.
        self.state.status = "finished" if all_ok else "partial"
        self.state.rows = written
        self.state.save()


class _NothingToDo(Exception):
    pass


def _remove_state(directory: Path) -> None:
    for name in ("journal.jsonl", "run.json", "journal.compact.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()


def _fmt_of(path: Path, spec: JobSpec) -> str:
    try:
        fmt = format_of(path, "output")
    except ValueError as exc:
        raise SpecError(f"--output {path}: {exc}") from None
    return "openai_batch" if fmt == "jsonl" and spec.output.format == "openai_batch" else fmt


def _progress_enabled(opts: RunOptions) -> bool:
    if opts.quiet:
        return False
    if opts.progress is not None:
        return opts.progress
    return sys.stderr.isatty()


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


async def arun_job(spec: JobSpec | str | Path, options: RunOptions | None = None, **kwargs: Any) -> RunResult:
    """Run a job (a spec or the path of one) to completion; the async twin of `run_job`."""
    options = options or RunOptions(**kwargs)
    if not isinstance(spec, JobSpec):
        spec = load_spec(spec)
    job = _Job(spec, options)
    try:
        return await job.run()
    except _NothingToDo:
        job.result.message = f"{job.output} is complete ({job.result.skipped} rows): nothing to do (--fresh starts over)"
        return job.result
    finally:
        if job.lock is not None:
            job.lock.release()


def run_job(spec: JobSpec | str | Path, options: RunOptions | None = None, **kwargs: Any) -> RunResult:
    """Run a job synchronously (on anyio's asyncio backend)."""
    return anyio.run(lambda: arun_job(spec, options, **kwargs))
