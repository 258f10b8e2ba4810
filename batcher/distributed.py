"""One job across a Ray cluster: shards of the input run batcher's own pipeline on Ray workers, and one
coordinator actor holds the job-wide limits.

    driver (RayJob)                         coordinator actor          worker actors × W (ShardWorker)
      pre-flight: plan shards, scan them ──▶ (Ray tasks, one per shard: ids, counts)
      dispatch shards to free workers ─────────────────────────────▶  _ShardJob: Source(shard) → Pool →
      progress bar ◀── snapshot ◀───────── heartbeats, leases ◀────▶    Journal (STATE/shards/N/journal.jsonl)
      merge the shards' journals, write the output once (sinks.finalize), as a single-process run does

Only what must be job-wide crosses a process boundary, through the coordinator (`coordinator.py`): the rate
limits and the budget in leases, the 429 pause and the stop flag in heartbeats, the progress counts. A worker
that dies (SIGKILL, a lost node) is replaced and its shard resumes from its journal; so does every shard when
the whole command is run again after the driver stopped. `limits.concurrency` is split between the workers.

Imported only for a `--ray` run: `import batcher` and a local run never import Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pyarrow as pa
import ray

from .budget import PriorSpend, SpendLog, fold_spend
from .coordinator import PROGRESS_KEYS, Coordination, LeasedBudget, LeasedCooldown, LeasedLimits
from .errors import BatcherError, FatalRequestError
from .mirror import Mirror, local_scratch
from .progress import Progress
from .runner import RunOptions, RunResult, _Job, _progress_enabled, _say
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
from .sinks import compact_journal
from .sources import Scan, Source, SourceInfo
from .spec import JobSpec

__all__ = ["RayJob"]

HEARTBEAT_S = 0.2
MAX_SHARD_TRIES = 4  # a shard whose worker died this many times fails the run (a poisoned shard, not bad luck)


def _resources() -> dict[str, float]:
    found: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return found


def _connect(address: str) -> None:
    if ray.is_initialized():
        return
    # The workers must import the very batcher the driver runs (a checkout, not only an installed package).
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join([root, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    env = {"PYTHONPATH": path}
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "STORAGE_EMULATOR_HOST"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": False,
                              "include_dashboard": False, "configure_logging": False}
    if address == "local":
        # a new instance of our own: without an address Ray joins the last cluster `ray start` made here
        ray.init(address="local", **kwargs)
    else:
        ray.init(address=address, **kwargs)


# -- the coordinator actor -------------------------------------------------------------------------------------


class _CoordinatorActor:
    def __init__(self, **kwargs: Any) -> None:
        self.c = Coordination(**kwargs)

    def lease(self, worker: str) -> Any:
        return self.c.lease(worker)

    def release(self, worker: str) -> None:
        self.c.release(worker)

    def budget(self, worker: str, want: float, give_back: float, spent: float) -> float:
        return self.c.budget(worker, want, give_back, spent)

    def heartbeat(self, worker: str, progress: dict[str, float], pause_until: float) -> tuple[float, bool]:
        return self.c.heartbeat(worker, progress, pause_until)

    def set_expected(self, n: int) -> None:
        self.c.set_expected(n)

    def stop(self) -> None:
        self.c.stop()

    def snapshot(self) -> dict[str, Any]:
        return self.c.snapshot()


# -- a shard on a worker ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    shard: Shard
    journal_dir: str
    id_type: pa.DataType
    remote: str | None = None  # the shard's state on object storage (the journal_dir is then a scratch copy)


class _ShardJob(_Job):
    """One shard's run of the pipeline, with the job-wide limits leased from the coordinator."""

    def __init__(self, spec: JobSpec, options: RunOptions, task: _Task, coordinator: Any, worker: str,
                 concurrency: int) -> None:
        super().__init__(spec, options)
        self.task = task
        self.worker = worker
        self.coordinator = coordinator
        self.concurrency = concurrency
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
        self.budget = self.caller.budget = self.leased_budget
        self._sent: dict[str, float] = dict.fromkeys(PROGRESS_KEYS, 0.0)
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

    async def _beat(self) -> None:
        pause, stop = await self._call("heartbeat", self.worker, self._delta(), self._pause_wall)
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
        while True:
            with anyio.move_on_after(HEARTBEAT_S):
                await self._wake.wait()
            self._wake = anyio.Event()
            await self._beat()

    def _start_helpers(self, tg: anyio.abc.TaskGroup) -> None:
        self._grace_tg = tg
        tg.start_soon(self._heartbeat)

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
        self.result.skipped = len(ids)
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
            "fatal": str(error) if error is not None else None,
            "fatal_status": error.status if isinstance(error, FatalRequestError) else None,
            "budget_hit": self.caller.budget_hit,
            "needed": self.caller.needed,  # the worst case of the row that did not fit
            "interrupted": self.pool.feeding_stopped and self._stopped,
            "wall_s": time.perf_counter() - t0,
            "pid": os.getpid(),
        }


