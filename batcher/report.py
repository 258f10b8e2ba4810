"""`batcher report`: usage, cost, latency and errors of finished runs, read lazily from their output files.

    lf = scan_outputs(["out/demo.parquet"])
    print(usage_table(lf, by=["status"]))   # one row per (model, status)
    print(error_table(lf))                  # one row per (http_status, error_kind), with an example message

The module owns the step after the sink: polars LazyFrame -> DataFrame functions, pure and testable, plus their
rendering (an aligned plain-text table, csv, json, markdown) and an optional self-contained HTML page of charts.
Only the columns a table needs are read (polars pushes the projection down into the Parquet / NDJSON scans).

What the numbers mean, row by row of the output:
- `cached` rows were answered from batcher's response cache: no call, cost 0, so their tokens are NOT counted
  again (tokens are the billed ones; `batcher run`'s summary counts them, so it can be higher).
- cost is the sum of `cost_usd`. An ok, non-cached row without a cost had no price: it is counted in `unpriced`,
  and a group whose billed rows are all unpriced has a null cost, printed "unpriced", never $0.
- latency percentiles are over ok, non-cached rows (a cache hit's 0 ms is not a latency), linear interpolation,
  of `latency_ms` as the run recorded it: from the row's first attempt to its answer, so waits for the rate
  limiter, retries and backoff are in it (it is what a row cost in time, not the server's time per call).
- `--prices FILE` recomputes every row's cost from its tokens, exactly as the run prices an answer.

Odd files are read, or refused by name (exit 3), never with a traceback: a JSONL output polars refuses (a kept
column mixing types, NaN, an empty 0-row file, a torn line) goes to a careful reader (`_read_jsonl`). A group
column named like a figure is renamed `by_<name>` (`group_columns`); text tables escape and cut their labels.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import os
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from .errors import InputError, OutputError
from .prices import PriceTable

__all__ = [
    "add_parser",
    "error_table",
    "scan_outputs",
    "usage_table",
    "usage_total",
    "with_prices",
]

_SUFFIXES = (".parquet", ".jsonl", ".ndjson")
_TOKENS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")
_USAGE_NEEDS = ("model", "status", "cached", "attempts", "latency_ms", *_TOKENS, "cost_usd")
_ERROR_NEEDS = ("status", "http_status", "error_kind", "error")
# The result columns' types, so a JSONL output whose first lines are all null still reads with the right type.
_JSONL_TYPES: dict[str, pl.DataType] = {
    "model": pl.String(),
    "status": pl.String(),
    "error": pl.String(),
    "error_kind": pl.String(),
    "http_status": pl.Int64(),
    "attempts": pl.Int64(),
    "cached": pl.Boolean(),
    "latency_ms": pl.Float64(),
    "prompt_tokens": pl.Int64(),
    "completion_tokens": pl.Int64(),
    "total_tokens": pl.Int64(),
    "cached_tokens": pl.Int64(),
    "reasoning_tokens": pl.Int64(),
    "cost_usd": pl.Float64(),
}
PERCENTILES = (50, 95, 99)


# --------------------------------------------------------------------------------------------------- reading


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            # Dot-files are batcher's own: state folders and half-written temporaries, never results.
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _SUFFIXES
                           and not p.name.startswith("."))
            if not found:
                raise InputError(f"{path}: no .parquet or .jsonl output files in this folder")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in _SUFFIXES:
                raise InputError(f"{path}: not a batcher output (.parquet or .jsonl)")
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    if not files:
        raise InputError("no output files given")
    # A file named twice (`out/ out/a.parquet`, `./a.parquet a.parquet`) is one output: counted once.
    seen: set[Path] = set()
    unique = []
    for p in files:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int" if -(2**63) <= value < 2**63 else "bigint"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "json"  # an object or an array


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _utf8(text: str) -> str:
    """A lone surrogate (`"\\udc00"` is valid JSON, and batcher keeps it escaped in JSONL outputs) as U+FFFD,
    as in a Parquet output: polars strings are UTF-8, which cannot hold one."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    return _utf8(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))


# What each result column may hold in a JSONL output (besides null); ints are fine where floats are.
_RESULT_KINDS = {pl.String(): {"str"}, pl.Int64(): {"int"}, pl.Boolean(): {"bool"}, pl.Float64(): {"int", "float"}}


