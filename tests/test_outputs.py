"""Outputs keep what they were given: every kept Arrow type round-trips, JSONL output is always valid JSON,
kept columns never clash, and an output path never replaces the input or a file batcher did not write."""

from __future__ import annotations

import decimal
import json
import math
import os
from dataclasses import dataclass
from datetime import date, time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

import batcher.sinks
from batcher import SpecError, parse_spec, run_job
from batcher.cli import main
from batcher.errors import OutputError
from batcher.gateway import Gateway, GatewayConfig, serve_in_thread
from batcher.sinks import RESULT_COLUMNS
from batcher.spec import RESULT_COLUMN_NAMES

from .conftest import options, write_jsonl

NAN, INF = float("nan"), float("inf")


@dataclass(frozen=True)
class Case:
    """A kept column's Arrow type, four values (one of them null), and what JSONL output writes for them."""

    name: str
    type: pa.DataType
    values: list[Any]
    json: list[Any]
    raw: bool = False  # values are the type's integer storage (nanoseconds and such), cast to the type

    def array(self) -> pa.Array:
        if not self.raw:
            return pa.array(self.values, type=self.type)
        storage = pa.int32() if self.type.bit_width == 32 else pa.int64()
        return pa.array(self.values, type=storage).cast(self.type)


PARIS_NS = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123456789Z
POINT = pa.struct([("x", pa.int8()), ("tag", pa.string())])

