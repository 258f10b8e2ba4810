"""The coordinator's news for the workers: the 429 pause and the stop flag move its version, and a heartbeat that
waits there (a long poll) comes back as soon as they do, not at its next tick. The actor class is driven here as
a plain object from threads, as Ray's "watch" concurrency group runs its heartbeats; tests/test_distributed.py
checks the same through Ray."""

from __future__ import annotations

import threading
import time

import pytest

from batcher.coordinator import Coordination

pytest.importorskip("ray")
from batcher.distributed import _CoordinatorActor


def _actor() -> _CoordinatorActor:
    return _CoordinatorActor(requests_per_minute=None, tokens_per_minute=None, max_cost_usd=None)


def _waiting(actor: _CoordinatorActor, seen: int, got: list[tuple[float, bool, int]]) -> threading.Thread:
    """A worker's heartbeat that may wait 30 s for news, in a thread; returns once the coordinator holds it."""
    calls = actor.c.heartbeats
    t = threading.Thread(target=lambda: got.append(actor.heartbeat("w0", {"rows": 1.0}, 0.0, seen, 30.0)))
    t.start()
    deadline = time.monotonic() + 5
    while actor.c.heartbeats == calls and time.monotonic() < deadline:
        time.sleep(0.005)
    return t


def test_the_version_moves_with_a_longer_pause_and_the_stop_flag_only() -> None:
    c = Coordination(None, None, None)
    assert c.heartbeat("w0", {"rows": 5.0}) == (0.0, False, 0)  # progress is no news
    assert c.heartbeat("w0", None, 100.0) == (100.0, False, 1)
    assert c.heartbeat("w1", None, 50.0) == (100.0, False, 1)  # a shorter pause than the job's is no news
    c.stop()
    c.stop()
    assert c.heartbeat("w1") == (100.0, True, 2)
    assert c.totals["rows"] == 5.0


def test_a_waiting_heartbeat_returns_when_another_worker_pauses_the_job() -> None:
    actor = _actor()
    _, _, seen = actor.heartbeat("w0", {}, 0.0)  # a first heartbeat is answered at once
    got: list[tuple[float, bool, int]] = []
    t0 = time.monotonic()
    waiter = _waiting(actor, seen, got)
    assert not got
    until = time.time() + 5
    # another worker's 429: its own heartbeat is not held (the version it saw is not the one it makes)
    assert actor.heartbeat("w1", {}, until, seen, 30.0) == (until, False, seen + 1)
    waiter.join(timeout=5)
    assert got == [(until, False, seen + 1)]
    assert time.monotonic() - t0 < 5  # far less than the 30 s it may wait
    assert actor.c.totals["rows"] == 1.0  # its progress was counted when it came in


def test_a_waiting_heartbeat_returns_on_stop_and_after_its_wait() -> None:
    actor = _actor()
    t0 = time.monotonic()
    assert actor.heartbeat("w0", {}, 0.0, 0, 0.1) == (0.0, False, 0)  # nothing happened: after 0.1 s
    assert time.monotonic() - t0 >= 0.09
    got: list[tuple[float, bool, int]] = []
    waiter = _waiting(actor, 0, got)
    actor.stop()
    waiter.join(timeout=5)
    assert got == [(0.0, True, 1)]
    assert actor.snapshot()["heartbeats"] == 2
