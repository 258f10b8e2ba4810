"""Per-row cost of structured outputs: parse the answer's JSON, validate it, and pick the typed column values.

    python benchmarks/structured.py

Uses the demo schema (sentiment enum, confidence number, topics array of strings). Prints µs per row (best of 5)
for json.loads alone, the compiled jsonschema validator alone, and the whole `StructuredOutput.parse`, which is
what a structured run adds per row. The target is 20 µs.
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable

from jsonschema import validators

from batcher._demo import DEMO_SCHEMA as SCHEMA
from batcher._fastcheck import compile_check
from batcher.structured import StructuredOutput

ANSWER = '{"sentiment": "negative", "confidence": 0.87, "topics": ["shipping", "support", "refund"]}'


def per_row_us(fn: Callable[[], object], number: int = 20_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    out = StructuredOutput(SCHEMA, reserved={"text"})
    value = json.loads(ANSWER)
    validator = validators.validator_for(SCHEMA)(SCHEMA)
    fast = compile_check(SCHEMA)
    assert fast is not None
    rows = [
        ("json.loads", per_row_us(lambda: json.loads(ANSWER))),
        ("jsonschema validator.is_valid", per_row_us(lambda: validator.is_valid(value))),
        ("batcher._fastcheck compiled check", per_row_us(lambda: fast(value))),
        ("StructuredOutput.parse (all of it)", per_row_us(lambda: out.parse(ANSWER))),
    ]
    for name, us in rows:
        print(f"{name:<40} {us:7.2f} µs/row")


if __name__ == "__main__":
    main()
