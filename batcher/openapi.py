"""The official orq OpenAPI extract shipped with batcher (batcher/_openapi/), loaded once."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml

__all__ = ["load_openapi"]


@functools.cache
def load_openapi() -> dict[str, Any]:
    text = resources.files("batcher").joinpath("_openapi/orq-router-completions.openapi.yaml").read_text("utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data: dict[str, Any] = yaml.load(text, Loader=loader)
    return data
