"""Input values of every type in templates and `orq.inputs`, row errors that name their line, a resumed run whose
input was edited, and OpenAI Batch files' edge cases: the input promises an outside tester tried to break."""

from __future__ import annotations

import datetime as dt
import json
import math
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher import parse_spec, run_job
from batcher.cli import main as cli_main
from batcher.client import Endpoint, WorkerClient
from batcher.gateway import Gateway
from batcher.plan import make_plan
from batcher.sinks import json_values
from batcher.sources import Source
from batcher.spec import InputSpec
from batcher.templating import Template, to_text

from .conftest import options, write_jsonl

NS = 1_700_000_000_000_000_001  # pandas' default timestamp[ns]: one nanosecond past a whole second


def _strict(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} in a body")

    return json.loads(text, parse_constant=refuse)


def _rendered(tmp_path: Path, column: pa.Array, template: str = "v={{v}}") -> tuple[str | None, str | None]:
    path = tmp_path / "one.parquet"
    pq.write_table(pa.table({"v": column}), path)
    source = Source(InputSpec(path=path, prompt=template), [])
    source.check()
    row = next(iter(source.batches()))[0]
    return row.prompt, row.error


# The template mapping (README, "The job spec"): the JSONL output's, with a top-level string unquoted.
TEMPLATE_TABLE: list[tuple[str, pa.Array, str]] = [
    ("int8", pa.array([-7], pa.int8()), "-7"),
    ("uint64", pa.array([2**64 - 1], pa.uint64()), str(2**64 - 1)),
    ("float64", pa.array([0.5]), "0.5"),
    ("float32", pa.array([1.5], pa.float32()), "1.5"),
    ("bool", pa.array([True]), "true"),
    ("string", pa.array(["plain"]), "plain"),
    ("binary", pa.array([b"\x00\xff"]), "AP8="),
    ("fixed_binary", pa.array([b"ab"], pa.binary(2)), "YWI="),
    ("decimal", pa.array([Decimal("1234.500")], pa.decimal128(7, 3)), "1234.500"),
    ("date32", pa.array([dt.date(2024, 2, 29)]), "2024-02-29"),
    ("time32[ms]", pa.array([3_723_004], pa.time32("ms")), "01:02:03.004"),
    ("time64[ns]", pa.array([3_723_004_000_001], pa.time64("ns")), "01:02:03.004000001"),
    # Parquet has no seconds unit: a timestamp[s] column is stored, and read back, in milliseconds
    ("timestamp[s]", pa.array([1_700_000_000], pa.timestamp("s")), "2023-11-14T22:13:20.000"),
    ("timestamp[ns]", pa.array([NS], pa.timestamp("ns")), "2023-11-14T22:13:20.000000001"),
    ("timestamp[ns,UTC]", pa.array([NS], pa.timestamp("ns", "UTC")), "2023-11-14T22:13:20.000000001Z"),
    ("timestamp[us,+01:00]", pa.array([1_700_000_000_000_000], pa.timestamp("us", "+01:00")),
     "2023-11-14T23:13:20.000000+01:00"),
    ("duration[s]", pa.array([3600], pa.duration("s")), "PT3600S"),
    ("duration[ns]", pa.array([-1], pa.duration("ns")), "-PT0.000000001S"),
    ("list<float>", pa.array([[1.5, math.nan, math.inf]]), "[1.5, null, null]"),
    ("list<date>", pa.array([[dt.date(2024, 1, 2)]]), '["2024-01-02"]'),
    ("struct", pa.array([{"a": 1, "b": b"\x01"}]), '{"a": 1, "b": "AQ=="}'),
    ("map", pa.array([[("k", 1)]], pa.map_(pa.string(), pa.int64())), '[["k", 1]]'),
    ("dictionary", pa.array(["cat"]).dictionary_encode(), "cat"),
]


