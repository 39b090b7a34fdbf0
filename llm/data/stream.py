"""Streamed corpora ('jsonl:GLOB', 'parquet:GLOB'; shards indexed by llm/data/sources.py): a Grain
MapDataset over the index, shuffled per epoch by index, tokenized in worker processes
(data.num_workers) and packed as it streams, one lane per batch row (StreamBatches,
streamed_eval_batches). Memory does not grow with the corpus.
"""

import collections
import dataclasses
import os
import signal
import threading
import time
from concurrent import futures
from typing import Callable, Iterator, Sequence

import numpy as np

from llm.data import sources
from llm.data.config import SPLITS, DataConfig, DataError, is_streamed
from llm.data.packing import TOKENS, Cursor, document_batch, fill_row, pad_batch
from llm.data.tokenizer import Tokenizer


def open_split(dc: DataConfig, split: str) -> sources.Split:
    """A streamed split by name; 'all' is every document (an out-of-domain eval set)."""
    if split not in SPLITS + ("all",):
        raise DataError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    if split == "validation" and dc.validation_dataset:
        if not is_streamed(dc.validation_dataset):
            raise DataError(f"data.validation_dataset={dc.validation_dataset!r} must be 'jsonl:GLOB' or 'parquet:GLOB'")
        corpus = sources.index(dc.validation_dataset, dc.data_dir, dc.text_key, dc.skip_bad_records)
        return sources.split(corpus, "all", 0.0, 0.0)
    corpus = sources.index(dc.dataset, dc.data_dir, dc.text_key, dc.skip_bad_records)
    held_out = 0.0 if dc.validation_dataset else dc.validation_fraction
    return sources.split(corpus, split, held_out, dc.test_fraction)


@dataclasses.dataclass(frozen=True)
class _Encode:
    tokenizer: Tokenizer
    add_bos: bool

    def __call__(self, record: tuple[str, str]) -> tuple[np.ndarray, str]:
        text, problem = record
        if problem:
            return np.zeros(0, np.int32), problem
        ids = [np.asarray(self.tokenizer.encode(text), np.int32), np.array([self.tokenizer.eos_id], np.int32)]
        if self.add_bos:
            ids.insert(0, np.array([self.tokenizer.bos_id], np.int32))
        return np.concatenate(ids), ""


def documents(split: sources.Split, tokenizer: Tokenizer, add_bos: bool, seed: int | None):
    """Grain MapDataset of (tokens, problem); shuffled, element e*N + j is document j of epoch e."""
    import grain

    ds = grain.MapDataset.source(split)
    if seed is not None:
        # Grain reshuffles each epoch with seed + epoch; spreading the run seeds keeps seed s + 1's first
        # epoch from being seed s's second.
        ds = ds.shuffle(seed=int(np.random.SeedSequence(seed).generate_state(1)[0]))
    return ds.map(_Encode(tokenizer, add_bos))


_WORKER: dict = {}


def _start_worker(datasets: dict, owner: int) -> None:
    _WORKER.update(datasets)
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group; the training process turns them
    # into a checkpoint and a clean stop, which needs its workers alive until then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def exit_with_owner():
        # A worker holds its own task queue open, so it would wait forever for a training process
        # that was SIGKILLed; it goes with it instead.
        while True:
            time.sleep(1.0)
            try:
                os.kill(owner, 0)
            except ProcessLookupError:
                os._exit(0)

    threading.Thread(target=exit_with_owner, daemon=True).start()


def _read(name: str, indices: list[int]) -> list[tuple[np.ndarray, str]]:
    ds = _WORKER[name]
    return [ds[i] for i in indices]


class _Later:
    """A request computed here, when first asked for (so a restored position skips what it will not use)."""

    def __init__(self, compute: Callable):
        self._compute, self._value = compute, None

    def result(self):
        if self._compute is not None:
            self._value, self._compute = self._compute(), None
        return self._value


