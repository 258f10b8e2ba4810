"""The progress line on stderr (tqdm): rows done of the total, rows/s, tokens, errors and spend so far.

It advances only when rows are durable in the journal, so what it shows is what a crash would keep. It never
sees a request or a header, so it cannot print a key.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from .prices import usd

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, *, enabled: bool, job: str) -> None:
        self._bar: Any = None
        self._last = 0.0
        self._totals: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=job, unit="row", file=sys.stderr, dynamic_ncols=True, mininterval=0.2)

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def advance(self, n: int, totals: Any) -> None:
        if self._bar is None:
            return
        self._totals = totals
        self._bar.update(n)
        now = time.monotonic()
        if now - self._last >= 0.5:
            self._last = now
            self._bar.set_postfix_str(self._postfix(totals), refresh=False)

    @staticmethod
    def _postfix(totals: Any) -> str:
        tokens = totals.prompt_tokens + totals.completion_tokens
        postfix = f"tokens={tokens:,} errors={totals.errors}"
        if totals.cost_usd:
            postfix += f" spent={usd(totals.cost_usd)}"
        return postfix

    def close(self) -> None:
        if self._bar is not None:
            if self._totals is not None:
                self._bar.set_postfix_str(self._postfix(self._totals), refresh=False)
            self._bar.close()
            self._bar = None