def _json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object is an InputError naming it."""
    bad: tuple[int, ValueError] | None = None
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if bad is not None:
                    raise InputError(f"{path}: line {bad[0]} is not valid JSON: {bad[1]}")
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    bad = (number, exc)  # named once we know whether another line follows
                    continue
                if not isinstance(obj, dict):
                    raise InputError(f"{path}: line {number} is not a JSON object: not a batcher output")
                yield number, obj
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if bad is not None:
        raise InputError(f"{path}: line {bad[0]} is not valid JSON (a torn last line: the file was cut short): {bad[1]}")


_CHUNK_ROWS = 50_000


def _read_jsonl(path: Path) -> pl.LazyFrame:
    """The careful reader, for a JSONL file polars' fast one refuses: empty (a 0-row output), a kept column
    whose values mix types (read as text: strings as they are, other values as their JSON text, the rule
    polars itself applies to strings mixed with objects), NaN/Infinity (Python's json reads them; old outputs
    hold them), or a damaged line, which is named by its line number. Two passes, as it has to see every value
    before it can choose a column's type: the first notes the types, the second builds the frame in chunks."""
    kinds: dict[str, set[str]] = {}
    for number, obj in _json_objects(path):
        for key, value in obj.items():
            kind = _kind(value)
            want = _JSONL_TYPES.get(key)
            if want is not None and kind != "null" and kind not in _RESULT_KINDS[want]:
                raise InputError(f"{path}: line {number}: {key} is {value!r}, not a {want} value: not a batcher output")
            kinds.setdefault(key, set()).add(kind)
    if not kinds:
        # A 0-row output (batcher writes an empty file): the result columns, no rows.
        return pl.LazyFrame(schema=_JSONL_TYPES)
    schema: dict[str, pl.DataType] = {}
    as_text: set[str] = set()
    for key, seen in kinds.items():
        seen.discard("null")
        if key in _JSONL_TYPES:
            schema[key] = _JSONL_TYPES[key]
        elif seen == {"bool"}:
            schema[key] = pl.Boolean()
        elif seen == {"int"}:
            schema[key] = pl.Int64()
        elif seen and seen <= {"int", "float"}:
            schema[key] = pl.Float64()
        else:
            schema[key] = pl.String()
            as_text.add(key)

    def frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
        return pl.DataFrame([
            pl.Series(key, [_json_text(r.get(key)) if key in as_text or dtype == pl.String() else r.get(key)
                            for r in rows], dtype=dtype, strict=False)
            for key, dtype in schema.items()
        ])

    frames: list[pl.DataFrame] = []
    chunk: list[dict[str, Any]] = []
    for _, obj in _json_objects(path):
        chunk.append(obj)
        if len(chunk) == _CHUNK_ROWS:
            frames.append(frame(chunk))
            chunk = []
    if chunk or not frames:
        frames.append(frame(chunk))
    return pl.concat(frames, rechunk=False).lazy()


def _scan_jsonl(path: Path) -> pl.LazyFrame:
    try:
        # infer_schema_length=None: a kept column that is null for the first lines must still get its type.
        inferred = pl.scan_ndjson(path, infer_schema_length=None).collect_schema()
    except pl.exceptions.PolarsError:
        return _read_jsonl(path)
    # The result columns keep their types even when every value of one is null; only the present ones, and
    # with the full schema given polars does not infer it a second time.
    schema = {name: _JSONL_TYPES.get(name, dtype) for name, dtype in inferred.items()}
    for name, dtype in inferred.items():
        want = _JSONL_TYPES.get(name)
        if want is not None and dtype not in (want, pl.Null()) and not (want == pl.Float64() and dtype == pl.Int64()):
            return _read_jsonl(path)  # a result column holding something else: the careful reader names the row
    lf = pl.scan_ndjson(path, schema=schema)
    try:
        # Inference reads a column's type from its values but does not check them all against it (a column of
        # ints with one `true` is Int64 until a row is read): read every value once, streaming, to be sure.
        lf.select(pl.all().null_count()).collect(engine="streaming")
    except pl.exceptions.PolarsError:
        return _read_jsonl(path)
    return lf


def _scan_one(path: Path) -> pl.LazyFrame:
    try:
        if path.suffix.lower() == ".parquet":
            # glob=False: an output name with [ or * in it is a name, not a pattern.
            lf = pl.scan_parquet(path, glob=False)
        else:
            lf = _scan_jsonl(path)
        names = lf.collect_schema().names()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if "status" not in names:
        if "custom_id" in names and "response" in names:
            raise InputError(
                f"{path}: an openai_batch output (OpenAI Batch API lines): it has no latency, attempts or cost, so "
                "batcher report reads batcher's own format only; for a report, run the job with output.format: "
                "parquet or jsonl (its own output.path; with request.cache set, answers already cached are not paid again)")
        raise InputError(f"{path}: not a batcher output: no 'status' column")
    for name, dtype in lf.collect_schema().items():
        want = _JSONL_TYPES.get(name)
        if want is not None and not _fits(dtype, want):
            # Found here, by name, rather than as a polars error in the middle of an aggregation.
            raise InputError(f"{path}: column {name!r} holds {dtype} values, not {want}: not a batcher output")
    return lf