# Every Arrow type a Parquet input can hold (as read back: Parquet stores date64 as date32 and seconds
# timestamps as milliseconds, so those come back as the input reads them).
TYPES = [
    Case("int8", pa.int8(), [-128, None, 127, 0], [-128, None, 127, 0]),
    Case("int16", pa.int16(), [-32768, None, 32767, 0], [-32768, None, 32767, 0]),
    Case("int32", pa.int32(), [-(2**31), None, 2**31 - 1, 0], [-(2**31), None, 2**31 - 1, 0]),
    Case("int64", pa.int64(), [-(2**63), None, 2**63 - 1, 0], [-(2**63), None, 2**63 - 1, 0]),
    Case("uint8", pa.uint8(), [0, None, 255, 1], [0, None, 255, 1]),
    Case("uint16", pa.uint16(), [0, None, 65535, 1], [0, None, 65535, 1]),
    Case("uint32", pa.uint32(), [0, None, 2**32 - 1, 1], [0, None, 2**32 - 1, 1]),
    Case("uint64", pa.uint64(), [0, None, 2**64 - 1, 1], [0, None, 2**64 - 1, 1]),
    Case("float16", pa.float16(), [1.5, None, NAN, -INF], [1.5, None, None, None]),
    Case("float32", pa.float32(), [0.25, None, INF, NAN], [0.25, None, None, None]),
    Case("float64", pa.float64(), [0.1, None, -0.0, NAN], [0.1, None, -0.0, None]),
    Case("decimal128", pa.decimal128(10, 3), [decimal.Decimal("1234567.891"), None, decimal.Decimal("-0.001"),
                                              decimal.Decimal("0.000")], ["1234567.891", None, "-0.001", "0.000"]),
    Case("decimal256", pa.decimal256(40, 5), [decimal.Decimal("12345678901234567890123456789012345.12345"), None,
                                              decimal.Decimal("-1.5"), decimal.Decimal("0")],
         ["12345678901234567890123456789012345.12345", None, "-1.50000", "0.00000"]),
    Case("bool", pa.bool_(), [True, None, False, True], [True, None, False, True]),
    Case("string", pa.string(), ["héllo", None, "", '{"not": "parsed"}'], ["héllo", None, "", '{"not": "parsed"}']),
    Case("large_string", pa.large_string(), ["a\nb", None, "", "😀"], ["a\nb", None, "", "😀"]),
    Case("binary", pa.binary(), [b"\x00\xff", None, b"", b"abc"], ["AP8=", None, "", "YWJj"]),
    Case("large_binary", pa.large_binary(), [b"\x00\xff", None, b"", b"abc"], ["AP8=", None, "", "YWJj"]),
    Case("fixed_size_binary", pa.binary(2), [b"\x00\xff", None, b"ab", b"\xff\xff"], ["AP8=", None, "YWI=", "//8="]),
    Case("date32", pa.date32(), [date(2024, 2, 29), None, date(1, 1, 1), date(9999, 12, 31)],
         ["2024-02-29", None, "0001-01-01", "9999-12-31"]),
    Case("date64", pa.date64(), [date(2024, 2, 29), None, date(1970, 1, 1), date(1969, 12, 31)],
         ["2024-02-29", None, "1970-01-01", "1969-12-31"]),
    Case("time32_s", pa.time32("s"), [time(1, 2, 3), None, time(0, 0), time(23, 59, 59)],
         ["01:02:03.000", None, "00:00:00.000", "23:59:59.000"]),  # Parquet holds seconds as ms
    Case("time32_ms", pa.time32("ms"), [time(1, 2, 3, 4000), None, time(0, 0), time(23, 59, 59, 999000)],
         ["01:02:03.004", None, "00:00:00.000", "23:59:59.999"]),
    Case("time64_us", pa.time64("us"), [time(1, 2, 3, 4), None, time(0, 0), time(23, 59, 59, 999999)],
         ["01:02:03.000004", None, "00:00:00.000000", "23:59:59.999999"]),
    Case("time64_ns", pa.time64("ns"), [3_723_000_000_001, None, 0, 86_399_999_999_999],
         ["01:02:03.000000001", None, "00:00:00.000000000", "23:59:59.999999999"], raw=True),
    Case("timestamp_s", pa.timestamp("s"), [1_700_000_000, None, -1, 0],
         ["2023-11-14T22:13:20.000", None, "1969-12-31T23:59:59.000", "1970-01-01T00:00:00.000"], raw=True),
    Case("timestamp_ms", pa.timestamp("ms"), [1_700_000_000_123, None, -1, 0],
         ["2023-11-14T22:13:20.123", None, "1969-12-31T23:59:59.999", "1970-01-01T00:00:00.000"], raw=True),
    Case("timestamp_us", pa.timestamp("us"), [1_700_000_000_123_456, None, -1, 0],
         ["2023-11-14T22:13:20.123456", None, "1969-12-31T23:59:59.999999", "1970-01-01T00:00:00.000000"], raw=True),
    Case("timestamp_ns", pa.timestamp("ns"), [PARIS_NS, None, -1, 0],
         ["2023-11-14T22:13:20.123456789", None, "1969-12-31T23:59:59.999999999", "1970-01-01T00:00:00.000000000"],
         raw=True),
    Case("timestamp_s_utc", pa.timestamp("s", tz="UTC"), [1_700_000_000, None, -1, 0],
         ["2023-11-14T22:13:20.000Z", None, "1969-12-31T23:59:59.000Z", "1970-01-01T00:00:00.000Z"], raw=True),
    Case("timestamp_ms_offset", pa.timestamp("ms", tz="+05:30"), [1_700_000_000_123, None, -1, 0],
         ["2023-11-15T03:43:20.123+05:30", None, "1970-01-01T05:29:59.999+05:30", "1970-01-01T05:30:00.000+05:30"],
         raw=True),
    Case("timestamp_us_utc", pa.timestamp("us", tz="UTC"), [1_700_000_000_123_456, None, -1, 0],
         ["2023-11-14T22:13:20.123456Z", None, "1969-12-31T23:59:59.999999Z", "1970-01-01T00:00:00.000000Z"],
         raw=True),
    Case("timestamp_ns_paris", pa.timestamp("ns", tz="Europe/Paris"), [PARIS_NS, None, -1, 0],
         ["2023-11-14T23:13:20.123456789+01:00", None, "1970-01-01T00:59:59.999999999+01:00",
          "1970-01-01T01:00:00.000000000+01:00"], raw=True),
    Case("duration_s", pa.duration("s"), [90, None, -1, 0], ["PT90S", None, "-PT1S", "PT0S"], raw=True),
    Case("duration_ms", pa.duration("ms"), [1_500, None, -1, 0], ["PT1.5S", None, "-PT0.001S", "PT0S"], raw=True),
    Case("duration_us", pa.duration("us"), [86_400_000_001, None, -1, 0],
         ["PT86400.000001S", None, "-PT0.000001S", "PT0S"], raw=True),
    Case("duration_ns", pa.duration("ns"), [-1_500_000_001, None, 1, 0],
         ["-PT1.500000001S", None, "PT0.000000001S", "PT0S"], raw=True),
    Case("list", pa.list_(pa.int64()), [[1, None, 3], None, [], [2**62]], [[1, None, 3], None, [], [2**62]]),
    Case("large_list", pa.large_list(pa.string()), [["a", None], None, [], ["b"]], [["a", None], None, [], ["b"]]),
    Case("fixed_size_list", pa.list_(pa.int8(), 2), [[1, 2], None, [3, None], [0, 0]],
         [[1, 2], None, [3, None], [0, 0]]),
    Case("struct", POINT, [{"x": 1, "tag": "a"}, None, {"x": None, "tag": None}, {"x": -1, "tag": ""}],
         [{"x": 1, "tag": "a"}, None, {"x": None, "tag": None}, {"x": -1, "tag": ""}]),
    Case("map", pa.map_(pa.string(), pa.int64()), [[("a", 1), ("b", None)], None, [], [("a", 2), ("a", 3)]],
         [[["a", 1], ["b", None]], None, [], [["a", 2], ["a", 3]]]),
    Case("map_int_keys", pa.map_(pa.int32(), pa.binary()), [[(1, b"\x00")], None, [], [(-1, None)]],
         [[[1, "AA=="]], None, [], [[-1, None]]]),
    Case("dictionary", pa.dictionary(pa.int32(), pa.string()), ["low", None, "high", "low"],
         ["low", None, "high", "low"]),
    Case("null", pa.null(), [None, None, None, None], [None, None, None, None]),
    Case("nested", pa.list_(pa.struct([("at", pa.date32()), ("raw", pa.binary()), ("w", pa.float64())])),
         [[{"at": date(2024, 1, 2), "raw": b"\xff", "w": NAN}], None, [None], []],
         [[{"at": "2024-01-02", "raw": "/w==", "w": None}], None, [None], []]),
]