class Reader:
    """Elements of named Grain datasets by index, computed by `num_workers` processes (0: here).

    Workers take indices, not an iterator's turn: a row of long documents consumes fewer of them than
    a row of short ones, so which document is needed next depends on the data, and a sequential
    multiprocess iterator could only serve that with unbounded buffering."""

    def __init__(self, datasets: dict, num_workers: int):
        self._datasets, self._pool = datasets, None
        if num_workers:
            self._pool = futures.ProcessPoolExecutor(num_workers, mp_context=sources.process_context(), initializer=_start_worker,
                                                     initargs=(datasets, os.getpid()))

    def submit(self, name: str, indices: list[int]):
        if self._pool is None:
            ds = self._datasets[name]
            return _Later(lambda: [ds[i] for i in indices])
        return self._pool.submit(_read, name, indices)

    @staticmethod
    def get(pending) -> list[tuple[np.ndarray, str]]:
        try:
            return pending.result()
        except futures.process.BrokenProcessPool as e:
            raise DataError(f"a data worker process died ({e}); the last checkpoint is intact") from None
        except DataError:
            raise
        except Exception as e:  # a worker's error (a shard gone, a read failing): its message, not its traceback
            raise DataError(f"reading the corpus failed: {type(e).__name__}: {e}") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _check(result: tuple[np.ndarray, str], skip_bad: bool) -> np.ndarray:
    tokens, problem = result
    if problem and not skip_bad:
        raise DataError(f"{problem} (data.skip_bad_records=True skips and counts bad records)")
    return tokens


@dataclasses.dataclass
class _Lane(Cursor):
    epoch: int = 0
    doc: int = 0  # the lane's next document in this epoch
    offset: int = 0  # its tokens already used
    carry: int = -1  # concat: the previous row's last token, the next row's first input
    skipped: int = 0  # bad records the lane has read, each time it reads one (skip_bad_records)


def _fill_row(lane: _Lane, current: Callable[[], np.ndarray | None], advance: Callable[[], None], width: int,
              packing: str) -> tuple[np.ndarray, np.ndarray, int]:
    """One row from a lane's documents: (tokens, segment ids, tokens filled). documents: the one packer
    (llm/data/packing.py). concat: a window of the stream that starts on the previous row's last token.
    current() is the lane's document (None at the end of a finite stream), advance() moves to the next."""
    if packing == "documents":
        as_item = lambda: None if (doc := current()) is None else ({"tokens": doc},)
        row, fill = fill_row(as_item, advance, (width,), TOKENS, lane)
        return row[0]["tokens"], row[0]["segments"], fill
    tokens, segments, fill = np.zeros(width, np.int32), np.zeros(width, np.int32), 0
    if lane.carry >= 0:
        tokens[0], segments[0], fill = lane.carry, 1, 1
    while fill < width:
        doc = current()
        if doc is None:
            break
        take = min(len(doc) - lane.offset, width - fill)
        tokens[fill : fill + take], segments[fill : fill + take] = doc[lane.offset : lane.offset + take], 1
        fill, lane.offset = fill + take, lane.offset + take
        if lane.offset == len(doc):
            lane.offset = 0
            advance()
    if fill:
        lane.carry = int(tokens[fill - 1])
    return tokens, segments, fill


def row_batch(rows: list[tuple[np.ndarray, np.ndarray]], packing: str) -> dict[str, np.ndarray]:
    """Rows of (tokens, segment ids) as a batch."""
    return _row_batch(np.stack([t for t, _ in rows]), np.stack([s for _, s in rows]), packing)


def _row_batch(tokens_RxW: np.ndarray, segments_RxW: np.ndarray, packing: str) -> dict[str, np.ndarray]:
    if packing == "documents":
        return document_batch(tokens_RxW, segments_RxW)
    return {"inputs": tokens_RxW[:, :-1], "targets": tokens_RxW[:, 1:],
            "weights": (segments_RxW[:, 1:] != 0).astype(np.float32)}


@dataclasses.dataclass
class _Wanted:
    epoch: int
    doc: int
    request: object = None  # the worker request that holds it
    k: int = 0  # its place in that request
    tokens: np.ndarray | None = None


