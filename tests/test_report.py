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
