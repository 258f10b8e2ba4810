"""Shards and the coordinator's model, in one process: directory and glob inputs, byte-range and row-group parts
that add up to the whole input, and the lease arithmetic on a fake clock. No Ray here (see test_distributed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import anyio
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher import parse_spec, run_job
from batcher.cli import main as cli_main
from batcher.coordinator import Coordination, LeasedBudget, Pacer
from batcher.errors import InputError
from batcher.plan import make_plan
from batcher.shards import place, plan_shards
from batcher.sources import Source
from batcher.storage import iter_lines, uri_of

from .conftest import ROOT, SAMPLES, options, write_jsonl

TIMING = ["latency_ms", "completion_id"]


def _same(a: Path, b: Path) -> None:
    left = pl.read_parquet(a).drop(TIMING)
    right = pl.read_parquet(b).drop(TIMING)
    assert left.equals(right)


def test_iter_lines_ranges_cover_every_line_once(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    lines = [f'{{"i":{i},"pad":"{"x" * (i % 7)}"}}\n'.encode() for i in range(50)] + [b"\n", b'{"last":1}']
    path.write_bytes(b"".join(lines))
    size = path.stat().st_size
    for step in (1, 3, 17, 64, size):
        got: list[bytes] = []
        for start in range(0, size, step):
            got += iter_lines(path, start, start + step if start + step < size else None)
        assert got == lines, step


def test_uri_survives_the_spec_path() -> None:
    assert uri_of(Path("s3://bucket/a/b.parquet")) == "s3://bucket/a/b.parquet"
    assert uri_of("gs://b/k") == "gs://b/k"
    assert uri_of("/tmp/s3/x") is None and uri_of("s3x:/a") is None


def test_directory_of_parquet_files_is_one_input(make_spec, tmp_path: Path) -> None:
    table = pq.read_table(SAMPLES / "reviews.parquet")
    folder = tmp_path / "in"
    folder.mkdir()
    for k, start in enumerate((0, 120, 250)):
        end = {0: 120, 120: 250, 250: 300}[start]
        pq.write_table(table.slice(start, end - start), folder / f"part-{k}.parquet", row_group_size=40)
    (folder / "notes.txt").write_text("not an input")
    one = parse_spec(make_spec(output={"path": str(tmp_path / "one.parquet"), "keep_columns": ["product"]}))
    many = parse_spec(make_spec(input={"path": str(folder)}, output={"path": str(tmp_path / "many.parquet"),
                                                                      "keep_columns": ["product"]}))
    assert run_job(one, options()).status == "finished"
    res = run_job(many, options())
    assert res.status == "finished" and res.ok == 300
    _same(tmp_path / "one.parquet", tmp_path / "many.parquet")


def test_files_that_differ_in_a_kept_columns_type(make_spec, gateway, tmp_path: Path) -> None:
    # pandas writes an int column with a null as double: the output column takes the type both fit in. Types
    # with none in common (int64 and string) stop the run before any request, naming both files.
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"review_id": ["a", "b"], "text": ["good", "bad"], "stars": pa.array([1, 2])}),
                   folder / "a.parquet")
    pq.write_table(pa.table({"review_id": ["c", "d"], "text": ["fine", "meh"], "stars": pa.array([0.5, None])}),
                   folder / "b.parquet")
    out = tmp_path / "o.parquet"
    spec = parse_spec(make_spec(input={"path": str(folder)}, output={"path": str(out), "keep_columns": ["stars"]}))
    assert run_job(spec, options()).ok == 4
    df = pl.read_parquet(out)
    assert df.schema["stars"] == pl.Float64 and df["stars"].to_list() == [1.0, 2.0, 0.5, None]

    pq.write_table(pa.table({"review_id": ["c", "d"], "text": ["fine", "meh"], "stars": ["x", "y"]}),
                   folder / "b.parquet")
    calls = gateway.stats.total
    bad = parse_spec(make_spec(input={"path": str(folder)},
                               output={"path": str(tmp_path / "o2.parquet"), "keep_columns": ["stars"]}))
    with pytest.raises(InputError, match=r"'stars' is int64 in .*a\.parquet but string in .*b\.parquet"):
        run_job(bad, options())
    assert gateway.stats.total == calls


def test_a_folder_holding_one_file(make_spec, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "only.parquet").write_bytes((SAMPLES / "reviews.parquet").read_bytes())
    spec = parse_spec(make_spec(input={"path": str(folder)}, output={"path": str(tmp_path / "o.parquet")}))
    assert run_job(spec, options()).ok == 300


def test_glob_of_jsonl_files_positions_run_on(make_spec, tmp_path: Path) -> None:
    rows = [json.loads(x) for x in (SAMPLES / "reviews.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "a-1.jsonl", [*rows[:100], "{broken"])
    write_jsonl(tmp_path / "a-2.jsonl", rows[100:])
    spec = parse_spec(make_spec(input={"path": str(tmp_path / "a-*.jsonl"), "id_column": None},
                                output={"path": str(tmp_path / "o.parquet")}))
    res = run_job(spec, options())
    assert res.ok == 300 and res.errors == 1
    df = pl.read_parquet(tmp_path / "o.parquet")
    assert df["id"].to_list() == list(range(301))  # positions run on across files
    bad = df.filter(pl.col("status") == "error")
    assert bad["id"].to_list() == [100] and "a-1.jsonl: line 101" in bad["error"][0]


def test_duplicate_ids_across_files_are_refused(make_spec, tmp_path: Path) -> None:
    rows = [json.loads(x) for x in (SAMPLES / "reviews.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "b-1.jsonl", rows[:10])
    write_jsonl(tmp_path / "b-2.jsonl", rows[5:15])
    spec = parse_spec(make_spec(input={"path": str(tmp_path / "b-*.jsonl")}, output={"path": str(tmp_path / "o.parquet")}))
    with pytest.raises(Exception, match="duplicate ids"):
        run_job(spec, options())


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "jsonl glob"])
def test_shard_scans_add_up_to_the_whole_input(make_spec, tmp_path: Path, fmt: str) -> None:
    if fmt == "parquet":
        spec = parse_spec(make_spec())
    elif fmt == "jsonl glob":
        # errors name the file and its line, in a shard as in the whole input (a shard reads one file's part)
        text = (SAMPLES / "reviews.jsonl").read_text().splitlines()
        text[40] = "this is not json"
        text[170] = json.dumps({**json.loads(text[170]), "text": None})
        for k, (a, b) in enumerate(((0, 100), (100, 200), (200, 300))):
            (tmp_path / f"part-{k}.jsonl").write_text("\n".join(text[a:b]) + "\n")
        spec = parse_spec(make_spec(input={"path": str(tmp_path / "part-*.jsonl"), "id_column": None}))
    else:
        text = (SAMPLES / "reviews.jsonl").read_text().splitlines()
        text.insert(37, "")  # a blank line and a bad one shift line numbers but not positions
        text.insert(90, "[1, 2]")
        (tmp_path / "r.jsonl").write_text("\n".join(text) + "\n")
        spec = parse_spec(make_spec(input={"path": str(tmp_path / "r.jsonl"), "id_column": None}))
    whole = Source(spec.input, [])
    expected = [r for b in whole.batches() for r in b]
    shards = plan_shards(whole, min_shards=7)
    assert len(shards) >= 3
    scans = [Source(spec.input, [], parts=s.parts).scan() for s in shards]
    placed = place(shards, scans)
    got = [r for s in placed for b in Source(spec.input, [], parts=s.parts, index_base=s.index_base).batches()
           for r in b]
    assert [(r.index, r.id, r.prompt, r.error) for r in got] == [(r.index, r.id, r.prompt, r.error) for r in expected]
    assert sum(s.rows for s in placed) == whole.check().rows
    if fmt == "jsonl glob":
        errors = [r.error for r in got if r.error]
        assert len(errors) == 2
        assert errors[0].startswith(f"{tmp_path / 'part-0.jsonl'}: line 41: not valid JSON")
        assert errors[1].startswith(f"{tmp_path / 'part-1.jsonl'}: line 71: ") and "{{text}}" in errors[1]


def test_import_batcher_and_a_local_run_never_import_ray(tmp_path: Path) -> None:
    out = tmp_path / "o.parquet"
    code = f"""
