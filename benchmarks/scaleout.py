"""Scale-out: one process against Ray with 1 and 2 workers (and the job-wide rate limit with 2 and 4 workers),
against the gateway in its own process. One process also runs at half the concurrency, what each of 2 workers
runs: a process's CPU per row grows as its concurrency falls, and that is not the engine's cost.

    python benchmarks/scaleout.py [--quick] [--rows 20000] [--repeat 1] [--latency-ms 20] [-c 32] [--rpm 2400]

Each run is a driver process of its own, started as `batcher run` would be (`ray.init` of a local instance
included for Ray), so a setup's figures are what one command costs. A poller in this process samples the CPU
seconds of the driver and of every process under it every 0.1 s, by role: the driver, the Ray workers that run
shards, the coordinator, and the rest of Ray (gcs, raylet, agents, idle workers). The gateway is not under the
driver and is never counted. From the gateway's arrival times (CLOCK_MONOTONIC, shared by every process):

- **steady** figures span the middle 80% of the requests: rows/s, and CPU ms per row of each role over the
  same span (what each further row costs);
- **start-up** is from the driver's spawn to the first request: its wall seconds (`ray.init` shown apart) and
  the CPU every process spent in it;
- **fixed CPU** is the run's whole CPU less steady CPU x rows: start-up, the final write, the shutdown;
- **end-to-end** rows/s divides by the driver's whole wall time.

Ray runs its workers at nice 15 (`RAY_worker_niceness`), so the one-process driver runs at that niceness too:
on a busy machine a process at nice 0 shares the CPU with the gateway on equal terms, and the gateway (a server
that is elsewhere in real use) then slows it down, where a niced Ray worker leaves the gateway the CPU it needs
(measured: one process at nice 0 reached ~0.6x the rows/s it reached at nice 15, at the same CPU per row).

Worker RSS is each shard worker's peak. The limited runs give the achieved rate and the worst 10-second window
as shares of `requests_per_minute`. Inside the run, the workers time their CPU over each shard and the
coordinator its own (`RunResult.engine_stats`): printed beside the sampled figures as a cross-check. `--repeat N`
interleaves the setups N times and prints medians. On 2 cores, 2 workers cannot run faster than one process:
what this measures is the engine's overhead, and that the limits hold; benchmarks/README.md gives the model for
larger clusters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

# The driver: one run, as `batcher run SPEC [--ray local --workers N]` makes it; its figures on its last line.
DRIVER = """
import json, sys, time
t0 = time.monotonic()
from batcher import run_job
from batcher.runner import RunOptions
spec, ray, workers = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]) or None
ready = t0
if ray:
    from batcher.distributed import _connect
    _connect(ray)
    ready = time.monotonic()
res = run_job(spec, RunOptions(quiet=True, handle_signals=False, fresh=True, ray=ray, workers=workers))
done = time.monotonic()
print(json.dumps({"ok": res.ok, "status": res.status, "t0": t0, "ready": ready, "done": done,
                  "engine": getattr(res, "engine_stats", {}), "batcher": sys.modules["batcher"].__file__}), flush=True)
