"""The one epoch shuffler of the in-memory data: endless batches whose order is drawn from (seed, epoch)
alone, so every host computes the same global order without talking to the others, and the position
(epoch, batch in epoch) is all the state a checkpoint needs.

Pretraining rows of a text corpus, SFT, preference and RL examples and seq2seq pairs all batch
through `Epochs`. A streamed corpus shuffles with Grain's index shuffle instead (llm/data/stream.py):
a permutation array of a corpus of 10^8 documents would not fit in memory.
"""

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from llm.data.config import DataError
from llm.data.packing import take_rows


class EpochPosition:
    """The state of batches whose position is (epoch, batch in epoch), the same on every host."""

    epoch: int
    batch_in_epoch: int

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def set_state(self, state: dict) -> None:
        if "epoch" not in state:
            raise DataError("the checkpoint's data position is a streamed one (was the run's data.dataset changed?)")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    @staticmethod
    def merge_states(states: Sequence[dict]) -> dict:
        return states[0]  # every host is at the same position

    def close(self) -> None:
        pass


@dataclasses.dataclass
class Epochs(EpochPosition):
    """Endless batches of `batch_size` items, each epoch a fresh order drawn from (seed, epoch) with the
    tail that does not fill a batch dropped. Subclasses say what a batch of items is (`_batch`) and,
    where an epoch is more than a permutation of the items, how its order is drawn (`_draw`)."""

    num_items: int
    batch_size: int
    seed: int
    rows: tuple[int, int] | None = None  # this host's rows [lo, hi) of each global batch; None: all
    epoch: int = 0
    batch_in_epoch: int = 0
    _order_epoch: int | None = dataclasses.field(default=None, init=False, repr=False)
    _permutation: np.ndarray | None = dataclasses.field(default=None, init=False, repr=False)

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(self.num_items)

    def _order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._permutation = self._draw(np.random.default_rng([self.seed, self.epoch]))
            self._order_epoch = self.epoch
        return self._permutation

    def _items_per_epoch(self) -> int:
        return self.num_items

    def _batch(self, order: np.ndarray, first: int, lo: int, hi: int) -> dict:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if (self.batch_in_epoch + 1) * self.batch_size > self._items_per_epoch():
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        lo, hi = self.rows or (0, self.batch_size)
        first = self.batch_in_epoch * self.batch_size
        self.batch_in_epoch += 1
        return self._batch(self._order(), first, lo, hi)


@dataclasses.dataclass
class PackedEpochs(Epochs):
    """Each epoch shuffles the items and packs them, in that order, into rows (llm/data/packing.py); a
    batch is batch_size of those rows. Subclasses say how an ordering of their items packs."""

    _rows_epoch: int | None = dataclasses.field(default=None, init=False, repr=False)
    _rows: dict | None = dataclasses.field(default=None, init=False, repr=False)

    def _pack_items(self, order: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def packed(self) -> dict[str, np.ndarray]:
        """This epoch's rows: a batch dict of [rows, ...] arrays."""
        if self._rows_epoch != self.epoch:
            self._rows, self._rows_epoch = self._pack_items(self._order()), self.epoch
        return self._rows

    def _items_per_epoch(self) -> int:
        return len(self.packed()["inputs"])

    def _batch(self, order: np.ndarray, first: int, lo: int, hi: int) -> dict:
        return take_rows(self.packed(), first + lo, first + hi)