@pytest.mark.parametrize(("column", "expected"), [t[1:] for t in TEMPLATE_TABLE], ids=[t[0] for t in TEMPLATE_TABLE])
def test_every_type_renders_by_the_one_documented_mapping(tmp_path: Path, column: pa.Array, expected: str) -> None:
    assert _rendered(tmp_path, column) == (f"v={expected}", None)


# Python values (what a JSONL row, a Jinja template or a caller of to_text hands over) map as Arrow's do.
PYTHON_TABLE: list[tuple[Any, pa.DataType, str]] = [
    (b"\x00\xff", pa.binary(), "AP8="),
    (Decimal("1234.500"), pa.decimal128(7, 3), "1234.500"),
    (dt.date(2024, 2, 29), pa.date32(), "2024-02-29"),
    (dt.time(1, 2, 3, 4000), pa.time64("us"), "01:02:03.004000"),
    (dt.datetime(2023, 11, 14, 22, 13, 20, 5, tzinfo=dt.UTC), pa.timestamp("us", "UTC"), "2023-11-14T22:13:20.000005Z"),
    (dt.timedelta(seconds=-1.5), pa.duration("us"), "-PT1.5S"),
    (dt.timedelta(hours=1), pa.duration("s"), "PT3600S"),
    ([1.5, math.nan, b"a"], pa.list_(pa.binary()), ""),  # mixed: no Arrow twin; checked below
    (True, pa.bool_(), "true"),
    (0.5, pa.float64(), "0.5"),
]


@pytest.mark.parametrize(("value", "arrow_type", "expected"), PYTHON_TABLE[:7] + PYTHON_TABLE[8:],
                         ids=[type(v).__name__ + str(i) for i, (v, _, _) in enumerate(PYTHON_TABLE) if i != 7])
def test_python_values_render_like_their_arrow_twins(value: Any, arrow_type: pa.DataType, expected: str) -> None:
    assert to_text(value) == expected
    assert to_text(json_values(pa.array([value], arrow_type))[0]) == expected  # the Arrow path: the same text
    for suffix in ("", "{% if true %}{% endif %}"):  # the plain path and Jinja's
        assert Template("{{v}}" + suffix).render({"v": value}) == expected


def test_python_lists_map_their_values_and_nan_inside_is_null() -> None:
    assert to_text([1.5, math.nan, b"a", {"d": dt.date(2024, 1, 2)}]) == '[1.5, null, "YQ==", {"d": "2024-01-02"}]'


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_top_level_nan_or_infinity_is_an_error_row_naming_the_variable(tmp_path: Path, value: float) -> None:
    prompt, error = _rendered(tmp_path, pa.array([value]))
    assert prompt is None and error is not None
    assert error.startswith("row 0: template variable {{v}} is ") and "cannot show" in error


def test_jsonl_nan_and_1e400_are_error_rows_too(make_spec, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", ['{"id": 0, "f": 1e400}', '{"id": 1, "f": NaN}', '{"id": 2, "f": 2}'])
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "f={{f}}"},
                                output={"path": str(tmp_path / "o.jsonl")}))
    result = run_job(spec, options())
    assert (result.ok, result.errors) == (1, 2)
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows[0]["error"] == "line 1: template variable {{f}} is inf in this row, a number a prompt cannot show " \
                               "(JSON has no spelling for it)"
    assert rows[1]["error"].startswith("line 2: template variable {{f}} is nan")


