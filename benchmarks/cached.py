"""Cached rerun: a finished job of N rows (default 100,000) run again from the response cache, output cleared
(`batcher run SPEC --fresh`): every row is answered from the cache, no call is made.

    python benchmarks/cached.py [--quick] [-n 100000] [--repeat 3]

The first run (gateway at latency 0, C=64, `request.cache` on) fills the cache; each rerun is measured in its
own child process. rows/s is rows over the child's whole wall time (interpreter start, input check, cache
reads, journal and the final Parquet write included); the gateway must see no request during the reruns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=None, help="rows (default 100,000; 10,000 with --quick)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    n = args.n or (10_000 if args.quick else 100_000)
    h.header(f"cached rerun: {n:,} rows, --fresh, every answer from the cache")
    with h.workdir() as d, h.GatewayProcess(latency_ms=0) as gw:
        inp = h.make_parquet(d / "in.parquet", n)
        spec = h.write_spec(d / "cached.json", input_path=inp, output=d / "out" / "cached.parquet",
                            base_url=gw.base_url, concurrency=64, cache_dir=d / "cache", cache=True)
        first = h.run_child(h.batcher_argv(spec, gw.base_url), timeout_s=120 + n / 100, gateway=gw).check()
        h.say(f"  first run (fills the cache): {n / first.wall_s:,.0f} rows/s, {first.cpu_s:.1f} s CPU")
        gw.reset()
        reruns = []
        for _ in range(args.repeat):
            r = h.run_child(h.batcher_argv(spec, gw.base_url, "--fresh"), timeout_s=120 + n / 200).check()
            reruns.append(r)
            h.say(f"  rerun: {n / r.wall_s:,.0f} rows/s in {r.wall_s:.2f} s")
        calls = gw.stats()["total"]
    rate = h.median([n / r.wall_s for r in reruns])
    h.say()
    h.say(h.table(
        ["rows", "reruns", "rows/s (median)", "wall s", "CPU s/1k rows", "peak RSS MB", "calls during reruns"],
        [[n, len(reruns), rate, h.median([r.wall_s for r in reruns]),
          h.median([1000 * r.cpu_s / n for r in reruns]), h.median([r.peak_rss_mb for r in reruns]), calls]],
    ))
    h.say()
    h.say(f"target: >= 20,000 rows/s: {h.verdict(rate >= 20_000)}; no call made: {h.verdict(calls == 0)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