import sys
import batcher, batcher.cli, batcher.runner, batcher.shards, batcher.coordinator, batcher.storage
from batcher import parse_spec, run_job
spec = parse_spec({{"input": {{"path": {str(SAMPLES / 'reviews.parquet')!r}, "id_column": "review_id",
                    "prompt": "{{{{text}}}}"}}, "output": {{"path": {str(out)!r}}},
                    "endpoint": {{"local": {{"latency_ms": 0}}}}, "request": {{"model": "openai/gpt-4o-mini"}}}})
assert run_job(spec, quiet=True).ok == 300
assert "ray" not in sys.modules, "ray was imported"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


# -- the coordinator's arithmetic, on a fake clock ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_shares_never_add_up_past_the_limit() -> None:
    clock = Clock()
    c = Coordination(600, 60_000, None, expected=4, lease_s=1.0, clock=clock)
    for step in range(200):
        clock.t += 0.1
        worker = f"w{step % 5}"  # five workers where four were expected: the fifth waits for a share
        c.lease(worker)
        live = [h for h in c.leases.values() if h.expires > clock.t]
        assert sum(h.rpm for h in live) <= 600 + 1e-9
        assert sum(h.tpm for h in live) <= 60_000 + 1e-9
    c.set_expected(1)
    clock.t += 5  # every lease expired: one worker left gets the whole limit
    assert c.lease("w0").rpm == 600


