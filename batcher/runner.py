"""Wires the steps of a job together: spec -> source -> request -> [cache] -> limiter -> call -> journal -> output.

`run_job` (and its async twin `arun_job`) is the Python API; the CLI is a thin layer over it. Everything that
can be checked is checked before the first request: the spec, the input (ids, columns), the output path, the
key, the resume state. A row's failure becomes an error row; only a refused key (401/403), a sink failure or
a signal stops the run early, and each leaves it resumable.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import json
import os
import random
import shutil
import signal
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
from anyio.abc import ObjectSendStream

from . import storage
from .budget import Budget, BudgetStop, PriorSpend, SpendLog, fold_spend, unpriced
from .cache import ResponseCache
from .call import Caller, Records, Work
from .client import Endpoint, WorkerClient, check_api_key
from .errors import FatalRequestError, JobLockedError, OutputError, ResumeError, SpecError
from .lease import S3Lease, s3_lease
from .limits import RateLimits, limiter_tokens
from .mirror import Mirror, MirroredJournal, MirroredSpendLog, staging_dir
from .pool import Pool, WorkSender
from .prices import Price, PriceTable, usd
from .progress import Progress
from .routing import Backoff, RoutePlan, plan_for
from .shapes import Shape, shape_of_job
from .shards import fold_shards, write_parts
from .sinks import (
    DROPPED,
    InputColumns,
    JobLock,
    Journal,
    KeptValues,
    RunState,
    WriteStats,
    compact_journal,
    encode_lines,
    finalize,
    fingerprint,
    input_identity,
    output_schema,
    remap_journal,
    state_dir_for,
    written_by_batcher,
)
from .sources import ReadStats, Source, SourceInfo, SourceRow
from .spec import JobSpec, format_of, kept_column_name, load_spec, parse_max_errors

__all__ = ["ERRORS_EXIT_CODE", "RunOptions", "RunResult", "arun_job", "run_job"]


@dataclass(frozen=True)
class RunOptions:
    output: Path | None = None
    output_folder: bool = False  # `--output DIR/`: a folder of Parquet parts, as an output.path ending with "/"
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
    overwrite: bool = False  # replace an existing output that batcher did not write
    wait: bool = False  # another run of the job holds its lock: wait for it instead of refusing (exit 8)
    max_errors: int | str | None = None  # overrides limits.max_errors: "10" rows or "2.5%" of the rows
    loop: str = "auto"  # run_job's event loop: auto (uvloop when installed), uvloop, asyncio; see `event_loop`
    ray: str | None = None  # run on Ray: "local" (a local instance), "auto" or "ray://host:port"; None: here
    workers: int | None = None  # Ray workers (default: one per CPU of the cluster, capped by the shards)


@dataclass
class RunResult:
    output: Path
    status: str  # finished | nothing_to_do | interrupted | budget | fatal | failed
    rows: int = 0
    ok: int = 0
    errors: int = 0
    cached: int = 0
    skipped: int = 0  # already done by an earlier run
    dropped: int = 0  # answers of earlier runs for ids no longer in the (edited) input
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0  # answers from a model with no price: cost_usd null, not in cost_usd
    unconfirmed_usd: float = 0.0  # charged at the worst case: attempts of unknown outcome (timeouts, drops)
    wall_s: float = 0.0
    message: str = ""
    signal: int | None = None
    input_stats: ReadStats | None = field(default=None, repr=False)  # the reader's counters (byte budget)
    write_stats: WriteStats | None = field(default=None, repr=False)  # the final write's counters (byte budget)
    # the reads of kept columns back from the input at the end (byte budget): `reads`, `max_read_bytes`
    kept_stats: InputColumns | KeptValues | None = field(default=None, repr=False)
    loop: str = ""  # the event loop the run used: "uvloop" or "asyncio"
    error_kinds: dict[str, int] = field(default_factory=dict)  # error rows by error_kind
    over_max_errors: bool = False  # finished, with more error rows than max_errors allows
    # A --ray run's engine: workers, shards run, the workers' CPU seconds over their shards, the coordinator's
    # calls and CPU seconds (all measured in those processes); empty for a local run
    engine_stats: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def exit_code(self) -> int:
        if self.status == "finished" and self.over_max_errors:
            return ERRORS_EXIT_CODE
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
        kinds = sorted(self.error_kinds.items(), key=lambda kv: (-kv[1], kv[0]))
        detail = f" ({', '.join(f'{n} {kind}' for kind, n in kinds)})" if kinds else ""
        parts = [
            f"{self.ok} ok",
            f"{self.errors} error{detail}",
            f"{self.cached} cached",
        ]
        if self.skipped:
            parts.append(f"{self.skipped} done earlier")
        tokens = f"{self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion tokens"
        cost = f", {usd(self.cost_usd)}" if self.cost_usd else ""
        if self.unconfirmed_usd:
            cost += f" + ≤ {usd(self.unconfirmed_usd)} unconfirmed (calls cut off or dropped after sending: may have been billed)"
        if self.unpriced:
            cost += f" + {self.unpriced} unpriced row{'s' if self.unpriced > 1 else ''} (no price for the model that answered)"
        where = storage.uri_of(self.output) or self.output
        dropped = f"; {self.dropped} answers for ids no longer in the input were dropped" if self.dropped else ""
        return f"{', '.join(parts)}; {tokens}{cost}; {self.attempts} calls in {self.wall_s:.1f} s -> {where}{dropped}"


def count_records(res: RunResult, records: Iterable[dict[str, Any]]) -> None:
    """Journal records (answers and error rows) into a run's counts and totals."""
    for r in records:
        # Tokens and cost of billed calls only, as in `batcher report`: an error row's billed answers too
        # (a broken or refused answer was paid for), so the totals are the sums over the output file.
        if not r.get("cached"):
            res.prompt_tokens += r.get("prompt_tokens") or 0
            res.completion_tokens += r.get("completion_tokens") or 0
            if r.get("cost_usd") is None and (r["status"] == "ok" or r.get("completion_tokens") is not None):
                res.unpriced += 1
        res.cost_usd += r.get("cost_usd") or 0.0
        if r["status"] == "ok":
            res.ok += 1
            if r.get("cached"):
                res.cached += 1
        else:
            res.errors += 1
            kind = r.get("error_kind") or "unknown"
            res.error_kinds[kind] = res.error_kinds.get(kind, 0) + 1
        res.attempts += r.get("attempts") or 0


