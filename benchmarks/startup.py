"""Startup: wall time from `batcher run` to the first request reaching the gateway, on a 10-row job.

    python benchmarks/startup.py [--quick] [--repeat 7]

The clock starts just before the child is spawned (the `batcher` console script beside this interpreter, or
`python -m batcher`) and stops at the gateway's first logged arrival; both are CLOCK_MONOTONIC, which every
process on the machine shares. Also shown: the whole run's wall time, and the time to import batcher's CLI
alone (`python -c "import batcher.cli"`), for scale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h


def batcher_command() -> list[str]:
    script = Path(h.PY).with_name("batcher")
    return [str(script)] if script.exists() else [h.PY, "-m", "batcher"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=None, help="runs (default 7; 3 with --quick)")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 7)
    cmd = batcher_command()
    h.header(f"startup: `{' '.join(Path(c).name for c in cmd)} run SPEC` to the first request, 10 rows")
    firsts, walls, imports = [], [], []
    with h.workdir() as d, h.GatewayProcess(latency_ms=0) as gw:
        inp = h.make_parquet(d / "in.parquet", 10)
        spec = h.write_spec(d / "s.json", input_path=inp, output=d / "out" / "s.parquet", base_url=gw.base_url,
                            concurrency=4, cache_dir=d / "cache")
        for _ in range(repeat):
            gw.reset()
            run = h.run_child([*cmd, "run", str(spec), "--quiet", "--fresh", "--base-url", gw.base_url],
                              timeout_s=60).check()
            arrivals = gw.stats()["arrivals"]
            firsts.append(min(arrivals) - run.started)
            walls.append(run.wall_s)
            imp = h.run_child([h.PY, "-c", "import batcher.cli"], timeout_s=60).check()
            imports.append(imp.wall_s)
    first = h.median(firsts)
    h.say(h.table(
        ["runs", "to first request s (median)", "min", "max", "whole run s", "python -c 'import batcher.cli' s"],
        [[repeat, first, min(firsts), max(firsts), h.median(walls), h.median(imports)]],
    ))
    h.say()
    h.say(f"target: first request <= 1 s: {h.verdict(first <= 1.0)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