def test_budget_chunks_never_pass_the_cap() -> None:
    c = Coordination(None, None, 1.0, spent_before=0.25)
    granted = [c.budget(f"w{i % 3}", 0.1) for i in range(20)]
    assert sum(granted) <= 0.75 + 1e-9 and granted.count(0.0) > 0
    assert not c.budget_exhausted  # a refused grant alone is not the job's budget: the worker may be starved
    c.budget("w0", 0.0, give_back=0.1)
    assert c.budget("w1", 0.1) == 0.1


def test_leased_budget_reserves_from_its_chunk() -> None:
    c = Coordination(None, None, 1.0)

    async def call(method: str, *args: object) -> object:
        return getattr(c, method)(*args)

    async def main() -> None:
        b = LeasedBudget(call, "w", cap=1.0, chunk=0.3)
        assert await b.areserve(0.2) and await b.areserve(0.2)  # the second needs a second chunk
        b.settle(0.2, 0.05, answered=True)
        b.settle(0.2, None, answered=False)
        await b.close()
        assert abs(c.granted_usd["w"] - 0.05) < 1e-9  # what it spent stays counted; the rest went back
        assert not await b.areserve(2.0)

    anyio.run(main)


def test_the_job_budget_is_reached_only_when_every_worker_is_starved() -> None:
    # finding 4: a worker that could not fit its row stopped the run while others held unused chunks
    clock = Clock()
    c = Coordination(None, None, 1.0, expected=2, clock=clock)
    assert c.budget("w0", 0.5) == 0.5 and c.budget("w1", 0.45) == 0.45  # 0.05 left
    assert c.budget("w1", 0.1, need=0.04) == pytest.approx(0.05)  # less than a chunk, still the row's need
    assert c.budget("w1", 0.1, need=0.1) == 0.0 and not c.starved("w1", 0.1)  # w0 still holds 0.5
    c.budget("w0", 0.1, give_back=0.4, need=0.2)  # w0's row does not fit its chunk: its rest goes back
    assert c.budget("w1", 0.1, need=0.1) == 0.1  # ... and fits w1's row
    assert not c.starved("w1", 0.35)  # w0 has not said it is starved
    assert c.starved("w0", 0.35) and c.budget_exhausted and c.starved("w1", 0.35)
    # a row that fits what is left is never starved, even when every worker asks
    d = Coordination(None, None, 1.0, expected=2, clock=clock)
    assert not d.starved("w0", 0.5) and not d.starved("w1", 1.0)
    # a starved worker that stops asking (killed, replaced) does not count
    e = Coordination(None, None, 1.0, expected=2, clock=clock)
    e.starved("dead", 2.0)
    clock.t += 5
    assert not e.starved("w0", 2.0)


