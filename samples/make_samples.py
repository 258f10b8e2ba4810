"""Regenerate the sample prompt files: product reviews to label, in Parquet and JSONL.

    python samples/make_samples.py

Deterministic (seeded), so the committed files and a regenerated set are identical.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent
N = 300

PRODUCTS = [
    "wireless earbuds", "espresso machine", "running shoes", "robot vacuum", "standing desk", "e-reader",
    "air fryer", "mechanical keyboard", "backpack", "smart thermostat", "electric toothbrush", "yoga mat",
    "4K monitor", "cast iron pan", "office chair", "bluetooth speaker", "rain jacket", "baby monitor",
]
FIRST = ["Ana", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Isla", "Jonas", "Kenji", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yara"]
LAST = ["Jansen", "Okafor", "Smith", "Kowalski", "Nguyen", "García", "Müller", "Rossi", "Haddad", "Sato",
        "Bakker", "Dubois", "Costa", "Ivanova", "Lindqvist", "Patel"]
POSITIVE = [
    "Absolutely love this {p}. It does exactly what it promises and the build quality is excellent.",
    "Great value for money. The {p} arrived early and has worked perfectly every day since.",
    "Best {p} I have owned. Setup took five minutes and the battery life is fantastic.",
    "I was sceptical but this {p} is excellent. My whole family uses it and we would buy it again.",
    "Superb {p}: quiet, fast and beautifully designed. Customer support answered within an hour.",
]
NEGATIVE = [
    "The {p} broke after two weeks. Support keeps sending me in circles and I want a refund.",
    "Terrible {p}. It arrived scratched, the manual is useless and it stopped charging on day three.",
    "Do not buy this {p}. Cheap plastic, loud, and it failed the first time I actually needed it.",
    "Returned the {p} after a week: it overheats, the app crashes constantly, and shipping took a month.",
    "Very disappointed with this {p}. Half the features advertised simply do not work.",
]
NEUTRAL = [
    "The {p} is fine. It does the job, nothing more, nothing less.",
    "Average {p} for the price. Some things are good, the finish could be better.",
    "It is a {p}. Works as described, though the colour is a bit different from the photos.",
    "Decent {p}, but I expected a little more given the reviews. Delivery was on time.",
    "Mixed feelings about this {p}: comfortable to use, but the setup instructions were confusing.",
]
EXTRAS = [
    "", " Packaging was recyclable, which I appreciate.", " Bought it as a gift.",
    " Using it daily for a month now.", " Second one I have bought.", " Compared it with two other brands first.",
]


def rows() -> list[dict[str, object]]:
    rng = random.Random(20261122)
    out = []
    for i in range(N):
        product = rng.choice(PRODUCTS)
        mood = rng.choices(["positive", "negative", "neutral"], weights=[5, 3, 2])[0]
        pool = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}[mood]
        rating = {"positive": rng.choice([4, 5]), "negative": rng.choice([1, 2]), "neutral": 3}[mood]
        out.append({
            "review_id": f"r{i + 1:04d}",
            "product": product,
            "customer_name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "rating": rating,
            "text": rng.choice(pool).format(p=product) + rng.choice(EXTRAS),
        })
    return out


def main() -> None:
    data = rows()
    pq.write_table(pa.Table.from_pylist(data), HERE / "reviews.parquet", row_group_size=100)
    with open(HERE / "reviews.jsonl", "w", encoding="utf-8") as f:
        for r in data:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    # A prompt_column variant: ready-made prompts, e.g. from an upstream step.
    with open(HERE / "prompts.jsonl", "w", encoding="utf-8") as f:
        for r in data[:100]:
            prompt = f"Write a one-sentence reply from the shop to this review of a {r['product']}:\n\n{r['text']}"
            f.write(json.dumps({"id": r["review_id"], "prompt": prompt}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
