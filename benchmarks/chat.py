"""Chat rows against completion rows: batcher's CPU per row for the same rows, prompts and answers' length.

    python benchmarks/chat.py [--quick] [-n 10000] [--concurrency 64] [--latency 50] [--repeat 3]

The gateway runs in its own process (`_harness.GatewayProcess`); each variant is one `batcher run` child
whose user+sys CPU is measured alone (wait4), and the variants interleave `--repeat` times so they share the
machine's load. Variants, all with the same rows and the same prompt text:

- completions: `input.prompt` to POST /v2/router/completions (what benchmarks/throughput.py measures);
- chat: the same text as one user message to POST /v2/router/chat/completions;
- chat + json_schema: the demo's schema (sentiment enum, confidence, topics), parsed and validated into typed
  columns for every row;
- chat streamed: chat with `stream: true` (SSE deltas folded, usage from the final chunk).

Prints rows/s, CPU ms per row for the whole process and over the steady middle 80%, and each chat variant's
CPU relative to completions. The target (issue 10): chat rows within 15% of completion rows at C=64, L=50 ms;
what a json_schema adds per row is printed beside it (its validation alone is benchmarks/structured.py's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h
from _prompts import MAX_TOKENS, PROMPT_TEMPLATE
from structured import SCHEMA

VARIANTS = ("completions", "chat", "chat + json_schema", "chat streamed")


def write_spec(path: Path, variant: str, *, input_path: Path, output: Path, base_url: str, concurrency: int) -> Path:
    request: dict[str, Any] = {"model": h.MODEL, "temperature": 0}
    inp: dict[str, Any] = {"path": str(input_path), "id_column": "id"}
    if variant == "completions":
        inp["prompt"] = PROMPT_TEMPLATE
        request["max_tokens"] = MAX_TOKENS
    else:
        inp["messages"] = [{"role": "user", "content": PROMPT_TEMPLATE}]
        request["max_completion_tokens"] = MAX_TOKENS
    if variant == "chat + json_schema":
        request["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "label", "strict": True, "schema": SCHEMA}}
    if variant == "chat streamed":
        request["stream"] = True
    return h.write_spec_file(path, inp=inp, output=output, base_url=base_url, request=request,
                             limits={"concurrency": concurrency})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=None, help="rows per run (default 10,000; 3,000 with --quick)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--latency", type=float, default=50.0, help="server latency in ms")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    n = args.n or (3_000 if args.quick else 10_000)
    c, lat = args.concurrency, args.latency
    runs: dict[str, list[tuple[h.ChildRun, h.Steady]]] = {v: [] for v in VARIANTS}
    with h.workdir(args.keep) as d, h.GatewayProcess(latency_ms=lat) as gw:
        inp = h.make_parquet(d / f"in-{n}.parquet", n)
        timeout = 120 + 5 * n / (c / (lat / 1000) if lat else 1000)
        for r in range(args.repeat):
            for i, variant in enumerate(VARIANTS):
                spec = write_spec(d / f"v{i}-{r}.json", variant, input_path=inp, output=d / "out" / f"v{i}-{r}.parquet",
                                  base_url=gw.base_url, concurrency=c)
                gw.reset()
                run = h.run_child(h.batcher_argv(spec, gw.base_url, "--fresh"), timeout_s=timeout, gateway=gw).check()
                stats = gw.stats()
                if stats["total"] != n:
                    raise RuntimeError(f"{variant}: the gateway saw {stats['total']} requests for {n} rows")
                st = h.steady(run, stats["arrivals"])
                runs[variant].append((run, st))
                h.say(f"  round {r + 1} {variant:<20} {st.rate:8,.0f} rows/s  {1000 * run.cpu_s / n:.3f} CPU ms/row "
                      f"(steady {st.cpu_ms:.3f})")
    base = h.median([1000 * run.cpu_s / n for run, _ in runs["completions"]])
    base_steady = h.median([st.cpu_ms for _, st in runs["completions"]])
    rows = []
    for variant in VARIANTS:
        cpu = h.median([1000 * run.cpu_s / n for run, _ in runs[variant]])
        steady_cpu = h.median([st.cpu_ms for _, st in runs[variant]])
        rows.append([variant, h.median([st.rate for _, st in runs[variant]]), cpu, steady_cpu,
                     f"{cpu / base:.3f}", f"{steady_cpu / base_steady:.3f}",
                     h.median([run.peak_rss_mb for run, _ in runs[variant]])])
    h.header(f"chat vs completions: {n:,} rows, C={c}, L={lat:g} ms, {args.repeat} round(s), medians")
    h.say(h.table(["variant", "rows/s", "CPU ms/row", "steady CPU ms/row", "CPU / completions",
                   "steady CPU / completions", "peak RSS MB"], rows))
    chat_ratio = float(rows[1][4])
    h.say(f"\nchat rows within 15% of completion rows (whole-process CPU, {chat_ratio:.3f}): "
          f"{h.verdict(chat_ratio <= 1.15)}")
    extra_us = 1000 * (float(rows[2][2]) - float(rows[1][2]))
    h.say(f"a json_schema row over a plain chat row: {extra_us:+.0f} µs of CPU (validation alone: "
          "benchmarks/structured.py)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
