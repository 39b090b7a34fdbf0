"""Tokenizers behind one small interface: char, byte and SentencePiece (BPE or unigram).

The project's tokenizers reserve pad=0, bos=1, eos=2 (SentencePiece also unk=3); a run saves its
tokenizer as `tokenizer.json` (plus `tokenizer.model` for SentencePiece) in its workdir.
"""

import hashlib
import io
import json
import os
from typing import Iterable, Protocol, Sequence

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

    def fingerprint(self) -> str:
        """Changes whenever the id of any text changes (the key of cached token streams)."""
        ...


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

    def fingerprint(self) -> str:
        return "char-" + hashlib.sha1(self.chars.encode("utf-8")).hexdigest()


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

    def fingerprint(self) -> str:
        return "byte"


class SentencePieceTokenizer:
    kind = "sentencepiece"
    MODEL_FILENAME = "tokenizer.model"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        # A foreign model may have no pad piece; padding is always weighted out, so any id serves.
        self.pad_id = max(self._sp.pad_id(), 0)
        if self.eos_id < 0:
            raise TokenizerError("the SentencePiece model has no eos piece, which documents are separated by")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe", max_sentences: int = 1_000_000) -> "SentencePieceTokenizer":
        import sentencepiece as spm

        # Lines are SentencePiece's sentences; '\n' becomes a piece of its own so text round-trips.
        sentences = [line for text in texts for line in text.split("\n") if line.strip()]
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type=model_type,
                pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=3, byte_fallback=True,
                user_defined_symbols=["\n"], normalization_rule_name="identity", remove_extra_whitespaces=False,
                add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
                character_coverage=0.9995, input_sentence_size=max_sentences, shuffle_input_sentence=True,
                max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2,
            )
        except RuntimeError as e:
            raise TokenizerError(f"SentencePiece training failed (data.vocab_size={vocab_size}): {str(e).splitlines()[-1]}") from e
        return cls(model.getvalue())

    def piece_ids(self, pieces: Sequence[str]) -> list[int] | None:
        """The ids of `pieces` if the model has every one of them as a piece of its own, else None."""
        found = [self._sp.piece_to_id(p) for p in pieces]
        return None if any(i == self._sp.unk_id() or i < 0 for i in found) else found

    def __getstate__(self) -> dict:
        return {"model_proto": self.model_proto}  # data workers get the model, not the C++ processor

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"])

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        specials = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.decode([int(i) for i in ids if 0 <= i < self.vocab_size and i not in specials])

    def token_bytes(self) -> np.ndarray:
        sp = self._sp

        def size(i: int) -> int:
            if sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i):
                return 1
            return len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))

        return np.array([size(i) for i in range(self.vocab_size)], np.int64)

    def to_json(self) -> dict:
        return {"kind": self.kind, "model_file": self.MODEL_FILENAME}

    def fingerprint(self) -> str:
        return "spm-" + hashlib.sha1(self.model_proto).hexdigest()


KINDS = ("char", "byte", "sentencepiece")
# The built-in Shakespeare's 84 characters and the 3 specials: a char vocabulary of the default corpus.
CHAR_VOCAB = 87


def size_without_corpus(kind: str, spm_vocab_size: int) -> int:
    """A tokenizer's size where no corpus is read (benchmarks, compiling for a slice): SentencePiece's as
    configured, bytes' 259, and for characters the built-in Shakespeare's."""
    if kind == "sentencepiece":
        return spm_vocab_size
    return NUM_SPECIAL + 256 if kind == "byte" else CHAR_VOCAB


def train(kind: str, texts: Sequence[str], vocab_size: int = 4096, spm_model_type: str = "bpe",
          spm_input_sentences: int = 1_000_000, tokenizer_path: str = "") -> Tokenizer:
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        if tokenizer_path:
            if not os.path.exists(tokenizer_path):
                raise TokenizerError(f"data.tokenizer_path={tokenizer_path!r} does not exist")
            with open(tokenizer_path, "rb") as f:
                return SentencePieceTokenizer(f.read())
        return SentencePieceTokenizer.train(texts, vocab_size, spm_model_type, spm_input_sentences)
    raise TokenizerError(f"unknown tokenizer {kind!r}; known: {', '.join(KINDS)}")


def save(tokenizer: Tokenizer, workdir: str) -> None:
    if isinstance(tokenizer, SentencePieceTokenizer):
        with open(os.path.join(workdir, SentencePieceTokenizer.MODEL_FILENAME), "wb") as f:
            f.write(tokenizer.model_proto)
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
    if spec["kind"] == "sentencepiece":
        with open(os.path.join(workdir, spec["model_file"]), "rb") as f:
            return SentencePieceTokenizer(f.read())
    raise TokenizerError(f"{path}: unknown tokenizer kind {spec['kind']!r}")
