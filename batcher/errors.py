"""batcher's errors.

    BatcherError
    ├── SpecError            the job spec is invalid (names the file, the field, the value, what is allowed)
    ├── InputError           the input file cannot be used (missing, unreadable, duplicate ids, bad columns)
    ├── OutputError          the output cannot be written (unwritable path, disk full mid-run)
    ├── ResumeError          a partial run exists that this spec cannot continue (fingerprint or input changed)
    ├── JobLockedError       another run of the same job holds its lock
    └── FatalRequestError    the server refused the key (401/403): the job stops, resumable

Row-level failures (a 500 after retries, a malformed response, a missing template variable) are not
exceptions that escape: they become error rows in the output. `RowError` carries them inside the pipeline, and
`ContractError` (a response that breaks its API shape's contract; `structured.SchemaViolation` is one) is
raised by the shapes' parsers and turned into a failed attempt by the client. It is here, in a module that
imports nothing, so that the shapes and structured.py can share it without import cycles.
"""

from __future__ import annotations

__all__ = [
    "BatcherError",
    "ContractError",
    "FatalRequestError",
    "InputError",
    "JobLockedError",
    "OutputError",
    "ResumeError",
    "RowError",
    "SpecError",
]


class BatcherError(Exception):
    """Root of every error batcher raises on purpose."""

    exit_code = 1


class SpecError(BatcherError):
    exit_code = 2


class InputError(BatcherError):
    exit_code = 3


class OutputError(BatcherError):
    exit_code = 4


class ResumeError(BatcherError):
    exit_code = 5


class JobLockedError(BatcherError):
    """Another process is running the same job (same output, same state folder) right now."""

    exit_code = 8


class FatalRequestError(BatcherError):
    """The server refused the API key; no further call can succeed."""

    exit_code = 6

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RowError(Exception):
    """One row failed; the run goes on and the row is written as an error row."""

    def __init__(self, kind: str, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.http_status = http_status


class ContractError(Exception):
    """A response breaks its API shape's contract (not JSON, no choices, unknown finish_reason...)."""
