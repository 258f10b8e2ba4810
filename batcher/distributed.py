"""One job across a Ray cluster: shards of the input run batcher's own pipeline on Ray workers, and one
coordinator actor holds the job-wide limits.

    driver (RayJob)                         coordinator actor          worker actors × W (ShardWorker)
      pre-flight: start the actors, plan ─────────────────────────▶  scan shards (ids, counts)
      dispatch shards to free workers ─────────────────────────────▶  _ShardJob: Source(shard) → Pool →
      progress bar ◀── snapshot ◀───────── heartbeats, leases ◀────▶    Journal (STATE/shards/N/journal.jsonl)
      merge the shards' journals, write the output once (sinks.finalize), as a single-process run does

Only what must be job-wide crosses a process boundary, through the coordinator (`coordinator.py`): the rate
limits and the budget in leases, the 429 pause and the stop flag in heartbeats (a long poll: they arrive when
they change), the progress counts. A worker that dies (SIGKILL, a lost node) is replaced and its shard resumes
from its journal; so does every shard when the whole command is run again after the driver stopped.
`limits.concurrency` is split between the workers.

Imported only for a `--ray` run: `import batcher` and a local run never import Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pyarrow as pa
import ray

from . import storage
from .budget import PriorSpend, SpendLog, fold_spend
from .coordinator import PROGRESS_KEYS, Coordination, LeasedBudget, LeasedCooldown, LeasedLimits
from .errors import BatcherError, FatalRequestError, InputError, SpecError
from .mirror import Mirror, local_scratch
from .progress import Progress
from .runner import RunOptions, RunResult, _Job, _progress_enabled, _say, _StopNow, count_records, event_loop
from .shards import (
    SHARDS,
    Shard,
    fold_shards,
    merge_journals,
    place,
    plan_shards,
    prepare_journals,
    shard_dir,
)
from .sinks import compact_journal, read_journal
from .sources import Scan, Source, SourceInfo
from .spec import JobSpec

__all__ = ["RayJob"]

# A worker's heartbeat waits at the coordinator for the job's pause or stop flag to change, at most this long:
# its progress counts ride along, so this is also how often the driver's bar hears from it.
WATCH_S = 1.0
MAX_SHARD_TRIES = 4  # a shard whose worker died this many times fails the run (a poisoned shard, not bad luck)
# What a worker that died (SIGKILL, a lost node) raises in the driver
_LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
         ray.exceptions.ObjectLostError)


def _resources() -> dict[str, float]:
    found: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return found


CONNECT_TIMEOUT_S = 10.0  # an explicit address that accepts no connection this long is wrong, not slow
WAIT_STEP_S = 0.25  # the driver never blocks in Ray longer than this without running its signal handlers


class Interrupted(KeyboardInterrupt):
    """A signal on the driver before any shard was sent (connecting, the pre-flight): nothing to drain, so the
    run ends at once (the CLI prints one line and exits 128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _probe(address: str) -> None:
    """An explicit `HOST:PORT` (or `ray://HOST:PORT`) must parse and accept a TCP connection within
    CONNECT_TIMEOUT_S: Ray's own connect retries an address where nothing listens forever, inside C++ where no
    signal handler runs. A plain socket waits in Python, where Ctrl-C and SIGTERM are heard."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in hostport:
        raise SpecError(f"--ray {address}: not a Ray address: use auto, HOST:PORT or ray://HOST:PORT "
                        "(or --ray alone for a local instance)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except socket.gaierror as exc:
        raise SpecError(f"--ray {address}: unknown host {host!r} ({exc.strerror or exc})") from None
    except TimeoutError:
        raise SpecError(f"--ray {address}: no answer within {CONNECT_TIMEOUT_S:g} s; is a Ray head there?") from None
    except OSError as exc:
        raise SpecError(f"--ray {address}: cannot connect ({exc.strerror or exc}); is a Ray head running there?") from None


def _connect(address: str) -> None:
    """Connect to Ray (`local`: a new instance of our own), or stop with one line naming the address (exit 2)."""
    if ray.is_initialized():
        return
    if address not in ("local", "auto"):
        _probe(address)
        # Ray's own wait for the GCS (one try a second) is bounded by this, rather than by its default of ~20 s
        # or, on some paths, not at all
        os.environ.setdefault("RAY_gcs_server_port_wait_time_s", str(int(CONNECT_TIMEOUT_S)))
    try:
        with _ray_keeps_off_sigterm():
            _init(address)
    except (ValueError, ConnectionError, RuntimeError, TimeoutError) as exc:
        # a malformed address, a cluster that refuses us (token auth), one that is not there (auto)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SpecError(f"--ray {address}: cannot connect to Ray: {first}") from None


@contextlib.contextmanager
def _ray_keeps_off_sigterm() -> Any:
    """`ray.init` replaces SIGTERM's handler twice (the driver: `sys.exit(15)`; a local head: exit 1 after a
    crash dump) through one helper; while it runs, that helper leaves the driver's handler alone, so a SIGTERM
    during Ray's start (~10 s on a busy machine) is handled as batcher's, like Ctrl-C."""
    utils = getattr(getattr(ray, "_private", None), "utils", None)
    if utils is None or not hasattr(utils, "set_sigterm_handler"):
        yield
        return
    before = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        utils.set_sigterm_handler = before


def _init(address: str) -> None:
    # The workers must import the very batcher the driver runs (a checkout, not only an installed package).
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join([root, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False, "configure_logging": False}
    if address != "local":
        env = {"PYTHONPATH": path}
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                     "STORAGE_EMULATOR_HOST"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        ray.init(address=address, runtime_env={"env_vars": env}, **kwargs)
        return
    # "local" is a new instance of this process's own (a bare `ray.init()` would join any instance left on the
    # machine by `ray start` or by a driver that died). Its workers inherit this process's environment, so the
    # path goes there rather than in a runtime_env: the workers Ray starts with the instance (one per CPU) then
    # become ours, where a runtime_env would have Ray start new ones for each actor (~1 s and ~80 MB each) and
    # leave those idle.
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = path
    try:
        ray.init(address="local", **kwargs)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


# -- the coordinator actor -------------------------------------------------------------------------------------


class _CoordinatorActor:
    """`Coordination` in an actor. Its calls run one at a time on the actor's main thread, but heartbeats, which
    may wait there for news (a long poll), run in threads of their own (the "watch" concurrency group): a
    waiting heartbeat holds up no lease or budget call. A sync actor rather than an async one: measured here, an
    async actor's call cost ~1.4x the CPU (1.2 ms against 0.85 ms, 8 callers at once)."""

    def __init__(self, **kwargs: Any) -> None:
        self.c = Coordination(**kwargs)
        self._news = threading.Condition()  # held around every use of `c`; notified when c.version moves
        self._cpu = time.process_time()
        self._snapshots = 0

    def lease(self, worker: str) -> Any:
        with self._news:
            return self.c.lease(worker)

    def release(self, worker: str) -> None:
        with self._news:
            self.c.release(worker)

    def budget(self, worker: str, want: float, give_back: float, spent: float, need: float = 0.0) -> float:
        with self._news:
            return self.c.budget(worker, want, give_back, spent, need)

    def starved(self, worker: str, need: float) -> bool:
        with self._news:
            return self.c.starved(worker, need)

    def earlier(self, shard: int, journaled: int) -> int:
        with self._news:
            return self.c.earlier(shard, journaled)

    @ray.method(concurrency_group="watch")
    def heartbeat(self, worker: str, progress: dict[str, float], pause_until: float, seen: int = -1,
                  wait_s: float = 0.0) -> tuple[float, bool, int]:
        """Progress and a pause in; the job's pause, stop flag and version out: at once if the version is not
        `seen`, else when it moves or after `wait_s` (a long poll)."""
        with self._news:
            before = self.c.version
            pause, stop, version = self.c.heartbeat(worker, progress, pause_until)
            if version != before:
                self._news.notify_all()
            if version == seen and wait_s > 0:
                self._news.wait_for(lambda: self.c.version != seen, timeout=wait_s)
                pause, stop, version = self.c.pause_until, self.c.stopping, self.c.version
            return pause, stop, version

    def set_expected(self, n: int) -> None:
        with self._news:
            self.c.set_expected(n)

    def begin(self, spent_before: float, expected: int) -> None:
        """What earlier runs spent and the workers that will hold shares: known to the driver only after the
        pre-flight, which the actors are started for."""
        with self._news:
            self.c.spent_before = spent_before
            self.c.set_expected(expected)

    def stop(self) -> None:
        with self._news:
            self.c.stop()
            self._news.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """The job's totals, and what the coordinator cost: its calls and its process's CPU since it started."""
        with self._news:
            self._snapshots += 1
            snap = self.c.snapshot()
        snap["calls"] = snap["lease_calls"] + snap["budget_calls"] + snap["heartbeats"] + self._snapshots
        snap["cpu_s"] = time.process_time() - self._cpu
        return snap


