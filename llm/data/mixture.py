"""A streamed corpus as a mixture of named domains (`data.mixture`): each domain's documents, its splits,
and training batches drawn from the domains at fixed weights.

    data.mixture = "shakespeare=0.2,code=0.3,docs=0.5"            the records' `data.domain_key` field
    data.mixture = "web=0.7@jsonl:/data/web/*.jsonl,code=0.3@jsonl:/data/code/*.jsonl"   a glob per domain

A domain named alone is the records of data.dataset (and, for validation, of data.validation_dataset if set)
whose `data.domain_key` field equals its name; `NAME=WEIGHT@jsonl:GLOB` reads its own shards. Each domain
holds out its own documents (llm/data/sources.py's rule over the domain's documents in corpus order). A
weight of 0 evaluates a domain without training on it.

Draws are of rows, not documents, so weights are shares of the training tokens whatever the domains'
document lengths: row r of batch n comes from the domain a uniform draw keyed by (seed, r, n) picks, and
each domain keeps, per row, the lane position a plain StreamBatches would (llm/data/stream.py). So the
batches depend on nothing but the seed, the weights and the corpus: not on the worker count or the number
of hosts, and a checkpoint's data position (each domain's lanes and the batches drawn) resumes exactly.
"""

import dataclasses
import functools
import re
import zlib
from typing import Sequence

import numpy as np

from llm.data import sources, stream
from llm.data.config import DataConfig, DataError, is_streamed
from llm.data.tokenizer import Tokenizer

_NAME = re.compile(r"[A-Za-z0-9_]+")


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    weight: float
    dataset: str = ""  # 'jsonl:GLOB' / 'parquet:GLOB' of its own; '' : by the records' domain field


def parse(mixture: str) -> list[Domain]:
    """data.mixture's domains, in order; DataError naming what is wrong with it."""
    domains, problems = [], []
    for entry in (e.strip() for e in mixture.split(",")):
        name, eq, rest = entry.partition("=")
        weight, at, dataset = rest.partition("@")
        name = name.strip()
        try:
            value = float(weight)
        except ValueError:
            value = None
        if not eq or value is None:
            problems.append(f"{entry!r} is not NAME=WEIGHT or NAME=WEIGHT@jsonl:GLOB")
        elif not _NAME.fullmatch(name):
            problems.append(f"domain name {name!r} must be letters, digits and _ (it names metrics and results.csv columns)")
        elif not np.isfinite(value) or value < 0:
            problems.append(f"domain {name!r} has weight {weight.strip()}; weights must be finite and >= 0")
        elif at and not is_streamed(dataset.strip()):
            problems.append(f"domain {name!r} reads {dataset.strip()!r}, which is not 'jsonl:GLOB' or 'parquet:GLOB'")
        elif name in [d.name for d in domains]:
            problems.append(f"domain {name!r} is named twice")
        else:
            domains.append(Domain(name, value, dataset.strip()))
    if not problems and not any(d.weight > 0 for d in domains):
        problems.append("every weight is 0; at least one domain must be trained on")
    if problems:
        raise DataError(f"data.mixture={mixture!r}: " + "; ".join(problems))
    return domains


def names(dc: DataConfig) -> list[str]:
    return [d.name for d in parse(dc.mixture)] if dc.mixture else []


@functools.lru_cache(maxsize=8)
def _fields(dataset: str, data_dir: str, text_key: str, skip_bad: bool, key: str) -> tuple[sources.Corpus, dict[str, int], np.ndarray]:
    corpus = sources.index(dataset, data_dir, text_key, skip_bad)
    values, codes = sources.field_values(corpus, key)
    return corpus, {v: i for i, v in enumerate(values)}, codes


def _by_field(dc: DataConfig, dataset: str, name: str) -> tuple[sources.Corpus, np.ndarray]:
    corpus, found, codes = _fields(dataset, dc.data_dir, dc.text_key, dc.skip_bad_records, dc.domain_key)
    if name not in found:
        seen = ", ".join(sorted(found)[:20]) or "none"
        raise DataError(f"data.mixture: no record of {dataset!r} has {dc.domain_key!r} (data.domain_key) = {name!r}; "
                        f"its domains: {seen}")
    return corpus, np.flatnonzero(codes == found[name])


