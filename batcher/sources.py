"""Input rows from Parquet, JSONL or CSV/TSV (`csv_input.py`), in bounded batches, each with a stable id.

`Source.check()` is the pre-flight pass: it reads only what it must (the id column, or each JSONL line once) to
count rows, refuse duplicate or null ids, and name missing or mistyped columns before any request is made.
`Source.batches()` then yields lists of `SourceRow`; a row that cannot become a request (a malformed JSONL line,
a template variable missing, null or NaN in that row, an empty or oversized prompt, a value that cannot be read)
carries an `error` instead of a prompt, starting with `line N:` (JSONL) or `row N:` (Parquet, 0-based), so it
becomes an error row and the run goes on. Values reach templates and `orq.inputs` by the JSONL output's mapping
(`_column_values`, `templating.json_safe`), so a request body is always strict JSON.

Memory is bounded in bytes as well as rows: a batch holds at most `batch_size` rows and at most `batch_bytes` of
input (each row counts the bytes of the values read for it, plus the memory its rendered prompt takes when a
template made one: a byte a character for ASCII, else two or four, as Python stores the str), so long
documents make small batches and short prompts keep batches of `batch_size`. A row bigger than the budget is a
batch of its own. Parquet is read in small pieces within each row group: pyarrow's `iter_batches`
reads a fixed number of rows at a time, so that number is sized from the row group's uncompressed size per row
(or the bytes per row seen so far, if larger), to a quarter of the budget; column chunks are streamed
(`buffer_size`) rather than read whole, and the default pre-buffering (which holds the whole file) is off. JSONL
is read line by line. `Source.stats` counts what was read and handed on (`ReadStats`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from . import storage
from .attachments import Attachments, attach
from .csv_input import CsvError, CsvFile, delimiter_for
from .errors import InputError
from .shapes.chat import MessagesTemplate, messages_from_value
from .shapes.chat_spec import ChatRequestSpec, orq_only_fields
from .sinks import json_values
from .spec import InputSpec, RequestSpec
from .templating import MissingVariable, Template, TemplateError, json_safe

__all__ = ["InputPart", "ReadStats", "Scan", "Source", "SourceInfo", "SourceRow"]


@dataclass(slots=True)
class SourceRow:
    index: int  # 0-based position among the file's rows
    id: Any
    prompt: str | list[dict[str, Any]] | None  # a prompt string, or a chat job's rendered messages
    inputs: dict[str, Any] | None = None
    error: str | None = None
    body: dict[str, Any] | None = None  # an OpenAI batch line's request body
    model: str | None = None  # the body's model, when the line names one
    nbytes: int = 0  # what the row counts against input.batch_bytes


@dataclass(slots=True)
class ReadStats:
    """The reader's own counters, in the units the byte budget bounds."""

    reads: int = 0  # Arrow batches read from Parquet, or JSONL lines
    max_read_bytes: int = 0  # the most input bytes one read held
    batches: int = 0  # batches handed on
    max_batch_bytes: int = 0  # the most bytes one batch handed on held (a lone oversized row may pass the budget)
    max_batch_rows: int = 0

    def read(self, nbytes: int) -> None:
        self.reads += 1
        if nbytes > self.max_read_bytes:
            self.max_read_bytes = nbytes

    def handed(self, rows: int, nbytes: int) -> None:
        self.batches += 1
        if nbytes > self.max_batch_bytes:
            self.max_batch_bytes = nbytes
        if rows > self.max_batch_rows:
            self.max_batch_rows = rows


@dataclass(frozen=True, slots=True)
class SourceInfo:
    rows: int
    id_type: pa.DataType
    keep_types: dict[str, pa.DataType]


@dataclass(frozen=True, slots=True)
class InputPart:
    """A piece of the input: a whole file, some row groups of a Parquet file, the lines that begin in a byte
    range of a JSONL file, or the records between two record starts of a CSV file. `line_base`: the file's lines
    before the part (error rows name the file's line). CSV only: `header`, the bytes of the header record, read
    before a part that starts past them; `longest`, the longest record's bytes, which sizes Arrow's blocks."""

    path: str
    row_groups: tuple[int, ...] | None = None
    start: int = 0
    end: int | None = None
    line_base: int = 0
    header: int = 0
    longest: int = 0


@dataclass(slots=True)
class Scan:
    """What a pre-flight pass over some parts found; scans of consecutive parts add up (`merge`), so a cluster
    can scan shards in parallel and the driver checks the ids of the whole input at once."""

    rows: int = 0
    lines: list[int] = field(default_factory=list)  # per part: the raw lines it holds (blank ones too)
    ids: list[pa.Array] = field(default_factory=list)
    id_values: list[Any] = field(default_factory=list)  # JSONL: the ids as read (typed by `Source.info`)
    no_id: list[str] = field(default_factory=list)  # JSONL: the lines of objects without an id ("3", "a.jsonl:3")
    seen_keys: set[str] = field(default_factory=set)
    keep_kinds: dict[str, set[str]] = field(default_factory=dict)
    id_type: pa.DataType | None = None  # Parquet
    keep_types: dict[str, pa.DataType] = field(default_factory=dict)  # Parquet
    keep_files: dict[str, str] = field(default_factory=dict)  # Parquet: the file each kept type was read from

    def merge(self, other: Scan) -> None:
        self.rows += other.rows
        self.lines += other.lines
        self.ids += other.ids
        self.id_values += other.id_values
        self.no_id += other.no_id
        self.seen_keys |= other.seen_keys
        for c, kinds in other.keep_kinds.items():
            self.keep_kinds.setdefault(c, set()).update(kinds)
        if self.id_type is None:
            self.id_type = other.id_type
        elif other.id_type is not None and other.id_type != self.id_type:
            raise InputError(f"the input files' id columns differ in type: {self.id_type} and {other.id_type}")
        for c, t in other.keep_types.items():
            mine = self.keep_types.get(c)
            if mine is None or mine == t:
                self.keep_types.setdefault(c, t)
                self.keep_files.setdefault(c, other.keep_files.get(c, "?"))
                continue
            # Files written apart often differ (pandas writes an int column with a null as double): the output
            # column takes the type both fit in, or the run stops here, before any request.
            common = _common_type(mine, t)
            if common is None:
                raise InputError(
                    f"kept column {c!r} is {mine} in {self.keep_files.get(c, '?')} but {t} in "
                    f"{other.keep_files.get(c, '?')}: the input files must agree on a type the output column can hold"
                )
            self.keep_types[c] = common


