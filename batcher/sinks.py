"""Where results go: an fsync'd append-only journal while the run lasts, then the output file, atomically.

A row counts as done once its journal line is written (to the kernel, at once, by whoever holds the answer), so
a `kill -9` loses at most the calls in flight; lines reach the disk in fsync groups (`Journal`).
The journal lives in a state folder beside the output (`out/.NAME.parquet.batcher/`) with `run.json`, the run's
fingerprint and status. `finalize` streams the journal into the output in row groups (never one big table) under
a temporary name, fsyncs it and renames it into place: readers never see a half-written file.

The state folder also holds `lock`: an exclusive `flock` held by the one run of the job (its pid, host and start
time written inside, for the message a second run gets). The OS releases it when the process ends, however it
ends, so a `kill -9` never leaves a stale lock behind. The file itself is never deleted: a lock on a file that was
unlinked and recreated would not exclude anyone.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import datetime
import fcntl
import hashlib
import io
import json
import math
import os
import socket
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from .errors import JobLockedError, OutputError
from .spec import kept_column_name

__all__ = [
    "DROPPED",
    "OUTPUT_MARKER",
    "RESULT_COLUMNS",
    "InputColumns",
    "JobLock",
    "Journal",
    "KeptValues",
    "RunState",
    "WriteStats",
    "encode_lines",
    "finalize",
    "input_identity",
    "json_values",
    "output_schema",
    "remap_journal",
    "state_dir_for",
    "written_by_batcher",
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
    return kept_column_name(column, id_name)


def output_schema(
    id_name: str, id_type: pa.DataType, keep_types: dict[str, pa.DataType],
    extra: Mapping[str, pa.DataType] | None = None,
) -> pa.Schema:
    """`keep_types`: the kept columns other than the input's own id column, in the spec's order. `extra`: the
    API shape's own columns (chat: refusal, tool_calls, reasoning and a json_schema's typed columns), written
    after batcher's result columns."""
    fields = [pa.field(id_name, id_type)]
    fields += [pa.field(kept_name(c, id_name), t) for c, t in keep_types.items()]
    fields += [pa.field(name, t) for name, t in RESULT_COLUMNS.items()]
    fields += [pa.field(name, t) for name, t in (extra or {}).items()]
    return pa.schema(fields)


def result_names(schema: pa.Schema) -> list[str]:
    """The columns a journal record fills: batcher's result columns and the shape's, in the schema's order.
    They start at `text`: the id and the kept columns come first, and a kept column named `text` is renamed."""
    names: list[str] = schema.names
    return names[names.index("text"):]


# Key in a Parquet output's footer metadata: batcher wrote this file (see `written_by_batcher`).
OUTPUT_MARKER = b"batcher"


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
    input: dict[str, Any] | None = None  # `input_identity` of the input when the journal was last in step with it

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


def input_identity(path: str | os.PathLike[str], files: Sequence[str] | None = None) -> dict[str, Any]:
    """What names an input's content, cheaply: a file's size, modification time and a hash of its first and
    last MiB. Without `id_column` rows are positions, so a rerun on a changed input is refused (answers would
    land on the wrong rows); with ids the file may change freely, and a change makes the rerun renumber the
    journal by id (`remap_journal`) so the output follows the input's current order.

    A directory, a glob or an object (`s3://`): every file's identity, in order (a file added or removed
    changes positions too). `files`: the files it names, if already listed (`Source.files`); else listed here
    with any input suffix."""
    from . import storage

    if files is None:
        if not storage.is_remote(path) and Path(path).is_file():
            files = [os.fspath(path)]
        else:
            suffixes = (".parquet", ".jsonl", ".ndjson", ".csv", ".tsv")
            files = storage.expand_inputs(path, suffixes) or [os.fspath(path)]
    if len(files) != 1 or storage.is_remote(files[0]):
        return {"files": [storage.identity(f) for f in files]}
    return _file_identity(Path(files[0]))