def test_nanosecond_temporals_in_a_template_and_inputs_run_and_plan(make_spec, gateway: Gateway,
                                                                    tmp_path: Path) -> None:
    src = tmp_path / "ns.parquet"
    pq.write_table(pa.table({
        "id": ["a", "b"],
        "ts": pa.array([NS, NS + 1], pa.timestamp("ns")),
        "dur": pa.array([1_500_000_001, 5], pa.duration("ns")),
        "tod": pa.array([1, 3_600_000_000_000], pa.time64("ns")),
    }), src)
    spec = parse_spec(make_spec(
        input={"path": str(src), "id_column": "id", "prompt": "at {{ts}} for {{dur}} from {{tod}}",
               "inputs_columns": ["ts", "dur", "tod"], "batch_size": 1},
        output={"path": str(tmp_path / "o.parquet"), "keep_columns": ["ts"]},
    ))
    plan = make_plan(spec)
    assert plan.to_send == 2 and plan.input_errors == 0
    result = run_job(spec, options())
    assert result.exit_code == 0 and (result.ok, result.errors) == (2, 0)
    sent = sorted((b["body"] for b in gateway.stats.bodies), key=lambda b: b["prompt"])
    assert [b["prompt"] for b in sent] == [
        "at 2023-11-14T22:13:20.000000001 for PT1.500000001S from 00:00:00.000000001",
        "at 2023-11-14T22:13:20.000000002 for PT0.000000005S from 01:00:00.000000000",
    ]
    assert sent[0]["orq"]["inputs"] == {"ts": "2023-11-14T22:13:20.000000001", "dur": "PT1.500000001S",
                                        "tod": "00:00:00.000000001"}
    assert pl.read_parquet(tmp_path / "o.parquet")["ts"].dtype == pl.Datetime("ns")


def test_inputs_values_are_json_safe_and_every_body_is_strict_json(make_spec, gateway: Gateway,
                                                                   tmp_path: Path) -> None:
    src = tmp_path / "types.parquet"
    pq.write_table(pa.table({
        "id": [0, 1],
        "text": ["x", "y"],
        "dec": pa.array([Decimal("1234.500"), None], pa.decimal128(7, 3)),
        "bin": pa.array([b"\x00\xff", b""]),
        "day": pa.array([dt.date(2024, 2, 29), dt.date(1970, 1, 1)]),
        "tod": pa.array([3_723_004, 0], pa.time32("ms")),
        "ts": pa.array([NS, 0], pa.timestamp("ns", "UTC")),
        "f32": pa.array([math.inf, 1.5], pa.float32()),
        "f64": pa.array([math.nan, -math.inf]),
        "nested": pa.array([[math.nan, 1.0], []]),
    }), src)
    columns = ["dec", "bin", "day", "tod", "ts", "f32", "f64", "nested"]
    spec = parse_spec(make_spec(
        input={"path": str(src), "id_column": "id", "prompt": "{{text}}", "inputs_columns": columns},
        output={"path": str(tmp_path / "o.jsonl"), "keep_columns": columns},
    ))
    result = run_job(spec, options())
    # the gateway parses bodies as strict JSON: a NaN or Infinity in one would have made a 400 and an error row
    assert (result.ok, result.errors) == (2, 0)
    sent = {b["body"]["prompt"]: b["body"]["orq"]["inputs"] for b in gateway.stats.bodies}
    assert sent["x"] == {"dec": "1234.500", "bin": "AP8=", "day": "2024-02-29", "tod": "01:02:03.004",
                         "ts": "2023-11-14T22:13:20.000000001Z", "f32": None, "f64": None, "nested": [None, 1.0]}
    assert sent["y"] == {"dec": None, "bin": "", "day": "1970-01-01", "tod": "00:00:00.000", "ts": "1970-01-01T00:00:00.000000000Z",
                         "f32": 1.5, "f64": None, "nested": []}
    # the same mapping as the JSONL output of the same values
    out = [_strict(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [{c: r[c] for c in columns} for r in out] == [sent["x"], sent["y"]]


def test_jsonl_infinities_in_inputs_reach_the_wire_as_null(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", ['{"id": 0, "t": "a", "f": 1e400, "g": [NaN, 2]}'])
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{t}}",
                                       "inputs_columns": ["f", "g"]}))
    assert run_job(spec, options()).ok == 1
    assert gateway.stats.bodies[0]["body"]["orq"]["inputs"] == {"f": None, "g": [None, 2]}


