"""The exact-match cache: keys, TTL, reruns, misses, errors and in-run duplicates."""

from __future__ import annotations

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
    assert gateway.stats.total == 5 - result.cached and result.cached < 5


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
