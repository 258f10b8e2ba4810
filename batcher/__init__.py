"""batcher: a file of prompts in; every row answered, with its token usage and cost, in a tidy table out.

    import batcher
    result = batcher.run_job("jobs/demo.yaml")
    print(result.summary())
"""

from .errors import (
    BatcherError,
    FatalRequestError,
    InputError,
    OutputError,
    ResumeError,
    SpecError,
)
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