def _common_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type that values of `a` and of `b` both fit in without loss of meaning (int64 and double: double),
    as Arrow's permissive schema merge finds it; None if there is none (string and int64)."""
    for x, y in ((a, b), (_decoded(a), _decoded(b))):
        try:
            return pa.unify_schemas([pa.schema([("c", x)]), pa.schema([("c", y)])], promote_options="permissive") \
                .field("c").type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            continue
    return None


_INT64 = (-(2**63), 2**63 - 1)

# `\ud83d`-style escapes of UTF-16 surrogates: valid JSON, and json.loads pairs them into one character, but a
# lone one stays a Python str that cannot be encoded as UTF-8, so cannot be sent, cached or journaled. Only
# lines whose bytes hold such an escape are checked: a byte search, not per-row Python work.
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _decoded(t: pa.DataType) -> pa.DataType:
    """A dictionary-encoded column (pandas `category`) is read as its values."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_string_type(t: pa.DataType) -> bool:
    t = _decoded(t)
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def _is_id_type(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(_decoded(t)) or _is_string_type(t))


def _plain(arr: pa.Array) -> pa.Array:
    return arr.dictionary_decode() if isinstance(arr, pa.DictionaryArray) else arr


def _plain_python(t: pa.DataType) -> bool:
    """Types whose Python values (`to_pylist`) are what a template and `orq.inputs` take as they are."""
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                or pa.types.is_boolean(t) or pa.types.is_floating(t) or pa.types.is_null(t)
                or pa.types.is_string_view(t))


def _column_values(arr: pa.Array | pa.ChunkedArray) -> tuple[list[Any], dict[int, str]]:
    """A Parquet column as the values templates and `orq.inputs` get, and the rows whose value cannot be read.

    Strings, integers, booleans and floats as Python values (a float's NaN stays NaN: `to_text` refuses it by
    name). Anything else by the JSONL output's mapping (`sinks.json_values`): timestamps, times and durations
    in ISO 8601 with the column's digits (Python's datetime would refuse nanoseconds), dates, decimals as exact
    digits, bytes as base64, maps as pairs. A value that still cannot be read makes its row an error row (the
    dict: position -> why), never a crashed run."""
    arr = _plain(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)
    if pa.types.is_float16(arr.type):
        arr = arr.cast(pa.float64())  # exact; its Python values would be NumPy's, not floats
    convert = (lambda a: a.to_pylist()) if _plain_python(arr.type) else json_values
    try:
        return convert(arr), {}
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        values: list[Any] = []
        bad: dict[int, str] = {}
        for i in range(len(arr)):
            try:
                values.extend(convert(arr.slice(i, 1)))
            except (pa.ArrowException, ValueError, TypeError, OverflowError) as exc:
                values.append(None)
                bad[i] = f"{type(exc).__name__}: {str(exc)[:120]}"
        return values, bad


# A Parquet read is sized to this share of the byte budget from the row group's average row, so that a read whose
# rows run longer than the average still stays within the budget.
_READ_SHARE = 4
# Column chunks bigger than the budget are streamed in pieces of this size: unbuffered, pyarrow reads a row
# group's whole column chunk (hundreds of MB for long documents) before decoding its first page.
_READ_BUFFER = 1 << 20


def _row_bytes(batch: pa.RecordBatch | pa.Table) -> list[int]:
    """Each row's bytes in `batch`: string and binary values by their length, fixed-width values by their width,
    anything else (nested values) by its column's average."""
    n = batch.num_rows
    fixed = 0
    var: pa.Array | None = None
    for col in batch.columns:
        col = _plain(col)
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
            lengths = pc.fill_null(pc.binary_length(col), 0)
            var = lengths if var is None else pc.add(var, lengths)
        elif _fixed_width(t):
            fixed += max(1, t.bit_width // 8)
        else:
            fixed += col.nbytes // max(n, 1)
    if var is None:
        return [fixed] * n
    sizes: list[int] = var.to_pylist()
    return [v + fixed for v in sizes] if fixed else sizes


def text_bytes(value: Any) -> int:
    """The memory the strings in `value` (a str, or rendered messages) take: a str's is its length times its
    width (1, 2 or 4 bytes per character, whichever its widest character needs), what `sys.getsizeof` counts."""
    if isinstance(value, str):
        return sys.getsizeof(value)
    if isinstance(value, dict):
        return sum(text_bytes(v) for v in value.values())
    if isinstance(value, list):
        return sum(text_bytes(v) for v in value)
    return 0


def _fixed_width(t: pa.DataType) -> bool:
    try:
        return bool(t.bit_width > 0)
    except ValueError:  # not a fixed-width type
        return False


def _unsendable(value: Any) -> bool:
    """True for a value holding a lone surrogate (not encodable as UTF-8)."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def _has_duplicates(ids: pa.ChunkedArray | pa.Array) -> bool:
    """Sort and compare neighbours: a third of the memory of a hash-based distinct count on a million ids."""
    ordered = pc.take(ids, pc.sort_indices(ids))
    if isinstance(ordered, pa.ChunkedArray):
        ordered = ordered.combine_chunks()
    return bool(pc.any(pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))).as_py())


def _dup_examples(ids: pa.ChunkedArray | pa.Array) -> list[Any]:
    counts = pc.value_counts(ids)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    return [d["values"] for d in dup.slice(0, 5).to_pylist()]


_SUFFIXES = {"parquet": (".parquet",), "jsonl": (".jsonl", ".ndjson"), "openai_batch": (".jsonl", ".ndjson"),
             "csv": (".csv",), "tsv": (".tsv",)}


class Source:
    """The input's rows. `parts`: the pieces this source reads (default: the whole input, a file or the files
    of a directory or glob), whose first row is at position `index_base` of the whole input."""

    def __init__(self, spec: InputSpec, keep_columns: list[str], api: str = "orq",
                 parts: Sequence[InputPart] | None = None, index_base: int = 0) -> None:
        self.api = api  # endpoint.api: an OpenAI batch line's orq-only fields are refused under openai
        self.spec = spec
        self.path = spec.path
        self.format = spec.resolved_format
        self.whole = parts is None
        if parts is None:
            files = storage.expand_inputs(spec.path, _SUFFIXES[self.format])
            parts = [InputPart(str(spec.path))] if files is None else [InputPart(f) for f in files]
        self.parts = list(parts)
        # A folder or glob input (a shard of one too): errors that name a line name its file as well
        self.name_files = any(p.path != str(spec.path) for p in self.parts)
        self.index_base = index_base
        self.keep_columns = keep_columns
        # Kept columns are not read with the rows: the sink reads them back from the input when it writes the
        # output (`kept_rows`; a Parquet input's in its own Arrow types), so no call in flight, answer or
        # journal line holds them (long documents kept beside their summaries would, C calls at a time).
        self.template = Template(spec.prompt, "input.prompt") if spec.prompt is not None else None
        self.attachments = Attachments.for_input(spec.path, spec.max_attachment_bytes)
        self.messages = (MessagesTemplate(spec.messages, "input.messages", self.attachments)
                         if spec.messages is not None else None)
        self.chat = spec.is_chat
        self.id_name = spec.id_column or ("custom_id" if self.format == "openai_batch" else "id")
        self.stats = ReadStats()
        self._csv_file: CsvFile | None = None

    # -- pre-flight ---------------------------------------------------------------------------------------

    def _needed(self, keep: bool = True) -> list[str]:
        cols: list[str] = []
        for c in (
            ([self.spec.id_column] if self.spec.id_column else [])
            + ([self.spec.prompt_column] if self.spec.prompt_column else [])
            + ([self.spec.messages_column] if self.spec.messages_column else [])
            + (self.template.variables if self.template else [])
            + (self.messages.variables if self.messages else [])
            + self.spec.inputs_columns
            + (self.keep_columns if keep else [])
        ):
            if c not in cols:
                cols.append(c)
        return cols

    def check(self) -> SourceInfo:
        if self.format in ("csv", "tsv"):  # one local file (csv_input.py)
            self.check_csv_text()
        return self.info(self.scan())

    def check_csv_text(self, every: int | None = None) -> list[tuple[int, int]]:
        """The CSV pre-flight pass over the whole file (UTF-8, quotes closed, the longest record), before any
        request; with `every`, where records start past each further `every` bytes, to cut shards at."""
        if not self.path.exists():
            raise InputError(f"input file {self.shown} does not exist")
        if not self.path.is_file():
            raise InputError(f"input path {self.shown} is not a file")
        try:
            with open(self.path, "rb"):
                pass
        except OSError as exc:
            raise InputError(f"cannot read input file {self.shown}: {exc.strerror or exc}") from None
        csv_file = self._csv()
        try:
            csv_file.check(every)
        except CsvError as exc:
            raise InputError(f"cannot read {self.shown} as {self.format.upper()}: {exc}") from None
        return csv_file.cuts

    @property
    def shown(self) -> str:
        return storage.shown(self.path)

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(p.path for p in self.parts))

    def scan(self) -> Scan:
        """Read what the pre-flight needs from this source's parts (ids, counts, columns, types)."""
        for name in self.files:
            if storage.is_remote(name):
                storage.size_of(name)  # raises InputError naming the URI when it is not there
                continue
            path = self.path if name == str(self.path) else type(self.path)(name)
            if not path.exists():
                raise InputError(f"input file {path} does not exist")
            if not path.is_file():
                raise InputError(f"input path {path} is not a file")
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise InputError(f"cannot read input file {path}: {exc.strerror or exc}") from None
        if self.format == "parquet":
            scan = Scan()
            for part in self.parts:
                scan.merge(self._scan_parquet(part))
            return scan
        if self.format in ("csv", "tsv"):
            return self._scan_csv()
        return self._scan_jsonl()

    def info(self, scan: Scan) -> SourceInfo:
        """The whole input's facts from the scans of all its parts; refuses null or duplicate ids."""
        if self.format == "parquet":
            assert scan.id_type is not None
            if self.spec.id_column:
                self._check_ids(pa.chunked_array(scan.ids, type=scan.id_type))
            return SourceInfo(rows=scan.rows, id_type=scan.id_type, keep_types=scan.keep_types)
        if self.format in ("csv", "tsv"):
            return self._csv_info(scan)
        return self._jsonl_info(scan)

    def _parquet_file(self, part: InputPart, buffer_size: int = 0) -> pq.ParquetFile:
        try:
            if storage.is_remote(part.path):
                return pq.ParquetFile(storage.open_input(part.path), pre_buffer=False, buffer_size=buffer_size)
            return pq.ParquetFile(part.path, pre_buffer=False, buffer_size=buffer_size)
        except (OSError, pa.ArrowException) as exc:
            why = storage._clean(exc) if storage.is_remote(part.path) else str(exc)
            raise InputError(f"cannot read {self._name(part)} as Parquet: {why}") from None

    def _name(self, part: InputPart) -> str:
        return storage.shown(self.path if part.path == str(self.path) else part.path)

    def _scan_parquet(self, part: InputPart) -> Scan:
        pf = self._parquet_file(part)
        name = self._name(part)
        schema = pf.schema_arrow
        missing = [c for c in self._needed() if c not in schema.names]
        if missing:
            what = []
            for c in missing:
                if (self.template and c in self.template.variables) or (self.messages and c in self.messages.variables):
                    what.append(f"template variable {{{{{c}}}}}")
                else:
                    what.append(repr(c))
            raise InputError(
                f"{name}: no column {', '.join(what)}; the columns are {schema.names}"
            )
        if self.spec.prompt_column:
            t = schema.field(self.spec.prompt_column).type
            if not _is_string_type(t):
                raise InputError(f"{name}: prompt_column {self.spec.prompt_column!r} is {t}, not a string column")
        if self.spec.messages_column:
            t = _decoded(schema.field(self.spec.messages_column).type)
            if not (_is_string_type(t) or pa.types.is_list(t) or pa.types.is_large_list(t)):
                raise InputError(f"{name}: messages_column {self.spec.messages_column!r} is {t}, not a list of "
                                 "messages (a list of structs) or a string column of JSON lists")
        groups = part.row_groups
        if groups is None:
            rows = pf.metadata.num_rows
        else:
            rows = sum(pf.metadata.row_group(g).num_rows for g in groups)
        id_type: pa.DataType = pa.int64()
        scan = Scan(rows=rows, lines=[rows])
        if self.spec.id_column:
            id_type = schema.field(self.spec.id_column).type
            if not _is_id_type(id_type):
                raise InputError(
                    f"{name}: id_column {self.spec.id_column!r} is {id_type}; ids must be strings or integers"
                )
            id_type = _decoded(id_type)
            chunks = [_plain(b.column(0)) for b in pf.iter_batches(batch_size=65_536, columns=[self.spec.id_column],
                                                                      row_groups=groups)]
            scan.ids = [pa.chunked_array(chunks, type=id_type).combine_chunks()]
        scan.id_type = id_type
        scan.keep_types = {c: schema.field(c).type for c in self.keep_columns}
        scan.keep_files = dict.fromkeys(self.keep_columns, name)
        return scan

    def _check_ids(self, ids: pa.ChunkedArray | pa.Array) -> None:
        if ids.null_count:
            raise InputError(f"{self.shown}: id column {self.id_name!r} has {ids.null_count} null value(s)")
        if len(ids) > 1 and _has_duplicates(ids):
            if self.format == "openai_batch":
                raise InputError(
                    f"{self.shown}: duplicate custom_id values, e.g. {_dup_examples(ids)}; an OpenAI batch file "
                    "needs a unique custom_id on every line (its results are matched to requests by it)"
                )
            raise InputError(
                f"{self.shown}: id column {self.id_name!r} has duplicate ids, e.g. {_dup_examples(ids)}; "
                "ids must be unique (or drop id_column to use row positions)"
            )

    def _scan_jsonl(self) -> Scan:
        rows = 0
        ids: list[Any] = []
        no_id: list[str] = []  # the lines of objects without an id
        seen_keys: set[str] = set()
        keep_types: dict[str, set[str]] = {c: set() for c in self.keep_columns}
        id_col = self.id_name if (self.spec.id_column or self.format == "openai_batch") else None
        self._raw_lines: list[int] = []
        for _lineno, obj, suspect, _size, where in self._lines():
            at = where or f"{self.shown}: "
            rows += 1
            if not isinstance(obj, dict):
                continue  # becomes an error row
            if self.format == "openai_batch":
                seen_keys.update(("custom_id", "body"))
            else:
                seen_keys.update(obj)
            if id_col is not None:
                v = obj.get(id_col)
                if v is not None and not (isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))):
                    raise InputError(f"{at}line {_lineno}: id {id_col!r} is {v!r}; ids must be strings or integers")
                if isinstance(v, int) and not _INT64[0] <= v <= _INT64[1]:
                    raise InputError(
                        f"{at}line {_lineno}: id {id_col!r} is {v}, beyond 64-bit integers; "
                        "write such ids as strings"
                    )
                if suspect and _unsendable(v):
                    raise InputError(
                        f"{at}line {_lineno}: id {id_col!r} holds a lone UTF-16 surrogate escape "
                        "(like \\ud83d), which is not valid Unicode text"
                    )
                if v is None:
                    no_id.append(f"{where[:-2]}:{_lineno}" if where else str(_lineno))
                ids.append(v)
            for c in self.keep_columns:
                v = obj.get(c)
                if v is not None:
                    # an integer beyond int64 fits no Arrow integer: such a column is kept as JSON text
                    big = type(v) is int and not -(2**63) <= v < 2**63
                    keep_types[c].add("bigint" if big else type(v).__name__)
        return Scan(rows=rows, lines=self._raw_lines, id_values=ids, seen_keys=seen_keys, keep_kinds=keep_types,
                    no_id=no_id)

    def _jsonl_info(self, scan: Scan) -> SourceInfo:
        rows, ids, seen_keys, no_id = scan.rows, scan.id_values, scan.seen_keys, scan.no_id
        keep_types = {c: scan.keep_kinds.get(c, set()) for c in self.keep_columns}
        id_col = self.id_name if (self.spec.id_column or self.format == "openai_batch") else None
        if self.format != "openai_batch":
            never = [c for c in self._needed() if c not in seen_keys and c != self.spec.id_column]
            if never and rows:
                raise InputError(f"{self.shown}: no row has a column {never[0]!r}; the columns seen are {sorted(seen_keys)}")
        id_type: pa.DataType = pa.int64()
        if id_col is not None:
            present = [v for v in ids if v is not None]
            if no_id:
                lines = ", ".join(str(n) for n in no_id[:5]) + (", ..." if len(no_id) > 5 else "")
                if self.format == "openai_batch":
                    raise InputError(
                        f"{self.shown}: {len(no_id)} line(s) have no custom_id (line {lines}); an OpenAI batch "
                        "file needs a unique custom_id on every line (its results are matched to requests by it)"
                    )
                raise InputError(f"{self.shown}: {len(no_id)} row(s) have no id {id_col!r} (line {lines})")
            kinds = {type(v) for v in present}
            if len(kinds) > 1:
                raise InputError(f"{self.shown}: ids in {id_col!r} mix strings and integers")
            id_type = pa.string() if kinds == {str} else pa.int64()
            arr = pa.array(present, type=id_type)
            self._check_ids(arr)
        types = {}
        py_to_arrow = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
        for c, kinds_ in keep_types.items():
            if kinds_ == {"int", "float"}:
                types[c] = pa.float64()
            elif len(kinds_) == 1 and next(iter(kinds_)) in py_to_arrow:
                types[c] = py_to_arrow[next(iter(kinds_))]
            else:
                types[c] = pa.string()  # nested or mixed values are kept as JSON text
        return SourceInfo(rows=rows, id_type=id_type, keep_types=types)

    # -- CSV / TSV (every column read as text: csv_input.py says why) -------------------------------------

    def _csv(self) -> CsvFile:
        """The CSV file this source reads: the whole file, or a shard's records (one part: `plan_shards`)."""
        if self._csv_file is None:
            part = self.parts[0]
            self._csv_file = CsvFile(self.path if self.whole else Path(part.path), delimiter_for(self.format),
                                     start=part.start, end=part.end, header=part.header, index_base=self.index_base,
                                     line_base=part.line_base, longest=part.longest or None)
        return self._csv_file

    def _scan_csv(self) -> Scan:
        """Rows counted and ids read by Arrow (the rows a run reads), over this source's records."""
        csv_file = self._csv()
        names = csv_file.header()
        missing = [c for c in self._needed() if c not in names]
        if missing:
            what = [f"template variable {{{{{c}}}}}" if self.template and c in self.template.variables else repr(c)
                    for c in missing]
            raise InputError(f"{self.shown}: no column {', '.join(what)}; the columns are {names}")
        count_by = self.spec.id_column or (self._needed() or names)[0]
        rows = 0
        chunks: list[pa.Array] = []
        try:
            for _index, part in csv_file.segments([count_by]):
                if isinstance(part, str):
                    rows += 1
                    continue
                rows += part.num_rows
                if self.spec.id_column:
                    chunks.append(part.column(0))
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"cannot read {self.shown} as {self.format.upper()}: {exc}") from None
        id_type = pa.string() if self.spec.id_column else pa.int64()
        ids = [pa.chunked_array(chunks, type=id_type).combine_chunks()] if self.spec.id_column else []
        # lines: a CSV part's line base comes from the pre-flight pass (`place` keeps it)
        return Scan(rows=rows, lines=[0] * len(self.parts), ids=ids, id_type=id_type,
                    keep_types={c: pa.string() for c in self.keep_columns})

    def _csv_info(self, scan: Scan) -> SourceInfo:
        id_type = scan.id_type or pa.int64()
        if self.spec.id_column:
            ids = pa.chunked_array(scan.ids, type=id_type)
            empty = pc.sum(pc.equal(pc.utf8_length(ids), 0)).as_py() if len(ids) else 0
            if empty:
                raise InputError(f"{self.shown}: {empty} row(s) have an empty id {self.spec.id_column!r}")
            self._check_ids(ids)
        return SourceInfo(rows=scan.rows, id_type=id_type, keep_types={c: pa.string() for c in self.keep_columns})

    def _csv_batches(self, done_ids: pa.Array | None) -> Iterator[list[SourceRow]]:
        columns = self._needed(keep=False)
        out = _Batcher(self.spec.batch_size, self.spec.batch_bytes, self.stats)
        for index, part in self._csv().segments(columns):
            if isinstance(part, str):
                full = out.add(SourceRow(index, None if self.spec.id_column else index, None, error=part))
                if full is not None:
                    yield full
                continue
            n = part.num_rows
            sizes = _row_bytes(part)
            self.stats.read(sum(sizes))
            if self.spec.id_column:
                id_arr = part.column(self.spec.id_column)
            else:
                id_arr = pa.array(range(index, index + n), type=pa.int64())
            keep_mask: list[bool] | None = None
            if done_ids is not None and len(done_ids):
                keep_mask = pc.invert(pc.is_in(id_arr, value_set=done_ids)).to_pylist()
            cols = {c: part.column(c).to_pylist() for c in columns}
            ids = id_arr.to_pylist()
            del part, id_arr
            for i in range(n):
                if keep_mask is None or keep_mask[i]:
                    # `row N` as for Parquet: a record's line is not known without a second pass (quoted
                    # values may hold newlines), which only malformed records get
                    row = self._row(index + i, ids[i], {c: cols[c][i] for c in columns}, f"row {index + i}")
                    row.nbytes = self._held(row, sizes[i])
                    if (full := out.add(row)) is not None:
                        yield full
        if (last := out.flush()) is not None:
            yield last

    def _lines(self) -> Iterator[tuple[int, Any, bool, int, str]]:
        """(line number, parsed object or a `_BadLine`, whether it may hold a lone surrogate, the line's bytes,
        where) per non-blank line. Line numbers are the file's: `where` is "" for a one-file input, and the file
        ("part-1.jsonl: ") when the input is a folder or a glob, for every error that names a line."""
        search = _ESCAPED_SURROGATE.search
        counts: list[int] = []
        self._raw_lines = counts
        for part in self.parts:
            counts.append(0)
            where = f"{self._name(part)}: " if self.name_files else ""
            if self.whole and part.start == 0 and part.end is None and not storage.is_remote(part.path):
                f: Any = open(part.path, "rb")
                lines: Any = f
            else:
                f = None
                lines = storage.iter_lines(part.path, part.start, part.end)
            try:
                for lineno, raw in enumerate(lines, start=part.line_base + 1):
                    counts[-1] += 1
                    if lineno == 1:
                        raw = raw.removeprefix(b"\xef\xbb\xbf")  # a BOM (Windows editors): not part of the first line
                    if not raw.strip():
                        continue
                    try:
                        yield lineno, json.loads(raw), search(raw) is not None, len(raw), where
                    except (ValueError, UnicodeDecodeError) as exc:
                        yield (lineno, _BadLine(f"line {lineno}: not valid JSON ({str(exc)[:80]})"), False,
                               len(raw), where)
            finally:
                if f is not None:
                    f.close()

    def ids(self, id_type: pa.DataType) -> pa.Array:
        """Every row's id in file order (null for a JSONL line that is not an object): where each id is now,
        for a resumed run whose input was edited (`sinks.remap_journal`)."""
        if self.format == "parquet":
            assert self.spec.id_column is not None
            # every part in order (the files of a directory, a glob or an object store), as `batches` reads them
            chunks = [_plain(b.column(0)).cast(id_type) for part in self.parts
                      for b in self._parquet_file(part).iter_batches(batch_size=65_536, columns=[self.spec.id_column],
                                                                     row_groups=part.row_groups)]
            return pa.chunked_array(chunks, type=id_type).combine_chunks()
        if self.format in ("csv", "tsv"):
            assert self.spec.id_column is not None
            parts: list[pa.Array] = []
            for _index, part in self._csv().segments([self.spec.id_column]):
                # a malformed record has no id: null at its position
                parts.append(pa.nulls(1, id_type) if isinstance(part, str)
                             else part.column(self.spec.id_column).cast(id_type))
            return pa.chunked_array(parts, type=id_type).combine_chunks()
        values = [obj.get(self.id_name) if isinstance(obj, dict) else None for _, obj, *_ in self._lines()]
        return pa.array(values, type=id_type)

    def kept_rows(self, columns: list[str]) -> Iterator[tuple[int, Any, list[Any] | None, int]]:
        """(position, id, the values of `columns`, the bytes read for the row) of every row of a JSONL or CSV
        input, in order and numbered as `batches` numbers them: what the sink reads kept values back from when it
        writes the output (`sinks.KeptValues`). A JSONL value is as `json.loads` gives it, a CSV one its text;
        a row that has none (a line that is not a JSON object, a malformed CSV record) has None."""
        if self.format in ("csv", "tsv"):
            id_col = self.spec.id_column
            read = list(dict.fromkeys([*columns, *([id_col] if id_col else [])]))
            for index, part in self._csv().segments(read):
                if isinstance(part, str):
                    yield index, None if id_col else index, None, 0
                    continue
                sizes = _row_bytes(part)
                ids = part.column(id_col).to_pylist() if id_col else range(index, index + part.num_rows)
                values = [part.column(c).to_pylist() for c in columns]
                del part
                for i, size in enumerate(sizes):
                    yield index + i, ids[i], [v[i] for v in values], size
            return
        positional = not self.spec.id_column and self.format != "openai_batch"
        for index, (_lineno, obj, _suspect, size, _where) in enumerate(self._lines(), start=self.index_base):
            if isinstance(obj, dict):
                yield index, index if positional else obj.get(self.id_name), [obj.get(c) for c in columns], size
            else:
                yield index, index if positional else None, None, size

    # -- rows ---------------------------------------------------------------------------------------------

    def batches(self, done_ids: pa.Array | None = None) -> Iterator[list[SourceRow]]:
        """Rows in file order, `batch_size` at a time, skipping ids in `done_ids` (a resumed run)."""
        if self.format == "parquet":
            yield from self._parquet_batches(done_ids)
        elif self.format in ("csv", "tsv"):
            yield from self._csv_batches(done_ids)
        else:
            yield from self._jsonl_batches(done_ids)

    def _parquet_batches(self, done_ids: pa.Array | None) -> Iterator[list[SourceRow]]:
        columns = self._needed(keep=False)
        wanted = set(columns)
        budget = self.spec.batch_bytes
        per_row_seen = 0.0  # the most bytes per row a read has held so far
        index = self.index_base
        out = _Batcher(self.spec.batch_size, budget, self.stats)
        for _part, pf, g in self._row_groups(wanted, budget):
            meta = pf.metadata.row_group(g)
            if meta.num_rows == 0:
                continue
            size = sum(meta.column(j).total_uncompressed_size for j in range(meta.num_columns)
                       if meta.column(j).path_in_schema.split(".")[0] in wanted)
            if size == 0:  # no leaf matched by name (a dotted column name): the whole row group, an upper bound
                size = meta.total_byte_size
            per_row = max(size / meta.num_rows, per_row_seen, 1.0)
            step = max(1, min(self.spec.batch_size, int(budget / _READ_SHARE / per_row)))
            for batch in pf.iter_batches(batch_size=step, row_groups=[g], columns=columns or None):
                n = batch.num_rows
                sizes = _row_bytes(batch)
                read = sum(sizes)
                self.stats.read(read)
                per_row_seen = max(per_row_seen, read / max(n, 1))
                if self.spec.id_column:
                    id_arr = _plain(batch.column(self.spec.id_column))
                else:
                    id_arr = pa.array(range(index, index + n), type=pa.int64())
                keep_mask: list[bool] | None = None
                if done_ids is not None and len(done_ids):
                    keep_mask = pc.invert(pc.is_in(id_arr, value_set=done_ids)).to_pylist()
                cols: dict[str, list[Any]] = {}
                unreadable: dict[int, str] = {}
                for c in columns:
                    cols[c], bad = _column_values(batch.column(c))
                    for i, why in bad.items():
                        unreadable.setdefault(i, f"column {c!r} cannot be read in this row ({why})")
                ids = id_arr.to_pylist()
                del batch, id_arr  # the Python values are all that is needed from here: not held twice
                for i in range(n):
                    if keep_mask is not None and not keep_mask[i]:
                        continue
                    where = f"row {index + i}"
                    if i in unreadable:
                        row = SourceRow(index + i, ids[i], None, error=f"{where}: {unreadable[i]}")
                    else:
                        row = self._row(index + i, ids[i], {c: cols[c][i] for c in columns}, where)
                    row.nbytes = self._held(row, sizes[i])
                    if (full := out.add(row)) is not None:
                        yield full
                del cols
                index += n
        if (last := out.flush()) is not None:
            yield last

    def _row_groups(self, wanted: set[str], budget: int) -> Iterator[tuple[InputPart, pq.ParquetFile, int]]:
        """(part, its file, row group) in input order, over this source's parts."""
        for part in self.parts:
            pf = self._parquet_file(part)
            meta_all = pf.metadata
            groups = list(range(meta_all.num_row_groups)) if part.row_groups is None else list(part.row_groups)
            # Stream column chunks only when one is bigger than the budget: short rows keep the one read per chunk.
            if any(meta_all.row_group(g).column(j).total_uncompressed_size > budget
                   for g in groups for j in range(meta_all.row_group(g).num_columns)
                   if meta_all.row_group(g).column(j).path_in_schema.split(".")[0] in wanted):
                pf = self._parquet_file(part, buffer_size=_READ_BUFFER)
            for g in groups:
                yield part, pf, g

    def _jsonl_batches(self, done_ids: pa.Array | None) -> Iterator[list[SourceRow]]:
        done = set(done_ids.to_pylist()) if done_ids is not None and len(done_ids) else None
        out = _Batcher(self.spec.batch_size, self.spec.batch_bytes, self.stats)
        for index, (lineno, obj, suspect, size, where) in enumerate(self._lines(), start=self.index_base):
            self.stats.read(size)
            row = self._json_row(index, lineno, obj)
            if suspect and row.error is None:
                row = self._unsendable_row(row, lineno)
            if where and row.error is not None:
                row.error = where + row.error  # "line N: ..." of which file
            row.nbytes = self._held(row, size)
            if done is not None and row.id in done:
                continue
            if (full := out.add(row)) is not None:
                yield full
        if (last := out.flush()) is not None:
            yield last

    def _held(self, row: SourceRow, read: int) -> int:
        """What a row counts against the byte budget: the bytes read for it, and a rendered prompt or rendered
        messages (new strings; a prompt_column's prompt is the value read, counted once) at what they take in
        memory, not their length: a str with one character outside Latin-1 takes 2 or 4 bytes per character
        (`text_bytes`)."""
        if row.prompt is None:
            return read
        if self.template is None and not self.chat:
            # a prompt_column's prompt is the value read, but as a str: up to 4 bytes a character, not its UTF-8
            return max(read, text_bytes(row.prompt))
        return read + text_bytes(row.prompt)

    def _json_row(self, index: int, lineno: int, obj: Any) -> SourceRow:
        # A line that is not an object has no id: with ids (id_column, an OpenAI batch's custom_id) its row's
        # id is null, never a position that could pass for an id; without, its position is its id as usual.
        positional = not self.spec.id_column and self.format != "openai_batch"
        if isinstance(obj, _BadLine):
            return SourceRow(index, index if positional else None, None, error=obj.message)
        if not isinstance(obj, dict):
            return SourceRow(index, index if positional else None, None,
                             error=f"line {lineno}: a JSONL line must be an object, got {type(obj).__name__}")
        if self.format == "openai_batch":
            return self._batch_row(index, lineno, obj)
        row_id = obj.get(self.spec.id_column) if self.spec.id_column else index
        return self._row(index, row_id, obj, f"line {lineno}")

    def _batch_row(self, index: int, lineno: int, obj: dict[str, Any]) -> SourceRow:
        row_id = obj.get("custom_id")
        where = f"line {lineno}"
        body = obj.get("body")
        if not isinstance(body, dict):
            return SourceRow(index, row_id, None, error=f"{where}: OpenAI batch line has no body object")
        url = obj.get("url")
        # One file, one endpoint: its first line's (spec.batch_file_is_chat). A line for the other endpoint is
        # an error row, as is a line for neither.
        want = "/v1/chat/completions" if self.chat else "/v1/completions"
        if url is not None and (not str(url).rstrip("/").endswith("/completions")
                                or ("/chat/" in str(url)) != self.chat):
            return SourceRow(index, row_id, None, error=f"{where}: OpenAI batch line url {url!r} is not "
                                                        f"{want}, the endpoint of this file's first line")
        prompt: str | list[dict[str, Any]]
        if self.chat:
            try:
                prompt = messages_from_value(body.get("messages"))
            except ValueError as exc:
                return SourceRow(index, row_id, None, error=f"{where}: OpenAI batch body: {exc}".replace(
                    "messages column", "messages"), body=body)
            size = _text_size(prompt)
        else:
            raw = body.get("prompt")
            if not isinstance(raw, str) or not raw:
                return SourceRow(index, row_id, None, error=f"{where}: OpenAI batch body has no prompt string",
                                 body=body)
            prompt, size = raw, len(raw)
        if size > self.spec.max_prompt_chars:
            return SourceRow(index, row_id, None, error=f"{where}: {self._too_long(size)}")
        invalid = _invalid_body(body, self.chat, self.api)
        if invalid:
            return SourceRow(index, row_id, None, error=f"{where}: {invalid}", body=body)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        return SourceRow(index, row_id, prompt, body=body, model=model)

    def _unsendable_row(self, row: SourceRow, lineno: int) -> SourceRow:
        """An error row if a value bound for the request holds a lone surrogate; else the row. Kept columns are not
        sent: the sink writes them back as given (escaped in JSONL, U+FFFD in Parquet's UTF-8 strings)."""
        parts: list[tuple[str, Any]] = [("the prompt", row.prompt), ("the body", row.body)]
        parts += [(f"inputs column {c!r}", v) for c, v in (row.inputs or {}).items()]
        bad = [what for what, value in parts if value is not None and _unsendable(value)]
        if not bad:
            return row
        return SourceRow(row.index, row.id, None, error=(
            f"line {lineno}: {', '.join(bad)} holds a lone UTF-16 surrogate (an escape like \\ud83d without "
            "its pair, often from truncated text), which is not valid Unicode and cannot be sent"
        ))

    def _too_long(self, n: int) -> str:
        return f"prompt is {n} characters, over input.max_prompt_chars ({self.spec.max_prompt_chars})"

    def _row(self, index: int, row_id: Any, record: dict[str, Any], where: str) -> SourceRow:
        """`where`: `line N` (JSONL, 1-based) or `row N` (Parquet, 0-based position), first in every error."""
        row = self._rendered(index, row_id, record)
        if row.error is not None:
            row.error = f"{where}: {row.error}"
        return row

    def _rendered(self, index: int, row_id: Any, record: dict[str, Any]) -> SourceRow:
        if self.chat:
            return self._chat_row(index, row_id, record)
        try:
            if self.template is not None:
                prompt = self.template.render(record)
            else:
                assert self.spec.prompt_column is not None
                value = record.get(self.spec.prompt_column)
                if value is None:
                    raise MissingVariable(self.spec.prompt_column, "is null in this row")
                if not isinstance(value, str):
                    return SourceRow(index, row_id, None, error=f"prompt column {self.spec.prompt_column!r} is not a string in this row")
                prompt = value
        except MissingVariable as exc:
            what = f"prompt column {exc.name!r} {exc.why}" if self.template is None else str(exc)
            return SourceRow(index, row_id, None, error=what)
        except TemplateError as exc:
            return SourceRow(index, row_id, None, error=f"{exc} (row {row_id!r})")
        if not prompt.strip():
            return SourceRow(index, row_id, None, error="prompt is empty")
        if len(prompt) > self.spec.max_prompt_chars:
            return SourceRow(index, row_id, None, error=self._too_long(len(prompt)))
        # JSON-safe by the JSONL output's mapping (NaN -> null...): the body must be strict JSON.
        inputs = {c: json_safe(record.get(c)) for c in self.spec.inputs_columns} if self.spec.inputs_columns else None
        return SourceRow(index, row_id, prompt, inputs=inputs)


    def _chat_row(self, index: int, row_id: Any, record: dict[str, Any]) -> SourceRow:
        """A chat job's row: its messages rendered from `input.messages`, or read from `messages_column`."""
        try:
            if self.messages is not None:
                messages = self.messages.render(record)
            else:
                assert self.spec.messages_column is not None
                value = record.get(self.spec.messages_column)
                if value is None:
                    raise MissingVariable(self.spec.messages_column, "is null in this row")
                messages = attach(messages_from_value(value), "messages column", self.attachments)
        except MissingVariable as exc:
            what = str(exc) if self.messages is not None else f"messages column {exc.name!r} {exc.why}"
            return SourceRow(index, row_id, None, error=what)
        except TemplateError as exc:  # also: an image part naming a file that cannot be read
            return SourceRow(index, row_id, None, error=f"{exc} (row {row_id!r})")
        except ValueError as exc:
            return SourceRow(index, row_id, None, error=str(exc))
        size = _text_size(messages)
        if size == 0 and not _has_media(messages):
            return SourceRow(index, row_id, None, error="the messages have no text")
        if size > self.spec.max_prompt_chars:
            return SourceRow(index, row_id, None, error=self._too_long(size))
        inputs = {c: json_safe(record.get(c)) for c in self.spec.inputs_columns} if self.spec.inputs_columns else None
        return SourceRow(index, row_id, messages, inputs=inputs)