def _fits(dtype: pl.DataType, want: pl.DataType) -> bool:
    """Whether a result column of this type reads as batcher's own (`_JSONL_TYPES`)."""
    if dtype == pl.Null():
        return True
    if want == pl.String():
        return dtype == pl.String() or isinstance(dtype, (pl.Categorical, pl.Enum))
    if want == pl.Int64():
        return dtype.is_integer()
    if want == pl.Float64():
        return dtype.is_float() or dtype.is_integer()
    return dtype == want


def scan_outputs(paths: Iterable[str | Path]) -> pl.LazyFrame:
    """One LazyFrame over output files (or folders of them); nothing is read until it is collected.

    Files may differ in their kept input columns: a column missing from one file is null in its rows.
    """
    frames = [_scan_one(p) for p in _expand(paths)]
    if len(frames) == 1:
        return frames[0]
    # A kept column read as two types that have no common one (a Parquet map kept by one output, the same column
    # as JSONL [key, value] pairs in another; a duration and its ISO text) is read as text in every file, as a
    # JSONL column that mixes types is: strings as they are, anything else as its JSON text.
    types: dict[str, set[pl.DataType]] = {}
    for lf in frames:
        for name, dtype in lf.collect_schema().items():
            if dtype != pl.Null():
                types.setdefault(name, set()).add(dtype)
    clash = {name for name, seen in types.items()
             if name not in _JSONL_TYPES and len(seen) > 1 and not all(t.is_numeric() for t in seen)}
    if clash:
        frames = [lf.with_columns(_as_text(name, dtype) for name, dtype in lf.collect_schema().items() if name in clash)
                  for lf in frames]
    return pl.concat(frames, how="diagonal_relaxed")


def _as_text(name: str, dtype: pl.DataType) -> pl.Expr:
    if dtype == pl.String():
        return pl.col(name)
    if dtype.is_nested():
        # `{"v":<value as JSON>}` minus its wrapping: polars JSON-encodes structs only.
        return pl.struct(pl.col(name).alias("v")).struct.json_encode().str.slice(5).str.head(-1).alias(name)
    if isinstance(dtype, (pl.Duration, pl.Time)):
        return pl.col(name).dt.to_string("iso")  # exact, as batcher's JSONL outputs spell them
    return pl.col(name).cast(pl.String)


def _require(lf: pl.LazyFrame, columns: Iterable[str]) -> None:
    names = lf.collect_schema().names()
    missing = [c for c in dict.fromkeys(columns) if c not in names]
    if missing:
        raise InputError(f"no column {', '.join(map(repr, missing))} in the outputs; the columns are {names}")


# ------------------------------------------------------------------------------------------------- the tables


def with_prices(lf: pl.LazyFrame, prices: PriceTable) -> pl.LazyFrame:
    """`cost_usd` recomputed from each row's tokens with `prices`, by the run's own rule (`Price.cost`):
    error rows have no cost, cache hits cost 0, a model without a price has a null cost."""
    table = pl.LazyFrame(
        {
            "model": list(prices.prices),
            "_p": [p.prompt for p in prices.prices.values()],
            "_c": [p.completion for p in prices.prices.values()],
            "_cp": [p.cached_prompt if p.cached_prompt is not None else p.prompt for p in prices.prices.values()],
        },
        schema={"model": pl.String, "_p": pl.Float64, "_c": pl.Float64, "_cp": pl.Float64},
    )
    prompt = pl.col("prompt_tokens").fill_null(0)
    cached = pl.col("cached_tokens").fill_null(0)
    completion = pl.col("completion_tokens").fill_null(0)
    cost = ((prompt - cached) * pl.col("_p") + cached * pl.col("_cp") + completion * pl.col("_c")) / 1e6
    recomputed = (
        pl.when(pl.col("status") != "ok").then(None)
        .when(pl.col("cached").fill_null(False)).then(0.0)
        .when(pl.col("prompt_tokens").is_null() & pl.col("completion_tokens").is_null()).then(None)
        .otherwise(cost)
    )
    return (
        lf.with_columns(pl.col("model").cast(pl.String))
        .join(table, on="model", how="left")
        .with_columns(recomputed.cast(pl.Float64).alias("cost_usd"))
        .drop("_p", "_c", "_cp")
    )