class StreamBatches:
    """Endless batches of a streamed split. Row r of every global batch is lane r, which packs
    documents r, r + B, r + 2B, ... of each epoch's shuffled order (B = batch_size): a host builds only
    its own rows from only their documents, and the global batch is the same for any number of hosts
    or workers. Each lane's (epoch, document, offset, carry, skipped) is all the state there is. (Grain's
    packing transforms pack one sequential stream per host, which would tie the global batch to the host count.)

    `skipped` (with skip_bad): the corpus's records dropped while indexing, plus every read of a bad
    record by this host's lanes; a bad record counts again in each epoch that reads it. Each lane keeps
    its own count in the state, so merging the hosts' states and resuming on any number of hosts counts
    every read once."""

    CHUNK = 16  # documents per request to a worker
    AHEAD = 8

    def __init__(self, split: sources.Split, tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int,
                 rows: tuple[int, int] | None = None, packing: str = "concat", add_bos: bool = False,
                 num_workers: int = 0, skip_bad: bool = False, reader: "Reader | None" = None, name: str = "train"):
        """`reader` (shared by a mixture's domains, llm/data/mixture.py) already holds this split's
        documents() as `name`; without one, the batches start their own."""
        self.num_docs, self.batch_size, self.width, self.packing, self.skip_bad = len(split), batch_size, seq_len + 1, packing, skip_bad
        if self.num_docs < batch_size:
            raise DataError(f"the training split{'' if name == 'train' else f' of domain {name!r}'} has {self.num_docs} documents, "
                            f"fewer than the {batch_size} rows of a batch (each row streams its own share of the documents)")
        self.rows = rows or (0, batch_size)
        self.lanes = {r: _Lane() for r in range(*self.rows)}
        self._indexing_skipped = split.corpus.skipped
        self._name, self._owns_reader = name, reader is None
        self._reader = reader or Reader({name: documents(split, tokenizer, add_bos, seed)}, num_workers)
        self._wanted: dict[int, collections.deque] = {r: collections.deque() for r in self.lanes}
        self._docs_seen, self._tokens_seen = 0, 0
        # A split whose every record is bad would otherwise be read forever with skip_bad. A lane reads
        # 1/B of each epoch, so a whole split's worth (64 at least) of empty documents in a row is not bad luck.
        self.max_empty_run = max(64, min(self.num_docs, 10_000))
        self._empty_run = {r: 0 for r in self.lanes}
        self.schedule()

    def _following(self, r: int, epoch: int, doc: int) -> tuple[int, int]:
        if r + (doc + 1) * self.batch_size >= self.num_docs:
            return epoch + 1, 0
        return epoch, doc + 1

    def schedule(self) -> None:
        """Keeps about AHEAD rows' worth of documents per lane requested ahead of use: deep enough that
        the workers always have work queued, small next to a batch of rows."""
        mean = self._tokens_seen / self._docs_seen if self._docs_seen else self.width
        ahead = max(self.AHEAD, int(np.ceil(self.AHEAD * self.width / max(mean, 1.0))))
        new = []
        for r, lane in self.lanes.items():
            q = self._wanted[r]
            epoch, doc = self._following(r, q[-1].epoch, q[-1].doc) if q else (lane.epoch, lane.doc)
            while len(q) < ahead:
                q.append(_Wanted(epoch, doc))
                new.append((r, q[-1]))
                epoch, doc = self._following(r, epoch, doc)
        for first in range(0, len(new), self.CHUNK):
            chunk = new[first : first + self.CHUNK]
            request = self._reader.submit(self._name, [w.epoch * self.num_docs + r + w.doc * self.batch_size for r, w in chunk])
            for k, (_, w) in enumerate(chunk):
                w.request, w.k = request, k

    @property
    def skipped(self) -> int:
        return self._indexing_skipped + self.lane_skipped

    @property
    def lane_skipped(self) -> int:
        return sum(lane.skipped for lane in self.lanes.values())

    def _tokens(self, w: _Wanted, lane: _Lane) -> np.ndarray:
        if w.tokens is None:
            tokens, problem = Reader.get(w.request)[w.k]
            if problem:
                _check((tokens, problem), self.skip_bad)
                lane.skipped += 1  # a bad record has no tokens: the lane moves past it at once, so its position agrees
            w.tokens, w.request = tokens, None
            self._docs_seen, self._tokens_seen = self._docs_seen + 1, self._tokens_seen + len(tokens)
        return w.tokens

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Lane r's next row: (tokens, segment ids), each [seq_len + 1]."""
        lane, q = self.lanes[r], self._wanted[r]

        def current():
            if not q:
                self.schedule()
            return self._tokens(q[0], lane)

        def advance():
            left = q.popleft()
            self._empty_run[r] = self._empty_run[r] + 1 if left.tokens is not None and len(left.tokens) == 0 else 0
            if self._empty_run[r] >= self.max_empty_run:
                raise DataError(f"row {r} of the batch read {self._empty_run[r]} documents in a row without one token "
                                f"(bad records skipped by data.skip_bad_records, or empty texts): the training split "
                                f"has next to nothing to train on")
            lane.epoch, lane.doc = self._following(r, lane.epoch, lane.doc)

        tokens, segments, _ = _fill_row(lane, current, advance, self.width, self.packing)
        return tokens, segments

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self.row(r) for r in self.lanes]
        self.schedule()
        return row_batch(rows, self.packing)

    def get_state(self) -> dict:
        lanes = [[lane.epoch, lane.doc, lane.offset, lane.carry, lane.skipped] for lane in self.lanes.values()]
        return {"rows": list(self.rows), "lanes": lanes}

    @staticmethod
    def merge_states(states: Sequence[dict]) -> dict:
        """One state from every host's: all lanes in row order (any host count can resume from it)."""
        states = sorted(states, key=lambda s: s["rows"][0])
        return {"rows": [states[0]["rows"][0], states[-1]["rows"][1]], "lanes": [l for s in states for l in s["lanes"]]}

    def set_state(self, state: dict) -> None:
        if "lanes" not in state:
            raise DataError("the checkpoint's data position is not a streamed one (was the run's data.dataset changed?)")
        first = state["rows"][0]
        for r, lane in self.lanes.items():
            values = [int(v) for v in state["lanes"][r - first]]
            # A checkpoint written before lanes kept their skip counts has 4 values per lane.
            lane.epoch, lane.doc, lane.offset, lane.carry, lane.skipped = (values + [0])[:5]
        self._wanted = {r: collections.deque() for r in self.lanes}
        self.schedule()

    def close(self) -> None:
        if self._owns_reader:
            self._reader.close()


