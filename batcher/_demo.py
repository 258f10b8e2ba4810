"""The demo's structured-output schema (sentiment enum, confidence number, topics array of strings), as the tests
and benchmarks use it: one definition. jobs/demo.yaml writes its own (with maxItems) for users to read."""

from __future__ import annotations

from typing import Any

DEMO_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "topics": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["sentiment", "confidence", "topics"],
    "additionalProperties": False,
}
