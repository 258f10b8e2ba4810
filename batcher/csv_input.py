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
"""

from __future__ import annotations

import codecs
import csv
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
MIN_BLOCK_SIZE = 256 << 10
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


class CsvFile:
    def __init__(self, path: Path, delimiter: str) -> None:
        self.path = path
        self.delimiter = delimiter
        self._lines: dict[int, int] | None = None  # record number -> first line, for malformed records
        self.longest: int | None = None  # bytes of the longest record (header included), once `check()` ran

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

    def check(self) -> None:
        """Raises CsvError for a file Arrow would misread or fail on mid-run: bytes that are not UTF-8, or a
        quote never closed (named by the line it opens on). Reads the file once more, with the csv module."""
        breaks = 0  # line breaks read so far
        read = 0  # bytes read so far (UTF-8, as Arrow counts them)
        limit = csv.field_size_limit()
        csv.field_size_limit(sys.maxsize)  # a long value is Arrow's to refuse (BLOCK_SIZE), not this pass's
        try:
            with open(self.path, encoding="utf-8-sig", newline="") as f:

                def lines() -> Iterator[str]:
                    nonlocal breaks, read
                    for line in f:
                        read += len(line) if line.isascii() else len(line.encode("utf-8", "surrogatepass"))
                        yield line
                        breaks += line.endswith(("\n", "\r"))
                    yield _EOF

                # One record at a time (the csv module reads no further than the record it returns), measuring
                # the longest: what sizes Arrow's blocks (`block_size`).
                longest = end = 0
                last: list[str] = []
                for record in csv.reader(lines(), delimiter=self.delimiter):
                    longest, end, last = max(longest, read - end), read, record
        except UnicodeDecodeError:
            raise CsvError(self._not_utf8()) from None
        finally:
            csv.field_size_limit(limit)
        self.longest = longest
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
            self.path,
            read_options=pa_csv.ReadOptions(block_size=self.block_size, use_threads=False),
            parse_options=pa_csv.ParseOptions(delimiter=self.delimiter, newlines_in_values=True,
                                              invalid_row_handler=on_invalid),
            convert_options=pa_csv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                                  include_columns=columns),
        )
        number = 2  # the next record's number
        # Arrow calls the handler while it parses a block, before that block's rows come out (it may have
        # parsed the next block already: numbers tell where each malformed row goes).
        for batch in reader:
            i, n = 0, batch.num_rows
            while i < n:
                while number in bad:
                    yield number - 2, self._message(number, bad.pop(number))
                    number += 1
                ahead = [b for b in bad if b > number]
                take = n - i if not ahead else min(n - i, min(ahead) - number)
                yield number - 2, batch.slice(i, take)
                i += take
                number += take
        for b in sorted(bad):  # malformed rows after the last good one
            yield b - 2, self._message(b, bad[b])

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
        limit = csv.field_size_limit()
        csv.field_size_limit(sys.maxsize)  # Arrow read the values; this pass must not refuse a long one
        try:
            with open(self.path, encoding="utf-8-sig", errors="replace", newline="") as f:
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
                        lines[number] = first_line
        except csv.Error:
            pass  # the lines found so far; the rest are named by record number
        finally:
            csv.field_size_limit(limit)
        return lines
