"""The anyio pipeline: a feeder, `concurrency` workers and one writer, joined by bounded memory object streams.

    feed ──work──▶ worker × C ──results──▶ write
      └──────────── results (rows that need no call) ──┘

It knows nothing of HTTP or files: the runner passes `feed`, `work` and `write`. Bounded buffers give
backpressure end to end (a slow disk slows the workers, slow workers slow the reader). Stopping has two
steps, as Ctrl-C does: `stop_feeding()` lets in-flight work finish and be written; `cancel_work()` abandons it.
Either way the writer drains everything that was produced, so no answer that arrived is dropped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Generic, TypeVar

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream
from anyio.streams.memory import MemoryObjectReceiveStream

__all__ = ["Pool"]

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W")


class Pool(Generic[T, R, W]):
    def __init__(
        self,
        *,
        concurrency: int,
        feed: Callable[[ObjectSendStream[T], ObjectSendStream[R]], Awaitable[None]],
        work: Callable[[T, W], Awaitable[R]],
        open_worker: Callable[[], W],
        close_worker: Callable[[W], Awaitable[None]],
        write: Callable[[list[R]], Awaitable[None]],
        max_write_batch: int = 2048,
        linger: float = 0.02,
    ) -> None:
        self.concurrency = concurrency
        self._feed = feed
        self._work = work
        self._open_worker = open_worker
        self._close_worker = close_worker
        self._write = write
        self._max_write_batch = max_write_batch
        self._linger = linger
        self._feed_scope = anyio.CancelScope()
        self._work_scope = anyio.CancelScope()
        self.feeding_stopped = False
        self.work_cancelled = False
        self.error: BaseException | None = None

    def stop_feeding(self) -> None:
        """Send no new work; what is in flight finishes."""
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
        work_send, work_recv = anyio.create_memory_object_stream[T](self.concurrency * 2)
        # Small on purpose: an answer waiting here is paid for but not yet durable.
        res_send, res_recv = anyio.create_memory_object_stream[R](self.concurrency)
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._writer, res_recv)
            async with res_send, work_recv:
                with self._work_scope:
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._feeder, work_send, res_send.clone())
                        for _ in range(self.concurrency):
                            tg.start_soon(self._worker, work_recv.clone(), res_send.clone())
        if self.error is not None:
            raise self.error

    async def _feeder(self, work_send: ObjectSendStream[T], res_send: ObjectSendStream[R]) -> None:
        async with work_send, res_send:
            with self._feed_scope:
                await self._feed(work_send, res_send)

    async def _worker(self, work_recv: ObjectReceiveStream[T], res_send: ObjectSendStream[R]) -> None:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(work_recv)
            await stack.enter_async_context(res_send)
            state = self._open_worker()

            async def _close() -> None:
                with anyio.CancelScope(shield=True):
                    await self._close_worker(state)

            stack.push_async_callback(_close)
            async for item in work_recv:
                try:
                    result = await self._work(item, state)
                except Exception as exc:
                    self.fail(exc)
                    return
                # Shielded: a result that exists must reach the writer even if we are being cancelled now.
                with anyio.CancelScope(shield=True):
                    await res_send.send(result)

    async def _writer(self, res_recv: MemoryObjectReceiveStream[R]) -> None:
        async with res_recv:
            while True:
                try:
                    first = await res_recv.receive()
                except anyio.EndOfStream:
                    return
                batch = [first]
                # Linger a moment for more: at a thousand answers a second, writing each few rows as they
                # come costs a thread hop and an fsync apiece. The price: an answer waits up to `linger`
                # longer before it is durable. Polled, not a cancelled receive(): cancelling a receive the
                # instant an item is handed over would drop that item.
                deadline = anyio.current_time() + self._linger
                while len(batch) < self._max_write_batch:
                    try:
                        batch.append(res_recv.receive_nowait())
                    except anyio.WouldBlock:
                        left = deadline - anyio.current_time()
                        if left <= 0:
                            break
                        await anyio.sleep(min(left, 0.002))
                    except anyio.EndOfStream:
                        break
                if self.error is not None:
                    continue  # the sink failed: drain so producers can finish, write nothing more
                try:
                    with anyio.CancelScope(shield=True):
                        await self._write(batch)
                except Exception as exc:
                    self.fail(exc)
