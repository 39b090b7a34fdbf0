"""Generated sequence-to-sequence tasks: reverse ("abcd" -> "dcba") and sort ("dbca" -> "abcd").

    nice .venv/bin/python -m experiments.encoder_decoder.task --out /tmp/s2s [--n 20000] [--seed 0]

writes DIR/reverse.jsonl and DIR/sort.jsonl, one {"input", "target"} line each ('seq2seq:DIR/reverse.jsonl').
The inputs are random lowercase strings of 4..16 letters, distinct so that a held-out split never shares
an input with the training split (one seed draws the same strings for both tasks). Success is
checkable: an answer is the exact target or it is not.
"""

import argparse
import json
import random
import string
from pathlib import Path

KINDS = ("reverse", "sort")
MIN_LEN, MAX_LEN = 4, 16


def strings(n: int, seed: int) -> list[str]:
    """n distinct lowercase strings, their lengths drawn uniformly from MIN_LEN..MAX_LEN."""
    rng = random.Random(seed)
    found, seen = [], set()
    while len(found) < n:
        s = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(MIN_LEN, MAX_LEN)))
        if s not in seen:
            seen.add(s)
            found.append(s)
    return found


def answer(kind: str, s: str) -> str:
    if kind == "reverse":
        return s[::-1]
    if kind == "sort":
        return "".join(sorted(s))
    raise ValueError(f"unknown task {kind!r}; known: {', '.join(KINDS)}")


def make(kind: str, n: int, seed: int) -> list[dict]:
    answer(kind, "")  # an unknown kind fails before any drawing
    return [{"input": s, "target": answer(kind, s)} for s in strings(n, seed)]


def write(path: Path | str, records: list[dict]) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for reverse.jsonl and sort.jsonl")
    parser.add_argument("--n", type=int, default=20_000, help="examples per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for kind in KINDS:
        print(write(Path(args.out) / f"{kind}.jsonl", make(kind, args.n, args.seed)))


if __name__ == "__main__":
    main()
