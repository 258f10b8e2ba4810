"""What every benchmark shares: the gateway in its own process, generated inputs, job specs, and a child
process whose CPU seconds and peak RSS are measured alone.

Measuring in a child keeps the figures honest: the gateway's CPU and the benchmark's own bookkeeping never
count against batcher, and `os.wait4` hands back the child's exact user+sys seconds and peak RSS from the
kernel. A poller samples the child's RSS (and, when asked, a file's size as the run's progress) meanwhile,
for memory-growth figures. Everything talks to 127.0.0.1 only and every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _prompts import MAX_TOKENS, PROMPT_TEMPLATE, prompt, review_text

ROOT = Path(__file__).resolve().parent.parent
CHILD = str(Path(__file__).resolve().parent / "_child.py")  # runs a program and reports its own peak RSS
PY = sys.executable
HOST = "127.0.0.1"
MODEL = "openai/gpt-4o-mini"


# ------------------------------------------------------------------------------------------------ inputs


def make_parquet(path: Path, rows: int, row_group_size: int = 10_000) -> Path:
    """`rows` reviews (id int64, text) written in `row_group_size` row groups, in bounded memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        meta = pq.ParquetFile(path).metadata
        if meta.num_rows == rows and meta.row_group(0).num_rows == min(rows, row_group_size):
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    step = 50_000
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        if row_group_size >= rows:
            # One row group: pyarrow needs the whole table in one write_table call.
            ids = range(rows)
            table = pa.table({"id": pa.array(ids, pa.int64()), "text": [review_text(i) for i in ids]}, schema=schema)
            writer.write_table(table, row_group_size=rows)
        else:
            for start in range(0, rows, step):
                ids = range(start, min(rows, start + step))
                table = pa.table(
                    {"id": pa.array(ids, pa.int64()), "text": [review_text(i) for i in ids]}, schema=schema
                )
                writer.write_table(table, row_group_size=row_group_size)
    tmp.replace(path)
    return path


@functools.cache
def _vocabulary() -> tuple[str, ...]:
    return tuple("".join(random.Random(w).choices("etaoinshrdlucmfwypvbgkqjxz", k=3 + w % 7)) for w in range(4096))


