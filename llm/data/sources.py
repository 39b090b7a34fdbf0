"""Streamed corpora: JSONL (plain, .gz, .zst) and Parquet shards, read one document at a time by index.
(Just over 400 lines: indexing, converting and reading a shard share its layout on disk.)

Every shard is, or is converted once into, a plain JSONL file, and gets an index of the byte span of
each record; reading document i is then one seek and one read, so a Grain MapDataset can shuffle the
whole corpus by index without holding any of it. Indexes (and converted copies) live in
`<data_dir>/llm_index/`, keyed by each shard's path, size and mtime, so a sweep indexes a corpus once.

Splits of one corpus are a deterministic hold-out of whole documents: of every P = min(1000, N)
consecutive documents, the last round(P * validation_fraction) are validation and the
round(P * test_fraction) before them are test. `data.validation_dataset` names a separate corpus instead.
"""

import collections
import dataclasses
import gzip
import hashlib
import io
import json
import os
import zlib
from concurrent import futures
from typing import Iterator

import numpy as np

from llm.data.config import DataError

_CHUNK = 1 << 24
_PERIOD = 1000


class BadRecord(DataError):
    pass


def json_object(line: str, where: str) -> dict:
    """One JSONL line as an object; BadRecord naming `where` otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: a JSON {type(record).__name__}, not an object")
    return record


@dataclasses.dataclass(frozen=True)
class Shard:
    name: str  # the user's path, for messages
    path: str  # a plain JSONL file: the shard itself or its converted copy
    spans: str  # .npy (R, 2) int64: each record's [start, end) bytes in `path`, newline excluded
    records: int
    unit: str = "line"  # how messages count records: JSONL 'line' (1-based), Parquet 'row' (0-based)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents 0..N-1 of every shard in path order; picklable, so worker processes reopen it."""

    shards: tuple[Shard, ...]
    text_key: str
    # Dropped while indexing (skip_bad_records), once per job: a truncated tail, an empty shard, each
    # row of an unreadable Parquet row group.
    skipped: int = 0

    def __post_init__(self):
        object.__setattr__(self, "_starts", np.cumsum([0] + [s.records for s in self.shards]))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def where(self, i: int) -> str:
        k = int(np.searchsorted(self._starts, i, "right")) - 1
        shard, j = self.shards[k], i - int(self._starts[k])
        if shard.unit == "row":
            return f"{shard.name} row {j}"
        start = int(_spans(shard.spans)[j, 0])
        return f"{shard.name} line {_line_number(shard.path, start)}"

    def text(self, i: int) -> str:
        """Raises BadRecord naming the file and the record."""
        k = int(np.searchsorted(self._starts, i, "right")) - 1
        shard = self.shards[k]
        start, end = (int(v) for v in _spans(shard.spans)[i - int(self._starts[k])])
        f = _open(shard.path)
        f.seek(start)
        raw = f.read(end - start)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(f"{self.where(i)}: not UTF-8 (invalid byte at offset {e.start})") from None
        record = json_object(line, self.where(i))
        if self.text_key not in record:
            fields = ", ".join(list(record)[:10]) or "none"
            raise BadRecord(f"{self.where(i)}: no field {self.text_key!r} (data.text_key); its fields: {fields}")
        value = record[self.text_key]
        if not isinstance(value, str):
            raise BadRecord(f"{self.where(i)}: field {self.text_key!r} is {type(value).__name__}, not a string")
        return value


_OPEN: collections.OrderedDict = collections.OrderedDict()
_MAX_OPEN = 64  # corpora come in thousands of shards; a process keeps the most recently read open
_SPANS: dict[str, np.ndarray] = {}


def _open(path: str):
    if path in _OPEN:
        _OPEN.move_to_end(path)
        return _OPEN[path]
    if len(_OPEN) >= _MAX_OPEN:
        _OPEN.popitem(last=False)[1].close()
    if "://" in path:
        import fsspec

        _OPEN[path] = fsspec.open(path, "rb").open()
    else:
        _OPEN[path] = open(path, "rb")
    return _OPEN[path]


