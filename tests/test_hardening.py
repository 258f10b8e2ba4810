"""What an outside tester broke by reading only the README: each test drives the command line, as they did."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batcher.cli import main
from batcher.gateway import Gateway
from batcher.sinks import state_dir_for


def _small_parquet(path: Path, n: int = 3) -> Path:
    pq.write_table(pa.table({"rid": list(range(n)), "p": [f"p{i}" for i in range(n)]}), path)
    return path


def _spec(base_url: str, inp: Path, out: Path, **sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "t",
        "input": {"path": str(inp), "id_column": "rid", "prompt": "Say {{p}}"},
        "output": {"path": str(out)},
        "endpoint": {"base_url": base_url, "api": "orq"},
        "request": {"model": "openai/gpt-4o-mini", "max_tokens": 2},
    }
    for name, value in sections.items():
        spec[name] = {**spec.get(name, {}), **value}
    return spec


def _write(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


# ------------------------------------------------------------------------------- 4: device files, fifos


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_path_that_is_a_fifo_is_refused_before_any_call(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], overwrite: bool
) -> None:
    out = tmp_path / "pipe.jsonl"
    os.mkfifo(out)
    spec = _write(tmp_path / "job.yaml", _spec(gateway.base_url, _small_parquet(tmp_path / "in.parquet"), out,
                                               output={"format": "jsonl"}))
    assert main(["run", str(spec), "--quiet", *(["--overwrite"] if overwrite else [])]) == 4
    err = capsys.readouterr().err
    assert f"the output path {out} is a fifo, not a regular file" in err
    assert stat.S_ISFIFO(out.stat().st_mode)
    assert not state_dir_for(out).exists()
    assert gateway.stats.total == 0


# ------------------------------------------------------------------------------- 2: an id named like a result


@pytest.mark.parametrize("column", ["text", "status", "model", "error"])
@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "openai_batch"])
def test_an_id_column_named_like_an_output_column_is_refused_by_validate(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], column: str, fmt: str
) -> None:
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({column: ["a", "b"], "p": ["x", "y"]}), inp)
    out = tmp_path / ("o.parquet" if fmt == "parquet" else "o.jsonl")
    spec = _spec(gateway.base_url, inp, out, input={"id_column": column}, output={"format": fmt})
    path = _write(tmp_path / "job.yaml", spec)
    assert main(["validate", str(path)]) == 2
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"input.id_column: {column!r} is the name of one of batcher's output columns" in err
    assert gateway.stats.total == 0 and not out.exists()


def test_a_kept_column_renamed_onto_the_id_is_refused(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"input_text": ["a", "b"], "text": ["x", "y"], "p": ["x", "y"]}), inp)
    spec = _spec(gateway.base_url, inp, tmp_path / "o.parquet", input={"id_column": "input_text"},
                 output={"keep_columns": ["text"]})
    assert main(["validate", str(_write(tmp_path / "job.yaml", spec))]) == 2
    assert "'text' would be written as the output column 'input_text', which is the id column" in capsys.readouterr().err


# ------------------------------------------------------------------------------- 1: report --html over a file


def _one_run(gateway: Gateway, tmp_path: Path) -> Path:
    out = tmp_path / "out" / "rsb.parquet"
    spec = _write(tmp_path / "job.yaml", _spec(gateway.base_url, _small_parquet(tmp_path / "in.parquet"), out))
    assert main(["run", str(spec), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("overwrite", [False, True])
def test_report_html_never_replaces_a_file_it_reports(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], overwrite: bool
) -> None:
    out = _one_run(gateway, tmp_path)
    before = out.read_bytes()
    for target in (str(out), str(out.parent), f"{out.parent}/./../out/rsb.parquet"):
        args = ["report", target, "--html", str(out), *(["--overwrite"] if overwrite else [])]
        assert main(args) == 4
        err = capsys.readouterr().err
        assert f"--html {out} is one of the files being reported" in err
        assert out.read_bytes() == before


def test_report_html_replaces_only_its_own_pages_without_overwrite(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _one_run(gateway, tmp_path)
    precious = tmp_path / "precious.parquet"
    precious.write_bytes(b"PAR1 not mine")
    assert main(["report", str(out), "--html", str(precious)]) == 4
    assert "already exists and is not a report page batcher wrote" in capsys.readouterr().err
    assert precious.read_bytes() == b"PAR1 not mine"
    page = tmp_path / "r.html"
    assert main(["report", str(out), "--html", str(page)]) == 0
    assert main(["report", str(out), "--html", str(page)]) == 0  # its own page: replaced, no flag needed
    assert main(["report", str(out), "--html", str(precious), "--overwrite"]) == 0
    assert precious.read_text().startswith("<!DOCTYPE html>")


# ------------------------------------------------------------------------------- 6: plan's extreme flags


def _plan_spec(tmp_path: Path) -> Path:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"p": "hello there"}\n' * 3)
    spec = {"name": "t", "input": {"path": str(inp), "prompt": "{{p}}"}, "output": {"path": str(tmp_path / "o.jsonl")},
            "endpoint": {"base_url": "local"}, "request": {"model": "openai/gpt-4o-mini", "max_tokens": 2}}
    return _write(tmp_path / "job.yaml", spec)


@pytest.mark.parametrize("value", ["5e-324", "1e-320", "0.09", "100.5", "1e300"])
def test_plan_refuses_chars_per_token_outside_its_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plan", str(_plan_spec(tmp_path)), "--chars-per-token", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "from 0.1 to 100 characters per token" in err and "Traceback" not in err


@pytest.mark.parametrize(("flag", "value"), [("--chars-per-token", "0.1"), ("--chars-per-token", "100"),
                                             ("--latency-ms", "5e-324"), ("--latency-ms", "1e308")])
def test_plan_takes_extreme_values_inside_the_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    assert main(["plan", str(_plan_spec(tmp_path)), flag, value]) == 0
    assert "prompt tokens" in capsys.readouterr().out


# ------------------------------------------------------------------------------- 5: the official spec's types


LOOSE = [
    ({"top_p": True}, "request.top_p: Input should be a valid number (got true)"),
    ({"n": True}, "request.n: Input should be a valid integer (got true)"),
    ({"echo": 1}, "request.echo: Input should be a valid boolean (got 1)"),
    ({"temperature": "0.5"}, 'request.temperature: Input should be a valid number (got "0.5")'),
    ({"max_tokens": 3.0}, "request.max_tokens: Input should be a valid integer (got 3.0)"),
    ({"stream": "yes"}, 'request.stream: Input should be a valid boolean (got "yes")'),
    ({"seed": "7"}, 'request.seed: Input should be a valid integer (got "7")'),
    ({"retry": {"count": 2.0}}, "request.retry.count: Input should be a valid integer (got 2.0)"),
    ({"max_tokens": 999999999999999999999}, "request.max_tokens: must be from 1 to 2147483647"),
    ({"max_tokens": 2**31}, "request.max_tokens: must be from 1 to 2147483647"),
    ({"seed": 2**63}, "request.seed: must be from -9223372036854775808 to 9223372036854775807"),
]


@pytest.mark.parametrize(("request_fields", "message"), LOOSE)
def test_request_fields_are_not_coerced(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], request_fields: dict[str, Any],
    message: str,
) -> None:
    spec = _spec(gateway.base_url, _small_parquet(tmp_path / "in.parquet"), tmp_path / "o.parquet",
                 request=request_fields)
    path = _write(tmp_path / "job.yaml", spec)
    assert main(["validate", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert main(["run", str(path), "--quiet"]) == 2
    assert gateway.stats.total == 0


def test_ints_are_still_floats_and_the_bounds_are_reachable(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = {"temperature": 1, "top_p": 1, "frequency_penalty": -2, "seed": -(2**63), "echo": False, "n": 1}
    spec = _spec(gateway.base_url, _small_parquet(tmp_path / "in.parquet"), tmp_path / "o.parquet", request=fields)
    path = _write(tmp_path / "job.yaml", spec)
    assert main(["validate", str(path)]) == 0
    spec["request"]["max_tokens"] = 2**31 - 1
    assert main(["validate", str(_write(path, spec))]) == 0


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_still_validates(path: Path) -> None:
    assert main(["validate", str(path)]) == 0


# ------------------------------------------------------------------------------- 7: YAML spelling


def test_a_key_written_twice_in_a_yaml_spec_is_an_error(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = yaml.safe_dump(_spec(gateway.base_url, _small_parquet(tmp_path / "in.parquet"), tmp_path / "o.parquet"))
    path = tmp_path / "job.yaml"
    path.write_text(text + "request:\n  model: openai/gpt-4o\n")
    assert main(["validate", str(path)]) == 2
    line = text.splitlines().index("request:") + 1
    assert f"the key 'request' appears twice (lines {line} and {len(text.splitlines()) + 1})" in capsys.readouterr().err
    assert main(["run", str(path), "--quiet"]) == 2 and gateway.stats.total == 0


def test_yaml_anchors_merge_and_exponent_floats_still_read(gateway: Gateway, tmp_path: Path) -> None:
    spec = _spec(gateway.base_url, _small_parquet(tmp_path / "in.parquet"), tmp_path / "o.parquet")
    del spec["request"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec) + "base: &b {model: openai/gpt-4o-mini, max_tokens: 2}\n"
                    "request:\n  <<: *b\n  max_tokens: 3\n  temperature: 1e-1\n")
    from batcher.spec import load_spec

    spec_text = path.read_text().replace("base: &b", "x-base: &b")
    path.write_text(spec_text)
    with pytest.raises(Exception, match="x-base"):  # unknown top-level keys stay errors; the merge itself reads
        load_spec(path)
    path.write_text(spec_text.replace("x-base: &b {model: openai/gpt-4o-mini, max_tokens: 2}\n", "")
                    .replace("request:\n  <<: *b\n", "request:\n  <<: &b {model: openai/gpt-4o-mini, max_tokens: 2}\n"))
    loaded = load_spec(path)
    assert (loaded.request.model, loaded.request.max_tokens, loaded.request.temperature) == ("openai/gpt-4o-mini", 3, 0.1)


# ------------------------------------------------------------------------------- 3: report on batcher's JSONL


def _run_keeping(gateway: Gateway, tmp_path: Path, inp: Path, out: Path, keep: list[str], fmt: str = "") -> Path:
    spec = _spec(gateway.base_url, inp, out, output={"keep_columns": keep, **({"format": fmt} if fmt else {})})
    spec["input"].pop("id_column")
    assert main(["run", str(_write(tmp_path / f"{out.name}.yaml", spec)), "--quiet"]) == 0
    return out


def test_report_reads_a_kept_lone_surrogate_in_a_jsonl_output(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"p":"a","k":"\\udc00"}\n{"p":"b","k":"x"}\n')
    out = _run_keeping(gateway, tmp_path, inp, tmp_path / "x.jsonl", ["k"])
    assert '"k":"\\udc00"' in out.read_text()
    capsys.readouterr()
    assert main(["report", str(out), "--by", "k", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[1] for line in lines[1:3]] == ["x", "\ufffd"] or \
           [line.split(",")[1] for line in lines[1:3]] == ["\ufffd", "x"]


def test_report_of_a_parquet_and_a_jsonl_output_with_kept_maps_and_durations(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({
        "p": ["a", "b"],
        "m": pa.array([[("a", 1)], [("b", 2)]], pa.map_(pa.string(), pa.int64())),
        "dt": pa.array([-1, 2], pa.duration("ns")),
    }), inp)
    a = _run_keeping(gateway, tmp_path, inp, tmp_path / "x.parquet", ["m", "dt"])
    b = _run_keeping(gateway, tmp_path, inp, tmp_path / "x.jsonl", ["m", "dt"])
    capsys.readouterr()
    assert main(["report", str(a), str(b)]) == 0
    assert main(["report", str(a), str(b), "--by", "dt", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    # the JSONL's ISO text and the Parquet's durations are one group each, to the nanosecond
    assert "openai/gpt-4o-mini,-PT0.000000001S,2," in out and "openai/gpt-4o-mini,PT0.000000002S,2," in out


def test_report_csv_keeps_times_and_durations_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "o.parquet"
    pq.write_table(pa.table({
        "dur": pa.array([-1], pa.duration("ns")), "tm": pa.array([86_399_999_999_999], pa.time64("ns")),
        "model": ["m"], "status": ["ok"], "cached": [False], "attempts": [1], "latency_ms": [1.0],
        "prompt_tokens": [1], "completion_tokens": [1], "cached_tokens": [0], "reasoning_tokens": [0],
        "cost_usd": [0.1],
    }), path)
    assert main(["report", str(path), "--by", "dur,tm", "--format", "csv"]) == 0
    assert "m,-PT0.000000001S,23:59:59.999999999,1," in capsys.readouterr().out


def test_report_on_an_openai_batch_output_says_how_to_get_a_report(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run_keeping(gateway, tmp_path, _small_parquet(tmp_path / "in.parquet"), tmp_path / "b.jsonl", [],
                       fmt="openai_batch")
    capsys.readouterr()
    assert main(["report", str(out)]) == 3
    err = capsys.readouterr().err
    assert "an openai_batch output" in err and "output.format: parquet or jsonl" in err and "Traceback" not in err


def test_a_jsonl_input_holding_only_a_bom_is_empty(gateway: Gateway, tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf")
    spec = _spec(gateway.base_url, inp, tmp_path / "o.jsonl")
    spec["input"].pop("id_column")
    assert main(["run", str(_write(tmp_path / "job.yaml", spec)), "--quiet"]) == 0
    assert (tmp_path / "o.jsonl").read_text() == "" and gateway.stats.total == 0
    inp.write_bytes(b'\xef\xbb\xbf{"p": "x"}\n')
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet", "--fresh"]) == 0
    assert gateway.stats.total == 1


# ------------------------------------------------------------------------------- 2 and 5 for chat jobs


def _chat_spec(base_url: str, inp: Path, out: Path, **request: Any) -> dict[str, Any]:
    spec = _spec(base_url, inp, out, request={"max_completion_tokens": 2, **request})
    spec["request"].pop("max_tokens")
    del spec["input"]["prompt"]
    spec["input"]["messages"] = [{"role": "user", "content": "{{p}}"}]
    return spec


def test_an_id_column_named_like_a_chat_column_is_refused_by_validate(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"refusal": ["a", "b"], "p": ["x", "y"]}), inp)
    spec = _chat_spec(gateway.base_url, inp, tmp_path / "o.parquet")
    spec["input"]["id_column"] = "refusal"
    path = _write(tmp_path / "job.yaml", spec)
    assert main(["validate", str(path)]) == 2
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "input.id_column: the output column 'refusal' is also one of the chat shape's own columns" in err
    assert gateway.stats.total == 0


@pytest.mark.parametrize(("fields", "message"), [
    ({"n": True}, "request.n: Input should be a valid integer (got true)"),
    ({"temperature": "0.5"}, 'request.temperature: Input should be a valid number (got "0.5")'),
    ({"max_completion_tokens": 3.0}, "request.max_completion_tokens: Input should be a valid integer (got 3.0)"),
    ({"max_completion_tokens": 2**31}, "request.max_completion_tokens: must be greater than 0 and at most 2147483647"),
])
def test_chat_request_fields_are_not_coerced(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict[str, Any], message: str
) -> None:
    spec = _chat_spec(gateway.base_url, _small_parquet(tmp_path / "in.parquet"), tmp_path / "o.parquet", **fields)
    assert main(["validate", str(_write(tmp_path / "job.yaml", spec))]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["requests_per_minute: 1e400", "tokens_per_minute: .inf", "max_cost_usd: .inf",
                                   "max_cost_usd: .nan"])
def test_an_infinite_or_nan_limit_is_refused_naming_it(
    gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str], limit: str
) -> None:
    # YAML reads `.inf`, `.nan` and `1e400` as floats: a cap or a rate must be a real figure (outside trial)
    spec = _spec(gateway.base_url, _small_parquet(tmp_path / "in.parquet"), tmp_path / "o.parquet")
    spec.pop("limits", None)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec) + f"limits:\n  {limit}\n")
    assert main(["run", str(path), "--quiet"]) == 2 and gateway.stats.total == 0
    assert f"limits.{limit.split(':')[0]}: Input should be a finite number" in capsys.readouterr().err
