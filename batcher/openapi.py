"""The official orq OpenAPI extracts shipped with batcher (batcher/_openapi/), each loaded once.

    load_openapi()          # POST /v2/router/completions (the legacy shape)
    load_openapi("chat")    # POST /v2/router/chat/completions
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

import yaml

if TYPE_CHECKING:
    from jsonschema.protocols import Validator

__all__ = ["load_openapi", "request_error"]

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


def request_error(validator: Validator, body: Any) -> tuple[str | None, str, str] | None:
    """The most relevant schema error in a request body as orq reports it: (param, message, code), where
    `param` is the offending field's dotted path (a missing required field named), or None for a valid body."""
    from jsonschema.exceptions import ValidationError, best_match  # only the simulators validate requests

    error: ValidationError | None = best_match(validator.iter_errors(body))
    if error is None:
        return None
    where = [str(p) for p in error.absolute_path]
    code = "invalid_value"
    if error.validator == "required" and isinstance(error.instance, dict):
        where += [k for k in error.validator_value if k not in error.instance][:1]
        code = "missing_required_parameter"
    param = ".".join(where) or None
    return param, f"{param or 'body'}: {error.message}", code