def long_text(i: int, chars: int) -> str:
    """Document i: ~`chars` characters of pseudo-words from a 4,096-word vocabulary, different for every i. Not
    one text repeated: zstd compresses it about as it does prose, so the file's column chunks are realistic."""
    words = random.Random(i).choices(_vocabulary(), k=chars // 5 + 1)
    return f"Document {i}: " + " ".join(words)[:chars]


def make_long_parquet(path: Path, rows: int, chars: int) -> Path:
    """`rows` documents of ~`chars` characters (id int64, text), one row group, as pandas' or pyarrow's
    `to_parquet` write a file of fewer than a million rows: the reader must not take the row group whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "text": [long_text(i, chars) for i in range(rows)]},
                     schema=schema)
    # Pages of at most 16 values (or pyarrow's 1 MB): pyarrow checks a page's size only every `write_batch_size`
    # values (1,024 by default), so by default a page of long documents holds up to 1,024 of them (500 MB for
    # 500 KB rows), and a page is decompressed whole by any reader: `batch_bytes` cannot bound that (README).
    pq.write_table(table, tmp, compression="zstd", row_group_size=rows, write_batch_size=16)
    del table
    tmp.replace(path)
    return path


def make_long_lines(path: Path, rows: int, chars: int, emoji: bool = False) -> Path:
    """The same documents as `make_long_parquet`, as JSONL lines `{"id": i, "text": ...}` or CSV records
    `i,text` (by the path's suffix), written a row at a time. `emoji`: each ends in ` naïve 東京 🙂`, so its str
    takes four bytes a character in memory (PEP 393), as any text with one emoji does."""
    if path.exists() and sum(1 for _ in path.open("rb")) == rows + (path.suffix == ".csv"):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        if path.suffix == ".csv":
            f.write("id,text\n")  # the documents hold no comma, quote or newline
        for i in range(rows):
            text = long_text(i, chars) + (" naïve 東京 🙂" if emoji else "")
            f.write(f"{i},{text}\n" if path.suffix == ".csv" else json.dumps({"id": i, "text": text}) + "\n")
    tmp.replace(path)
    return path


def bodies_for(n: int) -> Iterator[dict[str, Any]]:
    """The request bodies batcher sends for the generated inputs (for the bare client loops)."""
    for i in range(n):
        yield {"max_tokens": MAX_TOKENS, "temperature": 0, "model": MODEL, "prompt": prompt(i)}


def write_spec(
    path: Path,
    *,
    input_path: Path,
    output: Path,
    base_url: str,
    concurrency: int,
    cache_dir: Path,
    cache: bool = False,
    rpm: float | None = None,
    batch_size: int | None = None,
    keep_columns: Sequence[str] = (),
) -> Path:
    request: dict[str, Any] = {"model": MODEL, "max_tokens": MAX_TOKENS, "temperature": 0}
    if cache:
        request["cache"] = {"type": "exact_match", "ttl": 86_400}
    inp: dict[str, Any] = {"path": str(input_path), "id_column": "id", "prompt": PROMPT_TEMPLATE}
    if batch_size is not None:
        inp["batch_size"] = batch_size
    limits: dict[str, Any] = {"concurrency": concurrency}
    if rpm is not None:
        limits["requests_per_minute"] = rpm
    return write_spec_file(path, inp=inp, output=output, base_url=base_url, request=request, limits=limits,
                           cache_dir=str(cache_dir), keep_columns=keep_columns)


def write_spec_file(path: Path, *, inp: dict[str, Any], output: Path, base_url: str, request: dict[str, Any],
                    limits: dict[str, Any], keep_columns: Sequence[str] = (), **extra: Any) -> Path:
    """A job spec (JSON) against the gateway at `base_url` with no API key; `extra` adds top-level fields."""
    out: dict[str, Any] = {"path": str(output)}
    if keep_columns:
        out["keep_columns"] = list(keep_columns)
    spec = {
        "name": path.stem,
        "input": inp,
        "output": out,
        "endpoint": {"base_url": base_url, "api": "orq", "api_key_env": None},
        "request": request,
        "limits": limits,
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1))
    return path


def batcher_argv(spec: Path, base_url: str, *extra: str) -> list[str]:
    """`batcher run SPEC --quiet --base-url URL`, through this interpreter. With BATCHER_BENCH_CLI=FILE set,
    `python FILE run ...` instead: a script that patches batcher and calls `batcher.cli.main`, to measure a
    proposed change before it is made."""
    cli = os.environ.get("BATCHER_BENCH_CLI")
    head = [PY, CHILD, cli] if cli else [PY, CHILD, "-m", "batcher"]
    return [*head, "run", str(spec), "--quiet", "--base-url", base_url, *extra]


@contextlib.contextmanager
def workdir(keep: bool = False) -> Iterator[Path]:
    """A temp dir for inputs, outputs and the cache; removed afterwards unless `keep`."""
    d = Path(tempfile.mkdtemp(prefix="batcher-bench-"))
    try:
        yield d
    finally:
        if keep:
            print(f"(kept {d})", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ gateway


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _http(method: str, url: str, timeout: float = 60.0) -> Any:
    assert url.startswith(f"http://{HOST}:"), url  # loopback only, always
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class GatewayProcess:
    """`python -m batcher.gateway --no-validate` in its own process, so its CPU never counts as batcher's.

    `loop` is the gateway's `--loop`: "auto" (uvloop when installed, as `batcher gateway` runs), "asyncio" or
    "uvloop"; GET /health names the loop it runs on."""

    def __init__(self, latency_ms: float = 0.0, loop: str = "auto") -> None:
        self.latency_ms = latency_ms
        self.loop = loop
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._ps: psutil.Process | None = None

    def __enter__(self) -> GatewayProcess:
        argv = [PY, "-m", "batcher.gateway", "--host", HOST, "--port", str(self.port),
                "--latency-ms", str(self.latency_ms), "--no-validate", "--loop", self.loop]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        self._ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 30
        while True:
            try:
                _http("GET", f"{self.base_url}/health", timeout=2)
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    self.__exit__()
                    raise RuntimeError(f"the gateway did not start: {err[-500:]}") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = _http("GET", f"{self.base_url}/_stats")
        return data

    def reset(self) -> None:
        _http("POST", f"{self.base_url}/_reset")

    def cpu_seconds(self) -> float:
        assert self._ps is not None
        t = self._ps.cpu_times()
        return float(t.user + t.system)


# ------------------------------------------------------------------------------------------ measured child


@dataclass
class ChildRun:
    argv: list[str]
    returncode: int
    wall_s: float
    cpu_s: float  # user + sys of the child alone (from wait4)
    peak_rss_mb: float  # the child's own VmHWM when it ran under _child.py, else its ru_maxrss (see _child.py)
    started: float  # time.monotonic() just before the spawn (comparable with the gateway's arrivals)
    # (seconds since the spawn, RSS MB, user+sys CPU seconds so far, size of `progress_file`)
    samples: list[tuple[float, float, float, int]] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    gateway_cpu_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)  # whatever the child reported about itself

    def check(self) -> ChildRun:
        if self.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.argv[:6])}... exited {self.returncode}\n{self.stderr[-2000:]}{self.stdout[-1000:]}"
            )
        return self


def run_child(
    argv: Sequence[str],
    *,
    timeout_s: float,
    gateway: GatewayProcess | None = None,
    progress_file: Path | None = None,
    sample_every_s: float = 0.05,
    env: dict[str, str] | None = None,
) -> ChildRun:
    """Run `argv` to completion (killed past `timeout_s`) and measure it alone."""
    gw0 = gateway.cpu_seconds() if gateway else None
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    fd, peak_file = tempfile.mkstemp(prefix="bench-peak-")
    os.close(fd)
    env = {**(env if env is not None else os.environ), "BENCH_PEAK_FILE": peak_file}
    started = time.monotonic()
    proc = subprocess.Popen(list(argv), stdout=out, stderr=err, cwd=ROOT, env=env)
    samples: list[tuple[float, float, float, int]] = []
    done = threading.Event()

    def poll() -> None:
        try:
            ps = psutil.Process(proc.pid)
            while not done.is_set():
                with ps.oneshot():
                    rss = ps.memory_info().rss / 2**20
                    t = ps.cpu_times()
                size = 0
                if progress_file is not None:
                    with contextlib.suppress(OSError):
                        size = progress_file.stat().st_size
                samples.append((time.monotonic() - started, rss, t.user + t.system, size))
                done.wait(sample_every_s)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            pass

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    timer = threading.Timer(timeout_s, lambda: proc.poll() is None and proc.kill())
    timer.start()
    try:
        # wait4 reaps the child and returns its own rusage: exact CPU and peak RSS, nobody else's.
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
        done.set()
        poller.join(timeout=5)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    peak_mb = usage.ru_maxrss / 1024
    with contextlib.suppress(OSError, ValueError):
        peak_mb = int(Path(peak_file).read_text() or "x") / 1024
    with contextlib.suppress(OSError):
        os.unlink(peak_file)
    run = ChildRun(
        argv=list(argv),
        returncode=proc.returncode,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_mb=peak_mb,
        started=started,
        samples=samples,
        stdout=out.read().decode("utf-8", "replace"),
        stderr=err.read().decode("utf-8", "replace"),
    )
    if gateway is not None and gw0 is not None:
        run.gateway_cpu_s = gateway.cpu_seconds() - gw0
    if proc.returncode == -signal.SIGKILL:
        raise TimeoutError(f"{' '.join(argv[:6])}... killed after {timeout_s:g} s")
    return run


def cpu_at(run: ChildRun, when: float) -> float:
    """The child's cumulative CPU seconds at monotonic time `when`, interpolated between samples."""
    t = when - run.started
    prev = (0.0, 0.0, 0.0, 0)
    for s in run.samples:
        if s[0] >= t:
            if s[0] == prev[0]:
                return s[2]
            return prev[2] + (s[2] - prev[2]) * (t - prev[0]) / (s[0] - prev[0])
        prev = s
    return run.cpu_s


@dataclass(frozen=True)
class Steady:
    """The middle 80% of a run's requests as the gateway saw them: the rate, and the client's CPU per request
    over the same span (no interpreter start, no input check, no final write)."""

    rate: float
    cpu_ms: float


def steady(run: ChildRun, arrivals: Sequence[float]) -> Steady:
    a = sorted(arrivals)
    if len(a) < 20:
        return Steady(float("nan"), float("nan"))
    i, j = len(a) // 10, len(a) * 9 // 10 - 1
    span = a[j] - a[i]
    cpu = cpu_at(run, a[j]) - cpu_at(run, a[i])
    return Steady((j - i) / span if span > 0 else float("nan"), 1000 * cpu / (j - i))


# --------------------------------------------------------------------------------------------------- output


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (readable in a terminal, pastes into the README)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def header(title: str) -> None:
    say(f"\n## {title}\n")
