"""The CLI's memory settings take effect: they must be made before pyarrow loads, so importing batcher or its
command line must not load pyarrow, and after `tune_process_memory` Arrow's default pool is the system one."""

from __future__ import annotations

import os
import subprocess
import sys

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
