"""The exact-match cache: keys, TTL, reruns, misses, errors and in-run duplicates."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batcher import parse_spec, run_job
from batcher.cache import ResponseCache
from batcher.gateway import Fault, Gateway
from batcher.wire import cache_key

from .conftest import options, write_jsonl

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
    assert after["cached"].all() and after["text"].to_list() == before["text"].to_list()
    assert after["prompt_tokens"].to_list() == before["prompt_tokens"].to_list()


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
