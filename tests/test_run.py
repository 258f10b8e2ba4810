"""End to end over loopback: spec -> run -> output file, against the simulated gateway."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from batcher import parse_spec, run_job
from batcher.cli import main
from batcher.gateway import Gateway
from batcher.sinks import RESULT_COLUMNS

from .conftest import SAMPLES, options, write_jsonl

N_REVIEWS = 300


def test_parquet_job_one_ok_row_per_input(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    spec = parse_spec(make_spec(output={"path": str(tmp_path / "o.parquet"), "keep_columns": ["product", "text"]}))
    result = run_job(spec, options())
    assert result.status == "finished" and result.exit_code == 0
    df = pl.read_parquet(tmp_path / "o.parquet")
    assert df.height == N_REVIEWS
    assert df["review_id"].n_unique() == N_REVIEWS
    assert set(df["review_id"]) == set(pl.read_parquet(SAMPLES / "reviews.parquet")["review_id"])
    assert (df["status"] == "ok").all()
    for col in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert df[col].null_count() == 0 and (df[col] > 0).all()
    assert set(df["text"]) <= {"positive", "negative", "neutral"}
    assert set(RESULT_COLUMNS) <= set(df.columns)
    # a kept column named like an output column is renamed, not overwritten
    assert "input_text" in df.columns and "product" in df.columns
    assert gateway.stats.billed == N_REVIEWS
    assert result.ok == N_REVIEWS and result.attempts == N_REVIEWS


def test_jsonl_job_jsonl_output_and_wire_fields(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    orq = {"thread": {"id": "t-1", "tags": ["x"]}, "identity": {"id": "team", "email": "a@b.co"}}
    spec = parse_spec(
        make_spec(
            input={"path": str(SAMPLES / "reviews.jsonl"), "inputs_columns": ["customer_name"]},
            output={"path": str(tmp_path / "o.jsonl")},
            request={"retry": {"count": 2, "on_codes": [429]}, "orq": orq, "seed": 3},
        )
    )
    assert run_job(spec, options()).status == "finished"
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(lines) == N_REVIEWS and all(r["status"] == "ok" for r in lines)
    body = gateway.stats.bodies[-1]["body"]
    # exactly as written, plus prompt, max_tokens and the row's inputs
    assert body["retry"] == {"count": 2, "on_codes": [429]}
    assert body["orq"]["thread"] == orq["thread"] and body["orq"]["identity"] == orq["identity"]
    assert set(body["orq"]["inputs"]) == {"customer_name"}
    assert body["seed"] == 3 and body["max_tokens"] == 16 and body["temperature"] == 0
    assert "Classify the sentiment" in body["prompt"]


def test_prompt_column_job(make_spec, tmp_path: Path) -> None:
    spec = parse_spec(
        make_spec(input={"path": str(SAMPLES / "prompts.jsonl"), "id_column": "id", "prompt": None,
                         "prompt_column": "prompt"})
    )
    result = run_job(spec, options())
    df = pl.read_parquet(spec.output.path)
    assert result.ok == 100 and df.height == 100 and (df["id"].str.starts_with("r")).all()


def test_template_renders_columns_and_default_ids(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [{"a": "x", "b": i} for i in range(5)])
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": None, "prompt": "A={{a}} B={{ b }}!"}))
    run_job(spec, options())
    df = pl.read_parquet(spec.output.path).sort("id")
    assert df["id"].to_list() == [0, 1, 2, 3, 4]
    prompts = sorted(b["body"]["prompt"] for b in gateway.stats.bodies)
    assert prompts == [f"A=x B={i}!" for i in range(5)]


def test_invalid_spec_makes_no_request(make_spec, gateway: Gateway, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    # Through `batcher run`, against a live gateway: were the spec not checked first, the run would call it
    raw = make_spec(request={"temperature": 3})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--quiet"]) == 2
    msg = capsys.readouterr().err
    assert str(path) in msg and "request.temperature" in msg and "3" in msg and "must be from 0 to 2 (got 3)" in msg
    assert gateway.stats.total == 0
    assert not Path(raw["output"]["path"]).exists()
    raw["request"]["temperature"] = 0
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--quiet", "--limit", "1"]) == 0
    assert gateway.stats.total == 1  # the same spec, once valid, does reach the gateway


def test_bad_rows_become_error_rows(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [
        {"id": "a", "text": "fine"},
        {"id": "b", "text": None},
        '{"id": "c", "text": "broken',
        {"id": "d", "text": ""},
        {"id": "e"},
        {"id": "f", "text": "also fine"},
    ])
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{text}}"}))
    result = run_job(spec, options())
    assert result.status == "finished"
    df = pl.read_parquet(spec.output.path)
    assert df.height == 6  # output rows + error rows = input rows
    errors = {r["id"]: r["error"] for r in df.filter(pl.col("status") == "error").iter_rows(named=True)}
    assert len(errors) == 4
    assert "null" in errors["b"] and "is not a column" in errors["e"]
    assert any("line 3" in (e or "") for e in errors.values())
    assert set(df.filter(pl.col("status") == "ok")["id"]) == {"a", "f"}
    assert gateway.stats.total == 2


def test_n_greater_than_one_fills_choices(make_spec, tmp_path: Path) -> None:
    spec = parse_spec(make_spec(input={"prompt": "Write about {{product}}"}, request={"n": 3, "temperature": 0.9}))
    run_job(spec, options(limit=10))
    df = pl.read_parquet(spec.output.path)
    assert df.height == 10
    for choices, text in zip(df["choices"].to_list(), df["text"].to_list(), strict=True):
        assert [c["index"] for c in choices] == [0, 1, 2]
        assert choices[0]["text"] == text
        assert len({c["text"] for c in choices}) > 1


def test_one_choice_is_text_and_no_choices_list(make_spec) -> None:
    spec = parse_spec(make_spec(input={"prompt": "Write about {{product}}"}))
    run_job(spec, options(limit=5))
    df = pl.read_parquet(spec.output.path)
    assert df.height == 5 and df["text"].null_count() == 0
    assert df["choices"].null_count() == 5  # the single choice is `text` / `finish_reason`, not stored twice


def test_unique_columns_are_not_dictionary_encoded(make_spec) -> None:
    spec = parse_spec(make_spec(input={"prompt": "Write about {{product}}"}))
    run_job(spec, options(limit=5))
    meta = pq.ParquetFile(spec.output.path).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "RLE_DICTIONARY" not in encodings["text"] and "RLE_DICTIONARY" not in encodings["completion_id"]
    assert "RLE_DICTIONARY" in encodings["status"] and "RLE_DICTIONARY" in encodings["model"]


def test_streaming_assembles_the_same_row(make_spec, tmp_path: Path) -> None:
    plain = parse_spec(make_spec(input={"prompt": "Tell me about {{product}}"}, output={"path": str(tmp_path / "a.parquet")}))
    streamed = parse_spec(make_spec(input={"prompt": "Tell me about {{product}}"},
                                    output={"path": str(tmp_path / "b.parquet")}, request={"stream": True}))
    run_job(plain, options(limit=20))
    run_job(streamed, options(limit=20))
    a = pl.read_parquet(tmp_path / "a.parquet").sort("review_id")
    b = pl.read_parquet(tmp_path / "b.parquet").sort("review_id")
    assert a["text"].to_list() == b["text"].to_list()
    assert a["completion_tokens"].to_list() == b["completion_tokens"].to_list()
    assert (b["prompt_tokens"] > 0).all()


def test_limit_then_rerun_finishes_the_rest(make_spec, gateway: Gateway) -> None:
    spec = parse_spec(make_spec())
    first = run_job(spec, options(limit=40))
    assert first.ok == 40 and pq.read_metadata(spec.output.path).num_rows == 40
    second = run_job(spec, options())
    assert second.skipped == 40 and second.ok == N_REVIEWS - 40
    assert pq.read_metadata(spec.output.path).num_rows == N_REVIEWS
    third = run_job(spec, options())
    assert third.status == "nothing_to_do"
    assert gateway.stats.total == N_REVIEWS


def test_openai_api_sends_only_openai_fields(make_spec, gateway: Gateway) -> None:
    spec = parse_spec(
        make_spec(endpoint={"api": "openai"},
                  request={"retry": {"count": 1}, "cache": {"type": "exact_match", "ttl": 60}, "user": "u1"})
    )
    assert run_job(spec, options(limit=5)).ok == 5
    body = gateway.stats.bodies[-1]["body"]
    assert gateway.stats.bodies[-1]["path"] == "/v1/completions"
    assert set(body) <= {"model", "prompt", "max_tokens", "temperature", "user"}
    assert body["max_tokens"] == 16


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_output_order_and_row_groups(make_spec, tmp_path: Path, fmt: str) -> None:
    # Answers arrive out of order (random latency, 32 at a time): the output is still in input order
    out = tmp_path / f"o.{fmt}"
    spec = parse_spec(make_spec(output={"path": str(out), "row_group_size": 64}, limits={"concurrency": 32},
                                endpoint={"base_url": "local", "local": {"latency_ms": 1, "jitter_ms": 30, "seed": 7}}))
    run_job(spec, options())
    given = pq.read_table(SAMPLES / "reviews.parquet", columns=["review_id"]).column(0).to_pylist()
    if fmt == "parquet":
        meta = pq.read_metadata(out)
        assert meta.num_rows == N_REVIEWS and meta.num_row_groups == 5
        written = pq.read_table(out, columns=["review_id"]).column(0).to_pylist()
    else:
        written = [json.loads(line)["review_id"] for line in out.read_text().splitlines()]
    assert written == given
