"""The benchmark prompts, with no dependency: imported by the harness and by the peers' job scripts (which run
in their own venvs), so every runner sends exactly the same prompts."""

from __future__ import annotations

PROMPT_HEAD = "Summarise this review in one short sentence.\n\n"
PROMPT_TEMPLATE = PROMPT_HEAD + "{{text}}"
# The gateway answers 5 to 60 words: with room for 64 every answer ends with finish_reason "stop" (curator
# counts a "length" answer as a failure and retries it, which would make the runners' work differ).
MAX_TOKENS = 64

_WORDS = (
    "the quick brown fox jumps over a lazy dog while quiet rivers run past old stone bridges near the "
    "harbor and small boats drift under grey clouds before the evening rain"
).split()


def review_text(i: int) -> str:
    """A ~40-word synthetic review, different for every i (so no two prompts are equal)."""
    n = len(_WORDS)
    return f"Review {i}: " + " ".join(_WORDS[(i * 7 + j * 3) % n] for j in range(40))


def prompt(i: int) -> str:
    """The prompt batcher renders from row i's template."""
    return PROMPT_HEAD + review_text(i)