def _spans(path: str) -> np.ndarray:
    if path not in _SPANS:
        _SPANS[path] = np.load(path, mmap_mode="r")
    return _SPANS[path]


def _line_number(path: str, offset: int) -> int:
    # Only on the error path: counts the newlines before the record.
    f, count, done = _open(path), 1, 0
    f.seek(0)
    while done < offset:
        chunk = f.read(min(_CHUNK, offset - done))
        count, done = count + chunk.count(b"\n"), done + len(chunk)
    return count


def expand(dataset: str) -> tuple[str, list[str]]:
    """('jsonl' | 'parquet', sorted shard paths) of 'jsonl:GLOB' / 'parquet:GLOB'; local or any fsspec URL."""
    kind, pattern = dataset.split(":", 1)
    if "://" in pattern:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(pattern)
        protocol = pattern.split("://", 1)[0]
        paths = sorted(p if "://" in p else f"{protocol}://{p}" for p in fs.glob(pattern) if fs.isfile(p))
    else:
        import glob

        paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"data.dataset={dataset!r}: the glob {pattern!r} matches no files")
    return kind, paths


def _stat(path: str) -> tuple[int, str]:
    if "://" in path:
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        info = fs.info(p)
        return int(info.get("size") or 0), str(info.get("mtime") or info.get("updated") or info.get("LastModified") or "")
    st = os.stat(path)
    return st.st_size, str(st.st_mtime_ns)


def _index_dir(data_dir: str) -> str:
    return os.path.join(os.path.expanduser(data_dir or "~/tensorflow_datasets"), "llm_index")