def test_the_client_never_sends_nan() -> None:
    """The last guard: a body with a NaN is a bug upstream (sources map them to null), never a non-JSON body."""
    client = WorkerClient(Endpoint.make("http://127.0.0.1:9", "orq", None, {}))

    async def send() -> None:
        await client.complete({"prompt": "x", "temperature": math.nan}, stream=False, deadline_s=1)

    with pytest.raises(ValueError, match="JSON compliant"):
        anyio.run(send)


# ------------------------------------------------------------------------------------- row errors name their line


def test_every_row_error_from_jsonl_names_its_line(make_spec, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": 0, "p": "fine", "g": 1},
        "",  # a blank line: skipped, but counted in line numbers
        {"id": 1, "p": "   ", "g": 1},
        {"id": 2, "p": 7, "g": 1},
        {"id": 3, "p": "much too long", "g": 1},
        {"id": 4, "p": "fine", "g": None},
    ])
    spec = make_spec(input={"path": str(src), "id_column": "id", "prompt": None, "prompt_column": "p",
                            "max_prompt_chars": 5},
                     output={"path": str(tmp_path / "o.jsonl")})
    run_job(parse_spec(spec), options())
    errors = [json.loads(x)["error"] for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert errors == [None, "line 3: prompt is empty", "line 4: prompt column 'p' is not a string in this row",
                      "line 5: prompt is 13 characters, over input.max_prompt_chars (5)", None]
    spec["input"].update(prompt="{{p}} {{g}}", prompt_column=None)
    spec["output"]["path"] = str(tmp_path / "o2.jsonl")
    run_job(parse_spec(spec), options())
    errors = [json.loads(x)["error"] for x in (tmp_path / "o2.jsonl").read_text().splitlines()]
    assert errors[5 - 1] == "line 6: template variable {{g}} is null in this row"


def test_every_row_error_from_parquet_names_its_row_position(make_spec, tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "p": ["ok", "", None]}), src)
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{p}}"},
                                output={"path": str(tmp_path / "o.jsonl")}))
    run_job(spec, options())
    errors = [json.loads(x)["error"] for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert errors == [None, "row 1: prompt is empty", "row 2: template variable {{p}} is null in this row"]


def test_null_ids_are_refused_naming_their_lines(make_spec, gateway: Gateway, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "t": "a"}, {"t": "b"}, {"id": None, "t": "c"}])
    path = tmp_path / "job.json"
    path.write_text(json.dumps(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{t}}"})))
    assert cli_main(["run", str(path), "--quiet"]) == 3
    assert "2 row(s) have no id 'id' (line 2, 3)" in capsys.readouterr().err
    assert gateway.stats.total == 0


# ------------------------------------------------------------------------------------- resume of an edited input


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_a_resumed_run_follows_the_edited_inputs_order_and_drops_gone_ids(make_spec, gateway: Gateway,
                                                                          tmp_path: Path, fmt: str) -> None:
    def write(rows: list[tuple[str, str]]) -> Path:
        if fmt == "parquet":
            path = tmp_path / "in.parquet"
            pq.write_table(pa.table({"k": [k for k, _ in rows], "t": [t for _, t in rows]}), path)
            return path
        if fmt == "csv":
            path = tmp_path / "in.csv"
            path.write_text("k,t\n" + "".join(f"{k},{t}\n" for k, t in rows))
            return path
        return write_jsonl(tmp_path / "in.jsonl", [{"k": k, "t": t} for k, t in rows])

    rows = [(f"k{i}", f"text {i}") for i in range(6)]
    src = write(rows)
    out = tmp_path / f"o.{'jsonl' if fmt == 'csv' else fmt}"
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "k", "prompt": "{{t}}"},
                                output={"path": str(out), "keep_columns": ["t"]}))
    assert run_job(spec, options(limit=3)).ok == 3  # k0, k1, k2
    # prepend k9, edit k1, delete k2 (answered) and k4 (not)
    edited = [("k9", "new"), rows[0], ("k1", "edited"), rows[3], rows[5]]
    write(edited)
    sent_before = gateway.stats.total
    result = run_job(spec, options())
    assert result.exit_code == 0 and result.ok == 3 and result.skipped == 2 and result.dropped == 1
    assert "1 answers for ids no longer in the input were dropped" in result.summary()
    assert gateway.stats.total - sent_before == 3  # k9, k3, k5: k1 keeps its earlier answer (ids name rows)
    df = pl.read_parquet(out) if fmt == "parquet" else pl.read_ndjson(out)
    assert df["k"].to_list() == ["k9", "k0", "k1", "k3", "k5"]  # the input's order as it is now
    assert df["t"].to_list() == ["new", "text 0", "edited", "text 3", "text 5"]  # kept: the input's values now
    assert (df["status"] == "ok").all()
    # and again: a finished job on an unchanged input is a no-op, in the same order
    assert run_job(spec, options()).status == "nothing_to_do"