def _strict(line: str) -> Any:
    """JSON as RFC 8259 has it: NaN and Infinity are not JSON."""

    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Same values (NaN equal to NaN; a dictionary by its values, not its encoding)."""
    x, y = a.combine_chunks(), b.combine_chunks()
    if pa.types.is_dictionary(x.type):
        x, y = x.dictionary_decode(), y.dictionary_decode()
    if x.equals(y):
        return True
    shown = {"window": 1000, "container_window": 1000}
    return bool(x.type == y.type and x.to_string(**shown) == y.to_string(**shown))


def _spec(base_url: str, inp: Path, out: Path, **output: Any) -> dict[str, Any]:
    return {
        "name": "t",
        "input": {"path": str(inp), "id_column": "rid", "prompt": "Say {{p}}"},
        "output": {"path": str(out), **output},
        "endpoint": {"base_url": base_url, "api": "orq"},
        "request": {"model": "openai/gpt-4o-mini", "max_tokens": 8},
    }


@pytest.fixture(scope="module")
def every_type(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Parquet input with a column of every type, run once to Parquet and once to JSONL output."""
    d = tmp_path_factory.mktemp("types")
    columns = {"rid": pa.array([10, 11, 12, 13]), "p": pa.array(["a", "b", "c", "d"])}
    columns.update((case.name, case.array()) for case in TYPES)
    pq.write_table(pa.table(columns), d / "in.parquet")
    keep = [case.name for case in TYPES]
    with serve_in_thread(GatewayConfig()) as gw:
        for name in ("out.parquet", "out.jsonl"):
            result = run_job(parse_spec(_spec(gw.base_url, d / "in.parquet", d / name, keep_columns=keep)), options())
            assert result.status == "finished" and result.ok == 4
    return d


