"""Peers (opt-in): curator (PyPI `bespokelabs-curator`) and batcher on the same server, the same prompts, the
same concurrency and no rate limit, run interleaved.

    python benchmarks/peers.py [--quick] [-n 10000] [-c 256] [--latency-ms 50] [--repeat 2] [--venv DIR]

Curator is installed into its own venv (default `~/.cache/batcher-bench/venv-curator`, made on first use with
`python -m venv` and `pip install bespokelabs-curator`), never into batcher's. It talks to the gateway's
`/v1/completions` through its LiteLLM backend (see `_curator_job.py` for why and how); batcher uses the same
gateway's orq path with the same prompts and max_tokens. Each run is one child process, measured alone:
rows/s (steady: the middle 80% of the requests in the gateway's log; and end to end), CPU seconds per 1,000
rows and peak RSS (wait4: the child and any process it waited for).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "batcher-bench" / "venv-curator"


def ensure_curator(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import bespokelabs.curator"], capture_output=True,
                                      timeout=300).returncode == 0:
        return py
    h.say(f"  installing bespokelabs-curator into {venv} (once) ...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "bespokelabs-curator"], capture_output=True,
                       text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"curator could not be installed (pip exit {r.returncode}):\n{r.stderr[-3000:]}")
    return py


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=None, help="rows (default 10,000; 2,000 with --quick)")
    p.add_argument("-c", "--concurrency", type=int, default=256)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--repeat", type=int, default=None, help="interleaved rounds (default 2; 1 with --quick)")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    n = args.n or (2_000 if args.quick else 10_000)
    rounds = args.repeat or (1 if args.quick else 2)
    c, lat = args.concurrency, args.latency_ms
    h.header(f"peers: {n:,} prompts, C={c}, server latency {lat:g} ms, no rate limit, {rounds} round(s)")
    cur_py = ensure_curator(args.venv)
    res: dict[str, list[tuple[h.ChildRun, h.Steady]]] = {"batcher": [], "curator": []}
    with h.workdir() as d, h.GatewayProcess(latency_ms=lat) as gw:
        inp = h.make_parquet(d / "in.parquet", n)
        for r in range(rounds):
            spec = h.write_spec(d / f"b{r}.json", input_path=inp, output=d / "out" / f"b{r}.parquet",
                                base_url=gw.base_url, concurrency=c, cache_dir=d / "cache")
            gw.reset()
            run = h.run_child(h.batcher_argv(spec, gw.base_url), timeout_s=600, gateway=gw).check()
            res["batcher"].append((run, h.steady(run, gw.stats()["arrivals"])))
            gw.reset()
            work = d / f"curator{r}"
            work.mkdir()
            run = h.run_child([str(cur_py), h.CHILD, str(HERE / "_curator_job.py"), "--url", gw.base_url, "-n", str(n),
                               "-c", str(c), "--work", str(work)], timeout_s=1800, gateway=gw).check()
            ok = json.loads(run.stdout.strip().splitlines()[-1])["ok"]
            if ok != n:
                raise RuntimeError(f"curator answered {ok} of {n} rows:\n{run.stderr[-2000:]}")
            # Curator makes one probe call for rate-limit headers before the run: not a row.
            res["curator"].append((run, h.steady(run, gw.stats()["arrivals"][1:])))
            for name in res:
                run, st = res[name][-1]
                h.say(f"  {name}: {st.rate:,.0f} rows/s, {1000 * run.cpu_s / n:.2f} CPU s/1k rows, "
                      f"{run.peak_rss_mb:.0f} MB")

    def fig(name: str) -> tuple[float, float, float, float]:
        runs = res[name]
        return (h.median([st.rate for _, st in runs]), h.median([n / r.wall_s for r, _ in runs]),
                h.median([1000 * r.cpu_s / n for r, _ in runs]), h.median([r.peak_rss_mb for r, _ in runs]))

    b, cu = fig("batcher"), fig("curator")
    ideal = c / (lat / 1000) if lat else float("nan")
    h.say()
    h.say(h.table(["runner", "rows/s", "% of ideal", "end-to-end rows/s", "CPU s/1k rows", "peak RSS MB"], [
        ["batcher", b[0], f"{100 * b[0] / ideal:.0f}%", b[1], b[2], b[3]],
        ["curator", cu[0], f"{100 * cu[0] / ideal:.0f}%", cu[1], cu[2], cu[3]],
        ["batcher / curator", f"{b[0] / cu[0]:.1f} x", "", f"{b[1] / cu[1]:.1f} x", f"{b[2] / cu[2]:.2f} x",
         f"{b[3] / cu[3]:.2f} x"],
    ]))
    h.say()
    h.say(f"targets: >= 4 x curator's rows/s: {h.verdict(b[0] >= 4 * cu[0])}; <= 1/4 of its CPU per row: "
          f"{h.verdict(b[2] <= cu[2] / 4)}; <= 1/3 of its peak RSS: {h.verdict(b[3] <= cu[3] / 3)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
