"""Post-training data: small JSONL sets of examples, rendered with the chat template, held in memory.

    'sft:GLOB'         {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} per line
    'preference:GLOB'  {"prompt", "chosen", "rejected"} (objective 'reward' or 'dpo')
    'prompts:GLOB'     {"prompt", ...} or {"messages": [... ending with a user turn]} (objective 'grpo');
                       every field of the line reaches the reward function
    'seq2seq:GLOB'     {"input", "target"} (llm/data/seq2seq.py; no chat template)

Files are read in sorted order, lines in order; validation (and test) are whole examples: of every
P = min(1000, N) examples, the last round(P * validation_fraction) are validation and the
round(P * test_fraction) before them test, the rule streamed corpora use (llm/data/sources.py).
Every example ends with eos. Batches are deterministic from (seed, epoch) and resumable from
(epoch, batch in epoch), by the epoch shuffler (llm/data/epochs.py).
"""

import dataclasses
import glob
import gzip
import os
from typing import Iterator, Sequence

import numpy as np

from llm.data import template
from llm.data.config import DataError
from llm.data.epochs import Epochs, PackedEpochs
from llm.data.packing import document_batch, pack as pack_items, pad_batch, take_rows
from llm.data.sources import held_out_range, json_object
from llm.data.template import RoleIds, TemplateError
from llm.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Record:
    where: str  # file:line, for messages
    value: dict


def read(dataset: str) -> list[Record]:
    pattern = dataset.split(":", 1)[1]
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"data.dataset={dataset!r}: the glob {pattern!r} matches no files")
    records = []
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                records.append(Record(where, json_object(line, where)))
    if not records:
        raise DataError(f"data.dataset={dataset!r}: the files {', '.join(paths)} hold no examples")
    return records


def texts(dataset: str) -> list[str]:
    """Every string of every line (what a char vocabulary or a SentencePiece model is built from)."""
    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    return [t for r in read(dataset) for t in strings(r.value)]


def held_out(records: Sequence, split: str, validation_fraction: float, test_fraction: float) -> list:
    lo, hi, period = held_out_range(len(records), split, validation_fraction, test_fraction)
    chosen = [r for i, r in enumerate(records) if lo <= i % period < hi]
    if not chosen:
        raise DataError(f"the {split!r} split is empty: {len(records)} examples, of which the split takes "
                        f"{hi - lo} of every {period}")
    return chosen


def _messages(record: Record) -> list[dict]:
    try:
        return template.messages_of(record.value, record.where)
    except TemplateError as e:
        raise DataError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # [T] int32, ending with eos
    response: np.ndarray  # [T] bool: the assistant's tokens (the loss of loss_on='response')


def render_sft(record: Record, tok: Tokenizer, ids: RoleIds, width: int) -> tuple[Example, bool]:
    """The example (cut to `width` tokens) and whether it was cut; a prompt that leaves no room for
    one response token is an error naming the line."""
    tokens, response = template.render(tok, ids, _messages(record))
    tokens, response = np.append(tokens, tok.eos_id).astype(np.int32), np.append(response, response[-1])
    first = int(np.argmax(response))
    if first >= width:
        raise DataError(f"{record.where}: the conversation before the first response is {first} tokens, which leaves no room "
                        f"for the response in seq_len + 1 = {width} tokens")
    return Example(tokens[:width], response[:width]), len(tokens) > width


def load_sft(dataset: str, split: str, tok: Tokenizer, ids: RoleIds, seq_len: int, validation_fraction: float,
             test_fraction: float) -> tuple[list[Example], int]:
    """The split's examples and how many were cut to fit seq_len + 1 tokens."""
    records = held_out(read(dataset), split, validation_fraction, test_fraction)
    rendered = [render_sft(r, tok, ids, seq_len + 1) for r in records]
    return [e for e, _ in rendered], sum(cut for _, cut in rendered)


def pack(examples: Sequence[Example], width: int, loss_on: str) -> dict[str, np.ndarray]:
    """Whole examples packed by the one packer (llm/data/packing.py), in order, into rows of `width`
    tokens, each with its own segment id. Returns a batch of every row: targets are weighted only
    inside their example (packing.document_batch), and on its response for loss_on='response'."""
    items = [({"tokens": e.tokens, "response": e.response},) for e in examples]
    packed = pack_items(items, (width,), ({"tokens": np.dtype(np.int32), "response": np.dtype(bool)},))[0]
    batch = document_batch(packed["tokens"], packed["segments"])
    if loss_on == "response":
        batch["weights"] = batch["weights"] * packed["response"][:, 1:]
    return batch


