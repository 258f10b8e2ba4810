"""uvloop is optional: a run uses it when it is installed, can be told not to, and answers the same either way."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from batcher import parse_spec, run_job
from batcher.cli import main as cli_main
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


@pytest.mark.parametrize("error", ["ImportError('built for another Python')", "RuntimeError('broken')"])
def test_a_uvloop_that_fails_to_load_falls_back_to_asyncio(make_spec: Any, gateway: Gateway, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str], error: str) -> None:
    # found (find_spec sees it) but raising when imported: auto runs on asyncio; --loop uvloop is a usage error
    stub = tmp_path / "stub"
    (stub / "uvloop").mkdir(parents=True)
    (stub / "uvloop" / "__init__.py").write_text(f"raise {error}\n")
    monkeypatch.syspath_prepend(str(stub))
    monkeypatch.delitem(sys.modules, "uvloop", raising=False)
    monkeypatch.delenv("BATCHER_LOOP", raising=False)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(make_spec()))
    assert cli_main(["run", str(spec_file), "--limit", "20"]) == 0
    assert "20 ok" in capsys.readouterr().err and gateway.stats.total == 20
    assert cli_main(["run", str(spec_file), "--fresh", "--loop", "uvloop"]) == 2
    assert "uvloop cannot be used" in capsys.readouterr().err and gateway.stats.total == 20
