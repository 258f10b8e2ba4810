"""The cost cap of a job (`limits.max_cost_usd`): what may be spent, what was, and when to stop.

The cap is for the job, not for one run of it: the spend recorded in the journal by earlier runs counts, and
a job that stopped at its cap stays stopped under that cap (`BudgetStop`) until the cap is raised.

A call is sent only once its worst case is reserved: spend so far + the worst case of every call in flight +
this one's never passes the cap. The worst case is the dearest of every model that may answer the row (the
row's model, the fallbacks, the load balancer's models: orq may route to any of them server-side) at an upper
bound of the row's tokens. A model with no price makes the cap unenforceable, so the job is refused.

    budget = Budget(cap=1.00, spent_before=recorded_spend(journal))
    worst = worst_case(prices, models, prompt="...", body=body)
    if budget.reserve(worst): ... call ...; budget.settle(worst, actual_cost)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .prices import PriceTable

__all__ = ["Budget", "BudgetStop", "completion_bound", "recorded_spend", "unpriced", "worst_case"]


class Budget:
    """Spend so far plus the worst case of every call in flight never passes the cap."""

    def __init__(self, cap: float | None, spent_before: float = 0.0) -> None:
        self.cap = cap
        self.spent_before = spent_before  # by earlier runs of the job, from the journal
        self.spent = spent_before
        self.reserved = 0.0

    @property
    def enforced(self) -> bool:
        return self.cap is not None

    def reserve(self, worst: float) -> bool:
        if self.cap is None:
            return True
        if self.spent + self.reserved + worst > self.cap:
            return False
        self.reserved += worst
        return True

    def settle(self, worst: float, actual: float | None, *, answered: bool) -> None:
        """Release a reservation. `actual` None on an answer means its cost is unknown (a model with no
        price answered): the whole reservation counts as spent, so the cap still holds."""
        if self.cap is None:
            return
        self.reserved = max(0.0, self.reserved - worst)
        if answered:
            self.spent += worst if actual is None else actual


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


def worst_case(prices: PriceTable, models: Sequence[str], prompt: str, body: dict[str, Any]) -> float | None:
    """The most one call may cost whichever of `models` answers it; None when one of them has no price.

    UTF-8 bytes bound the prompt's tokens from above for byte-level BPE tokenizers: the cap holds even for
    text that tokenizes badly (emoji, CJK), at the price of stopping a little early."""
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


def unpriced(prices: PriceTable, models: Iterable[str]) -> list[str]:
    return sorted({m for m in models if m and prices.get(m) is None})


def recorded_spend(journal: Path) -> float:
    """What the answers in a journal cost (cached answers cost nothing, unpriced ones are unknown and count 0:
    a job with a cap never has any). Read once at start, after the journal was compacted to one line a row."""
    total = 0.0
    try:
        f = open(journal, "rb")
    except FileNotFoundError:
        return 0.0
    with f:
        for raw in f:
            # cheap pre-filter: most journals of a job without cost are skipped line by line without parsing
            if b'"cost_usd":' not in raw or not raw.endswith(b"\n"):
                continue
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            cost = rec.get("cost_usd") if isinstance(rec, dict) else None
            if isinstance(cost, int | float) and not isinstance(cost, bool) and math.isfinite(cost) and cost > 0:
                total += cost
    return total


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

    def record(self, cap: float, spent: float) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.NAME + ".tmp")
        tmp.write_text(json.dumps({"cap": cap, "spent": spent}), "utf-8")
        os.replace(tmp, self.path)

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
