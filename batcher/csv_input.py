"""CSV and TSV inputs: pyarrow's streaming CSV reader, a block at a time, every column read as text.

    for index, part in CsvFile(path, "\\t").segments(["id", "text"]):
        ...  # a RecordBatch of good rows starting at row `index`, or the error message of row `index`

Why text: a CSV has no types, and guessing them from the first block (Arrow's default) fails the whole read
when a later block disagrees (`007` then `abc`). So prompt, template, inputs, id and kept columns are all read
as strings: `007` stays `007`, an id is a string id, an empty field is an empty string (an empty prompt is then
an error row, an empty id a refused input).

A malformed row (more or fewer fields than the header) does not stop the read: Arrow's `invalid_row_handler`
hands it over with its record number (the header is record 1; blank lines are not records), and it becomes an
error row at its own position, naming its line. Lines and records differ when a quoted value holds newlines,
so the line is found by a second pass with Python's csv module over the file, made only when a malformed row
exists. Memory is bounded by the block size (a value longer than a block cannot be read: `BLOCK_SIZE`), which
`check()` sizes from the longest record it finds (`block_size`).

What Arrow reads wrongly or not at all is found by `CsvFile.check()`, the pre-flight pass, before any request:
bytes that are not UTF-8 (Arrow fails only when it converts them, mid-run, and only in the columns it reads)
and a quote never closed (Arrow reads the rest of the file into that value, silently). Both raise `CsvError`
naming the line. A UTF-8 byte order mark (Excel's "CSV UTF-8") is not part of the first column's name.

Shards (`--ray`): a quoted value may hold newlines, so the next newline after a byte offset need not start a
record. The same pass therefore records, every `every` bytes, where the next record starts and how many lines
come before it (`cuts`), with the csv module that finds the records; a shard is then the bytes between two cuts,
read after the header's bytes (`CsvFile(..., start=, end=, header=)`), and names its rows and lines by the
file's positions (`index_base`, `line_base`). The file is read once, a record at a time, never held whole.
"""

from __future__ import annotations

import codecs
import csv
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv

__all__ = ["BLOCK_SIZE", "MIN_BLOCK_SIZE", "CsvError", "CsvFile", "delimiter_for"]

# The most bytes Arrow reads and parses at a time; also the longest row it can read. max_prompt_chars defaults
# to a million characters (up to 4 MB of UTF-8), which must fit.
BLOCK_SIZE = 8 << 20
# Arrow's streaming CSV reader reads up to 32 blocks ahead in a background thread (not configurable from
# Python), so the block is what bounds memory: once `check()` has measured the longest record, blocks are that
# record plus `_BLOCK_SLACK` (at least `MIN_BLOCK_SIZE`), not BLOCK_SIZE: ~18 MB ahead for 500 KB rows, not
# ~270 MB. (Smaller blocks cost nothing measurable: a million short rows parse as fast in 256 KiB blocks.)
# At least 384 KiB, not 256: a block, and the parser's buffers sized from it, must be above the mmap threshold
# batcher pins (264 KiB, `memory.py`), so that each is mmapped and unmapped when freed. Below it they came from
# malloc's heap, between the small buffers that outlive them (the id column the input check keeps): freed, the
# heap could not give them back, and it grew with the file (a 505 MB CSV of 50 KB rows: RSS 87 -> 550 MB while
# the check read its ids, 310 MB kept through the calls). Measured on 100 MB of 50 KB rows, the heap the check
# leaves: 78 MB at 256 KiB, 17 at 280 KiB (some blocks' values still under it), 5 at 384 KiB, 4 at 512 KiB, whose
# read-ahead is 16 MB, not 12.
MIN_BLOCK_SIZE = 384 << 10
_BLOCK_SLACK = 64 << 10


def delimiter_for(fmt: str) -> str:
    return "\t" if fmt == "tsv" else ","


class CsvError(ValueError):
    """A file that cannot be read as CSV at all: `line N: why`."""


# After the file's lines, the quote check feeds the csv reader this one: outside a quoted value it is a record
# of its own; inside one (a quote never closed) it ends that value.
_EOF = "\x00batcher: end of file\x00"