def _file_identity(path: Path) -> dict[str, Any]:
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
    try:
        return (json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str) + "\n").encode()
    except UnicodeEncodeError:  # a lone surrogate (a kept JSONL value, say) is valid JSON only escaped
        return (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()


def encode_lines(records: Iterable[dict[str, Any]]) -> bytes:
    """Journal lines for `records` (what `Journal.write` takes)."""
    return b"".join(_dumps(r) for r in records)


class Journal:
    """Append-only JSON lines: written to the kernel at once, fsync'd in groups.

    Two kinds of crash, two costs. A process crash (`kill -9`, OOM, a bug) loses nothing that `write` returned:
    the line is in the kernel's page cache, and the kernel writes it out whether or not the process lives. So
    `write` is one unbuffered `os.write` (a few microseconds, no thread hop), made by whoever holds the answer,
    as soon as it holds it. Only a power loss or a kernel crash can lose lines the kernel had not yet put on the
    disk; `sync_periodically` bounds that with one `fdatasync` per `interval` for every line written meanwhile
    (group commit, as a database's write-ahead log does), instead of one per answer.

    When the disk fills half-way through a write, the part that made it is cut off again, so the journal only
    ever holds whole lines. All writes come from one thread (the event loop's): the offset to cut back to is
    ours to track, and one job's lock keeps other processes out."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "journal.jsonl"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._end = os.fstat(self._fd).st_size
        except OSError as exc:
            raise OutputError(f"cannot write the journal {self.path}: {exc.strerror or exc}") from None
        self.written = 0  # bytes written by this process
        self.synced = 0  # of which known to be on the disk
        self.syncs = 0
        self._dirty: anyio.Event | None = None  # while `sync_periodically` runs

    def _error(self, exc: OSError) -> OutputError:
        return OutputError(f"cannot write the journal {self.path}: {exc.strerror or exc}")

    def write(self, data: bytes) -> None:
        """Hand whole lines to the kernel now (no fsync): they survive the death of this process."""
        if not data or self._fd is None:
            return
        fd, view = self._fd, memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._end)
            raise self._error(exc) from None
        self._end += len(data)
        self.written += len(data)
        if self._dirty is not None:
            self._dirty.set()

    def sync(self) -> None:
        """Everything written so far, on the disk (thread-safe: `write` may go on meanwhile)."""
        fd = self._fd
        if fd is None:
            return
        target = self.written
        try:
            getattr(os, "fdatasync", os.fsync)(fd)
        except OSError as exc:
            raise self._error(exc) from None
        self.synced = max(self.synced, target)
        self.syncs += 1

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Write `records` and return once they are on the disk."""
        self.write(encode_lines(records))
        self.sync()

    async def sync_periodically(self, interval: float) -> None:
        """Group commit, until cancelled: after a write, wait `interval` for more, then one fdatasync (in a
        thread) for all of them. A line is on the disk at most `interval` + one fdatasync after its write; an
        idle journal costs no wakeup."""
        self._dirty = anyio.Event()
        if self.written > self.synced:
            self._dirty.set()
        try:
            while True:
                await self._dirty.wait()
                await anyio.sleep(interval)
                self._dirty = anyio.Event()  # writes from now on wait for the next round
                await anyio.to_thread.run_sync(self.sync)
        finally:
            self._dirty = None

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OutputError):
                if self.written > self.synced:
                    self.sync()
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


