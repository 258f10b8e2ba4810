"""Where results go: an fsync'd append-only journal while the run lasts, then the output file, atomically.

A row counts as done only once its journal line is on disk, so a `kill -9` loses at most the calls in flight.
The journal lives in a state folder beside the output (`out/.NAME.parquet.batcher/`) with `run.json`, the run's
fingerprint and status. `finalize` streams the journal into the output in row groups (never one big table) under
a temporary name, fsyncs it and renames it into place: readers never see a half-written file.

The state folder also holds `lock`: an exclusive `flock` held by the one run of the job (its pid, host and start
time written inside, for the message a second run gets). The OS releases it when the process ends, however it
ends, so a `kill -9` never leaves a stale lock behind. The file itself is never deleted: a lock on a file that was
unlinked and recreated would not exclude anyone.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import io
import json
import os
import socket
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from .errors import JobLockedError, OutputError

__all__ = [
    "RESULT_COLUMNS",
    "JobLock",
    "Journal",
    "RunState",
    "finalize",
    "input_identity",
    "output_schema",
    "state_dir_for",
]

CHOICE_TYPE = pa.list_(
    pa.struct([("index", pa.int64()), ("text", pa.string()), ("finish_reason", pa.string())])
)
RESULT_COLUMNS: dict[str, pa.DataType] = {
    "text": pa.string(),
    "finish_reason": pa.string(),
    "choices": CHOICE_TYPE,
    "model": pa.string(),
    "status": pa.string(),
    "error": pa.string(),
    "error_kind": pa.string(),
    "http_status": pa.int32(),
    "attempts": pa.int32(),
    "cached": pa.bool_(),
    "latency_ms": pa.float64(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "total_tokens": pa.int64(),
    "cached_tokens": pa.int64(),
    "reasoning_tokens": pa.int64(),
    "completion_id": pa.string(),
    "cost_usd": pa.float64(),
}


def kept_name(column: str, id_name: str) -> str:
    """A kept input column's name in the output: its own, unless batcher's columns already use it."""
    return f"input_{column}" if column in RESULT_COLUMNS or column == id_name else column


def output_schema(id_name: str, id_type: pa.DataType, keep_types: dict[str, pa.DataType]) -> pa.Schema:
    fields = [pa.field(id_name, id_type)]
    fields += [pa.field(kept_name(c, id_name), t) for c, t in keep_types.items() if c != id_name]
    fields += [pa.field(name, t) for name, t in RESULT_COLUMNS.items()]
    return pa.schema(fields)


def state_dir_for(output: Path) -> Path:
    return output.parent / f".{output.name}.batcher"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Disk full (or a signal) half-way: the old file stays as it was, and no temp file is left behind.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


@dataclass
class RunState:
    """`run.json`: which spec produced the journal, and whether the run finished."""

    directory: Path
    fingerprint: str
    status: str = "running"
    rows: int = 0
    input: dict[str, Any] | None = None  # `input_identity` of the input, for jobs whose rows are positions

    @property
    def file(self) -> Path:
        return self.directory / "run.json"

    @classmethod
    def load(cls, directory: Path) -> RunState | None:
        try:
            data = json.loads((directory / "run.json").read_text())
        except (OSError, ValueError):
            return None
        return cls(directory, data.get("fingerprint", ""), data.get("status", "running"), int(data.get("rows", 0)),
                   data.get("input"))

    def save(self) -> None:
        body = {"fingerprint": self.fingerprint, "status": self.status, "rows": self.rows, "input": self.input,
                "updated": time.time()}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.file, json.dumps(body, indent=1).encode())
        except OSError as exc:
            raise OutputError(f"cannot write {self.file}: {exc.strerror or exc}") from None


_ENDS = 1 << 20


def input_identity(path: Path) -> dict[str, Any]:
    """What names an input file's content, cheaply: its size, modification time and a hash of its first and
    last MiB. Used only when rows are identified by position (no `id_column`): there an edited input would
    shift answers onto the wrong rows. With ids, the ids name the rows and the file may change freely."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_ENDS))
        if st.st_size > _ENDS:
            f.seek(max(_ENDS, st.st_size - _ENDS))
            h.update(f.read(_ENDS))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_ends": h.hexdigest()[:32]}