# A run that finished with more error rows than --max-errors / limits.max_errors allow (default: none): a
# scheduler can tell it from a clean run (0) and from a run that stopped early (1-8, 130, 143).
ERRORS_EXIT_CODE = 9

# A power loss or a kernel crash costs at most the answers journaled in the last SYNC_INTERVAL_S (plus one
# fdatasync's time): they are asked again on resume. A kill -9 costs none of them (see `sinks.Journal`).
SYNC_INTERVAL_S = 0.1


@dataclass(slots=True)
class Settled:
    """Rows of one input batch settled without a call (cache hits, input errors), journaled with one write:
    their lines are encoded in the feeder's thread along with the reading, rendering and lookups that found
    them, so the writer only hands them to the journal and counts them."""

    lines: bytes
    errors: list[dict[str, Any]]  # the error rows' records (their kinds are counted)
    cached: int  # rows answered from the cache (ok, no tokens billed, no cost)


# What the writer receives: a worker's row (None when the row was not sent: budget, fatal stop, signal), or the
# rows the feeder settled without a call.
_Result = dict[str, Any] | Settled | None


def _api_key(spec: JobSpec, base_url: str) -> str | None:
    env = spec.endpoint.api_key_env
    key = check_api_key(os.environ.get(env), env) if env else None
    host = urllib.parse.urlsplit(base_url).hostname if base_url != "local" else "local"
    # orq itself always needs a key; a gateway on this machine (ours, or a test double) may not.
    if not key and spec.endpoint.api == "orq" and host not in ("local", "127.0.0.1", "localhost", "::1"):
        raise SpecError(
            f"endpoint.api_key_env: the variable {env!r} is not set; export your orq API key in it"
            if env
            else "endpoint.api_key_env: an orq endpoint needs an API key variable"
        )
    return key or None


