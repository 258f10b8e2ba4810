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