def _finite(column: str) -> pl.Expr:
    # NaN or infinity in a cost or a latency (an old JSONL output, another tool's file) is no figure: null.
    return pl.when(pl.col(column).is_finite()).then(pl.col(column).cast(pl.Float64))


def _aggregates() -> list[pl.Expr]:
    ok = pl.col("status") == "ok"
    cached = pl.col("cached").fill_null(False)
    billed_ok = ok & ~cached
    cost = _finite("cost_usd")
    exprs = [
        pl.len().cast(pl.Int64).alias("rows"),
        ok.fill_null(False).sum().cast(pl.Int64).alias("ok"),
        (~ok.fill_null(False)).sum().cast(pl.Int64).alias("errors"),
        cached.sum().cast(pl.Int64).alias("cached"),
        # Over no row there is no ratio: null (printed "-"), not 0/0's NaN.
        pl.when(pl.len() > 0).then(pl.col("attempts").fill_null(0).cast(pl.Float64).sum() / pl.len())
        .otherwise(None).cast(pl.Float64).alias("attempts_per_row"),
        # Int128: a sum of int64 counts must not wrap round to a negative number.
        *(pl.col(t).filter(~cached).cast(pl.Int128).sum().alias(t) for t in _TOKENS),
        # A sum over no priced row is unknown, not $0: null, printed "unpriced" (or "-" when nothing was billed).
        pl.when(cost.count() > 0).then(cost.sum()).otherwise(None).cast(pl.Float64).alias("cost_usd"),
        (billed_ok & cost.is_null()).fill_null(False).sum().cast(pl.Int64).alias("unpriced"),
    ]
    exprs += [
        _finite("latency_ms").filter(billed_ok).quantile(q / 100, interpolation="linear").alias(f"latency_p{q}_ms")
        for q in PERCENTILES
    ]
    return exprs


METRICS = ("rows", "ok", "errors", "cached", "attempts_per_row", *_TOKENS, "cost_usd", "unpriced",
           *(f"latency_p{q}_ms" for q in PERCENTILES))


def _keys(by: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(["model", *by]))


def group_columns(by: Iterable[str]) -> list[str]:
    """The group columns' names in `usage_table`'s result: the `by` columns' own, except that one named like a
    figure (`--by cached`, `--by cost_usd`) is called `by_<name>`, so both can be in one table."""
    names: list[str] = []
    for key in _keys(by):
        name = key
        while name in METRICS or name in names:
            name = "by_" + name
        names.append(name)
    return names


def _collect(lf: pl.LazyFrame) -> pl.DataFrame:
    try:
        return lf.collect()
    except (pl.exceptions.ComputeError, OSError) as exc:
        # A value the scan could not read as its column's type, or a damaged page of a Parquet file, found
        # only now that the rows are read.
        raise InputError(f"cannot read the outputs: {exc}") from None


def usage_table(lf: pl.LazyFrame, by: list[str]) -> pl.DataFrame:
    """One row per model (and per value of each `by` column): rows, ok, errors, cached, attempts per row,
    billed tokens, cost, unpriced rows and latency percentiles, sorted by the group columns (named as
    `group_columns(by)` says)."""
    keys = _keys(by)
    names = group_columns(by)
    absent = [k for k in keys if k not in lf.collect_schema().names()]
    if absent and _collect(lf.select(pl.len()))[0, 0] == 0:
        # An empty JSONL output has no columns to name: with no rows there is nothing to group, not an error.
        lf = lf.with_columns(pl.lit(None).alias(k) for k in absent)
    _require(lf, [*_USAGE_NEEDS, *keys])
    exploded = list_keys(lf, by)
    if exploded:
        # A list column (a schema's topics, say) groups by each of its elements: a row with [a, b] counts in a
        # and in b (an empty or null list under null); usage_total still counts every row once.
        lf = lf.explode(exploded)
    for c, dtype in lf.select(keys).collect_schema().items():
        if dtype.is_nested():
            raise InputError(f"--by {c}: the column holds {dtype} values; group by a scalar or list column")
    groups = [pl.col(k).alias(n) for k, n in zip(keys, names, strict=True)]
    return _collect(lf.group_by(groups).agg(_aggregates()).sort(names, nulls_last=True))


def list_keys(lf: pl.LazyFrame, by: Iterable[str]) -> list[str]:
    """The `by` columns that hold lists: `usage_table` groups by each of their elements."""
    schema = lf.collect_schema()
    return [c for c in dict.fromkeys(by) if c in schema.names() and isinstance(schema[c], pl.List | pl.Array)]


