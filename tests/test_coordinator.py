"""The coordinator's news for the workers: the 429 pause and the stop flag move its version, and a heartbeat that
waits there (a long poll) comes back as soon as they do, not at its next tick. The actor class is driven here as
plain asyncio (Ray wraps it as it is); tests/test_distributed.py checks the same through Ray."""

from __future__ import annotations

import time

import anyio
import pytest

from batcher.coordinator import Coordination

pytest.importorskip("ray")
from batcher.distributed import _CoordinatorActor


def test_the_version_moves_with_a_longer_pause_and_the_stop_flag_only() -> None:
    c = Coordination(None, None, None)
    assert c.heartbeat("w0", {"rows": 5.0}) == (0.0, False, 0)  # progress is no news
    assert c.heartbeat("w0", None, 100.0) == (100.0, False, 1)
    assert c.heartbeat("w1", None, 50.0) == (100.0, False, 1)  # a shorter pause than the job's is no news
    c.stop()
    c.stop()
    assert c.heartbeat("w1") == (100.0, True, 2)
    assert c.totals["rows"] == 5.0


@pytest.mark.anyio
async def test_a_waiting_heartbeat_returns_when_another_worker_pauses_the_job() -> None:
    actor = _CoordinatorActor(requests_per_minute=None, tokens_per_minute=None, max_cost_usd=None)
    _, _, seen = await actor.heartbeat("w0", {}, 0.0)  # a first heartbeat is answered at once
    got: list[tuple[float, bool, int]] = []

    async def wait() -> None:
        got.append(await actor.heartbeat("w0", {"rows": 1.0}, 0.0, seen, 30.0))

    until = time.time() + 5
    with anyio.fail_after(5):  # far less than the 30 s the heartbeat may wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.05)
            assert not got
            # another worker's 429; its own heartbeat is not held (its version is not the one it saw)
            assert (await actor.heartbeat("w1", {}, until, seen, 30.0))[0] == until
    assert got == [(until, False, seen + 1)]


@pytest.mark.anyio
async def test_a_waiting_heartbeat_returns_on_stop_and_after_its_wait() -> None:
    actor = _CoordinatorActor(requests_per_minute=None, tokens_per_minute=None, max_cost_usd=None)
    t0 = time.monotonic()
    assert await actor.heartbeat("w0", {}, 0.0, 0, 0.1) == (0.0, False, 0)  # nothing happened: after 0.1 s
    assert time.monotonic() - t0 >= 0.09
    got: list[tuple[float, bool, int]] = []

    async def wait() -> None:
        got.append(await actor.heartbeat("w0", {}, 0.0, 0, 30.0))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.05)
            await actor.stop()
    assert got == [(0.0, True, 1)]
    assert (await actor.snapshot())["heartbeats"] == 2
