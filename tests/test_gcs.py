"""Input, output and the journal on gs://: Google Cloud Storage as gcp-storage-emulator serves it (pure Python, its
own process on 127.0.0.1), reached through pyarrow's GCS filesystem with the address from STORAGE_EMULATOR_HOST,
the variable Google's SDKs read."""

from __future__ import annotations

import datetime
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from batcher import parse_spec, run_job
from batcher.gateway import Gateway

from .conftest import SAMPLES, options

pytest.importorskip("gcp_storage_emulator")
pytestmark = pytest.mark.slow

TIMING = ["latency_ms", "completion_id"]


@pytest.fixture(scope="module")
def gcs_server() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory"],
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
def gcs(gcs_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    monkeypatch.setenv("BATCHER_STAGING", str(tmp_path / "staging"))
    from batcher import storage

    fs, _ = storage.filesystem("gs://bucket")
    bucket = f"b{time.time_ns()}"
    # creating a bucket takes a project (batcher never creates one)
    admin = pafs.GcsFileSystem(endpoint_override=gcs_server.split("://")[1], scheme="http", anonymous=True,
                               project_id="test", retry_time_limit=datetime.timedelta(seconds=5))
    admin.create_dir(bucket)
    for name in ("reviews.parquet", "reviews.jsonl"):
        with open(SAMPLES / name, "rb") as src, fs.open_output_stream(f"{bucket}/in/{name}") as dst:
            dst.write(src.read())
    return SimpleNamespace(fs=fs, bucket=bucket)


def _read(fs: pafs.FileSystem, path: str) -> pl.DataFrame:
    with fs.open_input_file(path) as f:
        return pl.from_arrow(pq.read_table(f)).drop(TIMING)  # type: ignore[return-value]


def test_gs_input_output_and_journal_then_resume_elsewhere(make_spec, gateway: Gateway, gcs, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    b = gcs.bucket
    local = parse_spec(make_spec(output={"path": str(tmp_path / "local.parquet")}, cache_dir=None))
    run_job(local, options())
    spec = parse_spec(make_spec(input={"path": f"gs://{b}/in/reviews.parquet"},
                                output={"path": f"gs://{b}/out/o.parquet"}, cache_dir=None))
    part = run_job(spec, options(limit=120))
    assert part.ok == 120 and str(part.output).startswith("gs:")
    journal = gcs.fs.get_file_info(pafs.FileSelector(f"{b}/out/.o.parquet.batcher/journal"))
    assert journal, "the journal is on the store"
    monkeypatch.setenv("BATCHER_STAGING", str(tmp_path / "elsewhere"))  # another machine
    rest = run_job(spec, options())
    assert rest.status == "finished" and rest.skipped == 120 and rest.ok == 180
    assert gateway.stats.billed == 300 + 300
    assert _read(gcs.fs, f"{b}/out/o.parquet").equals(pl.read_parquet(tmp_path / "local.parquet").drop(TIMING))


def test_gs_folder_input_and_jsonl_output(make_spec, gcs, tmp_path: Path) -> None:
    b = gcs.bucket
    local = parse_spec(make_spec(input={"path": str(SAMPLES / "reviews.jsonl"), "id_column": None},
                                 output={"path": str(tmp_path / "local.jsonl")}, cache_dir=None))
    run_job(local, options())
    spec = parse_spec(make_spec(input={"path": f"gs://{b}/in/", "format": "jsonl", "id_column": None},
                                output={"path": f"gs://{b}/out/j.jsonl"}, cache_dir=None))
    res = run_job(spec, options())
    assert res.status == "finished" and res.ok == 300, res.message
    with gcs.fs.open_input_stream(f"{b}/out/j.jsonl") as f:
        remote = pl.read_ndjson(f.read()).drop(TIMING)
    assert remote.equals(pl.read_ndjson(tmp_path / "local.jsonl").drop(TIMING))


def test_gs_with_ray_workers(make_spec, gateway: Gateway, gcs, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from batcher.distributed import _connect

    b = gcs.bucket
    local = parse_spec(make_spec(input={"path": str(SAMPLES / "reviews.jsonl"), "id_column": None},
                                 output={"path": str(tmp_path / "local.parquet")}, cache_dir=None))
    run_job(local, options())
    spec = parse_spec(make_spec(input={"path": f"gs://{b}/in/reviews.jsonl", "id_column": None},
                                output={"path": f"gs://{b}/out/r.parquet"}, cache_dir=None))
    if ray.is_initialized():
        ray.shutdown()  # the workers must see this test's STORAGE_EMULATOR_HOST
    _connect("local")
    try:
        res = run_job(spec, options(ray="local", workers=2))
    finally:
        ray.shutdown()
    assert res.status == "finished" and res.ok == 300, res.message
    assert _read(gcs.fs, f"{b}/out/r.parquet").equals(pl.read_parquet(tmp_path / "local.parquet").drop(TIMING))
