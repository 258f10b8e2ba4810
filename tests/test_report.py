"""`batcher report`: its totals against sums computed independently (pyarrow + plain Python), unpriced models,
the error summary, the output formats, and a report over a real run against the local gateway."""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher import InputError, RunOptions, parse_spec, run_job
from batcher.cli import main
from batcher.prices import PriceTable
from batcher.report import error_table, scan_outputs, usage_table, usage_total, with_prices
from batcher.sinks import output_schema

ROOT = Path(__file__).resolve().parents[1]
REVIEWS = ROOT / "samples" / "reviews.parquet"
PRICED = "openai/gpt-4o-mini"
UNPRICED = "acme/no-such-model"
TOKENS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")


def _records() -> list[dict[str, Any]]:
    """An output with every kind of row: billed, cached, unpriced, HTTP errors and input errors."""
    rows: list[dict[str, Any]] = []
    for i in range(40):
        model = PRICED if i % 3 else UNPRICED
        cached = i % 7 == 0
        price = PriceTable.default().get(model)
        prompt, completion = 20 + i, 1 + i % 4
        cost = 0.0 if cached else (price.cost(prompt, completion, 0) if price else None)
        rows.append({
            "id": f"r{i}", "label": "a" if i % 2 else "b", "status": "ok", "model": model, "cached": cached,
            "attempts": 0 if cached else 1 + i % 2, "latency_ms": 0.0 if cached else 10.0 + (i * 37) % 101,
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "cached_tokens": i % 5, "reasoning_tokens": i % 2, "cost_usd": cost, "http_status": None if cached else 200,
            "text": "positive" if i % 4 else "negative",
        })
    for i, (status, kind, msg) in enumerate([(500, "http", "upstream 500 #1"), (500, "http", "upstream 500 #2"),
                                             (429, "http", "rate limited"), (None, "input", "template variable")]):
        rows.append({"id": f"e{i}", "label": "a", "status": "error", "model": None if kind == "input" else PRICED,
                     "cached": False, "attempts": 0 if kind == "input" else 4, "http_status": status,
                     "error_kind": kind, "error": msg, "latency_ms": None if kind == "input" else 900.0})
    return rows