def streamed_eval_batches(split: sources.Split, tokenizer: Tokenizer, batch_size: int, seq_len: int, packing: str = "concat",
                          add_bos: bool = False, num_workers: int = 0, skip_bad: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """One pass in document order, read as it goes, with eval_batches' rows: concat scores every token
    after the first exactly once (the tail padded, weight 0); documents scores within each document."""
    reader = Reader({"eval": documents(split, tokenizer, add_bos, None)}, num_workers)
    chunk, in_flight = 64, 2 * max(num_workers, 1)
    requests = collections.deque()
    next_doc, num_docs = 0, len(split)

    def request_more():
        nonlocal next_doc
        while len(requests) < in_flight and next_doc < num_docs:
            stop = min(next_doc + chunk, num_docs)
            requests.append(reader.submit("eval", list(range(next_doc, stop))))
            next_doc = stop

    def ordered():
        request_more()
        while requests:
            results = Reader.get(requests.popleft())
            request_more()
            for result in results:
                yield _check(result, skip_bad)

    docs, lane, width = ordered(), _Lane(), seq_len + 1
    held = [next(docs, None)]

    def current():
        return held[0]

    def advance():
        held[0] = next(docs, None)

    try:
        rows_tokens, rows_segments = [], []
        while True:
            tokens, segments, fill = _fill_row(lane, current, advance, width, packing)
            done = held[0] is None
            if fill > (1 if packing == "concat" else 0):
                rows_tokens.append(tokens)
                rows_segments.append(segments)
            if len(rows_tokens) == batch_size or (done and rows_tokens):
                yield pad_batch(_row_batch(np.stack(rows_tokens), np.stack(rows_segments), packing), batch_size)
                rows_tokens, rows_segments = [], []
            if done:
                return
    finally:
        reader.close()
