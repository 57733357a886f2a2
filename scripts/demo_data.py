"""Write the demo's two small tasks (train + test JSONL) from templates, seeded.

The demo must run anywhere offline, so it makes its own data instead of reading a benchmark:
``sentiment`` (a product review -> positive / negative) and ``topics`` (a news headline ->
sports / business / science / world). Answers are single label words, which the untuned base
model does not produce on its own, so the effect of each adapter is visible in exact match.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

SENTIMENT_INSTR = "What is the sentiment of the following review? Answer with one word: positive or negative.\n"
TOPIC_INSTR = "What is the topic of the following headline? Answer with one word: sports, business, science or world.\n"

PRODUCTS = ["headphones", "blender", "novel", "laptop", "jacket", "coffee maker", "phone case", "backpack",
            "desk lamp", "board game", "running shoes", "kettle", "camera", "sofa", "keyboard", "tent"]
GOOD = ["works perfectly", "exceeded my expectations", "is a delight to use", "was worth every penny",
        "arrived early and works great", "is the best purchase I made this year", "feels sturdy and well made",
        "made my mornings better", "does exactly what it promises"]
BAD = ["broke after two days", "was a complete waste of money", "stopped working within a week",
       "feels cheap and flimsy", "arrived damaged and support never answered", "is the worst purchase I made",
       "does not do what it promises", "smells of plastic and rattles", "fell apart on first use"]
OPENERS = ["Honestly, this", "I have to say this", "After a month, the", "My new", "This", "The"]

TOPICS = {
    "sports": ["{team} beat {team2} in a late comeback", "{person} breaks the national record in the 400 metres",
               "Coach of {team} resigns after losing streak", "{team} sign young striker for record fee",
               "Marathon in {city} draws thousands of runners"],
    "business": ["Shares of {company} jump after strong quarterly results", "{company} to cut 2,000 jobs",
                 "Central bank raises interest rates again", "{company} agrees to buy rival for $3 billion",
                 "Retail sales in {city} fall for a third month"],
    "science": ["Astronomers spot a new exoplanet around a nearby star", "Researchers in {city} grow tissue from stem cells",
                "New battery chemistry doubles storage capacity", "Fossil of unknown dinosaur found by {person}",
                "Telescope captures images of a distant galaxy"],
    "world": ["Election in {country} ends with a narrow result", "Floods force thousands from homes in {country}",
              "Leaders of {country} and {country2} sign peace accord", "Protests continue in the capital of {country}",
              "Ambassador recalled as tensions rise with {country}"],
}
FILL = {
    "team": ["Rovers", "City", "United", "the Falcons", "the Tigers", "Athletic"],
    "person": ["Maria Lopez", "Ken Sato", "Amal Haddad", "Jonas Berg"],
    "city": ["Lyon", "Osaka", "Denver", "Nairobi", "Porto"],
    "company": ["Acme Corp", "Globex", "Initech", "Umbrella Ltd", "Stark Industries"],
    "country": ["Norway", "Chile", "Kenya", "Vietnam", "Portugal"],
}


def _fill(template: str, rng: random.Random) -> str:
    out = template
    for key in ("team2", "country2"):
        out = out.replace("{" + key + "}", rng.choice(FILL[key[:-1]]))
    for key, values in FILL.items():
        out = out.replace("{" + key + "}", rng.choice(values))
    return out


def _unique(make: Callable[[int], tuple[str, str]], n: int, instruction: str) -> list[dict[str, str]]:
    """n rows with distinct inputs (templates collide; retry, then number the rest)."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    i = 0
    while len(rows) < n:
        text, label = make(len(rows))
        i += 1
        if text in seen:
            if i < 50 * n:
                continue
            text = f"{text} ({i})"
        seen.add(text)
        rows.append({"instruction": instruction, "input": text, "output": label})
    return rows


def sentiment_rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    def make(k: int) -> tuple[str, str]:
        label = "positive" if k % 2 == 0 else "negative"
        phrase = rng.choice(GOOD if label == "positive" else BAD)
        return f"{rng.choice(OPENERS)} {rng.choice(PRODUCTS)} {phrase}.", label

    return _unique(make, n, SENTIMENT_INSTR)


def topic_rows(n: int, rng: random.Random) -> list[dict[str, str]]:
    labels = sorted(TOPICS)

    def make(k: int) -> tuple[str, str]:
        label = labels[k % len(labels)]
        return _fill(rng.choice(TOPICS[label]), rng), label

    return _unique(make, n, TOPIC_INSTR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, make in (("sentiment", sentiment_rows), ("topics", topic_rows)):
        rng = random.Random(f"{args.seed}-{name}")
        rows = make(args.train + args.test, rng)
        rng.shuffle(rows)
        for split, part in (("train", rows[: args.train]), ("test", rows[args.train :])):
            path = args.out / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in part))
    print(f"wrote demo tasks to {args.out}")


if __name__ == "__main__":
    main()