@pytest.mark.parametrize("case", TYPES, ids=lambda c: c.name)
def test_every_kept_type_round_trips_parquet_to_parquet(every_type: Path, case: Case) -> None:
    given = pq.read_table(every_type / "in.parquet").column(case.name)
    out = pq.read_table(every_type / "out.parquet")
    assert out.column("rid").to_pylist() == [10, 11, 12, 13]
    got = out.column(case.name)
    assert got.type == given.type
    assert _same(got, given), f"{case.name}: {got} != {given}"


@pytest.mark.parametrize("case", TYPES, ids=lambda c: c.name)
def test_every_kept_type_is_valid_json_in_jsonl_output(every_type: Path, case: Case) -> None:
    rows = [_strict(line) for line in (every_type / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["rid"] for r in rows] == [10, 11, 12, 13]
    got = [r[case.name] for r in rows]
    assert got == case.json
    # -0.0 == 0.0 in Python: the sign must survive too
    assert [math.copysign(1, v) if isinstance(v, float) else None for v in got] == [
        math.copysign(1, v) if isinstance(v, float) else None for v in case.json
    ]


def test_result_column_names_match_the_sink() -> None:
    assert set(RESULT_COLUMNS) == RESULT_COLUMN_NAMES


# -- JSONL inputs: kept values come back as given ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_jsonl_kept_values_come_back_as_given(make_spec, tmp_path: Path, fmt: str) -> None:
    """Mostly strings, one object, one number, one NaN: in the slice that holds the object, the strings stay
    strings (Parquet: the object as JSON text), and JSONL output gives every value back as written."""
    lines: list[Any] = [{"id": f"r{i}", "t": "x", "note": f"n{i}", "f": i / 2} for i in range(30)]
    lines[15]["note"] = {"a": [1, "b"]}
    lines[16]["note"] = 7
    lines[17]["note"] = None
    lines[18] = '{"id": "r18", "t": "x", "note": "n18", "f": NaN}'
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / f"o.{fmt}"
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{t}}"},
                                output={"path": str(out), "keep_columns": ["note", "f"], "row_group_size": 10}))
    assert run_job(spec, options()).ok == 30
    if fmt == "parquet":
        df = pq.read_table(out)
        notes = df.column("note").to_pylist()
        assert df.schema.field("note").type == pa.string()
        assert notes[:15] == [f"n{i}" for i in range(15)] and notes[18:] == [f"n{i}" for i in range(18, 30)]
        assert notes[15:18] == ['{"a":[1,"b"]}', "7", None]
        floats = df.column("f").to_pylist()
        assert math.isnan(floats[18]) and floats[19] == 9.5
    else:
        rows = [_strict(x) for x in out.read_text().splitlines()]
        assert [r["note"] for r in rows] == [line["note"] if isinstance(line, dict) else "n18" for line in lines]
        assert [r["f"] for r in rows] == [i / 2 if i != 18 else None for i in range(30)]


# -- keep_columns ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_kept_id_without_id_column_is_input_id(make_spec, tmp_path: Path, fmt: str) -> None:
    if fmt == "parquet":
        src = tmp_path / "in.parquet"
        pq.write_table(pa.table({"id": ["a", "b", "c"], "t": ["x", "y", "z"]}), src)
    else:
        src = write_jsonl(tmp_path / "in.jsonl", [{"id": k, "t": t} for k, t in zip("abc", "xyz", strict=True)])
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": None, "prompt": "{{t}}"},
                                output={"path": str(tmp_path / "o.parquet"), "keep_columns": ["id", "t"]}))
    run_job(spec, options())
    out = pq.read_table(tmp_path / "o.parquet")
    assert out.column("id").to_pylist() == [0, 1, 2]  # row positions
    assert out.column("input_id").to_pylist() == ["a", "b", "c"]
    assert out.column("t").to_pylist() == ["x", "y", "z"]


