"""The anyio pipeline: a feeder, `concurrency` workers and one writer, joined by bounded memory object streams.

    feed ──work──▶ worker × C ──results──▶ write
      └──────────── results (rows that need no call) ──┘

It knows nothing of HTTP or files: the runner passes `feed`, `work`, `record` and `write`. A worker hands its
result to `record` (synchronous: the journal's write(2)) the moment `work` returns, before it takes its next item
and without yielding to the loop, so at any moment the answers not yet recorded are only the calls in flight;
`write` then gets results in batches (counts, progress, the cache), where gathering costs no durability.
Bounded buffers give backpressure end to end (a slow disk slows the workers, slow workers slow the reader).
Stopping has two steps, as Ctrl-C does: `stop_feeding()` lets work already started finish and be written
(items still queued for the workers are not started); `cancel_work()` abandons it. Either way the writer drains
everything that was produced, so no answer that arrived is dropped (unless the sink itself failed).

An exception from `work`, `record` or `write` is not a row's failure (the runner turns those into rows): it stops the
pool, the writer still drains, and `run` raises that very exception, traceback and all, so a bug surfaces as
itself rather than as a half-written run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Generic, TypeVar

import anyio
from anyio.abc import ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = ["Pool", "WorkSender"]

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W")


class WorkSender(Generic[T]):
    """The feeder's end of the work stream. When the buffer is full it waits until the workers have taken half
    of it, then refills it in one go: woken for every slot a worker frees, the feeder would cost a task switch
    per row, which at low rates is a good share of a row's CPU.

    With `size` and `max_bytes`, the buffer is full at `max_bytes` too (long prompts: 2 x concurrency items of
    500 KB would be 64 MB at C=64), and half empty at half of it; an item bigger than `max_bytes` waits for an
    empty buffer and goes alone."""

    def __init__(
        self,
        stream: MemoryObjectSendStream[T],
        capacity: int,
        *,
        size: Callable[[T], int] | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self._stream = stream
        self._low_water = capacity // 2
        self._room: anyio.Event | None = None
        self._size = size if max_bytes is not None else None
        self._max_bytes = max_bytes or 0
        self.bytes = 0  # the items' sizes in the buffer
        self.max_bytes_seen = 0  # the most the buffer held (a counter for tests and benchmarks)

    async def send(self, item: T) -> None:
        n = self._size(item) if self._size is not None else 0
        while True:
            # Within the byte budget, or alone in an empty buffer.
            if self.bytes == 0 or self.bytes + n <= self._max_bytes or self._size is None:
                try:
                    self._stream.send_nowait(item)
                except anyio.WouldBlock:
                    pass
                else:
                    self.bytes += n
                    self.max_bytes_seen = max(self.max_bytes_seen, self.bytes)
                    return
            self._room = anyio.Event()
            await self._room.wait()  # cancellable: the item was not handed over

    def taken(self, stream: MemoryObjectReceiveStream[T], item: T) -> None:
        """A worker took `item` from `stream`: wake the feeder once the buffer is down to half."""
        if self._size is not None:
            self.bytes -= self._size(item)
        room = self._room
        if room is None:
            return
        used = stream.statistics().current_buffer_used
        if used == 0 or (used <= self._low_water and self.bytes <= self._max_bytes // 2):
            self._room = None
            room.set()


class Pool(Generic[T, R, W]):
    def __init__(
        self,
        *,
        concurrency: int,
        feed: Callable[[WorkSender[T], ObjectSendStream[R]], Awaitable[None]],
        work: Callable[[T, W], Awaitable[R]],
        open_worker: Callable[[], W],
        close_worker: Callable[[W], Awaitable[None]],
        write: Callable[[list[R]], Awaitable[None]],
        record: Callable[[R], None] | None = None,
        max_write_batch: int = 2048,
        linger: float = 0.02,
        max_linger: float = 0.1,
        item_size: Callable[[T], int] | None = None,
        max_buffer_bytes: int | None = None,
    ) -> None:
        self.concurrency = concurrency
        self._feed = feed
        self._work = work
        self._open_worker = open_worker
        self._close_worker = close_worker
        self._write = write
        self._record = record
        self._max_write_batch = max_write_batch
        self._linger = linger
        self._max_linger = max(linger, max_linger)
        self._item_size = item_size
        self._max_buffer_bytes = max_buffer_bytes
        self.sender: WorkSender[T] | None = None
        self._feed_scope = anyio.CancelScope()
        self._work_scope = anyio.CancelScope()
        self.feeding_stopped = False
        self.work_cancelled = False
        self.error: BaseException | None = None
        self.sink_failed = False  # `record` or `write` raised: nothing more is written

    def stop_feeding(self) -> None:
        """Start no new work; what was started finishes. Queued items stay undone."""
        self.feeding_stopped = True
        self._feed_scope.cancel()

    def cancel_work(self) -> None:
        """Abandon in-flight work too (results already produced are still written)."""
        self.stop_feeding()
        self.work_cancelled = True
        self._work_scope.cancel()

    def fail(self, error: BaseException) -> None:
        """Stop everything because of `error`; `run` raises it once the writer has drained."""
        if self.error is None:
            self.error = error
        self.cancel_work()

    async def run(self) -> None:
        capacity = self.concurrency * 2
        work_send, work_recv = anyio.create_memory_object_stream[T](capacity)
        sender = self.sender = WorkSender(work_send, capacity, size=self._item_size,
                                          max_bytes=self._max_buffer_bytes)
        # Small: it only decouples the workers from the writer's batches (answers here are already recorded).
        res_send, res_recv = anyio.create_memory_object_stream[R](self.concurrency)
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._writer, res_recv)
            async with res_send, work_recv:
                with self._work_scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._feeder, work_send, sender, res_send.clone())
                        for _ in range(self.concurrency):
                            tg.start_soon(self._worker, work_recv.clone(), sender, res_send.clone())
        if self.error is not None:
            raise self.error

    async def _feeder(
        self, work_send: ObjectSendStream[T], sender: WorkSender[T], res_send: ObjectSendStream[R]
    ) -> None:
        async with work_send, res_send:
            with self._feed_scope:
                await self._feed(sender, res_send)

    async def _worker(
        self, work_recv: MemoryObjectReceiveStream[T], sender: WorkSender[T], res_send: MemoryObjectSendStream[R]
    ) -> None:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(work_recv)
            await stack.enter_async_context(res_send)
            state = self._open_worker()

            async def _close() -> None:
                with anyio.CancelScope(shield=True):
                    await self._close_worker(state)

            stack.push_async_callback(_close)
            async for item in work_recv:
                sender.taken(work_recv, item)
                if self.feeding_stopped:
                    # Queued, never started: left for a rerun. The loop goes on only to empty the buffer.
                    continue
                try:
                    result = await self._work(item, state)
                except Exception as exc:  # a bug, not a row's failure: stop, drain, and `run` re-raises it
                    self.fail(exc)
                    return
                if self._record is not None and not self.sink_failed:
                    # No await between the answer and its record: a kill -9 can only cost calls in flight.
                    try:
                        self._record(result)
                    except Exception as exc:  # the sink failed (disk full): stop sending, keep what was written
                        self.sink_failed = True
                        self.fail(exc)
                        return
                del item  # not held (a long prompt, its body) while this worker waits for the next one
                try:
                    res_send.send_nowait(result)
                except anyio.WouldBlock:
                    # Shielded: a result that exists must reach the writer even if we are being cancelled now.
                    with anyio.CancelScope(shield=True):
                        await res_send.send(result)

    async def _writer(self, res_recv: MemoryObjectReceiveStream[R]) -> None:
        # Results are durable before they get here (`record`); what is left per result (counts, progress, a
        # cache entry written from a thread) is cheap in groups and dear one by one. So a batch is handed to
        # `write` once it holds one result per worker or `linger` worth of results at the recent rate,
        # whichever is more, or after `max_linger`. The waits in between are sized from the same rate, to come
        # back before the results buffer fills and blocks the workers (polling every millisecond instead costs
        # a wakeup each). Polled, not a cancelled receive(): cancelling a receive the instant an item is handed
        # over would drop that item.
        half = max(1, self.concurrency // 2)
        rate = 0.0  # answers per second, smoothed
        async with res_recv:
            while True:
                try:
                    first = await res_recv.receive()
                except anyio.EndOfStream:
                    return
                batch = [first]
                start = anyio.current_time()
                deadline = start + (self._max_linger if rate else self._linger)
                enough = min(self._max_write_batch, max(self.concurrency, int(rate * self._linger)))
                while len(batch) < enough:
                    try:
                        batch.append(res_recv.receive_nowait())
                        continue
                    except anyio.WouldBlock:
                        pass
                    except anyio.EndOfStream:
                        break
                    left = deadline - anyio.current_time()
                    if left <= 0:
                        break
                    await anyio.sleep(min(left, max(half / rate, 0.001)) if rate > 0 else left)
                elapsed = anyio.current_time() - start
                if elapsed > 0.0005:
                    now_rate = len(batch) / elapsed
                    rate = 0.5 * rate + 0.5 * now_rate if rate else now_rate
                if self.sink_failed:
                    continue  # drain so producers can finish; write nothing more to a failed sink
                try:
                    with anyio.CancelScope(shield=True):
                        await self._write(batch)
                except Exception as exc:
                    self.sink_failed = True
                    self.fail(exc)
