"""The official orq OpenAPI extracts shipped with batcher (batcher/_openapi/), each loaded once.

    load_openapi()          # POST /v2/router/completions (the legacy shape)
    load_openapi("chat")    # POST /v2/router/chat/completions
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any, Literal

import yaml

__all__ = ["load_openapi"]

_FILES = {
    "completions": "orq-router-completions.openapi.yaml",
    "chat": "orq-router-chat-completions.openapi.yaml",
}


@functools.cache
def load_openapi(name: Literal["completions", "chat"] = "completions") -> dict[str, Any]:
    """The extract for one API shape. Shared: copy before changing it."""
    text = resources.files("batcher").joinpath(f"_openapi/{_FILES[name]}").read_text("utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    data: dict[str, Any] = yaml.load(text, Loader=loader)
    return data
