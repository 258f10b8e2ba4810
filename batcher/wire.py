"""The legacy completions wire shape, kept under its old name: the code lives in `shapes/completions.py`, the one
place for that shape (`from batcher.wire import BodyBuilder` still works)."""

from __future__ import annotations

from .shapes.completions import (
    OPENAI_FIELDS,
    BodyBuilder,
    Completion,
    ContractError,
    StreamAssembler,
    cache_key,
    parse_completion,
)

__all__ = [
    "OPENAI_FIELDS",
    "BodyBuilder",
    "Completion",
    "ContractError",
    "StreamAssembler",
    "cache_key",
    "parse_completion",
]