def test_a_worker_whose_row_does_not_fit_waits_for_the_others_dollars() -> None:
    c = Coordination(None, None, 1.0, expected=2)

    async def call(method: str, *args: object) -> object:
        return getattr(c, method)(*args)

    async def main() -> None:
        a = LeasedBudget(call, "a", cap=1.0, chunk=0.6)
        b = LeasedBudget(call, "b", cap=1.0, chunk=0.6)
        assert await a.areserve(0.1)  # a holds 0.6: 0.4 is left, not enough for b's row
        got: list[bool] = []
        async with anyio.create_task_group() as tg:
            async def b_row() -> None:
                got.append(await b.areserve(0.5))

            tg.start_soon(b_row)
            await anyio.sleep(0.3)
            assert not got  # b waits (the old code stopped it here, the run with it)
            a.settle(0.1, 0.1, answered=True)
            await a.close()  # a's shard is done: its 0.5 left goes back, and b's row fits
        assert got == [True]
        b.settle(0.5, 0.5, answered=True)
        a2 = LeasedBudget(call, "a", cap=1.0, chunk=0.6)
        ends: list[bool] = []
        async with anyio.create_task_group() as tg:
            async def row(budget: LeasedBudget) -> None:
                ends.append(await budget.areserve(0.45))

            tg.start_soon(row, a2)
            await anyio.sleep(0.3)
            assert not ends and not c.budget_exhausted  # b may still have dollars for a2's row
            tg.start_soon(row, b)  # b's next row does not fit either: both starved, 0.4 left
        assert ends == [False, False] and c.budget_exhausted
        assert sum(c.granted_usd.values()) == pytest.approx(0.6)  # what was spent; nothing stranded

    anyio.run(main)


def test_dollars_a_call_frees_while_its_worker_asks_go_back_before_it_starves() -> None:
    # The leak behind the first attempt's early stop: a worker asked for dollars while its last call was in
    # flight; the call settled during the ask (its worst case freed down to its cost) and the worker, with
    # nothing in flight now, said it was starved while holding those dollars. With every other worker starved
    # too, the job's budget was reached while a row would still fit.
    c = Coordination(None, None, 1.0, expected=2)

    async def main() -> None:
        async def call_b(method: str, *args: object) -> object:
            return getattr(c, method)(*args)

        async def call_a(method: str, *args: object) -> object:
            out = getattr(c, method)(*args)
            if method == "budget" and a.in_flight:
                a.settle(0.5, 0.1, answered=True)  # a's call in flight settles while a asks: 0.4 freed
            return out

        a = LeasedBudget(call_a, "a", cap=1.0, chunk=0.5)
        b = LeasedBudget(call_b, "b", cap=1.0, chunk=0.5)
        assert await a.areserve(0.5)  # a's call in flight holds its whole chunk
        assert await b.areserve(0.45)
        b.settle(0.45, 0.45, answered=True)
        ends: dict[str, bool] = {}
        b_done = anyio.Event()
        async with anyio.create_task_group() as tg:
            async def row(name: str, budget: LeasedBudget, worst: float) -> None:
                ends[name] = await budget.areserve(worst)
                if name == "b":
                    b_done.set()

            tg.start_soon(row, "b", b, 0.2)  # 0.05 left: b is starved while a's call is in flight
            await anyio.sleep(0.05)
            assert not ends and not c.budget_exhausted
            await row("a", a, 0.45)  # a's call settles during the ask: the 0.4 it freed fits a's row
            assert ends == {"a": True} and not c.budget_exhausted
            a.settle(0.45, 0.2, answered=True)  # 0.25 freed at a
            tg.start_soon(row, "a2", a, 0.3)  # a's next row does not fit 0.25: a gives it back and waits
            with anyio.fail_after(5):
                await b_done.wait()
            assert ends["b"] and not c.budget_exhausted  # ... and b's row fitted what a gave back
            b.settle(0.2, 0.2, answered=True)
            tg.start_soon(row, "b2", b, 0.3)  # 0.05 left, neither row fits: both starved, the budget's end
        assert ends == {"a": True, "b": True, "a2": False, "b2": False} and c.budget_exhausted
        assert sum(c.granted_usd.values()) == pytest.approx(0.95)  # what was spent; nothing stranded

    anyio.run(main)


