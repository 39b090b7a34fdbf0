"""A text corpus by name, whichever path reads it (in memory, llm/data/text.py; streamed,
llm/data/stream.py): preparing it, its documents, and its train and eval batches."""

from typing import Iterator

import numpy as np

from llm.data import mixture, sources, stream, text
from llm.data.config import DataConfig, DataError
from llm.data.tokenizer import Tokenizer

SPM_MAX_BYTES = 100_000_000  # SentencePiece on a streamed corpus trains on its first 100 MB at most


def prepare(dc: DataConfig) -> None:
    """Makes the dataset readable: prepares the TFDS builder, or indexes the streamed shards (once)."""
    if dc.streamed:
        stream.open_split(dc, "train")
        if dc.validation_dataset:
            stream.open_split(dc, "validation")
        if dc.mixture:
            mixture.check(dc)
    else:
        text.prepared_builder(dc)


def load_documents(dc: DataConfig, split: str, limit: int = 0) -> list[str]:
    """The split's texts in order (the first `limit` when limit > 0; of a streamed corpus, at most
    SPM_MAX_BYTES of them, and never the whole split)."""
    if not dc.streamed:
        return text.load_documents(dc, split, limit)
    if not limit:
        raise DataError(f"{dc.dataset!r} is streamed; it is never loaded whole")
    texts = list(sources.texts(stream.open_split(dc, split), SPM_MAX_BYTES, limit))
    if not texts:
        raise DataError(f"the {split!r} split of {dc.dataset!r} has no readable document")
    return texts


def split_eval_batches(dc: DataConfig, split: str, tokenizer: Tokenizer, batch_size: int, seq_len: int,
                       domain: str = "") -> Iterator[dict[str, np.ndarray]]:
    """Eval batches of a split of either path (of one domain of a mixture)."""
    if domain:
        return mixture.eval_batches(dc, domain, split, tokenizer, batch_size, seq_len)
    if dc.streamed:
        return stream.streamed_eval_batches(stream.open_split(dc, split), tokenizer, batch_size, seq_len, dc.packing, dc.add_bos,
                                            dc.num_workers, dc.skip_bad_records)
    return text.eval_batches(text.token_stream(dc, split, tokenizer), batch_size, seq_len, dc.packing, tokenizer.eos_id)


def train_batches(dc: DataConfig, tokenizer: Tokenizer, batch_size: int, seq_len: int, seed: int,
                  rows: tuple[int, int] | None) -> "text.TrainBatches | stream.StreamBatches | mixture.MixtureBatches":
    if dc.mixture:
        return mixture.MixtureBatches(dc, tokenizer, batch_size, seq_len, seed, rows)
    if dc.streamed:
        return stream.StreamBatches(stream.open_split(dc, "train"), tokenizer, batch_size, seq_len, seed, rows, dc.packing,
                                    dc.add_bos, dc.num_workers, dc.skip_bad_records)
    return text.TrainBatches(text.token_stream(dc, "train", tokenizer), batch_size, seq_len, seed, rows=rows, sampling=dc.sampling,
                             packing=dc.packing, eos_id=tokenizer.eos_id)


def num_tokens(dc: DataConfig, split: str, tokenizer: Tokenizer) -> int:
    """Tokens in a split: exact in memory; for a streamed split, estimated from its first 64 documents. Of a
    mixture, the tokens a run draws before any domain repeats: min over trained domains of tokens / share."""
    if not dc.streamed:
        return len(text.token_stream(dc, split, tokenizer))
    if dc.mixture:
        domains = [d for d in mixture.parse(dc.mixture) if d.weight > 0]
        total = sum(d.weight for d in domains)
        return min(int(_estimate(mixture.domain_split(dc, d, split), tokenizer) * total / d.weight) for d in domains)
    return _estimate(stream.open_split(dc, split), tokenizer)


def _estimate(s: sources.Split, tokenizer: Tokenizer) -> int:
    sample = [len(tokenizer.encode(t)) + 1 for t in sources.texts(s, SPM_MAX_BYTES, 64)]
    return int(len(s) * np.mean(sample)) if sample else 0