# ------------------------------------------------------------------------------------- OpenAI Batch files


def _batch_spec(make_spec, src: Path, out: Path) -> dict[str, Any]:
    return make_spec(
        input={"path": str(src), "format": "openai_batch", "id_column": None, "prompt": None},
        output={"path": str(out), "format": "openai_batch"},
        endpoint={"api": "openai"},
    )


def _line(cid: Any, **body: Any) -> dict[str, Any]:
    line = {"method": "POST", "url": "/v1/completions", "body": {"prompt": "hi", **body}}
    if cid is not None:
        line["custom_id"] = cid
    return line


def test_an_openai_batch_line_without_custom_id_is_refused_naming_it(make_spec, gateway: Gateway, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    src = write_jsonl(tmp_path / "b.jsonl", [_line("a"), _line(None)])
    path = tmp_path / "job.json"
    path.write_text(json.dumps(_batch_spec(make_spec, src, tmp_path / "o.jsonl")))
    assert cli_main(["run", str(path), "--quiet"]) == 3
    assert "1 line(s) have no custom_id (line 2)" in capsys.readouterr().err
    assert gateway.stats.total == 0


def test_openai_batch_malformed_lines_and_unknown_body_keys_are_error_rows(make_spec, gateway: Gateway,
                                                                          tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "b.jsonl", [_line("a"), "{not json", _line("c", temprature=1),
                                             _line("d", temperature=9)])
    out = tmp_path / "o.jsonl"
    result = run_job(parse_spec(_batch_spec(make_spec, src, out)), options())
    assert (result.ok, result.errors) == (1, 3)
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["custom_id"] for g in got] == ["a", None, "c", "d"]  # a malformed line has no custom_id: null
    assert got[1]["error"]["message"].startswith("line 2: not valid JSON")
    assert got[2]["error"]["message"] == ("line 3: body.temprature: unknown key (OpenAI batch bodies take the "
                                          "request fields of the spec)")
    assert got[3]["error"]["message"].startswith("line 4: body.temperature: Input should be less than or equal to 2")
    assert gateway.stats.total == 1


