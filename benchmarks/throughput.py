"""Throughput: batcher against the gateway in its own process, next to a bare client loop on the same server.

    python benchmarks/throughput.py [--quick] [-n 20000] [--concurrency 16,64,256] [--latency 0,50] [--repeat 1]
                                    [--loops asyncio,uvloop]

First the gateway's own ceiling (latency 0, the cheapest client this machine has, many connections), so every
later figure is known to measure batcher and not the server. Then, for each server latency L and concurrency C:
batcher (`python -m batcher run SPEC --quiet --base-url URL`, one child process) and the bare loop
(`bare.py --child batcher`: the same `WorkerClient`s and bodies, nothing else), one after the other, so their
ratio is taken under the same machine load. Figures per run:

- rows/s: the steady rate, over the middle 80% of the requests as the gateway logged them; `end-to-end` is
  rows / the child's whole wall time (interpreter start, input check and the final write included);
- % ideal: the steady rate over min(rate limit, C / L); at L = 0 over the gateway's measured ceiling;
- CPU s/1k rows: the child's user+sys CPU seconds per 1,000 rows, for the whole process (from wait4) and
  over the steady span alone (sampled with psutil);
- peak RSS: the child's ru_maxrss;
- gateway core: the gateway's CPU over the run's wall time (near 100% would mean the server is the limit).

With `--repeat R` the runs interleave R times and the table shows medians. `--loops asyncio,uvloop` runs batcher
once per event loop (`batcher run --loop X`) in each configuration, one row per loop, both beside the same bare
loop (which runs on asyncio); by default batcher picks its own (`auto`: uvloop when installed).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
from bare import run_bare


@dataclass
class Measured:
    run: h.ChildRun
    n: int
    steady: h.Steady

    @property
    def e2e_rate(self) -> float:
        return self.n / self.run.wall_s

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.run.cpu_s / self.n

    @property
    def gateway_core(self) -> float:
        return (self.run.gateway_cpu_s or 0.0) / self.run.wall_s


def run_batcher(gw: h.GatewayProcess, d: Path, name: str, n: int, c: int, *, cache: bool = False,
                timeout_s: float, loop: str = "auto") -> Measured:
    inp = h.make_parquet(d / f"in-{n}.parquet", n)
    out = d / "out" / f"{name}.parquet"
    spec = h.write_spec(d / f"{name}.json", input_path=inp, output=out, base_url=gw.base_url, concurrency=c,
                        cache_dir=d / f"cache-{name}", cache=cache)
    gw.reset()
    extra = ["--fresh"] if loop == "auto" else ["--fresh", "--loop", loop]
    run = h.run_child(h.batcher_argv(spec, gw.base_url, *extra), timeout_s=timeout_s, gateway=gw).check()
    stats = gw.stats()
    if stats["total"] != n:
        raise RuntimeError(f"{name}: the gateway saw {stats['total']} requests for {n} rows")
    return Measured(run, n, h.steady(run, stats["arrivals"]))


def run_bare_measured(gw: h.GatewayProcess, n: int, c: int, timeout_s: float) -> Measured:
    gw.reset()
    run = run_bare("batcher", gw, n, c, timeout_s=timeout_s)
    return Measured(run, n, h.steady(run, gw.stats()["arrivals"]))


def ceiling(n: int) -> tuple[float, float]:
    """The gateway at latency 0 under the cheapest client here (aiohttp, 256 connections): the rate it served,
    and the rate its CPU per request allows on one full core."""
    with h.GatewayProcess(latency_ms=0) as gw:
        run_bare("aiohttp-shared", gw, min(n, 2_000), 256, timeout_s=120)  # warm-up
        gw.reset()
        run = run_bare("aiohttp-shared", gw, n, 256, timeout_s=300)
        served = h.steady(run, gw.stats()["arrivals"]).rate
        per_core = n / (run.gateway_cpu_s or float("nan"))
    return served, per_core


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=None, help="rows per run (default 20,000; 3,000 with --quick)")
    p.add_argument("--concurrency", default="16,64,256")
    p.add_argument("--latency", default="0,50", help="server latencies in ms")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--no-cache-row", action="store_true", help="skip the extra C=64, L=50 run with the cache on")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--loops", default="auto", help="batcher's event loops, e.g. asyncio,uvloop (default: auto)")
    args = p.parse_args(argv)
    n = args.n or (3_000 if args.quick else 20_000)
    concs = [int(x) for x in args.concurrency.split(",")]
    lats = [float(x) for x in args.latency.split(",")]
    loops = args.loops.split(",")

    h.header("gateway ceiling (latency 0, aiohttp client with 256 connections, --no-validate)")
    served, per_core = ceiling(n)
    h.say(f"served {served:,.0f} req/s to one client process; its CPU per request allows {per_core:,.0f} req/s "
          "on one core")

    configs = [(lat, c, False, loop) for lat in lats for c in concs for loop in loops]
    if not args.no_cache_row and 50.0 in lats and 64 in concs:
        configs += [(50.0, 64, True, loop) for loop in loops]
    results: dict[tuple[float, int, bool, str], tuple[list[Measured], list[Measured]]] = {
        k: ([], []) for k in configs
    }
    bare_runs: dict[tuple[float, int], list[Measured]] = {}
    with h.workdir(args.keep) as d:
        h.make_parquet(d / f"in-{n}.parquet", n)
        for r in range(args.repeat):
            for lat in lats:
                with h.GatewayProcess(latency_ms=lat) as gw:
                    for (l2, c, cache, loop) in configs:
                        if l2 != lat:
                            continue
                        ideal = c / (lat / 1000) if lat else served
                        timeout = 120 + 5 * n / min(ideal, 1000)
                        b = run_batcher(gw, d, f"t{r}-{lat:g}-{c}{'-cache' if cache else ''}-{loop}", n, c,
                                        cache=cache, timeout_s=timeout, loop=loop)
                        results[(lat, c, cache, loop)][0].append(b)
                        if not cache and loop == loops[-1]:  # one bare loop per configuration, after batcher's
                            bare_runs.setdefault((lat, c), []).append(run_bare_measured(gw, n, c, timeout))
                        h.say(f"  L={lat:g} ms C={c}{' cache' if cache else ''} loop={loop}: batcher "
                              f"{b.steady.rate:,.0f} rows/s, {b.cpu_ms:.3f} CPU s/1k rows, {b.run.peak_rss_mb:.0f} MB")

    rows = []
    for key in configs:
        lat, c, cache, loop = key
        bs = results[key][0]
        bares = [] if cache else bare_runs.get((lat, c), [])
        ideal = c / (lat / 1000) if lat else served
        rate = h.median([m.steady.rate for m in bs])
        cpu = h.median([m.cpu_ms for m in bs])
        cpu_steady = h.median([m.steady.cpu_ms for m in bs])
        bare_cpu = h.median([m.cpu_ms for m in bares]) if bares else float("nan")
        bare_steady = h.median([m.steady.cpu_ms for m in bares]) if bares else float("nan")
        rows.append([
            f"{lat:g}", f"{c}{' +cache' if cache else ''}", loop, ideal, rate, f"{100 * rate / ideal:.0f}%",
            h.median([m.e2e_rate for m in bs]), cpu, cpu_steady, h.median([m.run.peak_rss_mb for m in bs]),
            h.median([m.steady.rate for m in bares]) if bares else float("nan"), bare_cpu, bare_steady,
            f"{cpu / bare_cpu:.2f}" if bares else "-", f"{cpu_steady / bare_steady:.2f}" if bares else "-",
            f"{100 * h.median([m.gateway_core for m in bs]):.0f}%",
        ])
    h.header(f"throughput: {n:,} rows per run, {args.repeat} round(s), medians")
    h.say(h.table([
        "L ms", "C", "loop", "ideal rows/s", "batcher rows/s", "% ideal", "end-to-end rows/s", "CPU s/1k rows",
        "steady CPU s/1k", "peak RSS MB", "bare rows/s", "bare CPU s/1k", "bare steady CPU s/1k",
        "CPU batcher/bare", "steady CPU batcher/bare", "gateway core",
    ], rows))
    h.say(f"\ngateway ceiling: {served:,.0f} req/s served, {per_core:,.0f} req/s per core of its CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