def _write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


CLASHES = [
    (["rating", "rating"], "review_id", "'rating' is listed twice"),
    (["text", "input_text"], "review_id", "'text' and 'input_text' would both be written as the output column 'input_text'"),
    (["id", "input_id"], None, "'id' and 'input_id' would both be written as the output column 'input_id'"),
]


@pytest.mark.parametrize(("keep", "id_column", "message"), CLASHES)
def test_kept_columns_that_clash_are_refused_before_any_call(
    make_spec, gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    keep: list[str], id_column: str | None, message: str,
) -> None:
    raw = make_spec(input={"id_column": id_column}, output={"keep_columns": keep})
    with pytest.raises(SpecError) as err:
        parse_spec(raw)
    assert f"\n  output.keep_columns: {message}" in str(err.value)  # the field first, as every spec error
    path = _write_spec(tmp_path / "job.yaml", raw)
    assert main(["validate", str(path)]) == 2
    assert main(["run", str(path), "--quiet"]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr
    assert gateway.stats.total == 0


def test_kept_input_id_column_is_not_a_clash(make_spec) -> None:
    spec = parse_spec(make_spec(output={"keep_columns": ["review_id", "product", "review_id"]}))
    assert spec.output.keep_columns == ["review_id", "product", "review_id"]


# -- output path safety ------------------------------------------------------------------------------------


def _small_parquet(path: Path, n: int = 5) -> Path:
    pq.write_table(pa.table({"rid": list(range(n)), "p": [f"p{i}" for i in range(n)]}), path)
    return path


@pytest.mark.parametrize("spelling", ["relative", "symlink", "absolute"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_that_is_the_input_is_refused(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    spelling: str, overwrite: bool,
) -> None:
    inp = _small_parquet(tmp_path / "data.parquet")
    before = inp.read_bytes()
    monkeypatch.chdir(tmp_path)
    if spelling == "relative":
        out = "./sub/../data.parquet"
        (tmp_path / "sub").mkdir()
    elif spelling == "symlink":
        os.symlink(inp, tmp_path / "link.parquet")
        out = str(tmp_path / "link.parquet")
    else:
        out = str(inp)
    spec = _spec(gateway.base_url, inp, Path(out))
    spec["output"]["path"] = out
    path = _write_spec(tmp_path / "job.yaml", spec)
    code = main(["run", str(path), "--quiet", *(["--overwrite"] if overwrite else [])])
    assert code == 4
    assert "is the input file" in capsys.readouterr().err
    assert inp.read_bytes() == before
    assert gateway.stats.total == 0


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_existing_file_not_written_by_batcher_needs_overwrite(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    inp = _small_parquet(tmp_path / "in.parquet")
    out = tmp_path / f"precious.{suffix}"
    if suffix == "jsonl":
        out.write_text('{"mine": 1}\n')
    else:
        pq.write_table(pa.table({"mine": [1]}), out)
    before = out.read_bytes()
    path = _write_spec(tmp_path / "job.yaml", _spec(gateway.base_url, inp, out))
    assert main(["run", str(path), "--quiet"]) == 4
    err = capsys.readouterr().err
    assert f"the output {out} already exists and was not written by batcher" in err and "--overwrite" in err
    assert out.read_bytes() == before
    assert gateway.stats.total == 0
    assert main(["run", str(path), "--quiet", "--overwrite"]) == 0
    assert gateway.stats.total == 5
    assert pq.read_table(out).num_rows == 5 if suffix == "parquet" else len(out.read_text().splitlines()) == 5


def test_batcher_output_reruns_without_overwrite(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = _small_parquet(tmp_path / "in.parquet")
    out = tmp_path / "o.parquet"
    path = _write_spec(tmp_path / "job.yaml", _spec(gateway.base_url, inp, out))
    assert main(["run", str(path), "--quiet"]) == 0
    assert main(["run", str(path), "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert main(["run", str(path), "--quiet", "--fresh"]) == 0
    assert gateway.stats.total == 10
    # The state folder cleaned away: the Parquet footer still says batcher wrote it
    assert b"batcher" in (pq.read_schema(out).metadata or {})
    for name in ("run.json", "journal.jsonl"):
        (batcher.sinks.state_dir_for(out) / name).unlink()
    assert main(["run", str(path), "--quiet"]) == 0
    assert gateway.stats.total == 15


def test_jsonl_output_without_its_state_folder_is_not_replaced(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = _small_parquet(tmp_path / "in.parquet")
    out = tmp_path / "o.jsonl"
    path = _write_spec(tmp_path / "job.yaml", _spec(gateway.base_url, inp, out))
    assert main(["run", str(path), "--quiet"]) == 0
    (batcher.sinks.state_dir_for(out) / "run.json").unlink()
    assert main(["run", str(path), "--quiet"]) == 4
    assert "not written by batcher" in capsys.readouterr().err
    assert gateway.stats.total == 5


def test_failed_final_write_leaves_no_temp_file(
    make_spec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = parse_spec(make_spec(output={"path": str(tmp_path / "out" / "o.parquet")}))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("broken on purpose")

    monkeypatch.setattr(batcher.sinks, "_table_from_lines", broken)
    for _ in range(2):
        with pytest.raises(ValueError, match="broken on purpose"):
            run_job(spec, options(limit=3))
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".o.parquet.batcher"]



def test_kept_columns_are_found_by_id_when_the_input_moved(tmp_path: Path) -> None:
    """Journal positions from before the input was edited: the ids at those positions no longer match, so the
    rows are found by id (an id gone from the input gives nulls), not taken from whatever row is there now."""
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"rid": ["new", "a", "b", "c"], "v": [b"\x00", b"A", b"B", b"C"]}), src,
                   row_group_size=2)
    cols = batcher.sinks.InputColumns(src, ["v"], "rid")
    # positions as they were before "new" was prepended; "gone" was deleted since
    got = cols.take(pa.array([0, 1, 2, 3]), pa.array(["a", "b", "c", "gone"]))
    assert got.column_names == ["v"] and got.column("v").to_pylist() == [b"A", b"B", b"C", None]
    # in step again: by position, across the input's row groups, and past its end as nulls
    assert cols.take(pa.array([1, 3, 7]), pa.array(["a", "c", "x"])).column("v").to_pylist() == [b"A", b"C", None]
    positional = batcher.sinks.InputColumns(src, ["v"], None)
    assert positional.take(pa.array([2, 3]), None).column("v").to_pylist() == [b"B", b"C"]
    assert positional.take(pa.array([0]), None).column("v").to_pylist() == [b"\x00"]  # back to the start


def test_kept_jsonl_values_are_found_by_id_when_the_input_moved(tmp_path: Path) -> None:
    """The same for a JSONL input's kept values, read back a line at a time (`KeptValues`), as given: a line
    that is not an object, or is not JSON, has none."""
    from batcher.sources import Source
    from batcher.spec import InputSpec

    src = tmp_path / "in.jsonl"
    src.write_text('{"rid": "new", "v": 0}\n\n{"rid": "a", "v": {"x": [1]}}\nnot json\n{"rid": "b", "v": "B"}\n'
                   '[1, 2]\n{"rid": "c", "v": null}\n')
    source = Source(InputSpec(path=src, id_column="rid", prompt="{{v}}"), ["v"])
    cols = batcher.sinks.KeptValues(lambda: source.kept_rows(["v"]), ["v"], {"v": pa.string()},
                                    all_ids=lambda: source.ids(pa.string()))
    # positions as they were before "new" was prepended; "gone" was deleted since
    assert cols.values(pa.array([0, 2, 4]), pa.array(["a", "b", "c"])) == {"v": [{"x": [1]}, "B", None]}
    got = cols.take(pa.array([0, 1, 2, 3]), pa.array(["a", "b", "c", "gone"]))
    assert got.column("v").to_pylist() == ['{"x":[1]}', "B", None, None]  # typed: mixed values as JSON text
    # in step again: by position (a blank line is no row), and past the input's end as nulls
    assert cols.values(pa.array([1, 3, 9]), pa.array(["a", "b", "x"])) == {"v": [{"x": [1]}, "B", None]}
    positional = batcher.sinks.KeptValues(lambda: source.kept_rows(["v"]), ["v"], {"v": pa.string()})
    assert positional.values(pa.array([2, 4]), None) == {"v": [None, None]}  # not JSON; not an object
    assert positional.values(pa.array([0]), None) == {"v": [0]}  # back to the start
    assert positional.reads == 5 + 1


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_jsonl_integer_beyond_int64_is_kept(make_spec, tmp_path: Path, fmt: str) -> None:
    big = 2**70
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "t": "x", "n": big if i == 1 else i} for i in range(3)])
    out = tmp_path / f"o.{fmt}"
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{t}}"},
                                output={"path": str(out), "keep_columns": ["n"]}))
    assert run_job(spec, options()).ok == 3
    if fmt == "parquet":
        assert pq.read_table(out).column("n").to_pylist() == ["0", str(big), "2"]  # as JSON text
    else:
        assert [_strict(x)["n"] for x in out.read_text().splitlines()] == [0, big, 2]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_jsonl_kept_lone_surrogate(make_spec, tmp_path: Path, fmt: str) -> None:
    """`"\\ud83d"` is valid JSON (a truncated emoji): JSONL output gives it back escaped, as given; Parquet
    strings are UTF-8, so there it is U+FFFD. Either way the run finishes."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "t": "x", "s": "ok\\ud83d"}\n{"id": "b", "t": "y", "s": {"e": "\\ud83d"}}\n')
    out = tmp_path / f"o.{fmt}"
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{t}}"},
                                output={"path": str(out), "keep_columns": ["s"]}))
    assert run_job(spec, options()).ok == 2
    if fmt == "parquet":
        assert pq.read_table(out).column("s").to_pylist() == ["ok\ufffd", '{"e":"\ufffd"}']
    else:
        assert [_strict(x)["s"] for x in out.read_text().splitlines()] == ["ok\ud83d", {"e": "\ud83d"}]


def test_an_output_short_of_the_journal_is_not_finished(make_spec, gateway: Gateway, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard behind every final write: fewer rows written than answered is exit 4, never "finished" (which
    would make the rerun a no-op over an incomplete file). The loss is injected by a final write that reads a
    journal missing its last line, as a merge that missed a shard would; the rerun writes everything, no call."""
    import batcher.runner as runner_mod

    real = runner_mod.finalize

    def lossy(journal: Path, output: Path, *a: object, **kw: object) -> int:
        short = journal.with_name("short.jsonl")
        short.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[:-1]))
        return real(short, output, *a, **kw)

    spec = parse_spec(make_spec())
    monkeypatch.setattr(runner_mod, "finalize", lossy)
    with pytest.raises(OutputError, match=r"wrote 299 rows .* but 300 are answered"):
        run_job(spec, options())
    monkeypatch.setattr(runner_mod, "finalize", real)
    again = run_job(spec, options())
    assert again.status == "finished" and again.skipped == 300 and again.ok == 0
    assert pq.read_metadata(spec.output.path).num_rows == 300
    assert gateway.stats.total == 300