def _write(records: list[dict[str, Any]], path: Path) -> Path:
    schema = output_schema("id", pa.string(), {"label": pa.string()})
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in records], schema=schema)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        with open(path, "w", encoding="utf-8") as f:
            for r in table.to_pylist():
                f.write(json.dumps(r) + "\n")
    return path


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _expected(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's figures for these rows, computed in plain Python."""
    ok = [r for r in rows if r["status"] == "ok"]
    billed = [r for r in rows if not r["cached"]]
    lat = [r["latency_ms"] for r in ok if not r["cached"]]
    costs = [r["cost_usd"] for r in rows if r.get("cost_usd") is not None]
    out = {
        "rows": len(rows), "ok": len(ok), "errors": len(rows) - len(ok), "cached": sum(bool(r["cached"]) for r in rows),
        "attempts_per_row": sum(r["attempts"] or 0 for r in rows) / len(rows),
        "cost_usd": sum(costs) if costs else None,
        "unpriced": sum(1 for r in ok if not r["cached"] and r.get("cost_usd") is None),
        **{t: sum(r.get(t) or 0 for r in billed) for t in TOKENS},
    }
    for q in (50, 95, 99):
        out[f"latency_p{q}_ms"] = _percentile(lat, q) if len(lat) > 1 else (lat[0] if lat else None)
    return out


def _assert_row(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if isinstance(value, float):
            assert actual[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert actual[key] == value, key


def test_totals_equal_independent_sums(tmp_path: Path) -> None:
    path = _write(_records(), tmp_path / "out.parquet")
    rows = pq.read_table(path).to_pylist()  # read back by pyarrow: the sums do not share polars' reading
    lf = scan_outputs([path])
    _assert_row(usage_total(lf).row(0, named=True), _expected(rows))

    by_group: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_group[(r["model"], r["label"])].append(r)
    table = usage_table(lf, ["label"])
    assert table.height == len(by_group)
    for got in table.iter_rows(named=True):
        _assert_row(got, _expected(by_group[(got["model"], got["label"])]))


def test_unpriced_model_is_flagged_not_free(tmp_path: Path) -> None:
    rows = _records()
    path = _write(rows, tmp_path / "out.parquet")
    table = usage_table(scan_outputs([path]), [])
    unpriced = table.filter(pl.col("model") == UNPRICED).row(0, named=True)
    billed_unpriced = sum(1 for r in rows if r["model"] == UNPRICED and r["status"] == "ok" and not r["cached"])
    assert billed_unpriced > 0
    assert unpriced["unpriced"] == billed_unpriced
    # Its only costs are the cache hits' zeros: a sum, but with the unpriced rows flagged beside it.
    assert unpriced["cost_usd"] == 0.0
    assert table.filter(pl.col("model") == PRICED)["unpriced"][0] == 0

    only_unpriced = _write([r for r in rows if r["model"] == UNPRICED and not r["cached"]], tmp_path / "u.parquet")
    row = usage_total(scan_outputs([only_unpriced])).row(0, named=True)
    assert row["cost_usd"] is None and row["unpriced"] == billed_unpriced


def test_cli_text_says_unpriced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [r for r in _records() if r["model"] == UNPRICED and not r["cached"]]
    path = _write(rows, tmp_path / "out.parquet")
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    model_line = next(line for line in out.splitlines() if line.startswith(UNPRICED))
    assert "unpriced" in model_line and "0.000000" not in model_line
    assert f"unpriced: {len(rows)} ok row(s) of {UNPRICED}" in out


def test_errors_are_summarised(tmp_path: Path) -> None:
    rows = _records()
    path = _write(rows, tmp_path / "out.parquet")
    errors = error_table(scan_outputs([path]))
    failed = [r for r in rows if r["status"] != "ok"]
    expected = Counter((r["http_status"], r["error_kind"]) for r in failed)
    got = {(r["http_status"], r["error_kind"]): r for r in errors.iter_rows(named=True)}
    assert {k: v["rows"] for k, v in got.items()} == dict(expected)
    for key, r in got.items():
        assert r["example"] in {f["error"] for f in failed if (f["http_status"], f["error_kind"]) == key}
    assert errors["rows"].to_list() == sorted(errors["rows"].to_list(), reverse=True)


def test_formats_parse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _records()
    path = _write(rows, tmp_path / "out.parquet")
    expected = _expected(rows)

    assert main(["report", str(path), "--format", "csv", "--by", "label"]) == 0
    parsed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert parsed[-1]["model"] == "total" and parsed[-1]["label"] == ""
    assert int(parsed[-1]["rows"]) == expected["rows"]
    assert sum(int(r["prompt_tokens"]) for r in parsed[:-1]) == expected["prompt_tokens"]

    assert main(["report", str(path), "--format", "csv", "--table", "errors"]) == 0
    errs = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sum(int(r["rows"]) for r in errs) == expected["errors"]

    assert main(["report", str(path), "--format", "json", "--by", "label,text"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["by"] == ["model", "label", "text"]
    assert doc["total"]["completion_tokens"] == expected["completion_tokens"]
    assert doc["total"]["cost_usd"] == pytest.approx(expected["cost_usd"])
    assert sum(e["rows"] for e in doc["errors"]) == expected["errors"]

    assert main(["report", str(path), "--format", "markdown"]) == 0
    usage_md = capsys.readouterr().out.split("\n\n")[0].splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in usage_md)
    assert len({line.count(" | ") for line in usage_md if not line.startswith("|---")}) == 1
    assert usage_md[1].startswith("|---")
    assert usage_md[-1].startswith("| total |")


def test_jsonl_and_folders_read_like_parquet(tmp_path: Path) -> None:
    rows = _records()
    _write(rows[:20], tmp_path / "a.parquet")
    _write(rows[20:], tmp_path / "b.jsonl")
    (tmp_path / ".b.jsonl.tmp123.parquet").write_bytes(b"half-written")  # batcher's temporaries are skipped
    lf = scan_outputs([tmp_path])
    _assert_row(usage_total(lf).row(0, named=True), _expected(rows))


def test_prices_file_recomputes_cost(tmp_path: Path) -> None:
    rows = _records()
    path = _write(rows, tmp_path / "out.parquet")
    prices = tmp_path / "prices.yaml"
    prices.write_text(f"models:\n  {UNPRICED}: {{prompt: 1.0, completion: 3.0, cached_prompt: 0.5}}\n")
    table = PriceTable.default().overridden(PriceTable.from_file(prices))
    expected = 0.0
    for r in rows:
        if r["status"] == "ok" and not r["cached"]:
            p = table.get(r["model"])
            assert p is not None
            cost = p.cost(r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"])
            assert cost is not None
            expected += cost
    got = usage_total(with_prices(scan_outputs([path]), table)).row(0, named=True)
    assert got["cost_usd"] == pytest.approx(expected, rel=1e-12)
    assert got["unpriced"] == 0


def test_bad_by_column_and_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(_records(), tmp_path / "out.parquet")
    with pytest.raises(InputError, match="no column 'nope'"):
        usage_table(scan_outputs([path]), ["nope"])
    assert main(["report", str(path), "--by", "nope"]) == InputError.exit_code
    page = tmp_path / "r.html"
    assert main(["report", str(path), "--html", str(page)]) == 0
    body = page.read_text()
    assert body.count("<svg") == 2 and UNPRICED in body and "<script" not in body
    capsys.readouterr()


def test_report_over_a_gateway_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = parse_spec({
        "name": "report-test",
        "input": {"path": str(REVIEWS), "id_column": "review_id",
                  "prompt": "Classify the sentiment of this review as positive, negative or neutral.\n\n{{text}}"},
        "output": {"path": str(tmp_path / "runs" / "first.parquet"), "keep_columns": ["product", "rating"]},
        # 400s are not retried: a product's rows become error rows, deterministically.
        "endpoint": {"base_url": "local", "local": {"latency_ms": 0, "faults": [
            {"kind": "status", "status": 400, "prompt_contains": "espresso machine"}]}},
        "request": {"model": PRICED, "max_tokens": 8, "temperature": 0, "cache": {"type": "exact_match", "ttl": 600}},
        "cache_dir": str(tmp_path / "cache"),
    })
    first = run_job(spec, RunOptions(quiet=True, handle_signals=False))
    # A second output of the same job: every ok row now comes from the response cache.
    second = run_job(spec, RunOptions(quiet=True, handle_signals=False, output=tmp_path / "runs" / "second.parquet"))
    assert first.errors > 0 and second.cached == first.ok

    rows = [r for name in ("first", "second") for r in pq.read_table(tmp_path / "runs" / f"{name}.parquet").to_pylist()]
    total = usage_total(scan_outputs([tmp_path / "runs"])).row(0, named=True)
    _assert_row(total, _expected(rows))
    # Cache hits are not billed again: the second output adds rows, but no tokens and no cost.
    again = usage_total(scan_outputs([tmp_path / "runs" / "second.parquet"])).row(0, named=True)
    assert again["prompt_tokens"] == 0 and again["cost_usd"] == 0.0 and again["cached"] == first.ok
    assert total["cost_usd"] == pytest.approx(first.cost_usd + second.cost_usd)
    assert total["errors"] == first.errors + second.errors

    errors = error_table(scan_outputs([tmp_path / "runs"]))
    assert errors.filter(pl.col("http_status") == 400)["rows"][0] == first.errors + second.errors

    assert main(["report", str(tmp_path / "runs"), "--by", "text"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["model", "text", "rows"]
    assert "400" in out


# ------------------------------------------------------------------------------------- hostile inputs (issue 14)


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("column", ["cached", "prompt_tokens", "cost_usd"])
def test_by_a_column_that_is_also_a_figure(tmp_path: Path, column: str, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _records()
    path = _write(rows, tmp_path / "out.parquet")
    table = usage_table(scan_outputs([path]), [column])  # was a polars DuplicateError
    assert table.columns[:2] == ["model", f"by_{column}"]
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in pq.read_table(path).to_pylist():
        groups[(r["model"], r[column])].append(r)
    assert table.height == len(groups)
    for got in table.iter_rows(named=True):
        _assert_row(got, _expected(groups[(got["model"], got[f"by_{column}"])]))
    code, out, _ = _main(["report", str(path), "--by", column, "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["by"] == ["model", f"by_{column}"]


def test_by_a_jsonl_column_of_mixed_types(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _records()[:8]
    flags: list[Any] = [True, 3, False, 3, {"a": 1}, [1, 2], "x", None]
    with open(tmp_path / "out.jsonl", "w", encoding="utf-8") as f:
        for r, flag in zip(rows, flags, strict=True):
            f.write(json.dumps({**{k: v for k, v in r.items() if k != "label"}, "flag": flag}) + "\n")
    table = usage_table(scan_outputs([tmp_path / "out.jsonl"]), ["flag"])
    # Mixed types are read as text: strings as they are, other values as their JSON text.
    counts: Counter[Any] = Counter()
    for flag, n in zip(table["flag"].to_list(), table["rows"].to_list(), strict=True):
        counts[flag] += n
    assert counts == {"true": 1, "3": 2, "false": 1, '{"a": 1}': 1, "[1, 2]": 1, "x": 1, None: 1}
    code, out, _ = _main(["report", str(tmp_path / "out.jsonl"), "--by", "flag", "--table", "usage"], capsys)
    assert code == 0 and '{"a": 1}' in out


def test_text_tables_escape_and_cut_group_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = ["two\nlines", "a\ttab", "\x1b[31mred", "x" * 500, "宽字符"]
    priced = [r for r in _records() if r["model"] == PRICED][:10]  # no "unpriced:" note under the table
    rows = [{**r, "label": labels[i % len(labels)]} for i, r in enumerate(priced)]
    path = _write(rows, tmp_path / "out.parquet")
    for fmt in ("text", "markdown"):
        code, out, _ = _main(["report", str(path), "--by", "label", "--table", "usage", "--format", fmt], capsys)
        assert code == 0
        lines = out.splitlines()
        groups = usage_table(scan_outputs([path]), ["label"]).height
        # header, rule, one line per group, (rule,) total: a newline inside a value would add lines
        assert len(lines) == groups + (4 if fmt == "text" else 3)
        assert "two\\nlines" in out and "a\\ttab" in out and "\\x1b[31mred" in out and "\x1b" not in out
        assert "x" * 47 + "…" in out and "x" * 48 not in out
    # Every line of the text table is as wide on a terminal as the rule: wide characters count twice.
    code, out, _ = _main(["report", str(path), "--by", "label", "--table", "usage"], capsys)
    from batcher.report import _width
    assert "宽字符" in out and len({_width(line) for line in out.splitlines()}) == 1
    # csv and json keep the values exact.
    code, out, _ = _main(["report", str(path), "--by", "label", "--format", "csv"], capsys)
    assert {r["label"] for r in csv.DictReader(io.StringIO(out))} >= set(labels)
    code, out, _ = _main(["report", str(path), "--by", "label", "--format", "json"], capsys)
    assert {r["label"] for r in json.loads(out)["usage"]} == set(labels)


def _no_nan(text: str) -> None:
    tokens = set(text.replace(",", " ").replace('"', " ").replace(":", " ").lower().split())
    assert not tokens & {"nan", "inf", "-inf", "infinity", "-infinity"}, text


def _all_cached(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok" and r["cached"]]


def _all_errors(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] != "ok"]


@pytest.mark.parametrize("kind", ["empty", "errors", "cached", "nan"])
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_no_nan_or_inf_in_any_format(tmp_path: Path, kind: str, suffix: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    rows = _records()
    chosen = {"empty": [], "errors": _all_errors(rows), "cached": _all_cached(rows),
              "nan": [{**r, "latency_ms": float("nan") if i % 2 else float("inf"), "cost_usd": float("nan")}
                      for i, r in enumerate(rows[1:5])]}[kind]
    path = _write(chosen, tmp_path / f"out{suffix}")
    for fmt in ("text", "csv", "json", "markdown"):
        # An empty JSONL file has no columns, so none for --by to find: with no rows, nothing to group.
        code, out, err = _main(["report", str(path), "--by", "label", "--format", fmt], capsys)
        assert code == 0, err
        _no_nan(out)
        if fmt == "json":
            json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    page = tmp_path / "r.html"
    assert main(["report", str(path), "--html", str(page)]) == 0
    _no_nan(page.read_text())
    capsys.readouterr()
    total = usage_total(scan_outputs([path])).row(0, named=True)
    assert total["rows"] == len(chosen)
    if kind == "empty":
        assert total["attempts_per_row"] is None
    if kind == "cached":
        assert total["attempts_per_row"] == 0.0
    if kind == "nan":
        assert total["latency_p50_ms"] is None and total["cost_usd"] is None and total["unpriced"] == 4


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_a_zero_row_output_of_batchers_own(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "in.jsonl"
    empty.write_text("")
    spec = parse_spec({
        "name": "zero", "input": {"path": str(empty), "prompt": "{{text}}"},
        "output": {"path": str(tmp_path / f"out.{fmt}")},
        "endpoint": {"base_url": "local", "local": {"latency_ms": 0}},
        "request": {"model": PRICED, "max_tokens": 4}, "cache_dir": str(tmp_path / "cache"),
    })
    result = run_job(spec, RunOptions(quiet=True, handle_signals=False))
    assert result.ok == 0 and (tmp_path / f"out.{fmt}").exists()
    code, out, err = _main(["report", str(tmp_path / f"out.{fmt}")], capsys)
    assert code == 0, err
    assert "no rows" in out
    total_line = next(line for line in out.splitlines() if line.startswith("total"))
    assert total_line.split()[1] == "0"


def test_damaged_and_foreign_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = json.dumps({"status": "ok", "model": PRICED, "cached": False, "attempts": 1})
    cases: dict[str, tuple[str | bytes, str]] = {
        "torn.jsonl": (good + "\n" + good + '\n{"status": "o', "line 3 is not valid JSON (a torn last line"),
        "middle.jsonl": (good + "\nnot json\n" + good + "\n", "line 2 is not valid JSON"),
        "array.jsonl": (good + "\n[1, 2]\n", "line 2 is not a JSON object"),
        "wrongtype.jsonl": (good + "\n" + json.dumps({"status": "ok", "cached": 3}) + "\n",
                            "line 2: cached is 3, not a Boolean value"),
        "latin1.jsonl": ('{"status": "caf\xe9"}\n'.encode("latin-1"), "cannot read"),
        "junk.parquet": (b"PAR1 this is not parquet", "cannot read"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        code, _, err = _main(["report", str(path)], capsys)
        assert code == InputError.exit_code and message in err and "Traceback" not in err, (name, err)

    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), foreign)
    code, _, err = _main(["report", str(foreign)], capsys)
    assert code == 3 and "not a batcher output" in err
    code, _, err = _main(["report", str(tmp_path / "missing.parquet")], capsys)
    assert code == 3 and "no such file" in err
    (tmp_path / "empty_dir").mkdir()
    code, _, err = _main(["report", str(tmp_path / "empty_dir")], capsys)
    assert code == 3 and "no .parquet or .jsonl" in err
    # A missing or malformed --prices file is a usage error naming the file.
    path = _write(_records(), tmp_path / "out.parquet")
    code, _, err = _main(["report", str(path), "--prices", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "--prices" in err and "nope.yaml" in err
    (tmp_path / "bad.yaml").write_text("models:\n  m: {prompt: cheap, completion: 1}\n")
    code, _, err = _main(["report", str(path), "--prices", str(tmp_path / "bad.yaml")], capsys)
    assert code == 2 and "bad.yaml: " in err


def test_huge_numbers_neither_wrap_nor_flood_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{**r, "prompt_tokens": 2**62, "cost_usd": 1e300} for r in _records()[1:3]]
    path = _write(rows, tmp_path / "out.parquet")
    total = usage_total(scan_outputs([path])).row(0, named=True)
    assert total["prompt_tokens"] == 2**63  # one past int64: the old sum wrapped round to a negative number
    code, out, _ = _main(["report", str(path), "--table", "usage"], capsys)
    assert code == 0 and "9,223,372,036,854,775,808" in out and "2e+300" in out
    assert max(map(len, out.splitlines())) < 250
    code, out, _ = _main(["report", str(path), "--format", "json"], capsys)
    assert json.loads(out)["total"]["prompt_tokens"] == 2**63


@pytest.mark.parametrize(("column", "value"), [("cached", "true"), ("status", 1), ("latency_ms", "10"),
                                               ("cost_usd", "0.1"), ("prompt_tokens", "3"), ("model", 5)])
def test_a_result_column_of_another_type_is_refused_by_name(tmp_path: Path, column: str, value: Any,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{k: v for k, v in r.items() if k != column} | {column: value} for r in _records()[:3]]
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    code, _, err = _main(["report", str(path)], capsys)
    assert code == 3 and f"column {column!r} holds" in err and "not a batcher output" in err, err


def test_a_damaged_parquet_page_is_an_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(_records() * 200, tmp_path / "out.parquet")
    data = bytearray(path.read_bytes())
    data[100:2000] = b"\xab" * 1900  # the footer (schema) survives, the first pages do not
    path.write_bytes(bytes(data))
    code, _, err = _main(["report", str(path)], capsys)
    assert code == 3 and "cannot read" in err, err


def test_group_columns_of_every_scalar_type_in_every_format(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import datetime
    import decimal

    base = {"error": None, "error_kind": None} | {k: v for k, v in _records()[1].items() if k not in ("id", "label", "text")}
    keys: dict[str, list[Any]] = {
        "b": [b"\x00\xff", b"ok"], "d": [datetime.date(2024, 1, 1), datetime.date(2024, 1, 2)],
        "t": [datetime.time(1, 0), datetime.time(1, 1)], "dec": [decimal.Decimal("1.5"), decimal.Decimal("2.5")],
        "du": [datetime.timedelta(seconds=0), datetime.timedelta(seconds=1)], "f": [float("nan"), float("inf")],
    }
    rows = [{**base, **{k: v[i] for k, v in keys.items()}} for i in range(2)]
    path = tmp_path / "types.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    for fmt in ("text", "csv", "json", "markdown"):
        code, out, err = _main(["report", str(path), "--by", ",".join(keys), "--format", fmt], capsys)
        assert code == 0, (fmt, err)
        if fmt == "json":
            usage = json.loads(out, parse_constant=lambda c: pytest.fail(c))["usage"]
            assert {(u["b"], u["f"], u["du"]) for u in usage} == {("\x00\\xff", "nan", "PT0S"), ("ok", "inf", "PT1S")}
        if fmt == "csv":
            assert [r["du"] for r in csv.DictReader(io.StringIO(out))] == ["PT0S", "PT1S", ""]  # ISO 8601, exact


def test_a_file_named_twice_is_counted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _records()
    _write(rows[:20], tmp_path / "a.parquet")
    _write(rows[20:], tmp_path / "b.parquet")
    monkeypatch.chdir(tmp_path)
    lf = scan_outputs([tmp_path, "a.parquet", tmp_path / "b.parquet", "./a.parquet"])
    assert usage_total(lf)["rows"][0] == len(rows)