def _text_size(messages: list[dict[str, Any]]) -> int:
    """Characters of text the messages send (what max_prompt_chars bounds, as it bounds a prompt)."""
    size = 0
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            size += len(content.strip()) and len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str) and text.strip():
                    size += len(text)
    return size


def _has_media(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") != "text"
                                                          for p in m["content"]) for m in messages)


def _invalid_body(body: dict[str, Any], chat: bool, api: str = "orq") -> str | None:
    """Why an OpenAI batch line's body cannot be sent (an unknown key, a value out of range, NaN, a field
    `api` cannot send, a json_schema that is not a schema), or None."""
    try:
        json.dumps(body, allow_nan=False)
    except ValueError:
        return "OpenAI batch body holds NaN or Infinity, which JSON cannot spell"
    except TypeError:
        pass
    try:
        # The prompt (the messages) and the request fields of the spec, checked the same way.
        fields = {k: v for k, v in body.items() if k != ("messages" if chat else "prompt")}
        request = (ChatRequestSpec if chat else RequestSpec).model_validate(fields)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            field = ".".join(str(p) for p in err["loc"]) or "(body)"
            msg = ("unknown key (OpenAI batch bodies take the request fields of the spec)"
                   if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, "))
            problems.append(f"body.{field}: {msg}")
        return "; ".join(problems[:3])
    if isinstance(request, ChatRequestSpec):
        bad = orq_only_fields(request, api)
        if bad:
            return (f"{', '.join(b.replace('request.', 'body.', 1) for b in bad)}: orq-only, cannot be sent with "
                    "endpoint.api: openai")
        schema = getattr(getattr(request.response_format, "json_schema", None), "schema_", None)
        if schema is not None:
            from .structured import StructuredOutput, load_schema

            try:
                StructuredOutput(load_schema(schema))
            except ValueError as exc:
                return f"body.response_format.json_schema.schema: {exc}"
    return None


@dataclass(frozen=True, slots=True)
class _BadLine:
    message: str


class _Batcher:
    """Gathers rows into batches of at most `rows` rows and `budget` bytes (a row bigger than the budget goes
    alone), counting what it hands on in `stats`."""

    def __init__(self, rows: int, budget: int, stats: ReadStats) -> None:
        self._rows = rows
        self._budget = budget
        self._stats = stats
        self._batch: list[SourceRow] = []
        self._bytes = 0

    def add(self, row: SourceRow) -> list[SourceRow] | None:
        """Adds `row`; returns the batch it closed, if any."""
        full = None
        if self._batch and self._bytes + row.nbytes > self._budget:
            full = self.flush()
        self._batch.append(row)
        self._bytes += row.nbytes
        if len(self._batch) >= self._rows:
            full = self.flush() if full is None else full  # (rows >= 1: both cannot happen with one add)
        return full

    def flush(self) -> list[SourceRow] | None:
        batch, self._batch = self._batch, []
        if not batch:
            return None
        self._stats.handed(len(batch), self._bytes)
        self._bytes = 0
        return batch
