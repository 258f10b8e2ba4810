"""Shared fixtures: a simulated gateway on 127.0.0.1 (its own thread and loop), and job specs pointing at it."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batcher.gateway import Gateway, GatewayConfig, serve_in_thread
from batcher.routing import Backoff
from batcher.runner import RunOptions

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"

# Retries in tests wait milliseconds, not seconds: the delays are a policy under test elsewhere.
FAST_BACKOFF = Backoff(base=0.001, cap=0.01)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # aiolimiter needs asyncio


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    with serve_in_thread(GatewayConfig()) as gw:
        yield gw


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture
def make_spec(tmp_path: Path, gateway: Gateway) -> Callable[..., dict[str, Any]]:
    """A spec dict for the sample reviews against the test gateway; keyword arguments override sections."""

    def make(**overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "name": "t",
            "input": {
                "path": str(SAMPLES / "reviews.parquet"),
                "id_column": "review_id",
                "prompt": "Classify the sentiment of this review as positive, negative or neutral.\n\n{{text}}",
            },
            "output": {"path": str(tmp_path / "out" / "t.parquet")},
            "endpoint": {"base_url": gateway.base_url, "api": "orq"},
            "request": {"model": "openai/gpt-4o-mini", "max_tokens": 16, "temperature": 0},
            "limits": {"concurrency": 8},
            "cache_dir": str(tmp_path / "cache"),
        }
        for section, value in overrides.items():
            if isinstance(value, dict) and isinstance(spec.get(section), dict):
                merged = copy.deepcopy(spec[section])
                merged.update(value)
                spec[section] = {k: v for k, v in merged.items() if v is not None}
            elif value is None:
                spec.pop(section, None)
            else:
                spec[section] = value
        return spec

    return make


def options(**kw: Any) -> RunOptions:
    kw.setdefault("quiet", True)
    kw.setdefault("handle_signals", False)
    kw.setdefault("backoff", FAST_BACKOFF)
    kw.setdefault("seed", 0)
    return RunOptions(**kw)
