"""Generate the demo's task data: rewrite a date in a compact house style (`March 15, 2024` -> `15MAR24`).

A skill SmolLM2-135M-Instruct lacks (it does not know this convention and answers in prose) and that a short
finetune teaches: copy the day and year digits, map the month to its three-letter code. Scored by exact match.
Deterministic (fixed seed): `python tools/make_demo_data.py` regenerates the files in recipes/data/ byte for
byte. Train and eval dates are disjoint.
"""

import argparse
import datetime
import json
import random
from pathlib import Path

QUESTION = "Write this date in compact form: {}"
STYLES = ("{month} {day}, {year}", "{day} {month} {year}", "{year}-{mm:02d}-{day:02d}")


def compact(date: datetime.date) -> str:
    return f"{date.day:02d}{date.strftime('%b').upper()}{date.year % 100:02d}"


def spoken(date: datetime.date, rng: random.Random) -> str:
    style = rng.choice(STYLES)
    return style.format(month=date.strftime("%B"), day=date.day, year=date.year, mm=date.month)


def make_rows(n: int, rng: random.Random, seen: set) -> list[dict]:
    rows = []
    while len(rows) < n:
        date = datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(365 * 100))
        if date in seen:
            continue
        seen.add(date)
        rows.append({"messages": [{"role": "user", "content": QUESTION.format(spoken(date, rng))},
                                  {"role": "assistant", "content": compact(date)}]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "recipes" / "data")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng, seen = random.Random(args.seed), set()
    for name, n in (("dates-train.jsonl", args.train), ("dates-eval.jsonl", args.eval)):
        rows = make_rows(n, rng, seen)
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
