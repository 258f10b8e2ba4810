"""The cost cap of a job (`limits.max_cost_usd`): what may be spent, what was, and when to stop.

The cap is for the job, not for one run of it: the spend recorded in the journal by earlier runs counts, and
a job that stopped at its cap stays stopped under that cap (`BudgetStop`) until the cap is raised.

A call is sent only once its worst case is reserved: spend so far + the worst case of every call in flight +
this one's never passes the cap. The worst case is the dearest of every model that may answer the row (the
row's model, the fallbacks, the load balancer's models: orq may route to any of them server-side) at an upper
bound of the row's tokens. A model with no price makes the cap unenforceable, so the job is refused (or, for a model named only in an
OpenAI Batch line's body, that row is).

A row whose worst case does not fit waits for the calls in flight to settle (an answer's actual cost frees the
rest of its reservation) and tries again; the budget is reached only when nothing is in flight and the row
still does not fit. An attempt whose outcome is unknown (cut off by the deadline, a connection dropped after
sending, an answer that broke the contract) may have been billed: its worst case counts as spent, and as
*unconfirmed*. Under a cap, every call is first written to `spend.log` (`SpendLog`), so that a call in flight
at a crash or `kill -9` still counts on resume (at its worst case: nothing says what it cost).

    prior = fold_spend(state_dir)                  # at start: journal + spend.log
    budget = Budget(cap=1.00, spent_before=prior.spent, unconfirmed_before=prior.unconfirmed)
    worst = worst_case(prices, models, prompt="...", body=body)
    if budget.reserve(worst): ... call ...; budget.settle(worst, actual_cost, answered=True)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from .errors import OutputError
from .prices import PriceTable

__all__ = [
    "Budget",
    "BudgetStop",
    "PriorSpend",
    "SpendLog",
    "body_models",
    "completion_bound",
    "fold_spend",
    "recorded_spend",
    "unpriced",
    "worst_case",
]


class Budget:
    """Spend so far plus the worst case of every call in flight never passes the cap."""

    def __init__(self, cap: float | None, spent_before: float = 0.0, unconfirmed_before: float = 0.0) -> None:
        self.cap = cap
        self.spent_before = spent_before  # by earlier runs of the job (journal and spend.log)
        self.spent = spent_before
        self.unconfirmed_before = unconfirmed_before  # the part of spent_before that is a worst case
        self.unconfirmed = unconfirmed_before  # part of `spent`: attempts that may have been billed
        self.reserved = 0.0
        self.in_flight = 0  # reservations held (a count: float residue must not look like a call in flight)
        self._changed: anyio.Event | None = None

    @property
    def enforced(self) -> bool:
        return self.cap is not None

    def reserve(self, worst: float) -> bool:
        if self.cap is None:
            return True
        if self.spent + self.reserved + worst > self.cap:
            return False
        self.reserved += worst
        self.in_flight += 1
        return True

    async def areserve(self, worst: float) -> bool:
        """`reserve`, for a budget that may have to ask for room first (a worker's share of a job's cap)."""
        return self.reserve(worst)

    def _release(self, worst: float) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.reserved = max(0.0, self.reserved - worst) if self.in_flight else 0.0
        self.wake()

    def settle(self, worst: float, actual: float | None, *, answered: bool) -> None:
        """Release a reservation. `actual` None on an answer means its cost is unknown (a model with no
        price answered): the whole reservation counts as spent, so the cap still holds."""
        if self.cap is None:
            return
        if answered:
            self.spent += worst if actual is None else actual
        self._release(worst)

    def charge(self, worst: float) -> None:
        """Release a reservation whose call's outcome is unknown (it may have been billed): its worst case
        counts as spent, and as unconfirmed."""
        if self.cap is None:
            return
        self.spent += worst
        self.unconfirmed += worst
        self._release(worst)

    async def changed(self) -> None:
        """Wait until a reservation is released (or `wake()`): a row that did not fit may fit now."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def wake(self) -> None:
        """Wake every `changed()` waiter (a reservation was released, or the run is stopping)."""
        event, self._changed = self._changed, None
        if event is not None:
            event.set()


