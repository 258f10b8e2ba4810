"""Paths as users write them: `~` and `$VAR`/`${VAR}` expanded, for the spec's paths and the command line's.

An unset variable is an error rather than left in place: `$OUT/x.parquet` must not quietly become a folder
named `$OUT` in the working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["expand_path"]

_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand_path(value: str | os.PathLike[str]) -> Path:
    """`~`, `~user` and environment variables expanded; raises ValueError naming an unset variable."""
    text = os.fspath(value)
    if "$" in text:

        def var(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(2)
            found = os.environ.get(name)
            if found is None:
                raise ValueError(f"environment variable ${name} (in {text!r}) is not set")
            return found

        text = _VAR.sub(var, text)
    return Path(os.path.expanduser(text))