def test_pacer_holds_the_rate_across_rate_changes() -> None:
    clock = Clock()
    p = Pacer(600, burst_s=0.1, clock=clock)  # 10/s
    sent = 0
    for step in range(1000):  # 10 s in steps of 10 ms
        if step == 500:
            p.set_rate(1200)  # 20/s from 5 s on, and no new burst when the rate changes
        while p.wait_time(1) == 0:
            p.take(1)
            sent += 1
        clock.t += 0.01
    assert 140 <= sent <= 5 * 10 + 5 * 20 + 2  # never over; a little under from the 10 ms steps


def test_tables_equal_helper_sees_a_difference(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": [1], "latency_ms": [1.0], "completion_id": ["x"]}), tmp_path / "x.parquet")
    pq.write_table(pa.table({"a": [2], "latency_ms": [1.0], "completion_id": ["x"]}), tmp_path / "y.parquet")
    with pytest.raises(AssertionError):
        _same(tmp_path / "x.parquet", tmp_path / "y.parquet")


def test_output_path_ending_with_a_slash_is_a_folder_of_parquet_parts(make_spec, tmp_path: Path) -> None:
    one = parse_spec(make_spec(output={"path": str(tmp_path / "one.parquet"), "keep_columns": ["product"]}))
    spec = parse_spec(make_spec(output={"path": str(tmp_path / "ds") + "/", "keep_columns": ["product"]}))
    assert spec.output.resolved_format == "parquet_dataset"
    run_job(one, options())
    res = run_job(spec, options(limit=100))
    assert res.ok == 100
    res = run_job(spec, options())
    assert res.status == "finished" and res.skipped == 100
    parts = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert parts == ["part-00000.parquet"]
    ds = pl.from_arrow(pq.read_table(tmp_path / "ds")).drop(TIMING)  # pyarrow reads the folder as one dataset
    assert ds.equals(pl.read_parquet(tmp_path / "one.parquet").drop(TIMING))


def test_output_flag_ending_with_a_slash_is_a_folder_of_parquet_parts(make_spec, tmp_path: Path) -> None:
    spec = make_spec()
    (tmp_path / "job.json").write_text(json.dumps(spec))
    assert cli_main(["run", str(tmp_path / "job.json"), "--quiet", "--output", str(tmp_path / "ds") + "/"]) == 0
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["part-00000.parquet"]
    assert pq.read_table(tmp_path / "ds").num_rows == 300


@pytest.mark.parametrize("kind", ["folder", "glob"])
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_an_edited_folder_or_glob_input_resumes_by_id(make_spec, tmp_path: Path, kind: str, fmt: str) -> None:
    """fix3's remap on a many-file input: `input_identity` and `Source.ids` read every file (folder or glob)."""
    folder = tmp_path / "in"
    folder.mkdir()

    def write(name: str, rows: list[tuple[str, str]]) -> None:
        if fmt == "parquet":
            pq.write_table(pa.table({"k": [k for k, _ in rows], "t": [t for _, t in rows]}), folder / f"{name}.parquet")
        else:
            write_jsonl(folder / f"{name}.jsonl", [{"k": k, "t": t} for k, t in rows])

    write("p-1", [("k0", "a"), ("k1", "b"), ("k2", "c")])
    write("p-2", [("k3", "d"), ("k4", "e")])
    path = str(folder) if kind == "folder" else str(folder / f"p-*.{fmt}")
    out = tmp_path / "o.parquet"
    spec = parse_spec(make_spec(input={"path": path, "id_column": "k", "prompt": "{{t}}"},
                                output={"path": str(out), "keep_columns": ["t"]}))
    assert run_job(spec, options(limit=3)).ok == 3  # k0, k1, k2
    assert make_plan(spec).done == 3  # the plan reads the many-file identity too
    write("p-1", [("k9", "new"), ("k0", "a")])  # k1, k2 (answered) gone; k9 new
    write("p-3", [("k5", "f")])  # a file added
    assert make_plan(spec).done == 1  # only answers still in the input
    res = run_job(spec, options())
    assert res.exit_code == 0 and res.ok == 4 and res.skipped == 1 and res.dropped == 2
    assert pl.read_parquet(out)["k"].to_list() == ["k9", "k0", "k3", "k4", "k5"]
    assert run_job(spec, options()).status == "nothing_to_do"
    # without ids, rows are positions: a changed file is refused
    positional = parse_spec(make_spec(input={"path": path, "id_column": None, "prompt": "{{t}}"},
                                      output={"path": str(tmp_path / "p.parquet")}))
    assert run_job(positional, options(limit=2)).ok == 2
    write("p-3", [("k5", "f"), ("k6", "g")])
    with pytest.raises(Exception, match="changed since the run"):
        run_job(positional, options())


def test_ray_flag_without_ray_installed_is_a_usage_error(make_spec, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: importing it raises ImportError
    (tmp_path / "job.json").write_text(json.dumps(make_spec()))
    assert cli_main(["run", str(tmp_path / "job.json"), "--ray", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "batcher: error: --ray needs Ray, which is not installed: pip install 'batcher[ray]'"


def test_merging_the_shards_keeps_the_calls_their_spend_logs_hold(tmp_path: Path) -> None:
    # Calls in flight when a worker died have no record in its shard's journal, only a line in its spend.log:
    # merging the shards into the job's journal at the end of a run must not lose that line.
    from batcher.budget import fold_spend
    from batcher.shards import merge_journals

    ok = {"_i": 0, "id": "a", "status": "ok", "cost_usd": 0.25}
    for n, (journal, log) in enumerate([(json.dumps(ok) + "\n", '["a",0.5]\n'),
                                        ("", '["b",0.5]\n{"carried":0.125}\n["c",0.5')]):  # c: torn, never sent
        d = tmp_path / "shards" / f"{n:05d}"
        d.mkdir(parents=True)
        (d / "journal.jsonl").write_text(journal)
        (d / "spend.log").write_text(log)
    merge_journals(tmp_path)
    assert not (tmp_path / "shards").exists()
    # a's answer (0.25), b's call in flight at its worst case (0.5), what the shard carried (0.125)
    assert fold_spend(tmp_path).spent == pytest.approx(0.25 + 0.5 + 0.125)


@pytest.mark.parametrize("address", ["bogus-address", "127.0.0.1:notaport", "FREE_PORT", "ray://FREE_PORT"])
def test_a_ray_address_that_is_malformed_or_where_nothing_listens_is_one_line_exit_2(
        address: str, make_spec, tmp_path: Path, capsys) -> None:
    # Ray itself raises a traceback for the first and retries the others forever, deaf to Ctrl-C (findings 7, 9)
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = f"127.0.0.1:{s.getsockname()[1]}"
    address = address.replace("FREE_PORT", free)
    (tmp_path / "job.json").write_text(json.dumps(make_spec()))
    assert cli_main(["run", str(tmp_path / "job.json"), "--ray", address, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"batcher: error: --ray {address}: ") and "\n" not in err, err
    assert not (tmp_path / "out" / ".t.parquet.batcher").exists()


def test_ray_start_up_leaves_the_drivers_sigterm_handler_in_force() -> None:
    # ray.init sets SIGTERM's handler (sys.exit(15), or a local head's crash dump and exit 1) through one helper:
    # while batcher connects, the helper must leave batcher's handler alone (finding 15)
    ray = pytest.importorskip("ray")
    import signal

    from batcher.distributed import _ray_keeps_off_sigterm

    def ours(signum: int, frame: object) -> None:
        pass

    before = signal.signal(signal.SIGTERM, ours)
    try:
        with _ray_keeps_off_sigterm():
            ray._private.utils.set_sigterm_handler(lambda signum, frame: None)
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, before)


def _tricky_csv(path: Path, n: int = 400) -> Path:
    """A CSV a newline cannot cut: values spanning lines (many), commas and quotes inside values, blank lines,
    malformed records, CRLF endings, non-ASCII text and a BOM."""
    out = ["id,text,rating"]
    for i in range(n):
        if i % 3 == 0:
            out.append(f'k{i},"review {i} says:\nline two, with a comma\n""quoted"" line three",{i % 5}')
        elif i % 37 == 5:
            out.append(f"k{i},too,many,fields")
        elif i % 41 == 7:
            out.append("")
            out.append(f"k{i},café ünïcode {i},2\r")
        elif i % 53 == 11:
            out.append(f"k{i}")
        else:
            out.append(f"k{i},plain text {i},{i % 5}")
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(out) + "\n").encode())
    return path


@pytest.mark.parametrize("ids", ["id", None])
def test_csv_shards_cut_where_records_start_and_read_as_the_whole_file(make_spec, tmp_path: Path,
                                                                        ids: str | None) -> None:
    src = _tricky_csv(tmp_path / "r.csv")
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": ids, "prompt": "{{text}}"}))
    whole = Source(spec.input, [])
    expected = [r for b in whole.batches() for r in b]
    shards = plan_shards(Source(spec.input, []), min_shards=7)
    assert len(shards) >= 5
    data = src.read_bytes()
    # where a newline after each target offset would have cut: inside a quoted value, for some
    naive = [data.index(b"\n", s.parts[0].start + 1) + 1 for s in shards[:-1]]
    assert set(naive) != {s.parts[0].start for s in shards[1:]}
    scans = [Source(spec.input, [], parts=s.parts).scan() for s in shards]
    placed = place(shards, scans)
    got = [r for s in placed for b in Source(spec.input, [], parts=s.parts, index_base=s.index_base).batches()
           for r in b]
    assert [(r.index, r.id, r.prompt, r.error) for r in got] == [(r.index, r.id, r.prompt, r.error) for r in expected]
    assert any(r.error and r.error.startswith("line ") for r in got)
    assert sum(s.rows for s in placed) == whole.check().rows == len(expected)
    if ids:  # the ids each shard read, in order, are the file's
        assert pa.concat_arrays([i for s in scans for i in s.ids]).to_pylist() == \
            Source(spec.input, []).ids(pa.string()).drop_null().to_pylist()


class _InProcess:
    """A coordinator actor's handle, in this process: `await handle.method.remote(*args)` calls `Coordination`."""

    def __init__(self, coordination: Coordination) -> None:
        self.c = coordination

    def __getattr__(self, name: str) -> SimpleNamespace:
        method = getattr(self.c, name)

        async def remote(*args: object) -> object:
            if name == "heartbeat":  # the actor's long poll (`seen`, `wait_s`), cut short
                wait_s = args[4] if len(args) > 4 else 0.0
                await anyio.sleep(min(float(wait_s), 0.05))  # type: ignore[arg-type]
                return method(*args[:3])
            return method(*args)

        return SimpleNamespace(remote=remote)


def test_a_shard_resumed_within_the_run_counts_its_first_attempts_rows_as_this_runs(make_spec, tmp_path: Path) -> None:
    # A worker killed mid-run is replaced and its shard resumes from its journal: the rows its first attempt
    # answered are this run's (tokens, cost, calls in the summary), only an earlier run's are "done earlier".
    pytest.importorskip("ray")
    from batcher.distributed import RayJob, _ShardJob, _Task
    from batcher.runner import RunResult
    from batcher.sinks import read_journal

    spec = parse_spec(make_spec(cache_dir=None))
    source = Source(spec.input, [], spec.endpoint.api)
    planned = plan_shards(source)
    scans = [Source(spec.input, [], spec.endpoint.api, parts=s.parts).scan() for s in planned]
    shard = place(planned, scans)[0]
    assert shard.rows == 300
    directory = tmp_path / "shard"
    directory.mkdir()

    def attempt(run: Coordination, limit: int | None) -> dict[str, object]:
        task = _Task(shard, str(directory), pa.string(), 4)
        job = _ShardJob(spec, options(limit=limit), task, _InProcess(run), "w0")
        out: dict[str, object] = anyio.run(job.run_shard)
        return out

    attempt(Coordination(None, None, None), 100)  # an earlier run
    this_run = Coordination(None, None, None)
    attempt(this_run, 200)  # this run's first attempt, whose worker dies before the driver hears from it
    res = RunResult(output=tmp_path / "o.parquet", status="finished")
    RayJob._add(SimpleNamespace(result=res), attempt(this_run, None))  # type: ignore[arg-type]

    mine = list(read_journal(directory / "journal.jsonl"))[100:]  # the earlier run's rows come first
    assert (res.skipped, res.ok + res.errors) == (100, 200) == (100, len(mine))
    assert res.ok == sum(r["status"] == "ok" for r in mine)
    for key in ("prompt_tokens", "completion_tokens", "attempts"):
        assert getattr(res, key) == sum(r.get(key) or 0 for r in mine), key
    assert res.cost_usd == pytest.approx(sum(r.get("cost_usd") or 0.0 for r in mine))
    assert "100 done earlier" in res.summary()


def test_a_ray_summary_counts_the_errors_by_kind_as_one_process_does(make_spec, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from batcher.distributed import RayJob, _ShardJob, _Task
    from batcher.runner import RunResult

    rows = [{"rid": f"r{i}", "text": None if i in (3, 7) else f"text {i}"} for i in range(12)]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    spec = parse_spec(make_spec(input={"path": str(data), "id_column": "rid", "prompt": "Classify: {{text}}"},
                                output={"path": str(tmp_path / "one.parquet")}, cache_dir=None))
    single = run_job(spec, options())
    source = Source(spec.input, [], spec.endpoint.api)
    planned = plan_shards(source, min_shards=2, target_rows=6)
    scans = [Source(spec.input, [], spec.endpoint.api, parts=s.parts).scan() for s in planned]
    run = Coordination(None, None, None)
    res = RunResult(output=tmp_path / "one.parquet", status="finished")
    for shard in place(planned, scans):
        directory = tmp_path / f"shard{shard.number}"
        directory.mkdir()
        job = _ShardJob(spec, options(), _Task(shard, str(directory), pa.string(), 4), _InProcess(run), "w0")
        RayJob._add(SimpleNamespace(result=res), anyio.run(job.run_shard))  # type: ignore[arg-type]
    assert len(planned) == 2 and single.error_kinds == {"input": 2}
    assert res.summary().split(";")[0] == single.summary().split(";")[0] == "10 ok, 2 error (2 input), 0 cached"
