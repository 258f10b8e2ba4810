"""Scripted faults on the simulated gateway, each asserting the outcome and the attempt count."""

from __future__ import annotations

import polars as pl

from batcher import parse_spec, run_job
from batcher.gateway import Fault, Gateway, GatewayConfig, serve_in_thread

from .conftest import options

RETRY = {"count": 3, "on_codes": [429, 500, 502, 503, 504]}


def _run(make_spec, gateway: Gateway, faults: list[Fault], limit: int = 5, api: str = "openai", input=None,
         **request):
    gateway.set_faults(faults)
    spec = parse_spec(make_spec(endpoint={"api": api}, request={"retry": RETRY, **request}, input=input or {}))
    result = run_job(spec, options(limit=limit, fresh=True))
    return result, pl.read_parquet(spec.output.path) if result.status == "finished" else None


def test_429_with_retry_after_waits_and_pauses_the_pool(make_spec, gateway: Gateway) -> None:
    _, df = _run(make_spec, gateway, [Fault("status", status=429, first=1, retry_after="1")], limit=1)
    assert df is not None and df["status"].to_list() == ["ok"] and df["attempts"].to_list() == [2]
    arrivals = gateway.stats.arrivals
    assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= 1.0


def test_5xx_then_success(make_spec, gateway: Gateway) -> None:
    _, df = _run(make_spec, gateway, [Fault("status", status=503, first=2)])
    assert df is not None and (df["status"] == "ok").all() and (df["attempts"] == 3).all()
    assert gateway.stats.total == 15


def test_5xx_forever_then_fallback_model(make_spec, gateway: Gateway) -> None:
    _, df = _run(make_spec, gateway, [Fault("status", status=503, model="openai/gpt-4o-mini")],
                 fallbacks=[{"model": "anthropic/claude-3-5-haiku"}])
    assert df is not None and (df["status"] == "ok").all()
    assert (df["model"] == "anthropic/claude-3-5-haiku").all()
    assert (df["attempts"] == 3 + 1 + 1).all()  # 4 on the primary, 1 on the fallback


def test_400_is_never_retried(make_spec, gateway: Gateway) -> None:
    _, df = _run(make_spec, gateway, [Fault("status", status=400)], fallbacks=[{"model": "other"}])
    assert df is not None and (df["status"] == "error").all()
    assert (df["attempts"] == 1).all() and (df["http_status"] == 400).all()
    assert gateway.stats.total == 5


def test_connection_reset_is_retried(make_spec, gateway: Gateway) -> None:
    _, df = _run(make_spec, gateway, [Fault("reset", first=1)])
    assert df is not None and (df["status"] == "ok").all() and (df["attempts"] == 2).all()


def test_slow_response_past_call_timeout(make_spec, gateway: Gateway) -> None:
    faults = [Fault("slow", delay_s=2.0)]
    _, df = _run(make_spec, gateway, faults, limit=2, retry={"count": 1, "on_codes": [503]},
                 timeout={"call_timeout": 200})
    assert df is not None and (df["status"] == "error").all()
    assert (df["error_kind"] == "timeout").all() and (df["attempts"] == 2).all()
    assert (df["latency_ms"] < 1500).all()  # the deadline cut each attempt, not the server


def test_malformed_body_is_retried_once_then_an_error(make_spec, gateway: Gateway) -> None:
    _, df = _run(make_spec, gateway, [Fault("malformed", first=1)], limit=3)
    assert df is not None and (df["status"] == "ok").all() and (df["attempts"] == 2).all()
    for kind in ("malformed", "html", "missing_choices", "bad_finish_reason"):
        gateway.stats.reset()
        _, df = _run(make_spec, gateway, [Fault(kind)], limit=2, input={"prompt": f"{kind} {{{{text}}}}"})
        assert df is not None and (df["status"] == "error").all(), kind
        assert (df["attempts"] == 2).all() and (df["error_kind"] == "contract").all(), kind


def test_against_orq_5xx_is_left_to_orq_but_429_is_retried(make_spec, gateway: Gateway) -> None:
    _, df = _run(make_spec, gateway, [Fault("status", status=503)], api="orq", limit=2)
    assert df is not None and (df["attempts"] == 1).all() and (df["http_status"] == 503).all()
    body = gateway.stats.bodies[-1]["body"]
    assert body["retry"] == RETRY  # orq got the retry settings and does the retrying
    gateway.stats.reset()
    _, df = _run(make_spec, gateway, [Fault("status", status=429, first=1, retry_after_ms="50")], api="orq", limit=2)
    assert df is not None and (df["status"] == "ok").all() and (df["attempts"] == 2).all()


def test_401_stops_the_run_promptly_and_says_the_key_was_refused(make_spec, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ORQ_API_KEY", "sk-wrong-key")
    with serve_in_thread(GatewayConfig(api_key="sk-right-key", latency_s=0.01)) as gw:
        spec = parse_spec(make_spec(endpoint={"base_url": gw.base_url}, limits={"concurrency": 4}))
        result = run_job(spec, options())
        assert result.status == "fatal" and result.exit_code == 6
        assert "refused the API key" in result.message and "401" in result.message
        assert "sk-wrong-key" not in result.message
        assert gw.stats.total <= 4 + 4  # at most the calls already in flight
    # resumable: with the right key the rerun finishes everything
    monkeypatch.setenv("ORQ_API_KEY", "sk-right-key")
    with serve_in_thread(GatewayConfig(api_key="sk-right-key")) as gw:
        spec = parse_spec(make_spec(endpoint={"base_url": gw.base_url}))
        result = run_job(spec, options())
        assert result.status == "finished" and result.ok == 300


def test_simulated_orq_routes_upstream_failures_server_side(make_spec, gateway: Gateway) -> None:
    # an upstream (provider) failure: orq retries it and falls back itself, batcher sees one attempt
    _, df = _run(make_spec, gateway, [Fault("status", status=503, first=2, upstream=True)], api="orq", limit=3)
    assert df is not None and (df["status"] == "ok").all() and (df["attempts"] == 1).all()
    assert gateway.stats.upstream_retries == 6
    gateway.stats.reset()
    _, df = _run(make_spec, gateway, [Fault("status", status=503, model="openai/gpt-4o-mini", upstream=True)],
                 api="orq", limit=3, fallbacks=[{"model": "openai/gpt-4o"}])
    assert df is not None and (df["status"] == "ok").all() and (df["attempts"] == 1).all()
    assert (df["model"] == "openai/gpt-4o").all()  # the model that answered, as orq reports it


def test_a_429_pauses_every_worker(make_spec) -> None:
    # the first row's prompt gets a 429 with Retry-After: 1; the other workers must wait it out too
    with serve_in_thread(GatewayConfig(latency_s=0.05)) as gw:
        gw.set_faults([Fault("status", status=429, first=1, retry_after="1", prompt_contains="rain jacket. It does")])
        spec = parse_spec(make_spec(endpoint={"base_url": gw.base_url, "api": "openai"},
                                    request={"retry": RETRY}, limits={"concurrency": 4}))
        result = run_job(spec, options(limit=20))
        assert result.ok == 20 and gw.stats.by_status.get(429) == 1
        bodies = list(gw.stats.bodies)
        arrivals = list(gw.stats.arrivals)
    t429 = next(t for t, b in zip(arrivals, bodies, strict=True) if "rain jacket. It does" in b["body"]["prompt"])
    # requests already on the wire when the 429 came back may arrive up to one latency later; after that, none
    # until the server's second has passed
    assert not [t for t in arrivals if t429 + 0.1 < t < t429 + 1.0]
    assert max(arrivals) > t429 + 1.0