def completion_bound(body: dict[str, Any]) -> int:
    """Completion tokens one call may bill at most: every choice's `max_completion_tokens` (chat) or
    `max_tokens`, and the thinking budget (some providers bill reasoning on top)."""
    n = body.get("n") or 1
    bound = (body.get("max_completion_tokens") or body.get("max_tokens") or 0) * n
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int) and not isinstance(budget, bool):
            bound += budget * n
    return int(bound)


def worst_case(prices: PriceTable, models: Sequence[str], prompt: str | int, body: dict[str, Any]) -> float | None:
    """The most one call may cost whichever of `models` answers it; None when one of them has no price.
    `prompt`: the prompt's text, or its bound already counted (media included) by `call.Work.seal`.

    UTF-8 bytes bound the prompt's tokens from above for byte-level BPE tokenizers: the cap holds even for
    text that tokenizes badly (emoji, CJK), at the price of stopping a little early."""
    if isinstance(prompt, int):
        prompt_bound = prompt
    else:
        prompt_bound = len(prompt.encode("utf-8", "surrogatepass"))
        # Images, audio and files are prompt tokens too: counted by attachments.media_tokens' bound.
        from .attachments import media_tokens

        prompt_bound += media_tokens(body)[2]
    completion = completion_bound(body)
    worst = 0.0
    for model in models:
        cost = prices.worst_case(model, prompt_bound, completion)
        if cost is None:
            return None
        worst = max(worst, cost)
    return worst


def body_models(body: dict[str, Any]) -> list[str]:
    """Models an OpenAI Batch line's body may route to besides its `model`: its `fallbacks` and `load_balancer`
    (top level or under `orq`), which orq applies server-side. An entry that names no model as a string comes
    back as its JSON text: no price has that name, so the row cannot be priced (and is not sent under a cap)."""
    found: list[str] = []
    orq = body.get("orq")
    sources = [body, orq] if isinstance(orq, dict) else [body]
    for src in sources:
        for field in ("fallbacks", "load_balancer"):
            value = src.get(field)
            if value is None:
                continue
            entries = value.get("models") if isinstance(value, dict) else value
            if not isinstance(entries, list):
                found.append(json.dumps(value, default=str))
                continue
            for entry in entries:
                model = entry.get("model") if isinstance(entry, dict) else entry
                found.append(model if isinstance(model, str) and model else json.dumps(entry, default=str))
    return found


def unpriced(prices: PriceTable, models: Iterable[str]) -> list[str]:
    return sorted({m for m in models if m and prices.get(m) is None})


