"""The cost budget against the gateway, and OpenAI Batch API files in and out."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from batcher import SpecError, parse_spec, run_job
from batcher.cli import main as cli_main
from batcher.gateway import Gateway

from .conftest import options, write_jsonl

# 1,000 USD per million tokens: a cent a row or so, so a small cap stops the run early
PRICES = {"openai/gpt-4o-mini": {"prompt": 1000, "completion": 1000}}


def test_budget_stop_never_passes_the_cap_and_a_higher_cap_finishes(make_spec, gateway: Gateway) -> None:
    spec = parse_spec(make_spec(prices=PRICES, limits={"max_cost_usd": 1.0, "concurrency": 8}))
    result = run_job(spec, options())
    assert result.status == "budget" and result.exit_code == 7
    assert "max_cost_usd" in result.message and "rerun" in result.message
    df = pl.read_parquet(spec.output.path)
    spent = df["cost_usd"].sum()
    assert 0 < df.height < 300 and spent <= 1.0
    assert gateway.stats.billed == df.height  # nothing was sent that is not in the output
    more = parse_spec(make_spec(prices=PRICES, limits={"max_cost_usd": 100.0, "concurrency": 8}))
    result = run_job(more, options())
    assert result.status == "finished"
    df = pl.read_parquet(spec.output.path)
    assert df.height == 300 and df["review_id"].n_unique() == 300
    assert gateway.stats.billed == 300 and df["cost_usd"].sum() <= 100.0


def test_budget_needs_prices_for_every_model(make_spec, gateway: Gateway, tmp_path: Path, capsys) -> None:
    spec = make_spec(request={"model": "nobody/unpriced-model"}, limits={"max_cost_usd": 1.0})
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    assert cli_main(["run", str(path), "--quiet"]) == 2
    assert "no price for 'nobody/unpriced-model'" in capsys.readouterr().err
    assert gateway.stats.total == 0


def test_unpriced_model_costs_null_not_zero(make_spec) -> None:
    spec = parse_spec(make_spec(request={"model": "nobody/unpriced-model"}))
    run_job(spec, options(limit=3))
    df = pl.read_parquet(spec.output.path)
    assert df["cost_usd"].null_count() == 3 and (df["status"] == "ok").all()


def test_openai_batch_file_round_trip(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "openai/gpt-4o-mini", "prompt": f"Say something about {i}", "max_tokens": 5 + i}}
        for i in range(6)
    ]
    lines.append({"custom_id": "req-chat", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}})
    src = write_jsonl(tmp_path / "batch_input.jsonl", lines)
    out = tmp_path / "batch_output.jsonl"
    spec = parse_spec(make_spec(
        input={"path": str(src), "format": "openai_batch", "id_column": None, "prompt": None},
        output={"path": str(out), "format": "openai_batch"},
        endpoint={"api": "openai"},
        request={"model": None, "temperature": 0.2},
    ))
    result = run_job(spec, options())
    assert result.ok == 6 and result.errors == 1
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["custom_id"] for g in got] == [x["custom_id"] for x in lines]  # input order, ids kept
    for g, line in zip(got[:6], lines[:6], strict=True):
        assert set(g) == {"id", "custom_id", "response", "error"} and g["error"] is None
        assert g["response"]["status_code"] == 200
        body = g["response"]["body"]
        assert body["object"] == "text_completion" and body["choices"][0]["text"]
        assert body["usage"]["completion_tokens"] <= line["body"]["max_tokens"]
    assert got[6]["error"]["message"] and got[6]["response"] is None
    # the line's own fields win; the spec's fill what the body lacks
    sent = {b["body"]["prompt"]: b["body"] for b in gateway.stats.bodies}
    assert sent["Say something about 3"]["max_tokens"] == 8 and sent["Say something about 3"]["temperature"] == 0.2


def test_openai_batch_input_without_model_needs_one(make_spec, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"request\.model is required"):
        parse_spec(make_spec(request={"model": None}))


@pytest.mark.parametrize("fallback", ["dear/m", "nope/x"])
def test_routing_in_a_batch_lines_body_is_priced_under_a_cap(make_spec, gateway: Gateway, tmp_path: Path,
                                                             fallback: str) -> None:
    # orq falls back server-side on what the line's own body says: that model may answer, so the row's worst
    # case prices it (dear/m), and a model with no price makes the row a `budget` error row with no call.
    from batcher.gateway import Fault

    gateway.set_faults([Fault("status", status=503, model="cheap/m", upstream=True)])
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "cheap/m", "prompt": f"hello {i}", "max_tokens": 50, "fallbacks": [{"model": fallback}]}}
             for i in range(40)]
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    spec = make_spec(input={"path": str(src), "format": "openai_batch", "id_column": None, "prompt": None},
                     output={"path": str(tmp_path / "out.jsonl")}, request={"model": None, "max_tokens": None},
                     prices={"cheap/m": {"prompt": 0.1, "completion": 0.1}, "dear/m": {"prompt": 50, "completion": 200}},
                     limits={"max_cost_usd": 0.05, "concurrency": 8})  # room for ~4 answers by dear/m
    result = run_job(parse_spec(spec), options())
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    answered = [r for r in rows if r["status"] == "ok"]
    if fallback == "nope/x":
        assert answered == [] and gateway.stats.total == 0 and result.errors == 40
        assert {r["error_kind"] for r in rows} == {"budget"} and "nope/x" in rows[0]["error"]
    else:
        spent = sum(r["prompt_tokens"] * 50e-6 + r["completion_tokens"] * 200e-6 for r in answered)
        assert result.status == "budget" and 0 < len(answered) < 40 and spent <= 0.05
        assert all(r["model"] == "dear/m" for r in answered)
