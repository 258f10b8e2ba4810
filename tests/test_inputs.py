"""Inputs and paths: `~`/`$VARS` in every path, unsendable rows as error rows, dictionary-encoded columns,
JSONL errors named by line, and the local gateway's faults checked by `validate`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from batcher import SpecError, parse_spec
from batcher.cli import main as cli_main
from batcher.gateway import Gateway

from .conftest import write_jsonl

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
