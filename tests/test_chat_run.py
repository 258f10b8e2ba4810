"""Chat jobs end to end: spec (messages, response_format) -> run against the simulated gateway's chat paths ->
typed output columns -> report. Also: the spec -> shape path's bodies validate against the official chat
extract, and out-of-range values are refused by the job spec before any call."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher import SpecError, parse_spec, run_job
from batcher.cli import main
from batcher.gateway import Gateway
from batcher.plan import make_plan
from batcher.shapes import shape_of_job
from batcher.shapes.chat import MessagesTemplate
from batcher.shapes.chat_sim import REFUSE_MARKER, request_validator
from batcher.shapes.chat_spec import OPENAI_CHAT_FIELDS

from .conftest import SAMPLES, options, write_jsonl
from .test_chat_spec import ROW, messages, out_of_range, requests, routing

N_REVIEWS = 300
ASK = "Classify the sentiment of this review as positive, negative or neutral.\n\n{{text}}"
MESSAGES = [{"role": "system", "content": "You label product reviews."}, {"role": "user", "content": ASK}]
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "sarcastic": {"type": "boolean"},
        "topics": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "number"}},
        "detail": {"type": "object", "properties": {"why": {"type": "string"}}},
        "text": {"type": "string"},  # named like batcher's own column: written as answer_text
    },
    "required": ["sentiment", "confidence", "stars", "sarcastic", "topics"],
    "additionalProperties": False,
}
LABEL_FORMAT = {"type": "json_schema", "json_schema": {"name": "review_label", "strict": True, "schema": SCHEMA}}


def _chat(make_spec: Any, **overrides: Any) -> dict[str, Any]:
    """A chat job over the sample reviews: messages instead of a prompt, max_tokens dropped (chat bounds
    answers with max_completion_tokens)."""
    base = make_spec(**overrides)
    base["input"].pop("prompt", None)
    base["input"].setdefault("messages", MESSAGES) if "messages_column" not in base["input"] else None
    base["request"].pop("max_tokens", None)
    return base


def _rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


# --- the spec -> shape path ----------------------------------------------------------------------------------


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(requests(), messages, st.sampled_from(["orq", "openai"]))
def test_bodies_from_chat_job_specs_validate_against_the_official_extract(fields, msgs, api) -> None:
    if api == "openai":
        fields = {k: v for k, v in fields.items() if k in OPENAI_CHAT_FIELDS or k in routing}
    spec = parse_spec({
        "input": {"path": "in.parquet", "messages": msgs},
        "output": {"path": "out.parquet"},
        "endpoint": {"api": api},
        "request": fields,
    })
    assert spec.is_chat
    shape = shape_of_job(spec)
    assert shape.path() == ("/v2/router/chat/completions" if api == "orq" else "/v1/chat/completions")
    body = shape.body(MessagesTemplate(spec.input.messages or []).render(ROW), fields["model"])
    errors = sorted(request_validator().iter_errors(body), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors[:3]]
    assert "max_completion_tokens" in body or "max_tokens" in body  # every answer is bounded


@given(out_of_range())
def test_out_of_range_values_in_a_chat_job_spec_are_refused_naming_field_and_range(case) -> None:
    field, value, words = case
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(SpecError) as info:
        parse_spec({"input": {"path": "in.parquet", "messages": MESSAGES}, "output": {"path": "o.parquet"},
                    "request": {"model": "m", field: value, **extra}})
    assert f"request.{field}: must be {words}" in str(info.value)  # "must be between 0 and 2"


@pytest.mark.parametrize(("change", "message"), [
    ({"input": {"prompt": "{{text}}"}}, "give exactly one of prompt"),
    ({"input": {"messages_column": "msgs"}}, "got messages and messages_column"),
    ({"input": {"messages": [{"role": "robot", "content": "x"}]}}, "input.messages[0]"),
    ({"input": {"messages": [{"role": "user", "content": "{% if %}"}]}}, "template input.messages[0].content"),
    ({"request": {"echo": True}}, "echo is a field of the completions endpoint"),
    ({"endpoint": {"api": "openai"}, "request": {"guardrails": [{"id": "x", "execute_on": "input"}]}},
     "request.guardrails: is orq-only"),
    ({"request": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "no.json"}}}},
     "request.response_format.json_schema.schema: cannot read the schema file"),
])
def test_chat_spec_errors_name_their_field(change: dict[str, Any], message: str) -> None:
    data: dict[str, Any] = {"input": {"path": "in.parquet", "messages": MESSAGES}, "output": {"path": "o.parquet"},
                            "request": {"model": "m"}}
    for section, value in change.items():
        data[section] = {**data.get(section, {}), **value}
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert message in str(info.value)


def test_a_chat_field_in_a_prompt_job_says_where_it_belongs() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"input": {"path": "in.parquet", "prompt": "{{q}}"}, "output": {"path": "o.parquet"},
                    "request": {"model": "m", "response_format": {"type": "json_object"}}})
    assert "request.response_format: is a field of the chat completions endpoint" in str(info.value)


# --- structured labeling --------------------------------------------------------------------------------------


def test_structured_labeling_run_writes_typed_columns(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    out = tmp_path / "labels.parquet"
    spec = parse_spec(_chat(make_spec, output={"path": str(out), "keep_columns": ["rating"]},
                            input={"inputs_columns": ["customer_name"]},
                            request={"response_format": LABEL_FORMAT, "orq": {"inputs": {"team": "data"}}}))
    result = run_job(spec, options())
    assert result.status == "finished" and result.ok == N_REVIEWS and result.errors == 0
    schema = pq.read_schema(out)
    expected = {
        "sentiment": pa.string(), "confidence": pa.float64(), "stars": pa.int64(), "sarcastic": pa.bool_(),
        "topics": pa.list_(pa.string()), "scores": pa.list_(pa.float64()), "detail": pa.string(),
        "answer_text": pa.string(), "refusal": pa.string(), "tool_calls": pa.string(), "reasoning": pa.string(),
    }
    for name, t in expected.items():
        assert schema.field(name).type == t, name
    rows = _rows(out)
    assert len(rows) == N_REVIEWS
    for r in rows:
        answer = json.loads(r["text"])  # the raw answer stays in text
        assert r["sentiment"] == answer["sentiment"] and r["stars"] == answer["stars"]
        assert r["topics"] == answer["topics"] and 0 <= r["confidence"] <= 1
        assert r["answer_text"] == answer.get("text")
        assert r["detail"] == (None if "detail" not in answer else json.dumps(answer["detail"], separators=(",", ":")))
    labels = {r["sentiment"] for r in rows}
    assert labels == {"positive", "negative", "neutral"}  # labels vary across rows
    body = gateway.stats.bodies[-1]
    assert body["path"] == "/v2/router/chat/completions"
    assert body["body"]["messages"][0] == MESSAGES[0] and body["body"]["response_format"] == LABEL_FORMAT
    assert "prompt" not in body["body"] and body["body"]["max_completion_tokens"] == 256
    assert set(body["body"]["orq"]["inputs"]) == {"team", "customer_name"}  # orq.inputs from inputs_columns


def test_typed_columns_in_jsonl_output_and_a_schema_file(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    schema_file = tmp_path / "label.schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    fmt = {"type": "json_schema", "json_schema": {"name": "label", "schema": str(schema_file)}}
    spec = parse_spec(_chat(make_spec, output={"path": str(tmp_path / "o.jsonl")}, request={"response_format": fmt},
                            endpoint={"api": "openai"}))
    assert run_job(spec, options(limit=20)).ok == 20
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert all(isinstance(r["stars"], int) and isinstance(r["topics"], list) for r in lines)
    sent = gateway.stats.bodies[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["response_format"]["json_schema"]["schema"] == SCHEMA  # the file's schema on the wire


@pytest.mark.parametrize("kind", ["not_json", "schema_violation"])
def test_a_broken_answer_is_asked_again_once_then_an_error_row(make_spec, gateway: Gateway, tmp_path: Path,
                                                                 kind: str) -> None:
    gateway.set_faults([{"kind": kind, "first": 1, "prompt_contains": "fantastic"},  # once: the retry answers
                        {"kind": kind, "prompt_contains": "refund"}])  # always: an error row after 2 attempts
    spec = parse_spec(_chat(make_spec, request={"response_format": LABEL_FORMAT}))
    result = run_job(spec, options())
    by_status = {r["review_id"]: r for r in _rows(tmp_path / "out" / "t.parquet")}
    errors = [r for r in by_status.values() if r["status"] == "error"]
    assert errors and result.errors == len(errors)
    for r in errors:
        assert r["error_kind"] == "schema" and r["attempts"] == 2 and r["sentiment"] is None
        assert ("not JSON" if kind == "not_json" else "breaks the schema") in r["error"]
        assert r["cost_usd"] is not None and r["cost_usd"] > 0  # both answers were billed
    retried_ok = [r for r in by_status.values() if r["status"] == "ok" and r["attempts"] == 2]
    assert retried_ok and all(r["sentiment"] in ("positive", "negative", "neutral") for r in retried_ok)


def test_a_refusal_is_an_error_row_with_a_schema_and_an_ok_row_without(make_spec, gateway: Gateway,
                                                                       tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": REFUSE_MARKER + " {{text}}"}]
    spec = parse_spec(_chat(make_spec, input={"messages": msgs}, request={"response_format": LABEL_FORMAT}))
    result = run_job(spec, options(limit=5))
    rows = _rows(tmp_path / "out" / "t.parquet")
    assert result.errors == 5 and gateway.stats.total == 5  # never retried
    for r in rows:
        assert r["status"] == "error" and r["error_kind"] == "refusal" and r["attempts"] == 1
        assert r["refusal"] and r["refusal"] in r["error"] and r["sentiment"] is None
    plain = parse_spec(_chat(make_spec, input={"messages": msgs}, output={"path": str(tmp_path / "p.parquet")}))
    assert run_job(plain, options(limit=5)).ok == 5
    assert all(r["refusal"] and r["text"] is None for r in _rows(tmp_path / "p.parquet"))


def test_tool_calls_fill_the_tool_calls_column(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "set_label", "parameters": {
        "type": "object", "properties": {"label": {"type": "string", "enum": ["positive", "negative"]}},
        "required": ["label"]}}}]
    spec = parse_spec(_chat(make_spec, request={"tools": tools, "tool_choice": "required"}))
    assert run_job(spec, options(limit=10)).ok == 10
    for r in _rows(tmp_path / "out" / "t.parquet"):
        calls = json.loads(r["tool_calls"])
        assert r["text"] is None and r["finish_reason"] == "tool_calls"
        assert calls[0]["function"]["name"] == "set_label"
        assert json.loads(calls[0]["function"]["arguments"])["label"] in ("positive", "negative")


@pytest.mark.parametrize("api", ["orq", "openai"])
def test_streaming_assembles_the_answer_and_its_usage(make_spec, gateway: Gateway, tmp_path: Path, api: str) -> None:
    plain = parse_spec(_chat(make_spec, endpoint={"api": api}, output={"path": str(tmp_path / "a.parquet")},
                             request={"response_format": LABEL_FORMAT}))
    streamed = parse_spec(_chat(make_spec, endpoint={"api": api}, output={"path": str(tmp_path / "b.parquet")},
                                request={"response_format": LABEL_FORMAT, "stream": True}))
    assert run_job(plain, options(limit=30)).ok == 30
    assert run_job(streamed, options(limit=30)).ok == 30
    a, b = _rows(tmp_path / "a.parquet"), _rows(tmp_path / "b.parquet")
    for x, y in zip(a, b, strict=True):
        assert y["text"] == x["text"] and y["sentiment"] == x["sentiment"]
        assert y["prompt_tokens"] == x["prompt_tokens"] and y["completion_tokens"] == x["completion_tokens"] > 0
        assert y["cost_usd"] == x["cost_usd"]
    sent = gateway.stats.bodies[-1]["body"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_images_from_a_column_are_sent_as_data_urls(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    (tmp_path / "a.png").write_bytes(png)
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": "local", "image": str(tmp_path / "a.png")},
        {"id": "remote", "image": "https://example.com/cat.jpg"},
        {"id": "missing", "image": str(tmp_path / "nope.png")},
    ])
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                         {"type": "image_url", "image_url": {"url": "{{image}}", "detail": "low"}}]}]
    spec = parse_spec(_chat(make_spec, input={"path": str(src), "id_column": "id", "messages": msgs}))
    run_job(spec, options())
    urls = {b["body"]["messages"][0]["content"][1]["image_url"]["url"] for b in gateway.stats.bodies}
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in urls
    assert "https://example.com/cat.jpg" in urls and len(urls) == 2
    rows = {r["id"]: r for r in _rows(tmp_path / "out" / "t.parquet")}
    assert rows["local"]["status"] == rows["remote"]["status"] == "ok"
    bad = rows["missing"]
    assert bad["status"] == "error" and bad["error_kind"] == "input"
    assert "template input.messages[0].content[1].image_url.url" in bad["error"] and "'missing'" in bad["error"]


def test_messages_from_a_column(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    table = pa.table({"id": [1, 2, 3], "msgs": [conv, conv[1:], None]})
    pq.write_table(table, tmp_path / "in.parquet")
    spec = parse_spec(_chat(make_spec, input={"path": str(tmp_path / "in.parquet"), "id_column": "id",
                                              "messages": None, "messages_column": "msgs"}))
    result = run_job(spec, options())
    assert result.ok == 2 and result.errors == 1
    sent = [b["body"]["messages"] for b in gateway.stats.bodies]
    assert conv in sent and conv[1:] in sent  # a struct's null fields (a Parquet list of structs) dropped
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "msgs": json.dumps(conv)}, {"id": "b", "msgs": conv}])
    spec = parse_spec(_chat(make_spec, input={"path": str(jsonl), "id_column": "id", "messages": None,
                                              "messages_column": "msgs"}, output={"path": str(tmp_path / "j.parquet")}))
    assert run_job(spec, options()).ok == 2


# --- OpenAI Batch files ---------------------------------------------------------------------------------------


def test_a_chat_openai_batch_file_round_trips(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": f"Say {i}"}],
                       "max_completion_tokens": 20}} for i in range(5)]
    lines.append({"custom_id": "legacy", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "openai/gpt-4o-mini", "prompt": "Say x"}})
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    spec = parse_spec(make_spec(input={"path": str(src), "format": "openai_batch", "id_column": None, "prompt": None},
                                output={"path": str(tmp_path / "results.jsonl"), "format": "openai_batch"},
                                request={"max_tokens": None}))
    assert spec.is_chat
    result = run_job(spec, options())
    assert result.ok == 5 and result.errors == 1
    out = {o["custom_id"]: o for o in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    for i in range(5):
        body = out[f"req-{i}"]["response"]["body"]
        assert body["object"] == "chat.completion" and out[f"req-{i}"]["response"]["status_code"] == 200
        message = body["choices"][0]["message"]
        assert message["role"] == "assistant" and isinstance(message["content"], str)
        assert body["usage"]["prompt_tokens"] > 0
    assert out["legacy"]["error"]["code"] == "input" and "/v1/chat/completions" in out["legacy"]["error"]["message"]
    assert {b["path"] for b in gateway.stats.bodies} == {"/v2/router/chat/completions"}
    assert gateway.stats.bodies[0]["body"]["max_completion_tokens"] == 20  # the line's own fields win


# --- resume, cache, budget, plan, report ----------------------------------------------------------------------


def test_chat_job_resumes_hits_the_cache_and_keeps_its_budget(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    cached = {"cache": {"type": "exact_match", "ttl": 3600}, "response_format": LABEL_FORMAT}
    spec = parse_spec(_chat(make_spec, request=cached))
    first = run_job(spec, options(limit=100))
    assert first.ok == 100
    second = run_job(spec, options())
    assert second.skipped == 100 and second.ok == N_REVIEWS - 100  # resumed, not asked again
    calls = gateway.stats.total
    assert calls <= N_REVIEWS
    again = run_job(spec, options(fresh=True))
    assert again.ok == again.cached == N_REVIEWS and gateway.stats.total == calls  # every answer from the cache
    rows = _rows(tmp_path / "out" / "t.parquet")
    assert all(r["cached"] and r["sentiment"] is not None for r in rows)  # typed columns from the cache too

    cap = 0.01
    budgeted = parse_spec(_chat(make_spec, output={"path": str(tmp_path / "b.parquet")},
                                request={"model": "openai/gpt-4o"}, limits={"max_cost_usd": cap, "concurrency": 4}))
    res = run_job(budgeted, options())
    assert res.status == "budget" and res.exit_code == 7
    spent = sum(r["cost_usd"] or 0 for r in _rows(tmp_path / "b.parquet"))
    assert 0 < spent <= cap and res.ok < N_REVIEWS


def test_plan_counts_the_text_of_every_message(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    spec = parse_spec(_chat(make_spec, request={"max_completion_tokens": 40}))
    plan = make_plan(spec)
    sample = pq.read_table(SAMPLES / "reviews.parquet").column("text").to_pylist()
    chars = sum(len(MESSAGES[0]["content"]) + 1 + len(ASK.replace("{{text}}", t)) for t in sample)
    assert plan.prompt_chars == chars and plan.completion_tokens_max == 40 * N_REVIEWS
    assert gateway.stats.total == 0


def test_report_by_a_schema_column(make_spec, gateway: Gateway, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "labels.parquet"
    run_job(parse_spec(_chat(make_spec, output={"path": str(out)}, request={"response_format": LABEL_FORMAT})),
            options())
    capsys.readouterr()
    assert main(["report", str(out), "--by", "sentiment", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    groups = {g["sentiment"]: g["rows"] for g in report["usage"]}
    counts: dict[str, int] = {}
    for r in _rows(out):
        counts[r["sentiment"]] = counts.get(r["sentiment"], 0) + 1
    assert groups == counts


def test_the_demo_is_a_structured_labeling_run(tmp_path: Path) -> None:
    from batcher import load_spec

    root = SAMPLES.parent
    spec = load_spec(root / "jobs" / "demo.yaml")
    assert spec.is_chat and spec.endpoint.base_url == "local" and spec.endpoint.api_key_env
    spec = spec.model_copy(update={"input": spec.input.model_copy(update={"path": root / "samples" / "reviews.parquet"}),
                                   "cache_dir": tmp_path / "cache"})
    result = run_job(spec, options(output=tmp_path / "demo.parquet"))
    assert result.status == "finished" and result.ok == N_REVIEWS
    schema = pq.read_schema(tmp_path / "demo.parquet")
    assert schema.field("sentiment").type == pa.string() and schema.field("confidence").type == pa.float64()
    assert schema.field("topics").type == pa.list_(pa.string())


def test_an_edited_schema_file_is_a_new_job_not_a_resume(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    from batcher.errors import ResumeError

    schema_file = tmp_path / "label.json"
    schema_file.write_text(json.dumps(SCHEMA))
    fmt = {"type": "json_schema", "json_schema": {"name": "label", "schema": str(schema_file)}}
    spec = parse_spec(_chat(make_spec, request={"response_format": fmt}))
    assert run_job(spec, options(limit=10)).ok == 10
    schema_file.write_text(json.dumps({**SCHEMA, "properties": {**SCHEMA["properties"], "extra": {"type": "string"}}}))
    with pytest.raises(ResumeError):
        run_job(spec, options())
    assert run_job(spec, options(fresh=True)).ok == N_REVIEWS
    assert "extra" in pq.read_schema(tmp_path / "out" / "t.parquet").names


def test_a_body_the_gateway_refuses_is_an_error_row_with_its_message(make_spec, gateway: Gateway,
                                                                     tmp_path: Path) -> None:
    lines = [{"custom_id": "good", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "hi"}]}},
             {"custom_id": "bad", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "hi"}], "temperature": 7}}]
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    spec = parse_spec(make_spec(input={"path": str(src), "format": "openai_batch", "id_column": None, "prompt": None},
                                output={"path": str(tmp_path / "o.jsonl")}, request={"max_tokens": None}))
    assert run_job(spec, options()).errors == 1
    rows = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())}
    assert rows["good"]["status"] == "ok"
    bad = rows["bad"]
    # A batch line's body is checked like the spec's request fields (fix3): the out-of-range value is an input
    # error row naming its line and field, and no call is made for it.
    assert bad["status"] == "error" and bad["error_kind"] == "input" and bad["attempts"] == 0
    assert bad["error"].startswith("line 2: body.temperature:")
    assert gateway.stats.total == 1


def test_fallbacks_and_the_load_balancer_route_chat_rows(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    gateway.set_faults([{"kind": "status", "status": 503, "model": "openai/gpt-4o-mini"}])
    spec = parse_spec(_chat(make_spec, endpoint={"api": "openai"}, request={
        "retry": {"count": 1, "on_codes": [503]}, "fallbacks": [{"model": "openai/gpt-4o"}],
        "response_format": LABEL_FORMAT}))
    result = run_job(spec, options(limit=20))
    assert result.ok == 20
    rows = _rows(tmp_path / "out" / "t.parquet")
    assert all(r["model"] == "openai/gpt-4o" and r["attempts"] == 3 and r["sentiment"] for r in rows)
    gateway.set_faults([])
    balanced = parse_spec(_chat(make_spec, output={"path": str(tmp_path / "lb.parquet")}, request={
        "model": None, "load_balancer": {"type": "weight_based", "models": [
            {"model": "openai/gpt-4o-mini", "weight": 0.5}, {"model": "openai/gpt-4o", "weight": 0.5}]}}))
    assert run_job(balanced, options()).ok == N_REVIEWS
    models = {r["model"] for r in _rows(tmp_path / "lb.parquet")}
    assert models == {"openai/gpt-4o-mini", "openai/gpt-4o"}


def test_asking_again_after_a_billed_broken_answer_never_passes_the_cap(make_spec, gateway: Gateway,
                                                                       tmp_path: Path) -> None:
    # Completion tokens only are priced, and every answer is cut at 5 tokens (so it is not JSON): each answer
    # costs exactly the reservation's worst case, and a row asked twice costs two of them.
    gateway.set_faults([{"kind": "not_json"}])
    per_answer = 5 * 1000 / 1e6
    spec = parse_spec(_chat(make_spec, request={"max_completion_tokens": 5, "response_format": LABEL_FORMAT},
                            prices={"openai/gpt-4o-mini": {"prompt": 0, "completion": 1000}},
                            limits={"max_cost_usd": 1.6 * per_answer, "concurrency": 1}))
    result = run_job(spec, options(limit=3))
    rows = [r for r in _rows(tmp_path / "out" / "t.parquet") if r["status"] == "error"]
    spent = sum(r["cost_usd"] or 0 for r in rows)
    assert result.status == "budget" and gateway.stats.total == 1  # the second attempt would not fit
    assert spent == pytest.approx(per_answer) and spent <= 1.6 * per_answer
    assert rows[0]["error_kind"] == "schema" and "not asked again" in rows[0]["error"]


# --- the outside tester's findings (fix4) ---------------------------------------------------------------------


@pytest.mark.parametrize("prop_type", ["string", "integer"])
def test_a_schema_property_named_id_never_overwrites_the_row_ids(make_spec, gateway: Gateway, tmp_path: Path,
                                                                 prop_type: str) -> None:
    schema = {"type": "object", "properties": {"id": {"type": prop_type}, "keep": {"type": "string"},
                                               "_i": {"type": "string"}, "unconfirmed_usd": {"type": "string"},
                                               "sentiment": {"type": "string"}},
              "required": ["id", "sentiment"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    spec = parse_spec(_chat(make_spec, request={"response_format": fmt},
                            output={"path": str(tmp_path / "o.parquet"), "keep_columns": ["rating"]}))
    shape = shape_of_job(spec)
    assert set(shape.extra_columns) >= {"answer_id", "answer_keep", "answer__i", "answer_unconfirmed_usd", "sentiment"}
    result = run_job(spec, options(limit=20))
    assert result.status == "finished" and result.ok == 20
    rows = _rows(tmp_path / "o.parquet")
    expected = [r["review_id"] for r in pq.read_table(SAMPLES / "reviews.parquet").slice(0, 20).to_pylist()]
    assert [r["review_id"] for r in rows] == expected
    assert all(r["rating"] is not None for r in rows)
    assert all(r["answer_id"] == json.loads(r["text"])["id"] for r in rows)
    # the journal holds the row ids: a rerun resumes them all, plan reads it too
    again = run_job(spec, options(limit=20))
    assert again.status == "finished" and gateway.stats.total == 20


def test_a_row_value_never_sends_a_local_file_that_is_not_an_attachment(make_spec, gateway: Gateway,
                                                                          tmp_path: Path, monkeypatch) -> None:
    import os

    monkeypatch.setenv("ORQ_API_KEY", "sk-canary-attachment-0000")
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(32))
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(16)
    pdf = b"%PDF-1.4\n% tiny\n"
    (tmp_path / "a.png").write_bytes(png)
    (tmp_path / "fake.png").write_text("not an image at all")
    (tmp_path / "big.png").write_bytes(png + bytes(5000))
    (tmp_path / "a.wav").write_bytes(wav)
    (tmp_path / "a.pdf").write_bytes(pdf)
    os.mkfifo(tmp_path / "fifo.png")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(png)
    data = tmp_path / "data"
    data.mkdir()
    rows = {
        "ok": {"img": str(tmp_path / "a.png"), "audio": str(tmp_path / "a.wav"), "doc": str(tmp_path / "a.pdf")},
        "environ": {"img": "/proc/self/environ"},
        "shadow": {"img": "/etc/passwd"},
        "outside": {"img": str(outside)},
        "fake": {"img": str(tmp_path / "fake.png")},
        "big": {"img": str(tmp_path / "big.png")},
        "fifo": {"img": str(tmp_path / "fifo.png")},
        "audio_not_audio": {"audio": str(tmp_path / "a.png")},
        "doc_not_pdf": {"doc": str(tmp_path / "a.png")},
    }
    src = write_jsonl(tmp_path / "in.jsonl", [
        {"id": k, "img": v.get("img", "https://x/y.png"), "audio": v.get("audio", base64.b64encode(wav).decode()),
         "doc": v.get("doc", "data:application/pdf;base64," + base64.b64encode(pdf).decode())}
        for k, v in rows.items()])
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "Describe."},
        {"type": "image_url", "image_url": {"url": "{{img}}"}},
        {"type": "input_audio", "input_audio": {"data": "{{audio}}", "format": "wav"}},
        {"type": "file", "file": {"file_data": "{{doc}}"}}]}]
    spec = parse_spec(_chat(make_spec, input={"path": str(src), "id_column": "id", "messages": msgs,
                                              "max_attachment_bytes": 1000}))
    run_job(spec, options())
    sent = json.dumps(list(gateway.stats.bodies))
    assert "sk-canary" not in sent and "ORQ_API_KEY" not in sent and "root:" not in sent
    assert gateway.stats.total == 1
    parts = gateway.stats.bodies[0]["body"]["messages"][0]["content"]
    assert parts[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert parts[2]["input_audio"]["data"] == base64.b64encode(wav).decode()
    assert parts[3]["file"]["file_data"] == "data:application/pdf;base64," + base64.b64encode(pdf).decode()
    out = {r["id"]: r for r in _rows(tmp_path / "out" / "t.parquet")}
    assert out["ok"]["status"] == "ok"
    why = {"environ": "system file", "shadow": "outside the folders", "outside": "outside the folders",
           "fake": "not an image", "big": "over input.max_attachment_bytes", "fifo": "not a regular file",
           "audio_not_audio": "is not audio", "doc_not_pdf": "is not a PDF"}
    for rid, text in why.items():
        r = out[rid]
        assert r["status"] == "error" and r["error_kind"] == "input", rid
        assert text in r["error"] and repr(rid) in r["error"] and "input.messages[0].content[" in r["error"], r["error"]
    # a messages column's local image goes by the same rule
    col = write_jsonl(tmp_path / "col.jsonl", [
        {"id": "m1", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": str(tmp_path / "a.png")}}]}]},
        {"id": "m2", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "/proc/self/environ"}}]}]}])
    gateway.stats.reset()
    spec = parse_spec(_chat(make_spec, input={"path": str(col), "id_column": "id", "messages_column": "messages",
                                              "prompt": None}, output={"path": str(tmp_path / "m.parquet")}))
    run_job(spec, options())
    assert gateway.stats.total == 1
    assert gateway.stats.bodies[0]["body"]["messages"][0]["content"][1]["image_url"]["url"].startswith(
        "data:image/png;base64,")
    m2 = {r["id"]: r for r in _rows(tmp_path / "m.parquet")}["m2"]
    assert m2["status"] == "error" and "messages column[0].content[1].image_url.url" in m2["error"]


def test_every_billed_answer_is_on_its_row_and_in_the_summary_and_the_budget(make_spec, gateway: Gateway,
                                                                            tmp_path: Path) -> None:
    clean = parse_spec(_chat(make_spec, request={"response_format": LABEL_FORMAT},
                             output={"path": str(tmp_path / "clean.parquet")}))
    assert run_job(clean, options(limit=60)).ok == 60
    before = {r["review_id"]: r for r in _rows(tmp_path / "clean.parquet")}
    gateway.set_faults([{"kind": "schema_violation", "first": 1, "prompt_contains": "a"},  # once: retried, ok
                        {"kind": "schema_violation", "prompt_contains": "refund"}])  # always: an error row
    faulty = parse_spec(_chat(make_spec, request={"response_format": LABEL_FORMAT},
                              output={"path": str(tmp_path / "f.parquet")}))
    result = run_job(faulty, options(limit=60))
    rows = _rows(tmp_path / "f.parquet")
    retried = [r for r in rows if r["status"] == "ok" and r["attempts"] == 2]
    assert retried and result.errors
    for r in retried:  # both answers' prompts were billed: twice the clean row's
        assert r["prompt_tokens"] == 2 * before[r["review_id"]]["prompt_tokens"]
        assert r["completion_tokens"] > before[r["review_id"]]["completion_tokens"]
    assert result.prompt_tokens == sum(r["prompt_tokens"] or 0 for r in rows)
    assert result.completion_tokens == sum(r["completion_tokens"] or 0 for r in rows)
    assert result.cost_usd == pytest.approx(sum(r["cost_usd"] or 0 for r in rows))
    # under a cap: what the run says it spent is what the file holds, and never over the cap
    gateway.set_faults([{"kind": "schema_violation", "first": 1, "prompt_contains": "a"}])
    cap = result.cost_usd / 3
    capped = parse_spec(_chat(make_spec, request={"response_format": LABEL_FORMAT}, limits={"max_cost_usd": cap},
                              output={"path": str(tmp_path / "c.parquet")}, name="capped"))
    res = run_job(capped, options(limit=60))
    spent = sum(r["cost_usd"] or 0 for r in _rows(tmp_path / "c.parquet"))
    assert res.status == "budget" and res.cost_usd == pytest.approx(spent) and spent <= cap
    assert f"${spent:.4f}" in res.message


def test_validate_names_every_orq_only_field_for_api_openai(make_spec, tmp_path: Path) -> None:
    chat = _chat(make_spec, endpoint={"api": "openai"}, input={"inputs_columns": ["customer_name"]},
                 request={"name": "labeler", "guardrails": [{"id": "g", "execute_on": "input"}],
                          "orq": {"identity": {"id": "u1"}, "thread": {"id": "t1"}}})
    with pytest.raises(SpecError) as err:
        parse_spec(chat)
    for field in ("request.name", "request.guardrails", "request.orq.identity", "request.orq.thread",
                  "input.inputs_columns"):
        assert field in str(err.value), field
    prompt = make_spec(endpoint={"api": "openai"}, request={"name": "labeler", "orq": {"thread": {"id": "t1"}}})
    with pytest.raises(SpecError) as err:
        parse_spec(prompt)
    assert "request.name" in str(err.value) and "request.orq.thread" in str(err.value)
    # routing fields are still fine with api: openai
    ok = _chat(make_spec, endpoint={"api": "openai"}, request={"retry": {"count": 2, "on_codes": [500]}})
    assert parse_spec(ok).endpoint.api == "openai"


def test_a_schema_file_path_expands_variables(make_spec, gateway: Gateway, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "s.json").write_text(json.dumps(SCHEMA))
    monkeypatch.setenv("SD", str(tmp_path / "schemas"))
    fmt = {"type": "json_schema", "json_schema": {"name": "label", "schema": "$SD/s.json"}}
    spec = parse_spec(_chat(make_spec, request={"response_format": fmt}))
    assert run_job(spec, options(limit=5)).ok == 5
    assert gateway.stats.bodies[-1]["body"]["response_format"]["json_schema"]["schema"] == SCHEMA
    monkeypatch.delenv("SD")
    with pytest.raises(SpecError, match=r"\$SD"):
        parse_spec(_chat(make_spec, request={"response_format": fmt}))


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_report_by_a_list_column_counts_each_element(make_spec, gateway: Gateway, tmp_path: Path, capsys: Any,
                                                     suffix: str) -> None:
    out = tmp_path / f"labels.{suffix}"
    run_job(parse_spec(_chat(make_spec, output={"path": str(out)}, request={"response_format": LABEL_FORMAT})),
            options(limit=60))
    rows = _rows(out) if suffix == "parquet" else [json.loads(x) for x in out.read_text().splitlines()]
    counts: dict[Any, int] = {}
    for r in rows:
        for t in r["topics"] or [None]:
            counts[t] = counts.get(t, 0) + 1
    assert sum(counts.values()) > len(rows)  # some rows have several topics
    capsys.readouterr()
    assert main(["report", str(out), "--by", "topics", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {g["topics"]: g["rows"] for g in report["usage"]} == counts
    assert report["total"]["rows"] == len(rows) and "each element" in report["note"]
    assert main(["report", str(out), "--by", "topics"]) == 0
    assert "counts once in the group of each element" in capsys.readouterr().out


def test_plan_and_the_budget_count_attachments(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    from batcher.attachments import IMAGE_TOKENS, IMAGE_TOKENS_BOUND
    from batcher.budget import worst_case
    from batcher.plan import render_text
    from batcher.prices import Price, PriceTable

    png = b"\x89PNG\r\n\x1a\n" + bytes(4_000_000)
    (tmp_path / "big.png").write_bytes(png)
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40_000)
    (tmp_path / "a.wav").write_bytes(wav)
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "img": str(tmp_path / "big.png"),
                                               "audio": str(tmp_path / "a.wav")} for i in range(3)])
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Describe."},
                                         {"type": "image_url", "image_url": {"url": "{{img}}"}},
                                         {"type": "input_audio", "input_audio": {"data": "{{audio}}",
                                                                                 "format": "wav"}}]}]
    spec = parse_spec(_chat(make_spec, input={"path": str(src), "id_column": "id", "messages": msgs}))
    plan = make_plan(spec)
    assert plan.attachments == 6
    assert plan.prompt_tokens >= 3 * (IMAGE_TOKENS + len(wav) // 4)
    assert "6 attachment(s)" in render_text(plan) and gateway.stats.total == 0
    # the budget's prompt bound covers them: an image is IMAGE_TOKENS_BOUND, audio a token a byte
    prices = PriceTable({"m": Price(prompt=1_000_000, completion=0)})
    text_only = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with_media = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}]}]}
    a = worst_case(prices, ["m"], "hi", text_only)
    b = worst_case(prices, ["m"], "hi", with_media)
    assert a is not None and b is not None and b - a >= IMAGE_TOKENS_BOUND + len(wav) - 1


def test_a_chat_batch_lines_orq_only_fields_and_bad_schema_are_error_rows(make_spec, gateway: Gateway,
                                                                          tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    lines = [
        {"custom_id": "guard", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "openai/gpt-4o-mini", "messages": msgs, "guardrails": [{"id": "g", "execute_on": "input"}]}},
        {"custom_id": "schema", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "openai/gpt-4o-mini", "messages": msgs, "response_format": {
             "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}},
        {"custom_id": "fine", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "openai/gpt-4o-mini", "messages": msgs}},
    ]
    src = write_jsonl(tmp_path / "b.jsonl", lines)
    spec = make_spec(input={"path": str(src), "format": "openai_batch", "id_column": None, "prompt": None},
                     endpoint={"api": "openai"})
    spec["request"].pop("max_tokens", None)
    run_job(parse_spec(spec), options())
    rows = {r["custom_id"]: r for r in _rows(tmp_path / "out" / "t.parquet")}
    assert rows["fine"]["status"] == "ok" and gateway.stats.total == 1
    assert rows["guard"]["status"] == "error" and "body.guardrails: orq-only" in rows["guard"]["error"]
    assert rows["schema"]["status"] == "error" and "not a valid JSON schema" in rows["schema"]["error"]
