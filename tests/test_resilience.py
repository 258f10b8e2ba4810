"""Nothing lost, nothing paid twice: kill -9 and resume, Ctrl-C, bad input, disk faults, secrets."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from batcher import parse_spec, run_job
from batcher.cli import main as cli_main
from batcher.errors import OutputError, ResumeError
from batcher.gateway import Gateway, GatewayConfig, serve_in_thread
from batcher.sinks import Journal, state_dir_for

from .conftest import ROOT, SAMPLES, options, write_jsonl


def _spec_file(tmp_path: Path, spec: dict[str, Any], name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "batcher", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def _rows(n: int) -> list[dict[str, Any]]:
    return [{"id": f"row-{i:05d}", "text": f"question number {i}"} for i in range(n)]


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path: Path) -> None:
    rows, concurrency, kills = 3000, 16, 4
    src = write_jsonl(tmp_path / "in.jsonl", _rows(rows))
    out = tmp_path / "out.parquet"
    rng = random.Random(7)
    with serve_in_thread(GatewayConfig(latency_s=0.02, jitter_s=0.01)) as gw:
        spec = _spec_file(tmp_path, {
            "input": {"path": str(src), "id_column": "id", "prompt": "{{text}}"},
            "output": {"path": str(out)},
            "endpoint": {"base_url": gw.base_url},
            "request": {"model": "openai/gpt-4o-mini", "max_tokens": 8},
            "limits": {"concurrency": concurrency},
        })
        journal = state_dir_for(out) / "journal.jsonl"

        def journaled() -> int:
            return journal.read_bytes().count(b"\n") if journal.exists() else 0

        in_flight_at_kill = []
        lines_at_kill = []
        for _ in range(kills):
            before = journaled()  # after the previous kill, and before this run's start-up compacts it
            proc = _cli("run", str(spec), "--quiet")
            # Kill only once this run has journaled rows of its own, then at a random moment after that.
            deadline = time.monotonic() + 30
            while journaled() <= before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.5))
            assert proc.poll() is None, "the run ended before it was killed: the kill proves nothing"
            in_flight_at_kill.append(gw.stats.in_flight)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
            lines_at_kill.append(journaled())
            assert lines_at_kill[-1] > before  # the kill landed after this run's rows were on disk
        done_before = len({r["id"] for r in map(json.loads, journal.read_bytes().splitlines()) if r["status"] == "ok"})
        # The last killed run's calls in flight are still answered (and billed) by the gateway after the kill:
        # let them finish before counting, or they would be counted as the rerun's.
        deadline = time.monotonic() + 30
        while gw.stats.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        billed_before = gw.stats.billed
        proc = _cli("run", str(spec))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        # The rerun skipped what the killed runs journaled, and asked only for the rest.
        assert f"{done_before} done earlier".encode() in err, err.decode()
        assert gw.stats.billed - billed_before == rows - done_before
        billed = gw.stats.billed
    df = pl.read_parquet(out)
    duplicates = df.height - df["id"].n_unique()
    assert df.height == rows and duplicates == 0
    assert (df["status"] == "ok").all()
    extra = billed - rows
    # Paid twice only for the calls in flight at each kill (at most `concurrency`): every answer is written to
    # the journal (the kernel's page cache) by its worker before the worker takes its next row.
    assert extra <= len(in_flight_at_kill) * concurrency
    print(f"\ncrash test: {len(in_flight_at_kill)} kills, {rows} rows, {duplicates} duplicates, {billed} billed calls, "
          f"{extra} extra (in flight at the kills: {in_flight_at_kill}; journal lines: {lines_at_kill})")


def test_sigint_drains_in_flight_calls_and_the_rerun_finishes(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", _rows(400))
    out = tmp_path / "out.parquet"
    with serve_in_thread(GatewayConfig(latency_s=0.3)) as gw:
        spec = _spec_file(tmp_path, {
            "input": {"path": str(src), "id_column": "id", "prompt": "{{text}}"},
            "output": {"path": str(out)},
            "endpoint": {"base_url": gw.base_url},
            "request": {"model": "openai/gpt-4o-mini", "max_tokens": 8},
            "limits": {"concurrency": 8, "grace_seconds": 5},
        })
        proc = _cli("run", str(spec))
        deadline = time.monotonic() + 20
        while gw.stats.billed < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        sent_at = time.monotonic()
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent_at
        billed_at_stop = gw.stats.billed
        assert proc.returncode == 130, err.decode()
        assert took < 5 + 2  # within the grace period (plus process exit)
        assert b"rerun the same command" in err
        partial = pl.read_parquet(out)
        # everything the server answered is in the output: nothing received was dropped
        assert partial.height == billed_at_stop and (partial["status"] == "ok").all()
        assert 0 < partial.height < 400
        proc = _cli("run", str(spec), "--quiet")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        assert gw.stats.billed == 400  # nothing asked twice
    df = pl.read_parquet(out)
    assert df.height == 400 and df["id"].n_unique() == 400


def test_second_sigint_stops_at_once_and_stays_resumable(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", _rows(100))
    out = tmp_path / "out.parquet"
    with serve_in_thread(GatewayConfig(latency_s=3.0)) as gw:
        spec = _spec_file(tmp_path, {
            "input": {"path": str(src), "id_column": "id", "prompt": "{{text}}"},
            "output": {"path": str(out)}, "endpoint": {"base_url": gw.base_url},
            "request": {"model": "openai/gpt-4o-mini", "max_tokens": 8},
            "limits": {"concurrency": 4, "grace_seconds": 60},
        })
        proc = _cli("run", str(spec), "--quiet")
        deadline = time.monotonic() + 20
        while gw.stats.total < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        proc.communicate(timeout=30)
        assert proc.returncode == 130 and time.monotonic() - start < 2.5
    with serve_in_thread(GatewayConfig()) as gw:
        spec_data = yaml.safe_load(spec.read_text())
        spec_data["endpoint"]["base_url"] = gw.base_url
        result = run_job(parse_spec(spec_data), options())
        assert result.status == "finished" and result.ok == 100


def test_fingerprint_change_is_refused_unless_fresh(make_spec, gateway: Gateway, capsys) -> None:
    run_job(parse_spec(make_spec()), options(limit=10))
    changed = parse_spec(make_spec(request={"temperature": 0.5}))
    with pytest.raises(ResumeError, match=r"a partial run of a different spec.*--fresh") as err:
        run_job(changed, options())
    assert err.value.exit_code == 5
    assert run_job(changed, options(fresh=True, limit=5)).ok == 5
    # a complete job is not called partial
    assert run_job(changed, options(fresh=True)).status == "finished"
    with pytest.raises(ResumeError, match=r"a finished run of a different spec.*--fresh.*to keep it"):
        run_job(parse_spec(make_spec()), options())


# --- bad input: one clear message, one exit code, zero requests ----------------------------------------------


def _bad(tmp_path: Path, name: str, gw: Gateway) -> tuple[dict[str, Any], Path]:
    spec: dict[str, Any] = {
        "input": {"path": str(SAMPLES / "reviews.parquet"), "id_column": "review_id", "prompt": "{{text}}"},
        "output": {"path": str(tmp_path / name / "o.parquet")},
        "endpoint": {"base_url": gw.base_url},
        "request": {"model": "m", "max_tokens": 4},
    }
    return spec, tmp_path / f"{name}.yaml"


BAD_CASES: list[tuple[str, Any, int, str]] = [
    ("missing_file", {"input": {"path": "nowhere.parquet"}}, 3, "does not exist"),
    ("folder", {"input": {"path": "FOLDER.parquet"}}, 3, "is not a file"),
    ("not_parquet", {"input": {"path": "GARBAGE.parquet"}}, 3, "cannot read"),
    ("missing_id", {"input": {"id_column": "nope"}}, 3, "'nope'"),
    ("missing_template_column", {"input": {"prompt": "{{nope}}"}}, 3, "{{nope}}"),
    ("missing_prompt_column", {"input": {"prompt": None, "prompt_column": "nope"}}, 3, "'nope'"),
    ("prompt_column_not_text", {"input": {"prompt": None, "prompt_column": "rating"}}, 3, "not a string"),
    ("duplicate_ids", {"input": {"id_column": "product"}}, 3, "duplicate ids"),
    ("id_wrong_type", {"input": {"path": "FLOATIDS.parquet", "id_column": "x"}}, 3, "strings or integers"),
    ("bad_value", {"limits": {"concurrency": 0}}, 2, "limits.concurrency"),
    ("unknown_key", {"reqest": {}}, 2, "reqest"),
    ("both_prompts", {"input": {"prompt_column": "text"}}, 2, "exactly one"),
    ("unwritable_output", {"output": {"path": "BLOCKED/o.parquet"}}, 4, "cannot write"),
]


@pytest.mark.parametrize(("case", "patch", "code", "message"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_matrix(tmp_path: Path, gateway: Gateway, capsys, case, patch, code, message) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec, path = _bad(tmp_path, case, gateway)
    (tmp_path / "FOLDER.parquet").mkdir()
    (tmp_path / "GARBAGE.parquet").write_bytes(b"this is not parquet at all")
    pq.write_table(pa.table({"x": [1.5, 2.5], "text": ["a", "b"]}), tmp_path / "FLOATIDS.parquet")
    (tmp_path / "BLOCKED").write_text("a file where a folder should be")
    for section, values in patch.items():
        if section not in spec:
            spec[section] = values
            continue
        for k, v in values.items():
            if v is None:
                spec[section].pop(k, None)
            elif isinstance(v, str) and v.split("/")[0].split(".")[0].isupper():
                spec[section][k] = str(tmp_path / v)
            else:
                spec[section][k] = v
    path.write_text(yaml.safe_dump(spec))
    assert cli_main(["run", str(path), "--quiet"]) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") <= 3, err
    assert gateway.stats.total == 0


def test_bad_rows_error_rows_add_up(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    lines = [json.dumps({"id": "ok1", "text": "fine"}), json.dumps({"id": "null", "text": None}),
             json.dumps({"id": "empty", "text": "   "}), "{not json", json.dumps({"id": "nokey"}),
             json.dumps({"id": "long", "text": "x" * 500}), json.dumps([1, 2]), json.dumps({"id": "ok2", "text": "y"})]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{text}}",
                                       "max_prompt_chars": 100}))
    result = run_job(spec, options())
    df = pl.read_parquet(spec.output.path)
    assert df.height == len(lines) == result.ok + result.errors
    errs = df.filter(pl.col("status") == "error")["error"].to_list()
    assert any("line 4" in e for e in errs) and any("max_prompt_chars" in e for e in errs)
    assert any("is null" in e for e in errs) and any("empty" in e for e in errs)
    assert gateway.stats.total == 2


# --- disk full mid-run ---------------------------------------------------------------------------------------


def test_disk_full_stops_keeps_what_was_written_and_rerun_completes(make_spec, gateway: Gateway, monkeypatch) -> None:
    spec = parse_spec(make_spec(limits={"concurrency": 4}))
    real_write = Journal.write
    written = [0]

    def write(self: Journal, data: bytes) -> None:
        lines = data.count(b"\n")
        if written[0] + lines > 100:
            raise_enospc(self)
        real_write(self, data)
        written[0] += lines

    def raise_enospc(self: Journal) -> None:
        from batcher.errors import OutputError

        raise OutputError(f"cannot write the journal {self.path}: {os.strerror(errno.ENOSPC)}")

    monkeypatch.setattr(Journal, "write", write)
    with pytest.raises(OutputError, match="No space left on device") as err:
        run_job(spec, options())
    assert err.value.exit_code == 4
    assert str(state_dir_for(spec.output.path)) in str(err.value)
    calls_at_failure = gateway.stats.total
    assert calls_at_failure < 300  # it stopped sending
    journal = state_dir_for(spec.output.path) / "journal.jsonl"
    kept = [json.loads(x) for x in journal.read_text().splitlines()]
    assert len(kept) == written[0] <= 100
    monkeypatch.setattr(Journal, "write", real_write)
    result = run_job(spec, options())
    df = pl.read_parquet(spec.output.path)
    assert result.status == "finished" and df.height == 300 and df["review_id"].n_unique() == 300
    assert result.skipped == len(kept)


# --- secrets -------------------------------------------------------------------------------------------------

CANARY = "sk-canary-7f3a9c1e5d2b4a68"


@pytest.mark.parametrize("shape", ["completions", "chat"])
def test_canary_key_never_leaks(tmp_path: Path, shape: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", _rows(60))
    if shape == "chat":  # the same job as chat: messages in, /v1/chat/completions, max_completion_tokens
        source: dict[str, Any] = {"messages": [{"role": "user", "content": "{{text}}"}]}
        bound: dict[str, Any] = {"max_completion_tokens": 4}
    else:
        source, bound = {"prompt": "{{text}}"}, {"max_tokens": 4}
    faults = [
        {"kind": "status", "status": 500, "echo_auth": True, "prompt_contains": "number 1"},
        {"kind": "status", "status": 429, "echo_auth": True, "first": 1, "retry_after_ms": "10"},
        {"kind": "malformed", "prompt_contains": "number 2"},
    ]
    cache_dir = tmp_path / "cache"
    with serve_in_thread(GatewayConfig(faults=faults)) as gw:
        spec = _spec_file(tmp_path, {
            "input": {"path": str(src), "id_column": "id", **source},
            "output": {"path": str(tmp_path / "out" / "o.jsonl")},
            "endpoint": {"base_url": gw.base_url, "api": "openai", "api_key_env": "MY_KEY"},
            "request": {"model": "m", **bound, "retry": {"count": 1},
                        "cache": {"type": "exact_match", "ttl": 60}},
            "cache_dir": str(cache_dir),
            "limits": {"concurrency": 4},
        })
        proc = _cli("run", str(spec), "--verbose", env={"MY_KEY": CANARY})
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 9, err.decode()  # finished, with the faults' error rows
        assert b"HTTP 500" in err and b"***" in err  # the echoed key was there, and was redacted
    # Everything the first run wrote, read now: the second run's --fresh deletes its journal.
    first_files = _files(tmp_path)
    with serve_in_thread(GatewayConfig(api_key="sk-other")) as gw:  # the key refused: a fatal error path
        data = yaml.safe_load(spec.read_text())
        data["endpoint"]["base_url"] = gw.base_url
        spec.write_text(yaml.safe_dump(data))
        proc = _cli("run", str(spec), "--verbose", "--fresh", env={"MY_KEY": CANARY})
        out2, err2 = proc.communicate(timeout=60)
        assert proc.returncode == 6 and b"refused the API key" in err2
    second_files = _files(tmp_path)
    # The scan covers what matters, with content: the journal of 60 answers, the run state, the output, the
    # cache, the verbose lines of the faulty calls.
    names = {p.name for p in first_files}
    assert {"journal.jsonl", "run.json", "o.jsonl"} <= names, names
    assert first_files[next(p for p in first_files if p.name == "journal.jsonl")].count(b"\n") == 60
    assert any(p.is_relative_to(cache_dir) and len(b) > 0 for p, b in first_files.items())
    assert err.count(b"batcher: row ") >= 3
    blobs = {"stdout 1": out, "stderr 1": err, "stdout 2": out2, "stderr 2": err2}
    blobs.update({f"{p} (after run 1)": b for p, b in first_files.items()})
    blobs.update({f"{p} (after run 2)": b for p, b in second_files.items()})
    for name, blob in blobs.items():
        assert CANARY.encode() not in blob, name
        assert CANARY[3:].encode() not in blob, name


@pytest.mark.parametrize("key", ["sk-CANARYé-2", "sk-CANARY\x01-2", "sk-CANA RY\u00a0-2"])
def test_a_key_with_control_or_non_ascii_characters_is_refused_before_any_request(tmp_path: Path, key: str) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", _rows(5))
    with serve_in_thread(GatewayConfig(faults=[{"kind": "status", "status": 500, "echo_auth": True}])) as gw:
        spec = _spec_file(tmp_path, {
            "input": {"path": str(src), "id_column": "id", "prompt": "{{text}}"},
            "output": {"path": str(tmp_path / "o.jsonl")},
            "endpoint": {"base_url": gw.base_url, "api": "openai", "api_key_env": "MYKEY"},
            "request": {"model": "m", "max_tokens": 4},
        })
        proc = _cli("run", str(spec), "--verbose", env={"MYKEY": key})
        out, err = proc.communicate(timeout=60)
        assert gw.stats.total == 0
    assert proc.returncode == 2 and err.decode().count("\n") == 1 and "MYKEY" in err.decode(), err.decode()
    files = _files(tmp_path)
    for name, blob in {"stdout": out, "stderr": err, **{str(p): b for p, b in files.items()}}.items():
        for form in ("CANARY", "CANA RY"):
            assert form.encode() not in blob, name


def test_a_key_ending_in_a_newline_is_stripped_and_works(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", _rows(5))
    with serve_in_thread(GatewayConfig(api_key=CANARY)) as gw:
        spec = _spec_file(tmp_path, {
            "input": {"path": str(src), "id_column": "id", "prompt": "{{text}}"},
            "output": {"path": str(tmp_path / "o.jsonl")},
            "endpoint": {"base_url": gw.base_url, "api": "openai", "api_key_env": "MYKEY"},
            "request": {"model": "m", "max_tokens": 4},
        })
        proc = _cli("run", str(spec), env={"MYKEY": f"  {CANARY}\n"})
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and b"5 ok" in err, err.decode()


def test_redaction_covers_the_keys_byte_forms() -> None:
    from batcher.client import Endpoint

    key = "sk-CANARYé-2"
    e = Endpoint.make("http://127.0.0.1:1", "openai", key)
    for echoed in (key, key.encode().decode("latin-1"), key.encode("latin-1").decode("utf-8", "replace")):
        assert e.redact(f"got Bearer {echoed}!") == "got Bearer ***!", echoed


def _files(root: Path) -> dict[Path, bytes]:
    return {f: f.read_bytes() for f in root.rglob("*") if f.is_file()}


def test_endpoint_repr_and_redaction_hide_the_key() -> None:
    from batcher.client import Endpoint

    e = Endpoint.make("http://127.0.0.1:1", "orq", CANARY)
    assert CANARY not in repr(e) and CANARY not in str(e)
    assert e.redact(f"server said: bad key {CANARY}!") == "server said: bad key ***!"


@pytest.mark.slow
def test_calls_in_flight_at_kill_9_count_against_the_cap_on_resume(tmp_path: Path) -> None:
    # Every call costs the same (one prompt, completion tokens free), so the gateway's billed count prices
    # what was really spent. Calls in flight at a kill were billed but never answered: spend.log holds them.
    rows, concurrency, kills = 400, 16, 4
    src = write_jsonl(tmp_path / "in.jsonl", _rows(rows))
    out = tmp_path / "out.parquet"
    with serve_in_thread(GatewayConfig(latency_s=0.3)) as gw:
        spec = _spec_file(tmp_path, {
            "input": {"path": str(src), "id_column": "id", "prompt": "Say hi"},
            "output": {"path": str(out)},
            "endpoint": {"base_url": gw.base_url},
            "request": {"model": "openai/gpt-4o-mini", "max_tokens": 8},
            "prices": {"openai/gpt-4o-mini": {"prompt": 1000, "completion": 0}},
            "limits": {"concurrency": concurrency, "max_cost_usd": 100.0},
        })
        assert _cli("run", str(spec), "--quiet", "--limit", "2").wait(timeout=60) == 0  # what one call costs
        for _ in range(kills):
            before = gw.stats.total
            proc = _cli("run", str(spec), "--quiet")
            deadline = time.monotonic() + 30
            # kill once a second pool of calls is on the wire (the first one answered)
            while gw.stats.total - before < 2 * concurrency and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert proc.poll() is None, "the run ended before it was killed: the kill proves nothing"
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=30)
        billed = gw.stats.billed
    from batcher.budget import fold_spend

    state = state_dir_for(out)
    journal = [json.loads(x) for x in (state / "journal.jsonl").read_bytes().splitlines()]
    per_call = next(r["cost_usd"] for r in journal if r["status"] == "ok")
    answered = sum(r["cost_usd"] for r in journal if r["status"] == "ok")
    counted = fold_spend(state).spent
    print(f"\nkill -9 x{kills}: gateway billed {billed} calls = ${billed * per_call:.4f}; journal answers "
          f"${answered:.4f}; batcher counts ${counted:.4f}")
    assert billed > len([r for r in journal if r["status"] == "ok"])  # calls were in flight at the kills
    assert counted >= billed * per_call - 1e-9
