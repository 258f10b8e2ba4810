"""Inputs and paths: `~`/`$VARS` in every path, unsendable rows as error rows, dictionary-encoded columns,
JSONL errors named by line, and the local gateway's faults checked by `validate`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from batcher import SpecError, parse_spec, run_job
from batcher.cli import main as cli_main
from batcher.gateway import Gateway

from .conftest import options, write_jsonl

# --- `~` and environment variables -----------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake home and a working directory of its own, so a literal `~` or `$OUT` folder would show up there."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("OUT", str(tmp_path / "outdir"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


@pytest.mark.parametrize(("section", "key", "written", "expected"), [
    ("input", "path", "~/in.jsonl", "{home}/in.jsonl"),
    ("input", "path", "${OUT}/in.jsonl", "{out}/in.jsonl"),
    ("output", "path", "$OUT/o.parquet", "{out}/o.parquet"),
    ("output", "path", "~/o.jsonl", "{home}/o.jsonl"),
    (None, "cache_dir", "~/.cache/batcher", "{home}/.cache/batcher"),
    (None, "cache_dir", "$OUT/cache", "{out}/cache"),
])
def test_spec_paths_expand_home_and_variables(home: Path, tmp_path: Path, section: str | None, key: str,
                                              written: str, expected: str) -> None:
    data = {"input": {"path": "in.jsonl", "prompt": "{{q}}"}, "output": {"path": "o.parquet"},
            "request": {"model": "m"}}
    if section is None:
        data[key] = written
    else:
        data[section][key] = written  # type: ignore[index]
    spec = parse_spec(data)
    value = getattr(spec, key) if section is None else getattr(getattr(spec, section), key)
    assert str(value) == expected.format(home=home, out=tmp_path / "outdir")


def test_an_unset_variable_in_a_path_is_a_spec_error_naming_the_field(home: Path) -> None:
    data = {"input": {"path": "$NO_SUCH_VAR_X/in.jsonl", "prompt": "{{q}}"}, "output": {"path": "o.parquet"},
            "request": {"model": "m"}}
    with pytest.raises(SpecError, match=r"input\.path: environment variable \$NO_SUCH_VAR_X .* is not set"):
        parse_spec(data)


def test_validate_shows_the_expanded_paths(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("input: {path: ~/in.jsonl, prompt: '{{q}}'}\noutput: {path: $OUT/o.parquet}\nrequest: {model: m}\n")
    assert cli_main(["validate", str(spec)]) == 0
    assert f"({home}/in.jsonl -> {tmp_path / 'outdir'}/o.parquet)" in capsys.readouterr().out


def test_a_run_writes_where_tilde_and_variables_point(home: Path, tmp_path: Path, gateway: Gateway) -> None:
    """cache_dir from the spec, --output and --prices from the command line: nothing named `~` or `$OUT`."""
    write_jsonl(home / "in.jsonl", [{"id": i, "q": f"question {i}"} for i in range(4)])
    (home / "prices.json").write_text(json.dumps({"my/model": {"prompt": 1000, "completion": 0}}))
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "input: {path: ~/in.jsonl, id_column: id, prompt: '{{q}}'}\noutput: {path: ~/unused.parquet}\n"
        f"endpoint: {{base_url: '{gateway.base_url}'}}\nrequest: {{model: my/model, max_tokens: 4, "
        "cache: {type: exact_match, ttl: 60}}\ncache_dir: ~/.cache/batcher\n"
    )
    argv = ["run", str(spec), "--quiet", "--output", "$OUT/o.parquet", "--prices", "~/prices.json"]
    assert cli_main(argv) == 0
    out = pl.read_parquet(tmp_path / "outdir" / "o.parquet")
    assert out.height == 4 and (out["cost_usd"] > 0).all()  # priced by the --prices file: it was read
    assert (home / ".cache" / "batcher" / "responses.sqlite").exists()
    assert list(Path.cwd().iterdir()) == []


def test_an_unset_variable_in_a_flag_is_a_usage_error(home: Path, tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("input: {path: in.jsonl, prompt: '{{q}}'}\noutput: {path: o.parquet}\nrequest: {model: m}\n")
    with pytest.raises(SystemExit) as exc:
        cli_main(["run", str(spec), "--output", "$NO_SUCH_VAR_X/o.parquet"])
    assert exc.value.code == 2


# --- rows that cannot be sent ------------------------------------------------------------------------------------

CACHE = {"type": "exact_match", "ttl": 60}


def test_a_lone_surrogate_makes_an_input_error_row_and_the_run_goes_on(make_spec, gateway: Gateway,
                                                                      tmp_path: Path) -> None:
    # written by hand: json.dumps would never produce these lines, a truncating tool does
    lines = [
        '{"id": 1, "text": "fine", "note": "n", "who": "a"}',
        '{"id": 2, "text": "cut off \\ud83d", "note": "n", "who": "a"}',  # lone high surrogate in the prompt
        '{"id": 3, "text": "paired \\ud83d\\ude00 is an emoji", "note": "n", "who": "a"}',
        '{"id": 4, "text": "fine", "note": "\\ude00 tail", "who": "a"}',  # in a kept column: not sent, kept
        '{"id": 5, "text": "fine too", "note": "n", "who": "x\\udbff"}',  # in an inputs column
        '{"id": 6, "text": "fine at last", "note": "n", "who": "a"}',
    ]
    src = tmp_path / "s.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{text}}",
                                       "inputs_columns": ["who"]},
                                output={"path": str(tmp_path / "o.jsonl"), "keep_columns": ["note"]},
                                request={"cache": CACHE}))
    result = run_job(spec, options())
    assert result.status == "finished" and result.ok == 4 and result.errors == 2
    out = {r["id"]: r for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())}
    assert [out[i]["status"] for i in range(1, 7)] == ["ok", "error", "ok", "ok", "error", "ok"]
    assert {out[i]["error_kind"] for i in (2, 5)} == {"input"}
    assert out[2]["error"].startswith("line 2: the prompt holds a lone UTF-16 surrogate")
    assert out[4]["note"] == "\ude00 tail"  # written back as given (escaped in the JSONL output)
    assert out[5]["error"].startswith("line 5: inputs column 'who'")
    assert gateway.stats.total == 3  # rows 1 and 4 ask the same: one call
    assert any("\U0001f600" in b["body"]["prompt"] for b in gateway.stats.bodies)  # a pair is one character


def test_a_lone_surrogate_in_an_id_is_refused_naming_the_line(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    src = tmp_path / "s.jsonl"
    src.write_text('{"id": "a", "text": "x"}\n{"id": "b\\ud83d", "text": "y"}\n', encoding="utf-8")
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{text}}"})))
    assert cli_main(["run", str(spec), "--quiet"]) == 3
    assert gateway.stats.total == 0


def test_a_lone_surrogate_in_an_openai_batch_body_is_an_error_row(make_spec, gateway: Gateway, tmp_path: Path) -> None:
    src = tmp_path / "b.jsonl"
    src.write_text('{"custom_id": "a", "body": {"prompt": "fine"}}\n'
                   '{"custom_id": "b", "body": {"prompt": "fine", "user": "x\\ud83d"}}\n', encoding="utf-8")
    spec = parse_spec(make_spec(input={"path": str(src), "format": "openai_batch", "id_column": None, "prompt": None},
                                output={"path": str(tmp_path / "o.jsonl")}))
    assert run_job(spec, options()).errors == 1
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "error"] and rows[1]["error"].startswith("line 2: the body holds")
    assert gateway.stats.total == 1

# --- dictionary-encoded (pandas `category`) columns ---------------------------------------------------------------


def test_dictionary_encoded_string_columns_work_as_id_prompt_and_template_variables(
        make_spec, gateway: Gateway, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def cat(values: list[str]) -> pa.DictionaryArray:
        arr = pa.array(values).dictionary_encode()
        assert pa.types.is_dictionary(arr.type)
        return arr

    src = tmp_path / "cat.parquet"
    pq.write_table(pa.table({"rid": cat(["r1", "r2", "r3"]), "prompt": cat(["say a", "say b", "say a"]),
                             "topic": cat(["x", "y", "x"])}), src)
    assert pa.types.is_dictionary(pq.read_schema(src).field("rid").type)  # stored as a dictionary, read as one

    by_column = parse_spec(make_spec(input={"path": str(src), "id_column": "rid", "prompt": None,
                                            "prompt_column": "prompt"},
                                     output={"path": str(tmp_path / "a.parquet"), "keep_columns": ["topic"]}))
    result = run_job(by_column, options())
    assert result.ok == 3
    out = pl.read_parquet(tmp_path / "a.parquet")
    assert out["rid"].to_list() == ["r1", "r2", "r3"] and out["topic"].to_list() == ["x", "y", "x"]
    assert run_job(by_column, options()).status == "nothing_to_do"  # resume matches the decoded ids

    templated = parse_spec(make_spec(input={"path": str(src), "id_column": "rid", "prompt": "{{topic}}: {{prompt}}"},
                                     output={"path": str(tmp_path / "b.parquet")}))
    gateway.stats.reset()
    assert run_job(templated, options()).ok == 3
    assert sorted(b["body"]["prompt"] for b in gateway.stats.bodies) == ["x: say a", "x: say a", "y: say b"]


# --- JSONL errors by line number -----------------------------------------------------------------------------------


def test_non_object_jsonl_lines_are_named_by_line_number(make_spec, tmp_path: Path) -> None:
    src = tmp_path / "s.jsonl"
    src.write_text('{"id": 1, "text": "a"}\n\n[1, 2]\n{"id": 2, "text": "b"}\n"just text"\n', encoding="utf-8")
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": None, "prompt": "{{text}}"},
                                output={"path": str(tmp_path / "o.jsonl")}))
    assert run_job(spec, options()).errors == 2
    errors = [r["error"] for r in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines()) if r["error"]]
    assert errors == ["line 3: a JSONL line must be an object, got list",
                      "line 5: a JSONL line must be an object, got str"]


def test_an_id_beyond_int64_exits_3_naming_the_line(make_spec, gateway: Gateway, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "s.jsonl"
    src.write_text(f'{{"id": 1, "text": "a"}}\n{{"id": {2**70}, "text": "b"}}\n', encoding="utf-8")
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{text}}"})))
    assert cli_main(["run", str(spec), "--quiet"]) == 3
    assert "line 2: id 'id' is 1180591620717411303424, beyond 64-bit integers" in capsys.readouterr().err
    assert gateway.stats.total == 0


# --- the local gateway's faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("faults", "expected"), [
    ([{"kind": "status", "statsu": 503}], "endpoint.local.faults[0].statsu: unknown fault field; allowed: "),
    ([{"kind": "slow", "delay_ms": 5}, {"kind": "stauts"}], "endpoint.local.faults[1].kind: fault kind must be one of"),
    ([{"status": 503}], "endpoint.local.faults[0].kind: is required, one of bad_finish_reason,"),
    ([{"kind": "status", "rate": 1.5}], "endpoint.local.faults[0].rate: fault rate must be in 0..1"),
    ([{"kind": "status", "status": "503x"}], "endpoint.local.faults[0].status: must be int, got '503x'"),
])
def test_a_typo_in_local_faults_fails_validate_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               faults: list[dict[str, object]], expected: str) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"input": {"path": "in.jsonl", "prompt": "{{q}}"}, "output": {"path": "o.parquet"},
                                "endpoint": {"base_url": "local", "local": {"faults": faults}},
                                "request": {"model": "m"}}))
    assert cli_main(["validate", str(spec)]) == 2
    assert expected in capsys.readouterr().err


def test_valid_local_faults_pass_validate_and_act_in_the_run(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"q": f"q{i}"} for i in range(3)])
    spec = parse_spec({"input": {"path": str(tmp_path / "in.jsonl"), "prompt": "{{q}}"},
                       "output": {"path": str(tmp_path / "o.jsonl")},
                       "endpoint": {"base_url": "local", "local": {"latency_ms": 0, "faults": [
                           {"kind": "status", "status": 400, "prompt_contains": "q1", "retry_after": 1}]}},
                       "request": {"model": "openai/gpt-4o-mini", "max_tokens": 4}})
    result = run_job(spec, options())
    assert result.ok == 2 and result.errors == 1


def test_template_values_from_a_jsonl_file_reach_the_wire_as_json(make_spec, gateway: Gateway,
                                                                  tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "s.jsonl", [{"id": 1, "flag": True, "meta": {"a": 0}, "tags": ["x", "y"]}])
    spec = parse_spec(make_spec(input={"path": str(src), "id_column": "id", "prompt": "{{flag}} {{meta}} {{tags}}"}))
    assert run_job(spec, options()).ok == 1
    assert gateway.stats.bodies[-1]["body"]["prompt"] == 'true {"a": 0} ["x", "y"]'
