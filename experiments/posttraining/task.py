"""The post-training task: multi-digit addition ("347+85" -> "432"), generated from a seed.

Every set is drawn from one stream of distinct problems, so the held-out test problems never appear in
pretraining, SFT, preference or RL data. Success is checkable: an answer is right or it is not.
"""

import json
import random
from pathlib import Path

import numpy as np

from llm.data import template
from llm.model import sample


def problems(num: int, digits: int, seed: int) -> list[tuple[int, int]]:
    """num distinct (a, b) pairs, each operand with 1..digits digits (the count drawn uniformly, so short
    and long operands both occur)."""
    rng = random.Random(seed)
    found, seen = [], set()
    while len(found) < num:
        a, b = (rng.randint(0, 10 ** rng.randint(1, digits) - 1) for _ in range(2))
        if (a, b) not in seen:
            seen.add((a, b))
            found.append((a, b))
    return found


# True writes the sum least-significant digit first ("347+85" -> "234"), the format small models learn
# fastest (Lee et al. 2023); on 3-digit problems it did not help within this CPU budget (README.md).
REVERSED = False


# Pretraining lines read "12+34;=46;": the two characters between the problem and the sum stand where
# the chat template puts <|end|> <|assistant|>, and the closing ';' where it puts <|end|>. SFT then only
# has to map the role tokens onto characters the model knows; with "12+34=46" the sum sits one position
# nearer the problem than in the chat template, and SFT lost the pretrained skill (README.md).
SEPARATOR, END = ";=", ";"


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}"


def written(n: int) -> str:
    return str(n)[::-1] if REVERSED else str(n)


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A plausible mistake: a carry dropped (when the sum has one), or one digit of the sum off by one."""
    right = a + b
    carries = [k for k in range(len(str(right))) if (a // 10**k % 10) + (b // 10**k % 10) + _carry_in(a, b, k) >= 10]
    if carries and rng.random() < 0.5:
        return right - 10 ** (rng.choice(carries) + 1)  # the carry out of digit k never reaches digit k + 1
    k = rng.randrange(len(str(right)))
    step = 10**k if (right // 10**k % 10 == 0 or rng.random() < 0.5) else -(10**k)
    return right + step


def _carry_in(a: int, b: int, k: int) -> int:
    return int(a % 10**k + b % 10**k >= 10**k) if k else 0


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dropped_carry(a: int, b: int, rng: random.Random) -> int | None:
    """The sum with one of its carries dropped (None when it has none): the systematic mistake of the
    imperfect demonstrations."""
    right = a + b
    carries = [k for k in range(len(str(right))) if (a // 10**k % 10) + (b // 10**k % 10) + _carry_in(a, b, k) >= 10]
    return right - 10 ** (rng.choice(carries) + 1) if carries else None


def write_sets(root: Path, digits: int, sizes: dict, seed: int = 0, sft_error_rate: float = 0.0) -> dict:
    """Writes pretrain.txt, sft.jsonl, preference.jsonl, prompts.jsonl, sft_rl.jsonl and test.jsonl under
    root; returns {name: path}. sizes: {"pretrain", "sft", "preference", "rl", "test"} problem counts. A
    fraction sft_error_rate of the SFT responses to problems with a carry drop one (imperfect demonstrations);
    sft_rl.jsonl is the RL prompts with their right answers, for an SFT baseline that sees what RL sees."""
    root.mkdir(parents=True, exist_ok=True)
    # One draw of distinct problems, shuffled, then cut: drawn one after another, the first set would take
    # most of the few one-digit problems and leave the later sets without them.
    found = problems(sum(sizes.values()), digits, seed)
    random.Random(seed + 1).shuffle(found)
    test, pre, sft, pref, rl = (found[lo:hi] for lo, hi in _cuts(sizes, ("test", "pretrain", "sft", "preference", "rl")))
    rng = random.Random(seed + 2)
    paths = {"pretrain": root / "pretrain.txt"}
    paths["pretrain"].write_text("".join(f"{prompt(a, b)}{SEPARATOR}{written(a + b)}{END}\n" for a, b in pre))

    def demonstration(a, b):
        wrong = dropped_carry(a, b, rng)
        return written(wrong if wrong is not None and rng.random() < sft_error_rate else a + b)

    paths["sft"] = _write_jsonl(root / "sft.jsonl", [{"prompt": prompt(a, b), "response": demonstration(a, b)} for a, b in sft])
    paths["preference"] = _write_jsonl(root / "preference.jsonl", [
        {"prompt": prompt(a, b), "chosen": written(a + b), "rejected": written(wrong_answer(a, b, rng))} for a, b in pref])
    paths["rl"] = _write_jsonl(root / "prompts.jsonl", [{"prompt": prompt(a, b), "answer": written(a + b)} for a, b in rl])
    paths["sft_rl"] = _write_jsonl(root / "sft_rl.jsonl", [{"prompt": prompt(a, b), "response": written(a + b)} for a, b in rl])
    paths["test"] = _write_jsonl(root / "test.jsonl", [{"prompt": prompt(a, b), "answer": written(a + b)} for a, b in test])
    return {k: str(v) for k, v in paths.items()}


def _cuts(sizes: dict, names: tuple) -> list[tuple[int, int]]:
    ends, total = [], 0
    for name in names:
        ends.append((total, total + sizes[name]))
        total += sizes[name]
    return ends


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def reward(record: dict, answer: str) -> float:
    """1.0 for the exact sum, else 0.0. No partial credit: a per-digit score would pay for answers that
    copy the operands' digits, and the metric we report is exact match."""
    return float(answer.strip() == record["answer"])