class SftBatches(PackedEpochs):
    """Each epoch shuffles the examples and packs them, in that order, into rows."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, seed: int, rows=None, loss_on: str = "response"):
        self.examples, self.width, self.loss_on = list(examples), seq_len + 1, loss_on
        super().__init__(len(self.examples), batch_size, seed, rows)
        num_rows = self._items_per_epoch()
        if num_rows < batch_size:
            raise DataError(f"the SFT training split packs into {num_rows} rows of {self.width} tokens, too few for one batch of {batch_size}")

    def _pack_items(self, order: np.ndarray) -> dict[str, np.ndarray]:
        return pack([self.examples[i] for i in order], self.width, self.loss_on)


def sft_eval_batches(examples: Sequence[Example], batch_size: int, seq_len: int, loss_on: str = "response") -> Iterator[dict]:
    packed = pack(examples, seq_len + 1, loss_on)
    for first in range(0, len(packed["inputs"]), batch_size):
        yield pad_batch(take_rows(packed, first, first + batch_size), batch_size)


# Preference pairs: a chosen and a rejected row per pair, each one example (no packing).


def pair_row(tok: Tokenizer, ids: RoleIds, prompt: str, response: str, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    tokens, is_response = template.render(tok, ids, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    tokens, is_response = np.append(tokens, tok.eos_id)[:width], np.append(is_response, True)[:width]
    # The reward model reads the final hidden state at the last input position: the answer's <|end|>
    # (or its last token that fits).
    last = min(len(tokens) - 2, width - 2)
    row_t, row_r = np.zeros(width, np.int32), np.zeros(width, bool)
    row_t[: len(tokens)], row_r[: len(tokens)] = tokens, is_response
    return row_t, row_r, last


def load_pairs(dataset: str, split: str, tok: Tokenizer, ids: RoleIds, seq_len: int, validation_fraction: float,
               test_fraction: float) -> dict[str, np.ndarray]:
    """Every pair of the split as rows: chosen_* and rejected_* (inputs, targets, weights on the
    response, last: the index of the answer's last input position)."""
    width = seq_len + 1
    out = {f"{side}_{k}": [] for side in ("chosen", "rejected") for k in ("tokens", "response", "last")}
    for r in held_out(read(dataset), split, validation_fraction, test_fraction):
        v = r.value
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(v.get(k), str)]
        if missing:
            raise DataError(f"{r.where}: missing the string field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                            f"(a preference line is {{'prompt', 'chosen', 'rejected'}})")
        if v["chosen"] == v["rejected"]:
            raise DataError(f"{r.where}: 'chosen' equals 'rejected': the pair says nothing about which answer is better")
        prompt_len = len(template.render(tok, ids, [{"role": "user", "content": v["prompt"]}], add_generation_prompt=True)[0])
        if prompt_len >= width - 1:
            raise DataError(f"{r.where}: the prompt is {prompt_len} tokens, which leaves no room for an answer in seq_len + 1 = {width} tokens")
        for side in ("chosen", "rejected"):
            row_t, row_r, last = pair_row(tok, ids, v["prompt"], v[side], width)
            out[f"{side}_tokens"].append(row_t), out[f"{side}_response"].append(row_r), out[f"{side}_last"].append(last)
    batch = {}
    for side in ("chosen", "rejected"):
        tokens, response = np.stack(out[f"{side}_tokens"]), np.stack(out[f"{side}_response"])
        batch[f"{side}_inputs"], batch[f"{side}_targets"] = tokens[:, :-1], tokens[:, 1:]
        batch[f"{side}_weights"] = response[:, 1:].astype(np.float32)
        batch[f"{side}_last"] = np.asarray(out[f"{side}_last"], np.int32)
    return batch


class PairBatches(Epochs):
    def __init__(self, pairs: dict[str, np.ndarray], batch_size: int, seed: int, rows=None):
        self.pairs = pairs
        n = len(pairs["chosen_inputs"])
        if n < batch_size:
            raise DataError(f"the preference training split has {n} pairs, fewer than a batch of {batch_size}")
        super().__init__(n, batch_size, seed, rows)

    def _batch(self, order, first, lo, hi):
        return {k: v[order[first + lo : first + hi]] for k, v in self.pairs.items()}


def pair_eval_batches(pairs: dict[str, np.ndarray], batch_size: int) -> Iterator[dict]:
    n = len(pairs["chosen_inputs"])
    for first in range(0, n, batch_size):
        batch = take_rows(pairs, first, first + batch_size)
        # Filler pairs have no response tokens (weights 0) and are masked out by "valid".
        batch["valid"] = np.ones(len(batch["chosen_inputs"]), np.float32)
        yield pad_batch(batch, batch_size)


# Prompts for RL.


@dataclasses.dataclass(frozen=True)
class Prompt:
    tokens: np.ndarray  # rendered with the generation prompt (ends with <|assistant|>)
    record: dict  # the whole line: what the reward function sees


def load_prompts(dataset: str, split: str, tok: Tokenizer, ids: RoleIds, seq_len: int, max_new_tokens: int,
                 validation_fraction: float, test_fraction: float) -> list[Prompt]:
    prompts = []
    for r in held_out(read(dataset), split, validation_fraction, test_fraction):
        v = r.value
        if "messages" in v:
            messages = _messages_for_prompt(r)
        elif isinstance(v.get("prompt"), str):
            messages = [{"role": "user", "content": v["prompt"]}]
        else:
            raise DataError(f"{r.where}: missing the string field 'prompt' (an RL prompt line is {{'prompt', ...}} or {{'messages': [...]}})")
        tokens = template.render(tok, ids, messages, add_generation_prompt=True)[0]
        if len(tokens) + max_new_tokens > seq_len:
            raise DataError(f"{r.where}: the prompt is {len(tokens)} tokens; with grpo.max_new_tokens={max_new_tokens} it does not "
                            f"fit the context of seq_len={seq_len}")
        prompts.append(Prompt(tokens, v))
    return prompts


def _messages_for_prompt(r: Record) -> list[dict]:
    messages = r.value["messages"]
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        raise DataError(f"{r.where}: an RL prompt's 'messages' must end with a user turn")
    try:
        template.messages_of({"messages": messages + [{"role": "assistant", "content": ""}]}, r.where)
    except TemplateError as e:
        raise DataError(str(e)) from None
    return messages


class PromptBatches(Epochs):
    """Endless batches of prompts (every host gets all of them: sampling is replicated per prompt group)."""

    def __init__(self, prompts: Sequence[Prompt], batch_size: int, seed: int):
        self.prompts = list(prompts)
        if len(self.prompts) < batch_size:
            raise DataError(f"the RL prompt split has {len(self.prompts)} prompts, fewer than a batch of {batch_size}")
        super().__init__(len(self.prompts), batch_size, seed)

    def _batch(self, order, first, lo, hi):
        return {"prompts": [self.prompts[i] for i in order[first : first + self.batch_size]]}