def _read_stream(path: str):
    if "://" in path:
        import fsspec

        raw = fsspec.open(path, "rb").open()
    else:
        raw = open(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def _write_spans(path: str, out: str) -> int:
    """Scans a plain JSONL file for its records' byte spans (blank lines are not records)."""
    ends, size = [], 0
    with _read_stream(path) as f:
        while chunk := f.read(_CHUNK):
            ends.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
            size += len(chunk)
    newlines = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    stops = np.concatenate([newlines, [size]]).astype(np.int64)
    spans = np.stack([starts, stops], axis=1)
    spans = spans[spans[:, 1] > spans[:, 0]]
    keep = np.ones(len(spans), bool)
    f = _open(path)
    for k in np.flatnonzero(spans[:, 1] - spans[:, 0] == 1):  # a lone '\r' (CRLF files) is a blank line too
        f.seek(int(spans[k, 0]))
        keep[k] = f.read(1) != b"\r"
    spans = spans[keep]
    tmp = f"{out}.{os.getpid()}.tmp.npy"
    np.save(tmp, spans)
    os.replace(tmp, out)  # atomic: hosts and sweeps sharing the index never read half a file
    return len(spans)


def _decompress(path: str, out: str, skip_bad: bool) -> int:
    """Copies a .gz/.zst shard's text verbatim (so line numbers match); returns 1 if a truncated tail
    was dropped (skip_bad), else 0."""
    tmp, done, dropped = f"{out}.{os.getpid()}.tmp", 0, 0
    with open(tmp, "wb") as dst:
        try:
            with _read_stream(path) as src:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    done += chunk.count(b"\n")
        except (EOFError, OSError, zlib.error, ValueError) as e:  # zstandard.ZstdError is a ValueError
            if not skip_bad:
                os.remove(tmp)
                raise DataError(f"{path} is truncated or corrupt after line {done} ({e}); "
                                f"data.skip_bad_records=True keeps the complete lines before it") from None
            dropped = 1
        if dropped:
            dst.flush()
            dst.truncate(_last_newline(tmp) + 1)
    os.replace(tmp, out)
    return dropped


def _last_newline(path: str) -> int:
    with open(path, "rb") as f:
        f.seek(0, io.SEEK_END)
        end = f.tell()
        while end > 0:
            start = max(0, end - _CHUNK)
            f.seek(start)
            pos = f.read(end - start).rfind(b"\n")
            if pos >= 0:
                return start + pos
            end = start
    return -1


def _parquet_to_jsonl(path: str, out: str, text_key: str, skip_bad: bool) -> int:
    """Writes the text column as JSONL, one row group in memory at a time; returns the rows of row
    groups that could not be read and were dropped (skip_bad), else 0."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(_read_stream(path))
    except Exception as e:  # pyarrow.ArrowInvalid and friends for a file that is not Parquet
        raise DataError(f"{path} is not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_key not in names:
        raise DataError(f"{path} has no column {text_key!r} (data.text_key); its columns: {', '.join(names)}")
    tmp, first, dropped = f"{out}.{os.getpid()}.tmp", 0, 0
    with open(tmp, "w", encoding="utf-8") as dst:
        for g in range(pf.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            try:
                values = pf.read_row_group(g, columns=[text_key]).column(0).to_pylist()
            except Exception as e:  # a footer can be intact over a corrupt page: OSError, ArrowInvalid, UnicodeDecodeError
                if not skip_bad:
                    os.remove(tmp)
                    reason = (str(e).strip() or type(e).__name__).splitlines()[0]
                    raise DataError(f"{path} row group {g} (rows {first}-{first + rows - 1}) is unreadable ({reason}); "
                                    f"data.skip_bad_records=True skips its rows") from None
                # Later rows' numbers shift by its rows; only skipping mode, which names no record, gets here.
                values, dropped = [], dropped + rows
            for value in values:
                dst.write(json.dumps({text_key: value}, ensure_ascii=False) + "\n")
            first += rows
    os.replace(tmp, out)
    return dropped


def _base(kind: str, path: str, data_dir: str, text_key: str, skip_bad: bool) -> str:
    size, mtime = _stat(path)
    key = hashlib.sha1(json.dumps([path, size, mtime, kind == "parquet" and text_key, skip_bad]).encode()).hexdigest()[:20]
    return os.path.join(_index_dir(data_dir), key)


def _copy_path(kind: str, path: str, base: str) -> str:
    return path if kind == "jsonl" and not path.endswith((".gz", ".zst")) else base + ".jsonl"


def _build_index(kind: str, path: str, data_dir: str, text_key: str, skip_bad: bool) -> None:
    base = _base(kind, path, data_dir, text_key, skip_bad)
    copy, marker = _copy_path(kind, path, base), base + ".json"
    os.makedirs(os.path.dirname(base), exist_ok=True)
    dropped = 0
    if kind == "parquet":
        dropped = _parquet_to_jsonl(path, copy, text_key, skip_bad)
    elif copy != path:
        dropped = _decompress(path, copy, skip_bad)
    records = _write_spans(copy, base + ".spans.npy")
    with open(marker + ".tmp", "w") as f:
        json.dump({"source": path, "records": records, "dropped": dropped}, f)
    os.replace(marker + ".tmp", marker)


def _shard(kind: str, path: str, data_dir: str, text_key: str, skip_bad: bool) -> tuple[Shard | None, int]:
    base = _base(kind, path, data_dir, text_key, skip_bad)
    with open(base + ".json") as f:
        meta = json.load(f)
    if not meta["records"]:
        if not skip_bad:
            raise DataError(f"{path} is an empty shard (no records); data.skip_bad_records=True skips it")
        return None, meta["dropped"] or 1  # emptied by a drop already counted, or empty to begin with
    shard = Shard(path, _copy_path(kind, path, base), base + ".spans.npy", meta["records"], "row" if kind == "parquet" else "line")
    return shard, meta["dropped"]


def process_context():
    # Forked from a clean server, never from the calling process: forking a process that runs JAX's
    # threads can deadlock the child.
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["llm.data.stream"])
    return ctx


def index(dataset: str, data_dir: str, text_key: str, skip_bad: bool = False, workers: int = 0) -> Corpus:
    """Indexes (once; cached) every shard of 'jsonl:GLOB' / 'parquet:GLOB', shards in parallel."""
    kind, paths = expand(dataset)
    args = [(kind, p, data_dir, text_key, skip_bad) for p in paths]
    todo = [a for a in args if not os.path.exists(_base(*a) + ".json")]
    workers = workers or min(len(todo), os.cpu_count() or 1)
    if workers > 1 and len(todo) > 1:
        with futures.ProcessPoolExecutor(workers, mp_context=process_context()) as pool:
            list(pool.map(_build_index, *zip(*todo)))
    else:
        for a in todo:
            _build_index(*a)
    results = [_shard(*a) for a in args]
    shards = tuple(s for s, _ in results if s is not None)
    if not shards:
        raise DataError(f"data.dataset={dataset!r}: no shard has any records")
    return Corpus(shards, text_key, sum(d for _, d in results))


@dataclasses.dataclass(frozen=True)
class Split:
    """Documents of one split: a Grain random-access source of (text, problem) pairs; problem is ''
    unless the record is bad (then text is '' and problem names the file and the record)."""

    corpus: Corpus
    lo: int = 0  # residues [lo, hi) of every `period` consecutive documents
    hi: int = 1
    period: int = 1

    def __len__(self) -> int:
        full, rest = divmod(len(self.corpus), self.period)
        width = self.hi - self.lo
        return full * width + min(max(rest - self.lo, 0), width)

    def document(self, k: int) -> int:
        width = self.hi - self.lo
        return (k // width) * self.period + self.lo + k % width

    def __getitem__(self, k: int) -> tuple[str, str]:
        try:
            return self.corpus.text(self.document(k)), ""
        except BadRecord as e:
            return "", str(e)


@dataclasses.dataclass(frozen=True)
class Subset(Split):
    """Documents `ids` of a corpus, in that order (one domain's documents of a split; llm/data/mixture.py)."""

    ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def document(self, k: int) -> int:
        return int(self.ids[k])


def field_values(corpus: Corpus, key: str) -> tuple[list[str], np.ndarray]:
    """(names, codes): record i of the corpus has string field `key` == names[codes[i]], or codes[i] == -1
    (no such string field, or a bad record). Read once per shard and cached beside its index."""
    names: dict[str, int] = {}
    codes = []
    for shard in corpus.shards:
        cache = shard.spans.removesuffix(".spans.npy") + f".field-{hashlib.sha1(key.encode()).hexdigest()[:8]}.json"
        if not os.path.exists(cache):
            values = []
            f = _open(shard.path)
            for start, end in _spans(shard.spans):
                f.seek(int(start))
                try:
                    value = json.loads(f.read(int(end - start)).decode("utf-8")).get(key)
                except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                    value = None
                values.append(value if isinstance(value, str) else None)
            with open(cache + f".{os.getpid()}.tmp", "w") as out:
                json.dump(values, out)
            os.replace(cache + f".{os.getpid()}.tmp", cache)
        with open(cache) as f:
            values = json.load(f)
        codes.append(np.array([-1 if v is None else names.setdefault(v, len(names)) for v in values], np.int64))
    return list(names), np.concatenate(codes) if codes else np.zeros(0, np.int64)


def held_out_range(n: int, name: str, validation_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(lo, hi, period): item i of n belongs to split `name` iff lo <= i % period < hi. Of every
    period = min(1000, n) items the last round(period * v) are validation, the round(period * t)
    before them test (whole documents of a streamed corpus, whole post-training examples)."""
    period = min(_PERIOD, n)
    num_val, num_test = round(period * validation_fraction), round(period * test_fraction)
    num_train = period - num_val - num_test
    lo, hi = {"train": (0, num_train), "test": (num_train, num_train + num_test),
              "validation": (num_train + num_test, period), "all": (0, period)}[name]
    return lo, hi, period


def split(corpus: Corpus, name: str, validation_fraction: float, test_fraction: float) -> Split:
    s = Split(corpus, *held_out_range(len(corpus), name, validation_fraction, test_fraction))
    if not len(s):
        raise DataError(f"the {name!r} split is empty: {len(corpus)} documents, of which a fraction "
                        f"{validation_fraction if name == 'validation' else test_fraction if name == 'test' else 1 - validation_fraction - test_fraction} is held out for it")
    return s


def texts(s: Split, max_bytes: int, max_documents: int) -> Iterator[str]:
    """The split's first documents, up to either limit (what SentencePiece trains on); bad ones skipped."""
    total = 0
    for k in range(min(len(s), max_documents)):
        text, problem = s[k]
        if problem:
            continue
        yield text
        total += len(text)
        if total >= max_bytes:
            return
