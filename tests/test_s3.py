"""Input, output and the journal on S3: a real S3-compatible server (moto's server mode, its own process on
127.0.0.1), reached through pyarrow's S3 filesystem with the endpoint from AWS_ENDPOINT_URL."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batcher import parse_spec, run_job
from batcher.cli import main
from batcher.gateway import Gateway

from .conftest import SAMPLES, options

pytest.importorskip("moto")
pytestmark = pytest.mark.slow

SECRET = "s3cr3t-never-printed-0123456789"
TIMING = ["latency_ms", "completion_id"]


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTING")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("BATCHER_STAGING", str(tmp_path / "staging"))
    from batcher import storage

    storage._s3.cache_clear()
    fs, _ = storage.filesystem("s3://bucket")
    bucket = f"b{time.time_ns()}"
    admin = pafs.S3FileSystem(endpoint_override=s3_server, scheme="http", region="us-east-1",
                              access_key="AKIDTESTING", secret_key=SECRET, allow_bucket_creation=True)
    admin.create_dir(bucket)
    with open(SAMPLES / "reviews.parquet", "rb") as src, fs.open_output_stream(f"{bucket}/in/reviews.parquet") as dst:
        dst.write(src.read())
    with open(SAMPLES / "reviews.jsonl", "rb") as src, fs.open_output_stream(f"{bucket}/in/reviews.jsonl") as dst:
        dst.write(src.read())
    return SimpleNamespace(fs=fs, bucket=bucket)


def _read(fs: pafs.FileSystem, path: str) -> pl.DataFrame:
    with fs.open_input_file(path) as f:
        return pl.from_arrow(pq.read_table(f)).drop(TIMING)  # type: ignore[return-value]


def test_s3_input_output_and_journal_then_resume_elsewhere(make_spec, gateway: Gateway, s3, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    b = s3.bucket
    local = parse_spec(make_spec(output={"path": str(tmp_path / "local.parquet")}, cache_dir=None))
    run_job(local, options())
    spec = parse_spec(make_spec(input={"path": f"s3://{b}/in/reviews.parquet"},
                                output={"path": f"s3://{b}/out/o.parquet"}, cache_dir=None))
    part = run_job(spec, options(limit=120))
    assert part.ok == 120 and str(part.output).startswith("s3:")
    journal = s3.fs.get_file_info(pafs.FileSelector(f"{b}/out/.o.parquet.batcher/journal"))
    assert journal, "the journal is on the store"
    # another machine: nothing staged locally, everything comes from the store
    monkeypatch.setenv("BATCHER_STAGING", str(tmp_path / "elsewhere"))
    rest = run_job(spec, options())
    assert rest.status == "finished" and rest.skipped == 120 and rest.ok == 180
    assert gateway.stats.billed == 300 + 300  # the local run's, then each row once on S3
    assert _read(s3.fs, f"{b}/out/o.parquet").equals(pl.read_parquet(tmp_path / "local.parquet").drop(TIMING))


def test_s3_credentials_appear_in_no_output_file_or_message(make_spec, s3, tmp_path: Path, capsys) -> None:
    import yaml

    b = s3.bucket
    spec = make_spec(input={"path": f"s3://{b}/in/reviews.jsonl"}, output={"path": f"s3://{b}/out/j.jsonl"})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    # and a missing object is an error that names it, not the key
    spec["input"]["path"] = f"s3://{b}/in/missing.jsonl"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "bad.yaml")]) == 3
    err = capsys.readouterr().err
    assert "missing.jsonl" in err
    assert SECRET not in err
    for f in (tmp_path).rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    for info in s3.fs.get_file_info(pafs.FileSelector(b, recursive=True)):
        if info.type == pafs.FileType.File:
            with s3.fs.open_input_stream(info.path) as f:
                assert SECRET.encode() not in f.read(), info.path


@pytest.mark.parametrize("slash", ["/", ""])
def test_s3_folder_input_without_format_as_the_readmes_example(make_spec, gateway: Gateway, s3, tmp_path: Path,
                                                               capsys, slash: str) -> None:
    """Finding 8: `path: s3://bucket/reviews/` takes its format from its files, and messages show `s3://`."""
    import yaml

    b = s3.bucket
    with open(SAMPLES / "reviews.parquet", "rb") as src, s3.fs.open_output_stream(f"{b}/pq/a.parquet") as dst:
        dst.write(src.read())
    spec = make_spec(input={"path": f"s3://{b}/pq{slash}"}, output={"path": str(tmp_path / "o.parquet")})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["validate", str(tmp_path / "job.yaml")]) == 0
    assert f"(s3://{b}/pq -> " in capsys.readouterr().out
    assert main(["run", str(tmp_path / "job.yaml"), "--limit", "3"]) == 0
    spec["input"]["prompt"] = "{{nope}}"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == 3
    err = capsys.readouterr().err
    assert f"s3://{b}/pq/a.parquet: no column template variable" in err and "s3:/" + b not in err, err


def test_s3_with_ray_workers(make_spec, gateway: Gateway, s3, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    import ray

    from batcher.distributed import _connect

    b = s3.bucket
    local = parse_spec(make_spec(input={"path": str(SAMPLES / "reviews.jsonl"), "id_column": None},
                                 output={"path": str(tmp_path / "local.parquet")}, cache_dir=None))
    run_job(local, options())
    spec = parse_spec(make_spec(input={"path": f"s3://{b}/in/reviews.jsonl", "id_column": None},
                                output={"path": f"s3://{b}/out/r.parquet"}, cache_dir=None))
    if ray.is_initialized():
        ray.shutdown()  # the workers must see this test's AWS variables
    _connect("local")
    try:
        res = run_job(spec, options(ray="local", workers=2))
    finally:
        ray.shutdown()
    assert res.status == "finished" and res.ok == 300, res.message
    assert _read(s3.fs, f"{b}/out/r.parquet").equals(pl.read_parquet(tmp_path / "local.parquet").drop(TIMING))


def _put_jsonl(fs: pafs.FileSystem, path: str, rows: list[dict[str, str]]) -> None:
    with fs.open_output_stream(path) as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in rows))


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        data: bytes = f.read()
        return data


def _jsonl(fs: pafs.FileSystem, path: str) -> list[dict[str, object]]:
    with fs.open_input_stream(path) as f:
        return [json.loads(line) for line in f.read().splitlines()]


@pytest.fixture
def ray_here(s3) -> Iterator[None]:
    """A local Ray instance started after the S3 variables are set (its workers must see them)."""
    ray = pytest.importorskip("ray")
    from batcher.distributed import _connect

    if ray.is_initialized():
        ray.shutdown()
    _connect("local")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_s3_resume_on_another_machine_keeps_the_jobs_spend_and_dropped_rows(make_spec, gateway: Gateway, s3,
                                                                            tmp_path: Path, engine: str,
                                                                            request: pytest.FixtureRequest,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Three machines (three staging folders), one job on S3. Answers for ids no longer in the input are dropped
    # from the journal, so what they cost is only in spend.log, and the answers only in dropped.jsonl: both must
    # reach the store for the third machine to keep counting them. The second machine runs on Ray or not: on
    # Ray the calls its workers sent reach the job's spend.log on the store through the shards' logs.
    b, fs = s3.bucket, s3.fs
    src, out = f"{b}/in/ids.jsonl", f"{b}/out/o.jsonl"
    state = f"{b}/out/.o.jsonl.batcher"

    def spec(cap: float) -> Any:
        return parse_spec(make_spec(input={"path": f"s3://{src}", "id_column": "k", "prompt": "{{t}}"},
                                    output={"path": f"s3://{out}"}, limits={"max_cost_usd": cap},
                                    prices={"openai/gpt-4o-mini": {"prompt": 1000, "completion": 1000}},
                                    cache_dir=None))

    def machine(name: str) -> None:
        monkeypatch.setenv("BATCHER_STAGING", str(tmp_path / name))

    machine("a")
    _put_jsonl(fs, src, [{"k": f"k{i}", "t": f"text {i}"} for i in range(20)])
    first = run_job(spec(100.0), options())
    assert first.ok == 20
    spent_first = sum(r["cost_usd"] for r in _jsonl(fs, out))  # type: ignore[misc]
    machine("b")
    _put_jsonl(fs, src, [{"k": f"k{i}", "t": f"text {i}"} for i in range(10, 20)]
               + [{"k": f"n{i}", "t": f"new text {i}"} for i in range(10)])
    if engine == "ray":
        request.getfixturevalue("ray_here")
    second = run_job(spec(100.0), options(**({"ray": "local", "workers": 2} if engine == "ray" else {})))
    assert (second.ok, second.skipped, second.dropped) == (10, 10, 10), second.summary()
    sent = b"".join(_read_bytes(fs, i.path) for i in fs.get_file_info(pafs.FileSelector(f"{state}/spend")))
    assert all(f'["n{i}",'.encode() in sent for i in range(10)), "every call the second machine sent is on the store"
    answered = sum(r["cost_usd"] for r in _jsonl(fs, out))  # type: ignore[misc]
    job_spend = spent_first + second.cost_usd
    assert answered < job_spend - 1e-9  # the dropped answers' cost is not in the journal's answers
    assert sorted(r["id"] for r in _jsonl(fs, f"{state}/dropped.jsonl")) == sorted(f"k{i}" for i in range(10))
    machine("c")
    _put_jsonl(fs, src, [{"k": f"k{i}", "t": f"text {i}"} for i in range(10, 20)]
               + [{"k": f"n{i}", "t": f"new text {i}"} for i in range(15)])
    billed = gateway.stats.billed
    third = run_job(spec((answered + job_spend) / 2), options())  # more than the journal shows, less than spent
    assert third.status == "budget" and third.exit_code == 7, third.summary()
    assert "no request made" in third.message
    assert gateway.stats.billed == billed
    staged = list((tmp_path / "c").rglob("dropped.jsonl"))
    assert len(staged) == 1 and len(staged[0].read_bytes().splitlines()) == 10


def test_s3_spend_log_lines_reach_the_store_and_a_longer_staging_copy_is_kept(s3, tmp_path: Path) -> None:
    from batcher.budget import SpendLog
    from batcher.mirror import Mirror, MirroredSpendLog

    mirror = Mirror(tmp_path / "a", f"s3://{s3.bucket}/state")
    log = MirroredSpendLog(tmp_path / "a", mirror, "")
    log.sent("r1", 0.5)
    log.upload()
    log.sent("r2", 0.25)  # written here, not yet on the store: a kill -9 now
    log.close()
    (tmp_path / "a" / SpendLog.NAME).write_bytes(b'["r1",0.5]\n["r2",0.25]\n["r3",0.125]\n')
    # the same machine: the staging copy holds the store's lines and more, and is kept
    mirror.pull_spend("", tmp_path / "a")
    assert (tmp_path / "a" / SpendLog.NAME).read_bytes().count(b"\n") == 3
    # another machine: the store's lines (the close put r2's)
    mirror.pull_spend("", tmp_path / "b")
    assert (tmp_path / "b" / SpendLog.NAME).read_bytes() == b'["r1",0.5]\n["r2",0.25]\n'
    # a staging copy that does not begin with the store's is stale: the store's wins
    (tmp_path / "a" / SpendLog.NAME).write_bytes(b'{"carried":9.0}\n')
    mirror.pull_spend("", tmp_path / "a")
    assert (tmp_path / "a" / SpendLog.NAME).read_bytes() == b'["r1",0.5]\n["r2",0.25]\n'


# -- one run of a job at a time across machines: the lease on the store (lease.py) ----------------------------


def _lease_spec(make_spec: Any, b: str) -> Any:
    return parse_spec(make_spec(input={"path": f"s3://{b}/in/reviews.parquet"},
                                output={"path": f"s3://{b}/out/l.parquet"}, cache_dir=None))


def test_s3_a_run_on_another_machine_is_refused_by_the_lease_then_runs_once_it_is_released(
        make_spec, gateway: Gateway, s3, tmp_path: Path, capsys) -> None:
    import yaml

    from batcher.lease import S3Lease

    b = s3.bucket
    state = f"s3://{b}/out/.l.parquet.batcher"
    other = S3Lease(f"{state}/lease.json", tmp_path / "machine-a" / "lock")  # machine A, running the job
    assert other.try_acquire()
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(make_spec(
        input={"path": f"s3://{b}/in/reviews.parquet"}, output={"path": f"s3://{b}/out/l.parquet"})))
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 8  # machine B (its own staging folder)
    err = capsys.readouterr().err
    assert f"pid {os.getpid()} on {socket.gethostname()}" in err and "lease.json" in err
    assert gateway.stats.total == 0
    other.release()
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    assert gateway.stats.billed == 300
    assert s3.fs.get_file_info(f"{b}/out/.l.parquet.batcher/lease.json").type == pafs.FileType.NotFound


def test_s3_a_stale_lease_is_taken_over_and_its_holder_learns_it_lost(make_spec, s3, tmp_path: Path) -> None:
    from batcher.lease import S3Lease

    uri = f"s3://{s3.bucket}/out/.l.parquet.batcher/lease.json"
    dead = S3Lease(uri, tmp_path / "a" / "lock", ttl=1.0, renew=0.2)
    assert dead.try_acquire()
    dead._stop.set()  # it stops renewing: its process is frozen, or its machine gone
    dead._thread.join()  # type: ignore[union-attr]
    dead._stop.clear()
    late = S3Lease(uri, tmp_path / "b" / "lock")
    assert not late.try_acquire()  # not stale yet
    time.sleep(2.5)  # past its TTL by the store's clock (Last-Modified is in whole seconds)
    assert late.try_acquire()
    # the frozen holder wakes up: its next renewal finds the lease replaced, and it stops
    dead._hold(str(dead.etag))
    deadline = time.monotonic() + 10
    while dead.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dead.lost and "taken over" in dead.lost
    dead.release()
    late.release()


def test_s3_a_lease_left_by_a_run_killed_on_this_machine_is_taken_at_once(s3, tmp_path: Path) -> None:
    from batcher.lease import S3Lease

    uri = f"s3://{s3.bucket}/out/.l.parquet.batcher/lease.json"
    killed = S3Lease(uri, tmp_path / "lock")
    assert killed.try_acquire()
    killed._stop.set()  # kill -9: no renewal, no release; the flock it held died with it
    # the same host and local lock, which the next run now holds: the holder is gone
    assert S3Lease(uri, tmp_path / "lock").try_acquire()
    # another machine (another local lock) must wait out the TTL
    assert not S3Lease(uri, tmp_path / "elsewhere" / "lock").try_acquire()


def test_s3_two_machines_racing_for_the_lease_one_wins(s3, tmp_path: Path) -> None:
    import threading

    from batcher.lease import S3Lease

    for attempt in range(5):
        uri = f"s3://{s3.bucket}/race{attempt}/lease.json"
        leases = [S3Lease(uri, tmp_path / f"m{i}" / "lock") for i in range(4)]
        won: list[bool] = [False] * 4
        go = threading.Barrier(4)

        def take(i: int, go: threading.Barrier, leases: list[S3Lease], won: list[bool]) -> None:
            go.wait()
            won[i] = leases[i].try_acquire()

        threads = [threading.Thread(target=take, args=(i, go, leases, won)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(won) == 1, won
        for lease in leases:
            lease.release()


def test_s3_a_run_whose_lease_is_taken_over_stops_without_writing_the_output(make_spec, s3, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from batcher.errors import JobLockedError
    from batcher.gateway import GatewayConfig, serve_in_thread

    monkeypatch.setattr("batcher.lease.RENEW_S", 0.2)
    b = s3.bucket
    with serve_in_thread(GatewayConfig(latency_s=0.1)) as slow:
        spec = parse_spec(make_spec(input={"path": f"s3://{b}/in/reviews.parquet"},
                                    output={"path": f"s3://{b}/out/l.parquet"},
                                    endpoint={"base_url": slow.base_url}, limits={"concurrency": 2}, cache_dir=None))
        lease = f"{b}/out/.l.parquet.batcher/lease.json"

        def take_over() -> None:  # another machine that judged the lease stale
            while slow.stats.total < 10:
                time.sleep(0.02)
            with s3.fs.open_output_stream(lease) as f:
                f.write(json.dumps({"pid": 1, "host": "elsewhere", "started": "now", "ttl_s": 60}).encode())

        thief = threading.Thread(target=take_over)
        thief.start()
        with pytest.raises(JobLockedError, match="taken over"):
            run_job(spec, options())
        thief.join()
        assert slow.stats.total < 300
    assert s3.fs.get_file_info(f"{b}/out/l.parquet").type == pafs.FileType.NotFound
    with s3.fs.open_input_stream(lease) as f:
        assert json.loads(f.read())["host"] == "elsewhere"  # its lease is not deleted by the run that lost it
