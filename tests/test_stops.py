"""Stops and pauses seen from the gateway's side: a 429 pauses the whole pool whatever the retry settings, and
after the first SIGINT no new request leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from batcher import parse_spec, run_job
from batcher.gateway import Fault, GatewayConfig, serve_in_thread

from .conftest import ROOT, options

# Three rows among the first 24 get one 429 each, with the server's time of 0.6 s.
LIMITED = ("Very disappointed with this yoga mat", "Great value for money. The robot vacuum", "Superb mechanical keyboard")
WAIT_S = 0.6
LATENCY_S = 0.05
# Requests sent before the 429 reached batcher may still arrive a latency (and some scheduling) later.
ON_THE_WIRE_S = 0.25


@pytest.mark.parametrize(
    ("api", "retry"),
    [
        ("openai", {"count": 3, "on_codes": [500, 503]}),  # 429 not listed: still a pause, not an error
        ("openai", None),  # no retry at all
        ("openai", {"count": 2, "on_codes": [429, 500]}),
        ("orq", None),
    ],
)
def test_every_429_pauses_the_pool_and_the_row_is_asked_again(make_spec, api: str, retry: dict[str, Any] | None) -> None:
    faults = [Fault("status", status=429, first=1, retry_after_ms=str(int(WAIT_S * 1000)), prompt_contains=p)
              for p in LIMITED]
    with serve_in_thread(GatewayConfig(latency_s=LATENCY_S, faults=faults)) as gw:
        spec = parse_spec(make_spec(endpoint={"base_url": gw.base_url, "api": api},
                                    request={"retry": retry}, limits={"concurrency": 4}))
        result = run_job(spec, options(limit=24))
        arrivals = list(gw.stats.arrivals)
        prompts = [b["body"]["prompt"] for b in gw.stats.bodies]
        by_status = dict(gw.stats.by_status)
    df = pl.read_parquet(spec.output.path)
    limited_at = [next(t for t, p in zip(arrivals, prompts, strict=True) if needle in p) for needle in LIMITED]
    during = [t for t in arrivals if any(t0 + ON_THE_WIRE_S < t < t0 + WAIT_S for t0 in limited_at)]
    print(f"429 pause ({api}, retry={retry}): {result.ok} rows ok of 24, {by_status.get(429)} 429s, "
          f"{len(during)} requests sent during the pauses")
    assert by_status.get(429) == 3
    assert result.ok == 24 and (df["status"] == "ok").all()
    assert sorted(df["attempts"].to_list()) == [1] * 21 + [2] * 3
    assert during == []
    assert len(arrivals) == 27


def _journaled(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_after_the_first_sigint_no_new_request_leaves(make_spec, tmp_path: Path) -> None:
    concurrency, latency = 4, 1.0
    with serve_in_thread(GatewayConfig(latency_s=latency)) as gw:
        spec = make_spec(endpoint={"base_url": gw.base_url}, limits={"concurrency": concurrency})
        path = tmp_path / "job.json"
        path.write_text(json.dumps(spec))
        out = Path(spec["output"]["path"])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-m", "batcher", "run", str(path), "--quiet"], env=env,
                                stderr=subprocess.PIPE, text=True)
        try:
            # Signal right after a round of requests arrived, once some rows are journaled: every worker is
            # then waiting for an answer (the gateway holds `concurrency` requests), the next answers are
            # most of a latency away, and 2 x concurrency rows sit in the queue.
            stats = gw.stats
            give_up = time.monotonic() + 60
            while True:
                assert time.monotonic() < give_up, "the run never got going"
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                last = stats.arrivals[-1] if len(stats.arrivals) else 0.0
                if (_journaled(out.parent / f".{out.name}.batcher" / "journal.jsonl") >= concurrency
                        and stats.in_flight == concurrency and time.monotonic() - last < 0.2 * latency):
                    at_signal, in_flight = stats.total, stats.in_flight
                    proc.send_signal(signal.SIGINT)
                    break
                time.sleep(0.005)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        after = stats.total
        billed = stats.billed
    print(f"SIGINT: {at_signal} requests before the signal ({in_flight} in flight), {after - at_signal} after")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "rerun" in err
    # workers waiting on an answer at the signal may not send again; only one between answer and send could
    assert after - at_signal <= concurrency - in_flight == 0
    df = pl.read_parquet(out)
    assert df.height == billed == after and (df["status"] == "ok").all()  # every answer paid for is saved


@pytest.mark.parametrize(("signals", "signum"), [(1, signal.SIGINT), (1, signal.SIGTERM), (2, signal.SIGINT)])
def test_a_signal_during_the_final_write_lets_it_finish_and_says_how_to_resume(make_spec, monkeypatch,
                                                                               signals: int, signum: int) -> None:
    # The signal lands when the pool is done and the output is being written (the tester's "SIGINT when the
    # gateway has seen all requests"). One: the write finishes, exit 130/143 with the resume hint. Two: stop at
    # once, no output, the journal whole: the rerun writes it.
    import batcher.runner as runner

    real = runner.finalize

    def finalize(*args: Any, **kwargs: Any) -> int:
        for _ in range(signals):
            os.kill(os.getpid(), signum)  # handled before the next line runs: the main thread gets it
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "finalize", finalize)
    spec = parse_spec(make_spec())
    result = run_job(spec, options(handle_signals=True, limit=40))
    assert result.status == "interrupted" and result.exit_code == 128 + signum
    assert "rerun the same command" in result.message
    if signals == 1:
        assert pl.read_parquet(spec.output.path).height == 40
    else:
        assert not spec.output.path.exists() and "journal" in result.message
    monkeypatch.setattr(runner, "finalize", real)
    again = run_job(spec, options(limit=40))
    assert again.status == "finished" and again.skipped == 40 and pl.read_parquet(spec.output.path).height == 40
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run put the handlers back