class ShardWorker:
    """A Ray actor that runs shards one after another (its HTTP sessions and imports are paid once)."""

    def __init__(self, spec: JobSpec, options: RunOptions, coordinator: Any, worker: str, concurrency: int) -> None:
        self.spec = spec
        self.options = options
        self.coordinator = coordinator
        self.worker = worker
        self.concurrency = concurrency

    def pid(self) -> int:
        return os.getpid()

    def run_shard(self, task: _Task) -> dict[str, Any]:
        job = _ShardJob(self.spec, self.options, task, self.coordinator, self.worker, self.concurrency)
        try:
            return self._run(job)
        finally:
            if job._scratch is not None:  # a scratch copy of a journal that lives on object storage
                shutil.rmtree(job._scratch, ignore_errors=True)

    def _run(self, job: _ShardJob) -> dict[str, Any]:
        # The loop a single-process run has (Ray's workers would otherwise pick uvloop when it is installed), so
        # a shard behaves and measures as the same pipeline does in one process.
        result: dict[str, Any] = anyio.run(job.run_shard, backend_options={"loop_factory": asyncio.SelectorEventLoop})
        return result


def _scan_shard(spec: JobSpec, keep: list[str], shard: Shard) -> Scan:
    return Source(spec.input, keep, spec.endpoint.api, parts=shard.parts).scan()


# -- the driver ------------------------------------------------------------------------------------------------


