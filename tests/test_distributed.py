"""One job on a local Ray instance (slow: Ray takes ~10 s to start here, once for this module): the same output
as one process, the job-wide rate limit and budget held across workers, a worker killed with SIGKILL, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher import parse_spec, run_job
from batcher.gateway import Gateway, GatewayConfig, serve_in_thread

from .conftest import SAMPLES, options

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.slow

TIMING = ["latency_ms", "completion_id"]


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    from batcher.distributed import _connect

    _connect("local")
    yield
    ray.shutdown()


def _table(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path).drop(TIMING)


def _big_input(tmp_path: Path, n: int, row_group_size: int) -> Path:
    rows = pq.read_table(SAMPLES / "reviews.parquet").to_pylist()
    out = [{**rows[i % len(rows)], "review_id": f"r{i:05d}"} for i in range(n)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(out), path, row_group_size=row_group_size)
    return path


def test_ray_output_is_the_single_process_output_row_for_row(make_spec, tmp_path: Path) -> None:
    keep = {"keep_columns": ["product", "text"]}
    one = parse_spec(make_spec(output={"path": str(tmp_path / "one.parquet"), **keep}))
    many = parse_spec(make_spec(output={"path": str(tmp_path / "many.parquet"), **keep}))
    assert run_job(one, options()).status == "finished"
    res = run_job(many, options(ray="local", workers=2))
    assert res.status == "finished" and res.ok == 300 and res.rows == 300, res.message
    assert _table(tmp_path / "one.parquet").equals(_table(tmp_path / "many.parquet"))


def test_ray_jsonl_byte_ranges_keep_positions_and_line_numbers(make_spec, tmp_path: Path) -> None:
    lines = (SAMPLES / "reviews.jsonl").read_text().splitlines()
    lines.insert(150, "")
    lines.insert(200, "{not json")
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    inp = {"path": str(tmp_path / "in.jsonl"), "id_column": None}
    keep = {"keep_columns": ["customer_name"]}
    one = parse_spec(make_spec(input=inp, output={"path": str(tmp_path / "one.parquet"), **keep}))
    many = parse_spec(make_spec(input=inp, output={"path": str(tmp_path / "many.parquet"), **keep}))
    run_job(one, options())
    res = run_job(many, options(ray="local", workers=3))
    assert res.ok == 300 and res.errors == 1
    df = _table(tmp_path / "many.parquet")
    assert df["id"].to_list() == list(range(301))
    assert "line 201" in df.filter(pl.col("status") == "error")["error"][0]
    assert _table(tmp_path / "one.parquet").equals(df)


def test_ray_csv_is_cut_where_records_start_and_is_the_single_process_output(make_spec, tmp_path: Path) -> None:
    from .test_shards import _tricky_csv

    src = _tricky_csv(tmp_path / "in.csv", n=600)  # values spanning lines, malformed and blank lines, a BOM
    inp = {"path": str(src), "id_column": None, "prompt": "{{text}}"}
    keep = {"keep_columns": ["rating"]}
    one = parse_spec(make_spec(input=inp, output={"path": str(tmp_path / "one.parquet"), **keep}))
    many = parse_spec(make_spec(input=inp, output={"path": str(tmp_path / "many.parquet"), **keep}))
    run_job(one, options())
    res = run_job(many, options(ray="local", workers=3))
    assert res.status == "finished" and res.rows == 600, res.message
    df = _table(tmp_path / "many.parquet")
    assert df["id"].to_list() == list(range(600))
    errors = df.filter(pl.col("status") == "error")["error"].to_list()
    assert errors and all(e.startswith("line ") for e in errors)
    assert _table(tmp_path / "one.parquet").equals(df)


def test_ray_rate_limit_holds_job_wide_with_four_workers(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    rpm = 1500  # 25/s: ~16 s for 400 rows, so 10-second windows can be checked
    path = _big_input(tmp_path, 400, 40)
    spec = parse_spec(make_spec(input={"path": str(path)}, output={"path": str(tmp_path / "o.parquet")},
                                limits={"concurrency": 16, "requests_per_minute": rpm}, cache_dir=None))
    res = run_job(spec, options(ray="local", workers=4))
    assert res.ok == 400
    arrivals = sorted(gateway.stats.arrivals)
    assert len(arrivals) == 400
    worst = 0
    j = 0
    for i, t in enumerate(arrivals):  # every 10-second window that starts at a request
        while j < len(arrivals) and arrivals[j] < t + 10.0:
            j += 1
        worst = max(worst, j - i)
    assert worst <= 1.05 * rpm / 6, worst


def test_ray_budget_cap_is_never_passed(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    cap = 0.002  # about half of what the 300 rows cost
    limits = {"concurrency": 8, "max_cost_usd": cap}
    one = parse_spec(make_spec(output={"path": str(tmp_path / "one.parquet")}, limits=limits, cache_dir=None))
    spec = parse_spec(make_spec(output={"path": str(tmp_path / "o.parquet")}, limits=limits, cache_dir=None))
    alone = run_job(one, options())
    assert alone.status == "budget", alone.message
    # the worst case of every row one process sent (its spend.log, not folded until a rerun) and of the one
    # that did not fit: how far apart two stops at "the next row does not fit" may be
    state = tmp_path / ".one.parquet.batcher"
    worst = max([json.loads(line)[1] for line in (state / "spend.log").read_text().splitlines()]
                + [json.loads((state / "budget.json").read_text())["needed"]])
    spent_alone = pl.read_parquet(tmp_path / "one.parquet")["cost_usd"].fill_null(0).sum()

    res = run_job(spec, options(ray="local", workers=4))
    assert res.status == "budget" and res.exit_code == 7, res.message
    df = pl.read_parquet(tmp_path / "o.parquet")
    spent = df["cost_usd"].fill_null(0).sum()
    assert 0 < spent <= cap
    assert 0 < df.height < 300
    # the run stopped only when no worker's next row fitted what was left of the cap (finding 4: dollars
    # stranded in other workers' chunks stopped it early): the cheapest row that did not fit does not fit
    needed = json.loads((tmp_path / ".o.parquet.batcher" / "budget.json").read_text())["needed"]
    assert spent + needed > cap, (spent, needed, cap)
    # ... so it spent what one process spends on the same input and cap, to within one row's worst case
    assert abs(spent - spent_alone) <= worst, (spent, spent_alone, worst)
    # a rerun under the same cap stops at once, as one process's does: exit 7, no request
    gateway.stats.reset()
    again = run_job(spec, options(ray="local", workers=4))
    assert again.status == "budget" and again.exit_code == 7, again.message
    assert "no request made" in again.message and gateway.stats.total == 0
    assert pl.read_parquet(tmp_path / "o.parquet")["cost_usd"].fill_null(0).sum() == pytest.approx(spent)


def _shard_workers() -> list[Any]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ShardWorker" in cmd:
            found.append(p)
    return found


def _journaled(state: Path) -> int:
    return sum(sum(1 for _ in open(j, "rb")) for j in state.glob("shards/*/journal.jsonl"))


def test_ray_worker_killed_with_sigkill_loses_and_duplicates_nothing(make_spec, tmp_path: Path) -> None:
    with serve_in_thread(GatewayConfig(latency_s=0.08)) as gw:
        path = _big_input(tmp_path, 400, 25)
        out = tmp_path / "o.parquet"
        spec = parse_spec(make_spec(input={"path": str(path)}, output={"path": str(out)},
                                    endpoint={"base_url": gw.base_url}, limits={"concurrency": 4}, cache_dir=None))
        box: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: box.setdefault("res", run_job(spec, options(ray="local", workers=2))))
        thread.start()
        state = tmp_path / ".o.parquet.batcher"
        killed = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and killed is None and thread.is_alive():
            if _journaled(state) >= 60:
                workers = _shard_workers()
                if workers:
                    killed = workers[0].pid
                    os.kill(killed, signal.SIGKILL)
                    break
            time.sleep(0.05)
        thread.join(timeout=300)
        assert killed is not None, "no worker was running to kill"
        res = box["res"]
        assert res.status == "finished", res.message
        df = pl.read_parquet(out)
        assert df.height == 400 and df["review_id"].n_unique() == 400 and (df["status"] == "ok").all()
        # the replaced worker's rows are this run's, not "done earlier": the summary's totals are the file's sums
        assert (res.ok, res.skipped, res.rows) == (400, 0, 400), res.summary()
        for key in ("prompt_tokens", "completion_tokens", "attempts"):
            assert getattr(res, key) == df[key].sum(), (key, res.summary())
        assert res.cost_usd == pytest.approx(df["cost_usd"].sum()), res.summary()
        # re-asked: at most what was in flight or answered but not yet journaled on the killed worker
        assert gw.stats.billed - 400 <= 2 * 4, gw.stats.billed


def test_ray_limit_then_resume_with_another_plan_then_single_process(make_spec, gateway: Gateway,
                                                                   tmp_path: Path) -> None:
    spec = parse_spec(make_spec(output={"path": str(tmp_path / "o.parquet")}, cache_dir=None))
    part = run_job(spec, options(ray="local", workers=2, limit=150))
    assert part.ok == 150
    rest = run_job(spec, options(ray="local", workers=3))  # another cut of the input: journals are re-cut
    assert rest.status == "finished" and rest.skipped == 150 and rest.ok == 150
    assert gateway.stats.billed == 300
    done = run_job(spec, options())  # a single-process rerun sees the job as done
    assert done.status == "nothing_to_do"
    df = pl.read_parquet(tmp_path / "o.parquet")
    assert df["review_id"].to_list() == pl.read_parquet(SAMPLES / "reviews.parquet")["review_id"].to_list()


def test_ray_resume_of_an_edited_input_follows_its_order_and_drops_gone_ids(make_spec, gateway: Gateway,
                                                                          tmp_path: Path) -> None:
    path = _big_input(tmp_path, 200, 25)
    out = tmp_path / "o.parquet"
    spec = parse_spec(make_spec(input={"path": str(path)}, output={"path": str(out)}, cache_dir=None))
    assert run_job(spec, options(ray="local", workers=2, limit=100)).ok == 100  # r00000..r00099
    rows = pq.read_table(path).to_pylist()
    new = [{**rows[0], "review_id": f"n{i}"} for i in range(5)]
    edited = new + rows[10:]  # 5 new rows first; r00000..r00009 (answered) gone
    pq.write_table(pa.Table.from_pylist(edited), path, row_group_size=25)
    res = run_job(spec, options(ray="local", workers=3))
    assert res.status == "finished" and res.dropped == 10 and res.skipped == 90, res.message
    assert res.ok == len(edited) - 90
    assert "10 answers for ids no longer in the input were dropped" in res.summary()
    assert gateway.stats.billed == 100 + len(edited) - 90
    df = pl.read_parquet(out)
    assert df["review_id"].to_list() == [r["review_id"] for r in edited] and (df["status"] == "ok").all()
    assert run_job(spec, options()).status == "nothing_to_do"


def test_ray_input_error_comes_back_as_itself(make_spec, tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"review_id": 1, "text": "x"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"review_id": 1, "text": "y"}) + "\n")
    spec = parse_spec(make_spec(input={"path": str(tmp_path / "*.jsonl")}, output={"path": str(tmp_path / "o.parquet")}))
    from batcher.errors import InputError

    with pytest.raises(InputError, match="duplicate ids"):
        run_job(spec, options(ray="local", workers=2))


def test_ray_ctrl_c_on_the_driver_stops_every_worker_and_writes_what_was_answered(make_spec, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    with serve_in_thread(GatewayConfig(latency_s=0.1)) as gw:
        path = _big_input(tmp_path, 400, 25)
        out = tmp_path / "o.parquet"
        spec = make_spec(input={"path": str(path)}, output={"path": str(out)}, endpoint={"base_url": gw.base_url},
                         limits={"concurrency": 4, "grace_seconds": 5}, cache_dir=None)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.Popen([sys.executable, "-m", "batcher", "run", str(tmp_path / "job.yaml"), "--ray",
                                 "--workers", "2", "--quiet"], env=env, stderr=subprocess.PIPE, text=True)
        state = tmp_path / ".o.parquet.batcher"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and _journaled(state) < 40:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        sent = gw.stats.billed
        time.sleep(0.5)
        assert gw.stats.billed == sent  # nothing left any worker after the driver stopped
        df = pl.read_parquet(out)
        assert 40 <= df.height < 400 and df["review_id"].n_unique() == df.height
        assert "rerun the same command" in err
        again = run_job(parse_spec(spec), options(ray="local", workers=2))
        assert again.status == "finished" and again.skipped == df.height and again.ok == 400 - df.height


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_ray_starts_is_one_line_and_128_plus_signum(signum: int, make_spec, tmp_path: Path) -> None:
    # ray.init puts its own SIGTERM handlers in (exit 1 or 15, a crash dump) and asyncio's SIGINT handler only
    # cancelled a task blocked in Ray: a signal in a --ray run's first seconds was lost (finding 15)
    import subprocess
    import sys

    import yaml

    with serve_in_thread(GatewayConfig(latency_s=0.05)) as gw:
        spec = make_spec(endpoint={"base_url": gw.base_url}, cache_dir=None)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.Popen([sys.executable, "-m", "batcher", "run", str(tmp_path / "job.yaml"), "--ray"],
                                env=env, stderr=subprocess.PIPE, text=True)
        driver = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not driver.children():
            time.sleep(0.02)  # Ray's first process: the driver is inside ray.init
        time.sleep(0.5)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        ours = [line for line in err.splitlines() if line.startswith("batcher") or "Traceback" in line]
        assert proc.returncode == 128 + signum and ours == ["batcher: interrupted"], err
        assert gw.stats.billed == 0


def test_ray_folder_output_has_a_part_per_shard_read_as_one_dataset(make_spec, tmp_path: Path) -> None:
    one = parse_spec(make_spec(output={"path": str(tmp_path / "one.parquet")}))
    spec = parse_spec(make_spec(output={"path": str(tmp_path / "ds") + "/"}))
    run_job(one, options())
    res = run_job(spec, options(ray="local", workers=2))
    assert res.status == "finished" and res.ok == 300
    assert len(list((tmp_path / "ds").glob("part-*.parquet"))) == 3  # the input's three row groups
    ds = pl.read_parquet(tmp_path / "ds" / "*.parquet").drop(TIMING)
    assert ds.equals(_table(tmp_path / "one.parquet"))


def test_ray_driver_killed_then_rerun_resumes_every_shard(make_spec, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    with serve_in_thread(GatewayConfig(latency_s=0.1)) as gw:
        path = _big_input(tmp_path, 400, 25)
        out = tmp_path / "o.parquet"
        spec = make_spec(input={"path": str(path)}, output={"path": str(out)}, endpoint={"base_url": gw.base_url},
                         limits={"concurrency": 4}, cache_dir=None)
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        proc = subprocess.Popen([sys.executable, "-m", "batcher", "run", str(tmp_path / "job.yaml"), "--ray",
                                 "--workers", "2", "--quiet"], env=env, stderr=subprocess.DEVNULL)
        state = tmp_path / ".o.parquet.batcher"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and _journaled(state) < 60:
            time.sleep(0.05)
        proc.kill()
        proc.wait(timeout=60)
        assert not out.exists()
        # the dead driver's workers are ended by Ray; wait until nothing reaches the gateway any more
        last = -1
        while gw.stats.billed != last:
            last = gw.stats.billed
            time.sleep(1.0)
        res = run_job(parse_spec(spec), options(ray="local", workers=2))
        assert res.status == "finished", res.message
        assert res.skipped >= 60 and res.skipped + res.ok == 400
        df = pl.read_parquet(out)
        assert df.height == 400 and df["review_id"].n_unique() == 400 and (df["status"] == "ok").all()
        # re-asked: per call slot (4 in all), at most the call in flight, the answer queued for the journal and
        # the one in the group being gathered (README: "Resume, stops and secrets")
        assert gw.stats.billed - 400 <= 3 * 4, gw.stats.billed


def test_ray_chat_structured_demo_is_the_single_process_output(tmp_path: Path) -> None:
    import yaml

    from .conftest import ROOT

    demo = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
    demo["input"]["path"] = str(ROOT / "samples" / "reviews.parquet")
    demo["endpoint"]["local"] = {"latency_ms": 1}
    outs = []
    for name, kw in (("one", {}), ("many", {"ray": "local", "workers": 2})):
        spec = {**demo, "output": {**demo["output"], "path": str(tmp_path / f"{name}.parquet")},
                "cache_dir": str(tmp_path / f"cache-{name}")}
        res = run_job(parse_spec(spec), options(**kw))
        assert res.status == "finished" and res.ok == 300, res.message
        outs.append(_table(tmp_path / f"{name}.parquet"))
    assert {"sentiment", "confidence", "topics", "product"} <= set(outs[1].columns)
    assert outs[0].equals(outs[1])


def test_ray_a_429_pauses_every_worker_at_once(make_spec, tmp_path: Path) -> None:
    """One 429 (Retry-After: 2) on one worker: no worker sends until the pause is over, but for the calls that
    were on their way when it came. The other worker learns it from its heartbeat waiting at the coordinator."""
    rows = [{"review_id": f"r{i:04d}", "text": "[pause] me" if i == 60 else f"review {i}"} for i in range(600)]
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=50)
    fault = {"kind": "status", "status": 429, "retry_after": "2", "prompt_contains": "[pause]", "first": 1}
    with serve_in_thread(GatewayConfig(latency_s=0.02, faults=[fault])) as gw:
        spec = parse_spec(make_spec(input={"path": str(path)}, output={"path": str(tmp_path / "o.parquet")},
                                    endpoint={"base_url": gw.base_url}, limits={"concurrency": 4}, cache_dir=None))
        res = run_job(spec, options(ray="local", workers=2))
        arrivals, bodies = list(gw.stats.arrivals), list(gw.stats.bodies)
    assert res.status == "finished" and res.ok == 600, res.message
    paused = [k for k, b in enumerate(bodies) if "[pause]" in json.dumps(b["body"])]
    assert len(paused) == 2  # the 429, then the same row asked again after the pause
    t = arrivals[paused[0]]
    assert arrivals[paused[1]] >= t + 1.9
    # the other worker (shard 1: rows 150-299) was sending up to it: 2 calls in flight at 20 ms, ~100 a second
    rows_of = [int(m.group(1)) if (m := re.search(r"review (\d+)", json.dumps(b["body"]))) else -1 for b in bodies]
    assert sum(1 for a, r in zip(arrivals, rows_of, strict=True) if t - 0.3 < a < t and 150 <= r < 300) > 10
    # and stopped within a round trip: it sent its last calls within ~40 ms here (with a 1 s poll instead of the
    # long poll's answer, it would have gone on sending for up to 1 s)
    assert [a - t for a in arrivals if t + 0.2 < a < t + 1.9] == []
