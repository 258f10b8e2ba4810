"""Memory: batcher's peak RSS and its growth over a long run, against the gateway (latency 0 for short prompts,
20 ms for long ones).

    python benchmarks/memory.py [--quick] [-n 1000000] [-c 64] [--only short|long|kept]

Runs, each in its own child process: a 10,000-row job, then an N-row job (default 1,000,000 rows; 100,000
with --quick) from two generated Parquet layouts, row groups of 10,000 rows and one row group holding every
row; then long prompts (documents to summarise): 10,000 rows of ~50 KB and 1,000 rows of ~500 KB, each file one
row group (as pandas or pyarrow write fewer than a million rows), at the default `input.batch_size` of 1,000
(the byte budget, `input.batch_bytes`, is what bounds them); then the same documents kept in the output
(`keep_columns: [text]`): 1,000 rows of ~500 KB from Parquet (read back from the input at the end), and both
sizes from JSONL, and 1,000 rows of ~500 KB from CSV; then 10,000 rows of ~50 KB from CSV, each ending in an
emoji, without and with `text` kept; `--only kept` runs the kept ones. The long runs' gateway answers in 20 ms (`--long-latency-ms`):
a server takes its time over a long document, so every worker has a call in flight, each holding its prompt and
body; at latency 0 a client that is busy with its CPU has fewer in flight and holds less. A poller samples the
child's RSS and the size of its journal (the share of rows already answered); the figures:

- peak RSS: the kernel's ru_maxrss for the whole process, the final write of the output included;
- RSS at 10%: when the journal reached a tenth of its final size; max 10-100%: the highest RSS sampled
  from then until the journal was complete (the call phase, before the final write);
- growth: max 10-100% over RSS at 10%, minus one. A run whose memory is bounded shows ~0%.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h


def measure(gw: h.GatewayProcess, d: Path, name: str, inp: Path, n: int, c: int,
            keep: tuple[str, ...] = ()) -> dict[str, float]:
    out = d / "out" / f"{name}.parquet"
    spec = h.write_spec(d / f"{name}.json", input_path=inp, output=out, base_url=gw.base_url, concurrency=c,
                        cache_dir=d / "cache", keep_columns=keep)
    journal = out.parent / f".{out.name}.batcher" / "journal.jsonl"
    gw.reset()
    run = h.run_child(h.batcher_argv(spec, gw.base_url, "--fresh"), timeout_s=120 + n / 200, gateway=gw,
                      progress_file=journal, sample_every_s=0.1).check()
    final = max((s[3] for s in run.samples), default=0)
    at10 = next((s for s in run.samples if s[3] >= final / 10), None)
    end = next((i for i, s in enumerate(run.samples) if s[3] >= final), len(run.samples) - 1)
    rss10 = at10[1] if at10 else float("nan")
    start = run.samples.index(at10) if at10 else 0
    max_calls = max((s[1] for s in run.samples[start : end + 1]), default=float("nan"))
    return {
        "rows": n,
        "wall_s": run.wall_s,
        "rows_s": n / run.wall_s,
        "cpu_ms": 1000 * run.cpu_s / n,
        "peak": run.peak_rss_mb,
        "rss10": rss10,
        "max_calls": max_calls,
        "growth": max_calls / rss10 - 1,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=None, help="rows of the big runs (default 1,000,000; 100,000 with --quick)")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["short", "long", "kept"],
                   help="only the short-prompt runs, the long-prompt runs, or the long runs with kept values")
    p.add_argument("--long-latency-ms", type=float, default=20.0, help="the gateway's latency for long prompts")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = p.parse_args(argv)
    n = args.n or (100_000 if args.quick else 1_000_000)
    c = args.concurrency
    runs: list[tuple[str, dict[str, float]]] = []
    h.header(f"memory: latency 0 (long prompts: {args.long_latency_ms:g} ms), C={c}")
    with (h.workdir(args.keep) as d, h.GatewayProcess(latency_ms=0) as gw,
          h.GatewayProcess(latency_ms=args.long_latency_ms) as slow):
        short = [
            ("10,000 rows", d / "in-10k.parquet", 10_000, 10_000),
            (f"{n:,} rows, row groups of 10,000", d / f"in-{n}-small-groups.parquet", n, 10_000),
            (f"{n:,} rows, one row group", d / f"in-{n}-one-group.parquet", n, n),
        ]
        long_rows = [(10_000, 50_000), (1_000, 500_000)] if not args.quick else [(2_000, 50_000), (200, 500_000)]
        # (label, input, rows, chars, kept columns)
        long = [(f"{rows:,} rows of {chars // 1000} KB", d / f"in-{rows}-{chars}.parquet", rows, chars, ())
                for rows, chars in long_rows]
        rows, chars = long_rows[1]
        long.append((f"{rows:,} rows of {chars // 1000} KB, kept", d / f"in-{rows}-{chars}.parquet", rows, chars,
                     ("text",)))
        long += [(f"JSONL {rows:,} rows of {chars // 1000} KB, kept", d / f"in-{rows}-{chars}.jsonl", rows, chars,
                  ("text",)) for rows, chars in long_rows]
        long.append((f"CSV {rows:,} rows of {chars // 1000} KB, kept", d / f"in-{rows}-{chars}.csv", rows, chars,
                     ("text",)))
        # 50 KB documents from CSV, with an emoji (four bytes a character): blocks of 256 KiB, under the mmap
        # threshold, had the input check hold ~550 MB for 10,000 of them
        rows, chars = long_rows[0]
        long += [(f"CSV {rows:,} rows of {chars // 1000} KB, emoji{kept}", d / f"in-{rows}-{chars}-emoji.csv", rows,
                  chars, keep) for kept, keep in (("", ()), (", kept", ("text",)))]
        if args.only == "kept":
            long = [case for case in long if case[4]]
        for i, (label, path, rows, group) in enumerate(short if args.only is None or args.only == "short" else []):
            h.say(f"  generating {label} ...")
            h.make_parquet(path, rows, row_group_size=group)
            m = measure(gw, d, f"m{i}", path, rows, c)
            runs.append((label, m))
            h.say(f"  {label}: peak {m['peak']:.0f} MB, growth {100 * m['growth']:+.1f}%, {m['rows_s']:,.0f} rows/s")
        for i, (label, path, rows, chars, keep) in enumerate(long if args.only != "short" else []):
            h.say(f"  generating {label} ...")
            if path.suffix in (".jsonl", ".csv"):
                h.make_long_lines(path, rows, chars, emoji=path.stem.endswith("-emoji"))
            else:
                h.make_long_parquet(path, rows, chars)
            m = measure(slow, d, f"long{i}", path, rows, c, keep)
            runs.append((label, m))
            h.say(f"  {label}: peak {m['peak']:.0f} MB, growth {100 * m['growth']:+.1f}%, {m['rows_s']:,.0f} rows/s")
    h.header("memory figures")
    h.say(h.table(
        ["input", "rows/s", "CPU s/1k rows", "RSS at 10% MB", "max 10-100% MB", "growth", "peak RSS MB"],
        [[label, m["rows_s"], m["cpu_ms"], m["rss10"], m["max_calls"], f"{100 * m['growth']:+.1f}%", m["peak"]]
         for label, m in runs],
    ))
    h.say()
    by = dict(runs)
    if args.only != "short":
        peaks = [by[label]["peak"] for label, *_ in long]
        h.say(f"targets: long prompts <= 200 MB: {h.verdict(max(peaks) <= 200)} "
              f"({', '.join(f'{p:.0f}' for p in peaks)} MB)")
    if args.only in ("long", "kept"):
        return 0
    small, huge = runs[1][1], runs[2][1]
    h.say(f"targets: 10,000 rows <= 120 MB: {h.verdict(runs[0][1]['peak'] <= 120)} ({runs[0][1]['peak']:.0f} MB); "
          f"{n:,} rows <= 200 MB: {h.verdict(small['peak'] <= 200)} ({small['peak']:.0f} MB); "
          f"any layout <= 300 MB: {h.verdict(max(small['peak'], huge['peak']) <= 300)} "
          f"({max(small['peak'], huge['peak']):.0f} MB); growth <= 10%: "
          f"{h.verdict(max(small['growth'], huge['growth']) <= 0.10)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
