"""Rate limit: `limits.requests_per_minute` set well below what the server and the concurrency allow; the
gateway's own arrival log says what batcher achieved.

    python benchmarks/ratelimit.py [--quick] [--rpm 30000] [--seconds 40] [-c 64] [--latency-ms 50]

Capacity without the limit is C / L (64 / 50 ms = 76,800 requests a minute); the default limit is 30,000 a
minute (500/s), for about 40 s. Figures, from the gateway's `arrivals` timestamps:

- achieved: requests over the span from the first arrival to the last, as a share of the limit (target >= 95%);
- worst 10 s window: the most requests in any 10-second window starting at an arrival, as a share of the
  limit's 10-second share (target <= 105%); the first window is shown too, since a burst at the start is
  the usual way a limiter overshoots.
"""

from __future__ import annotations

import argparse
import bisect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

WINDOW_S = 10.0


def windows(arrivals: list[float]) -> tuple[int, int]:
    """(most arrivals in any WINDOW_S window starting at an arrival, arrivals in the first window)."""
    a = sorted(arrivals)
    worst = 0
    for i, t in enumerate(a):
        worst = max(worst, bisect.bisect_left(a, t + WINDOW_S) - i)
    first = bisect.bisect_left(a, a[0] + WINDOW_S) if a else 0
    return worst, first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rpm", type=float, default=30_000)
    p.add_argument("--seconds", type=float, default=None, help="planned length of the run (default 40; 15 quick)")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    seconds = args.seconds or (15.0 if args.quick else 40.0)
    per_s = args.rpm / 60
    n = int(per_s * seconds)
    capacity = args.concurrency / (args.latency_ms / 1000) * 60 if args.latency_ms else float("inf")
    h.header(f"rate limit: {args.rpm:,.0f} requests/minute ({per_s:,.0f}/s), {n:,} rows, C={args.concurrency}, "
             f"L={args.latency_ms:g} ms (capacity {capacity:,.0f}/minute)")
    with h.workdir() as d, h.GatewayProcess(latency_ms=args.latency_ms) as gw:
        inp = h.make_parquet(d / "in.parquet", n)
        spec = h.write_spec(d / "rl.json", input_path=inp, output=d / "out" / "rl.parquet", base_url=gw.base_url,
                            concurrency=args.concurrency, cache_dir=d / "cache", rpm=args.rpm)
        gw.reset()
        run = h.run_child(h.batcher_argv(spec, gw.base_url), timeout_s=120 + 3 * seconds, gateway=gw).check()
        arrivals = gw.stats()["arrivals"]
    if len(arrivals) != n:
        raise RuntimeError(f"the gateway saw {len(arrivals)} requests for {n} rows")
    span = max(arrivals) - min(arrivals)
    achieved = (n - 1) / span * 60 if span > 0 else float("nan")
    worst, first = windows(arrivals)
    share = per_s * WINDOW_S
    h.say(h.table(
        ["limit /min", "achieved /min", "achieved % of limit", "worst 10 s window", "% of its share",
         "first 10 s window", "% of its share", "CPU s/1k rows", "peak RSS MB"],
        [[args.rpm, achieved, f"{100 * achieved / args.rpm:.1f}%", worst, f"{100 * worst / share:.1f}%", first,
          f"{100 * first / share:.1f}%", 1000 * run.cpu_s / n, run.peak_rss_mb]],
    ))
    h.say()
    h.say(f"targets: achieved >= 95% of the limit: {h.verdict(achieved >= 0.95 * args.rpm)}; "
          f"no 10 s window over 105% of its share: {h.verdict(worst <= 1.05 * share)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