def _breaks(text: str) -> int:
    """Line breaks in text: \\n, \\r\\n or a lone \\r (as Arrow and the csv module count them)."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


_BOM = codecs.BOM_UTF8


class _Range(io.RawIOBase):
    """The file's first `header` bytes, then its bytes in [start, end): a shard of a CSV read as a file of its
    own (its header first, as Arrow and the csv module expect)."""

    def __init__(self, path: Path, header: int, start: int, end: int | None) -> None:
        self._f = open(path, "rb")
        self._head = self._f.read(header) if start > 0 else b""
        self._f.seek(start)
        self._left = None if end is None else max(0, end - start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        want = len(view) if self._left is None else min(len(view), self._left)
        if want <= 0:
            return 0
        n = self._f.readinto(view[:want]) or 0
        if self._left is not None:
            self._left -= n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class CsvFile:
    """A CSV file, or the shard of one between byte offsets `start` and `end` (record starts found by `check`'s
    `cuts`), read after the file's first `header` bytes; its rows are numbered from `index_base` and its lines
    from `line_base` + 1, as in the whole file."""

    def __init__(self, path: Path, delimiter: str, *, start: int = 0, end: int | None = None, header: int = 0,
                 index_base: int = 0, line_base: int = 0, longest: int | None = None) -> None:
        self.path = path
        self.delimiter = delimiter
        self.start = start
        self.end = end
        self.header_bytes = header  # bytes up to the end of the header record (BOM included), once known
        self.index_base = index_base
        self.line_base = line_base
        self._lines: dict[int, int] | None = None  # record number -> first line, for malformed records
        self.longest: int | None = longest  # bytes of the longest record (header included), once `check()` ran
        self.cuts: list[tuple[int, int]] = []  # (record start, lines before it), from `check(every=...)`
        self.size = 0  # bytes in the file, once `check()` ran

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end is None

    def _binary(self) -> Any:
        return open(self.path, "rb") if self.whole else io.BufferedReader(_Range(self.path, self.header_bytes,
                                                                                 self.start, self.end))

    def _text(self, errors: str = "strict") -> io.TextIOWrapper:
        return io.TextIOWrapper(self._binary(), encoding="utf-8-sig", errors=errors, newline="")

    def _prefix_lines(self) -> int:
        """Line breaks in the header read before a shard's range (0 for a range that starts the file)."""
        if self.start == 0:
            return 0
        with open(self.path, "rb") as f:
            head = f.read(self.header_bytes)
        return head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n")

    @property
    def block_size(self) -> int:
        """Bytes Arrow reads at a time: the longest record and some slack once known, BLOCK_SIZE before."""
        if self.longest is None:
            return BLOCK_SIZE
        return min(BLOCK_SIZE, max(MIN_BLOCK_SIZE, self.longest + _BLOCK_SLACK))

    def header(self) -> list[str]:
        with open(self.path, encoding="utf-8-sig", errors="replace", newline="") as f:
            for fields in csv.reader(f, delimiter=self.delimiter):
                if fields:
                    return fields
        return []

    def check(self, every: int | None = None) -> None:
        """Raises CsvError for a file Arrow would misread or fail on mid-run: bytes that are not UTF-8, or a
        quote never closed (named by the line it opens on). Reads the file once more, with the csv module.
        `every`: also record in `cuts` where a record starts past each further `every` bytes (shards)."""
        with open(self.path, "rb") as raw:
            bom = len(_BOM) if raw.read(len(_BOM)) == _BOM else 0
        breaks = 0  # line breaks read so far
        read = bom  # bytes read so far (UTF-8, as Arrow counts them; the BOM the decoder drops included)
        limit = csv.field_size_limit()
        csv.field_size_limit(sys.maxsize)  # a long value is Arrow's to refuse (BLOCK_SIZE), not this pass's
        cuts: list[tuple[int, int]] = []
        header = 0
        try:
            with open(self.path, encoding="utf-8-sig", newline="") as f:

                def lines() -> Iterator[str]:
                    nonlocal breaks, read
                    for line in f:
                        read += len(line) if line.isascii() else len(line.encode("utf-8", "surrogatepass"))
                        # counted before the reader has the line: when it returns a record, `read` and `breaks`
                        # are where the next record starts
                        breaks += line.endswith(("\n", "\r"))
                        yield line
                    yield _EOF

                # One record at a time (the csv module reads no further than the record it returns), measuring
                # the longest: what sizes Arrow's blocks (`block_size`).
                longest, end = 0, bom
                last: list[str] = []
                for record in csv.reader(lines(), delimiter=self.delimiter):
                    longest, end, last = max(longest, read - end), read, record
                    if not header:
                        header = read if record else 0  # blank lines before the header belong to it
                    elif every and record != [_EOF] and read - (cuts[-1][0] if cuts else 0) >= every:
                        cuts.append((read, breaks))
        except UnicodeDecodeError:
            raise CsvError(self._not_utf8()) from None
        finally:
            csv.field_size_limit(limit)
        self.longest = longest
        self.size = read
        self.header_bytes = header
        self.cuts = [c for c in cuts if c[0] < read]  # a cut at the end would make an empty shard
        if last != [_EOF]:  # the last value swallowed the end of the file: its quote opens where it starts
            value = last[-1].removesuffix(_EOF)
            line = breaks + 1 - _breaks(value)
            raise CsvError(f"line {line}: a quoted value opens here and is never closed, so the rest of the file "
                           "would be read as that one value")

    def _not_utf8(self) -> str:
        """`line N: not UTF-8 ...` for the first bytes that are not UTF-8."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0  # of the chunk in the file
        head = b""  # the file before the chunk, up to the failure (to count its lines)
        with open(self.path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                try:
                    decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    start = offset - (len(exc.object) - len(chunk)) + exc.start  # the decoder held some bytes
                    f.seek(0)
                    head = f.read(start)
                    bad = exc.object[exc.start:exc.end]
                    break
                if not chunk:
                    return "not valid UTF-8"  # the file changed under us
                offset += len(chunk)
        line = head.count(b"\n") + head.count(b"\r") - head.count(b"\r\n") + 1
        return (f"line {line}: not UTF-8 text (byte {bad.hex(' ')}); save the file as UTF-8 (Excel: "
                "\"CSV UTF-8\")")

    def segments(self, columns: list[str]) -> Iterator[tuple[int, pa.RecordBatch | str]]:
        """In file order: (row index, a batch of good rows from there) or (row index, a malformed row's error).
        Raises pa.ArrowInvalid for a file Arrow cannot read at all (not UTF-8, an unclosed quote...)."""
        bad: dict[int, tuple[int, int]] = {}  # record number -> (fields expected, fields found)

        def on_invalid(row: Any) -> str:
            if row.number is None or row.number < 0:
                return "error"  # no position to put it at: fail the read rather than misplace rows
            bad[row.number] = (row.expected_columns, row.actual_columns)
            return "skip"

        reader = pa_csv.open_csv(
            self.path if self.whole else self._binary(),
            read_options=pa_csv.ReadOptions(block_size=self.block_size, use_threads=False),
            parse_options=pa_csv.ParseOptions(delimiter=self.delimiter, newlines_in_values=True,
                                              invalid_row_handler=on_invalid),
            convert_options=pa_csv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                                  include_columns=columns),
        )
        number = 2  # the next record's number
        base = self.index_base - 2  # record 2 is the first row
        # Arrow calls the handler while it parses a block, before that block's rows come out (it may have
        # parsed the next block already: numbers tell where each malformed row goes).
        for batch in reader:
            i, n = 0, batch.num_rows
            while i < n:
                while number in bad:
                    yield base + number, self._message(number, bad.pop(number))
                    number += 1
                ahead = [b for b in bad if b > number]
                take = n - i if not ahead else min(n - i, min(ahead) - number)
                yield base + number, batch.slice(i, take)
                i += take
                number += take
        for b in sorted(bad):  # malformed rows after the last good one
            yield base + b, self._message(b, bad[b])

    def _message(self, number: int, fields: tuple[int, int]) -> str:
        expected, found = fields
        line = self._line_of(number)
        where = f"line {line}" if line is not None else f"record {number}"
        return f"{where}: malformed CSV row: {found} field{'s' if found != 1 else ''}, expected {expected}"

    def _line_of(self, number: int) -> int | None:
        if self._lines is None:
            self._lines = self._malformed_lines()
        return self._lines.get(number)

    def _malformed_lines(self) -> dict[int, int]:
        """The first line of every record whose field count differs from the header's, by record number."""
        lines: dict[int, int] = {}
        # a shard's lines are the file's: its own, less the header's read before it, after the lines before it
        shift = self.line_base - self._prefix_lines()
        limit = csv.field_size_limit()
        csv.field_size_limit(sys.maxsize)  # Arrow read the values; this pass must not refuse a long one
        try:
            with self._text(errors="replace") as f:
                reader = csv.reader(f, delimiter=self.delimiter)
                width: int | None = None
                number = 0
                last_line = 0
                for fields in reader:
                    first_line, last_line = last_line + 1, reader.line_num
                    if not fields:
                        continue  # a blank line is not a record, for Arrow either
                    number += 1
                    if width is None:
                        width = len(fields)
                    elif len(fields) != width:
                        lines[number] = first_line + shift
        except csv.Error:
            pass  # the lines found so far; the rest are named by record number
        finally:
            csv.field_size_limit(limit)
        return lines
