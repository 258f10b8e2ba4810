"""Shards: the input cut into pieces that run one at a time on a worker, each with its own journal.

The cut is made on the driver from metadata only: Parquet files by row groups (their footers give the row
counts), JSONL files by byte ranges that readers align to lines (`storage.iter_lines`). A CSV file is cut where
records start, which the driver's pre-flight pass finds as it streams the file once (`CsvFile.check`: a quoted
value may hold newlines). A JSONL or CSV shard's first row position is known only once the shards before it are
counted, which the pre-flight scans do in parallel (`Source.scan`, one per shard); `place` then gives every
shard its global position, so ids, `--limit`, the output's order and error rows' line numbers are those of a
single-process run.

A shard's journal is `STATE/shards/NNNNN/journal.jsonl`. At the end of a run the driver merges them into the
job's `journal.jsonl` (the single-process journal, so either kind of run resumes the other), and
`prepare_journals` cuts that back into the shards of the next run's plan.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from . import storage
from .sources import InputPart, Scan, Source

__all__ = ["Shard", "fold_shards", "merge_journals", "place", "plan_shards", "prepare_journals", "shard_dir"]

SHARDS = "shards"
PLAN = "plan.json"


@dataclass(frozen=True, slots=True)
class Shard:
    number: int
    parts: tuple[InputPart, ...]
    index_base: int = 0  # the global position of its first row
    rows: int = 0  # known for Parquet at planning time, for JSONL after the scan


def plan_shards(source: Source, *, min_shards: int = 1, target_rows: int = 200_000,
                target_bytes: int = 128 << 20) -> list[Shard]:
    """Cut `source` (the whole input) into at least `min_shards` shards where the input allows it."""
    files = source.files
    shards: list[Shard] = []
    if source.format == "parquet":
        metas = [source._parquet_file(InputPart(f)).metadata for f in files]
        total = sum(m.num_rows for m in metas)
        target = max(1, min(target_rows, math.ceil(total / max(1, min_shards))))
        base = 0
        for f, meta in zip(files, metas, strict=True):
            groups: list[int] = []
            rows = 0
            for g in range(meta.num_row_groups):
                groups.append(g)
                rows += meta.row_group(g).num_rows
                if rows >= target:
                    shards.append(Shard(len(shards), (InputPart(f, tuple(groups)),), base, rows))
                    base += rows
                    groups, rows = [], 0
            if groups or meta.num_row_groups == 0:
                shards.append(Shard(len(shards), (InputPart(f, tuple(groups)),), base, rows))
                base += rows
        return shards
    sizes = [storage.size_of(f) for f in files]
    target = max(1, min(target_bytes, math.ceil(sum(sizes) / max(1, min_shards))))
    if source.format in ("csv", "tsv"):
        return _csv_shards(source, target)
    for f, size in zip(files, sizes, strict=True):
        start = 0
        while True:
            end = start + target
            last = end >= size
            shards.append(Shard(len(shards), (InputPart(f, start=start, end=None if last else end),)))
            if last:
                break
            start = end
    return shards


def _csv_shards(source: Source, target: int) -> list[Shard]:
    """A CSV file cut where records start (a quoted value may hold newlines: the next newline past an offset
    need not start one), found by the pre-flight pass on the driver, which streams the file once with the csv
    module and checks it as it goes (`CsvFile.check`). Each shard reads the header's bytes, then its own."""
    cuts = source.check_csv_text(every=target)
    csv_file = source._csv()
    path = source.files[0]
    starts = [(0, 0), *cuts]
    return [Shard(n, (InputPart(path, start=start, end=starts[n + 1][0] if n + 1 < len(starts) else None,
                                line_base=lines, header=csv_file.header_bytes, longest=csv_file.longest or 0),))
            for n, (start, lines) in enumerate(starts)]


def place(shards: Sequence[Shard], scans: Sequence[Scan]) -> list[Shard]:
    """Shards with their global positions and (JSONL) the file line their first line has."""
    placed: list[Shard] = []
    base = 0
    lines_before: dict[str, int] = {}
    for shard, scan in zip(shards, scans, strict=True):
        parts = []
        for part, lines in zip(shard.parts, scan.lines, strict=True):
            if part.header:  # a CSV part: its line base is the pre-flight pass's (records may span lines)
                parts.append(part)
                continue
            parts.append(replace(part, line_base=lines_before.get(part.path, 0)))
            lines_before[part.path] = lines_before.get(part.path, 0) + lines
        placed.append(replace(shard, parts=tuple(parts), index_base=base, rows=scan.rows))
        base += scan.rows
    return placed


def shard_dir(state_dir: Path, number: int) -> Path:
    return state_dir / SHARDS / f"{number:05d}"


def _plan_key(shards: Sequence[Shard]) -> str:
    text = json.dumps([[s.index_base, s.rows] for s in shards])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _journal_lines(path: Path) -> Iterator[bytes]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            if raw.endswith(b"\n") and raw.startswith(b'{"_i":'):
                yield raw


def _position(raw: bytes) -> int | None:
    try:
        return int(raw[6:raw.find(b",", 6)])
    except ValueError:
        return None


