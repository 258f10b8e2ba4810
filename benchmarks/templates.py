"""Render cost per row of templating.py: its fast path for plain `{{var}}` templates against Jinja2.

    python benchmarks/templates.py

Prints µs per row (best of 5 repeats) for a one-variable template (the demo's prompt) through templating.py's
fast path (plain `{{var}}` holes, no Jinja), and the same template compiled by Jinja; then a
few-shot template with a loop. The figure that matters: the per-row cost a chat run adds over a legacy one.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from batcher.templating import Template

PROMPT = "Classify the sentiment of this review as positive, negative or neutral.\n\n{{text}}"
ROW = {"text": "Arrived broken, the box was crushed and support never answered. Returned it.", "stars": 1}
FEW_SHOT = (
    "Classify the sentiment.\n{% for ex in examples %}Review: {{ex.text}}\nLabel: {{ex.label}}\n{% endfor %}"
    "Review: {{text}}\nLabel:"
)
FEW_ROW = {**ROW, "examples": [{"text": "love it", "label": "positive"}, {"text": "meh", "label": "neutral"}]}


def per_row_us(fn: Callable[[], object], number: int = 20_000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    fast = Template(PROMPT)
    # The same one-variable template forced through Jinja: a no-op `{% if %}` disables the fast path.
    jinja = Template(PROMPT + "{% if false %}{% endif %}")
    few = Template(FEW_SHOT)
    assert fast.is_plain and not jinja.is_plain
    assert fast.render(ROW) == jinja.render(ROW)
    rows = [
        ("templating.py fast path, {{text}}", per_row_us(lambda: fast.render(ROW))),
        ("templating.py Jinja, {{text}}", per_row_us(lambda: jinja.render(ROW))),
        ("templating.py Jinja, few-shot loop (2 examples)", per_row_us(lambda: few.render(FEW_ROW))),
    ]
    for name, us in rows:
        print(f"{name:<50} {us:7.2f} µs/row")


if __name__ == "__main__":
    main()
