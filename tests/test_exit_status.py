"""A run that finishes with error rows exits 9 unless --max-errors (or limits.max_errors) accepts them; the
summary names the error kinds. Through the command line, as a scheduler sees it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from batcher.cli import main as cli_main
from batcher.gateway import Gateway, GatewayConfig, serve_in_thread
from batcher.runner import ERRORS_EXIT_CODE

from .conftest import write_jsonl


@pytest.fixture
def failing_gateway() -> Iterator[Gateway]:
    with serve_in_thread(GatewayConfig(faults=[{"kind": "status", "status": 400, "prompt_contains": "FAIL"}])) as gw:
        yield gw


def _job(tmp_path: Path, gw: Gateway, *, failing: bool = True, **limits: Any) -> Path:
    rows: list[dict[str, Any]] = [{"id": f"r{i:02d}", "text": f"row {i}"} for i in range(20)]
    if failing:  # 3 error rows of 20 (15%): 2 refused by the server (status), 1 that cannot be sent (input)
        rows[3]["text"] = "FAIL this one"
        rows[11]["text"] = "FAIL that one"
        rows[17]["text"] = None
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    spec = {
        "input": {"path": str(src), "id_column": "id", "prompt": "{{text}}"},
        "output": {"path": str(tmp_path / "out.parquet")},
        "endpoint": {"base_url": gw.base_url},
        "request": {"model": "openai/gpt-4o-mini", "max_tokens": 8},
        "limits": {"concurrency": 4, **limits},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, *flags: str) -> int:
    return cli_main(["run", str(spec), "--fresh", *flags])


def test_all_ok_exits_0(tmp_path: Path, failing_gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(_job(tmp_path, failing_gateway, failing=False)) == 0
    assert "20 ok, 0 error," in capsys.readouterr().err


def test_error_rows_exit_9_and_the_summary_names_their_kinds(tmp_path: Path, failing_gateway: Gateway,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert ERRORS_EXIT_CODE == 9
    assert _run(_job(tmp_path, failing_gateway)) == 9
    err = capsys.readouterr().err
    assert "17 ok, 3 error (2 status, 1 input)," in err
    assert "over max-errors 0" in err and "--max-errors" in err
    # --quiet still says why the exit code is not 0
    assert _run(_job(tmp_path, failing_gateway), "--quiet") == 9
    assert "3 error (2 status, 1 input)" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path / "out.parquet")]) == 0  # report shows them as before
    assert "status" in capsys.readouterr().out


@pytest.mark.parametrize(("flag", "code"), [
    ("3", 0), ("2", ERRORS_EXIT_CODE), ("15%", 0), ("14.9%", ERRORS_EXIT_CODE), ("100%", 0), ("0%", 9),
])
def test_max_errors_as_a_count_or_a_share(tmp_path: Path, failing_gateway: Gateway, flag: str, code: int) -> None:
    assert _run(_job(tmp_path, failing_gateway), "--quiet", "--max-errors", flag) == code


def test_the_spec_field_and_the_flag_overriding_it(tmp_path: Path, failing_gateway: Gateway) -> None:
    assert _run(_job(tmp_path, failing_gateway, max_errors=3), "--quiet") == 0
    assert _run(_job(tmp_path, failing_gateway, max_errors="10%"), "--quiet") == ERRORS_EXIT_CODE
    assert _run(_job(tmp_path, failing_gateway, max_errors=3), "--quiet", "--max-errors", "0") == ERRORS_EXIT_CODE


@pytest.mark.parametrize("bad", ["-1", "abc", "101%", "nan%", "1.5"])
def test_a_bad_max_errors_is_a_usage_error(tmp_path: Path, failing_gateway: Gateway, bad: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _run(_job(tmp_path, failing_gateway), "--max-errors", bad)
    assert exit_.value.code == 2 and "--max-errors" in capsys.readouterr().err
    assert _run(_job(tmp_path, failing_gateway, max_errors=bad)) == 2
    assert "limits.max_errors" in capsys.readouterr().err
    assert failing_gateway.stats.total == 0


@pytest.mark.parametrize(("bad", "shown"), [
    (True, "true"), (-1, "-1"), (2.5, "2.5"), ("1_0", '"1_0"'), ("\uff15", '"\\uff15"'), (None, "null"),
])
def test_a_bad_spec_max_errors_is_one_line_naming_the_value_and_the_forms(
    tmp_path: Path, failing_gateway: Gateway, bad: Any, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # strict: `true` is not 1, a float is not a count; one line, not one per branch of the field's type
    assert _run(_job(tmp_path, failing_gateway, max_errors=bad)) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[1:] == ['  limits.max_errors: must be a count of error rows >= 0 (like 10) or a percentage of the '
                       f'rows from 0% to 100% (like "2.5%") (got {shown})']
    with pytest.raises(SystemExit) as exit_:
        _run(_job(tmp_path, failing_gateway), "--max-errors", str(bad))
    assert exit_.value.code == 2 and f"(got {str(bad)!r})" in capsys.readouterr().err
    assert failing_gateway.stats.total == 0