def explode_note(columns: list[str]) -> str:
    names = ", ".join(columns)
    return (f"--by {names}: a row counts once in the group of each element of its list (a row with [a, b] in a "
            "and in b, an empty list under null), so the groups add up to more than the rows; the total counts "
            "each row once")


def usage_total(lf: pl.LazyFrame) -> pl.DataFrame:
    """The same figures as `usage_table` over every row: one row, no group columns."""
    _require(lf, _USAGE_NEEDS)
    return _collect(lf.select(_aggregates()))


def error_table(lf: pl.LazyFrame) -> pl.DataFrame:
    """Rows that are not ok, counted by (http_status, error_kind), most frequent first, with one example message."""
    _require(lf, _ERROR_NEEDS)
    return _collect(
        lf.filter((pl.col("status") != "ok").fill_null(True))
        .group_by("http_status", "error_kind")
        .agg(pl.len().cast(pl.Int64).alias("rows"), pl.col("error").drop_nulls().first().alias("example"))
        .sort(["rows", "http_status", "error_kind"], descending=[True, False, False], nulls_last=True)
    )


def latency_histogram(lf: pl.LazyFrame, bins: int = 30) -> list[tuple[float, float, int]]:
    """(low, high, rows) bins of ok, non-cached latencies up to the 99th percentile; slower rows land in the
    last bin, so one outlier does not squash the chart."""
    billed_ok = (pl.col("status") == "ok") & ~pl.col("cached").fill_null(False)
    lat = lf.filter(billed_ok & pl.col("latency_ms").is_finite()).select(pl.col("latency_ms").cast(pl.Float64))
    edges = _collect(lat.select(pl.col("latency_ms").min().alias("lo"),
                                pl.col("latency_ms").quantile(0.99, interpolation="linear").alias("hi")))
    lo, hi = edges["lo"][0], edges["hi"][0]
    if lo is None or hi is None:
        return []
    width = (hi - lo) / bins if hi > lo else 1.0
    counts = _collect(
        lat.select(((pl.col("latency_ms") - lo) / width).floor().clip(0, bins - 1).cast(pl.Int64).alias("bin"))
        .group_by("bin").agg(pl.len().alias("n"))
    )
    by_bin = dict(zip(counts["bin"].to_list(), counts["n"].to_list(), strict=True))
    return [(lo + i * width, lo + (i + 1) * width, int(by_bin.get(i, 0))) for i in range(bins)]


# -------------------------------------------------------------------------------------------------- rendering

_HEADERS = {
    "rows": "rows", "ok": "ok", "errors": "errors", "cached": "cached", "attempts_per_row": "att/row",
    "prompt_tokens": "prompt tok", "completion_tokens": "compl tok", "cached_tokens": "cached tok",
    "reasoning_tokens": "reason tok", "cost_usd": "cost USD", "unpriced": "unpriced",
    **{f"latency_p{q}_ms": f"p{q} ms" for q in PERCENTILES},
}


def _cell(column: str, value: Any, row: dict[str, Any]) -> str:
    if column == "cost_usd":
        if value is None:
            return "unpriced" if row.get("unpriced") else "-"
        return f"{value:.6f}" if value < 1 else f"{value:,.2f}" if value < 1e12 else f"{value:.4g}"
    if value is None:
        return "-"
    if column == "attempts_per_row":
        return f"{value:.2f}" if value < 1e12 else f"{value:.4g}"
    if column.startswith("latency_"):
        return f"{value:,.0f}" if value < 1e12 else f"{value:.4g}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


LABEL_MAX = 48


def visible(text: str, limit: int = LABEL_MAX) -> str:
    """`text` for one cell of a text table: control and other unprintable characters escaped (a newline is
    `\\n`, an ANSI escape `\\x1b`), and cut to `limit` characters with a final "…". csv and json keep values exact."""
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _label(value: Any) -> str:
    """A group value as a label: exact (no thousands separators, every digit of a float), made visible."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return visible(repr(value))
    if isinstance(value, bytes):
        return visible(_bytes_text(value))
    return visible(str(value))


def _bytes_text(value: bytes) -> str:
    # A binary group value as text: its UTF-8, with any other byte as \xNN (csv and json cannot hold bytes).
    return value.decode("utf-8", "backslashreplace")


def _text_keys(usage: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Group columns csv and json cannot hold as they are, as text: durations and times in exact ISO 8601,
    binary ones by `_bytes_text`, others polars cannot cast to text by Python's str; every other column as is."""
    converted = []
    for k in keys:
        if isinstance(usage.schema[k], (pl.Duration, pl.Time)):
            # ISO 8601 with every digit of the unit (`-PT0.000000001S`, `23:59:59.999999999`), as batcher's
            # JSONL outputs spell them: a cast to text (or Python's str) drops the nanoseconds.
            converted.append(usage[k].dt.to_string("iso"))
            continue
        if usage.schema[k] != pl.Binary():
            try:
                usage[k].cast(pl.String)
                continue
            except pl.exceptions.PolarsError:
                pass
        text = [None if v is None else _bytes_text(v) if isinstance(v, bytes) else str(v) for v in usage[k]]
        converted.append(pl.Series(k, text, dtype=pl.String))
    return usage.with_columns(converted)


