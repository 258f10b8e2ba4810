"""uvloop is optional: a run uses it when it is installed, can be told not to, and answers the same either way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batcher import parse_spec, run_job
from batcher.errors import SpecError
from batcher.gateway import Gateway
from batcher.runner import event_loop, uvloop_installed

from .conftest import SAMPLES, options

LOOPS = [
    "asyncio",
    pytest.param("uvloop", marks=pytest.mark.skipif(not uvloop_installed(), reason="uvloop is not installed "
                                                                                  "(pip install 'batcher[fast]')")),
]


@pytest.mark.parametrize("loop", LOOPS)
def test_a_run_on_each_loop_answers_every_row_the_same(make_spec: Any, gateway: Gateway, loop: str,
                                                       tmp_path: Any) -> None:
    spec = parse_spec(make_spec(output={"path": str(tmp_path / f"{loop}.parquet")}))
    result = run_job(spec, options(loop=loop))
    assert result.loop == loop
    assert result.status == "finished" and result.ok == 300 and result.exit_code == 0
    df = pl.read_parquet(spec.output.path)
    assert df.height == 300 and (df["status"] == "ok").all()


@pytest.mark.skipif(not uvloop_installed(), reason="uvloop is not installed (pip install 'batcher[fast]')")
def test_uvloop_and_asyncio_write_the_same_output(make_spec: Any, gateway: Gateway, tmp_path: Any) -> None:
    frames = []
    for loop in ("asyncio", "uvloop"):
        spec = parse_spec(make_spec(output={"path": str(tmp_path / f"{loop}.parquet")}))
        assert run_job(spec, options(loop=loop)).loop == loop
        frames.append(pl.read_parquet(spec.output.path).select(
            "review_id", "text", "finish_reason", "status", "prompt_tokens", "completion_tokens", "cost_usd"))
    assert frames[0].equals(frames[1])  # the gateway answers deterministically: the loop changes nothing


def test_auto_takes_uvloop_when_installed_and_the_env_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATCHER_LOOP", raising=False)
    assert event_loop("auto") == ("uvloop" if uvloop_installed() else "asyncio")
    assert event_loop("asyncio") == "asyncio"
    monkeypatch.setenv("BATCHER_LOOP", "asyncio")
    assert event_loop("auto") == "asyncio"
    monkeypatch.setenv("BATCHER_LOOP", "tokio")
    with pytest.raises(SpecError, match="auto, uvloop or asyncio"):
        event_loop("auto")


def test_asking_for_uvloop_without_it_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batcher.runner.uvloop_installed", lambda: False)
    assert event_loop("auto") == "asyncio"  # batcher works the same without it
    with pytest.raises(SpecError, match=r"pip install 'batcher\[fast\]'"):
        event_loop("uvloop")


@pytest.mark.parametrize("loop", LOOPS)
def test_the_in_process_gateway_runs_on_each_loop(tmp_path: Path, loop: str) -> None:
    spec = parse_spec({
        "input": {"path": str(SAMPLES / "reviews.parquet"), "id_column": "review_id", "prompt": "{{text}}"},
        "output": {"path": str(tmp_path / "o.parquet")},
        "endpoint": {"base_url": "local", "local": {"latency_ms": 0, "jitter_ms": 0}},
        "request": {"model": "openai/gpt-4o-mini", "max_tokens": 4},
    })
    result = run_job(spec, options(loop=loop, limit=50))
    assert result.loop == loop and result.ok == 50


def test_a_run_without_uvloop_installed_runs_on_asyncio(make_spec: Any, gateway: Gateway,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("batcher.runner.uvloop_installed", lambda: False)
    monkeypatch.delenv("BATCHER_LOOP", raising=False)
    result = run_job(parse_spec(make_spec()), options())
    assert result.loop == "asyncio" and result.ok == 300