def domain_split(dc: DataConfig, domain: Domain, split: str) -> sources.Split:
    """One domain's documents of a split ('all': every one of them)."""
    if domain.dataset:
        corpus = sources.index(domain.dataset, dc.data_dir, dc.text_key, dc.skip_bad_records)
        held = (0.0, 0.0) if split == "all" else (dc.validation_fraction, dc.test_fraction)
        return sources.split(corpus, split, *held)
    if split == "validation" and dc.validation_dataset:
        return sources.Subset(*_by_field(dc, dc.validation_dataset, domain.name))
    corpus, ids = _by_field(dc, dc.dataset, domain.name)
    held_out = 0.0 if dc.validation_dataset else dc.validation_fraction
    lo, hi, period = sources.held_out_range(len(ids), split, held_out, dc.test_fraction)
    position = np.arange(len(ids)) % period
    subset = sources.Subset(corpus, ids=ids[(position >= lo) & (position < hi)])
    if not len(subset):
        raise DataError(f"the {split!r} split of domain {domain.name!r} is empty ({len(ids)} documents in all)")
    return subset


def check(dc: DataConfig) -> None:
    """Every domain has training and validation documents (one DataError naming the first that has not)."""
    for domain in parse(dc.mixture):
        domain_split(dc, domain, "validation")
        if domain.weight > 0:
            domain_split(dc, domain, "train")


def _seed(seed: int, name: str) -> int:
    # Each domain's own document order: domains of equal length must not share one permutation.
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


class MixtureBatches:
    """Endless batches whose rows come from the trained domains at their weights (see the module's docstring)."""

    def __init__(self, dc: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int,
                 rows: tuple[int, int] | None = None):
        self.domains = [d for d in parse(dc.mixture) if d.weight > 0]
        weights = np.array([d.weight for d in self.domains])
        self.cumulative = np.cumsum(weights / weights.sum())
        self.seed, self.packing, self.drawn = seed, dc.packing, 0
        self.rows = rows or (0, batch_size)
        splits = {d.name: domain_split(dc, d, "train") for d in self.domains}
        self._reader = stream.Reader({name: stream.documents(s, tokenizer, dc.add_bos, _seed(seed, name)) for name, s in splits.items()},
                                     dc.num_workers)
        self._corpora = {id(s.corpus): s.corpus.skipped for s in splits.values()}
        self.streams = {name: stream.StreamBatches(s, tokenizer, batch_size, seq_len, seed, self.rows, dc.packing, dc.add_bos,
                                                   skip_bad=dc.skip_bad_records, reader=self._reader, name=name)
                        for name, s in splits.items()}

    def domain_of(self, r: int, n: int) -> str:
        """The domain of row r of batch n."""
        u = np.random.default_rng([self.seed, r, n]).random()
        return self.domains[min(int(np.searchsorted(self.cumulative, u, "right")), len(self.domains) - 1)].name

    @property
    def skipped(self) -> int:
        return sum(self._corpora.values()) + sum(s.lane_skipped for s in self.streams.values())

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [self.streams[self.domain_of(r, self.drawn)].row(r) for r in range(*self.rows)]
        for s in self.streams.values():
            s.schedule()
        self.drawn += 1
        return stream.row_batch(rows, self.packing)

    def get_state(self) -> dict:
        return {"rows": list(self.rows), "drawn": self.drawn, "domains": {name: s.get_state() for name, s in self.streams.items()}}

    @staticmethod
    def merge_states(states: Sequence[dict]) -> dict:
        states = sorted(states, key=lambda s: s["rows"][0])
        merged = {name: stream.StreamBatches.merge_states([s["domains"][name] for s in states]) for name in states[0]["domains"]}
        return {"rows": [states[0]["rows"][0], states[-1]["rows"][1]], "drawn": states[0]["drawn"], "domains": merged}

    def set_state(self, state: dict) -> None:
        if "domains" not in state:
            raise DataError("the checkpoint's data position is not a mixture's (was data.mixture added to a running run?)")
        self.drawn = int(state["drawn"])
        for name, s in self.streams.items():
            if name in state["domains"]:  # a domain added since the checkpoint starts at its beginning
                s.set_state(state["domains"][name])

    def close(self) -> None:
        self._reader.close()


def eval_batches(dc: DataConfig, name: str, split: str, tokenizer: Tokenizer, batch_size: int, seq_len: int):
    """One pass over a domain's split, as streamed_eval_batches reads any split."""
    domain = next(d for d in parse(dc.mixture) if d.name == name)
    return stream.streamed_eval_batches(domain_split(dc, domain, split), tokenizer, batch_size, seq_len, dc.packing, dc.add_bos,
                                        dc.num_workers, dc.skip_bad_records)
