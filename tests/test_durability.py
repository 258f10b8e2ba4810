"""What a crash costs: an answer is in the journal file (the kernel's page cache) the moment it exists, before
its worker's next call leaves; fsyncs come in groups, and one comes after every write without a close."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from batcher import parse_spec, run_job
from batcher.call import Caller
from batcher.gateway import Gateway
from batcher.sinks import Journal, encode_lines, state_dir_for

from .conftest import options

pytestmark = pytest.mark.anyio


def _lines(n: int, start: int = 0) -> bytes:
    return encode_lines({"_i": i, "id": f"r{i}", "status": "ok"} for i in range(start, start + n))


async def test_a_write_is_in_the_file_at_once_and_one_fdatasync_covers_a_group(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    synced = anyio.Event()
    real_sync = journal.sync

    def sync() -> None:
        real_sync()
        anyio.from_thread.run_sync(synced.set)

    journal.sync = sync  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        tg.start_soon(journal.sync_periodically, 0.05)
        await anyio.lowlevel.checkpoint()  # let the syncer start waiting
        for i in range(200):
            journal.write(_lines(1, i))
            # in the file for any other reader (a later process) at once: not in a buffer of ours
            assert (tmp_path / "journal.jsonl").read_bytes().count(b"\n") == i + 1
        assert journal.syncs == 0 and journal.synced == 0  # written, not yet synced: no fsync per line
        with anyio.fail_after(10):
            await synced.wait()  # without a close: the group commit came on its own
        assert journal.syncs == 1 and journal.synced == journal.written == len(_lines(200))
        tg.cancel_scope.cancel()
    journal.close()


async def test_a_failed_write_leaves_only_whole_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal(tmp_path)
    journal.write(_lines(3))
    real_write = os.write

    def short_then_full(fd: int, data: Any) -> int:
        monkeypatch.setattr(os, "write", full)
        return real_write(fd, bytes(data[:10]))  # the disk takes 10 bytes, then is full

    def full(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(Exception, match="No space left on device"):
        journal.write(_lines(2, 3))
    monkeypatch.setattr(os, "write", real_write)
    journal.write(_lines(1, 5))  # room again: the next line follows the last whole one
    journal.close()
    data = (tmp_path / "journal.jsonl").read_bytes()
    assert [json.loads(x)["_i"] for x in data.splitlines()] == [0, 1, 2, 5]


def test_every_answer_is_in_the_journal_file_before_the_next_call_leaves(
    make_spec: Any, gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = parse_spec(make_spec(limits={"concurrency": 8}))
    journal = state_dir_for(spec.output.path) / "journal.jsonl"
    answered: list[Any] = []
    checks = [0]
    real_work = Caller.work

    async def work(self: Caller, item: Any, client: Any) -> Any:
        # Whatever answers came back before this call starts are in the file, read as a crash would leave it.
        on_disk = {json.loads(x)["id"] for x in journal.read_bytes().splitlines()} if journal.exists() else set()
        missing = [a for a in answered if a not in on_disk]
        assert not missing, f"{len(missing)} answers were not yet in the journal when the next call started"
        checks[0] += 1
        rec = await real_work(self, item, client)
        if rec is not None:
            answered.append(rec["id"])
        return rec

    monkeypatch.setattr(Caller, "work", work)
    result = run_job(spec, options())
    assert result.status == "finished" and result.ok == 300 and checks[0] == 300
