"""CSV and TSV inputs: the same id, template, duplicate and bad-row rules as Parquet and JSONL, read in blocks."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from batcher import parse_spec, run_job
from batcher.cli import main as cli_main
from batcher.gateway import Gateway

from .conftest import options


def _csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    buf = io.StringIO()
    csv.writer(buf, delimiter=delimiter, lineterminator="\n").writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    return path


def _spec(make_spec: Any, src: Path, **input_: Any) -> Any:
    return parse_spec(make_spec(
        input={"path": str(src), "id_column": "id", "prompt": "Label: {{text}}", **input_},
        output={"keep_columns": ["rating"]},
    ))


def _rows(n: int) -> list[list[str]]:
    return [["id", "text", "rating"]] + [[f"{i:03d}", f"review number {i}", str(i % 5)] for i in range(n)]


def test_a_csv_input_runs_like_any_other(make_spec: Any, gateway: Gateway, tmp_path: Path) -> None:
    spec = _spec(make_spec, _csv(tmp_path / "in.csv", _rows(50)))
    result = run_job(spec, options())
    assert result.status == "finished" and result.ok == 50 and gateway.stats.total == 50
    df = pl.read_parquet(spec.output.path)
    # ids and kept columns are text, as written: 007 stays 007
    assert df["id"].to_list() == [f"{i:03d}" for i in range(50)]
    assert df["rating"].to_list() == [str(i % 5) for i in range(50)]
    assert gateway.stats.bodies[0]["body"]["prompt"].startswith("Label: review number")


def test_a_malformed_line_is_an_error_row_naming_its_line_past_quoted_newlines(
    make_spec: Any, gateway: Gateway, tmp_path: Path
) -> None:
    src = tmp_path / "in.csv"
    src.write_text(
        "id,text,rating\n"
        'a,"first line\nsecond line\nthird line",1\n'  # lines 2-4: one row
        "b,too,many,fields\n"  # line 5: malformed
        "\n"  # line 6: blank, not a row
        "c,fine,2\n"
        "d\n"  # line 8: too few
        'e,"ok, with a comma",3\n',
        encoding="utf-8",
    )
    spec = _spec(make_spec, src)
    result = run_job(spec, options())
    df = pl.read_parquet(spec.output.path)
    assert df.height == 5 == result.ok + result.errors and result.errors == 2
    errors = df.filter(pl.col("status") == "error")["error"].to_list()
    assert errors == ["line 5: malformed CSV row: 4 fields, expected 3",
                      "line 8: malformed CSV row: 1 field, expected 3"]
    assert df.filter(pl.col("status") == "ok")["id"].to_list() == ["a", "c", "e"]
    prompts = sorted(b["body"]["prompt"] for b in gateway.stats.bodies)
    assert "Label: first line\nsecond line\nthird line" in prompts and gateway.stats.total == 3


def test_rows_keep_their_positions_across_blocks(make_spec: Any, gateway: Gateway, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Small blocks: Arrow reports malformed rows while parsing blocks ahead of the rows it hands out.
    monkeypatch.setattr("batcher.csv_input.BLOCK_SIZE", 64)
    lines = ["id,text,rating"]
    for i in range(60):
        lines.append(f"{i},bad,row,{i}" if i % 7 == 3 else f"{i},text {i},1")
    src = tmp_path / "in.csv"
    src.write_text("\n".join(lines) + "\n")
    spec = _spec(make_spec, src, id_column=None, batch_size=8)
    result = run_job(spec, options())
    df = pl.read_parquet(spec.output.path)
    assert df["id"].to_list() == list(range(60))  # positional ids: every row at its own position
    bad = df.filter(pl.col("status") == "error")
    assert bad["id"].to_list() == [i for i in range(60) if i % 7 == 3]
    assert bad["error"].to_list() == [f"line {i + 2}: malformed CSV row: 4 fields, expected 3" for i in bad["id"]]
    assert result.ok == gateway.stats.total == 60 - bad.height


def test_a_tsv_input_by_suffix_or_format(make_spec: Any, gateway: Gateway, tmp_path: Path) -> None:
    rows = [["id", "text", "rating"], ["x1", "a, comma is no separator here", "5"], ["x2", "two", "4"]]
    for name, extra in (("in.tsv", {}), ("in.txt", {"format": "tsv"})):
        spec = _spec(make_spec, _csv(tmp_path / name, rows, "\t"), **extra)
        spec = parse_spec({**spec.model_dump(mode="json", exclude_unset=True),
                           "output": {"path": str(tmp_path / f"{name}.parquet"), "keep_columns": ["rating"]}})
        result = run_job(spec, options())
        assert result.ok == 2
        df = pl.read_parquet(spec.output.path)
        assert df["id"].to_list() == ["x1", "x2"] and df["rating"].to_list() == ["5", "4"]


@pytest.mark.parametrize(("content", "message"), [
    ("id,text\na,one\nb,two\na,three\n", "duplicate ids"),
    ("id,text\na,one\n,two\n", "empty id"),
    ("name,text\na,one\n", "no column 'id'"),
])
def test_bad_ids_and_columns_stop_before_any_call(make_spec: Any, gateway: Gateway, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], content: str,
                                                  message: str) -> None:
    src = tmp_path / "in.csv"
    src.write_text(content)
    spec_file = tmp_path / "job.yaml"
    data = make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{text}}"})
    spec_file.write_text(yaml.safe_dump(data))
    assert cli_main(["run", str(spec_file), "--quiet"]) == 3
    assert message in capsys.readouterr().err
    assert gateway.stats.total == 0


def _cli_run(make_spec: Any, tmp_path: Path, content: bytes) -> int:
    src = tmp_path / "in.csv"
    src.write_bytes(content)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{text}}"})))
    return cli_main(["run", str(spec_file), "--quiet"])


@pytest.mark.parametrize(("content", "message"), [
    # not UTF-8 (Latin-1 é), in a row Arrow would only reach mid-run: before, exit 1 with a traceback after calls
    (b"id,text\n" + b"".join(b"%d,fine\n" % i for i in range(200)) + b"x,caf\xe9\ny,ok\n",
     "line 202: not UTF-8 text (byte e9)"),
    (b"id,text\n1,ok\n2,\xe2\x82", "line 3: not UTF-8 text (byte e2 82)"),  # cut in a character
    # a quote never closed: before, exit 0 with the rows after it gone (read into its value)
    (b'id,text\n1,"never closed\n2,b\n', "line 2: a quoted value opens here and is never closed"),
    (b'id,text\r\n1,"a\r\nb"\r\n2,x "y" z\r\n3,"c""d\r\n\r\n4,e\r\n',
     "line 5: a quoted value opens here and is never closed"),
])
def test_a_file_arrow_cannot_read_right_stops_before_any_call_naming_the_line(
    make_spec: Any, gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
    message: str,
) -> None:
    assert _cli_run(make_spec, tmp_path, content) == 3
    err = capsys.readouterr().err
    assert f"cannot read {tmp_path / 'in.csv'} as CSV: {message}" in err and "Traceback" not in err
    assert gateway.stats.total == 0


def test_a_utf8_bom_is_not_part_of_the_first_column(make_spec: Any, gateway: Gateway, tmp_path: Path) -> None:
    # Excel's "CSV UTF-8": a byte order mark and CRLF lines
    assert _cli_run(make_spec, tmp_path, b"\xef\xbb\xbfid,text\r\n007,a\r\n008,b\r\n") == 0
    assert gateway.stats.total == 2
    df = pl.read_parquet(tmp_path / "out" / "t.parquet")
    assert df["id"].to_list() == ["007", "008"]


def test_a_csv_run_resumes(make_spec: Any, gateway: Gateway, tmp_path: Path) -> None:
    spec = _spec(make_spec, _csv(tmp_path / "in.csv", _rows(40)))
    assert run_job(spec, options(limit=15)).ok == 15
    result = run_job(spec, options())
    assert result.status == "finished" and result.skipped == 15 and result.ok == 25
    assert gateway.stats.total == 40  # nothing asked twice
    assert pl.read_parquet(spec.output.path)["id"].to_list() == [f"{i:03d}" for i in range(40)]


def test_a_csv_output_path_is_refused(make_spec: Any) -> None:
    with pytest.raises(Exception, match=r"\.parquet or \.jsonl"):
        parse_spec(make_spec(output={"path": "out.csv"}))


@pytest.mark.parametrize("given", ["folder/*.csv", "folder", "folder/", "s3://bucket/in/a.csv"])
@pytest.mark.parametrize("args", [[], ["--ray", "local"]], ids=["one process", "ray"])
def test_a_csv_folder_glob_or_object_is_refused_in_one_line_before_any_request(
        make_spec: Any, gateway: Gateway, tmp_path: Path, capsys: Any, given: str, args: list[str]) -> None:
    """Finding 12: not "input file folder/*.csv does not exist", nor under --ray "no row has a column"."""
    (tmp_path / "folder").mkdir()
    for name in ("a.csv", "b.csv"):
        _csv(tmp_path / "folder" / name, _rows(3))
    path = given if given.startswith("s3:") else str(tmp_path / given)
    spec = make_spec(input={"path": path, "id_column": "id", "prompt": "{{text}}"})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    for command in (["validate"], ["run", *args]):
        assert cli_main([*command, str(tmp_path / "job.yaml")]) == 2
        err = capsys.readouterr().err
        assert "a CSV input is one local file; folders, globs and s3:// or gs:// objects are for Parquet and JSONL" \
            in err, err
    assert gateway.stats.billed == 0
