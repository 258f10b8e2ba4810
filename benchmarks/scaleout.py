"""Scale-out: one process against Ray with 1 and 2 workers (and the job-wide rate limit with 2 and 4 workers),
against the gateway in its own process.

    python benchmarks/scaleout.py [--quick] [--rows 4000] [--latency-ms 20] [-c 32] [--rpm 2400]

Figures per setup: rows/s (wall of the run itself: Ray's start-up is shown apart, it is paid once per driver),
CPU per row of this process and every process under it (the driver, Ray's daemons and its workers: what a
cluster pays; the gateway is a process of its own and not counted), peak RSS of each Ray worker process, and for the limited runs the achieved rate and the
worst 10-second window as shares of `requests_per_minute`. On 2 cores, 2 workers cannot run faster than one
process: what this measures is the overhead of the engine, and that the limits hold; benchmarks/README.md
gives the model for larger clusters.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
import psutil
from ratelimit import windows

GATEWAY = """
import sys, time
from batcher.gateway import GatewayConfig, serve_in_thread
with serve_in_thread(GatewayConfig(port=int(sys.argv[1]), latency_s=float(sys.argv[2]), validate=False)) as gw:
    print(gw.base_url, flush=True)
    while True:
        time.sleep(3600)
"""


class Gateway:
    """The gateway in its own process, on a plain asyncio loop (as the tests serve it)."""

    def __init__(self, latency_ms: float) -> None:
        self.port = h.free_port()
        self.latency_ms = latency_ms
        self.base_url = f"http://{h.HOST}:{self.port}"

    def __enter__(self) -> Gateway:
        self.proc = subprocess.Popen([h.PY, "-c", GATEWAY, str(self.port), str(self.latency_ms / 1000)],
                                     stdout=subprocess.PIPE, cwd=h.ROOT)
        assert self.proc.stdout is not None
        self.proc.stdout.readline()
        self.ps = psutil.Process(self.proc.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = h._http("GET", f"{self.base_url}/_stats")
        return data

    def reset(self) -> None:
        h._http("POST", f"{self.base_url}/_reset")


class Tree:
    """This process and every process under it (Ray's daemons and workers, started by a local `ray.init`):
    their CPU seconds over the run (a worker that exits is counted up to its last 100 ms sample), and the peak
    RSS of each worker that runs shards. The machine is shared: its own CPU counters would count other users."""

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._sample(initial=True)

    def _sample(self, initial: bool = False) -> None:
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    cpu = t.user + t.system
                    if "ShardWorker" in " ".join(p.cmdline()):
                        self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.memory_info().rss)
            except psutil.Error:
                continue
            if initial:
                self.first[p.pid] = cpu
            self.last[p.pid] = cpu

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def cpu(self) -> float:
        return sum(v - self.first.get(pid, 0.0) for pid, v in self.last.items())

    def __enter__(self) -> Tree:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(timeout=5)
        self._sample()


def run_one(spec_path: Path, gw: Gateway, *, ray: str | None, workers: int | None) -> dict[str, Any]:
    from batcher import run_job
    from batcher.runner import RunOptions

    gw.reset()
    out = spec_path.with_suffix(".out.parquet")
    with Tree() as rss:
        res = run_job(spec_path, RunOptions(output=out, quiet=True, handle_signals=False, fresh=True, ray=ray,
                                            workers=workers))
    cpu = rss.cpu()
    stats = gw.stats()
    arrivals = stats.get("arrivals", [])
    span = (max(arrivals) - min(arrivals)) if len(arrivals) > 1 else 0.0
    worst, _ = windows(arrivals)
    return {"rows": res.ok, "status": res.status, "wall_s": res.wall_s, "rows_per_s": res.ok / res.wall_s,
            "cpu_ms_per_row": 1000 * cpu / max(1, res.ok), "worker_rss_mb": [round(v / 2**20) for v in rss.peak.values()],
            "achieved_per_min": (len(arrivals) - 1) / span * 60 if span else 0.0, "worst_10s": worst}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--latency-ms", type=float, default=20)
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("--rpm", type=float, default=2400)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    rows = 600 if a.quick else a.rows
    limited_rows = 300 if a.quick else max(1, int(a.rpm / 60 * 25))  # ~25 s under the limit
    results: dict[str, Any] = {}
    with h.workdir() as d, Gateway(a.latency_ms) as gw:
        data = h.make_parquet(d / "in.parquet", rows, row_group_size=max(1, rows // 16))
        limited = h.make_parquet(d / "lim.parquet", limited_rows, row_group_size=max(1, limited_rows // 16))

        def spec(name: str, inp: Path, rpm: float | None = None) -> Path:
            return h.write_spec(d / f"{name}.json", input_path=inp, output=d / f"{name}.parquet", base_url=gw.base_url,
                                concurrency=a.concurrency, cache_dir=d / "cache", rpm=rpm)

        h.header(f"scale-out: {rows} rows, C={a.concurrency}, L={a.latency_ms:g} ms; limit {a.rpm:g}/min on "
                 f"{limited_rows} rows")
        results["one process"] = run_one(spec("one", data), gw, ray=None, workers=None)
        results["one process, limited"] = run_one(spec("one-lim", limited, a.rpm), gw, ray=None, workers=None)
        from batcher.distributed import _connect

        t0 = time.perf_counter()
        _connect("local")
        results["ray start-up s"] = time.perf_counter() - t0
        for w in (1, 2):
            results[f"ray {w} worker(s)"] = run_one(spec(f"ray{w}", data), gw, ray="local", workers=w)
        for w in (2, 4):
            results[f"ray {w} workers, limited"] = run_one(spec(f"ray{w}-lim", limited, a.rpm), gw, ray="local",
                                                           workers=w)
    head = ["setup", "rows/s", "CPU ms/row", "worker RSS MB", "achieved/limit", "worst 10 s/limit"]
    table = []
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        lim = "limited" in name
        table.append([name, f"{r['rows_per_s']:.0f}", f"{r['cpu_ms_per_row']:.2f}",
                      ",".join(map(str, r["worker_rss_mb"])) or "-",
                      f"{r['achieved_per_min'] / a.rpm:.1%}" if lim else "-",
                      f"{r['worst_10s'] / (a.rpm / 6):.1%}" if lim else "-"])
    print(h.table(head, table))
    print(f"Ray start-up (once per driver): {results['ray start-up s']:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
