"""Prices per model (USD per million tokens) and the cost of one answer.

The shipped table (batcher/data/prices.json) names its source and date; a spec's `prices:` section or
`--prices FILE` overrides it per model. A model with no price is *unpriced*: its cost is None, never 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["Price", "PriceTable", "usd"]


@dataclass(frozen=True, slots=True)
class Price:
    prompt: float
    completion: float
    cached_prompt: float | None = None

    def cost(self, prompt: int | None, completion: int | None, cached: int | None) -> float | None:
        if prompt is None and completion is None:
            return None
        cached = cached or 0
        prompt = prompt or 0
        cached_rate = self.cached_prompt if self.cached_prompt is not None else self.prompt
        return ((prompt - cached) * self.prompt + cached * cached_rate + (completion or 0) * self.completion) / 1e6


class PriceTable:
    def __init__(self, prices: dict[str, Price], source: str = "", date: str = "") -> None:
        self.prices = prices
        self.source = source
        self.date = date

    @classmethod
    def _parse(cls, data: dict[str, Any], source: str) -> PriceTable:
        models = data.get("models", data)
        prices = {}
        for model, p in models.items():
            if not isinstance(p, dict):
                continue
            prices[model] = Price(float(p["prompt"]), float(p["completion"]),
                                  None if p.get("cached_prompt") is None else float(p["cached_prompt"]))
        return cls(prices, data.get("source", source), data.get("date", ""))

    @classmethod
    def default(cls) -> PriceTable:
        text = resources.files("batcher").joinpath("data/prices.json").read_text("utf-8")
        return cls._parse(json.loads(text), "batcher/data/prices.json")

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        """A user's price table (`--prices FILE`, JSON or YAML), checked as strictly as a spec's `prices:`:
        a SpecError naming the file, the entry and the field, never a traceback or a negative cost."""
        import yaml
        from pydantic import ValidationError

        from .errors import SpecError
        from .spec import Price as PriceSpec

        where = f"--prices {path}"
        try:
            text = Path(path).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(f"{where}: cannot read the price table: {getattr(exc, 'strerror', None) or exc}") from None
        try:
            data = json.loads(text) if str(path).lower().endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise SpecError(f"{where}: not valid JSON or YAML: {exc}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{where}: a price table maps model ids to {{prompt, completion, cached_prompt}} "
                            f"(USD per million tokens), optionally under `models:`; got {type(data).__name__}")
        nested = "models" in data
        models = data["models"] if nested else {k: v for k, v in data.items() if k not in ("source", "date")}
        if not isinstance(models, dict):
            raise SpecError(f"{where}: models: must map model ids to prices, got {type(models).__name__}")
        prefix = "models." if nested else ""
        prices = {}
        for model, p in models.items():
            try:
                checked = PriceSpec.model_validate(p)
            except ValidationError as exc:
                err = exc.errors(include_url=False)[0]
                field = ".".join(str(x) for x in err["loc"])
                shown = f" (got {json.dumps(err.get('input'), default=str)})" if err["type"] != "missing" else ""
                raise SpecError(
                    f"{where}: {prefix}{model}{'.' + field if field else ''}: "
                    f"{'is required' if err['type'] == 'missing' else err['msg']}{shown}"
                ) from None
            prices[str(model)] = Price(checked.prompt, checked.completion, checked.cached_prompt)
        source = data.get("source")
        date = data.get("date")
        return cls(prices, source if isinstance(source, str) else str(path), date if isinstance(date, str) else "")

    def overridden(self, other: PriceTable | dict[str, Price] | None) -> PriceTable:
        if other is None:
            return self
        extra = other.prices if isinstance(other, PriceTable) else other
        return PriceTable({**self.prices, **extra}, self.source, self.date)

    def get(self, model: str | None) -> Price | None:
        if model is None:
            return None
        return self.prices.get(model)

    def cost(self, model: str | None, prompt: int | None, completion: int | None, cached: int | None) -> float | None:
        price = self.get(model)
        return None if price is None else price.cost(prompt, completion, cached)

    def worst_case(self, model: str | None, prompt_tokens: float, completion_tokens: float) -> float | None:
        price = self.get(model)
        if price is None:
            return None
        return (prompt_tokens * price.prompt + completion_tokens * price.completion) / 1e6


def usd(value: float) -> str:
    """Dollars as messages print them: to four decimals, and an amount under a cent to two significant digits
    ($0.000042), so that nothing that counts reads as "$0.0000"."""
    if value == 0 or not 0 < abs(value) < 0.01:
        return f"${value:,.4f}"
    digits = min(12, 1 - int(f"{abs(value):e}".split("e")[1]))
    return f"${value:.{max(4, digits)}f}"
