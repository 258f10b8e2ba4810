"""The exact-match cache: keys, TTL, reruns, misses, errors and in-run duplicates."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher import parse_spec, run_job
from batcher.cache import ResponseCache
from batcher.call import Records
from batcher.gateway import Fault, Gateway
from batcher.prices import PriceTable
from batcher.shapes.completions import _KEY_FIELDS, _SAMPLING_DEFAULTS, _canonical, _digest, _normalised
from batcher.sinks import encode_lines
from batcher.sources import SourceRow
from batcher.wire import cache_key

from .conftest import ROOT, options, write_jsonl

CACHE = {"type": "exact_match", "ttl": 3600}
BASE = {"model": "m", "prompt": "p", "max_tokens": 16}


def test_defaults_hash_like_omitted_and_key_never_has_headers() -> None:
    k = cache_key("e", BASE)
    assert k == cache_key("e", {**BASE, "temperature": 1, "top_p": 1, "n": 1, "echo": False, "stop": None,
                                "frequency_penalty": 0, "presence_penalty": 0, "seed": None})
    assert k == cache_key("e", {**BASE, "stop": []}) == cache_key("e", {**BASE, "temperature": 1.0})
    assert cache_key("e", {**BASE, "stop": "x"}) == cache_key("e", {**BASE, "stop": ["x"]})
    # routing and identity fields do not change the answer, so they do not change the key
    assert k == cache_key("e", {**BASE, "retry": {"count": 2}, "orq": {"thread": {"id": "t"}}, "user": "u"})
    for change in ({"temperature": 0.5}, {"seed": 1}, {"stop": ["\n"]}, {"max_tokens": 17}, {"model": "m2"},
                   {"prompt": "q"}, {"n": 2}, {"orq": {"inputs": {"a": 1}}}):
        assert cache_key("e", {**BASE, **change}) != k, change
    assert cache_key("other", BASE) != k


@given(st.dictionaries(st.sampled_from(["temperature", "top_p", "seed", "n", "max_tokens"]),
                       st.integers(min_value=0, max_value=5)))
def test_key_is_independent_of_field_order(fields: dict[str, int]) -> None:
    body = {**BASE, **fields}
    assert cache_key("e", body) == cache_key("e", dict(reversed(list(body.items()))))


def _key_the_long_way(endpoint: str, body: dict) -> str:
    material = {"endpoint": endpoint, "model": body.get("model"), "prompt": body.get("prompt")}
    for k in _KEY_FIELDS:
        if k in body:
            v = _normalised(k, body[k])
            if k == "max_tokens" or v != _SAMPLING_DEFAULTS.get(k):
                material[k] = v
    for k in ("prompt", "inputs", "knowledge_bases"):
        if (body.get("orq") or {}).get(k) is not None:
            material["orq." + k] = body["orq"][k]
    return _digest(_canonical(material))


_TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)


@given(st.lists(st.fixed_dictionaries(
    {"model": st.sampled_from(["m", "openai/gpt-4o", "é"]), "prompt": _TEXT},
    optional={"temperature": st.one_of(st.integers(0, 2), st.floats(0, 2), st.none()),
              "top_p": st.sampled_from([1, 1.0, 0.5]), "seed": st.integers(-5, 5), "max_tokens": st.integers(1, 9),
              "n": st.integers(1, 3), "stop": st.one_of(_TEXT, st.lists(_TEXT, max_size=2)),
              "echo": st.booleans(), "orq": st.fixed_dictionaries({}, optional={
                  "inputs": st.dictionaries(_TEXT, _TEXT, max_size=2), "prompt": st.just({"id": "p1"})})}),
    min_size=1, max_size=6))
def test_key_made_around_the_prompt_is_the_canonical_texts(bodies: list[dict]) -> None:
    # The rest of a body's hashed text is made once and the prompt put in its place (a cached rerun's CPU):
    # every key is still the hash of the one canonical text, whatever came before it.
    for body in bodies:
        assert cache_key("e", body) == _key_the_long_way("e", body), body


_ANSWER = st.fixed_dictionaries({
    "text": st.one_of(_TEXT, st.none()), "finish_reason": st.sampled_from(["stop", "length", None]),
    "choices": st.one_of(st.none(), st.lists(st.fixed_dictionaries({"text": _TEXT, "index": st.integers(0, 3)}))),
    "model": st.one_of(st.none(), st.just(""), st.just("openai/gpt-4o")), "completion_id": _TEXT,
    "prompt_tokens": st.integers(0, 10**6), "completion_tokens": st.one_of(st.none(), st.integers(0, 10**6)),
})


@given(_ANSWER, st.one_of(st.integers(-(2**63), 2**63 - 1), _TEXT), st.integers(0, 10**9))
def test_a_cached_rows_line_is_the_one_its_record_encodes(answer: dict, ident, index: int) -> None:
    # A cache hit's journal line is spliced from the stored JSON text: it must hold what `Records.ok` gives.
    records = Records(PriceTable({}))
    row = SourceRow(index=index, id=ident, prompt="p")
    stored = Records.for_cache(answer, answer.get("model") or "asked/model")
    text = json.dumps(stored, separators=(",", ":"))  # as ResponseCache.put_many stores it
    line = records.cached_line(row, text)
    assert line is not None and line.endswith(b"\n") and line.count(b"\n") == 1
    expected = records.ok(row, json.loads(text), cached=True, attempts=0, latency_ms=0.0, asked_model="asked/model")
    assert json.loads(line) == json.loads(encode_lines((expected,)))
    assert json.loads(line)["model"] == (answer.get("model") or "asked/model")


def test_ttl_expiry_with_a_fake_clock(tmp_path: Path) -> None:
    now = [1000.0]
    cache = ResponseCache(tmp_path, clock=lambda: now[0])
    cache.put_many([("k", {"text": "hi"}, 60)])
    assert cache.get_many(["k"]) == {"k": {"text": "hi"}}
    now[0] += 59
    assert "k" in cache.get_many(["k"])
    now[0] += 2
    assert cache.get_many(["k"]) == {}


def _stored(directory: Path) -> dict[str, float]:
    """key -> expiry, read from the SQLite file itself."""
    with sqlite3.connect(directory / "responses.sqlite") as db:
        return dict(db.execute("SELECT key, expires FROM responses"))


def test_expired_entries_are_purged_in_bounded_steps(tmp_path: Path) -> None:
    now = [1000.0]
    cache = ResponseCache(tmp_path, clock=lambda: now[0], purge_batch=10)
    cache.put_many([(f"old{i}", {"t": i}, 5) for i in range(25)] + [("fresh", {"t": 0}, 10_000)])
    cache.close()
    now[0] += 60  # the 25 "old" entries have expired, "fresh" has not
    cache = ResponseCache(tmp_path, clock=lambda: now[0], purge_batch=10)
    assert len(_stored(tmp_path)) == 26 - 10  # opening removes one bounded step, not the whole backlog
    cache.put_many([(f"new{i}", {"t": i}, 60) for i in range(10)])  # every `purge_batch` puts: one more step
    left = _stored(tmp_path)
    assert len([k for k in left if k.startswith("old")]) == 5 and "fresh" in left
    assert all(f"new{i}" in left for i in range(10))


def test_a_run_removes_expired_entries_from_the_file(make_spec, tmp_path: Path) -> None:
    old = ResponseCache(tmp_path / "cache", clock=lambda: time.time() - 10_000)
    old.put_many([(f"stale{i}", {"text": "x"}, 60) for i in range(50)])
    old.close()
    run_job(parse_spec(make_spec(request={"cache": CACHE})), options(limit=5))
    left = _stored(tmp_path / "cache")
    assert not [k for k in left if k.startswith("stale")] and len(left) == 5


def test_the_specs_ttl_is_what_the_cache_stores(make_spec, tmp_path: Path) -> None:
    # ttl 7: the expiry in the file is the store time + 7 s (the store time lies between before and after)
    before = time.time()
    run_job(parse_spec(make_spec(request={"cache": {"type": "exact_match", "ttl": 7}})), options(limit=5))
    after = time.time()
    expiries = _stored(tmp_path / "cache").values()
    assert len(expiries) == 5 and all(before + 7 <= e <= after + 7 for e in expiries)


def test_unwritable_cache_location_warns_once_and_runs_without(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = ResponseCache(blocker / "cache")
    assert not cache.enabled and cache.warning is not None
    assert cache.get_many(["k"]) == {}
    cache.put_many([("k", {}, 1)])
    assert capsys.readouterr().err.count("warning") == 1


def test_rerun_from_cache_makes_zero_calls(make_spec, gateway: Gateway) -> None:
    spec = parse_spec(make_spec(request={"cache": CACHE}))
    first = run_job(spec, options(limit=50))
    calls = gateway.stats.total
    # the samples repeat a few reviews word for word: those rows are answered once
    assert first.ok == 50 and calls == 50 - first.cached and calls == first.attempts
    before = pl.read_parquet(spec.output.path).sort("review_id")
    again = run_job(spec, options(limit=50, fresh=True))  # the output and its journal cleared
    assert gateway.stats.total == calls and again.cached == 50 and again.attempts == 0
    after = pl.read_parquet(spec.output.path).sort("review_id")
    assert after["cached"].all() and after["attempts"].sum() == 0 and after["cost_usd"].sum() == 0
    # every column but how the row was answered is the paid run's: the answer, its tokens, the model, the id
    timing = ["cached", "attempts", "latency_ms", "http_status", "cost_usd"]
    assert after.drop(timing).equals(before.drop(timing))
    assert after["text"].null_count() == 0 and after["model"].null_count() == 0


def test_a_cache_written_by_an_earlier_version_still_answers(make_spec, gateway: Gateway) -> None:
    # Records stored before `Records.for_cache` (model not first) are read the long way, with the same result.
    spec = parse_spec(make_spec(request={"cache": CACHE}))
    run_job(spec, options(limit=20))
    before = pl.read_parquet(spec.output.path).sort("review_id")
    db = sqlite3.connect(spec.cache_dir / "responses.sqlite")
    for key, record in db.execute("SELECT key, record FROM responses").fetchall():
        rec = json.loads(record)
        assert next(iter(rec)) == "model"
        db.execute("UPDATE responses SET record = ? WHERE key = ?", (json.dumps(rec, sort_keys=True), key))
    db.commit()
    db.close()
    calls = gateway.stats.total
    again = run_job(spec, options(limit=20, fresh=True))
    assert again.cached == 20 and gateway.stats.total == calls
    timing = ["cached", "attempts", "latency_ms", "http_status", "cost_usd"]
    assert pl.read_parquet(spec.output.path).sort("review_id").drop(timing).equals(before.drop(timing))


@pytest.mark.parametrize("change", [{"temperature": 0.5}, {"seed": 7}, {"stop": ["\n"]}, {"max_tokens": 17},
                                    {"model": "openai/gpt-4o"}])
def test_changing_what_shapes_the_answer_misses(make_spec, gateway: Gateway, change) -> None:
    run_job(parse_spec(make_spec(request={"cache": CACHE})), options(limit=5))
    gateway.stats.reset()
    result = run_job(parse_spec(make_spec(request={"cache": CACHE, **change})), options(limit=5, fresh=True))
    assert gateway.stats.total == 5 and result.cached == 0


def test_errors_are_never_cached(make_spec, gateway: Gateway) -> None:
    gateway.set_faults([Fault("status", status=500)])
    spec = parse_spec(make_spec(request={"cache": CACHE}))
    assert run_job(spec, options(limit=3)).errors == 3
    gateway.set_faults([])
    gateway.stats.reset()
    result = run_job(spec, options(limit=3, fresh=True))
    assert result.ok == 3 and result.cached == 0 and gateway.stats.total == 3


def test_duplicates_in_one_run_make_one_call(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    rows = [{"id": i, "text": f"same question {i % 3}"} for i in range(30)]
    src = write_jsonl(tmp_path / "dups.jsonl", rows)
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{text}}"},
                                request={"cache": CACHE}))
    result = run_job(spec, options())
    assert result.ok == 30 and gateway.stats.total == 3 and result.cached == 27
    df = pl.read_parquet(spec.output.path)
    assert df.group_by(pl.col("id") % 3).agg(pl.col("text").n_unique())["text"].max() == 1


def test_cache_never_holds_the_key(make_spec, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ORQ_API_KEY", "sk-canary-cache-1234567890")
    spec = parse_spec(make_spec(request={"cache": CACHE}))
    run_job(spec, options(limit=10))
    for f in (tmp_path / "cache").iterdir():
        assert b"sk-canary-cache" not in f.read_bytes()


def test_a_rerun_answered_from_the_cache_loads_no_http_client(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    # Start-up is a good share of a cached rerun: aiohttp (and jsonschema, for a job without a schema) is
    # imported on the first call, and a rerun answered from the cache makes none.
    spec_dict = make_spec(request={"cache": CACHE})
    run_job(parse_spec(spec_dict), options(limit=30))
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(spec_dict))
    code = f"""
import sys
from batcher.cli import main
rc = main(["run", {str(spec_file)!r}, "--fresh", "--limit", "30", "--quiet"])
print(rc, sorted(m for m in ("aiohttp", "jsonschema") if m in sys.modules))
"""
    calls = gateway.stats.total
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "[]"]
    assert gateway.stats.total == calls
    assert pl.read_parquet(spec_dict["output"]["path"])["cached"].all()
