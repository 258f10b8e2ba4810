"""Routing under failure: the gateway (its own process) fails 20% of calls with 503.

    python benchmarks/faults.py [--rows 5000] [--rate 0.2] [--latency-ms 10]

Prints, for `api: openai` (batcher retries the 503s itself) and `api: orq` (the 503s are upstream provider
failures, which the simulated orq retries server-side with the `retry` batcher forwards, as orq does; batcher
does not retry them again): the share of rows that end ok, batcher's attempts per row, and the gateway's counts
of requests and server-side retries. With retry count 3 the
expected ok share is 1 - rate^4 and attempts per row 1 + rate + rate^2 + rate^3.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import polars as pl

import batcher
from batcher.routing import Backoff


def start_gateway(latency_ms: float, faults: list[dict[str, object]]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "batcher.gateway", "--port", "0", "--latency-ms", str(latency_ms),
         "--no-validate", "--faults", json.dumps(faults)],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, line.strip().rsplit(" ", 1)[-1]


def stats(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url + "/_stats", timeout=10) as r:
        data: dict[str, object] = json.loads(r.read())
        return data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=0.2)
    ap.add_argument("--latency-ms", type=float, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="batcher-faults-"))
    src = tmp / "in.jsonl"
    with open(src, "w") as f:
        for i in range(args.rows):
            f.write(json.dumps({"id": i, "q": f"question {i}"}) + "\n")
    faults = [{"kind": "status", "status": 503, "rate": args.rate, "upstream": True}]
    proc, url = start_gateway(args.latency_ms, faults)
    try:
        print(f"gateway {url}: {args.rate:.0%} of calls fail with 503, latency {args.latency_ms:g} ms; {args.rows} rows")
        print(f"{'api':8} {'ok share':>9} {'attempts/row':>13} {'gateway calls':>14} {'server retries':>15} {'wall s':>7}")
        for api in ("openai", "orq"):
            urllib.request.urlopen(urllib.request.Request(url + "/_reset", method="POST"), timeout=10).read()
            spec = batcher.parse_spec({
                "input": {"path": str(src), "id_column": "id", "prompt": "{{q}}"},
                "output": {"path": str(tmp / f"{api}.parquet")},
                "endpoint": {"base_url": url, "api": api},
                "request": {"model": "m", "max_tokens": 8, "retry": {"count": 3, "on_codes": [429, 500, 502, 503, 504]}},
                "limits": {"concurrency": 64},
            })
            t0 = time.perf_counter()
            # base 50 ms backoff: the real default (0.5 s) would only add idle time to the figure
            batcher.run_job(spec, batcher.RunOptions(quiet=True, handle_signals=False, backoff=Backoff(0.05, 1.0)))
            wall = time.perf_counter() - t0
            df = pl.read_parquet(tmp / f"{api}.parquet")
            ok = (df["status"] == "ok").mean()
            st = stats(url)
            print(f"{api:8} {ok:>9.2%} {df['attempts'].mean():>13.3f} {st['total']:>14} {st['upstream_retries']:>15} {wall:>7.1f}")
        r = args.rate
        print(f"expected with retry count 3: ok share {1 - r**4:.2%}, calls per row {1 + r + r**2 + r**3:.3f}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
