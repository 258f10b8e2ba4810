"""The executable's memory settings take effect, in its own process only (a program calling `cli.main` is left
as it was). They must be made before pyarrow loads, so importing batcher or its command line must not load
pyarrow, and after `tune_process_memory` Arrow's default pool is the system one."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest


def _python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**base, **env}, check=True)
    return out.stdout.strip()


def test_importing_batcher_and_its_cli_does_not_load_pyarrow() -> None:
    assert _python("import sys, batcher, batcher.cli; print('pyarrow' in sys.modules)") == "False"


@pytest.mark.parametrize(("users_choice", "expected"), [(None, "system"), ("mimalloc", "mimalloc")])
def test_tuning_puts_arrow_on_the_system_allocator_unless_the_user_chose(users_choice: str | None,
                                                                         expected: str) -> None:
    code = ("from batcher.memory import tune_process_memory; tune_process_memory(); "
            "import pyarrow as pa; print(pa.default_memory_pool().backend_name)")
    env = {"ARROW_DEFAULT_MEMORY_POOL": users_choice} if users_choice else {}
    assert _python(code, **env) == expected


def test_the_public_api_is_still_importable_from_the_package() -> None:
    assert _python("import batcher; print(batcher.run_job.__name__, batcher.JobSpec.__name__)") == "run_job JobSpec"


def test_tuning_collects_young_objects_less_often_and_freezing_hides_the_imports() -> None:
    code = ("import gc; from batcher.memory import freeze_imports, tune_process_memory; tune_process_memory(); "
            "import batcher.runner; freeze_imports(); print(gc.get_threshold()[0], gc.get_freeze_count() > 10_000)")
    assert _python(code) == "10000 True"


def _spec(tmp_path: Path) -> Path:
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(3)))
    spec = {"input": {"path": str(rows), "id_column": "id", "prompt": "{{text}}"},
            "output": {"path": str(tmp_path / "out.parquet")}, "endpoint": {"base_url": "local"},
            "request": {"model": "openai/gpt-4o-mini", "max_tokens": 4}, "cache_dir": str(tmp_path / "cache")}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return path


_OBSERVE = "import gc, os; print(gc.get_threshold()[0], gc.get_freeze_count() > 0, os.environ.get('ARROW_DEFAULT_MEMORY_POOL'))"


def test_cli_main_called_from_python_leaves_the_process_as_it_was(tmp_path: Path) -> None:
    # a fresh interpreter, so no earlier test's settings can hide a change
    code = (f"from batcher.cli import main; code = main(['run', {str(_spec(tmp_path))!r}, '--quiet']); "
            f"assert code == 0, code; {_OBSERVE}")
    assert _python(code) == f"{gc.get_threshold()[0]} False None"


def test_the_batcher_executable_still_tunes_its_own_process(tmp_path: Path) -> None:
    # `python -m batcher run ...` exactly as the executable runs it, then the same observation in that process
    code = (f"import runpy, sys; sys.argv = ['batcher', 'run', {str(_spec(tmp_path))!r}, '--quiet']\n"
            "try:\n    runpy.run_module('batcher', run_name='__main__')\nexcept SystemExit as exc:\n"
            f"    assert exc.code == 0, exc.code\n{_OBSERVE}")
    assert _python(code) == "10000 True system"
    scripts = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["batcher"] == "batcher.cli:entry"
