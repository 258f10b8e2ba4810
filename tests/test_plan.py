"""`batcher plan`: its estimates against a real run on the local gateway, no request made, resume counting."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batcher import RunOptions, SpecError, parse_spec, run_job
from batcher.cli import main
from batcher.plan import PROMPT_TOLERANCE, make_plan
from batcher.sinks import state_dir_for

ROOT = Path(__file__).resolve().parents[1]
REVIEWS = ROOT / "samples" / "reviews.parquet"
# The prompt jobs/demo.yaml had before it became a chat job: the one the measured error in batcher/plan.py's docstring is about.
DEMO_PROMPT = ("Classify the sentiment of this review as positive, negative or neutral. Answer with one word.\n\n"
               "{{text}}")
RUN = RunOptions(quiet=True, handle_signals=False)


def _spec(tmp_path: Path, **request: Any) -> dict[str, Any]:
    return {
        "name": "plan-test",
        "input": {"path": str(REVIEWS), "id_column": "review_id", "prompt": DEMO_PROMPT},
        "output": {"path": str(tmp_path / "out.parquet"), "keep_columns": ["product"]},
        "endpoint": {"base_url": "local", "local": {"latency_ms": 0}},
        # No cache: every row is a call, so the actual run is the plan's worst case for cost and tokens.
        "request": {"model": "openai/gpt-4o-mini", "temperature": 0, **request},
        "cache_dir": str(tmp_path / "cache"),
    }


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[dict[str, Any]]]:
    """The plan, then the real run of the same spec (max_tokens left at its default: open-ended completions)."""
    tmp = tmp_path_factory.mktemp("demo")
    spec = parse_spec(_spec(tmp, n=2))
    plan = make_plan(spec)
    result = run_job(spec, RUN)
    assert result.status == "finished" and result.errors == 0
    return plan, pq.read_table(tmp / "out.parquet").to_pylist()


def test_prompt_estimate_within_the_stated_error(demo_run: tuple[Any, list[dict[str, Any]]]) -> None:
    plan, rows = demo_run
    actual = sum(r["prompt_tokens"] for r in rows)
    error = (plan.prompt_tokens - actual) / actual
    assert abs(error) <= PROMPT_TOLERANCE
    # The figure the docstring and the printed plan state: change them together.
    assert error == pytest.approx(0.121, abs=0.002)
    assert plan.prompt_tokens_low <= actual <= plan.prompt_tokens_high


def test_completion_bound_and_cost_range_hold(demo_run: tuple[Any, list[dict[str, Any]]]) -> None:
    plan, rows = demo_run
    assert plan.to_send == len(rows) == 300 and plan.done == 0
    assert plan.max_tokens == 256 and plan.n == 2  # spec.DEFAULT_MAX_TOKENS
    actual_completion = sum(r["completion_tokens"] for r in rows)
    assert 0 < actual_completion <= plan.completion_tokens_max == 300 * 256 * 2
    actual_cost = sum(r["cost_usd"] for r in rows)
    assert plan.cost_low_usd is not None and plan.cost_high_usd is not None
    assert plan.cost_low_usd <= actual_cost <= plan.cost_high_usd
    assert not plan.unpriced


def test_plan_makes_no_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    data = _spec(tmp_path)
    data["endpoint"] = {"base_url": "http://127.0.0.1:9", "api": "openai"}  # nothing listens on port 9

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("plan opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    plan = make_plan(parse_spec(data))
    assert plan.to_send == 300 and plan.prompt_tokens > 0
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(data))
    assert main(["plan", str(spec_file), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["to_send"] == 300
    assert not state_dir_for(tmp_path / "out.parquet").exists()  # and wrote nothing


def test_resume_counts_rows_done(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = parse_spec(_spec(tmp_path, max_tokens=4))
    result = run_job(spec, RunOptions(quiet=True, handle_signals=False, limit=50))
    assert result.ok == 50
    journal = state_dir_for(tmp_path / "out.parquet") / "journal.jsonl"
    before = journal.read_bytes()

    plan = make_plan(spec)
    assert (plan.rows, plan.done, plan.to_send) == (300, 50, 250)
    assert journal.read_bytes() == before  # read, never compacted
    assert make_plan(spec, limit=80).to_send == 30
    assert make_plan(spec, fresh=True).done == 0

    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(_spec(tmp_path, max_tokens=4)))
    assert main(["plan", str(spec_file)]) == 0
    assert "50 done by an earlier run, 250 to send" in capsys.readouterr().out

    # Another spec's partial run is in the way: nothing counts as done, and the plan says why.
    other = parse_spec(_spec(tmp_path, max_tokens=5))
    changed = make_plan(other)
    assert changed.done == 0 and any("different spec" in n for n in changed.notes)


def test_unpriced_model_is_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _spec(tmp_path, max_tokens=4)
    data["request"]["model"] = "acme/unknown"
    plan = make_plan(parse_spec(data))
    assert plan.unpriced == ("acme/unknown",) and plan.unpriced_rows == 300
    assert plan.cost_low_usd is None and plan.cost_high_usd is None

    data["prices"] = {"acme/unknown": {"prompt": 1.0, "completion": 2.0}}
    priced = make_plan(parse_spec(data))
    assert not priced.unpriced and priced.cost_high_usd is not None
    chars = priced.prompt_chars
    assert priced.cost_high_usd == pytest.approx((chars / 4 * (1 + PROMPT_TOLERANCE) * 1.0 + 300 * 4 * 2.0) / 1e6)
    assert priced.cost_low_usd == pytest.approx(chars / 4 * (1 - PROMPT_TOLERANCE) * 1.0 / 1e6)

    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps({**data, "prices": None}))
    assert main(["plan", str(spec_file)]) == 0
    assert "UNPRICED       acme/unknown" in capsys.readouterr().out


def test_wall_time_takes_the_binding_limit(tmp_path: Path) -> None:
    data = _spec(tmp_path, max_tokens=10)
    data["limits"] = {"concurrency": 10, "requests_per_minute": 600}
    plan = make_plan(parse_spec(data), latency_ms=500)
    assert plan.wall_s_concurrency == pytest.approx(300 * 0.5 / 10)
    assert plan.wall_s_requests == pytest.approx(30.0)
    assert plan.bound_by == "requests_per_minute" and plan.wall_s == pytest.approx(30.0)

    data["limits"] = {"concurrency": 10, "tokens_per_minute": 10_000}
    plan = make_plan(parse_spec(data), latency_ms=500)
    # The limiter is charged len(prompt)/3 + max_tokens * n per call.
    assert plan.limiter_tokens == pytest.approx(plan.prompt_chars / 3 + 300 * 10)
    assert plan.bound_by == "tokens_per_minute"
    assert plan.wall_s == pytest.approx(plan.limiter_tokens / 10_000 * 60)


def test_input_rows_that_cannot_be_sent(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "text": "great"}\n{"id": 2, "text": null}\n{"id": 3}\nnot json\n')
    data = _spec(tmp_path, max_tokens=4)
    data["input"] = {"path": str(path), "prompt": "Review: {{text}}"}
    data["output"] = {"path": str(tmp_path / "out.parquet")}
    plan = make_plan(parse_spec(data))
    assert (plan.rows, plan.to_send, plan.input_errors) == (4, 1, 3)
    assert plan.prompt_chars == len("Review: great")


# ------------------------------------------------------------------------------------- hostile inputs (issue 14)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_zero_row_input(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / f"in{suffix}"
    if suffix == ".jsonl":
        path.write_text("")
    else:
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    data = _spec(tmp_path, max_tokens=4)
    data["input"] = {"path": str(path), "prompt": "Review: {{text}}"}
    data["output"] = {"path": str(tmp_path / "out.parquet")}
    plan = make_plan(parse_spec(data))
    assert (plan.rows, plan.to_send, plan.unpriced) == (0, 0, ())
    assert plan.cost_low_usd == plan.cost_high_usd == 0.0  # nothing to send costs nothing: known, not unknown
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(data))
    assert main(["plan", str(spec_file)]) == 0
    out = capsys.readouterr().out
    assert "0 rows in the input: nothing to send" in out and "price" not in out


def test_openai_batch_line_without_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "batch.jsonl"
    lines = [{"custom_id": "a", "method": "POST", "url": "/v1/completions",
              "body": {"model": "openai/gpt-4o-mini", "prompt": "hi", "max_tokens": 4}},
             {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hello", "max_tokens": 4}}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = {"name": "batch", "input": {"path": str(path), "format": "openai_batch"},
            "output": {"path": str(tmp_path / "out.jsonl"), "format": "openai_batch"},
            "endpoint": {"base_url": "local", "local": {"latency_ms": 0}}, "request": {"max_tokens": 4}}
    plan = make_plan(parse_spec(data))
    assert (plan.rows, plan.to_send, plan.input_errors) == (2, 1, 1)
    assert [m.model for m in plan.models] == ["openai/gpt-4o-mini"] and not plan.unpriced
    assert not any("fallback" in n for n in plan.notes)  # the job has none
    assert any("name no model" in n for n in plan.notes)
    # The run agrees: the line without a model is an error row, without a call.
    result = run_job(parse_spec(data), RUN)
    assert (result.ok, result.errors) == (1, 1)


def test_fallback_note_names_the_specs_own_fallback(tmp_path: Path) -> None:
    data = _spec(tmp_path, max_tokens=4)
    data["endpoint"] = {"base_url": "http://127.0.0.1:9", "api": "openai"}
    data["request"]["fallbacks"] = [{"model": "acme/unpriced-fallback"}]
    plan = make_plan(parse_spec(data))
    assert [n for n in plan.notes if "fallback" in n] == [
        "fallback acme/unpriced-fallback has no price and may answer some rows: their cost is not in the range"]
    data["request"]["model"] = "acme/unpriced-primary"
    data["request"]["fallbacks"] = [{"model": "openai/gpt-4o-mini"}]
    assert not any("fallback" in n for n in make_plan(parse_spec(data)).notes)


@pytest.mark.parametrize("flag", ["--chars-per-token", "--latency-ms"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "1e400", "abc"])
def test_numeric_flags_are_checked_by_argparse(tmp_path: Path, flag: str, value: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(_spec(tmp_path, max_tokens=4)))
    with pytest.raises(SystemExit) as exc:
        main(["plan", str(spec_file), f"{flag}={value}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {flag}:" in err and "finite number greater than 0" in err
    assert "Traceback" not in err
    if value != "abc":  # and make_plan refuses the same values
        with pytest.raises(SpecError, match=flag):
            make_plan(parse_spec(_spec(tmp_path)), **{flag[2:].replace("-", "_"): float(value)})


def test_bad_prices_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(_spec(tmp_path, max_tokens=4)))
    assert main(["plan", str(spec_file), "--prices", str(tmp_path / "nope.yaml")]) == 2
    assert "--prices" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("- not\n- a table\n")
    assert main(["plan", str(spec_file), "--prices", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: " in capsys.readouterr().err


def test_a_priced_cost_below_the_printed_precision_is_not_shown_as_zero(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "hi"}\n')
    data = _spec(tmp_path, max_tokens=1)
    data["input"] = {"path": str(path), "prompt": "{{text}}"}
    data["output"] = {"path": str(tmp_path / "out.parquet")}
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(data))
    assert main(["plan", str(spec_file)]) == 0
    out = capsys.readouterr().out
    assert "$0.0000" not in out and "<$0.0001 - <$0.0001" in out


def test_a_huge_assumed_latency_prints_a_readable_wall_time(tmp_path: Path) -> None:
    from batcher.plan import render_text

    text = render_text(make_plan(parse_spec(_spec(tmp_path, max_tokens=4)), latency_ms=1e300))
    assert max(map(len, text.splitlines())) < 200 and "e+29" in text


def test_budget_with_an_unpriced_model_is_flagged_as_the_run_refuses_it(tmp_path: Path) -> None:
    from batcher import SpecError as RunRefused

    empty = tmp_path / "in.jsonl"
    empty.write_text("")
    data = _spec(tmp_path, max_tokens=4)
    data["input"] = {"path": str(empty), "prompt": "{{text}}"}
    data["output"] = {"path": str(tmp_path / "out.parquet")}
    data["request"]["model"] = "acme/unpriced"
    data["limits"] = {"max_cost_usd": 1.0}
    plan = make_plan(parse_spec(data))
    assert plan.to_send == 0
    assert any("'acme/unpriced' has no price: the run would refuse to start" in n for n in plan.notes)
    with pytest.raises(RunRefused, match="acme/unpriced"):  # and so it does, even with no row to send
        run_job(parse_spec(data), RUN)