class JobLock:
    """One run per job at a time: an exclusive `flock` on `lock` in the state folder, held from before the
    state is read until after the output's final write. It dies with its process (crash and `kill -9`
    included), so it never needs breaking by hand."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "lock"
        self._fd: int | None = None
        self.held = False

    def holder(self) -> str:
        """Who holds the lock, from what the holder wrote in it."""
        try:
            info = json.loads(self.path.read_bytes() or b"{}")
            return f"pid {info['pid']} on {info['host']}, started {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not written its details yet"

    def try_acquire(self) -> bool:
        """Take the lock if it is free (and write who holds it); False if another process holds it."""
        if self.held:
            return True
        if self._fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(f"cannot write the job's lock {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode()
        # Only for the message a second run prints: a full disk must not stop the run from starting here.
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, info, 0)
        return True

    def refusal(self) -> JobLockedError:
        return JobLockedError(
            f"another run of this job holds its lock ({self.path}): {self.holder()}. Let it finish (or stop it), "
            "or rerun with --wait to start as soon as it ends"
        )

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if self.held:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            self.held = False
            os.close(fd)  # closing the last descriptor releases the flock


def fingerprint(material: dict[str, Any]) -> str:
    blob = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _dumps(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode()


class Journal:
    """Append-only JSON lines; `append` returns once the lines are on disk.

    Written with `os.write` on an unbuffered descriptor: when the disk fills half-way through a group of lines,
    the part that made it is cut off again, so the journal only ever holds whole lines (a buffered file would
    also try to write the rest once more when it is closed)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "journal.jsonl"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write the journal {self.path}: {exc.strerror or exc}") from None

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        data = memoryview(b"".join(_dumps(r) for r in records))
        if not data or self._fd is None:
            return
        fd = self._fd
        start = -1
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as exc:
            if start >= 0:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
            raise OutputError(f"cannot write the journal {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record; a line torn by a crash (the last one) is skipped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def ordered_lines(path: Path) -> Iterator[bytes]:
    """The journal's lines in input order (by `_i`, the row's position), in bounded memory.

    Answers arrive out of order; sorting whole records would hold the whole output in memory. Instead one pass
    collects (position, offset, length) per line, 20 bytes a row, and a second pass reads lines in sorted order
    with pread. Each line starts with `{"_i":N,` (the writer puts `_i` first).
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    positions = array("q")
    offsets = array("q")
    lengths = array("I")
    with open(path, "rb") as f:
        offset = 0
        for raw in f:
            n = len(raw)
            if raw.endswith(b"\n") and raw.startswith(b'{"_i":'):
                if n >= 1 << 32:  # lengths are 32-bit; no answer comes near, but none is dropped silently
                    raise OutputError(f"{path}: a journal line of {n:,} bytes is too long to write out")
                comma = raw.find(b",", 6)
                try:
                    positions.append(int(raw[6:comma]))
                    offsets.append(offset)
                    lengths.append(n)
                except ValueError:
                    pass
            offset += n
    if not positions:
        return
    # Sorted in Arrow over the array's own buffer (no copy); the order replaces the positions.
    keys = pa.Array.from_buffers(pa.int64(), len(positions), [None, pa.py_buffer(positions)])
    order = pc.sort_indices(keys)
    del keys, positions
    # pread, not mmap: every page of a mapping that is touched counts in our RSS (the whole journal, ~800 MB
    # for a million rows), while read pages stay in the OS's cache without being ours.
    with open(path, "rb") as f:
        fd = f.fileno()
        for part in range(0, len(order), 8_192):
            for i in order.slice(part, 8_192).to_pylist():
                yield os.pread(fd, lengths[i], offsets[i])


def ordered_records(path: Path) -> Iterator[dict[str, Any]]:
    for line in ordered_lines(path):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield rec


def compact_journal(directory: Path) -> list[Any]:
    """Keep only answered rows (error rows are retried on a rerun), drop torn lines; return the done ids."""
    path = directory / "journal.jsonl"
    if not path.exists():
        return []
    tmp = path.with_name("journal.compact.tmp")
    done: set[Any] = set()
    ids: list[Any] = []
    try:
        _compact(path, tmp, done, ids)
        os.replace(tmp, path)
    except BaseException as exc:
        # The journal is replaced only once its compact copy is whole: a full disk leaves it as it was.
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot compact the journal {path}: {exc.strerror or exc}") from None
        raise
    _fsync_dir(directory)
    return ids


def _compact(path: Path, tmp: Path, done: set[Any], ids: list[Any]) -> None:
    with open(tmp, "wb") as out:
        buf: list[bytes] = []
        for rec in read_journal(path):
            rid = rec.get("id")
            if rec.get("status") != "ok" or rid is None or rid in done:
                continue
            done.add(rid)
            ids.append(rid)
            buf.append(_dumps(rec))
            if len(buf) >= 10_000:
                out.write(b"".join(buf))
                buf.clear()
        out.write(b"".join(buf))
        out.flush()
        os.fsync(out.fileno())


def _table(records: list[dict[str, Any]], schema: pa.Schema, id_name: str, keep: list[str]) -> pa.Table:
    columns: dict[str, list[Any]] = {f.name: [] for f in schema}
    kept = [(c, kept_name(c, id_name)) for c in keep if c != id_name]
    for rec in records:
        columns[id_name].append(rec.get("id"))
        k = rec.get("keep") or {}
        for c, out_name in kept:
            columns[out_name].append(k.get(c))
        for name in RESULT_COLUMNS:
            columns[name].append(rec.get(name))
    arrays = []
    for f in schema:
        values = columns[f.name]
        try:
            arrays.append(pa.array(values, type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            # A kept JSONL value that does not fit the column's type: keep it, as JSON text.
            arrays.append(pa.array([None if v is None else json.dumps(v, default=str) for v in values], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _journal_schema(schema: pa.Schema, id_name: str, keep: list[str]) -> pa.Schema:
    fields = [pa.field("_i", pa.int64()), pa.field("id", schema.field(id_name).type)]
    kept = [c for c in keep if c != id_name]
    if kept:
        fields.append(pa.field("keep", pa.struct([(c, schema.field(kept_name(c, id_name)).type) for c in kept])))
    fields += [pa.field(name, t) for name, t in RESULT_COLUMNS.items()]
    return pa.schema(fields)


def _table_from_lines(lines: list[bytes], schema: pa.Schema, id_name: str, keep: list[str]) -> pa.Table:
    """Parse a row group's journal lines with Arrow's JSON reader (C++, typed by the output schema); lines
    whose kept values do not fit their column's type go through the slower Python path instead."""
    buf = b"".join(lines)
    try:
        parsed = pa_json.read_json(
            io.BytesIO(buf),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=len(buf) + 1),
            parse_options=pa_json.ParseOptions(
                explicit_schema=_journal_schema(schema, id_name, keep), unexpected_field_behavior="ignore"
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _table([json.loads(x) for x in lines], schema, id_name, keep)
    kept = [c for c in keep if c != id_name]
    keep_col = parsed.column("keep").combine_chunks() if kept else None
    arrays = [parsed.column("id")]
    arrays += [pc.struct_field(keep_col, [i]) for i in range(len(kept))]
    arrays += [parsed.column(name) for name in RESULT_COLUMNS]
    return pa.Table.from_arrays(arrays, schema=schema)


def _openai_batch_line(rec: dict[str, Any], n: int) -> dict[str, Any]:
    """One line of an OpenAI Batch API output file."""
    ok = rec.get("status") == "ok"
    body = None
    if ok:
        body = {
            "id": rec.get("completion_id"),
            "object": "text_completion",
            "model": rec.get("model"),
            "choices": rec.get("choices")
            or [{"index": 0, "text": rec.get("text"), "finish_reason": rec.get("finish_reason")}],
            "usage": {
                "prompt_tokens": rec.get("prompt_tokens"),
                "completion_tokens": rec.get("completion_tokens"),
                "total_tokens": rec.get("total_tokens"),
            },
        }
    return {
        "id": f"batch_req_{n:08d}",
        "custom_id": rec.get("id"),
        "response": {"status_code": 200, "request_id": rec.get("completion_id"), "body": body}
        if ok
        else ({"status_code": rec.get("http_status"), "request_id": None, "body": None} if rec.get("http_status") else None),
        "error": None if ok else {"code": rec.get("error_kind"), "message": rec.get("error")},
    }


# Columns whose values are mostly unique (ids, answers, completion ids, latencies): a dictionary for them is
# built, holds a copy of the row group's text, overflows and is dropped; it only costs memory and time.
_UNIQUE_COLUMNS = {"text", "choices", "completion_id", "latency_ms", "cost_usd"}


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    names = [name for name in schema.names[1:] if name not in _UNIQUE_COLUMNS]
    return [*names, "choices.list.element.finish_reason"]


def finalize(
    journal: Path,
    output: Path,
    fmt: str,
    schema: pa.Schema,
    id_name: str,
    keep: list[str],
    row_group_size: int,
) -> int:
    """Write the journal's records to `output` atomically; returns the number of rows written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    rows = 0
    try:
        if fmt == "parquet":
            with pq.ParquetWriter(tmp, schema, compression="zstd", use_dictionary=_dictionary_columns(schema)) as writer:
                # Lines are parsed a slice at a time into Arrow tables, and a row group is written once the
                # slices add up to one: the peak is one row group in Arrow, not also its JSON text.
                lines: list[bytes] = []
                tables: list[pa.Table] = []
                pending = 0
                step = min(row_group_size, 2_000)
                for line in ordered_lines(journal):
                    lines.append(line)
                    if len(lines) >= step:
                        tables.append(_table_from_lines(lines, schema, id_name, keep))
                        pending += len(lines)
                        lines = []
                        if pending >= row_group_size:
                            writer.write_table(pa.concat_tables(tables), row_group_size=row_group_size)
                            rows += pending
                            tables, pending = [], 0
                if lines:
                    tables.append(_table_from_lines(lines, schema, id_name, keep))
                    pending += len(lines)
                if tables:
                    writer.write_table(pa.concat_tables(tables), row_group_size=row_group_size)
                    rows += pending
                elif rows == 0:
                    writer.write_table(_table([], schema, id_name, keep))
        else:
            with open(tmp, "wb") as f:
                out_lines: list[bytes] = []
                for rec in ordered_records(journal):
                    if fmt == "openai_batch":
                        out_lines.append(_dumps(_openai_batch_line(rec, rows)))
                    else:
                        out = {id_name: rec.get("id")}
                        k = rec.get("keep") or {}
                        for c in keep:
                            if c != id_name:
                                out[kept_name(c, id_name)] = k.get(c)
                        out.update((name, rec.get(name)) for name in RESULT_COLUMNS)
                        out_lines.append(_dumps(out))
                    rows += 1
                    if len(out_lines) >= row_group_size:
                        f.write(b"".join(out_lines))
                        out_lines.clear()
                f.write(b"".join(out_lines))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, output)
        _fsync_dir(output.parent)
    except BaseException as exc:
        # Disk full, or a signal during the write: the old output (or none) stays, and no temp file is left.
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write the output {output}: {exc.strerror or exc}") from None
        raise
    return rows