def _amount(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return 0.0


def _records(journal: Path) -> Iterable[dict[str, Any]]:
    try:
        f = open(journal, "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            # cheap pre-filter: most journals of a job without cost are skipped line by line without parsing
            if (b'"cost_usd":' not in raw and b'"unconfirmed_usd":' not in raw) or not raw.endswith(b"\n"):
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def recorded_spend(journal: Path) -> float:
    """What the answers in a journal cost, plus the worst cases charged for attempts whose outcome was unknown
    (`unconfirmed_usd`). Cached answers cost nothing; unpriced ones are unknown and count 0 (a job with a cap
    never has any)."""
    return sum(_amount(r.get("cost_usd")) + _amount(r.get("unconfirmed_usd")) for r in _records(journal))


def _id_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class PriorSpend:
    spent: float  # everything earlier runs may have spent
    unconfirmed: float  # the part of it that is a worst case (outcome unknown)


class SpendLog:
    """`spend.log` in the state folder, written under a cap only: one line `[row id, worst case]` per call,
    appended before the call is sent. A call whose row has no record in the journal at the next start (it was
    in flight at a crash, a `kill -9` or a second Ctrl-C) counts as spent at its worst case: the server may
    have billed it, and nothing says what it cost. One `os.write` per call (no fsync): it survives the
    process's death, and costs a few microseconds a call.

    At each start `fold_spend` turns the log into one `{"carried": x}` line: what earlier runs may have spent
    that the journal will not show once it is compacted (unanswered calls, error rows' unconfirmed attempts)."""

    NAME = "spend.log"

    def __init__(self, directory: Path) -> None:
        self.path = directory / self.NAME
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def sent(self, row_id: Any, worst: float) -> None:
        if self._fd is None:
            return
        self.write(json.dumps([row_id, worst], separators=(",", ":"), default=str).encode() + b"\n")

    def write(self, line: bytes) -> None:
        """One whole line, appended (`mirror.MirroredSpendLog` also puts it on the store)."""
        if self._fd is None:
            return
        try:
            os.write(self._fd, line)  # O_APPEND and one short write: whole or not at all in practice
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)


def fold_spend(directory: Path) -> PriorSpend:
    """The job's spend so far, from its journal and `spend.log`, read before the journal is compacted (which
    drops error rows). Rewrites `spend.log` as one `carried` line: the calls of rows without a record (at their
    worst case) and the unconfirmed attempts of error rows. A crash between this and the compaction counts the
    error rows twice on the next start: too much, never too little."""
    log = directory / SpendLog.NAME
    carried = 0.0
    intents: dict[str, float] = {}
    try:
        raw_lines = log.read_bytes().splitlines(keepends=True)
    except FileNotFoundError:
        raw_lines = []
    for raw in raw_lines:
        if not raw.endswith(b"\n"):
            continue  # torn by a crash: that call was not sent yet (the line is written first)
        try:
            item = json.loads(raw)
        except ValueError:
            continue
        if isinstance(item, dict):
            carried += _amount(item.get("carried"))
        elif isinstance(item, list) and len(item) == 2:
            key = _id_key(item[0])
            intents[key] = intents.get(key, 0.0) + _amount(item[1])
    confirmed = unconfirmed = 0.0
    recorded: set[str] = set()
    for rec in _records(directory / "journal.jsonl"):
        recorded.add(_id_key(rec.get("id")))
        u = _amount(rec.get("unconfirmed_usd"))
        if rec.get("status") == "ok":
            confirmed += _amount(rec.get("cost_usd"))
            unconfirmed += u
        else:
            # error rows are dropped by the compaction: carry what they cost (answers refused by the shape)
            # and what they may have cost (attempts of unknown outcome)
            carried += _amount(rec.get("cost_usd")) + u
    # A row without a cost-bearing record: an answer records its cost (or lack of one) in `cost_usd`, so an
    # intent is unaccounted only when its row has no such record at all.
    carried += sum(w for key, w in intents.items() if key not in recorded)
    if raw_lines or carried:
        tmp = log.with_name(SpendLog.NAME + ".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps({"carried": carried}).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, log)
    return PriorSpend(confirmed + unconfirmed + carried, unconfirmed + carried)


class BudgetStop:
    """`budget.json` in the job's state folder: the cap a run stopped at. A rerun under a cap no higher stops
    at once (no request): the job already showed that its next rows do not fit."""

    NAME = "budget.json"

    def __init__(self, directory: Path) -> None:
        self.path = directory / self.NAME

    def stopped_at(self) -> float | None:
        try:
            data = json.loads(self.path.read_text("utf-8"))
            cap = data["cap"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return float(cap) if isinstance(cap, int | float) and not isinstance(cap, bool) else None

    def needed(self) -> float | None:
        """The worst case of the row that did not fit (None for a note written before it was recorded)."""
        try:
            value = json.loads(self.path.read_text("utf-8"))["needed"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def record(self, cap: float, spent: float, needed: float | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.NAME + ".tmp")
        tmp.write_text(json.dumps({"cap": cap, "spent": spent, "needed": needed}), "utf-8")
        os.replace(tmp, self.path)

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