# -- a shard on a worker ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    shard: Shard
    journal_dir: str
    id_type: pa.DataType
    concurrency: int  # this worker's share of limits.concurrency
    remote: str | None = None  # the shard's state on object storage (the journal_dir is then a scratch copy)


class _ShardJob(_Job):
    """One shard's run of the pipeline, with the job-wide limits leased from the coordinator."""

    def __init__(self, spec: JobSpec, options: RunOptions, task: _Task, coordinator: Any, worker: str) -> None:
        super().__init__(spec, options)
        self.task = task
        self.worker = worker
        self.coordinator = coordinator
        self.concurrency = task.concurrency
        self.source = Source(spec.input, self.keep, spec.endpoint.api, parts=task.shard.parts, index_base=task.shard.index_base)
        limits = spec.limits
        self.leased_limits = LeasedLimits(self._call, worker, limits.requests_per_minute, limits.tokens_per_minute,
                                          spec.request.effective_max_tokens * (spec.request.n or 1) + 4096)
        self.caller.limits = self.leased_limits
        self._pause_wall = 0.0
        self._wake = anyio.Event()
        self.caller.cooldown = LeasedCooldown(self._paused)
        cap = limits.max_cost_usd
        # a chunk: a few dozen calls' worth at the worst case is unknown here; a small share of the cap is not
        chunk = 0.0 if cap is None else cap / 64
        self.leased_budget = LeasedBudget(self._call, worker, cap, chunk)
        self.leased_budget.give_up = lambda: self.caller.halted or self.caller.budget_hit
        self.budget = self.caller.budget = self.leased_budget
        self._sent: dict[str, float] = dict.fromkeys(PROGRESS_KEYS, 0.0)
        self._seen = -1  # the coordinator's version this worker has acted on
        self._stopped = False
        self._scratch: Path | None = None

    async def _call(self, method: str, *args: Any) -> Any:
        return await getattr(self.coordinator, method).remote(*args)

    def _paused(self, until_wall: float) -> None:
        self._pause_wall = max(self._pause_wall, until_wall)
        self._wake.set()

    def _delta(self) -> dict[str, float]:
        r = self.result
        now = {"rows": r.ok + r.errors + r.skipped, "ok": r.ok, "errors": r.errors, "cached": r.cached,
               "skipped": r.skipped, "attempts": r.attempts, "prompt_tokens": r.prompt_tokens,
               "completion_tokens": r.completion_tokens, "cost_usd": r.cost_usd, "unpriced": r.unpriced}
        delta = {k: float(now[k]) - self._sent[k] for k in PROGRESS_KEYS}
        self._sent = {k: float(v) for k, v in now.items()}
        return {k: v for k, v in delta.items() if v}

    async def _beat(self, wait_s: float = 0.0) -> None:
        pause, stop, version = await self._call("heartbeat", self.worker, self._delta(), self._pause_wall,
                                                self._seen, wait_s)
        self._seen = max(self._seen, version)
        cooldown = self.caller.cooldown
        assert isinstance(cooldown, LeasedCooldown)
        cooldown.pause_until_wall(pause)
        if stop and not self._stopped:
            self._stopped = True
            self.result.signal = int(signal.SIGINT)
            self.caller.stop()
            self.pool.stop_feeding()
            self._grace_tg.start_soon(self._grace, self.spec.limits.grace_seconds)

    async def _heartbeat(self) -> None:
        """The long poll: the job's pause and stop flag come back as soon as they change."""
        while True:
            await self._beat(WATCH_S)

    async def _tell_pause(self) -> None:
        """This worker's own 429, to the coordinator at once: it answers the others' waiting heartbeats."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self._beat()

    def _start_helpers(self, tg: anyio.abc.TaskGroup) -> None:
        self._grace_tg = tg
        tg.start_soon(self._heartbeat)
        tg.start_soon(self._tell_pause)

    async def run_shard(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        directory = Path(self.task.journal_dir)
        if self.task.remote is not None:
            directory = local_scratch()
            self._scratch = directory
            self.mirror = Mirror(directory, self.task.remote)
            self.mirror.pull_journal("", directory)
            self.mirror.pull_spend("", directory)
        if self.budget.enforced or (directory / SpendLog.NAME).exists():
            # a retried shard's journal holds the error rows of the worker that died: what they cost is
            # carried in the spend log before the compaction drops them
            fold_spend(directory)
        ids = compact_journal(directory)
        if self.mirror is not None:
            self.mirror.push_spend("", directory)
            self.mirror.push_base("", directory)
        # Rows answered by earlier runs are "done earlier"; those a first attempt of this run answered before its
        # worker died are this run's, and their tokens, cost and calls count in its summary (the sums over the
        # output file). The compaction keeps the journal's order, so the earlier runs' rows come first.
        earlier = min(len(ids), await self._call("earlier", self.task.shard.number, len(ids)))
        if len(ids) > earlier:
            count_records(self.result, islice(read_journal(directory / "journal.jsonl"), earlier, None))
        self.result.skipped = earlier
        self._delta()  # what the first attempt's heartbeats already sent to the progress bar
        self.done_ids = pa.array(ids, type=self.task.id_type) if ids else None
        shard = self.task.shard
        limit = self.options.limit
        rows = shard.rows if limit is None else max(0, min(shard.rows, limit - shard.index_base))
        try:
            error = await self._pipeline(max(0, rows - len(ids)), directory)
        finally:
            with anyio.CancelScope(shield=True):
                await self.leased_limits.close()
                await self.leased_budget.close()
                await self._beat()
        if error is not None and not isinstance(error, FatalRequestError):
            raise error
        r = self.result
        return {
            "counts": {k: getattr(r, k) for k in PROGRESS_KEYS if k != "rows"},
            "error_kinds": dict(r.error_kinds),
            "fatal": str(error) if error is not None else None,
            "fatal_status": error.status if isinstance(error, FatalRequestError) else None,
            "budget_hit": self.caller.budget_hit,
            "needed": self.caller.needed,  # the worst case of the row that did not fit
            "interrupted": self.pool.feeding_stopped and self._stopped,
            "wall_s": time.perf_counter() - t0,
            "pid": os.getpid(),
        }


class ShardWorker:
    """A Ray actor that scans shards for the pre-flight, then runs shards one after another: its process, its
    imports and its HTTP setup are paid once per run, while the driver still plans and checks the input."""

    def __init__(self, spec: JobSpec, options: RunOptions, coordinator: Any, worker: str) -> None:
        self.spec = spec
        self.options = options
        self.coordinator = coordinator
        self.worker = worker

    def pid(self) -> int:
        return os.getpid()

    def scan(self, shard: Shard) -> Scan:
        keep = [c for c in self.spec.output.keep_columns if c != self.spec.input.id_source]
        return Source(self.spec.input, keep, self.spec.endpoint.api, parts=shard.parts).scan()

    def run_shard(self, task: _Task) -> dict[str, Any]:
        job = _ShardJob(self.spec, self.options, task, self.coordinator, self.worker)
        try:
            return self._run(job)
        finally:
            if job._scratch is not None:  # a scratch copy of a journal that lives on object storage
                shutil.rmtree(job._scratch, ignore_errors=True)

    def _run(self, job: _ShardJob) -> dict[str, Any]:
        # The event loop a single-process run picks (uvloop when installed, unless --loop or $BATCHER_LOOP say
        # otherwise), so that a shard behaves and measures as the same pipeline does in one process.
        factory = _loop_factory(event_loop(self.options.loop))
        cpu = time.process_time()
        result: dict[str, Any] = anyio.run(job.run_shard, backend_options={"loop_factory": factory})
        result["cpu_s"] = time.process_time() - cpu  # this process's CPU over the shard, Ray's threads included
        return result


def _loop_factory(name: str) -> Any:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.SelectorEventLoop


# -- the driver ------------------------------------------------------------------------------------------------


def _unwrap(exc: BaseException) -> BaseException:
    """The error a Ray task raised, as itself (an InputError stays an InputError, with its message)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _worker_input_error(exc: BaseException) -> BaseException:
    """An error a worker's pre-flight scan raised, as the driver reports it: batcher's own as it is, except that
    a store's refusal says whose credentials those were (a node's own environment: the driver passes on the
    endpoint and region, never a secret); a store's failure that escaped as an SDK error, as one line (exit 3)."""
    if isinstance(exc, InputError) and "credentials in this process's environment" in str(exc):
        return InputError(f"{exc}; this is a Ray worker: each Ray node needs the credentials in its own environment")
    if isinstance(exc, (OSError, pa.ArrowException)):
        return _worker_input_error(InputError(f"a Ray worker cannot read the input: {storage._clean(exc)}"))
    return exc