def test_duplicate_custom_ids_are_worded_for_batch_files(make_spec, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = write_jsonl(tmp_path / "b.jsonl", [_line("a"), _line("a")])
    path = tmp_path / "job.json"
    path.write_text(json.dumps(_batch_spec(make_spec, src, tmp_path / "o.jsonl")))
    assert cli_main(["run", str(path), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "duplicate custom_id values, e.g. ['a']" in err and "id_column" not in err


def test_a_chat_openai_batch_body_is_checked_like_the_chat_request_fields(make_spec, gateway: Gateway,
                                                                          tmp_path: Path) -> None:
    chat = {"role": "user", "content": "hi"}
    src = write_jsonl(tmp_path / "b.jsonl", [
        {"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": [chat]}},
        {"custom_id": "b", "url": "/v1/chat/completions", "body": {"messages": [chat], "temprature": 1}},
    ])
    out = tmp_path / "o.jsonl"
    spec = parse_spec(make_spec(input={"path": str(src), "format": "openai_batch", "id_column": None, "prompt": None},
                                output={"path": str(out), "format": "openai_batch"}, request={"max_tokens": None}))
    result = run_job(spec, options())
    assert (result.ok, result.errors) == (1, 1) and gateway.stats.total == 1
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert got[1]["error"]["message"].startswith("line 2: body.temprature: unknown key")


def test_chat_rows_name_their_row_and_send_json_safe_inputs(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "x": [1.5, math.nan], "day": [dt.date(2024, 2, 29)] * 2}), src)
    spec = parse_spec(make_spec(
        input={"path": str(src), "id_column": "id", "prompt": None,
               "messages": [{"role": "user", "content": "x={{x}} on {{day}}"}], "inputs_columns": ["x", "day"]},
        output={"path": str(tmp_path / "o.jsonl")}, request={"max_tokens": None}))
    result = run_job(spec, options())
    assert (result.ok, result.errors) == (1, 1)
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows[1]["error"].startswith("row 1: ") and "{{x}}" in rows[1]["error"]
    body = gateway.stats.bodies[0]["body"]
    assert body["messages"][0]["content"] == "x=1.5 on 2024-02-29"
    assert body["orq"]["inputs"] == {"x": 1.5, "day": "2024-02-29"}


def test_a_finished_job_whose_ids_were_replaced_is_not_a_no_op(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"k": f"k{i}", "t": f"text {i}"} for i in range(3)])
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "k", "prompt": "{{t}}"},
                                output={"path": str(tmp_path / "o.parquet")}))
    assert run_job(spec, options()).status == "finished"
    # same row count, one id replaced: run.json says finished, but k7 was never asked
    write_jsonl(src, [{"k": "k0", "t": "text 0"}, {"k": "k7", "t": "new"}, {"k": "k2", "t": "text 2"}])
    plan = make_plan(spec)
    assert (plan.done, plan.to_send) == (2, 1)
    result = run_job(spec, options())
    assert result.status == "finished" and (result.ok, result.skipped, result.dropped) == (1, 2, 1)
    assert pl.read_parquet(tmp_path / "o.parquet")["k"].to_list() == ["k0", "k7", "k2"]


def test_csv_row_errors_name_their_row_position(make_spec, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text('id,p\na,"two\nlines"\nb,\n')
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{p}}"},
                                output={"path": str(tmp_path / "o.jsonl")}))
    run_job(spec, options())
    errors = [json.loads(x)["error"] for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert errors[0] is None and errors[1] is not None and errors[1].startswith("row 1: ")


def test_answers_dropped_for_gone_ids_still_count_against_the_jobs_budget(make_spec, tmp_path: Path) -> None:
    from batcher.budget import fold_spend
    from batcher.sinks import state_dir_for

    src = write_jsonl(tmp_path / "in.jsonl", [{"k": f"k{i}", "t": f"text {i}"} for i in range(6)])
    out = tmp_path / "o.jsonl"
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "k", "prompt": "{{t}}"},
                                output={"path": str(out)}, limits={"max_cost_usd": 100.0},
                                prices={"openai/gpt-4o-mini": {"prompt": 1000, "completion": 1000}}))
    first = run_job(spec, options(limit=3))
    spent_first = sum(json.loads(x)["cost_usd"] for x in out.read_text().splitlines())
    assert first.ok == 3 and spent_first > 0
    write_jsonl(src, [{"k": f"k{i}", "t": f"text {i}"} for i in range(3, 6)])  # k0..k2, all answered, gone
    second = run_job(spec, options())
    assert (second.ok, second.dropped) == (3, 3)
    spent_second = sum(json.loads(x)["cost_usd"] for x in out.read_text().splitlines())
    assert fold_spend(state_dir_for(out)).spent == pytest.approx(spent_first + spent_second)
