"""Writes llm/harness_tasks/shakespeare_next_line/next_line.jsonl: which of four lines continues a
passage of the built-in corpus's held-out test works (Macbeth, Much Ado About Nothing, A Lover's
Complaint)? The other three choices are lines of the same work of about the same length, so neither
the work's vocabulary nor line length gives the answer away; only the passage does.

    python experiments/harness/make_next_line.py [--items=200] [--seed=0]
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from llm import data  # noqa: E402
from llm.data import corpus as corpus_lib

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "llm", "harness_tasks", "shakespeare_next_line", "next_line.jsonl")
PASSAGE_LINES = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    works = [[line for line in doc.split("\n") if len(line.strip()) >= 20] for doc in corpus_lib.load_documents(data.DataConfig(dataset="shakespeare"), "test")]
    items = []
    while len(items) < args.items:
        lines = rng.choices(works, weights=[len(w) for w in works])[0]
        start = rng.randrange(len(lines) - PASSAGE_LINES - 1)
        passage, answer = lines[start:start + PASSAGE_LINES], lines[start + PASSAGE_LINES]
        near = [line for line in set(lines) if line not in passage and line != answer and abs(len(line) - len(answer)) <= 6]
        if len(near) < 3:
            continue
        choices = rng.sample(sorted(near), 3) + [answer]
        rng.shuffle(choices)
        items.append({"passage": "\n".join(passage), "choices": choices, "label": choices.index(answer)})
    with open(OUT, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"wrote {len(items)} items to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
