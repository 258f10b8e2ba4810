"""Bare client loops: C workers posting N completion bodies to the gateway and parsing the answers, nothing else.

    python benchmarks/bare.py [--quick] [-n 10000] [-c 64] [--latency-ms 50] [--repeat 1]

Compares HTTP setups on this machine by the client process's CPU per request (what each costs batcher):

- `batcher`: `batcher.client.WorkerClient`, one per worker, exactly as batcher uses it (the baseline that
  `throughput.py` divides by);
- `httpx-per-worker`: one single-connection `httpx.AsyncClient` per worker, one shared SSL context;
- `httpx-shared`: one `httpx.AsyncClient` with a pool of C connections (run with fewer requests: it is slow);
- `httpx-aiohttp`: one httpx client per worker over `httpx_aiohttp.AiohttpTransport` (one aiohttp session each);
- `aiohttp-per-worker`: one `aiohttp.ClientSession` with a one-connection connector per worker;
- `aiohttp-shared`: one `aiohttp.ClientSession` whose connector holds C connections.

Every loop does the same per request: serialise the body, post it under an `anyio.fail_after` deadline, check
the status, parse the completion with `batcher.wire.parse_completion`. Each setup runs in its own child process
(`--child SETUP`), measured alone; the gateway runs in another.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h

SETUPS = ("batcher", "httpx-per-worker", "httpx-shared", "httpx-aiohttp", "aiohttp-per-worker", "aiohttp-shared")
PATH = "/v2/router/completions"
HEADERS = {"content-type": "application/json", "accept": "application/json"}


# ------------------------------------------------------------------------------------------------ the child

Post = Callable[[bytes], Any]  # async (content) -> (status, body bytes)


def _setup(name: str, url: str, concurrency: int) -> Callable[[], AbstractAsyncContextManager[Post]]:
    """A factory of per-worker `post` functions (shared setups hand every worker the same client)."""
    import httpx

    from batcher.client import Endpoint, WorkerClient

    full = url + PATH
    ssl_ctx = httpx.create_ssl_context()

    if name == "batcher":
        endpoint = Endpoint.make(url, "orq", None)

        @asynccontextmanager
        async def batcher_worker() -> AsyncIterator[Post]:
            client = WorkerClient(endpoint)
            try:
                async def post(content: bytes) -> Any:
                    # complete() serialises the body itself: hand it the dict, and skip parse below.
                    return await client.complete(json.loads(content), stream=False, deadline_s=600)

                yield post
            finally:
                await client.aclose()

        return batcher_worker

    if name in ("httpx-per-worker", "httpx-aiohttp"):

        @asynccontextmanager
        async def httpx_worker() -> AsyncIterator[Post]:
            kw: dict[str, Any] = {}
            if name == "httpx-aiohttp":
                import aiohttp
                from httpx_aiohttp import AiohttpTransport

                session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=1, ssl=ssl_ctx), timeout=aiohttp.ClientTimeout()
                )
                kw["transport"] = AiohttpTransport(client=session)
            async with httpx.AsyncClient(
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1), timeout=None,
                verify=ssl_ctx, headers=HEADERS, trust_env=False, **kw,
            ) as client:
                async def post(content: bytes) -> Any:
                    r = await client.post(full, content=content)
                    return r.status_code, r.content

                yield post

        return httpx_worker

    if name == "httpx-shared":
        shared: dict[str, Any] = {}

        @asynccontextmanager
        async def shared_httpx_worker() -> AsyncIterator[Post]:
            if "client" not in shared:
                shared["client"] = httpx.AsyncClient(
                    limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
                    timeout=None, verify=ssl_ctx, headers=HEADERS, trust_env=False,
                )
                shared["users"] = 0
            client = shared["client"]
            shared["users"] += 1
            try:
                async def post(content: bytes) -> Any:
                    r = await client.post(full, content=content)
                    return r.status_code, r.content

                yield post
            finally:
                shared["users"] -= 1
                if shared["users"] == 0:
                    await client.aclose()

        return shared_httpx_worker

    if name in ("aiohttp-per-worker", "aiohttp-shared"):
        import aiohttp

        sessions: dict[str, Any] = {}

        def new_session(limit: int) -> Any:
            return aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=limit, ssl=ssl_ctx),
                headers=HEADERS,
                timeout=aiohttp.ClientTimeout(),
                cookie_jar=aiohttp.DummyCookieJar(),
            )

        @asynccontextmanager
        async def aiohttp_worker() -> AsyncIterator[Post]:
            if name == "aiohttp-shared":
                if "s" not in sessions:
                    sessions["s"], sessions["users"] = new_session(concurrency), 0
                session = sessions["s"]
                sessions["users"] += 1
            else:
                session = new_session(1)
            try:
                async def post(content: bytes) -> Any:
                    async with session.post(full, data=content) as r:
                        return r.status, await r.read()

                yield post
            finally:
                if name == "aiohttp-shared":
                    sessions["users"] -= 1
                    if sessions["users"] == 0:
                        await session.close()
                else:
                    await session.close()

        return aiohttp_worker

    raise SystemExit(f"unknown setup {name!r}; one of {', '.join(SETUPS)}")


def child(name: str, url: str, n: int, concurrency: int) -> None:
    import anyio

    from batcher.wire import Completion, parse_completion

    make_worker = _setup(name, url, concurrency)
    bodies: Iterator[dict[str, Any]] = h.bodies_for(n)
    done = [0]

    async def worker() -> None:
        async with make_worker() as post:
            for body in bodies:
                content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
                with anyio.fail_after(600):
                    got = await post(content)
                if not isinstance(got, Completion):
                    status, raw = got
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}: {raw[:200]!r}")
                    parse_completion(raw)
                done[0] += 1

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)

    t0, c0 = time.perf_counter(), os.times()
    anyio.run(main)
    c1 = os.times()
    loop_cpu = (c1.user - c0.user) + (c1.system - c0.system)
    print(json.dumps({"setup": name, "ok": done[0], "wall_s": time.perf_counter() - t0, "loop_cpu_s": loop_cpu}))


# ----------------------------------------------------------------------------------------------- the parent


def run_bare(setup: str, gw: h.GatewayProcess, n: int, concurrency: int, timeout_s: float) -> h.ChildRun:
    """One bare loop in a child. `run.info` holds the child's own report: `loop_cpu_s` is the CPU of the
    request loop alone (no interpreter start, no imports), `wall_s` its wall time."""
    argv = [h.PY, h.CHILD, str(Path(__file__).resolve()), "--child", setup, "--url", gw.base_url,
            "-n", str(n), "-c", str(concurrency)]
    run = h.run_child(argv, timeout_s=timeout_s, gateway=gw).check()
    run.info = json.loads(run.stdout.strip().splitlines()[-1])
    if run.info["ok"] != n:
        raise RuntimeError(f"{setup}: {run.info['ok']} of {n} requests answered")
    return run


def available(setup: str) -> str | None:
    """None if the setup's libraries import, else why not."""
    mods = {"httpx-aiohttp": ("aiohttp", "httpx_aiohttp"), "aiohttp-per-worker": ("aiohttp",),
            "aiohttp-shared": ("aiohttp",)}.get(setup, ())
    for m in mods:
        try:
            __import__(m)
        except ImportError:
            return f"{m} is not installed (pip install {m.replace('_', '-')})"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("-n", type=int, default=None, help="requests per setup (default 10,000; 2,000 with --quick)")
    p.add_argument("-c", "--concurrency", type=int, default=64)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds; the table shows medians")
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset of: " + ", ".join(SETUPS))
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    n = args.n or (2_000 if args.quick else 10_000)
    if args.child:
        child(args.child, args.url, n, args.concurrency)
        return 0

    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    for s in setups:
        if s not in SETUPS:
            p.error(f"unknown setup {s!r}")
    c, lat = args.concurrency, args.latency_ms
    h.header(f"bare client loops: C={c}, server latency {lat:g} ms, gateway in its own process")
    results: dict[str, list[h.ChildRun]] = {s: [] for s in setups}
    sizes: dict[str, int] = {}
    skipped: dict[str, str] = {}
    with h.GatewayProcess(latency_ms=lat) as gw:
        for _ in range(args.repeat):
            for s in setups:
                if s in skipped:
                    continue
                why = available(s)
                if why:
                    skipped[s] = why
                    continue
                # The shared httpx pool costs ~10x per request: fewer requests keep it within minutes.
                sizes[s] = max(500, n // 5) if s == "httpx-shared" else n
                ideal = min(sizes[s] / (c / (lat / 1000)) if lat else 0, 600)
                results[s].append(run_bare(s, gw, sizes[s], c, timeout_s=120 + 20 * ideal + sizes[s] / 100))
                r = results[s][-1]
                h.say(f"  {s}: {sizes[s] / r.info['wall_s']:,.0f} req/s, {1000 * r.cpu_s / sizes[s]:.3f} ms CPU/request "
                      f"({1000 * r.info['loop_cpu_s'] / sizes[s]:.3f} in the loop)")
    rows = []
    base = None
    for s in setups:
        if s in skipped:
            rows.append([s, "-", "-", "-", "-", "-", f"skipped: {skipped[s]}"])
            continue
        runs, k = results[s], sizes[s]
        loop_cpu = h.median([1000 * r.info["loop_cpu_s"] / k for r in runs])
        if s == "batcher":
            base = loop_cpu
        rows.append([
            s, k, h.median([k / r.info["wall_s"] for r in runs]), loop_cpu,
            h.median([1000 * r.cpu_s / k for r in runs]),
            h.median([r.peak_rss_mb for r in runs]),
            h.median([1000 * (r.gateway_cpu_s or 0) / k for r in runs]), "",
        ])
    if base:
        for row in rows:
            if isinstance(row[3], float):
                row[7] = f"{row[3] / base:.2f}"
    h.say()
    h.say(h.table(["setup", "requests", "req/s", "loop CPU ms/req", "process CPU ms/req", "peak RSS MB",
                   "gateway CPU ms/req", "loop CPU / batcher's"], rows))
    h.say("\nloop CPU: the request loop alone; process CPU adds interpreter start and imports, spread over the "
          "requests.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