def _width(text: str) -> int:
    # Columns a terminal gives the text: East Asian wide characters take two, combining marks none.
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _usage_cells(usage: pl.DataFrame, total: pl.DataFrame, keys: list[str]) -> tuple[list[str], list[list[str]]]:
    metrics = [c for c in usage.columns if c not in keys]
    header = [*map(visible, keys), *(_HEADERS.get(c, c) for c in metrics)]
    body = []
    for row in usage.iter_rows(named=True):
        body.append([_label(row[k]) for k in keys] + [_cell(c, row[c], row) for c in metrics])
    for row in total.iter_rows(named=True):
        body.append(["total", *([""] * (len(keys) - 1)), *(_cell(c, row[c], row) for c in metrics)])
    return header, body


def _error_cells(errors: pl.DataFrame) -> tuple[list[str], list[list[str]]]:
    header = ["http_status", "error_kind", "rows", "example"]
    body = [[_cell("http_status", r["http_status"], r), visible(_cell("error_kind", r["error_kind"], r)),
             _cell("rows", r["rows"], r), _short(r["example"])] for r in errors.iter_rows(named=True)]
    return header, body


def _short(text: str | None, limit: int = 100) -> str:
    if text is None:
        return "-"
    return visible(" ".join(text.split()), limit)


def _is_numeric(cells: list[str]) -> bool:
    return all(c.replace(",", "").replace(".", "").replace("-", "").isdigit() or c in ("-", "", "unpriced")
               for c in cells)


def text_table(header: list[str], body: list[list[str]]) -> str:
    """Aligned plain-text columns: numbers right, text left; a rule under the header and above a total."""
    widths = [max(_width(h), *(_width(r[i]) for r in body)) if body else _width(h) for i, h in enumerate(header)]
    right = [_is_numeric([r[i] for r in body]) and bool(body) for i in range(len(header))]

    def pad(cell: str, width: int, right: bool) -> str:
        fill = " " * (width - _width(cell))
        return fill + cell if right else cell + fill

    def line(cells: list[str]) -> str:
        return "  ".join(pad(c, w, r) for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(header), rule]
    for row in body:
        if row[0] == "total" and out[-1] != rule:
            out.append(rule)
        out.append(line(row))
    return "\n".join(out)