def _refuse_special_output(path: Path) -> None:
    """An existing output path must be a regular file (or a folder, refused below), with or without --overwrite:
    the final write renames a temporary file over it, which would turn /dev/null or a fifo into a plain file."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # absent (or unreadable: the probe names the cause)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
                else "a fifo" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise OutputError(f"the output path {path} is {kind}, not a regular file: batcher writes its output by "
                          "renaming a finished file into place, which would replace it; choose a file path")


def check_output_columns(spec: JobSpec, shape: Shape | None = None) -> None:
    """Two output columns under one name would crash the final write after every call was paid: the id or a kept
    column named like one of the shape's own columns (chat: refusal, tool_calls, reasoning). The spec checks
    batcher's fixed columns (`JobSpec._kept_names`); this adds the shape's, for `validate` and before any call."""
    shape = shape or shape_of_job(spec)
    id_name = spec.input.id_name
    owners: dict[str, str] = {id_name: "input.id_column"}
    for c in spec.output.keep_columns:
        if c != spec.input.id_source:
            owners.setdefault(kept_column_name(c, id_name), f"output.keep_columns ({c!r})")
    for name in shape.extra_columns:
        if name in owners:
            raise SpecError(f"{owners[name]}: the output column {name!r} is also one of the {shape.name} shape's "
                            "own columns; rename that column in the input")


def _probe_output(path: Path, folder: bool = False) -> None:
    if not folder:
        _refuse_special_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write the output {path}: {exc.strerror or exc}") from None
    if path.exists() and path.is_dir() != folder:
        raise OutputError(f"the output path {path} is {'not ' if folder else ''}a folder")


def _check_output_target(output: Path, input_path: Path, overwrite: bool) -> None:
    """Never replace the input, nor a file batcher did not write (unless told to), before any call is made."""
    if not output.exists():
        return
    same = False
    with contextlib.suppress(OSError):
        same = os.path.samefile(output, input_path)  # ./x and /abs/x, symlinks and hard links alike
    if same:
        # Not even with --overwrite: the run reads the input until its last row is written, and a rerun
        # would take the output for the input.
        raise OutputError(f"the output {output} is the input file {input_path}: writing it would destroy the "
                          "input; choose another output path")
    if not overwrite and not written_by_batcher(output):
        raise OutputError(
            f"the output {output} already exists and was not written by batcher (no state folder "
            f"{state_dir_for(output)}); choose another output path, or pass --overwrite to replace it"
        )


def run_fingerprint(spec: JobSpec) -> str:
    """The settings a partial run must share with its rerun. The input is named by its resolved path (`./f`,
    `/abs/f` and a symlink to it are one input), not by its content: with `id_column` the ids name the rows, so
    rows may be appended or edited between runs. Without one, rows are positions and `input_identity` (size,
    mtime, a hash of the ends) is checked as well, in `_preflight`. A json_schema given as a file counts by its
    content, not its path: an edited schema retypes the columns."""
    material: dict[str, Any] = {}
    schema = getattr(getattr(getattr(spec.request, "response_format", None), "json_schema", None), "schema_", None)
    if isinstance(schema, str):
        from .structured import load_schema

        material["schema"] = load_schema(schema)
    return fingerprint(
        {
            **material,
            "input": spec.input.model_dump(mode="json", exclude={"path", "batch_size", "batch_bytes",
                                                                 "max_prompt_chars"}),
            "input_path": storage.location(spec.input.path),
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
        # An output on object storage: the run is staged on this machine and mirrored there (mirror.py)
        self.remote_output = storage.uri_of(self.output)
        self.mirror: Mirror | None = None
        if self.remote_output is not None:
            self.output = staging_dir(self.remote_output) / self.remote_output.rpartition("/")[2]
        if options.output is None:
            self.fmt = spec.output.resolved_format
        else:
            self.fmt = "parquet_dataset" if options.output_folder else _fmt_of(options.output, spec)
        # Kept columns other than the input's id column (that one is the output's id already)
        self.keep = [c for c in spec.output.keep_columns if c != spec.input.id_source]
        self.source = Source(spec.input, self.keep, spec.endpoint.api)
        self.shape: Shape = shape_of_job(spec)
        self.plan: RoutePlan = plan_for(spec.request, spec.endpoint.api, spec.limits.max_rate_limit_wait_s)
        self.prices = PriceTable.default().overridden(
            {m: Price(p.prompt, p.completion, p.cached_prompt) for m, p in (spec.prices or {}).items()}
        ).overridden(options.prices)
        cache_cfg = spec.request.routing("cache")
        self.cache_ttl: float | None = cache_cfg.ttl if cache_cfg is not None else None
        self.cache: ResponseCache | None = None
        self.write_stats = WriteStats()
        self.result = RunResult(output=Path(self.remote_output or self.output), status="failed",
                                input_stats=self.source.stats, write_stats=self.write_stats)
        self.records = Records(self.prices)
        self.budget = Budget(spec.limits.max_cost_usd)  # the spend of earlier runs is added in _preflight
        self.caller = Caller(
            plan=self.plan,
            records=self.records,
            budget=self.budget,
            limits=RateLimits(
                spec.limits.requests_per_minute,
                spec.limits.tokens_per_minute,
                max_call_tokens=spec.request.effective_max_tokens * (spec.request.n or 1) + 4096,
            ),
            on_fatal=lambda exc: self.pool.fail(exc),
            backoff=options.backoff,
            rng=random.Random(options.seed),
            verbose=options.verbose,
            shape=self.shape,
            recent_max=3 * spec.input.batch_size + 16 * spec.limits.concurrency,
        )
        self.concurrency = spec.limits.concurrency  # this process's share of it, for one worker of a cluster
        try:
            self.max_errors = parse_max_errors(options.max_errors) if options.max_errors is not None \
                else spec.limits.error_allowance
        except ValueError as exc:
            raise SpecError(f"--max-errors {exc} (got {options.max_errors!r})") from None
        self.endpoint: Endpoint | None = None
        self.endpoint_id = ""
        self.progress: Progress | None = None
        self.lock: JobLock | None = None
        self.lease: S3Lease | None = None  # the job's lease on the store, for an s3:// output (lease.py)

    def prepare(self, row: SourceRow) -> Work | dict[str, Any]:
        """A row becomes work for a worker, or directly a result (an error row)."""
        if row.error is not None:
            return self.records.error(row, "input", row.error)
        assert row.prompt is not None
        model = row.model or self.plan.primary_for(row.id)
        if not model:
            return self.records.error(row, "input", "no model: the line's body names none and request.model is unset")
        body = self.shape.body(row.prompt, model, row.inputs, row.body)
        key = self.shape.cache_key(self.endpoint_id, body) if self.cache_ttl is not None else None
        text = self.shape.prompt_text(body)
        work = Work(row, body, key, limiter_tokens(text, body), prompt_text=text)
        if key is None:
            work.seal()  # no cache to look in: sealed now (`_next_batch` seals the cache's misses)
        return work

    # -- the pipeline ---------------------------------------------------------------------------------------

    def _next_batch(self, batches: Iterator[list[SourceRow]]) -> tuple[list[Work], Settled | None] | None:
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
        hits: dict[str, str] = {}
        if self.cache is not None:
            hits = self.cache.get_many_text([p.key for p in prepared if isinstance(p, Work) and p.key is not None])
        work: list[Work] = []
        errors: list[dict[str, Any]] = []
        lines: list[bytes] = []
        for p in prepared:
            if isinstance(p, dict):
                errors.append(p)
                lines.append(encode_lines((p,)))
            elif p.key is not None and p.key in hits:
                text = hits[p.key]
                line = self.records.cached_line(p.row, text)
                if line is None:
                    line = encode_lines((self.records.ok(p.row, json.loads(text), cached=True, attempts=0,
                                                         latency_ms=0.0, asked_model=p.body["model"]),))
                lines.append(line)
            else:
                # From here the call holds its body's bytes alone (`Work.seal`): not the row's prompt, the
                # body's str and the text counted, each as big as the document (up to 4 bytes a char as a str).
                if p.content is None:
                    p.seal()
                work.append(p)
        if not lines:
            return work, None
        return work, Settled(b"".join(lines), errors, len(lines) - len(errors))

    async def feed(self, work: WorkSender[Work], results: ObjectSendStream[_Result]) -> None:
        batches = iter(self.source.batches(self.done_ids))
        while (step := await anyio.to_thread.run_sync(self._next_batch, batches)) is not None:
            to_send, settled = step
            del step
            # Settled rows go to the writer as one item: the result buffer is kept small for answers that
            # were paid for, and these must not queue one by one behind it.
            if settled is not None:
                await results.send(settled)
            del settled
            # The batch is the look-ahead (at most input.batch_bytes): each item leaves it as it is handed
            # over, so a row whose call is over is not kept alive here until the whole batch is sent.
            to_send.reverse()
            while to_send:
                if self.caller.budget_hit or self.caller.halted:
                    return
                await work.send(to_send.pop())

    def record(self, r: _Result) -> None:
        """A worker's answer, into the journal the moment it exists (see `Journal`): one write(2) from the event
        loop, no thread hop and no fsync (`_sync_journal` groups those)."""
        if isinstance(r, dict):
            entry = r.pop("_cache", None)  # the cache's copy is not journaled
            self.journal.write(encode_lines((r,)))
            if entry is not None:
                r["_cache"] = entry

    async def _sync_journal(self) -> None:
        try:
            await self.journal.sync_periodically(SYNC_INTERVAL_S)
        except OutputError as exc:
            self.pool.fail(exc)

    async def write(self, batch: list[_Result]) -> None:
        """Counts, progress and the cache, for results in groups. Answers are journaled already (`record`);
        rows settled without a call (cache hits, input errors: a crash costs nothing to redo) are journaled
        here, as the lines the feeder encoded (`Settled`)."""
        records: list[dict[str, Any]] = []
        cached = 0
        for r in batch:
            if isinstance(r, Settled):
                self.journal.write(r.lines)
                records.extend(r.errors)
                cached += r.cached
            elif r is not None:
                records.append(r)
        res = self.result
        if cached:
            res.ok += cached
            res.cached += cached
        if not records:
            if cached and self.progress is not None:
                self.progress.advance(cached, res)
            return
        to_cache = [c for c in (r.pop("_cache", None) for r in records) if c is not None]
        if self.cache is not None and self.cache_ttl is not None:
            ttl = self.cache_ttl
            items = [(k, c, ttl) for k, c in to_cache]
            if items:
                await anyio.to_thread.run_sync(self.cache.put_many, items)
        count_records(res, records)
        if self.progress is not None:
            self.progress.advance(len(records) + cached, res)

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
                        self.caller.stop()
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

    @contextlib.contextmanager
    def _signals_while_finishing(self, outer: dict[int, Any]) -> Iterator[None]:
        """From the end of the pool to the end of the run (the output's final write above all): the first
        SIGINT/SIGTERM lets the write finish and makes the run `interrupted` (exit 130/143, with the resume
        hint); the next one stops at once (`_StopNow`), the journal whole, so still resumable. Then the
        handlers the run found are put back (anyio's signal receiver left the defaults in their place)."""
        if not outer:
            yield
            return

        def handler(signum: int, frame: object) -> None:
            if self.result.signal is None:
                self.result.signal = signum
                _say("\nbatcher: stopping: writing the output first (Ctrl-C again stops now)", self.options.quiet)
            else:
                raise _StopNow(signum)

        for signum in outer:
            signal.signal(signum, handler)
        try:
            yield
        finally:
            for signum, previous in outer.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(signum, previous)

    async def run(self) -> RunResult:
        opts = self.options
        t0 = time.perf_counter()
        self.result.loop = "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
        outer: dict[int, Any] = {}
        if opts.handle_signals and threading.current_thread() is threading.main_thread():
            outer = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        with contextlib.ExitStack() as finishing:
            return await self._run(t0, outer, finishing)

    async def _run(self, t0: float, outer: dict[int, Any], finishing: contextlib.ExitStack) -> RunResult:
        opts = self.options
        info = self._preflight()
        await self._lock_job()
        self._resume_state(info)
        total = info.rows if opts.limit is None else min(opts.limit, info.rows)
        # The watcher is gone (and anyio put the default handlers back) once the pipeline ends: a signal from
        # there on must neither kill the final write nor go unheard.
        error = await self._pipeline(max(0, total - self.result.skipped), self.state.directory,
                                     lambda: finishing.enter_context(self._signals_while_finishing(outer)))
        self.result.rows = self.result.skipped + self.result.ok + self.result.errors
        self.result.unconfirmed_usd = max(0.0, self.budget.unconfirmed - self.budget.unconfirmed_before)
        self.result.wall_s = time.perf_counter() - t0
        return self._conclude(info, error)

    def _open_journal(self, directory: Path) -> Journal:
        return Journal(directory) if self.mirror is None else MirroredJournal(directory, self.mirror, "")

    def _open_spend_log(self, directory: Path) -> SpendLog:
        return SpendLog(directory) if self.mirror is None else MirroredSpendLog(directory, self.mirror, "")

    async def _upload_spend_log(self, spend_log: MirroredSpendLog) -> None:
        try:
            await spend_log.upload_periodically(SYNC_INTERVAL_S)
        except OutputError as exc:
            self.pool.fail(exc)

    def _start_helpers(self, tg: anyio.abc.TaskGroup) -> None:
        """Tasks that run beside the pool (a distributed shard's heartbeat); none for a local run."""

    async def _pipeline(self, todo: int, journal_dir: Path, drained: Any = None) -> BaseException | None:
        """The pipeline over `self.source`, journaled in `journal_dir`: a fatal or output error is returned.
        `drained` is called once the pool has stopped, before the pipeline's resources close."""
        spec, opts = self.spec, self.options
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
            self.endpoint = Endpoint.make(base_url, spec.endpoint.api, api_key, spec.endpoint.headers,
                                          path=self.shape.path())
            if self.cache_ttl is not None:
                self.cache = ResponseCache(spec.cache_dir)
                stack.callback(self.cache.close)
                if not self.cache.enabled:
                    self.cache = None
            self.journal = self._open_journal(journal_dir)
            stack.callback(self.journal.close)
            spend_log: SpendLog | None = None
            if self.budget.enforced:
                spend_log = self._open_spend_log(journal_dir)
                stack.callback(spend_log.close)
                self.caller.spend_log = spend_log
            self.progress = Progress(todo, enabled=_progress_enabled(opts), job=spec.job_name)
            stack.callback(self.progress.close)
            endpoint = self.endpoint
            self.pool: Pool[Work, _Result, WorkerClient] = Pool(
                concurrency=self.concurrency,
                feed=self.feed,
                work=self.caller.work,
                open_worker=lambda: WorkerClient(endpoint, self.shape),
                close_worker=lambda c: c.aclose(),
                write=self.write,
                record=self.record,
                # The work buffer is bounded by the same byte budget as an input batch.
                item_size=_work_bytes,
                max_buffer_bytes=spec.input.batch_bytes,
            )
            error: BaseException | None = None
            async with anyio.create_task_group() as tg:
                if opts.handle_signals:
                    tg.start_soon(self._watch_signals)
                tg.start_soon(self._sync_journal)
                if isinstance(spend_log, MirroredSpendLog):
                    tg.start_soon(self._upload_spend_log, spend_log)
                if self.lease is not None:
                    tg.start_soon(self._watch_lease)
                self._start_helpers(tg)
                try:
                    await self.pool.run()
                except (FatalRequestError, OutputError, JobLockedError) as exc:
                    error = exc
                finally:
                    tg.cancel_scope.cancel()
            if drained is not None:
                drained()
        return error

    def _conclude(self, info: SourceInfo, error: BaseException | None) -> RunResult:
        if isinstance(error, OutputError | JobLockedError):
            # Nothing more is written: run.json already says the run is unfinished, and on a full disk a state
            # write here would fail too and hide the error that matters (a lost lease: the job is another
            # run's now).
            raise error
        # Whatever stopped the run, the output shows everything answered so far; the state stays resumable.
        # The pool's sessions, tasks and streams are garbage now: free them before the final write's peak.
        gc.collect()
        res = self.result
        try:
            self._finish(info)
        except _StopNow as stop:
            res.status = "interrupted"
            res.signal = res.signal or stop.signum
            res.message = (f"stopped before the output was written: {res.skipped + res.ok + res.errors} rows are "
                           "saved in the journal; rerun the same command to write them and finish the rest")
            return res
        if isinstance(error, FatalRequestError):
            res.status = "fatal"
            res.message = f"{error}. Nothing answered was lost: fix the key and rerun the same command to resume"
        elif self._interrupted():
            res.status = "interrupted"
            res.message = (f"interrupted: {res.skipped + res.ok + res.errors} rows saved in {self.output}; "
                           "rerun the same command to finish the rest")
        elif self._budget_hit() and self.budget.cap is not None:
            res.status = "budget"
            BudgetStop(self.state.directory).record(self.budget.cap, self.budget.spent, self.caller.needed)
            earlier = f" ({usd(self.budget.spent_before)} of it by earlier runs)" if self.budget.spent_before else ""
            res.message = (
                f"stopped before passing limits.max_cost_usd (${self.budget.cap:g}): the job has spent "
                f"{usd(self.budget.spent)}{earlier} and the next row may cost up to {usd(self.caller.needed)}; raise limits.max_cost_usd and rerun the same command to "
                "finish the rest"
            )
        else:
            res.status = "finished"
            BudgetStop(self.state.directory).clear()
            allowance = self.max_errors
            if not allowance.allows(res.errors, res.rows):
                res.over_max_errors = True
                flag = f"{allowance}" + (f" ({allowance.percent * res.rows / 100:g} of {res.rows} rows)"
                                         if allowance.percent is not None else "")
                res.message = (
                    f"{res.errors} error row{'s' if res.errors != 1 else ''}, over max-errors {flag}: exit "
                    f"{ERRORS_EXIT_CODE}. Rerun the same command to ask them again, or raise --max-errors "
                    "(or limits.max_errors) to accept them"
                )
        if self.mirror is not None:
            self.mirror.push_small()
        return res

    def _preflight(self) -> SourceInfo:
        spec = self.spec
        info = self._check_input()
        if spec.limits.max_cost_usd is not None:
            # every model that may answer: the primary, the fallbacks and the balancer's, on both APIs
            missing = unpriced(self.prices, self.plan.may_answer)
            if missing:
                raise SpecError(
                    f"limits.max_cost_usd: no price for {missing[0]!r} (a model that may answer), so the budget "
                    "cannot be enforced; add it under prices: (USD per million prompt/completion tokens)"
                )
        check_output_columns(spec, self.shape)
        _probe_output(self.output, folder=self.fmt == "parquet_dataset")
        _check_output_target(self.output, spec.input.path, self.options.overwrite)
        self.schema = output_schema(self.source.id_name, info.id_type, {c: info.keep_types[c] for c in self.keep},
                                    extra=self.shape.extra_columns)
        self.info = info
        return info

    async def _lock_job(self) -> None:
        """Locked before the state is read and held until the output's final write (released by `arun_job`):
        a second run would otherwise pay for every row again, and its start-up (or --fresh) would replace the
        journal the first one is appending to. The wait polls, with an await between tries, so that Ctrl-C
        (which asyncio turns into a cancellation) stops it at once."""
        self.lock = JobLock(state_dir_for(self.output))
        if not self.lock.try_acquire():
            if not self.options.wait:
                raise self.lock.refusal()
            _say(f"batcher: waiting for the other run of this job to end ({self.lock.holder()})", False)
            while not self.lock.try_acquire():  # noqa: ASYNC110 - a lock of another process sets no Event of ours
                await anyio.sleep(0.2)
        if self.remote_output is None:
            return
        # Another machine shares only the store: a lease there, where the store can hold one (lease.py)
        self.lease = s3_lease(self._state_uri(), self.lock.path)
        if self.lease is None:
            return
        if await anyio.to_thread.run_sync(self.lease.try_acquire):
            return
        if not self.options.wait:
            raise self.lease.refusal()
        _say(f"batcher: waiting for the other run of this job to end ({self.lease.holder()})", False)
        while not await anyio.to_thread.run_sync(self.lease.try_acquire):  # noqa: ASYNC110 - another machine's
            await anyio.sleep(1.0)

    def _state_uri(self) -> str:
        assert self.remote_output is not None
        parent, _, name = self.remote_output.rpartition("/")
        return f"{parent}/.{name}.batcher"

    def _check_lease(self) -> None:
        if self.lease is not None and self.lease.lost is not None:
            raise self.lease.lost_error()

    async def _watch_lease(self) -> None:
        """A lease lost mid-run (not renewed for its TTL, or taken over): no more calls, no output."""
        assert self.lease is not None
        while self.lease.lost is None:  # noqa: ASYNC110 - set by the renewing thread, outside the event loop
            await anyio.sleep(0.5)
        self.pool.fail(self.lease.lost_error())

    def _resume_state(self, info: SourceInfo) -> None:
        spec, opts = self.spec, self.options
        fp = run_fingerprint(spec)
        state_dir = state_dir_for(self.output)
        if self.remote_output is not None:
            self.mirror = Mirror(state_dir, self._state_uri())
            if opts.fresh:
                self.mirror.drop_state()
            self.mirror.pull()
        state = RunState.load(state_dir)
        self.done_ids: pa.Array | None = None
        if state is not None and opts.fresh:
            _remove_state(state_dir)
            state = None
        if state is not None and state.fingerprint != fp:
            done = state.status == "finished"
            raise ResumeError(
                f"{state_dir} holds {'a finished' if done else 'a partial'} run of a different spec (the request, "
                "input or output settings changed). Rerun with --fresh to start over (the output is replaced), or "
                f"restore the old spec {'to keep it' if done else 'to finish it'}"
            )
        positional = spec.input.id_column is None and self.source.format != "openai_batch"
        # Recorded for every job: with ids, a changed input has its answers renumbered to the rows' new places.
        identity = self._input_identity()
        changed = state is not None and state.input != identity
        if changed and positional:
            raise ResumeError(
                f"the input {storage.shown(spec.input.path)} changed since the run in {state_dir} (size, modification time or "
                "content), and its rows are known by position (no input.id_column): resuming would put answers "
                "on the wrong rows. Restore the file, or rerun with --fresh to start over (with an id_column, "
                "rows may be edited or appended between runs)"
            )
        if state is not None:
            if (state.status == "finished" and state.rows == info.rows and self.output.exists()
                    and opts.limit is None and not changed):
                self.result.status = "nothing_to_do"
                self.result.skipped = info.rows
                raise _NothingToDo()
            prior = self._resume(state_dir, info, changed)
            if changed:
                # Not "finished" any more: a crash before this run's end must not make the rerun a no-op on an
                # input whose new rows were never asked.
                state.input, state.status = identity, "partial"
                state.save()
            self._budget_so_far(state_dir, prior)
        else:
            state = RunState(state_dir, fp, input=identity)
            state.save()
        if self.mirror is not None:
            self.mirror.push_small()
        self.state = state

    def _check_input(self) -> SourceInfo:
        return self.source.check()

    def _input_identity(self) -> dict[str, Any]:
        # a directory, a glob or an object: every file's, in order (a file added or removed changes positions)
        return input_identity(self.spec.input.path, self.source.files)

    def _part_starts(self) -> list[int]:
        """Where the parts of a `parquet_dataset` output begin (row positions): one part for a local run."""
        return [0]

    def _resume(self, state_dir: Path, info: SourceInfo, changed: bool) -> PriorSpend:
        """Pick up an earlier run's answers: the ids to skip; returns the spend so far. `changed`: the input
        (with ids) was edited since the journal was written."""
        fold_shards(state_dir)  # a distributed run's journals, if one stopped before merging them
        # Before the compaction, which drops error rows (and what their unknown attempts may have cost).
        prior = PriorSpend(0.0, 0.0)
        if self.budget.enforced or (state_dir / SpendLog.NAME).exists():  # else: no need to read the journal
            prior = fold_spend(state_dir)
        ids = self._remap(state_dir, info, changed)
        if self.mirror is not None:
            # what was folded and carried first: the journal put next no longer holds what they count
            self.mirror.push_spend("", state_dir)
            self.mirror.push_dropped(state_dir)
            self.mirror.push_base("", state_dir)
        self.result.skipped = len(ids) - self.result.dropped
        if ids:
            self.done_ids = pa.array(ids, type=info.id_type)
        return prior

    def _remap(self, state_dir: Path, info: SourceInfo, changed: bool) -> list[Any]:
        """Compact the job's journal; if the input changed, its positions follow the ids to the rows' current
        places (rows are in input order), and answers for ids now gone are dropped (`result.dropped`), their
        cost carried in `spend.log`. Returns the compacted journal's ids (the dropped ones included)."""
        ids = compact_journal(state_dir)
        if changed and ids:
            self.result.dropped = remap_journal(state_dir, self.source.ids(info.id_type),
                                                on_dropped=lambda cost: _carry_spend(state_dir, cost))
        return ids

    def _interrupted(self) -> bool:
        return self.result.signal is not None

    def _budget_hit(self) -> bool:
        return self.caller.budget_hit

    def _budget_so_far(self, state_dir: Path, prior: PriorSpend) -> None:
        """The cap is the job's: earlier runs' spend counts (answers, and calls of unknown outcome at their worst
        case), and a job stopped at its cap stays stopped under it while the row that did not fit still does
        not."""
        cap = self.budget.cap
        if cap is None:
            return
        before = prior.spent
        self.budget.spent_before = self.budget.spent = before
        self.budget.unconfirmed_before = self.budget.unconfirmed = prior.unconfirmed
        stop = BudgetStop(state_dir)
        needed = stop.needed()
        if before >= cap or (needed is not None and before + needed > cap):
            self.result.status = "budget"
            unconfirmed = f" (≤ {usd(prior.unconfirmed)} of it unconfirmed)" if prior.unconfirmed else ""
            nxt = f", and its next row may cost up to {usd(needed)}" if needed is not None else ""
            self.result.message = (
                f"limits.max_cost_usd (${cap:g}) is already reached for this job: earlier runs spent "
                f"{usd(before)}{unconfirmed}{nxt}; no request made. Raise "
                "limits.max_cost_usd and rerun the same command to finish the rest"
            )
            raise _BudgetReached()

    def _finish(self, info: SourceInfo) -> None:
        spec = self.spec
        keep_from: InputColumns | KeptValues | None = None
        if self.keep and self.fmt != "openai_batch":
            if self.source.format == "parquet":
                keep_from = InputColumns(self.source.files, self.keep, spec.input.id_column, spec.input.batch_bytes,
                                         types=info.keep_types)
            else:
                source = self.source
                by_id = spec.input.id_column is not None or source.format == "openai_batch"
                keep_from = KeptValues(lambda: source.kept_rows(self.keep), self.keep, info.keep_types,
                                       all_ids=(lambda: source.ids(info.id_type)) if by_id else None)
            self.result.kept_stats = keep_from

        def write(journal: Path, output: Path, fmt: str) -> int:
            return finalize(journal, output, fmt, self.schema, self.source.id_name, self.keep,
                            spec.output.row_group_size, keep_from=keep_from, chat=self.shape.name == "chat",
                            max_bytes=spec.input.batch_bytes, stats=self.write_stats)

        journal = self.state.directory / "journal.jsonl"
        if self.fmt == "parquet_dataset":
            written = write_parts(journal, self.output, self._part_starts(), lambda j, o: write(j, o, "parquet"))
        else:
            written = write(journal, self.output, self.fmt)
        answered = self.result.skipped + self.result.ok + self.result.errors
        if written < answered:
            # The journal holds rows the output lacks (a merge or a read that missed some): never call that
            # finished, or the rerun would be a no-op over an incomplete file. The journal stays as it is.
            self.state.status = "partial"
            self.state.save()
            raise OutputError(
                f"wrote {written} rows to {storage.shown(self.remote_output or str(self.output))} but {answered} are answered in the journal: the output "
                f"is incomplete; the journal in {self.state.directory} keeps every answer: rerun the same command "
                "to write it again")
        if self.remote_output is not None:
            self._check_lease()  # another run owns the job now: its output, not ours
            storage.upload(self.output, self.remote_output)
        all_ok = written == info.rows and self.result.errors == 0 and self.result.skipped + self.result.ok == info.rows
        # "finished" makes the next rerun a no-op; anything else (error rows, a --limit run) resumes.
        self.state.status = "finished" if all_ok else "partial"
        self.state.rows = written
        self.state.save()


def _work_bytes(w: Work) -> int:
    return w.nbytes


class _NothingToDo(Exception):
    pass


class _StopNow(KeyboardInterrupt):
    """The second signal while the output is being written: stop at once (the journal is whole)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _BudgetReached(Exception):
    pass


def _carry_spend(state_dir: Path, cost: float) -> None:
    """What answers dropped from the journal cost (ids no longer in the input): carried in `spend.log`, as
    `fold_spend` carries error rows, so the job's budget keeps counting it. Written before the journal loses
    them: a crash in between counts them twice (too much, never too little)."""
    if cost <= 0:
        return
    path = state_dir / SpendLog.NAME
    try:
        with open(path, "ab") as f:
            f.write(json.dumps({"carried": cost}).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _remove_state(directory: Path) -> None:
    for name in ("shards", "shards.new", "shards.old"):
        shutil.rmtree(directory / name, ignore_errors=True)
    for name in ("journal.jsonl", "run.json", "journal.compact.tmp", "journal.remap.tmp", DROPPED, BudgetStop.NAME,
                 SpendLog.NAME, SpendLog.NAME + ".tmp"):
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
    if options.ray is not None:
        if importlib.util.find_spec("ray") is None:
            raise SpecError("--ray needs Ray, which is not installed: pip install 'batcher[ray]'")
        from .distributed import RayJob  # imports Ray: only a --ray run pays for it

        job: _Job = RayJob(spec, options)
    else:
        job = _Job(spec, options)
    try:
        return await job.run()
    except _NothingToDo:
        job.result.message = f"{job.output} is complete ({job.result.skipped} rows): nothing to do (--fresh starts over)"
        return job.result
    except _BudgetReached:
        job.result.rows = job.result.skipped
        return job.result
    finally:
        if job.lease is not None:
            await anyio.to_thread.run_sync(job.lease.release)
        if job.lock is not None:
            job.lock.release()


LOOP_ENV = "BATCHER_LOOP"


def _uvloop_error() -> str | None:
    """None when uvloop loads; else why not. Found is not enough: an install built for another Python, or a
    stub, raises on import (ImportError or anything else), and anyio would raise it mid-start."""
    try:
        importlib.import_module("uvloop")
    except Exception as exc:  # any failure to load an optional speed-up means: not usable
        return f"{type(exc).__name__}: {exc}" if importlib.util.find_spec("uvloop") is not None else "not installed"
    return None


def uvloop_installed() -> bool:
    """True when uvloop is installed and loads."""
    return _uvloop_error() is None


def event_loop(choice: str = "auto") -> str:
    """The event loop a run gets: "uvloop" or "asyncio". `auto` (the default) takes uvloop when it is installed
    (`pip install 'batcher[fast]'`) unless $BATCHER_LOOP says `asyncio`; `uvloop` insists on it (a SpecError
    when it is missing). Everything in batcher, the in-process gateway included, runs on both."""
    if choice == "auto":
        choice = os.environ.get(LOOP_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "uvloop", "asyncio"):
        raise SpecError(f"the event loop must be auto, uvloop or asyncio (--loop or ${LOOP_ENV}), got {choice!r}")
    if choice == "uvloop" and not uvloop_installed():
        why = _uvloop_error() or "not installed"
        raise SpecError(f"the uvloop event loop was asked for but uvloop cannot be used ({why}): "
                        "pip install 'batcher[fast]'")
    if choice == "auto":
        return "uvloop" if uvloop_installed() else "asyncio"
    return choice


def run_job(spec: JobSpec | str | Path, options: RunOptions | None = None, **kwargs: Any) -> RunResult:
    """Run a job synchronously, on uvloop when it is installed (see `event_loop`), else on asyncio."""
    options = options or RunOptions(**kwargs)
    if not isinstance(spec, JobSpec):
        spec = load_spec(spec)
    use_uvloop = event_loop(options.loop) == "uvloop"
    job_spec = spec
    return anyio.run(lambda: arun_job(job_spec, options), backend="asyncio",
                     backend_options={"use_uvloop": use_uvloop})
