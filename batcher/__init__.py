"""batcher: a file of prompts in; every row answered, with its token usage and cost, in a tidy table out.

    import batcher
    result = batcher.run_job("jobs/demo.yaml")
    print(result.summary())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BatcherError,
    FatalRequestError,
    InputError,
    OutputError,
    ResumeError,
    SpecError,
)

if TYPE_CHECKING:
    from .runner import RunOptions, RunResult, arun_job, run_job
    from .spec import JobSpec, load_spec, parse_spec

__all__ = [
    "BatcherError",
    "FatalRequestError",
    "InputError",
    "JobSpec",
    "OutputError",
    "ResumeError",
    "RunOptions",
    "RunResult",
    "SpecError",
    "arun_job",
    "load_spec",
    "parse_spec",
    "run_job",
]

# Loaded on first use, not on `import batcher`: the command line must choose Arrow's allocator (see
# batcher.memory) before anything imports pyarrow, and `batcher --help` need not load it at all.
_LAZY = {
    "RunOptions": "runner",
    "RunResult": "runner",
    "arun_job": "runner",
    "run_job": "runner",
    "JobSpec": "spec",
    "load_spec": "spec",
    "parse_spec": "spec",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'batcher' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