class RayJob(_Job):
    """The driver of a distributed run: the pre-flight and the output are the single-process run's; the
    pipeline runs on the workers, shard by shard."""

    def __init__(self, spec: JobSpec, options: RunOptions) -> None:
        super().__init__(spec, options)
        self.shards: list[Shard] = []
        self._interrupt = False
        self._budget = False
        self.workers = options.workers
        self.coordinator: Any = None
        self.actors: dict[int, Any] = {}  # worker slot -> its actor (a replaced actor gets the slot's next name)
        self._worker_cls: Any = None
        self._generation = 0
        self._signals = options.handle_signals and threading.current_thread() is threading.main_thread()
        self._phase = "start"  # then "shards" once the first shard is sent, "finish" once they are all done
        self._stops = 0  # signals received

    # -- the actors -----------------------------------------------------------------------------------------

    def _start_actors(self, n: int) -> None:
        """The coordinator and `n` workers, started before the pre-flight's scans (which they run): a worker's
        start (a process, Ray's core worker, batcher's imports) is most of a run's fixed cost, and it is paid
        once, while the driver plans, instead of once for the scans and again for the shards."""
        limits = self.spec.limits
        cpus = float(_resources().get("CPU", 1))
        self._worker_cls = ray.remote(num_cpus=min(1.0, cpus / n), max_restarts=0)(ShardWorker)
        # a thread for every heartbeat that waits there: each worker's, one of a worker that was replaced (until
        # its wait ends), and one telling a 429
        groups: dict[str, Any] = {"concurrency_groups": {"watch": 4 * n + 8}}  # not in Ray's type hints
        self.coordinator = ray.remote(num_cpus=0, **groups)(_CoordinatorActor).remote(
            requests_per_minute=limits.requests_per_minute,
            tokens_per_minute=limits.tokens_per_minute,
            max_cost_usd=limits.max_cost_usd,
            expected=n,
        )
        self.actors = {i: self._start_worker(i) for i in range(n)}

    def _start_worker(self, i: int) -> Any:
        self._generation += 1
        return self._worker_cls.remote(self.spec, _worker_options(self.options), self.coordinator,
                                       f"w{i}.{self._generation}")

    def _replace_worker(self, i: int) -> None:
        """A fresh worker in slot i (the shard it ran resumes from its journal)."""
        with contextlib.suppress(Exception):
            ray.kill(self.actors[i])
        self.actors[i] = self._start_worker(i)

    def _stop_actors(self, keep: int = 0) -> None:
        """Every worker from slot `keep` on; with keep=0, the coordinator too."""
        for i in [i for i in self.actors if i >= keep]:
            with contextlib.suppress(Exception):
                ray.kill(self.actors.pop(i))
        if not keep and self.coordinator is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.coordinator)
            self.coordinator = None

    # -- pre-flight -----------------------------------------------------------------------------------------

    def _check_input(self) -> SourceInfo:
        _connect(self.options.ray or "local")
        self._own_signals()  # ray.init put its own in their place
        cpus = int(_resources().get("CPU", 1))
        self.workers = max(1, self.options.workers or cpus)
        planned = plan_shards(self.source, min_shards=self.workers * 2)
        self._start_actors(max(1, min(self.workers, len(planned), self.spec.limits.concurrency)))
        scans = self._scan(planned)
        self.shards = place(planned, scans)
        whole = Scan()
        for s in scans:
            whole.merge(s)
        return self.source.info(whole)

    def _scan(self, planned: list[Shard]) -> list[Scan]:
        """Every shard's pre-flight scan (row counts, ids), spread over the workers; a scan whose worker died is
        asked again of a fresh worker, as a shard's run is."""
        n = len(self.actors)
        running = {self.actors[k % n].scan.remote(s): (k % n, k, self.actors[k % n]) for k, s in enumerate(planned)}
        scans: dict[int, Scan] = {}
        lost = 0
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_STEP_S)
            for ref in ready:
                i, k, actor = running.pop(ref)
                try:
                    scans[k] = ray.get(ref)
                except _LOST:
                    lost += 1
                    if lost >= MAX_SHARD_TRIES:
                        raise BatcherError(f"the pre-flight lost its workers {MAX_SHARD_TRIES} times") from None
                    if self.actors[i] is actor:  # not replaced yet for another of its scans
                        self._replace_worker(i)
                    running[self.actors[i].scan.remote(planned[k])] = (i, k, self.actors[i])
                except ray.exceptions.RayTaskError as exc:
                    raise _worker_input_error(_unwrap(exc)) from None
        return [scans[k] for k in range(len(planned))]

    def _resume(self, state_dir: Path, info: SourceInfo, changed: bool) -> PriorSpend:
        enforced = self.budget.enforced
        prior = PriorSpend(0.0, 0.0)
        if changed:
            # An edited input (with ids): what every journal says was spent, then the journals as one,
            # renumbered to the rows' current places (answers for gone ids dropped, their cost carried in the
            # job's spend.log), then cut into this plan's shards.
            if enforced:
                prior = self._shard_spend(state_dir, prior)
                prior = _plus(prior, fold_spend(state_dir))
            fold_shards(state_dir)  # the shards' spend logs join the job's
            self._remap(state_dir, info, changed)
            self._prepare(state_dir)
            return prior
        job_log = enforced and (state_dir / SpendLog.NAME).exists()
        if job_log:
            # the job's own spend.log (a single-process run's, a finished distributed run's, or the cost of
            # answers a remap dropped): folded while the job's journal is still whole, so what is left in it
            # after the cut is what it carries; then compacted, so the error rows it carried are not cut into
            # the shards to be counted again
            fold_spend(state_dir)
            compact_journal(state_dir)
        self._prepare(state_dir)
        if enforced:  # what every shard's journal and spend log say was spent
            prior = self._shard_spend(state_dir, prior)
        if job_log:
            prior = _plus(prior, fold_spend(state_dir))
        return prior

    def _shard_spend(self, state_dir: Path, prior: PriorSpend) -> PriorSpend:
        root = state_dir / SHARDS
        dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        for d in dirs:
            # each fold followed by its compaction: the error rows now carried in the log leave the journal,
            # so the worker's own fold does not count them again
            prior = _plus(prior, fold_spend(d))
            compact_journal(d)
            if self.mirror is not None:
                self.mirror.push_spend(f"{SHARDS}/{d.name}", d)
                self.mirror.push_base(f"{SHARDS}/{d.name}", d)
        return prior

    def _prepare(self, state_dir: Path) -> None:
        prepare_journals(state_dir, self.shards)
        if self.mirror is not None:
            self.mirror.push_shards()
            self.mirror.push_spend("", state_dir)
            self.mirror.push_dropped(state_dir)
            self.mirror.push_base("", state_dir)

    def _interrupted(self) -> bool:
        return self._interrupt

    def _part_starts(self) -> list[int]:
        return [s.index_base for s in self.shards]

    def _budget_hit(self) -> bool:
        return self._budget

    # -- the run --------------------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        # The driver's own signal handling, from before Ray starts to the end: `ray.init` installs Ray's
        # handlers (SIGTERM: a crash dump, exit 1) and asyncio's for SIGINT would only cancel a task that is
        # blocked in Ray, so a signal in the first seconds was lost. Put back after ray.init (`_check_input`).
        outer: dict[int, Any] = {}
        if self.options.handle_signals and threading.current_thread() is threading.main_thread():
            outer = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
            self._own_signals()
        try:
            return await self._drive()
        finally:
            self._stop_actors()  # also when the pre-flight fails or finds nothing to do
            for signum, previous in outer.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(signum, previous)

    def _own_signals(self) -> None:
        if self._signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        """Before any shard is sent: stop at once (nothing is in flight). While shards run: the first signal
        stops sending on every worker and waits for the calls in flight, the second kills the workers. Once the
        shards are done: the output's write finishes, unless a second signal comes."""
        self._stops += 1
        if self.result.signal is None:
            self.result.signal = int(signum)
        if self._phase == "start":
            raise Interrupted(signum)
        if self._phase == "finish":
            self._interrupt = True
            if self._stops > 1:
                raise _StopNow(signum)
            return
        opts = self.options
        if self._stops == 1:
            _say(f"\nbatcher: stopping: no new calls on any worker; waiting up to {self.spec.limits.grace_seconds:g} s "
                 "for the calls in flight (Ctrl-C again stops now)", opts.quiet)
            if self.coordinator is not None:
                self.coordinator.stop.remote()
        else:
            _say("batcher: stopping now", opts.quiet)
            for a in list(self.actors.values()):
                with contextlib.suppress(Exception):
                    ray.kill(a)

    async def _drive(self) -> RunResult:
        t0 = time.perf_counter()
        info = self._preflight()
        await self._lock_job()
        self._resume_state(info)
        state_dir = self.state.directory
        if not (state_dir / "shards").exists():
            self._prepare(state_dir)  # a new job: the shards' folders and plan
        error = self._dispatch(info, state_dir)
        res = self.result
        res.rows = res.skipped + res.ok + res.errors
        res.wall_s = time.perf_counter() - t0
        if self.mirror is not None:  # what the workers journaled on the store, and the calls they sent
            for name in self.mirror.shard_dirs():
                self.mirror.pull_journal(f"shards/{name}", state_dir / "shards" / name)
                self.mirror.pull_spend(f"shards/{name}", state_dir / "shards" / name)
        merge_journals(state_dir)
        if self.mirror is not None:
            self.mirror.push_spend("", state_dir)
            self.mirror.push_base("", state_dir)
            self.mirror.drop_tree("shards")
        if isinstance(error, BaseException) and not isinstance(error, FatalRequestError):
            self.state.save()
            raise error
        # `_conclude` writes the output from the merged journal, as a single-process run does
        self.pool = SimpleNamespace(feeding_stopped=self._interrupt)  # type: ignore[assignment]
        return self._conclude(info, error)

    def _dispatch(self, info: SourceInfo, state_dir: Path) -> BaseException | None:
        spec, opts = self.spec, self.options
        limit = opts.limit
        todo = [s for s in self.shards if limit is None or s.index_base < limit]
        n = max(1, min(len(self.actors), len(todo)))
        self._stop_actors(keep=n)  # a --limit may leave fewer shards than the workers started for the scans
        shares = [spec.limits.concurrency // n + (1 if i < spec.limits.concurrency % n else 0) for i in range(n)]
        actors, coordinator = self.actors, self.coordinator
        # Before any shard is sent: a worker's first budget or lease call must find the spend of earlier runs.
        _get(coordinator.begin.remote(self.budget.spent_before, n))
        self.result.engine_stats.update(workers=n, shards=0, worker_cpu_s=0.0)
        idle = deque(range(n))
        pending = deque(todo)
        tries: dict[int, int] = {}
        running: dict[Any, tuple[int, Shard]] = {}
        total = sum(s.rows for s in todo) if limit is None else min(limit, info.rows)
        self.progress = Progress(total, enabled=_progress_enabled(opts), job=spec.job_name)
        shown = 0.0
        error: BaseException | None = None
        fatal: tuple[str, int] | None = None
        self._phase = "shards"
        expected = n
        try:
            while pending or running:
                if self.lease is not None and self.lease.lost is not None and error is None:
                    error = self.lease.lost_error()  # another run owns the job now: stop, write no output
                    self._stops = max(self._stops, 1)
                    coordinator.stop.remote()
                stopping = self._stops > 0 or fatal is not None or self._budget
                while pending and idle and not stopping:
                    i = idle.popleft()
                    shard = pending.popleft()
                    remote = None if self.mirror is None else f"{self.mirror.remote}/shards/{shard.number:05d}"
                    task = _Task(shard, str(shard_dir(state_dir, shard.number)), info.id_type, shares[i], remote)
                    running[actors[i].run_shard.remote(task)] = (i, shard)
                if stopping:
                    pending.clear()
                if not running:
                    break
                want = max(1, min(n, len(pending) + len(running)))
                if want != expected:
                    expected = want
                    coordinator.set_expected.remote(want)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.25)
                for ref in ready:
                    i, shard = running.pop(ref)
                    try:
                        out = ray.get(ref)
                    except _LOST:
                        if self._stops > 1:
                            continue  # killed by the second Ctrl-C
                        tries[shard.number] = tries.get(shard.number, 0) + 1
                        if tries[shard.number] >= MAX_SHARD_TRIES:
                            error = BatcherError(f"shard {shard.number} lost its worker {MAX_SHARD_TRIES} times")
                            self._stops = max(self._stops, 1)
                            coordinator.stop.remote()
                            continue
                        self._replace_worker(i)  # a fresh worker resumes the shard from its journal
                        pending.appendleft(shard)
                        idle.append(i)
                        continue
                    except ray.exceptions.RayTaskError as exc:
                        error = _worker_input_error(_unwrap(exc))
                        self._stops = max(self._stops, 1)
                        coordinator.stop.remote()
                        continue
                    idle.append(i)
                    self._add(out)
                    self.result.engine_stats["shards"] += 1
                    self.result.engine_stats["worker_cpu_s"] += out["cpu_s"]
                    if out["fatal"] is not None and fatal is None:
                        fatal = (out["fatal"], out["fatal_status"] or 401)
                        coordinator.stop.remote()
                    if out["budget_hit"]:
                        self._budget = True
                        # the cheapest row that did not fit (every worker with work was starved: none fitted):
                        # a rerun under the same cap refuses at once, no request, while even that one does not
                        needed = [x for x in (self.caller.needed, out["needed"]) if x]
                        self.caller.needed = min(needed) if needed else 0.0
                    if out["interrupted"]:
                        self._interrupt = True
                shown = self._show(coordinator, shown)
            shown = self._show(coordinator, shown)
            with contextlib.suppress(Exception):  # figures for benchmarks: not worth failing a run for
                snap = ray.get(coordinator.snapshot.remote(), timeout=5)
                self.result.engine_stats.update(coordinator_cpu_s=snap["cpu_s"], coordinator_calls=snap["calls"])
        except KeyboardInterrupt:
            self._interrupt = True
        finally:
            self._phase = "finish"
            self.progress.close()
            # No worker may append to a shard's journal once the driver merges them
            self._stop_actors()
        if self.result.signal is not None:
            self._interrupt = True
        if self._budget:
            self.budget.spent = self.budget.spent_before + self.result.cost_usd
        if fatal is not None:
            return FatalRequestError(fatal[0], fatal[1])
        return error

    def _add(self, out: dict[str, Any]) -> None:
        """A finished shard's counts into the job's summary."""
        res = self.result
        for k, v in out["counts"].items():
            setattr(res, k, getattr(res, k) + v)
        for kind, n in out.get("error_kinds", {}).items():
            res.error_kinds[kind] = res.error_kinds.get(kind, 0) + n

    def _show(self, coordinator: Any, shown: float) -> float:
        if self.progress is None or not self.progress.enabled:
            return shown
        try:
            snap = ray.get(coordinator.snapshot.remote(), timeout=5)
        except Exception:  # the bar is not worth failing a run for
            return shown
        t = snap["totals"]
        rows = float(t.get("rows", 0.0))
        if rows > shown:
            totals = SimpleNamespace(prompt_tokens=int(t["prompt_tokens"]), completion_tokens=int(t["completion_tokens"]),
                                     errors=int(t["errors"]), cost_usd=t["cost_usd"])
            self.progress.advance(int(rows - shown), totals)
        return max(shown, rows)


def _get(ref: Any) -> Any:
    """`ray.get` in steps, so that the driver's signal handlers run while it waits."""
    while not ray.wait([ref], timeout=WAIT_STEP_S)[0]:
        pass
    return ray.get(ref)


def _worker_options(opts: RunOptions) -> RunOptions:
    from dataclasses import replace

    return replace(opts, quiet=True, progress=False, handle_signals=False, ray=None)


def _plus(a: PriorSpend, b: PriorSpend) -> PriorSpend:
    return PriorSpend(a.spent + b.spent, a.unconfirmed + b.unconfirmed)
