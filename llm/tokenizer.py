"""Tokenizers behind one small interface: char and byte level (SentencePiece plugs in the same way).

Every tokenizer reserves pad=0, bos=1, eos=2 and is saved as `tokenizer.json` in the run's workdir.
"""

import json
import os
from typing import Protocol, Sequence

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3
FILENAME = "tokenizer.json"


class TokenizerError(ValueError):
    pass


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (specials count as one byte: the separator)."""
        ...

    def to_json(self) -> dict: ...


class CharTokenizer:
    kind = "char"
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = NUM_SPECIAL + len(self.chars)
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def train(cls, texts: Sequence[str]) -> "CharTokenizer":
        return cls("".join(set().union(*(set(t) for t in texts))))

    def encode(self, text: str) -> np.ndarray:
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        index = np.searchsorted(self._codepoints, codepoints)
        index = np.minimum(index, len(self.chars) - 1)
        unknown = self._codepoints[index] != codepoints
        if unknown.any():
            missing = sorted({chr(c) for c in codepoints[unknown]})
            raise TokenizerError(
                f"the char tokenizer cannot encode {''.join(missing)!r}: "
                f"these characters are not in its {len(self.chars)}-character vocabulary"
            )
        return (index + NUM_SPECIAL).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - NUM_SPECIAL] for i in ids if NUM_SPECIAL <= i < self.vocab_size)

    def token_bytes(self) -> np.ndarray:
        return np.array([1] * NUM_SPECIAL + [len(c.encode("utf-8")) for c in self.chars], np.int64)

    def to_json(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


class ByteTokenizer:
    kind = "byte"
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
    vocab_size = NUM_SPECIAL + 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + NUM_SPECIAL

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - NUM_SPECIAL for i in ids if NUM_SPECIAL <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(self.vocab_size, np.int64)

    def to_json(self) -> dict:
        return {"kind": self.kind}


KINDS = ("char", "byte")


def train(kind: str, texts: Sequence[str]) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "byte":
        return ByteTokenizer()
    raise TokenizerError(f"unknown tokenizer {kind!r}; known: {', '.join(KINDS)}")


def save(tokenizer: Tokenizer, workdir: str) -> None:
    with open(os.path.join(workdir, FILENAME), "w") as f:
        json.dump(tokenizer.to_json(), f, ensure_ascii=False)


def load(workdir: str) -> Tokenizer:
    path = os.path.join(workdir, FILENAME)
    if not os.path.exists(path):
        raise TokenizerError(f"no tokenizer in {workdir} (expected {FILENAME})")
    with open(path) as f:
        spec = json.load(f)
    if spec["kind"] == "char":
        return CharTokenizer(spec["chars"])
    if spec["kind"] == "byte":
        return ByteTokenizer()
    raise TokenizerError(f"{path}: unknown tokenizer kind {spec['kind']!r}")
