"""One run per job (the lock), a real full disk, what a resume recognises as the same input, Ctrl-C at start-up."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from batcher import parse_spec, run_job
from batcher.errors import OutputError, ResumeError
from batcher.gateway import Gateway, GatewayConfig, serve_in_thread
from batcher.sinks import state_dir_for

from .conftest import ROOT, options, write_jsonl


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"row-{i:05d}", "text": f"question number {i}"} for i in range(n)]


def _ids(n: int) -> list[str]:
    return [f"row-{i:05d}" for i in range(n)]


def _spec_file(tmp_path: Path, src: Path, out: Path, base_url: str, concurrency: int = 4) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"path": str(src), "id_column": "id", "prompt": "{{text}}"},
        "output": {"path": str(out)},
        "endpoint": {"base_url": base_url},
        "request": {"model": "openai/gpt-4o-mini", "max_tokens": 8},
        "limits": {"concurrency": concurrency},
    }))
    return path


def _cli(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "batcher", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _journal_lines(out: Path) -> int:
    try:
        return (state_dir_for(out) / "journal.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_for(condition: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


# --- the lock ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_of_a_running_job_is_refused_or_waits(tmp_path: Path) -> None:
    rows, first_part = 120, 60
    src = write_jsonl(tmp_path / "in.jsonl", _rows(rows))
    out = tmp_path / "out" / "o.parquet"
    with serve_in_thread(GatewayConfig(latency_s=0.01)) as gw:
        spec = str(_spec_file(tmp_path, src, out, gw.base_url, concurrency=1))
        first = _cli("run", spec, "--quiet", "--limit", str(first_part))
        _wait_for(lambda: _journal_lines(out) > 0, "the first run to journal a row")
        # Hold the first run mid-job (one call at a time, a second each) while the others meet it.
        gw.set_faults([{"kind": "slow", "delay_s": 1.0}])
        assert first.poll() is None
        journaled = _journal_lines(out)
        second = _cli("run", spec, "--quiet")
        fresh = _cli("run", spec, "--quiet", "--fresh")
        waiter = _cli("run", spec, "--wait")
        interrupted = _cli("run", spec, "--wait")
        for proc in (second, fresh):
            _, err = proc.communicate(timeout=30)
            text = err.decode()
            assert proc.returncode == 8, text
            assert "another run of this job holds its lock" in text and "--wait" in text
            assert f"pid {first.pid} on {socket.gethostname()}" in text and "started 20" in text
            assert "Traceback" not in text and text.count("\n") == 1
        # A run waiting for the lock stops on Ctrl-C like any other: one line, 130, nothing touched.
        lock = state_dir_for(out) / "lock"
        _wait_for(lambda: _has_open(interrupted.pid, lock), "the run with --wait to wait on the lock")
        interrupted.send_signal(signal.SIGINT)
        _, err = interrupted.communicate(timeout=30)
        assert interrupted.returncode == 130, err.decode()
        assert err.decode().splitlines()[1:] == ["batcher: interrupted"]  # after its "waiting for" line
        assert first.poll() is None
        # --fresh and the refused runs deleted nothing of the running job's state: its journal only grew.
        assert _journal_lines(out) >= journaled > 0
        gw.set_faults([])
        _, err = first.communicate(timeout=60)
        assert first.returncode == 0, err.decode()
        _, err = waiter.communicate(timeout=60)
        text = err.decode()
        assert waiter.returncode == 0, text
        assert f"waiting for the other run of this job to end (pid {first.pid}" in text
        assert f"{first_part} done earlier" in text  # it resumed after the first run, not alongside it
        late = _cli("run", spec, "--wait")
        _, err = late.communicate(timeout=30)
        assert late.returncode == 0 and b"nothing to do" in err and b"waiting" not in err, err.decode()
        # Nothing paid twice: one request per row, all runs together (no run was killed, so none in flight).
        assert gw.stats.total == rows
    df = pl.read_parquet(out)
    assert df["id"].to_list() == _ids(rows)
    assert (df["status"] == "ok").all()


def test_lock_is_held_in_process_too_and_released_after_the_run(make_spec, gateway: Gateway) -> None:
    import fcntl

    spec = parse_spec(make_spec())
    lock = state_dir_for(spec.output.path) / "lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        held.write(b'{"pid": 4242, "host": "elsewhere", "started": "2026-11-23 09:00:00 UTC"}')
        held.flush()
        from batcher.errors import JobLockedError

        with pytest.raises(JobLockedError, match=r"pid 4242 on elsewhere, started 2026-11-23") as err:
            run_job(spec, options())
        assert err.value.exit_code == 8
        assert gateway.stats.total == 0
    result = run_job(spec, options())  # the holder closed its file: the lock is free
    assert result.status == "finished" and result.ok == 300
    with open(lock, "rb") as f:  # and this run released it
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


# --- a real full disk ----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, mounted for the test (needs root and a mount command)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_disk_full_mid_run_exits_4_keeps_old_output_and_journal_whole(tmp_path: Path, small_disk: Path) -> None:
    rows = 2000
    src = write_jsonl(tmp_path / "in.jsonl", _rows(rows))
    out = small_disk / "out" / "o.parquet"
    with serve_in_thread(GatewayConfig(latency_s=0.002)) as gw:
        spec = str(_spec_file(tmp_path, src, out, gw.base_url, concurrency=8))
        proc = _cli("run", spec, "--quiet", "--limit", "50")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        old_output = out.read_bytes()
        # Leave ~64 KiB free: a few hundred answers' journal lines, far from the 2,000 to come.
        free = os.statvfs(small_disk)
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 64 * 1024))
        billed_before = gw.stats.billed
        proc = _cli("run", spec, "--quiet")
        _, err = proc.communicate(timeout=120)
        text = err.decode()
        assert proc.returncode == 4, text
        assert "No space left on device" in text and "Traceback" not in text and text.count("\n") == 1
        assert out.read_bytes() == old_output  # the output is the old one, not half of a new one
        assert sorted(p.name for p in out.parent.iterdir()) == [".o.parquet.batcher", "o.parquet"]  # no temp
        state = state_dir_for(out)
        assert sorted(p.name for p in state.iterdir()) == ["journal.jsonl", "lock", "run.json"]
        journal = (state / "journal.jsonl").read_bytes()
        assert journal.endswith(b"\n")
        lines = [json.loads(x) for x in journal.splitlines()]  # every line whole
        kept = len({r["id"] for r in lines if r["status"] == "ok"})
        assert 50 < kept < rows
        json.loads((state / "run.json").read_bytes())
        filler.unlink()  # room again: the rerun finishes, asking only what the journal does not hold
        billed_mid = gw.stats.billed
        proc = _cli("run", spec)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        assert f"{kept} done earlier".encode() in err
        assert gw.stats.billed - billed_mid == rows - kept
        assert billed_mid - billed_before >= kept - 50
    df = pl.read_parquet(out)
    assert df["id"].to_list() == _ids(rows) and (df["status"] == "ok").all()


def test_enospc_from_the_os_half_way_through_a_write(make_spec, gateway: Gateway, monkeypatch) -> None:
    """The OS accepts part of a group of journal lines, then refuses the rest with ENOSPC (what a filling disk
    does): the run stops with OutputError (exit 4), the partial group is cut off, and a rerun finishes."""
    spec = parse_spec(make_spec(limits={"concurrency": 4}))
    journal = state_dir_for(spec.output.path) / "journal.jsonl"
    real_write = os.write
    budget = [20_000]  # bytes the "disk" still takes

    def write(fd: int, data: Any) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("journal.jsonl"):
            return real_write(fd, data)
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data[: budget[0]]))
        budget[0] -= n
        return n

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell the journal's descriptor from others")
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(OutputError, match="No space left on device") as err:
        run_job(spec, options())
    monkeypatch.setattr(os, "write", real_write)
    assert err.value.exit_code == 4 and str(journal) in str(err.value)
    assert gateway.stats.total < 300  # it stopped sending
    data = journal.read_bytes()
    assert 0 < len(data) < 20_000 and data.endswith(b"\n")  # the torn group was cut back to whole lines
    kept = [json.loads(x) for x in data.splitlines()]
    assert not spec.output.path.exists()
    result = run_job(spec, options())
    assert result.status == "finished" and result.skipped == len(kept)
    assert pl.read_parquet(spec.output.path).height == 300


# --- what makes a resume the same job ------------------------------------------------------------------------


def _positional_spec(make_spec, src: Path, **input_: Any) -> Any:
    return parse_spec(make_spec(input={"path": str(src), "id_column": None, "prompt": "{{text}}", **input_}))


def test_positional_resume_of_an_edited_input_is_refused(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", _rows(40))
    spec = _positional_spec(make_spec, src)
    assert run_job(spec, options(limit=10)).ok == 10
    write_jsonl(src, [{"id": "new", "text": "a row put first"}, *_rows(40)])  # shifts every position by one
    before = gateway.stats.total
    with pytest.raises(ResumeError, match=r"changed since the run.*--fresh") as err:
        run_job(spec, options())
    assert err.value.exit_code == 5 and gateway.stats.total == before
    result = run_job(spec, options(fresh=True))
    assert result.status == "finished" and result.ok == 41
    df = pl.read_parquet(spec.output.path)
    assert df["id"].to_list() == list(range(41))


def test_positional_resume_of_an_unchanged_input_resumes(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", _rows(40))
    spec = _positional_spec(make_spec, src)
    run_job(spec, options(limit=10))
    result = run_job(spec, options())
    assert result.status == "finished" and result.skipped == 10 and gateway.stats.total == 40


def test_with_ids_appended_rows_resume(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", _rows(40))
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{text}}"}))
    assert run_job(spec, options()).ok == 40
    write_jsonl(src, _rows(50))
    result = run_job(spec, options())
    assert result.status == "finished" and result.skipped == 40 and result.ok == 10
    assert gateway.stats.total == 50
    assert pl.read_parquet(spec.output.path)["id"].to_list() == _ids(50)


def test_the_same_file_by_another_name_is_the_same_input(make_spec, gateway: Gateway, tmp_path: Path,
                                                         monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    src = write_jsonl(tmp_path / "data" / "in.jsonl", _rows(30))
    (tmp_path / "link.jsonl").symlink_to(src)
    monkeypatch.chdir(tmp_path)
    names = [str(src), "./data/in.jsonl", "data/../data/in.jsonl", "link.jsonl"]
    for i, name in enumerate(names):
        spec = _positional_spec(make_spec, Path(name))
        result = run_job(spec, options(limit=5 * (i + 1)))
        assert result.skipped == 5 * i, name  # each run resumed the one before it
    assert gateway.stats.total == 5 * len(names)


# --- Ctrl-C while starting -----------------------------------------------------------------------------------


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def _has_open(pid: int, path: Path) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("moment", ["importing Arrow", "reading the input"])
def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path: Path, moment: str, signum: int) -> None:
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc to see how far the process got")
    # Big enough that checking it (ids, columns) takes a while: the signal lands in preflight.
    src = write_jsonl(tmp_path / "in.jsonl", _rows(300_000))
    with serve_in_thread(GatewayConfig()) as gw:
        spec = str(_spec_file(tmp_path, src, tmp_path / "out" / "o.parquet", gw.base_url))
        proc = _cli("run", spec)
        if moment == "importing Arrow":
            ready = lambda: "libarrow" in _maps(proc.pid)  # noqa: E731
        else:
            ready = lambda: _has_open(proc.pid, src)  # noqa: E731
        _wait_for(lambda: ready() or proc.poll() is not None, moment)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        text = err.decode()
        assert proc.returncode == 128 + signum, text  # SIGTERM too: one line, not a silent death
        assert "Traceback" not in text and text == "batcher: interrupted\n"
        assert gw.stats.total == 0  # it was still starting: nothing sent