def _markdown(header: list[str], body: list[list[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    out = ["| " + " | ".join(map(esc, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(out)


def _csv_frame(usage: pl.DataFrame, total: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """The usage rows then the total row, whose first group column says "total" (the others are empty)."""
    keyed = usage.with_columns(pl.col(k).cast(pl.String) for k in keys)
    total_keys = total.with_columns(
        pl.lit("total").alias(keys[0]), *(pl.lit(None, dtype=pl.String).alias(k) for k in keys[1:])
    ).select(keyed.columns)
    return pl.concat([keyed, total_keys], how="vertical_relaxed")


# ------------------------------------------------------------------------------------------------------- HTML


def _bar_chart(items: list[tuple[str, float]], unit: str) -> str:
    bar_h, gap, label_w, chart_w = 22, 6, 260, 420
    height = len(items) * (bar_h + gap) + gap
    top = max((v for _, v in items), default=0.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + chart_w + 120}" height="{height}">']
    for i, (label, value) in enumerate(items):
        y = gap + i * (bar_h + gap)
        w = max(1.0, chart_w * value / top)
        parts.append(f'<text x="{label_w - 8}" y="{y + bar_h * 0.7:.1f}" text-anchor="end">{html.escape(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="#4878a8"/>')
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + bar_h * 0.7:.1f}">{html.escape(unit.format(value))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _histogram(bins: list[tuple[float, float, int]], marks: dict[str, float]) -> str:
    w, h, pad = 720, 260, 60
    top = max((n for _, _, n in bins), default=0) or 1
    lo, hi = bins[0][0], bins[-1][1]
    span = (hi - lo) or 1.0
    bw = (w - 2 * pad) / len(bins)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 30}">']
    for i, (a, b, n) in enumerate(bins):
        bh = (h - pad) * n / top
        parts.append(f'<rect x="{pad + i * bw:.1f}" y="{h - bh:.1f}" width="{max(bw - 1, 1):.1f}" height="{bh:.1f}" '
                     f'fill="#4878a8"><title>{a:,.0f}-{b:,.0f} ms: {n} rows</title></rect>')
    for i, (name, value) in enumerate(marks.items()):
        x = pad + (w - 2 * pad) * min(max((value - lo) / span, 0.0), 1.0)
        y = 14 + 15 * i  # one line per label: percentiles are often a few pixels apart
        anchor = ' text-anchor="end"' if x > w / 2 else ""
        dx = -4 if anchor else 4
        parts.append(f'<line x1="{x:.1f}" y1="{y - 10}" x2="{x:.1f}" y2="{h}" stroke="#c0392b" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{x + dx:.1f}" y="{y}" fill="#c0392b"{anchor}>{name} {value:,.0f} ms</text>')
    parts.append(f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{top:,}</text>')
    parts.append(f'<text x="{pad - 4}" y="{h}" text-anchor="end">0</text>')
    parts.append(f'<text x="{pad}" y="{h + 20}">{lo:,.0f} ms</text>')
    parts.append(f'<text x="{w - pad}" y="{h + 20}" text-anchor="end">{hi:,.0f} ms (slower rows in the last bar)</text>')
    parts.append("</svg>")
    return "".join(parts)


# In every page `batcher report --html` writes: a file with it near its start may be replaced without --overwrite.
HTML_MARKER = "<!-- batcher report: this page was written by batcher report --html -->"


def html_report(lf: pl.LazyFrame, title: str) -> str:
    """A self-contained page (inline SVG, no script): cost by model, latency distribution, the two tables."""
    per_model = usage_table(lf, [])
    total = usage_total(lf)
    costs = [(m or "(none)", c) for m, c in zip(per_model["model"], per_model["cost_usd"], strict=True) if c is not None]
    unpriced = [m or "(none)" for m, n in zip(per_model["model"], per_model["unpriced"], strict=True) if n]
    t = total.row(0, named=True)
    marks = {f"p{q}": t[f"latency_p{q}_ms"] for q in PERCENTILES if t[f"latency_p{q}_ms"] is not None}
    bins = latency_histogram(lf)
    uh, ub = _usage_cells(per_model, total, ["model"])
    eh, eb = _error_cells(error_table(lf))
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Cost by model (USD)</h2>",
        _bar_chart(costs, "${:.6f}") if costs else "<p>No priced rows.</p>",
    ]
    if unpriced:
        sections.append(f"<p><b>Unpriced</b> (no price, cost unknown, not free): {html.escape(', '.join(unpriced))}</p>")
    sections += [
        "<h2>Latency of ok, non-cached calls</h2>",
        _histogram(bins, marks) if bins else "<p>No latencies.</p>",
        "<h2>Usage</h2>", f"<pre>{html.escape(text_table(uh, ub))}</pre>",
        *([f"<p>{html.escape(NO_ROWS)}</p>"] if t["rows"] == 0 else []),
        "<h2>Errors</h2>", f"<pre>{html.escape(text_table(eh, eb))}</pre>" if eb else "<p>No errors.</p>",
    ]
    style = "body{font-family:system-ui,sans-serif;margin:2em}svg text{font-size:12px}pre{font-size:12px}"
    return (f'<!DOCTYPE html>\n{HTML_MARKER}\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n")


# ---------------------------------------------------------------------------------------------------- the CLI


def _json_safe(value: Any) -> Any:
    # json.dumps would write NaN and Infinity, which are not JSON: a group value keeps its name as text.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


NO_ROWS = "no rows: the outputs hold no result rows"


def render(lf: pl.LazyFrame, by: list[str], fmt: str, table: str = "all") -> str:
    """The report as text in one of the formats; `table` picks usage, errors or both (csv takes one)."""
    keys = group_columns(by)
    want_usage, want_errors = table in ("all", "usage"), table in ("all", "errors")
    if fmt == "csv":
        # One CSV is one table: the usage one unless --table errors asks for the other.
        if table == "errors":
            return error_table(lf).write_csv()
        return _csv_frame(_text_keys(usage_table(lf, by), keys), usage_total(lf), keys).write_csv()
    usage = usage_table(lf, by) if want_usage else None
    total = usage_total(lf) if want_usage else None
    errors = error_table(lf) if want_errors else None
    if fmt == "json":
        doc: dict[str, Any] = {"by": keys}
        if usage is not None and total is not None:
            doc["usage"] = _text_keys(usage, keys).to_dicts()
            doc["total"] = total.to_dicts()[0]
            if list_keys(lf, by):
                doc["note"] = explode_note(list_keys(lf, by))
        if errors is not None:
            doc["errors"] = errors.to_dicts()
        return json.dumps(_json_safe(doc), indent=1, default=str, allow_nan=False)
    draw = _markdown if fmt == "markdown" else text_table
    blocks = []
    if usage is not None and total is not None:
        blocks.append(draw(*_usage_cells(usage, total, keys)))
        if list_keys(lf, by):
            blocks.append(explode_note(list_keys(lf, by)))
        if total["rows"][0] == 0:
            blocks.append(NO_ROWS)
        if (total["unpriced"][0] or 0) > 0:
            models = [str(m) for m in usage.filter(pl.col("unpriced") > 0)["model"].unique().sort().to_list()]
            blocks.append(f"unpriced: {total['unpriced'][0]} ok row(s) of {', '.join(models)} have no price: "
                          "their cost is unknown, not zero (add them to a price table: --prices FILE)")
    if errors is not None:
        if errors.height:
            title = "errors" if fmt == "text" else "**errors**"
            blocks.append(title + "\n" + draw(*_error_cells(errors)))
        else:
            blocks.append("errors: none")
    return "\n\n".join(blocks)


def _split_by(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [c.strip() for c in v.split(",") if c.strip() and c.strip() not in out]
    return out


def _check_html_target(target: Path, inputs: list[Path], overwrite: bool) -> None:
    """Before anything is read: the page never replaces one of the report's own inputs (not even with
    --overwrite), nor a file that is not a page `batcher report` wrote (`HTML_MARKER` after its doctype)."""
    if not target.exists():
        return
    for path in inputs:
        same = False
        with contextlib.suppress(OSError):
            same = os.path.samefile(target, path)
        if same:
            raise OutputError(f"--html {target} is one of the files being reported ({path}): writing the page "
                              "would destroy it; choose another file for the charts")
    if overwrite:
        return
    head = b""
    with contextlib.suppress(OSError), open(target, "rb") as f:
        head = f.read(512)
    if HTML_MARKER.encode() not in head:
        raise OutputError(f"--html {target} already exists and is not a report page batcher wrote; choose another "
                          "file, or pass --overwrite to replace it")


def _report(args: argparse.Namespace) -> int:
    if args.html:
        _check_html_target(Path(args.html), _expand(args.outputs), args.overwrite)
    lf = scan_outputs(args.outputs)
    if args.prices:
        # As for `batcher run --prices`: the file's prices override the shipped table, model by model.
        from .plan import load_price_file

        lf = with_prices(lf, PriceTable.default().overridden(load_price_file(args.prices)))
    by = _split_by(args.by)
    print(render(lf, by, args.format, args.table))
    if args.html:
        page = html_report(lf, "batcher report: " + ", ".join(map(str, args.outputs)))
        try:
            Path(args.html).write_text(page, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"cannot write {args.html}: {exc.strerror or exc}") from None
        print(f"batcher: charts written to {args.html}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="usage, cost, latency and errors of output files",
        description="Per model (and --by columns): rows, ok, errors, cached, attempts per row, billed tokens, "
        "cost (rows without a price are counted as unpriced, never as free), latency p50/p95/p99 of ok "
        "non-cached calls; then errors by http_status and error_kind.",
    )
    p.add_argument("outputs", nargs="+", metavar="OUTPUT", help="output files (.parquet/.jsonl) or folders of them")
    p.add_argument("--by", action="append", metavar="COL",
                   help="also group by this output or kept input column (repeat, or comma-separate)")
    p.add_argument("--format", choices=("text", "csv", "json", "markdown"), default="text",
                   help="text: aligned table (default); csv: one table, its last row the total")
    p.add_argument("--table", choices=("all", "usage", "errors"), default="all",
                   help="which table to print (csv prints usage unless this says errors)")
    p.add_argument("--prices", metavar="FILE", help="recompute cost from tokens with this price table")
    p.add_argument("--html", metavar="FILE", help="also write charts (cost by model, latency) as one HTML file")
    p.add_argument("--overwrite", action="store_true",
                   help="let --html replace an existing file that is not a page batcher report wrote")
    p.set_defaults(func=_report)