def _unwrap(exc: BaseException) -> BaseException:
    """The error a Ray task raised, as itself (an InputError stays an InputError, with its message)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class RayJob(_Job):
    """The driver of a distributed run: the pre-flight and the output are the single-process run's; the
    pipeline runs on the workers, shard by shard."""

    def __init__(self, spec: JobSpec, options: RunOptions) -> None:
        super().__init__(spec, options)
        self.shards: list[Shard] = []
        self._interrupt = False
        self._budget = False
        self.workers = options.workers

    # -- pre-flight -----------------------------------------------------------------------------------------

    def _check_input(self) -> SourceInfo:
        _connect(self.options.ray or "local")
        cpus = int(_resources().get("CPU", 1))
        self.workers = max(1, self.options.workers or cpus)
        planned = plan_shards(self.source, min_shards=self.workers * 2)
        scan_task = ray.remote(num_cpus=0)(_scan_shard)
        refs = [scan_task.remote(self.spec, self.keep, s) for s in planned]
        try:
            scans: list[Scan] = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            raise _unwrap(exc) from None
        self.shards = place(planned, scans)
        whole = Scan()
        for s in scans:
            whole.merge(s)
        return self.source.info(whole)

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
        n = max(1, min(self.workers or 1, len(todo), spec.limits.concurrency))
        shares = [spec.limits.concurrency // n + (1 if i < spec.limits.concurrency % n else 0) for i in range(n)]
        cpus = float(_resources().get("CPU", 1))
        per_worker_cpu = min(1.0, cpus / n)
        coordinator: Any = ray.remote(num_cpus=0)(_CoordinatorActor).remote(
            requests_per_minute=spec.limits.requests_per_minute,
            tokens_per_minute=spec.limits.tokens_per_minute,
            max_cost_usd=spec.limits.max_cost_usd,
            spent_before=self.budget.spent_before,
            expected=n,
        )
        worker_cls = ray.remote(num_cpus=per_worker_cpu, max_restarts=0)(ShardWorker)
        worker_opts = _worker_options(opts)
        generation = [0]

        def start(i: int) -> Any:
            generation[0] += 1
            return worker_cls.remote(spec, worker_opts, coordinator, f"w{i}.{generation[0]}", shares[i])

        actors: dict[int, Any] = {i: start(i) for i in range(n)}
        idle = deque(range(n))
        pending = deque(todo)
        tries: dict[int, int] = {}
        running: dict[Any, tuple[int, Shard]] = {}
        total = sum(s.rows for s in todo) if limit is None else min(limit, info.rows)
        self.progress = Progress(total, enabled=_progress_enabled(opts), job=spec.job_name)
        shown = 0.0
        stop_requests = [0]
        error: BaseException | None = None
        fatal: tuple[str, int] | None = None

        def on_signal(signum: int, frame: Any) -> None:
            stop_requests[0] += 1
            if self.result.signal is None:
                self.result.signal = int(signum)
            if stop_requests[0] == 1:
                _say(f"\nbatcher: stopping: no new calls on any worker; waiting up to {spec.limits.grace_seconds:g} s "
                     "for the calls in flight (Ctrl-C again stops now)", opts.quiet)
                coordinator.stop.remote()
            else:
                _say("batcher: stopping now", opts.quiet)
                for a in actors.values():
                    ray.kill(a)

        old_handlers: dict[int, Any] = {}
        if opts.handle_signals:
            with contextlib.suppress(ValueError):  # not the main thread
                for sig in (signal.SIGINT, signal.SIGTERM):
                    old_handlers[sig] = signal.signal(sig, on_signal)
        expected = n
        try:
            while pending or running:
                if self.lease is not None and self.lease.lost is not None and error is None:
                    error = self.lease.lost_error()  # another run owns the job now: stop, write no output
                    stop_requests[0] = max(stop_requests[0], 1)
                    coordinator.stop.remote()
                stopping = stop_requests[0] > 0 or fatal is not None or self._budget
                while pending and idle and not stopping:
                    i = idle.popleft()
                    shard = pending.popleft()
                    remote = None if self.mirror is None else f"{self.mirror.remote}/shards/{shard.number:05d}"
                    task = _Task(shard, str(shard_dir(state_dir, shard.number)), info.id_type, remote)
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
                    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                            ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError):
                        if stop_requests[0] > 1:
                            continue  # killed by the second Ctrl-C
                        tries[shard.number] = tries.get(shard.number, 0) + 1
                        if tries[shard.number] >= MAX_SHARD_TRIES:
                            error = BatcherError(f"shard {shard.number} lost its worker {MAX_SHARD_TRIES} times")
                            stop_requests[0] = max(stop_requests[0], 1)
                            coordinator.stop.remote()
                            continue
                        with contextlib.suppress(Exception):
                            ray.kill(actors[i])
                        actors[i] = start(i)  # a fresh worker resumes the shard from its journal
                        pending.appendleft(shard)
                        idle.append(i)
                        continue
                    except ray.exceptions.RayTaskError as exc:
                        error = _unwrap(exc)
                        stop_requests[0] = max(stop_requests[0], 1)
                        coordinator.stop.remote()
                        continue
                    idle.append(i)
                    self._add(out["counts"])
                    if out["fatal"] is not None and fatal is None:
                        fatal = (out["fatal"], out["fatal_status"] or 401)
                        coordinator.stop.remote()
                    if out["budget_hit"]:
                        self._budget = True
                        self.caller.needed = max(self.caller.needed or 0.0, out["needed"] or 0.0)
                    if out["interrupted"]:
                        self._interrupt = True
                shown = self._show(coordinator, shown)
            shown = self._show(coordinator, shown)
        except KeyboardInterrupt:
            self._interrupt = True
        finally:
            for signum, old in old_handlers.items():
                signal.signal(signum, old)
            self.progress.close()
            for a in actors.values():
                with contextlib.suppress(Exception):
                    ray.kill(a)
            with contextlib.suppress(Exception):
                ray.kill(coordinator)
        if self.result.signal is not None:
            self._interrupt = True
        if self._budget:
            self.budget.spent = self.budget.spent_before + self.result.cost_usd
        if fatal is not None:
            return FatalRequestError(fatal[0], fatal[1])
        return error

    def _add(self, counts: dict[str, Any]) -> None:
        for k, v in counts.items():
            setattr(self.result, k, getattr(self.result, k) + v)

    def _show(self, coordinator: Any, shown: float) -> float:
        if self.progress is None:
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


def _worker_options(opts: RunOptions) -> RunOptions:
    from dataclasses import replace

    return replace(opts, quiet=True, progress=False, handle_signals=False, ray=None)


def _plus(a: PriorSpend, b: PriorSpend) -> PriorSpend:
    return PriorSpend(a.spent + b.spent, a.unconfirmed + b.unconfirmed)