def _fsync_write(path: Path, chunks: Iterator[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())


def _all_journals(state_dir: Path) -> list[Path]:
    found = [state_dir / "journal.jsonl"]
    root = state_dir / SHARDS
    if root.is_dir():
        found += sorted(p / "journal.jsonl" for p in root.iterdir() if p.is_dir())
    return [p for p in found if p.exists()]


def prepare_journals(state_dir: Path, shards: Sequence[Shard]) -> None:
    """Make each shard's journal hold the answers already journaled for its rows, whatever run wrote them: the
    shards of an earlier run with the same plan stay as they are; anything else (the merged journal of a
    finished run, a single-process run's, shards of another plan) is cut anew by row position. Duplicates are
    harmless: compacting a journal keeps one answer per id."""
    root = state_dir / SHARDS
    key = _plan_key(shards)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(state_dir / (SHARDS + ".new"))
    old = state_dir / (SHARDS + ".old")
    if old.exists() and not root.exists():
        old.rename(root)  # a crash between the two renames below
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(old)
    same_plan = False
    with contextlib.suppress(OSError, ValueError):
        same_plan = json.loads((root / PLAN).read_text())["plan"] == key
    merged = state_dir / "journal.jsonl"
    if same_plan and not merged.exists():
        return
    journals = _all_journals(state_dir)
    new = state_dir / (SHARDS + ".new")
    new.mkdir(parents=True)
    starts = [s.index_base for s in shards]
    buffers: dict[int, list[bytes]] = {}
    files: dict[int, object] = {}
    try:
        for journal in journals:
            for raw in _journal_lines(journal):
                pos = _position(raw)
                if pos is None:
                    continue
                k = _bisect(starts, pos)
                buffers.setdefault(k, []).append(raw)
                if len(buffers[k]) >= 4096:
                    _append(new, shards[k].number, buffers.pop(k), files)
        for k, lines in buffers.items():
            _append(new, shards[k].number, lines, files)
    finally:
        for f in files.values():
            f.flush()  # type: ignore[attr-defined]
            os.fsync(f.fileno())  # type: ignore[attr-defined]
            f.close()  # type: ignore[attr-defined]
    (new / PLAN).write_text(json.dumps({"plan": key}))
    if root.exists():
        root.rename(old)
    new.rename(root)
    with contextlib.suppress(FileNotFoundError):
        merged.unlink()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(old)


def _bisect(starts: list[int], pos: int) -> int:
    import bisect

    return max(0, bisect.bisect_right(starts, pos) - 1)


def _append(root: Path, number: int, lines: list[bytes], files: dict[int, object]) -> None:
    f = files.get(number)
    if f is None:
        path = root / f"{number:05d}" / "journal.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        f = files[number] = open(path, "ab")
    f.write(b"".join(lines))  # type: ignore[attr-defined]


def merge_journals(state_dir: Path) -> None:
    """The shards' journals as the job's one `journal.jsonl` (which `finalize` writes the output from and any
    later run resumes from), and their spend logs added to the job's; the shards are then removed."""
    root = state_dir / SHARDS
    if not root.is_dir():
        return
    journals = _all_journals(state_dir)
    tmp = state_dir / "journal.merge.tmp"
    _fsync_write(tmp, (raw for j in journals for raw in _journal_lines(j)))
    os.replace(tmp, state_dir / "journal.jsonl")
    _keep_spend(state_dir)
    shutil.rmtree(root)


def _keep_spend(state_dir: Path) -> None:
    """The shards' spend logs appended to the job's as they are (calls sent, cost carried), before the shards'
    folders go: the next start folds them against the merged journal. A crash between this and the removal
    counts them twice on that start: too much, never too little."""
    from .budget import SpendLog

    root = state_dir / SHARDS
    out = None
    try:
        for log in sorted(p / SpendLog.NAME for p in root.iterdir() if p.is_dir()):
            if not log.exists():
                continue
            data = log.read_bytes()
            data = data[: data.rfind(b"\n") + 1]  # a line torn by a crash was not a call sent
            if data:
                out = out or open(state_dir / SpendLog.NAME, "ab")
                out.write(data)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()


def fold_shards(state_dir: Path) -> None:
    """For a single-process run after a distributed one that did not finish: its shards' journals join the
    job's journal."""
    if (state_dir / SHARDS).is_dir() or (state_dir / (SHARDS + ".old")).is_dir():
        old = state_dir / (SHARDS + ".old")
        if old.is_dir() and not (state_dir / SHARDS).exists():
            old.rename(state_dir / SHARDS)
        merge_journals(state_dir)


def write_parts(journal: Path, folder: Path, starts: Sequence[int], write: Callable[[Path, Path], int]) -> int:
    """A `parquet_dataset` output: the journal's rows as one Parquet file per part (parts begin at `starts`,
    row positions), written by `write(part_journal, part_file)`, into a new folder that then replaces `folder`
    (readers see the old parts or the new ones, never a mix). Returns the rows written."""
    work = folder.with_name(f".{folder.name}.parts{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    journals = work / "journals"
    parts = work / "parts"
    journals.mkdir(parents=True)
    parts.mkdir()
    try:
        files: dict[int, object] = {}
        bounds = sorted(set(starts)) or [0]
        try:
            for raw in _journal_lines(journal):
                pos = _position(raw)
                if pos is not None:
                    _append(journals, _bisect(bounds, pos), [raw], files)
        finally:
            for f in files.values():
                f.close()  # type: ignore[attr-defined]
        rows = 0
        numbers = sorted(files) or [0]
        for k in numbers:
            rows += write(journals / f"{k:05d}" / "journal.jsonl", parts / f"part-{k:05d}.parquet")
        old = folder.with_name(f".{folder.name}.old{os.getpid()}")
        if folder.exists():
            folder.rename(old)
        parts.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
