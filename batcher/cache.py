"""The exact-match response cache: successful completions in SQLite, keyed by `wire.cache_key`, with a TTL.

Errors are never stored. The key never includes headers, so the API key never reaches the file. A cache that
cannot be opened or written is not a reason to fail a run: it warns once and turns itself off.

Expired entries are deleted as runs go, in bounded steps so no run pays for a large backlog at once: up to
`purge_batch` when the cache is opened, and as many again after every `purge_batch` answers stored. The file
does not shrink on disk (SQLite reuses the freed pages for new entries).
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ResponseCache", "default_cache_dir"]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batcher"


class ResponseCache:
    """`get_many` before calls, `put_many` after answers; both batched, one transaction each."""

    def __init__(self, directory: Path | None = None, *, clock: Any = time.time, purge_batch: int = 10_000) -> None:
        self.path = (directory or default_cache_dir()) / "responses.sqlite"
        self._clock = clock
        self.purge_batch = purge_batch
        self._puts_since_purge = 0
        self._db: sqlite3.Connection | None = None
        self.warning: str | None = None
        # Lookups (the reading thread) and stores (the writer's thread) share one connection: one at a time.
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " key TEXT PRIMARY KEY, expires REAL NOT NULL, record TEXT NOT NULL)"
            )
            # Lets a purge find the expired entries without scanning the whole table.
            db.execute("CREATE INDEX IF NOT EXISTS responses_expires ON responses (expires)")
            self._db = db
        except (OSError, sqlite3.Error) as exc:
            self._disable(f"cannot use the response cache at {self.path}: {exc}; running without it")
        self._purge()

    @property
    def enabled(self) -> bool:
        return self._db is not None

    def _disable(self, message: str) -> None:
        if self.warning is None:
            self.warning = message
            print(f"batcher: warning: {message}", file=sys.stderr)
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        self._db = None

    def get_many(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.get_many_text(keys).items()}

    def get_many_text(self, keys: Sequence[str]) -> dict[str, str]:
        """The stored records as their JSON text: a cached rerun splices it into journal lines undecoded
        (`Records.cached_line`)."""
        with self._lock:
            return self._get_many(keys)

    def _get_many(self, keys: Sequence[str]) -> dict[str, str]:
        if self._db is None or not keys:
            return {}
        now = self._clock()
        found: dict[str, str] = {}
        try:
            # SQLite's default limit on host parameters is 999 (older builds): query in slices below it.
            for start in range(0, len(keys), 900):
                part = keys[start : start + 900]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(
                    f"SELECT key, record FROM responses WHERE key IN ({marks}) AND expires > ?", (*part, now)
                )
                found.update(rows)
        except sqlite3.Error as exc:
            self._disable(f"response cache read failed ({exc}); running without it")
            return {}
        return found

    def put_many(self, items: Iterable[tuple[str, dict[str, Any], float]]) -> None:
        """Store (key, completion record, ttl seconds) triples."""
        with self._lock:
            self._put_many(items)

    def _put_many(self, items: Iterable[tuple[str, dict[str, Any], float]]) -> None:
        if self._db is None:
            return
        now = self._clock()
        rows = [(k, now + ttl, json.dumps(rec, separators=(",", ":"))) for k, rec, ttl in items]
        if not rows:
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", rows)
        except sqlite3.Error as exc:
            self._disable(f"response cache write failed ({exc}); running without it")
            return
        self._puts_since_purge += len(rows)
        if self._puts_since_purge >= self.purge_batch:
            self._puts_since_purge = 0
            self._purge()

    def _purge(self) -> int:
        """Delete up to `purge_batch` expired entries; how many went."""
        if self._db is None:
            return 0
        try:
            cur = self._db.execute(
                "DELETE FROM responses WHERE rowid IN"
                " (SELECT rowid FROM responses WHERE expires <= ? LIMIT ?)",
                (self._clock(), self.purge_batch),
            )
        except sqlite3.Error:
            return 0  # a busy or read-only file: the next run tries again
        return cur.rowcount

    def purge_expired(self) -> None:
        """Delete every expired entry at once (unbounded: for maintenance, not for a run)."""
        with self._lock:
            if self._db is not None:
                try:
                    self._db.execute("DELETE FROM responses WHERE expires <= ?", (self._clock(),))
                except sqlite3.Error:
                    pass

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
