"""The cost cap: budget.py's pieces alone, then the promises against the gateway (a cap that holds whichever model
orq answers with, a cap for the job across reruns, unpriced answers, a checked --prices file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from batcher import SpecError, parse_spec, run_job
from batcher.budget import Budget, BudgetStop, completion_bound, recorded_spend, unpriced, worst_case
from batcher.cli import main as cli_main
from batcher.gateway import Fault, Gateway, GatewayConfig, serve_in_thread
from batcher.prices import Price, PriceTable, usd
from batcher.sinks import state_dir_for

from .conftest import options

CHEAP, DEAR = "openai/gpt-4o-mini", "openai/gpt-4o"
# The fallback costs 10x the primary: a reservation at the primary's price lets the spend run past the cap.
PRICES = {CHEAP: {"prompt": 100, "completion": 100}, DEAR: {"prompt": 1000, "completion": 1000}}
TABLE = PriceTable({CHEAP: Price(100, 100), DEAR: Price(1000, 1000)})


# --- budget.py alone --------------------------------------------------------------------------------------


def test_reservations_never_pass_the_cap_and_earlier_spend_counts() -> None:
    b = Budget(1.0, spent_before=0.4)
    assert b.reserve(0.5) and not b.reserve(0.2)  # 0.4 + 0.5 + 0.2 > 1
    b.settle(0.5, 0.1, answered=True)
    assert b.spent == pytest.approx(0.5) and b.reserved == 0
    b.reserve(0.3)
    b.settle(0.3, None, answered=False)  # an error row: nothing billed
    assert b.spent == pytest.approx(0.5)
    b.reserve(0.3)
    b.settle(0.3, None, answered=True)  # answered by a model with no price: the whole worst case counts
    assert b.spent == pytest.approx(0.8)
    unlimited = Budget(None)
    assert unlimited.reserve(1e9) and not unlimited.enforced


def test_worst_case_is_the_dearest_model_that_may_answer() -> None:
    body = {"model": CHEAP, "max_tokens": 10, "n": 2}
    prompt = "é" * 50  # 100 UTF-8 bytes: the bound for a byte-level tokenizer
    assert completion_bound(body) == 20
    assert worst_case(TABLE, [CHEAP], prompt, body) == pytest.approx((100 + 20) * 100 / 1e6)
    assert worst_case(TABLE, [CHEAP, DEAR], prompt, body) == pytest.approx((100 + 20) * 1000 / 1e6)
    assert worst_case(TABLE, [CHEAP, "nobody/unpriced"], prompt, body) is None
    assert unpriced(TABLE, [CHEAP, "nobody/unpriced", "", "a/b"]) == ["a/b", "nobody/unpriced"]
    thinking = {**body, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert completion_bound(thinking) == 20 + 2 * 1024


def test_recorded_spend_and_the_stop_marker(tmp_path: Path) -> None:
    journal = tmp_path / "journal.jsonl"
    lines = [{"_i": 0, "id": "a", "status": "ok", "cost_usd": 0.25}, {"_i": 1, "id": "b", "status": "ok", "cost_usd": None},
             {"_i": 2, "id": "c", "status": "ok", "cached": True, "cost_usd": 0.0}]
    journal.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"_i": 3, "id": "d", "cost_usd": 9')  # torn
    assert recorded_spend(journal) == pytest.approx(0.25)
    assert recorded_spend(tmp_path / "none.jsonl") == 0.0
    stop = BudgetStop(tmp_path)
    assert stop.stopped_at() is None
    stop.record(1.5, 1.2)
    assert stop.stopped_at() == 1.5
    stop.clear()
    assert stop.stopped_at() is None


@pytest.mark.parametrize(
    ("content", "name", "expected"),
    [
        (None, "missing.yaml", "cannot read"),
        ("models: [1, 2]", "bad.yaml", "models: must map"),
        ("{not json", "bad.json", "not valid JSON or YAML"),
        ('{"my/model": {"prompt": 1}}', "p.json", "my/model.completion: is required"),
        ('{"models": {"my/model": {"prompt": -1, "completion": 1}}}', "p.json", "models.my/model.prompt: Input should be greater"),
        ('{"my/model": {"prompt": "cheap", "completion": 1}}', "p.json", "my/model.prompt"),
        ('{"my/model": 3}', "p.json", "my/model"),
        ('{"my/model": {"prompt": 1, "completion": 1, "extra": 1}}', "p.json", "my/model.extra"),
        ('{"my/model": {"prompt": "1", "completion": 1}}', "p.json", "my/model.prompt: Input should be a valid number"),
        ('{"my/model": {"prompt": 1, "completion": true}}', "p.json", "my/model.completion: Input should be a valid number"),
        ("my/model: {prompt: 1, completion: 1, cached_prompt: '0.5'}", "p.yaml", "my/model.cached_prompt"),
    ],
)
def test_prices_file_is_checked_like_the_specs_prices(tmp_path: Path, content: str | None, name: str,
                                                      expected: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(SpecError, match="--prices") as err:
        PriceTable.from_file(path)
    assert expected in str(err.value)


def test_prices_file_both_forms(tmp_path: Path) -> None:
    flat = tmp_path / "flat.yaml"
    flat.write_text("my/model: {prompt: 1, completion: 2, cached_prompt: 0.5}\n")
    assert PriceTable.from_file(flat).get("my/model") == Price(1, 2, 0.5)
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"source": "ours", "date": "2026-11-23", "models": {"m": {"prompt": 0, "completion": 3}}}))
    table = PriceTable.from_file(nested)
    assert table.get("m") == Price(0, 3) and table.source == "ours"


# --- against the gateway ------------------------------------------------------------------------------------


def _spec_file(tmp_path: Path, spec: dict[str, object]) -> str:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_bad_prices_file_exits_2_before_any_request(make_spec, gateway: Gateway, tmp_path: Path, capsys) -> None:
    spec = _spec_file(tmp_path, make_spec())
    bad = tmp_path / "prices.json"
    bad.write_text(json.dumps({"openai/gpt-4o-mini": {"prompt": -0.15, "completion": 0.6}}))
    assert cli_main(["run", spec, "--quiet", "--prices", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "openai/gpt-4o-mini.prompt" in err and "greater than or equal to 0" in err
    assert cli_main(["run", spec, "--quiet", "--prices", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert gateway.stats.total == 0


@pytest.mark.parametrize("api", ["orq", "openai"])
def test_cap_holds_when_a_dearer_fallback_answers_every_row(make_spec, gateway: Gateway, api: str) -> None:
    # The primary fails for good; orq falls back server-side (the gateway applies the forwarded fallbacks to
    # upstream faults), batcher falls back itself against an openai server. Either way the dearer model answers.
    gateway.set_faults([Fault("status", status=503, model=CHEAP, upstream=api == "orq")])
    cap = 1.0
    spec = parse_spec(make_spec(endpoint={"api": api}, prices=PRICES, request={"fallbacks": [{"model": DEAR}]},
                                limits={"max_cost_usd": cap, "concurrency": 8}))
    result = run_job(spec, options())
    df = pl.read_parquet(spec.output.path)
    spent = df["cost_usd"].sum()
    print(f"budget with fallbacks ({api}): cap ${cap:.2f}, spent ${spent:.4f} on {df.height} rows")
    assert result.status == "budget" and result.exit_code == 7
    assert 0 < df.height < 300 and (df["model"] == DEAR).all()
    assert spent <= cap
    assert gateway.stats.billed == df.height  # nothing paid that is not in the output


def test_budget_refuses_an_unpriced_fallback_before_any_request(make_spec, gateway: Gateway, tmp_path: Path,
                                                               capsys) -> None:
    spec = make_spec(request={"fallbacks": [{"model": "nobody/unpriced-fallback"}]}, limits={"max_cost_usd": 1.0})
    assert cli_main(["run", _spec_file(tmp_path, spec), "--quiet"]) == 2
    assert "no price for 'nobody/unpriced-fallback'" in capsys.readouterr().err
    assert gateway.stats.total == 0


def test_an_unpriced_fallback_answer_costs_null_and_the_summary_says_so(make_spec, gateway: Gateway) -> None:
    gateway.set_faults([Fault("status", status=503, model=CHEAP, upstream=True)])
    spec = parse_spec(make_spec(request={"fallbacks": [{"model": "nobody/unpriced-fallback"}]}))
    result = run_job(spec, options(limit=5))
    df = pl.read_parquet(spec.output.path)
    assert (df["model"] == "nobody/unpriced-fallback").all() and (df["status"] == "ok").all()
    assert df["cost_usd"].null_count() == 5  # not the primary's price
    assert result.unpriced == 5 and "5 unpriced rows" in result.summary()


def test_the_cap_is_for_the_job_across_reruns(make_spec, gateway: Gateway, tmp_path: Path, capsys) -> None:
    cap = {"max_cost_usd": 0.5, "concurrency": 4}
    spec = make_spec(prices=PRICES, limits=cap)
    path = _spec_file(tmp_path, spec)
    assert cli_main(["run", path, "--quiet"]) == 7
    out = Path(spec["output"]["path"])
    first = pl.read_parquet(out)
    assert 0 < first.height < 300 and first["cost_usd"].sum() <= 0.5
    capsys.readouterr()
    sent = gateway.stats.total
    # the same command again: the job has reached its cap; it says so and asks nothing
    assert cli_main(["run", path, "--quiet"]) == 7
    err = capsys.readouterr().err
    assert "already reached" in err and "no request made" in err and "max_cost_usd" in err
    assert gateway.stats.total == sent
    assert pl.read_parquet(out).height == first.height
    # a raised cap finishes more, and the job's whole spend stays under the new cap
    path = _spec_file(tmp_path, make_spec(prices=PRICES, limits={**cap, "max_cost_usd": 1.0}))
    assert cli_main(["run", path, "--quiet"]) == 7
    second = pl.read_parquet(out)
    assert second.height > first.height and second["cost_usd"].sum() <= 1.0
    assert "of it by earlier runs" in capsys.readouterr().err
    path = _spec_file(tmp_path, make_spec(prices=PRICES, limits={**cap, "max_cost_usd": 100.0}))
    assert cli_main(["run", path, "--quiet"]) == 0
    done = pl.read_parquet(out)
    assert done.height == 300 and (done["status"] == "ok").all() and done["cost_usd"].sum() <= 100.0
    assert gateway.stats.billed == 300  # no row paid twice


# --- a cap that many workers share (finding: a failed reservation used to declare the budget reached) ----------

LB_PRICES = {"cheap/m": {"prompt": 0.1, "completion": 0.1}, "dear/m": {"prompt": 50, "completion": 200}}
LB_REQUEST = {"model": None, "max_tokens": 50,
              "load_balancer": {"type": "weight_based", "models": [{"model": "cheap/m", "weight": 0.9},
                                                                   {"model": "dear/m", "weight": 0.1}]}}


@pytest.mark.parametrize("concurrency", [1, 32])
def test_many_workers_wait_for_calls_in_flight_instead_of_stopping_early(make_spec, gateway: Gateway, tmp_path: Path,
                                                                         capsys, concurrency: int) -> None:
    # 32 pessimistic reservations (each at dear/m's worst case) fill the cap long before the spend does: a row
    # that does not fit waits for them to settle. The whole job costs about half the cap, at any concurrency.
    spec = make_spec(endpoint={"api": "openai"}, prices=LB_PRICES, request=LB_REQUEST,
                     limits={"max_cost_usd": 0.5, "concurrency": concurrency})
    result = run_job(parse_spec(spec), options())
    df = pl.read_parquet(spec["output"]["path"])
    with capsys.disabled():
        print(f"concurrency {concurrency}: {result.ok} rows ok, ${df['cost_usd'].sum():.4f} of a $0.5 cap "
              f"(exit {result.exit_code})")
    assert result.exit_code == 0 and result.ok == 300 and df["cost_usd"].sum() <= 0.5
    # the same cap again: nothing is left, and nothing is refused as "already reached"
    assert cli_main(["run", _spec_file(tmp_path, spec), "--quiet"]) == 0
    assert "already reached" not in capsys.readouterr().err and gateway.stats.billed == 300


def test_a_cap_that_a_row_no_longer_fits_stops_once_nothing_is_in_flight(make_spec, gateway: Gateway,
                                                                         tmp_path: Path, capsys) -> None:
    # A cap about 40 worst cases wide: the job stops when the next row does not fit with nothing in flight,
    # having spent more than half the cap (not after the first 32 reservations), and a rerun says so at once.
    spec = make_spec(endpoint={"api": "openai"}, prices={"dear/m": {"prompt": 50, "completion": 200}},
                     request={"model": "dear/m", "max_tokens": 50}, limits={"max_cost_usd": 0.5, "concurrency": 32})
    path = _spec_file(tmp_path, spec)
    assert cli_main(["run", path, "--quiet"]) == 7
    df = pl.read_parquet(spec["output"]["path"])
    needed = BudgetStop(state_dir_for(Path(spec["output"]["path"]))).needed()
    spent = df["cost_usd"].sum()
    assert needed is not None and spent <= 0.5 < spent + needed
    assert df.height > 32
    capsys.readouterr()
    sent = gateway.stats.total
    assert cli_main(["run", path, "--quiet"]) == 7
    assert "already reached" in capsys.readouterr().err and gateway.stats.total == sent


def _calls_counted(state: Path) -> int:
    """Calls batcher counted as spent: intents in spend.log (one per call sent; read before a fold)."""
    return sum(1 for line in (state / "spend.log").read_text().splitlines() if line.startswith("["))


def test_calls_cut_off_by_the_deadline_count_at_their_worst_case(make_spec, tmp_path: Path, capsys) -> None:
    # Every call outlives the deadline: the server bills it, batcher never sees an answer. Each such attempt is
    # charged its worst case, so the cap bounds what was billed; the journal keeps it for the rerun.
    with serve_in_thread(GatewayConfig(latency_s=0.3)) as gw:
        spec = make_spec(endpoint={"base_url": gw.base_url, "api": "openai"}, prices={DEAR: {"prompt": 2.5, "completion": 10}},
                         request={"model": DEAR, "timeout": {"call_timeout": 50}, "retry": {"count": 2}},
                         limits={"max_cost_usd": 0.01, "concurrency": 8})
        result = run_job(parse_spec(spec), options(limit=60))
        state = state_dir_for(Path(spec["output"]["path"]))
        counted = _calls_counted(state)
        billed = gw.stats.billed
        df = pl.read_parquet(spec["output"]["path"])
        with capsys.disabled():
            print(f"deadline: gateway billed {billed} calls, batcher counted {counted} calls, "
                  f"≤ ${result.unconfirmed_usd:.4f} unconfirmed of a $0.01 cap")
        assert billed > 0 and counted >= billed
        assert (df["status"] == "error").all() and result.status == "budget"
        assert 0 < result.unconfirmed_usd <= 0.01 and "unconfirmed" in result.summary()
        # the rerun counts what may have been billed: nothing more is sent under the same cap
        sent = gw.stats.total
        capsys.readouterr()
        assert cli_main(["run", _spec_file(tmp_path, spec), "--quiet", "--limit", "60"]) == 7
        err = capsys.readouterr().err
        assert "already reached" in err and "unconfirmed" in err and gw.stats.total == sent


def test_fold_spend_counts_unanswered_calls_and_unconfirmed_attempts_once(tmp_path: Path) -> None:
    from batcher.budget import SpendLog, fold_spend

    log = SpendLog(tmp_path)
    for rid, worst in (("a", 0.5), ("b", 0.25), ("b", 0.25), ("c", 0.125), (7, 1.0)):
        log.sent(rid, worst)
    log.close()
    with open(tmp_path / "spend.log", "ab") as f:
        f.write(b'["d", 64')  # torn by the kill: written before the send, so that call never left
    journal = [
        {"_i": 0, "id": "a", "status": "ok", "cost_usd": 0.1},  # answered: its cost, not its intent
        {"_i": 1, "id": "b", "status": "ok", "cost_usd": 0.1, "unconfirmed_usd": 0.25},  # one timeout, then an answer
        {"_i": 2, "id": "c", "status": "error", "unconfirmed_usd": 0.125},  # timed out for good
    ]  # row 7: in flight at the kill, no record: its worst case
    (tmp_path / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in journal))
    prior = fold_spend(tmp_path)
    assert prior.spent == pytest.approx(0.1 + 0.35 + 0.125 + 1.0)
    assert prior.unconfirmed == pytest.approx(0.25 + 0.125 + 1.0)
    # the compaction drops the error row; the carried line keeps what it (and row 7) may have cost
    (tmp_path / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in journal[:2]))
    again = fold_spend(tmp_path)
    assert again == prior
    assert recorded_spend(tmp_path / "journal.jsonl") == pytest.approx(0.45)


def test_amounts_under_a_cent_never_print_as_zero(make_spec, gateway: Gateway, tmp_path: Path, capsys) -> None:
    # A cap of a few thousandths of a dollar: the stop names what the next row may cost, not "$0.0000".
    assert [usd(v) for v in (0, 0.0000423, 0.00123, 1.5, 1234.5)] == \
        ["$0.0000", "$0.000042", "$0.0012", "$1.5000", "$1,234.5000"]
    spec = make_spec(prices={"openai/gpt-4o-mini": {"prompt": 0.15, "completion": 0.6}},
                     limits={"max_cost_usd": 0.0005, "concurrency": 2})
    assert cli_main(["run", _spec_file(tmp_path, spec), "--quiet"]) == 7
    err = capsys.readouterr().err
    assert re.search(r"may cost up to \$0\.0000[1-9]", err), err
