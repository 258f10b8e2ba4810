"""The pipeline alone (no HTTP, no files): every item is worked once and every result written once, the feeder
refills from half empty, the writer's batches stay within one answer per worker, and stopping drops nothing."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from anyio.abc import ObjectSendStream

from batcher.pool import Pool, WorkSender

pytestmark = pytest.mark.anyio


class _Sink:
    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    async def write(self, batch: list[Any]) -> None:
        self.batches.append(list(batch))

    @property
    def items(self) -> list[Any]:
        return [x for b in self.batches for x in b]


def _pool(n: int, concurrency: int, sink: _Sink, *, delay: float = 0.0, levels: list[int] | None = None,
          fail_at: int | None = None) -> Pool[int, int, None]:
    async def feed(work: WorkSender[int], results: ObjectSendStream[int]) -> None:
        for i in range(n):
            await work.send(i)
            if levels is not None:
                levels.append(work._stream.statistics().current_buffer_used)

    async def work(item: int, _state: None) -> int:
        if fail_at is not None and item == fail_at:
            raise RuntimeError("boom")
        await anyio.sleep(delay)
        return item * 10

    async def close(_state: None) -> None:
        return None

    return Pool(concurrency=concurrency, feed=feed, work=work, open_worker=lambda: None, close_worker=close,
                write=sink.write, linger=0.01)


async def test_every_item_worked_once_and_written_once() -> None:
    sink = _Sink()
    await _pool(2_000, 8, sink).run()
    assert sorted(sink.items) == [i * 10 for i in range(2_000)]


async def test_writer_gathers_answers_into_few_writes() -> None:
    sink = _Sink()
    await _pool(1_000, 4, sink, delay=0.001).run()
    assert sorted(sink.items) == [i * 10 for i in range(1_000)]
    assert len(sink.batches) < 500  # not one write per answer (4 workers answering every ~1 ms, 10 ms linger)


async def test_feeder_refills_from_half_empty() -> None:
    # Each level is the work buffer's fill right after a send. Refilling one slot at a time would leave it
    # full (8) after every send once it first filled; refilling from half empty passes through 5..8 each time.
    levels: list[int] = []
    sink = _Sink()
    await _pool(400, 4, sink, delay=0.001, levels=levels).run()
    assert sorted(sink.items) == [i * 10 for i in range(400)]
    after_first_fill = levels[levels.index(8):]
    assert min(after_first_fill) <= 5
    assert after_first_fill.count(8) < len(after_first_fill) / 2


async def test_a_failing_worker_stops_the_pool_and_keeps_what_was_answered() -> None:
    sink = _Sink()
    with pytest.raises(RuntimeError, match="boom"):
        await _pool(1_000, 4, sink, delay=0.001, fail_at=300).run()
    answered = sink.items
    assert answered and len(answered) == len(set(answered))
    assert 300 * 10 not in answered


async def test_cancel_work_writes_every_result_already_produced() -> None:
    sink = _Sink()
    produced: list[int] = []
    pool: Pool[int, int, None]

    async def feed(work: WorkSender[int], results: ObjectSendStream[int]) -> None:
        for i in range(10_000):
            await work.send(i)

    async def work(item: int, _state: None) -> int:
        await anyio.sleep(0.001)
        produced.append(item)
        if len(produced) == 200:
            pool.cancel_work()
        return item

    async def close(_state: None) -> None:
        return None

    pool = Pool(concurrency=8, feed=feed, work=work, open_worker=lambda: None, close_worker=close,
                write=sink.write)
    await pool.run()
    assert pool.work_cancelled
    assert sorted(sink.items) == sorted(produced)
    assert len(produced) < 10_000


async def test_a_bug_in_work_surfaces_as_itself_with_its_traceback() -> None:
    sink = _Sink()
    with pytest.raises(RuntimeError, match="boom") as err:
        await _pool(100, 4, sink, fail_at=30).run()
    assert type(err.value) is RuntimeError  # not wrapped in a pool error or an exception group
    frames = [tb.name for tb in err.traceback]
    assert "work" in frames  # the frame that raised is still in the traceback


async def test_stop_feeding_starts_nothing_that_was_queued() -> None:
    sink = _Sink()
    started: list[int] = []
    pool: Pool[int, int, None]

    async def feed(work: WorkSender[int], results: ObjectSendStream[int]) -> None:
        for i in range(1_000):
            await work.send(i)

    async def work(item: int, _state: None) -> int:
        started.append(item)
        if len(started) == 20:
            pool.stop_feeding()
        await anyio.sleep(0.001)
        return item

    async def close(_state: None) -> None:
        return None

    pool = Pool(concurrency=4, feed=feed, work=work, open_worker=lambda: None, close_worker=close,
                write=sink.write)
    await pool.run()
    # the other workers' items had started before; nothing queued (up to 2 x 4) was started after the stop
    assert len(started) == 20
    assert sorted(sink.items) == sorted(started)


async def test_every_result_is_recorded_before_its_worker_takes_the_next_item() -> None:
    # What a kill -9 can cost: results not yet recorded. Checked at every call's start: at most the other
    # workers' calls are in flight unrecorded, so the count never passes the concurrency.
    concurrency = 4
    started: list[int] = []
    recorded: list[int] = []
    worst = [0]

    async def feed(work: WorkSender[int], results: ObjectSendStream[int]) -> None:
        for i in range(500):
            await work.send(i)

    async def work(item: int, _state: None) -> int:
        started.append(item)
        worst[0] = max(worst[0], len(started) - len(recorded))
        await anyio.sleep(0.001 * (item % 3))
        return item

    async def close(_state: None) -> None:
        return None

    sink = _Sink()
    pool = Pool(concurrency=concurrency, feed=feed, work=work, open_worker=lambda: None, close_worker=close,
                write=sink.write, record=recorded.append, linger=0.05)
    await pool.run()
    assert sorted(recorded) == list(range(500)) and sorted(sink.items) == list(range(500))
    assert worst[0] <= concurrency


async def test_a_failing_record_stops_the_pool_and_nothing_more_is_recorded() -> None:
    recorded: list[int] = []

    def record(item: int) -> None:
        if len(recorded) == 50:
            raise OSError("disk full")
        recorded.append(item)

    async def feed(work: WorkSender[int], results: ObjectSendStream[int]) -> None:
        for i in range(1_000):
            await work.send(i)

    async def work(item: int, _state: None) -> int:
        await anyio.sleep(0.001)
        return item

    async def close(_state: None) -> None:
        return None

    sink = _Sink()
    pool = Pool(concurrency=4, feed=feed, work=work, open_worker=lambda: None, close_worker=close,
                write=sink.write, record=record)
    with pytest.raises(OSError, match="disk full"):
        await pool.run()
    assert len(recorded) == 50 and pool.sink_failed
    assert set(sink.items) <= set(recorded)  # the writer got only what was recorded