"""

ROLES = ("driver", "workers", "coordinator", "ray")
NICENESS = int(os.environ.get("RAY_worker_niceness", "15"))  # Ray's default for its workers


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
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = h._http("GET", f"{self.base_url}/_stats")
        return data

    def reset(self) -> None:
        h._http("POST", f"{self.base_url}/_reset")


def _role(p: psutil.Process, root: int) -> str:
    if p.pid == root:
        return "driver"
    cmd = " ".join(p.cmdline())
    if "ShardWorker" in cmd:
        return "workers"
    if "_CoordinatorActor" in cmd:
        return "coordinator"
    return "ray"


class Tree:
    """The CPU seconds of a driver and of every process under it, by role, every 0.1 s until the driver exits.
    A process is counted from its start (all of it is the run's) up to its last sample; a Ray worker that turns
    from `ray::IDLE` into a shard worker or the coordinator counts in that role from its start. The machine is
    shared: its own CPU counters would count other users."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.root = psutil.Process(proc.pid)
        self.role: dict[int, str] = {}
        self.cpu: dict[int, float] = {}
        self.peak: dict[int, int] = {}  # peak RSS of the driver and of each shard worker
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()

    def _sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        now = time.monotonic()
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    role = _role(p, self.root.pid)
                    if role in ("driver", "workers"):
                        self.peak[p.pid] = max(self.peak.get(p.pid, 0), p.memory_info().rss)
            except psutil.Error:
                continue
            if self.role.get(p.pid) in (None, "ray"):
                self.role[p.pid] = role
            self.cpu[p.pid] = t.user + t.system
        totals = dict.fromkeys(ROLES, 0.0)
        for pid, cpu in self.cpu.items():
            totals[self.role[pid]] += cpu
        self.samples.append((now, totals))

    def _poll(self) -> None:
        while self.proc.poll() is None:
            self._sample()
            time.sleep(0.1)

    def join(self) -> None:
        self._t.join(timeout=30)

    def at(self, when: float) -> dict[str, float]:
        """CPU seconds by role at monotonic time `when`, interpolated between samples."""
        prev = self.samples[0]
        for s in self.samples:
            if s[0] >= when:
                if s[0] == prev[0]:
                    return dict(s[1])
                f = (when - prev[0]) / (s[0] - prev[0])
                return {r: prev[1][r] + (s[1][r] - prev[1][r]) * f for r in ROLES}
            prev = s
        return dict(self.samples[-1][1])

    def total(self) -> dict[str, float]:
        return dict(self.samples[-1][1])


def run_one(spec_path: Path, gw: Gateway, *, ray: str | None, workers: int | None) -> dict[str, Any]:
    gw.reset()
    spawned = time.monotonic()
    # the pipeline at the niceness Ray gives its workers, in every setup
    nice = None if ray else (lambda: os.nice(NICENESS) and None)
    # run from the work dir: `python -c` puts the current directory first on sys.path, and batcher must come
    # from $PYTHONPATH or the install (to measure another checkout), never from wherever this script lives
    proc = subprocess.Popen([h.PY, "-c", DRIVER, str(spec_path), ray or "", str(workers or 0)], cwd=spec_path.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=nice)
    tree = Tree(proc)
    try:
        out, err = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
    ended = time.monotonic()
    tree.join()
    if proc.returncode != 0:
        raise RuntimeError(f"the driver exited {proc.returncode}:\n{err.decode()[-2000:]}")
    info = json.loads(out.decode().strip().splitlines()[-1])
    arrivals = sorted(gw.stats().get("arrivals", []))
    rows = info["ok"]
    r: dict[str, Any] = {"rows": rows, "status": info["status"], "batcher": info["batcher"], "wall_s": ended - spawned,
                         "rows_per_s": rows / (info["done"] - spawned)}
    r["first_request_s"] = arrivals[0] - spawned if arrivals else float("nan")
    r["ray_init_s"] = info["ready"] - info["t0"]
    total = tree.total()
    r["cpu_s"] = sum(total.values())
    r["startup_cpu_s"] = sum(tree.at(arrivals[0]).values()) if arrivals else float("nan")
    i, j = len(arrivals) // 10, len(arrivals) * 9 // 10 - 1
    if j - i >= 10:
        a, b = tree.at(arrivals[i]), tree.at(arrivals[j])
        n = j - i
        r["steady_rows_per_s"] = n / (arrivals[j] - arrivals[i])
        r["steady_ms"] = {role: 1000 * (b[role] - a[role]) / n for role in ROLES}
        r["steady_ms_per_row"] = sum(r["steady_ms"].values())
        r["fixed_cpu_s"] = r["cpu_s"] - r["steady_ms_per_row"] * rows / 1000
    pids = [pid for pid, role in tree.role.items() if role == "workers"]
    r["worker_rss_mb"] = [round(tree.peak[p] / 2**20) for p in pids if p in tree.peak]
    r["driver_rss_mb"] = round(tree.peak.get(proc.pid, 0) / 2**20)
    engine = info["engine"]
    if engine:  # measured inside the run: the workers over their shards, the coordinator since it started
        r["in_worker_ms_per_row"] = 1000 * engine["worker_cpu_s"] / max(1, rows)
        r["coordinator_cpu_s"] = engine.get("coordinator_cpu_s", float("nan"))
        r["coordinator_calls"] = engine.get("coordinator_calls", 0)
    span = (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    worst, _ = windows(arrivals)
    r["achieved_per_min"] = (len(arrivals) - 1) / span * 60 if span else 0.0
    r["worst_10s"] = worst
    return r


def _which() -> str:
    """The batcher the drivers import (another checkout's, with PYTHONPATH), and its commit."""
    code = "import batcher, os; print(os.path.dirname(os.path.dirname(batcher.__file__)))"
    root = subprocess.run([h.PY, "-c", code], capture_output=True, text=True, cwd="/").stdout.strip()
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return f"batcher from {root}" + (f" at {commit}" if commit else "")


def _median(runs: list[dict[str, Any]], key: str, role: str | None = None) -> float:
    values = [(r[key][role] if role else r[key]) for r in runs if key in r]
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=1, help="interleave the setups this many times; medians")
    p.add_argument("--latency-ms", type=float, default=20)
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("--rpm", type=float, default=2400)
    p.add_argument("--no-limited", action="store_true", help="skip the rate-limited runs")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    rows = 2000 if a.quick else a.rows
    repeat = 1 if a.quick else max(1, a.repeat)
    limited_rows = 300 if a.quick else max(1, int(a.rpm / 60 * 25))  # ~25 s under the limit
    c, half = a.concurrency, a.concurrency // 2
    # (name, spec, engine, workers, limited, concurrency): one process at C/2 is what each of 2 workers runs
    setups: list[tuple[str, str, str | None, int | None, bool, int]] = [
        ("one process", "one", None, None, False, c), (f"one process, C={half}", "half", None, None, False, half),
        ("Ray, 1 worker", "ray1", "local", 1, False, c), ("Ray, 2 workers", "ray2", "local", 2, False, c)]
    if not a.no_limited:
        setups += [("one process, limited", "one-lim", None, None, True, c),
                   ("Ray, 2 workers, limited", "ray2-lim", "local", 2, True, c),
                   ("Ray, 4 workers, limited", "ray4-lim", "local", 4, True, c)]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in setups}
    with h.workdir() as d, Gateway(a.latency_ms) as gw:
        data = h.make_parquet(d / "in.parquet", rows, row_group_size=max(1, rows // 16))
        limited = h.make_parquet(d / "lim.parquet", limited_rows, row_group_size=max(1, limited_rows // 16))

        def spec(name: str, inp: Path, concurrency: int, rpm: float | None = None) -> Path:
            return h.write_spec(d / f"{name}.json", input_path=inp, output=d / f"{name}.parquet", base_url=gw.base_url,
                                concurrency=concurrency, cache_dir=d / "cache", rpm=rpm)

        h.header(f"scale-out: {rows} rows, C={c} in all, L={a.latency_ms:g} ms; limit {a.rpm:g}/min on "
                 f"{limited_rows} rows; {repeat} round(s)")
        print(f"  ({_which()})")
        for _ in range(repeat):
            for name, key, ray, workers, lim, conc in setups:
                r = run_one(spec(key, limited if lim else data, conc, a.rpm if lim else None), gw, ray=ray,
                            workers=workers)
                r["concurrency_per_process"] = conc // (workers or 1)
                runs[name].append(r)
                print(f"  {name}: {r['rows']} rows, {r['rows_per_s']:.0f} rows/s end to end, "
                      f"{r.get('steady_ms_per_row', float('nan')):.3f} CPU ms/row steady", flush=True)
    _report(runs, a.rpm)
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=1))
    return 0


def _report(runs: dict[str, list[dict[str, Any]]], rpm: float) -> None:
    one = runs["one process"]
    base_rate, base_cpu = _median(one, "steady_rows_per_s"), _median(one, "steady_ms_per_row")
    # steady CPU per row of one process by its concurrency: a worker is compared with one process running the
    # same number of calls at once (CPU per row grows as a process's concurrency falls)
    by_c = {rs[0]["concurrency_per_process"]: _median(rs, "steady_ms_per_row")
            for name, rs in runs.items() if rs and name.startswith("one process") and "limited" not in name}
    head = ["setup", "rows/s end to end", "rows/s steady", "first request s (ray.init)", "start-up CPU s",
            "fixed CPU s", "steady CPU ms/row", "x one process", "x one process at the same C per process",
            "driver", "workers", "coordinator", "Ray's others", "RSS MB: driver; workers"]
    table = []
    for name, rs in runs.items():
        if "limited" in name or not rs:
            continue
        init = _median(rs, "ray_init_s")
        same_c = by_c.get(rs[0]["concurrency_per_process"], float("nan"))
        table.append([
            name, f"{_median(rs, 'rows_per_s'):.0f}",
            f"{_median(rs, 'steady_rows_per_s'):.0f} ({_median(rs, 'steady_rows_per_s') / base_rate:.2f}x)",
            f"{_median(rs, 'first_request_s'):.1f}" + (f" ({init:.1f})" if init > 0.01 else ""),
            f"{_median(rs, 'startup_cpu_s'):.1f}", f"{_median(rs, 'fixed_cpu_s'):.1f}",
            f"{_median(rs, 'steady_ms_per_row'):.3f}", f"{_median(rs, 'steady_ms_per_row') / base_cpu:.2f}",
            f"{_median(rs, 'steady_ms_per_row') / same_c:.2f}",
            *[f"{_median(rs, 'steady_ms', role):.3f}" for role in ROLES],
            "; ".join([str(rs[-1]["driver_rss_mb"]), *(",".join(map(str, rs[-1]["worker_rss_mb"])),)]).rstrip("; ")])
    print(h.table(head, table))
    inside = [[name, f"{_median(rs, 'in_worker_ms_per_row'):.3f}", f"{_median(rs, 'coordinator_cpu_s'):.2f}",
               f"{_median(rs, 'coordinator_calls'):.0f}"]
              for name, rs in runs.items() if rs and "in_worker_ms_per_row" in rs[0]]
    if inside:
        print("\nMeasured inside the run (RunResult.engine_stats):")
        print(h.table(["setup", "workers' CPU ms/row over their shards", "coordinator CPU s", "coordinator calls"],
                      inside))
    limited = [[name, f"{_median(rs, 'rows_per_s'):.0f}", f"{_median(rs, 'achieved_per_min') / rpm:.1%}",
                f"{_median(rs, 'worst_10s') / (rpm / 6):.1%}",
                ",".join(map(str, rs[-1]["worker_rss_mb"])) or "-"]
               for name, rs in runs.items() if "limited" in name]
    if limited:
        print(f"\nUnder requests_per_minute = {rpm:g}:")
        print(h.table(["setup", "rows/s", "achieved / limit", "worst 10 s / limit", "worker RSS MB"], limited))


if __name__ == "__main__":
    raise SystemExit(main())