def _loads(line: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def ordered_records(path: Path) -> Iterator[dict[str, Any]]:
    for line in ordered_lines(path):
        if (rec := _loads(line)) is not None:
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


DROPPED = "dropped.jsonl"


def remap_journal(directory: Path, ids: pa.Array, on_dropped: Callable[[float], None] | None = None) -> int:
    """Renumber a compacted journal's positions (`_i`) to the rows' current places in an edited input, found by
    id (`ids`: the input's ids in file order), so the output follows the input's order as it is now. Answers
    whose id is no longer in the input are moved to `dropped.jsonl` beside it and not written to the output;
    returns how many. `on_dropped(cost)` is told what they cost (`cost_usd` + `unconfirmed_usd`) before the
    journal is replaced, so the job's budget can keep counting it. Done on resume, only when the input
    changed since the journal was written (`input_identity`), a chunk at a time."""
    path = directory / "journal.jsonl"
    if not path.exists():
        return 0
    tmp = path.with_name("journal.remap.tmp")
    dropped = 0
    cost = [0.0]
    try:
        with open(tmp, "wb") as out, open(directory / DROPPED, "ab") as gone:
            chunk: list[dict[str, Any]] = []

            def flush() -> int:
                if not chunk:
                    return 0
                places = _places([r.get("id") for r in chunk], ids)
                kept, lost = [], []
                for rec, place in zip(chunk, places, strict=True):
                    if place is None:
                        lost.append(_dumps(rec))
                        cost[0] += sum(v for v in (rec.get("cost_usd"), rec.get("unconfirmed_usd"))
                                       if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                                       and v > 0)
                    else:
                        rec.pop("_i", None)
                        kept.append(_dumps({"_i": place, **rec}))  # `_i` first: `ordered_lines` reads it there
                out.write(b"".join(kept))
                gone.write(b"".join(lost))
                chunk.clear()
                return len(lost)

            for rec in read_journal(path):
                chunk.append(rec)
                if len(chunk) >= 10_000:
                    dropped += flush()
            dropped += flush()
            for f in (out, gone):
                f.flush()
                os.fsync(f.fileno())
        if on_dropped is not None and dropped:
            on_dropped(cost[0])
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot renumber the journal {path}: {exc.strerror or exc}") from None
        raise
    _fsync_dir(directory)
    return dropped


def _places(journal_ids: list[Any], ids: pa.Array) -> list[int | None]:
    """Where each journaled id is in `ids` now (None: gone). An id of another type than the input's now (its ids
    went from strings to integers, say) is in it nowhere."""
    try:
        return pc.index_in(pa.array(journal_ids, type=ids.type), value_set=ids).to_pylist()  # type: ignore[no-any-return]
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return [p for v in journal_ids for p in _places_one(v, ids)]


def _places_one(value: Any, ids: pa.Array) -> list[int | None]:
    try:
        return pc.index_in(pa.array([value], type=ids.type), value_set=ids).to_pylist()  # type: ignore[no-any-return]
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return [None]


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


def _json_text(value: Any) -> str:
    return json.dumps(_finite(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)


def _table(records: list[dict[str, Any]], schema: pa.Schema, id_name: str) -> dict[str, Any]:
    """The Python path of `_table_from_lines`: records to the slice's columns, by output name."""
    results = result_names(schema)
    columns: dict[str, list[Any]] = {id_name: [], **{n: [] for n in results}}
    positions: list[Any] = []
    for rec in records:
        positions.append(rec.get("_i"))
        columns[id_name].append(rec.get("id"))
        for name in results:
            columns[name].append(rec.get(name))
    arrays: dict[str, Any] = {"_i": pa.array(positions, type=pa.int64())}
    for name, values in columns.items():
        arrays[name] = pa.array(values, type=schema.field(name).type)
    return arrays


def _kept_array(values: list[Any], t: pa.DataType) -> pa.Array:
    """A JSONL or CSV input's kept values (as given) as a column of the type the source gave it."""
    try:
        return pa.array(values, type=t)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError, UnicodeEncodeError):
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise
        # A JSONL column of mixed values (strings and an object, say) is typed string by the source: its
        # strings stay as they are, anything else is kept as JSON text.
        return pa.array([None if v is None else _utf8(v if isinstance(v, str) else _json_text(v)) for v in values],
                        type=t)


def _utf8(text: str) -> str:
    """`text`, with any lone surrogate (valid in JSON as an escape, common in truncated text, but not UTF-8, so
    not storable in Parquet) as U+FFFD."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _journal_schema(schema: pa.Schema, id_name: str) -> pa.Schema:
    fields = [pa.field("_i", pa.int64()), pa.field("id", schema.field(id_name).type)]
    fields += [schema.field(name) for name in result_names(schema)]
    return pa.schema(fields)


def _table_from_lines(lines: list[bytes], schema: pa.Schema, id_name: str) -> dict[str, Any]:
    """A slice of journal lines as columns by output name (plus `_i`, the rows' positions), parsed by Arrow's
    JSON reader (C++, typed by the output schema); a slice Arrow cannot read goes through the slower Python
    path instead. A `keep` field (kept values, in a journal written before they were read back from the input)
    is ignored."""
    buf = b"".join(lines)
    try:
        parsed = pa_json.read_json(
            io.BytesIO(buf),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=len(buf) + 1),
            parse_options=pa_json.ParseOptions(
                explicit_schema=_journal_schema(schema, id_name), unexpected_field_behavior="ignore"
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return _table([json.loads(x) for x in lines], schema, id_name)
    arrays: dict[str, Any] = {"_i": parsed.column("_i"), id_name: parsed.column("id")}
    arrays.update((name, parsed.column(name)) for name in result_names(schema))
    return arrays


class InputColumns:
    """A Parquet input's kept columns, taken by row position when the output is written.

    Why not through the journal: a kept value would have to survive JSON (dates, durations, decimals, bytes,
    maps, nanosecond timestamps, dictionaries...) and be re-typed at the end, and every row would pay for it
    while the run lasts. Read back from the input they are the input's own Arrow values, whatever the type,
    and cost one sequential pass over those columns. Rows are asked for in input order (the journal is sorted
    by position), so one input batch at a time is held. With an id column, the ids at those positions are
    checked against the journal's; if the input was edited since (rows moved), the rows are found by id.
    """

    def __init__(self, path: Path | list[str], columns: list[str], id_column: str | None,
                 max_bytes: int = 4 << 20, types: dict[str, pa.DataType] | None = None) -> None:
        # several files (a directory or glob input): positions run on from one file to the next
        self.paths = [str(path)] if isinstance(path, Path) else list(path)
        self.columns = columns
        self.id_column = id_column
        self.max_bytes = max_bytes
        self._read = list(dict.fromkeys([*columns, *([id_column] if id_column else [])]))
        first = self._file(self.paths[0])
        arrow = first.schema_arrow
        # `types`: the kept columns' types over all the files (`sources.Scan.merge`)
        self._schema = pa.schema([arrow.field(c).with_type((types or {}).get(c, arrow.field(c).type))
                                  for c in self._read])
        self._all_ids: pa.Array | None = None
        wanted = set(self._read)
        # (file, row group, uncompressed bytes of the kept columns, rows) for every row group of every file
        self._groups: list[tuple[int, int, int, int]] = []
        self._stream = False
        for f, path_ in enumerate(self.paths):
            meta = (first if f == 0 else self._file(path_)).metadata
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                cols = [rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema.split(".")[0] in wanted]
                size = sum(c.total_uncompressed_size for c in cols) or rg.total_byte_size
                # Stream column chunks (not read whole) only when one is bigger than the budget, as the reader does.
                self._stream = self._stream or any(c.total_uncompressed_size > max_bytes for c in cols)
                self._groups.append((f, g, size, rg.num_rows))
        self._per_row_seen = 0.0
        self.reads = 0  # Arrow reads of the kept columns
        self.max_read_bytes = 0  # the most bytes one read held
        self._restart()

    @staticmethod
    def _file(path: str, **kw: Any) -> pq.ParquetFile:
        from .storage import is_remote, open_input

        return pq.ParquetFile(open_input(path) if is_remote(path) else path, pre_buffer=False, **kw)

    def _all_batches(self, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
        for path in self.paths:
            yield from self._file(path).iter_batches(batch_size=batch_size, columns=columns)

    @property
    def bytes_per_row(self) -> float:
        """The most bytes a row's kept values take, as far as is known (footer sizes, then reads)."""
        known = max((s / n for _, _, s, n in self._groups if n), default=1.0)
        return max(known, self._per_row_seen, 1.0)

    def _reads(self) -> Iterator[pa.RecordBatch]:
        """The kept columns in reads of about a quarter of the byte budget, sized from each row group's
        uncompressed bytes per row (or the most a read has held so far, if more), as the input reader does."""
        opened: dict[int, pq.ParquetFile] = {}
        for f, g, size, rows in self._groups:
            if rows == 0:
                continue
            if f not in opened:
                opened.clear()  # one file open at a time
                opened[f] = self._file(self.paths[f], **({"buffer_size": 1 << 20} if self._stream else {}))
            per_row = max(size / rows, self._per_row_seen, 1.0)
            step = max(1, min(16_384, int(self.max_bytes / 4 / per_row)))
            for batch in opened[f].iter_batches(batch_size=step, row_groups=[g], columns=self._read):
                nbytes = batch.nbytes
                self.reads += 1
                self.max_read_bytes = max(self.max_read_bytes, nbytes)
                self._per_row_seen = max(self._per_row_seen, nbytes / max(batch.num_rows, 1))
                yield batch
                del batch

    def _restart(self) -> None:
        self._batches = self._reads()
        self._batch: pa.RecordBatch | None = None
        self._start = self._end = 0
        self._exhausted = False

    def _advance(self) -> None:
        self._batch = None  # released before the next read
        batch = next(self._batches, None)
        if batch is None:
            self._exhausted = True
            return
        # (cast to the schema's types: a file whose own type differs, int64 where another has double)
        self._batch = pa.record_batch([batch.column(c) for c in self._read], schema=self._schema)
        self._start, self._end = self._end, self._end + batch.num_rows

    def _take_sorted(self, positions: list[int | None]) -> pa.Table:
        """Rows at ascending positions (None, sorted last, or past the input's end: a row of nulls)."""
        known: list[int] = [p for p in positions if p is not None]  # the Nones are sorted last
        if known and known[0] < self._start:
            self._restart()
        pieces: list[pa.RecordBatch] = []
        i = 0
        while i < len(known):
            p = known[i]
            while p >= self._end and not self._exhausted:
                self._advance()
            if p >= self._end or self._batch is None:
                break
            j = bisect.bisect_left(known, self._end, i)
            start = self._start
            pieces.append(self._batch.take(pa.array([q - start for q in known[i:j]], type=pa.int64())))
            i = j
        if len(positions) > i:
            n = len(positions) - i
            pieces.append(pa.record_batch([pa.nulls(n, f.type) for f in self._schema], schema=self._schema))
        return pa.Table.from_batches(pieces, schema=self._schema)

    def take(self, positions: Any, ids: Any) -> pa.Table:
        """The kept columns of the rows at `positions` (the journal's `_i`), whose ids are `ids`."""
        table = self._take_sorted(positions.to_pylist())
        if self.id_column is not None:
            try:
                same = pc.equal(table.column(self.id_column), ids)
                moved = not pc.all(pc.fill_null(same, False)).as_py()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                moved = False  # ids of a type Arrow cannot compare: trust the positions
            if moved:
                table = self._take_by_id(ids)
        return table.select(self.columns)

    def row_bytes(self, position: int) -> float:
        """What the kept values of the row at `position` are expected to take (`bytes_per_row`)."""
        return self.bytes_per_row

    def values(self, positions: Any, ids: Any) -> dict[str, list[Any]]:
        """`take` as Python values, by column, mapped as JSONL output writes them."""
        table = self.take(positions, ids)
        return {c: json_values(table.column(c)) for c in self.columns}

    def _take_by_id(self, ids: Any) -> pa.Table:
        assert self.id_column is not None
        if self._all_ids is None:
            chunks = [b.column(0) for b in self._all_batches([self.id_column], 65_536)]
            self._all_ids = pa.chunked_array(chunks, type=self._schema.field(self.id_column).type).combine_chunks()
        found = pc.index_in(ids, value_set=self._all_ids)
        order = pc.sort_indices(found)  # nulls (ids no longer in the input) last
        table = self._take_sorted(pc.take(found, order).to_pylist())
        return table.take(pc.sort_indices(order))


class KeptValues:
    """A JSONL or CSV input's kept columns, read back by row position when the output is written, as
    `InputColumns` reads a Parquet input's: while the calls last, no row, answer or journal line holds them (500 KB
    documents kept beside their summaries were C calls' worth of them, and the answers waiting to be counted).

    `rows()` starts a pass over the input (`Source.kept_rows`): (position, id, the kept values, bytes read) per
    row, a row at a time. The sink asks for each row's size (`row_bytes`) as it builds a slice of the output, in
    input order, so slices close by what their rows hold (one long document among short ones makes one short
    slice, not short slices everywhere); those rows are held until `take` or `values` hands them over. One pass
    serves the whole output (it starts again when asked for an earlier row). With ids (`all_ids`: every row's
    id, in order), the ids found at the journal's positions are checked against the journal's; if the input was
    edited since (rows moved), the rows are found by id. Values come as given (`values`, for JSONL output) or
    typed as the source typed the column (`take`, for Parquet output).
    """

    def __init__(
        self,
        rows: Callable[[], Iterator[tuple[int, Any, list[Any] | None, int]]],
        columns: list[str],
        types: Mapping[str, pa.DataType],
        *,
        all_ids: Callable[[], pa.Array] | None = None,
    ) -> None:
        self._rows = rows
        self.columns = columns
        self.types = {c: types[c] for c in columns}
        self._all_ids_of = all_ids
        self._all_ids: pa.Array | None = None
        self._ahead: dict[int, tuple[Any, list[Any] | None, int]] = {}  # rows sized, not yet taken
        self.reads = 0  # rows read back
        self.max_read_bytes = 0  # the most bytes one read (a row) held
        self._restart()

    def _restart(self) -> None:
        self._pass = self._rows()
        self._next = 0  # the position after the last row read
        self._exhausted = False

    def _read_to(self, position: int) -> tuple[Any, list[Any] | None, int]:
        """(id, values, bytes) of the row at `position`; (None, None, 0) past the input's end."""
        if position < self._next:
            self._restart()
        while not self._exhausted and self._next <= position:
            row = next(self._pass, None)
            if row is None:
                self._exhausted = True
                break
            index, row_id, values, size = row
            self._next = index + 1
            self.reads += 1
            self.max_read_bytes = max(self.max_read_bytes, size)
            if index == position:
                return row_id, values, size
        return None, None, 0

    def _row(self, position: int | None) -> tuple[Any, list[Any] | None, int]:
        if position is None:
            return None, None, 0
        got = self._ahead.get(position)
        if got is None:
            got = self._ahead[position] = self._read_to(position)
        return got

    def row_bytes(self, position: int) -> float:
        """The bytes read for the row at `position` (its line or record: what its kept values take, at most),
        read now and held for `take`."""
        return float(self._row(position)[2])

    def _lookup(self, positions: Any, ids: Any) -> list[list[Any]]:
        rows = [self._row(p) for p in positions.to_pylist()]
        if self._all_ids_of is not None and [r[0] for r in rows] != ids.to_pylist():
            if self._all_ids is None:
                self._all_ids = self._all_ids_of()
            at = pc.index_in(ids, value_set=self._all_ids)
            order = pc.sort_indices(at)  # nulls (ids no longer in the input) last: in input order, one pass
            found = [self._row(p) for p in pc.take(at, order).to_pylist()]
            rows = [found[i] for i in pc.sort_indices(order).to_pylist()]
        self._ahead.clear()  # handed over: the slice holds them now
        nulls = [None] * len(self.columns)
        return [list(column) for column in zip(*((r[1] or nulls) for r in rows), strict=True)] if rows \
            else [[] for _ in self.columns]

    def take(self, positions: Any, ids: Any) -> pa.Table:
        """The kept columns of the rows at `positions` (the journal's `_i`), whose ids are `ids`, typed."""
        values = self._lookup(positions, ids)
        return pa.table({c: _kept_array(v, self.types[c]) for c, v in zip(self.columns, values, strict=True)})

    def values(self, positions: Any, ids: Any) -> dict[str, list[Any]]:
        """The same as Python values, as the input gave them (JSONL output writes them so)."""
        return dict(zip(self.columns, self._lookup(positions, ids), strict=True))


def _iso_duration(value: int, per_second: int) -> str:
    sign = "-" if value < 0 else ""
    seconds, fraction = divmod(abs(value), per_second)
    digits = len(str(per_second)) - 1
    frac = f".{fraction:0{digits}d}".rstrip("0") if fraction else ""
    return f"{sign}PT{seconds}{frac}S"


_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


def json_values(arr: pa.Array | pa.ChunkedArray) -> list[Any]:
    """An Arrow column as JSON-ready Python values, by the mapping the README documents: NaN and ±Infinity
    -> null, bytes -> base64, dates, times and timestamps -> ISO 8601 strings, durations -> ISO 8601 seconds
    (`PT1.5S`), decimals -> strings, maps -> lists of [key, value] pairs, dictionaries -> their values.
    Done a column at a time in Arrow where it can be (no per-value Python for numbers, strings, temporals)."""
    if isinstance(arr, pa.ChunkedArray):
        return [v for chunk in arr.chunks for v in json_values(chunk)]
    t = arr.type
    if isinstance(t, pa.ExtensionType):
        return json_values(arr.storage)
    if pa.types.is_dictionary(t):
        return json_values(arr.dictionary_decode())
    if pa.types.is_null(t):
        return [None] * len(arr)
    if pa.types.is_floating(t):
        return pc.if_else(pc.is_finite(arr), arr, pa.scalar(None, arr.type)).to_pylist()  # type: ignore[no-any-return]
    if (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_binary_view(t)):
        return [None if v is None else base64.b64encode(v).decode("ascii") for v in arr.to_pylist()]
    if pa.types.is_decimal(t) or pa.types.is_date(t) or pa.types.is_time(t):
        return arr.cast(pa.string()).to_pylist()  # type: ignore[no-any-return]
    if pa.types.is_timestamp(t):
        text = pc.replace_substring(arr.cast(pa.string()), " ", "T", max_replacements=1)
        # Arrow writes the offset as +0100; RFC 3339 (and most parsers) want +01:00
        return pc.replace_substring_regex(text, r"([+-]\d\d)(\d\d)$", r"\1:\2").to_pylist()  # type: ignore[no-any-return]
    if pa.types.is_duration(t):
        per = _PER_SECOND[t.unit]
        return [None if v is None else _iso_duration(v, per) for v in arr.cast(pa.int64()).to_pylist()]
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        offsets = arr.offsets.to_pylist()
        base = offsets[0]
        child = arr.values.slice(base, offsets[-1] - base)
        if pa.types.is_map(t):
            keys, items = (json_values(f) for f in child.flatten())
            values: list[Any] = [list(pair) for pair in zip(keys, items, strict=True)]
        else:
            values = json_values(child)
        valid = arr.is_valid().to_pylist()
        return [values[offsets[i] - base : offsets[i + 1] - base] if valid[i] else None for i in range(len(arr))]
    if pa.types.is_fixed_size_list(t):
        size = t.list_size
        values = json_values(arr.values.slice(arr.offset * size, len(arr) * size))
        valid = arr.is_valid().to_pylist()
        return [values[i * size : (i + 1) * size] if valid[i] else None for i in range(len(arr))]
    if pa.types.is_struct(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        fields = [json_values(f) for f in arr.flatten()]
        valid = arr.is_valid().to_pylist()
        return [dict(zip(names, row, strict=True)) if ok else None for ok, *row in zip(valid, *fields, strict=True)]
    return arr.to_pylist()  # type: ignore[no-any-return]


def _finite(value: Any) -> Any:
    """`value` with NaN and ±Infinity, at any depth, as None (JSON has no spelling for them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _dumps_output(record: dict[str, Any]) -> bytes:
    """A line of JSONL output: always valid JSON. NaN/Infinity are rare, so they cost a second pass only when
    there is one."""
    try:
        text = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:
        text = _json_text(record)
    try:
        return (text + "\n").encode()
    except UnicodeEncodeError:  # a lone surrogate (valid JSON when escaped, common in truncated text)
        return (json.dumps(_finite(record), separators=(",", ":"), allow_nan=False, default=str) + "\n").encode()


def _chat_completion_body(rec: dict[str, Any]) -> dict[str, Any]:
    """A chat row as the chat.completion object an OpenAI batch output line carries."""

    def message(text: Any, first: bool) -> dict[str, Any]:
        m: dict[str, Any] = {"role": "assistant", "content": text, "refusal": rec.get("refusal") if first else None}
        calls = rec.get("tool_calls") if first else None
        if calls:
            m["tool_calls"] = json.loads(calls)
        if first and rec.get("reasoning"):
            m["reasoning"] = rec["reasoning"]
        return m

    choices = rec.get("choices") or [{"index": 0, "text": rec.get("text"), "finish_reason": rec.get("finish_reason")}]
    usage: dict[str, Any] = {
        "prompt_tokens": rec.get("prompt_tokens"),
        "completion_tokens": rec.get("completion_tokens"),
        "total_tokens": rec.get("total_tokens"),
    }
    if rec.get("reasoning_tokens") is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": rec["reasoning_tokens"]}
    return {
        "id": rec.get("completion_id"),
        "object": "chat.completion",
        "model": rec.get("model"),
        "choices": [{"index": c.get("index", i), "message": message(c.get("text"), i == 0),
                     "finish_reason": c.get("finish_reason")} for i, c in enumerate(choices)],
        "usage": usage,
    }


def _openai_batch_line(rec: dict[str, Any], n: int, chat: bool = False) -> dict[str, Any]:
    """One line of an OpenAI Batch API output file."""
    ok = rec.get("status") == "ok"
    body = None
    if ok and chat:
        body = _chat_completion_body(rec)
    elif ok:
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


def written_by_batcher(output: Path) -> bool:
    """Whether `output` is a file batcher wrote: its state folder is beside it, or (Parquet) its footer carries
    batcher's key (for an output whose state folder was cleaned away)."""
    if (state_dir_for(output) / "run.json").exists():
        return True
    try:
        metadata = pq.read_schema(output).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    return OUTPUT_MARKER in metadata


def _position(line: bytes) -> int:
    """A journal line's row position: it starts with `{"_i":N,` (see `ordered_lines`)."""
    return int(line[6 : line.index(b",", 6)])


def _slices(lines: Iterable[bytes], max_rows: int, max_bytes: float,
            extra: Callable[[bytes], float]) -> Iterator[list[bytes]]:
    """Journal lines in slices of at most `max_rows` lines and about `max_bytes`: a line counts its own bytes
    plus `extra(line)`, what its row's kept values read back from the input take (or are expected to)."""
    chunk: list[bytes] = []
    held = 0.0
    for line in lines:
        chunk.append(line)
        held += len(line) + extra(line)
        if len(chunk) >= max_rows or held >= max_bytes:
            yield chunk
            chunk, held = [], 0.0
    if chunk:
        yield chunk


@dataclass
class WriteStats:
    """What the final write held: its counters (the tests judge the byte bound by them)."""

    slices: int = 0
    max_slice_bytes: int = 0  # the most Arrow bytes one slice held (Parquet output)
    row_groups: int = 0
    max_group_bytes: int = 0  # the most Arrow bytes one written row group held


def finalize(
    journal: Path,
    output: Path,
    fmt: str,
    schema: pa.Schema,
    id_name: str,
    keep: list[str],
    row_group_size: int,
    *,
    keep_from: InputColumns | KeptValues | None = None,
    chat: bool = False,
    max_bytes: int = 4 << 20,
    stats: WriteStats | None = None,
) -> int:
    """Write the journal's records to `output` atomically; returns the number of rows written.

    `chat`: the job spoke chat, so an OpenAI Batch output's bodies are chat.completion objects.

    `keep`: the kept input columns (not the input's id column), by input name, read back from the input by
    row position (`keep_from`: `InputColumns` for Parquet, `KeptValues` for JSONL and CSV); an OpenAI Batch
    output has none.

    `max_bytes` (the job's `input.batch_bytes`) bounds what is held at a time: slices of about a quarter of it
    (journal lines and the kept values they will take), and a row group closes at `row_group_size` rows or once
    it holds `max_bytes`, whichever comes first. `stats`, if given, is filled with what was held.
    """
    stats = stats if stats is not None else WriteStats()
    share = max_bytes / 4

    def extra(line: bytes) -> float:
        return keep_from.row_bytes(_position(line)) if keep_from is not None else 0.0

    if keep and keep_from is None and fmt != "openai_batch":
        raise ValueError("kept columns are read back from the input: finalize needs keep_from")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    results = result_names(schema)
    rows = 0
    try:
        if fmt == "parquet":

            def table_of(lines: list[bytes]) -> pa.Table:
                columns = _table_from_lines(lines, schema, id_name)
                if keep_from is not None:
                    joined = keep_from.take(columns["_i"], columns[id_name])
                    columns.update((kept_name(c, id_name), joined.column(c)) for c in keep)
                return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)

            marked = schema.with_metadata({**(schema.metadata or {}), OUTPUT_MARKER: b"1"})
            with pq.ParquetWriter(tmp, marked, compression="zstd", use_dictionary=_dictionary_columns(schema)) as writer:
                # Lines are parsed a slice at a time into Arrow tables, and a row group is written once the
                # slices add up to one: the peak is one row group in Arrow, not also its JSON text.
                tables: list[pa.Table] = []
                pending = pending_bytes = 0

                def write() -> None:
                    nonlocal rows, tables, pending, pending_bytes
                    table = pa.concat_tables(tables)
                    tables = []  # the slices are released as soon as their row group is written
                    writer.write_table(table, row_group_size=row_group_size)
                    stats.row_groups += 1
                    stats.max_group_bytes = max(stats.max_group_bytes, pending_bytes)
                    rows += pending
                    pending = pending_bytes = 0

                for lines in _slices(ordered_lines(journal), min(row_group_size, 2_000), share, extra):
                    table = table_of(lines)
                    del lines
                    stats.slices += 1
                    stats.max_slice_bytes = max(stats.max_slice_bytes, table.nbytes)
                    if tables and (pending + table.num_rows > row_group_size or pending_bytes + table.nbytes > max_bytes):
                        write()
                    tables.append(table)
                    pending += table.num_rows
                    pending_bytes += table.nbytes
                    del table
                    if pending >= row_group_size or pending_bytes >= max_bytes:
                        write()
                if tables:
                    write()
                elif rows == 0:
                    writer.write_table(schema.empty_table())
        else:
            id_type = schema.field(id_name).type
            with open(tmp, "wb") as f:
                for lines in _slices(ordered_lines(journal), min(row_group_size, 2_000), share, extra):
                    chunk = [rec for rec in map(_loads, lines) if rec is not None]
                    del lines
                    stats.slices += 1
                    out_lines: list[bytes] = []
                    if fmt == "openai_batch":
                        for rec in chunk:
                            out_lines.append(_dumps(_openai_batch_line(rec, rows, chat)))
                            rows += 1
                        f.write(b"".join(out_lines))
                        continue
                    kept: list[tuple[str, list[Any]]] = []
                    if keep_from is not None:
                        joined = keep_from.values(
                            pa.array([r["_i"] for r in chunk], type=pa.int64()),
                            pa.array([r.get("id") for r in chunk], type=id_type),
                        )
                        kept = [(kept_name(c, id_name), joined[c]) for c in keep]
                        del joined
                    for j, rec in enumerate(chunk):
                        out = {id_name: rec.get("id")}
                        out.update((name, values[j]) for name, values in kept)
                        out.update((name, rec.get(name)) for name in results)
                        out_lines.append(_dumps_output(out))
                    rows += len(chunk)
                    f.write(b"".join(out_lines))
                    del chunk, kept, out_lines  # released before the next slice is read
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, output)
        _fsync_dir(output.parent)
    except BaseException as exc:
        # Disk full, a signal or any other failure during the write: the old output (or none) stays, and no
        # temporary file is left behind (a rerun that fails the same way would add another).
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write the output {output}: {exc.strerror or exc}") from None
        raise
    return rows