def _rates(correct_PxK: np.ndarray, greedy_P: np.ndarray) -> dict:
    """Greedy exact match, pass@1 at T=1 and pass@k (k samples per problem), each with its standard error
    over the problems."""
    P, k = correct_PxK.shape
    se = lambda x: float(np.std(x, ddof=1) / np.sqrt(P))
    per_P, any_P = correct_PxK.mean(axis=1), correct_PxK.any(axis=1).astype(float)
    return {"problems": P, "k": k, "greedy": float(greedy_P.mean()), "greedy_se": se(greedy_P.astype(float)),
            "pass_at_1": float(per_P.mean()), "pass_at_1_se": se(per_P), "pass_at_k": float(any_P.mean()), "pass_at_k_se": se(any_P)}


def _chat_answers(run, records: list[dict], k: int, temperature: float, seed: int) -> list[tuple[str, bool]]:
    """(text, ended with <|end|>) of k answers to each problem asked as one user turn, in batches."""
    roles, tok = run.roles, run.tokenizer
    width = max(len(r["answer"]) for r in records) + 2  # the answer, a digit more, and its <|end|>
    rows = [template.render(tok, roles, [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)[0].tolist()
            for r in records for _ in range(k)]
    out = []
    for first in range(0, len(rows), 1024):
        answers = sample.generate(run.model_config, run.params, rows[first : first + 1024], max_new_tokens=width, eos_id=roles.end,
                                  pad_id=tok.pad_id, vocab_limit=roles.limit, temperature=temperature, seed=seed + first)
        out += [(tok.decode([t for t in a if t < tok.vocab_size]), bool(a) and a[-1] == roles.end) for a in answers]
    return out


def _raw_answers(run, records: list[dict], k: int, temperature: float, seed: int) -> list[tuple[str, bool]]:
    """The pretrained model's: the continuation of "\na+b;=" up to the closing ';' (the format of its corpus)."""
    width = max(len(r["answer"]) for r in records) + 2
    prompts = ["\n" + r["prompt"] + SEPARATOR for r in records for _ in range(k)]
    texts = [t for first in range(0, len(prompts), 1024)
             for t in run.generate(prompts[first : first + 1024], max_new_tokens=width, temperature=temperature, seed=seed + first)]
    return [(t.split(END)[0], END in t) for t in texts]


def greedy_right(run, records: list[dict], raw: bool = False) -> np.ndarray:
    """Whether each problem's greedy answer is right (bool [P])."""
    answers = (_raw_answers if raw else _chat_answers)(run, records, 1, 0.0, 0)
    return np.array([a[1] and reward(r, a[0]) == 1.0 for r, a in zip(records, answers)])


def accuracy(run, records: list[dict], k: int, raw: bool = False, seed: int = 0) -> dict:
    """Greedy exact match, pass@1 at T=1 and pass@k of a run on the problems (raw: in the pretraining format)."""
    answers = _raw_answers if raw else _chat_answers
    right = lambda r, answer: answer[1] and reward(r, answer[0]) == 1.0
    greedy = np.array([right(r, a) for r, a in zip(records, answers(run, records, 1, 0.0, seed))])
    sampled = answers(run, records, k, 1.0, seed + 1)
    correct = np.array([right(records[i // k], a) for i, a in enumerate(sampled)]).reshape(len(records), k)
    return _rates(correct, greedy)


def own_mistakes(run, records: list[dict], k: int, seed: int = 0) -> list[dict]:
    """Preference pairs from a chat run's own answers: for each problem, the right sum over the wrong
    finished answer the run samples most often at T=1 in k tries (problems it never gets wrong give none)."""
    sampled = _chat_answers(run, records, k, 1.0, seed)
    pairs = []
    for i, r in enumerate(records):
        wrong = [text for text, ended in sampled[i * k : (i + 1) * k] if ended and text.strip() and reward(r, text) == 0.0]
        if wrong:
            pairs.append({"prompt": r["prompt"], "chosen": r["answer"], "rejected": max(set(wrong), key=wrong.count)})
    return pairs


def error_kinds(run, records: list[dict]) -> dict[str, int]:
    """The chat run's greedy answers by kind: right, a dropped carry (the demonstrations' mistake), unfinished
    (no <|end|> in time), or other wrong."""
    kinds = {"right": 0, "dropped carry": 0, "unfinished": 0, "other wrong": 0}
    for r, (text, ended) in zip(records, _chat_answers(run, records, 1, 0.0, 0)):
        a, b = map(int, r["prompt"].split("+"))
        slips = {a + b - 10 ** (k + 1) for k in range(len(str(a + b))) if (a // 10**k % 10) + (b // 10**k % 10) + _carry_in(a, b, k) >= 10}
        kind = ("unfinished" if not ended else "right" if reward(r, text) == 1.0
                else "dropped carry" if text.isdigit() and int(text) in slips else "other wrong")
        kinds[kind] += 1
    return kinds
